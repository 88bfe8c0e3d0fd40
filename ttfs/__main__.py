"""``python -m ttfs`` runs the CLI (the mount tests start the daemon this way)."""

from .cli import main

main()
