#!/usr/bin/env bash
# The whole job on an embedded default: synthetic cohort -> feature store -> MoEMIL and the
# baselines -> clinical evaluation and report. Under 10 minutes on a 2-core CPU after install
# (9 min 51 s with the CPU shared at load 10-11); each step prints its time.
# Re-running reuses the cohort and the store files (same fingerprint) and retrains.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
"$ROOT/launch/setup_env.sh"
cd "$ROOT"
PY="$ROOT/.venv/bin/python"
OUT="${MOEMIL_DEMO_DIR:-$ROOT/demo_out}"
PATIENTS="${MOEMIL_DEMO_PATIENTS:-180}"
# Center B, the external test hospital: 100 of the 180 patients, so that the external-test
# confidence intervals are readable (center A, 80 patients, trains the models).
EXTERNAL="${MOEMIL_DEMO_EXTERNAL:-$((PATIENTS * 5 / 9))}"
START=$SECONDS
STEP_START=$SECONDS
STEP=""
took() { [[ -z "$STEP" ]] || printf '    [%s took %dm %02ds]\n' "$STEP" $(((SECONDS - STEP_START) / 60)) $(((SECONDS - STEP_START) % 60)); }
step() { took; STEP="$1"; STEP_START=$SECONDS; echo; echo "=== [$1] $2"; }

step 1/5 "synthetic cohort: $PATIENTS patients, $EXTERNAL of them at center B (the external test set), in $OUT/cohort"
# Small images keep extraction to a few minutes on a CPU: 1024 px slides (about 5 patches of
# 256 px each at 0.5 um/px), 80 x 80 x 12 MRI.
SYNTH_ARGS=(--patients="$PATIENTS" --center_b_patients="$EXTERNAL" --seed=0 --slide_px=1024 --mri_px=80)
if [[ -f "$OUT/cohort/manifest.csv" && "$(cat "$OUT/cohort/.demo_args" 2>/dev/null)" == "${SYNTH_ARGS[*]}" ]]; then
  echo "reusing $OUT/cohort/manifest.csv"
else
  # Another cohort (an earlier demo's, or other MOEMIL_DEMO_* sizes): start over.
  rm -rf "$OUT/cohort" "$OUT/store" "$OUT/runs"
  "$PY" -m launch.synth --out="$OUT/cohort" "${SYNTH_ARGS[@]}"
  echo "${SYNTH_ARGS[*]}" > "$OUT/cohort/.demo_args"
fi

step 2/5 "feature extraction into $OUT/store (ResNet50 on slide patches and MRI slices, PyRadiomics)"
"$PY" -m launch.extract --manifest="$OUT/cohort/manifest.csv" --store="$OUT/store" \
  --encoder_weights=auto --radiomics_params=feature_store/params/mr_demo.yaml --mri_slices=1

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

took
echo
printf 'Demo done in %dm %02ds. Report: %s\n' $(((SECONDS - START) / 60)) $(((SECONDS - START) % 60)) "$OUT/runs/report.html"
