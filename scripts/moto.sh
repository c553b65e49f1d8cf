#!/usr/bin/env bash
# The Python the tests use: moto's S3-compatible server (PyPI `moto[server]`),
# which the S3 archive tests start on loopback, and Apache DataSketches
# (PyPI `datasketches`), which reads the sketches tally stores. Installs them
# for python3 when missing; on a Python
# that refuses pip installs (PEP 668), into a venv under target/moto-venv.
# Prints the interpreter to use (the tests read it from TALLY_TEST_PYTHON).
set -euo pipefail
cd "$(dirname "$0")/.."
check='import moto.server, flask, flask_cors, datasketches'
PKGS=('moto[server]>=5,<6' 'datasketches>=5,<6')
PY=${PYTHON:-python3}
if "$PY" -c "$check" 2>/dev/null; then
  command -v "$PY"; exit 0
fi
if "$PY" -m pip install --quiet --disable-pip-version-check "${PKGS[@]}" >&2 && "$PY" -c "$check" 2>/dev/null; then
  command -v "$PY"; exit 0
fi
VENV=target/moto-venv
if [ ! -x "$VENV/bin/python" ]; then
  "$PY" -m venv "$VENV" >&2 || {
    sudo_cmd=""; [ "$(id -u)" -ne 0 ] && sudo_cmd="sudo"
    $sudo_cmd apt-get update -qq >&2 && DEBIAN_FRONTEND=noninteractive $sudo_cmd apt-get install -y -qq python3-venv >&2
    "$PY" -m venv "$VENV" >&2
  }
fi
"$VENV/bin/python" -c "$check" 2>/dev/null || "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check "${PKGS[@]}" >&2
"$VENV/bin/python" -c "$check"
echo "$(pwd)/$VENV/bin/python"
