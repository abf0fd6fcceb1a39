#!/usr/bin/env bash
# The whole job on an embedded default: synthetic cohort -> feature store -> MoEMIL and the
# baselines -> clinical evaluation and report. About 5 minutes on a 2-core CPU after install.
# Re-running reuses the cohort and the store files (same fingerprint) and retrains.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
"$ROOT/launch/setup_env.sh"
cd "$ROOT"
PY="$ROOT/.venv/bin/python"
OUT="${MOEMIL_DEMO_DIR:-$ROOT/demo_out}"
PATIENTS="${MOEMIL_DEMO_PATIENTS:-80}"
step() { echo; echo "=== [$1] $2"; }

step 1/5 "synthetic cohort: $PATIENTS patients (slides, MRI, manifest) in $OUT/cohort"
if [[ ! -f "$OUT/cohort/manifest.csv" ]]; then
  "$PY" -m launch.synth --out="$OUT/cohort" --patients="$PATIENTS" --seed=0 --slide_px=1024 --mri_px=80
else
  echo "reusing $OUT/cohort/manifest.csv"
fi

step 2/5 "feature extraction into $OUT/store (ResNet50 on slide patches and MRI slices, PyRadiomics)"
"$PY" -m launch.extract --manifest="$OUT/cohort/manifest.csv" --store="$OUT/store" \
  --encoder_weights=auto --radiomics_params=feature_store/params/mr_demo.yaml --mri_slices=2

step 3/5 "training MoEMIL and the DLR (MRI only) and pathomics (WSI only) comparators"
rm -rf "$OUT/runs"  # training is quick; the cohort and the store above are what is reused
for model in moemil dlr pathomics; do
  echo "--- $model"
  "$PY" -m launch.train --config="moemil_jax/configs/$model.py" --store="$OUT/store" \
    --workdir="$OUT/runs/$model"
done

step 4/5 "clinical evaluation (with the TNM comparator) and report"
"$PY" -m launch.evaluate --workdir="$OUT/runs" --truth="$OUT/cohort/truth.csv"
step 5/5 "where MoEMIL looks: slide attention heatmaps and MRI Grad-CAM for two external-test patients"
# The test patients with the highest and the lowest predicted response probability, with both modalities.
PICK="$("$PY" - "$OUT" <<'PYEOF'
import sys, pandas as pd
out = sys.argv[1]
p = pd.read_parquet(f"{out}/runs/moemil/predictions.parquet")
c = pd.read_parquet(f"{out}/store/clinical.parquet").set_index("patient_id")
p = p[(p.split == "test") & p.patient_id.map(c.has_wsi) & p.patient_id.map(c.has_mri)].sort_values("response_prob")
print(",".join(dict.fromkeys([p.patient_id.iloc[-1], p.patient_id.iloc[0]])))
PYEOF
)"
"$PY" -m launch.explain --workdir="$OUT/runs/moemil" --manifest="$OUT/cohort/manifest.csv" --patients="$PICK"

echo
echo "Report: $OUT/runs/report.html"
