"""launch.explain end to end: real slides and MRI -> extraction -> training -> PNGs in the report."""

import csv

import openslide
import pandas as pd
import pytest

from feature_store import extract, slides
from feature_store.synthetic_cohort import make_cohort
from launch import explain
from moemil_jax import train
from moemil_jax.configs import test as test_config

pytestmark = pytest.mark.slow  # trains a model, then ResNet50 heatmaps and Grad-CAM

# Tiny on purpose: ResNet50 runs a few patches/s on this CPU (see tests/test_extract.py).
CFG = extract.ExtractConfig(
  encoder_weights='random',
  target_mpp=4.0,
  patch_px=32,
  batch_size=8,
  workers=2,
  mri_slices=1,
  tissue=slides.TissueParams(min_tissue_area=0.1, min_patch_tissue=0.25),
  radiomics_params={
    'imageType': {'Original': {}},
    'featureClass': {'firstorder': None},
    'setting': {'binWidth': 25, 'label': 1},
  },
)


@pytest.fixture(scope='module')
def trained(tmp_path_factory):
  out = tmp_path_factory.mktemp('cohort')
  manifest = make_cohort(
    out, patients=6, seed=5, slide_px=512, mri_px=32, mri_slices=6, progress=False
  )
  with open(manifest, newline='') as f:
    rows = list(csv.DictReader(f))
  rows = [dict(r, mri_t1='', mri_t2='') for r in rows]  # contrast T1 only: fewer CNN passes
  with open(manifest, 'w', newline='') as f:
    w = csv.DictWriter(f, list(rows[0]))
    w.writeheader()
    w.writerows(rows)
  store_dir = out / 'store'
  extract.extract(manifest, store_dir, CFG)
  c = test_config.get_config()
  c.store = str(store_dir)
  c.train.epochs = 2
  c.split.val_fraction = 0.5  # 6 patients: keep one for validation
  workdir = out / 'runs' / 'moemil'
  train.train_and_evaluate(c, workdir)
  pid = next(r['patient_id'] for r in rows if r['slides'] and r['mri_mask'])
  return manifest, workdir, pid


def test_explain_writes_heatmaps_gradcam_and_report_section(trained, monkeypatch):
  manifest, workdir, pid = trained
  monkeypatch.setattr(
    openslide.OpenSlide,
    'associated_images',
    property(lambda self: pytest.fail('associated images must never be read')),
  )
  report_html = workdir.parent / 'report.html'
  report_html.write_text('<!DOCTYPE html><html><body><h1>Report</h1>\n</body></html>')

  paths = explain.explain(workdir, [pid], manifest=manifest, task='survival', top_k=2, blur=0.5)
  names = sorted(p.name for p in paths)
  assert f'{pid}_gradcam_survival.png' in names
  heat = [n for n in names if n.endswith('_attention.png')]
  assert heat and all(n.startswith(f'{pid}_{pid}_s') for n in heat)
  for p in paths:
    assert p.parent == workdir / 'explain' and p.stat().st_size > 0
  tiles = sorted((workdir / 'explain' / 'tiles').rglob('*_top2.csv'))
  assert len(tiles) == len(heat)
  top = pd.read_csv(tiles[0])
  assert list(top['rank']) == [1, 2] and (top.raw_score.diff().dropna() <= 0).all()
  for row in top.itertuples():
    assert row.file == f'{row.slide_id}_top{row.rank:02d}_x{row.x}_y{row.y}.png'
  written = [p.name.lower() for p in (workdir / 'explain').rglob('*')]
  assert not any(w in n for n in written for w in ('label', 'macro', 'thumbnail'))

  html = report_html.read_text()
  assert html.count('<h2>Interpretation</h2>') == 1
  assert html.count('data:image/png;base64') == len(paths)
  explain.explain(
    workdir, [pid], manifest=manifest, task='survival', top_k=2, heatmaps=False, gradcam=False
  )
  assert report_html.read_text().count('<h2>Interpretation</h2>') == 1  # replaced, not repeated


def test_gradcam_output_is_the_trained_models_prediction(trained):
  """Embeddings recomputed from the MRI reproduce the stored ones, so the task output the
  Grad-CAM explains is the prediction the trained model made for this patient."""
  from feature_store import encoders
  from feature_store import manifest as manifest_lib
  from moemil_jax import gradcam, heatmaps

  manifest, workdir, pid = trained
  run = heatmaps.load_run(workdir)
  patient = next(p for p in manifest_lib.read_manifest(manifest).patients if p.patient_id == pid)
  res = gradcam.explain_mri(
    run,
    encoders.Encoder('mri', 'random'),
    pid,
    dict(patient.mri),
    patient.mri_mask,
    'response',
    workdir / 'cam.png',
    slices=CFG.mri_slices,
  )
  pred = pd.read_parquet(workdir / train.PREDICTIONS).set_index('patient_id')
  assert res['output'] == pytest.approx(pred.loc[pid, 'response_logit'], rel=1e-3, abs=1e-4)
  assert res['slices'] == CFG.mri_slices


def test_predict_from_a_manifest_without_labels(trained, tmp_path):
  """New patients' raw images, no outcomes: extracted with the model's own settings and
  scored exactly as the same patients were scored from the training store."""
  import subprocess
  import sys
  from pathlib import Path

  manifest, workdir, _ = trained
  with open(manifest, newline='') as f:
    rows = list(csv.DictReader(f))[:2]
  root = Path(manifest).parent

  def absolute(paths: str) -> str:  # the new manifest lives elsewhere
    return ';'.join(str((root / p).resolve()) for p in paths.split(';') if p)

  files = ('slides', 'mri_t1', 'mri_t2', 'mri_t1c', 'mri_mask')
  new_rows = [
    dict(r, ic_response='', os_months='', os_event='', **{k: absolute(r[k]) for k in files})
    for r in rows
  ]
  new_manifest = tmp_path / 'new_patients.csv'
  with open(new_manifest, 'w', newline='') as f:
    w = csv.DictWriter(f, list(new_rows[0]))
    w.writeheader()
    w.writerows(new_rows)
  out = tmp_path / 'pred.csv'
  done = subprocess.run(
    [
      sys.executable,
      '-m',
      'launch.predict',
      f'--model={workdir}',
      f'--manifest={new_manifest}',
      f'--store={tmp_path / "new_store"}',
      f'--out={out}',
    ],
    cwd=Path(__file__).resolve().parents[1],
    capture_output=True,
    text=True,
  )
  assert done.returncode == 0, done.stderr[-3000:]
  got = pd.read_csv(out).set_index('patient_id')
  trained_on = pd.read_parquet(workdir / 'predictions.parquet').set_index('patient_id')
  assert sorted(got.index) == sorted(r['patient_id'] for r in rows)
  # Re-extraction runs ResNet50 again: float32 sums in another thread order can move a
  # stored float16 feature by one ulp (2^-11 relative), which moves outputs by about 1e-5.
  for col in ('response_prob', 'log_risk'):
    assert (got[col] - trained_on.loc[got.index, col]).abs().max() < 1e-4, col
