#!/usr/bin/env bash
# The whole job on an embedded default: synthetic cohort -> feature store -> MoEMIL and the
# baselines -> clinical evaluation and report. About 5 minutes on a 2-core CPU after install.
# Re-running reuses what is complete (cohort, store files with the same fingerprint).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
"$ROOT/launch/setup_env.sh"
cd "$ROOT"
PY="$ROOT/.venv/bin/python"
OUT="${MOEMIL_DEMO_DIR:-$ROOT/demo_out}"
PATIENTS="${MOEMIL_DEMO_PATIENTS:-80}"
step() { echo; echo "=== [$1] $2"; }

step 1/4 "synthetic cohort: $PATIENTS patients (slides, MRI, manifest) in $OUT/cohort"
if [[ ! -f "$OUT/cohort/manifest.csv" ]]; then
  "$PY" -m launch.synth --out="$OUT/cohort" --patients="$PATIENTS" --seed=0 --slide_px=1024 --mri_px=80
else
  echo "reusing $OUT/cohort/manifest.csv"
fi

step 2/4 "feature extraction into $OUT/store (ResNet50 on slide patches and MRI slices, PyRadiomics)"
"$PY" -m launch.extract --manifest="$OUT/cohort/manifest.csv" --store="$OUT/store" \
  --encoder_weights=auto --radiomics_params=feature_store/params/mr_demo.yaml --mri_slices=2

step 3/4 "training MoEMIL and the DLR (MRI only) and pathomics (WSI only) comparators"
for model in moemil dlr pathomics; do
  echo "--- $model"
  "$PY" -m launch.train --config="moemil_jax/configs/$model.py" --store="$OUT/store" \
    --workdir="$OUT/runs/$model"
done

step 4/4 "clinical evaluation (with the TNM comparator) and report"
"$PY" -m launch.evaluate --workdir="$OUT/runs" --truth="$OUT/cohort/truth.csv"
echo
echo "Report: $OUT/runs/report.html"
