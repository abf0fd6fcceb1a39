#!/usr/bin/env bash
# Creates or reuses .venv in the repository and installs what is missing. Idempotent:
# a stamp holding pyproject.toml's hash skips the pip work when nothing changed.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="$ROOT/.venv"
PYTHON="${PYTHON:-python3}"

if [[ ! -x "$VENV/bin/python" ]]; then
  "$PYTHON" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 10) else "MoEMIL-JAX needs Python 3.10+, found " + sys.version)'
  echo "[setup] creating $VENV"
  "$PYTHON" -m venv "$VENV"
fi
PY="$VENV/bin/python"
STAMP="$VENV/.moemil-installed"
WANT="$(cat "$ROOT/pyproject.toml" | sha256sum | cut -d' ' -f1)"
if [[ -f "$STAMP" && "$(cat "$STAMP")" == "$WANT" ]]; then
  exit 0
fi

# A full install takes about 7.5 GB (PyTorch's wheel brings its CUDA libraries); pip would
# otherwise stop half-way with "[Errno 28] No space left on device".
FREE_KB="$(df -Pk "$VENV" | awk 'NR == 2 {print $4}')"
if [[ ! -f "$STAMP" && "${FREE_KB:-0}" -lt $((8 * 1024 * 1024)) ]]; then
  echo "[setup] only $((FREE_KB / 1024)) MB free on the disk of $VENV; the install needs about 8 GB: free some space (old clones, runs, ~/.cache/pip) and rerun" >&2
  exit 1
fi
echo "[setup] installing dependencies into $VENV (first run takes a few minutes)"
# PyRadiomics on Python 3.11+ ships only as an sdist whose setup.py imports numpy and
# versioneer; pip's isolated build environment has neither, so build it against the venv.
"$PY" -m pip install -q "numpy>=1.26" versioneer wheel "setuptools>=68"
if ! "$PY" -c 'import radiomics' 2>/dev/null; then
  echo "[setup] building pyradiomics from source (--no-build-isolation)"
  "$PY" -m pip install -q --no-build-isolation "pyradiomics==3.0.1"
fi
"$PY" -m pip install -q -e "$ROOT[dev]"
echo "$WANT" > "$STAMP"
echo "[setup] done"
