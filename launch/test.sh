#!/usr/bin/env bash
# Runs the whole test suite (installs into .venv first if needed). Extra args go to pytest.
# The tests run on pytest-xdist workers, one per core (at most 4), each taking a whole file
# at a time so that a file's trained fixtures are built once; tests/conftest.py starts the
# longest files first. MOEMIL_TEST_WORKERS=0 runs them in this one process (e.g. for pdb).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
"$ROOT/launch/setup_env.sh"
cd "$ROOT"
exec "$ROOT/.venv/bin/python" -m pytest -n "${MOEMIL_TEST_WORKERS:-auto}" --maxprocesses=4 \
  --dist=loadfile --no-loadscope-reorder "$@"
