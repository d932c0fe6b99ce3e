# Sourced by scripts/test, scripts/demo and scripts/bench: make (or reuse) the venv and install the project.
PYTHON="${PYTHON:-python3}"
VENV="${VENV:-.venv}"
if ! command -v cc >/dev/null 2>&1 && ! command -v gcc >/dev/null 2>&1; then
  echo "installing a C compiler (supervise's reaper helper is C)" >&2
  if [ "$(id -u)" = 0 ]; then SUDO=""; else SUDO="sudo"; fi
  $SUDO apt-get update -qq && $SUDO apt-get install -y -qq gcc libc6-dev >/dev/null
fi
if ! command -v redis-server >/dev/null 2>&1; then
  # The ledger's Redis tests run against a real server; without one they skip, saying why.
  if [ "$(id -u)" = 0 ] || command -v sudo >/dev/null 2>&1; then
    echo "installing redis-server (for the budget ledger's Redis tests)" >&2
    if [ "$(id -u)" = 0 ]; then SUDO=""; else SUDO="sudo -n"; fi
    { $SUDO apt-get update -qq && $SUDO apt-get install -y -qq redis-server >/dev/null; } ||
      echo "could not install redis-server: the redis tests will be skipped" >&2
  else
    echo "no redis-server and no root: the redis tests will be skipped" >&2
  fi
fi
if [ ! -x "$VENV/bin/python" ]; then
  "$PYTHON" -m venv "$VENV"
fi
# The distribution was called agent-supervisor (a PyPI name that belongs to another project):
# drop it from an older venv, or both would own the supervisor package and the supervise command.
if compgen -G "$VENV/lib/python*/site-packages/agent_supervisor-*.dist-info" >/dev/null; then
  "$VENV/bin/python" -m pip uninstall -q -y --disable-pip-version-check agent-supervisor
fi
# Editable: the build hook (setup.py) compiles the reaper helper into supervisor/_reaper.
"$VENV/bin/python" -m pip install -q --disable-pip-version-check -e ".${EXTRAS:-}"
