#!/usr/bin/env bash
# Validity at the paper's scale: a 404-patient synthetic store (bags of median 200 patches,
# so it runs on a CPU), MoEMIL and the DLR and pathomics comparators, evaluated with TNM and
# the oracle (the cohort's true response probability and log-hazard). About 15 minutes on
# 2 CPU cores; the figures are in README.md.
#   launch/validity.sh [OUT_DIR]
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
"$ROOT/launch/setup_env.sh"
cd "$ROOT"
PY="$ROOT/.venv/bin/python"
OUT="${1:-$ROOT/runs/validity}"
[[ -f "$OUT/store/STORE.json" ]] || "$PY" -m launch.synth --kind=store --out="$OUT/store" \
  --patients=404 --seed=0 --median_patches=200
rm -rf "$OUT/runs"
for model in moemil dlr pathomics; do
  echo "--- $model"
  "$PY" -m launch.train --config="moemil_jax/configs/$model.py" --store="$OUT/store" \
    --workdir="$OUT/runs/$model" --config.data.harmonise_centers=True \
    --config.data.max_train_patches=256 --config.train.epochs=40
done
"$PY" -m launch.evaluate --workdir="$OUT/runs" --truth="$OUT/store/truth.csv"
