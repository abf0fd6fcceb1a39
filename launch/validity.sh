#!/usr/bin/env bash
# Validity at the paper's scale, on two 404-patient synthetic stores (bags of median 200
# patches, so it runs on a CPU): the clean preset (each view sees the latent at correlation
# 0.85) and the realistic preset (what a two-hospital study looks like: BUILD.md, "Stress
# cohorts"). On each: MoEMIL and the DLR and pathomics comparators with their default configs
# (no harmonisation), and MoEMIL again with per-center harmonisation (transductive), each
# evaluated with the simple baselines, the posterior-mean ceiling and the oracle. Prints the
# four tables; the figures are in docs/validity.md. About 22 minutes on 2 idle CPU cores (75 shared
# with other jobs; eight 5-member ensembles); 256 training patches per bag keep it CPU-sized.
#   launch/validity.sh [OUT_DIR]
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
"$ROOT/launch/setup_env.sh"
cd "$ROOT"
PY="$ROOT/.venv/bin/python"
OUT="${1:-$ROOT/runs/validity}"
for preset in clean realistic; do
  DIR="$OUT/$preset"
  [[ -f "$DIR/store/STORE.json" ]] || "$PY" -m launch.synth --kind=store --preset="$preset" \
    --out="$DIR/store" --patients=404 --seed=0 --median_patches=200
  rm -rf "$DIR/runs"
  for model in moemil dlr pathomics; do
    echo "--- $preset: $model"
    "$PY" -m launch.train --config="moemil_jax/configs/$model.py" --store="$DIR/store" \
      --workdir="$DIR/runs/$model" --config.data.max_train_patches=256
  done
  rm -rf "$DIR/runs_per_center"
  echo "--- $preset: moemil, data.harmonise=per_center"
  "$PY" -m launch.train --config=moemil_jax/configs/moemil.py --store="$DIR/store" \
    --workdir="$DIR/runs_per_center/moemil" --config.data.max_train_patches=256 \
    --config.data.harmonise=per_center
done
for preset in clean realistic; do
  for runs in runs runs_per_center; do
    echo; echo "=== $preset preset, $runs"
    "$PY" -m launch.evaluate --workdir="$OUT/$preset/$runs" --truth="$OUT/$preset/store/truth.csv"
  done
done
