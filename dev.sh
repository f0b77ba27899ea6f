#!/usr/bin/env bash
# One command per job, each doing its own set-up on a fresh machine:
#   ./dev.sh bench [args]   the benchmark report on defaults (the main job)
#   ./dev.sh test  [args]   the test suite
#   ./dev.sh list           the registry
# A virtual environment is made in .venv (override with FASTATTN_VENV) and torch is pinned to the
# CPU build in constraints.txt, so no multi-GB CUDA build is ever pulled in.
set -euo pipefail
cd "$(dirname "$0")"
job=${1:-test}
shift || true
venv=${FASTATTN_VENV:-.venv}
[ -x "$venv/bin/python" ] || python3 -m venv "$venv"
py="$venv/bin/python"
export PIP_CONSTRAINT="$PWD/constraints.txt" PIP_DISABLE_PIP_VERSION_CHECK=1
case "$job" in
  test)  extras="test,bench,hf" ;;  # hf: transformers (pure Python; torch stays pinned)
  *)     extras="bench" ;;
esac
"$py" -m pip install -q torch==2.13.0
"$py" -m pip install -q -e ".[$extras]"
case "$job" in
  test)  exec "$py" -m pytest -q "$@" ;;
  bench) if "$py" -m fastattn bench --help >/dev/null 2>&1; then exec "$py" -m fastattn bench "$@"; else exec "$py" -m fastattn list "$@"; fi ;;
  list)  exec "$py" -m fastattn list "$@" ;;
  *)     echo "usage: ./dev.sh {bench|test|list} [args]" >&2; exit 2 ;;
esac
