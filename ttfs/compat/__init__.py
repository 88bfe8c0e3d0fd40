"""Drop-in surfaces of other tools (truss_transfer)."""
