# Sourced by scripts/test and scripts/demo: make (or reuse) the venv and install the project.
PYTHON="${PYTHON:-python3}"
VENV="${VENV:-.venv}"
if ! command -v cc >/dev/null 2>&1 && ! command -v gcc >/dev/null 2>&1; then
  echo "installing a C compiler (supervise's reaper helper is C)" >&2
  if [ "$(id -u)" = 0 ]; then SUDO=""; else SUDO="sudo"; fi
  $SUDO apt-get update -qq && $SUDO apt-get install -y -qq gcc libc6-dev >/dev/null
fi
if [ ! -x "$VENV/bin/python" ]; then
  "$PYTHON" -m venv "$VENV"
fi
"$VENV/bin/python" -m pip install -q --disable-pip-version-check -e ".${EXTRAS:-}"
