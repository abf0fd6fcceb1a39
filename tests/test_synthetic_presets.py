"""The stress presets: each realistic property is present in the generated store, and the
clean preset is the store the project always made."""

import dataclasses

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
from scipy import stats

from feature_store import store, synthetic, synthetic_store
from moemil_jax import metrics


@pytest.fixture(scope='module')
def realistic(tmp_path_factory):
  return synthetic_store.make_store(
    tmp_path_factory.mktemp('realistic'),
    patients=300,
    seed=4,
    preset='realistic',
    median_patches=150,
    min_patches=100,
    max_patches=300,
  )


def _radiomics(path) -> pd.DataFrame:
  return pq.read_table(path / store.RADIOMICS).to_pandas()


def test_clean_preset_is_the_default_store(tmp_path):
  a = synthetic_store.make_store(tmp_path / 'a', patients=12, seed=1, median_patches=20)
  b = synthetic_store.make_store(
    tmp_path / 'b', patients=12, seed=1, median_patches=20, preset='clean'
  )
  for name in (store.CLINICAL, store.RADIOMICS, store.MRI_DEEP):
    assert (a / name).read_bytes() == (b / name).read_bytes()
  for fa, fb in zip(store.slide_files(a), store.slide_files(b)):
    assert fa.read_bytes() == fb.read_bytes()


def test_a_few_patients_miss_one_sequence(realistic):
  per_patient = _radiomics(realistic).groupby('patient_id')['sequence'].nunique()
  partial = (per_patient < len(store.MRI_SEQUENCES)).mean()
  # Preset: 4% of MRI patients lack one sequence (binomial sd about 1.1% at n = 290).
  assert 0.005 < partial < 0.10
  assert (per_patient >= len(store.MRI_SEQUENCES) - 1).all()
  info = store.read_store_json(realistic)
  assert info['counts']['mri_patients_missing_a_sequence'] == int((per_patient < 3).sum())


def test_key_patches_are_rare(realistic):
  keys = pq.read_table(realistic / 'truth_key_patches.parquet').to_pandas()
  keys['patient_id'] = keys.slide_id.str.rsplit('_', n=1).str[0]
  n_key = keys.groupby('patient_id').size()
  sizes = {}
  for path in store.slide_files(realistic):
    pid, rows = store.slide_patient_and_rows(path)
    sizes[pid] = sizes.get(pid, 0) + rows
  share = n_key / pd.Series(sizes).loc[n_key.index]
  assert 0.015 <= share.min() and share.max() <= 0.065  # preset: 2-6% (rounded to patches)
  assert share.std() > 0.005  # varies by patient


def test_radiomics_look_like_radiomics(realistic):
  rad = _radiomics(realistic)
  t1 = rad[rad.sequence == 't1'].drop(columns=['patient_id', 'sequence'])
  assert t1.shape[1] >= 150  # hundreds of features over the sequences
  scale = t1.std()
  assert np.log10(scale.max() / scale.min()) > 4  # very different scales
  skew = stats.skew(t1.to_numpy(), axis=0)
  assert (np.abs(skew) > 2).mean() > 0.1  # a share heavy-tailed
  # Correlated blocks: features of one block correlate, features of different blocks do not.
  ranks = t1.rank().to_numpy()
  corr = np.abs(np.corrcoef(ranks, rowvar=False))
  block = np.array([int(c.split('Block')[1][:2]) for c in t1.columns])
  same = (block[:, None] == block[None]) & ~np.eye(len(block), dtype=bool)
  assert corr[same].mean() > 0.35 and corr[~same & (block[:, None] != block[None])].mean() < 0.15


def test_external_center_shifts_scale_per_feature(realistic):
  rad = _radiomics(realistic)
  clinical = pq.read_table(realistic / store.CLINICAL).to_pandas().set_index('patient_id')
  t1 = rad[rad.sequence == 't1'].set_index('patient_id').drop(columns='sequence')
  # Rank-normal scores, so heavy tails do not dominate; the log sd ratio B/A per feature.
  center = clinical.loc[t1.index, 'center'].to_numpy()
  z = stats.norm.ppf((t1.rank() - 0.5) / len(t1))
  ratio = np.log(z[center == 'B'].std(0) / z[center == 'A'].std(0))
  assert ratio.std() > 0.12  # sampling noise alone: about 0.08 at these sizes


def test_ceiling_lies_between_chance_and_the_oracle(realistic):
  truth = synthetic_store.read_truth(realistic)
  clinical = pq.read_table(realistic / store.CLINICAL).to_pandas().merge(truth, on='patient_id')
  y = clinical.ic_response
  known = y.notna()
  oracle = metrics.roc_auc(y[known], clinical.response_prob[known])
  ceiling = metrics.roc_auc(y[known], clinical.ceiling_response_prob[known])
  assert 0.6 < ceiling < oracle - 0.03


def test_posterior_ceiling_is_the_posterior_mean():
  """Quadrature against Monte Carlo: the factors drawn from their exact Gaussian posterior."""
  knobs, _ = synthetic_store.preset_config('realistic')
  frame = synthetic.sample_patients(6, seed=3, knobs=knobs)
  prob, hazard = synthetic.posterior_ceiling(frame, knobs)
  rng = np.random.default_rng(0)
  for i, row in enumerate(frame.itertuples()):
    draws = []
    for view, rho, present in (
      (row.mri_view, knobs.mri_signal, row.has_mri),
      (row.wsi_view, knobs.wsi_signal, row.has_wsi),
    ):
      mean, var = (rho * view, 1 - rho**2) if present else (0.0, 1.0)
      draws.append(mean + np.sqrt(var) * rng.standard_normal(200_000))
    u, v = draws
    latent = (u + v) / np.sqrt(2)
    logit = (
      knobs.response_intercept
      - knobs.response_strength * (latent + knobs.response_interaction * u * v)
      + knobs.center_b_response_shift * (row.center == 'B')
    )
    mc = np.mean(1 / (1 + np.exp(-logit)))
    assert abs(prob[i] - mc) < 0.005  # Monte Carlo sd about 0.0007
    mc_h = np.mean(
      knobs.hazard_strength * (latent + knobs.hazard_curvature * np.maximum(latent, 0) ** 2)
    )
    assert abs(hazard[i] - mc_h) < 0.01


def test_label_noise_flips_labels():
  knobs, _ = synthetic_store.preset_config('realistic')
  noisy = synthetic.sample_patients(4000, seed=0, knobs=dataclasses.replace(knobs, label_noise=0.3))
  clean = synthetic.sample_patients(4000, seed=0, knobs=dataclasses.replace(knobs, label_noise=0.0))
  known = noisy.ic_response.notna() & clean.ic_response.notna()
  flipped = (noisy.ic_response[known] != clean.ic_response[known]).mean()
  assert abs(flipped - 0.3) < 0.03
