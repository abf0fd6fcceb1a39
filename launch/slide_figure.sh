#!/usr/bin/env bash
# The docs' heatmap figure of a real H&E slide (docs/slide_heatmap_cmu1.png), drawn through the
# tools a user runs: a small synthetic cohort plus one patient whose slide is the real
# cmu-1-small-region.svs -> launch.extract (ResNet50, weights as --encoder_weights=auto finds
# them: random offline) -> a pathomics model with the prototype slide pathway -> launch.explain
# with overlapping re-scoring, blur and the colour bar. With random encoder weights and a toy
# cohort the colours show how the drawing works, not histology that matters.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
"$ROOT/launch/setup_env.sh"
cd "$ROOT"
PY="$ROOT/.venv/bin/python"
SLIDE="${1:-$ROOT/../shared/data/cmu-1-small-region.svs}"
OUT="${MOEMIL_FIGURE_DIR:-$(mktemp -d)}"
[[ -f "$SLIDE" ]] || { echo "slide_figure.sh: no slide at $SLIDE; pass its path" >&2; exit 1; }

"$PY" -m launch.synth --out="$OUT/cohort" --patients=16 --center_b_patients=3 --seed=3 --slide_px=768 --mri_px=32
"$PY" - "$OUT/cohort/manifest.csv" "$(realpath "$SLIDE")" <<'PYEOF'
import sys, pandas as pd
path, slide = sys.argv[1:]
m = pd.read_csv(path, dtype=str, keep_default_na=False)
real = m.iloc[0].copy()
real["patient_id"], real["center"], real["slides"] = "CMU1", "A", slide
m = pd.concat([m, real.to_frame().T], ignore_index=True)
m.to_csv(path, index=False)
PYEOF
"$PY" -m launch.extract --manifest="$OUT/cohort/manifest.csv" --store="$OUT/store" \
  --encoder_weights=auto --radiomics_params=feature_store/params/mr_demo.yaml --mri_slices=1
"$PY" -m launch.train --config=pathomics --store="$OUT/store" --workdir="$OUT/runs/pathomics" \
  --config.train.ensemble=0 --config.data.slide_prototypes=4 --config.train.epochs=10
"$PY" -m launch.explain --workdir="$OUT/runs/pathomics" --manifest="$OUT/cohort/manifest.csv" \
  --patients=CMU1 --overlap --blur=0.5 --top_k=4 --gradcam=false
cp "$(ls "$OUT"/runs/pathomics/explain/CMU1_*_attention.png | head -1)" docs/slide_heatmap_cmu1.png
echo "docs/slide_heatmap_cmu1.png (from $OUT)"
