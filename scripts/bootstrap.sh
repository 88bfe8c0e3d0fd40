#!/usr/bin/env bash
# Install what ttfs needs on a fresh Debian 12 machine, idempotently:
#   system packages (apt, only the missing ones; needs root or sudo) and a venv at .venv with
#   ttfs and the extras named in $1 (e.g. "test"). Re-running is cheap: a stamp file per extras
#   set records a finished install for the current pyproject.toml.
set -euo pipefail
cd "$(dirname "$0")/.."
extras="${1:-}"
venv="${VENV:-.venv}"

apt_pkgs=(fuse3 libfuse3-dev pkg-config gcc python3-dev python3-venv curl)
[ "${TTFS_BOOTSTRAP_BENCH:-0}" = 1 ] && apt_pkgs+=(nginx libnginx-mod-http-lua aria2 rclone)
missing=()
for p in "${apt_pkgs[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  sudo=""; [ "$(id -u)" -ne 0 ] && sudo="sudo"
  echo "bootstrap: apt-get install ${missing[*]}"
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${missing[@]}" >/dev/null
fi

py="${PYTHON:-python3}"
[ -x "$venv/bin/python" ] || "$py" -m venv "$venv"
stamp="$venv/.installed-${extras:-base}"
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
  "$venv/bin/pip" install -q --upgrade pip >/dev/null 2>&1 || true
  spec="."
  [ -n "$extras" ] && spec=".[$extras]"
  # Machines of this project keep the CPU build of torch in /opt/wheels; without it pip would
  # fetch a multi-GB CUDA build from PyPI.
  links=()
  [ -d /opt/wheels ] && links=(--find-links /opt/wheels)
  echo "bootstrap: pip install -e '$spec'"
  "$venv/bin/pip" install -q "${links[@]}" -e "$spec"
  touch "$stamp"
fi

# Bytecode for the package, as an installed wheel has it (pip compiles at install; an editable
# install does not). Where PYTHONDONTWRITEBYTECODE is set (these machines set it) every ttfs
# process would otherwise compile each module it imports: ~0.25 s of a mount's start and of
# every CLI call. Cheap when up to date (a stat per file); stale files are recompiled.
"$venv/bin/python" -m compileall -q -j 0 ttfs truss_transfer >/dev/null

# Azurite, the Azure Blob emulator of the provider tests (npm, cached in the ignored .work/).
# The test fixture installs it too when this step could not run.
if [[ ",$extras," == *",test,"* ]] && command -v npm >/dev/null 2>&1 \
    && [ ! -x .work/azurite/node_modules/.bin/azurite-blob ]; then
  echo "bootstrap: npm install azurite@3.35.0 into .work/azurite"
  mkdir -p .work/azurite
  npm install --prefix .work/azurite --no-audit --no-fund --loglevel=error azurite@3.35.0 \
    >/dev/null || echo "bootstrap: npm install azurite failed; the Azure tests will retry" >&2
fi
