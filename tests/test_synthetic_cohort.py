import hashlib
import subprocess
import sys
from pathlib import Path

import numpy as np
import openslide
import pandas as pd
import pytest
import SimpleITK as sitk
from lifelines.utils import concordance_index
from sklearn.metrics import roc_auc_score

from feature_store import store, synthetic, synthetic_cohort


def _manifest(path: Path) -> pd.DataFrame:
  return pd.read_csv(path, dtype={'patient_id': str, 'slides': str}, keep_default_na=False)


def test_openslide_opens_every_slide_with_mpp_and_levels(tiny_cohort):
  frame = _manifest(tiny_cohort)
  slides = [s for cell in frame.slides for s in cell.split(';') if s]
  assert slides
  for rel in slides:
    slide = openslide.OpenSlide(tiny_cohort.parent / rel)
    assert slide.properties['openslide.vendor'] == 'generic-tiff'
    assert abs(float(slide.properties[openslide.PROPERTY_NAME_MPP_X]) - 0.5) < 0.01
    assert slide.level_count >= 3
    assert slide.level_dimensions[0] == (768, 768)
    assert not slide.associated_images  # nothing that could carry a label
    region = np.asarray(slide.read_region((0, 0), 1, (64, 64)))
    assert region.shape == (64, 64, 4)


def test_simpleitk_reads_every_mri_and_masks_are_inside(tiny_cohort):
  frame = _manifest(tiny_cohort)
  with_mri = frame[frame.mri_mask != '']
  assert len(with_mri)
  for row in with_mri.itertuples():
    mask = sitk.ReadImage(str(tiny_cohort.parent / row.mri_mask))
    m = sitk.GetArrayFromImage(mask)
    assert m.sum() > 0
    # Inside the volume: the tumour does not touch the in-plane border.
    assert (
      not m[:, 0, :].any()
      and not m[:, -1, :].any()
      and not m[:, :, 0].any()
      and not m[:, :, -1].any()
    )
    for seq in ('mri_t1', 'mri_t2', 'mri_t1c'):
      image = sitk.ReadImage(str(tiny_cohort.parent / getattr(row, seq)))
      assert np.allclose(image.GetSpacing(), (0.5, 0.5, 3.0))
      assert image.GetSize() == mask.GetSize()


def test_manifest_matches_files(tiny_cohort):
  frame = _manifest(tiny_cohort)
  assert list(frame.columns[:11]) == list(store.CLINICAL_COLUMNS)
  referenced = {s for cell in frame.slides for s in cell.split(';') if s}
  for col in ('mri_t1', 'mri_t2', 'mri_t1c', 'mri_mask'):
    referenced |= {p for p in frame[col] if p}
  on_disk = {
    p.relative_to(tiny_cohort.parent).as_posix()
    for d in ('slides', 'mri')
    for p in (tiny_cohort.parent / d).iterdir()
  }
  assert referenced == on_disk
  assert frame.patient_id.is_unique
  assert set(frame.center) <= {'A', 'B'}
  assert (frame.os_months > 0).all() and set(frame.os_event) <= {0, 1}
  assert set(frame.ic_response.astype(str)) <= {'0', '1', ''}


def test_same_seed_gives_identical_files(tmp_path):
  def digest(root: Path) -> dict[str, str]:
    return {
      p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
      for p in sorted(root.rglob('*'))
      if p.is_file()
    }

  kwargs = dict(patients=4, seed=11, slide_px=512, mri_px=48, mri_slices=6, progress=False)
  synthetic_cohort.make_cohort(tmp_path / 'a', **kwargs)
  synthetic_cohort.make_cohort(tmp_path / 'b', **kwargs)
  synthetic_cohort.make_cohort(tmp_path / 'c', **{**kwargs, 'seed': 12})
  assert digest(tmp_path / 'a') == digest(tmp_path / 'b')
  assert digest(tmp_path / 'a') != digest(tmp_path / 'c')


def test_oracle_auc_and_cindex_at_default_strengths():
  frame = synthetic.sample_patients(400, seed=0)
  labelled = frame.dropna(subset=['ic_response'])
  auc = roc_auc_score(labelled.ic_response, labelled.response_prob)
  assert 0.85 <= auc <= 0.95, auc
  cindex = concordance_index(frame.os_months, -frame.log_hazard, frame.os_event)
  assert 0.65 <= cindex <= 0.9, cindex
  assert abs((1 - frame.os_event.mean()) - synthetic.Knobs().censoring_rate) < 0.08
  assert set(frame.overall_stage) <= {'III', 'IVA'}  # locally advanced only


def test_knobs_control_missingness_and_signal():
  frame = synthetic.sample_patients(
    600,
    seed=1,
    knobs=synthetic.Knobs(
      missing_wsi_rate=0.3, missing_response_rate=0.5, wsi_signal=0.0, mri_signal=1.0
    ),
  )
  assert 0.22 < (~frame.has_wsi).mean() < 0.38
  assert 0.42 < frame.ic_response.isna().mean() < 0.58
  assert abs(np.corrcoef(frame.wsi_view, frame.latent)[0, 1]) < 0.15
  assert np.allclose(frame.mri_view, frame.latent)


def test_slide_texture_follows_the_latent():
  """More aggressive tumours (higher view) show more hematoxylin (dark nuclear) area."""
  dark = []
  for view in (-1.5, 0.0, 1.5):
    rgb = synthetic_cohort.render_slide(np.random.default_rng(0), view, 'A', 512)
    dark.append(np.mean(rgb.mean(-1) < 130))
  assert dark[0] < dark[1] < dark[2]


def test_nuclear_hue_knob_moves_the_nuclei_colour_and_only_it():
  """With nuclear_hue = 0 the nuclei of a low and a high view have one colour (the signal is
  density and size); with the default they differ in blue. Same draws either way."""

  def nuclei_blue(view, hue):
    rgb = synthetic_cohort.render_slide(np.random.default_rng(0), view, 'A', 512, hue)
    return rgb[rgb.mean(-1) < 110][:, 2].astype(float).mean()

  assert abs(nuclei_blue(1.5, 0.0) - nuclei_blue(-1.5, 0.0)) < 2.0
  assert nuclei_blue(1.5, 15.0) - nuclei_blue(-1.5, 15.0) > 10.0
  default = synthetic_cohort.render_slide(np.random.default_rng(0), 0.7, 'A', 256)
  explicit = synthetic_cohort.render_slide(np.random.default_rng(0), 0.7, 'A', 256, 15.0)
  np.testing.assert_array_equal(default, explicit)


def test_tumour_volume_follows_the_latent():
  shape = synthetic_cohort.CohortShape(mri_px=64, mri_slices=10)
  volumes = [
    synthetic_cohort.render_mri(np.random.default_rng(0), v, 'A', shape)[1].sum()
    for v in (-1.5, 1.5)
  ]
  assert volumes[0] < volumes[1]


def test_center_b_patients_gives_exactly_that_many_and_keeps_the_rest():
  """The exact count moves only the center column: same patients, labels and views."""
  by_rate = synthetic.sample_patients(60, seed=3)
  exact = synthetic.sample_patients(60, seed=3, knobs=synthetic.Knobs(center_b_patients=35))
  assert (exact.center == 'B').sum() == 35 and (exact.center == 'A').sum() == 25
  assert (by_rate.center == 'B').sum() < 35  # the rate alone (0.3) would not have given it
  # The patients the rate put in B are still in B: the k lowest draws include them.
  assert (exact.center[by_rate.center == 'B'] == 'B').all()
  pd.testing.assert_frame_equal(by_rate.drop(columns='center'), exact.drop(columns='center'))
  for bad in (-1, 60):
    with pytest.raises(ValueError, match='center_b_patients'):
      synthetic.sample_patients(60, seed=3, knobs=synthetic.Knobs(center_b_patients=bad))


def test_synth_cli_writes_the_exact_center_b_count(tmp_path):
  """`launch.synth --center_b_patients` (what the demo uses): that many center-B rows in the
  manifest; a count that leaves center A empty is one line with exit status 2."""

  def synth(*args):
    return subprocess.run(
      [sys.executable, '-m', 'launch.synth', f'--out={tmp_path}', '--patients=6', *args],
      cwd=Path(__file__).resolve().parents[1],
      capture_output=True,
      encoding='utf-8',
      timeout=120,
    )

  done = synth('--center_b_patients=4', '--slide_px=256', '--mri_px=32')
  assert done.returncode == 0, done.stderr[-2000:]
  assert sorted(_manifest(tmp_path / 'manifest.csv').center) == ['A', 'A', 'B', 'B', 'B', 'B']
  refused = synth('--center_b_patients=6')
  assert refused.returncode == 2 and '--center_b_patients=6' in refused.stderr.splitlines()[-1]
