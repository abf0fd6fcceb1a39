"""Store reading, splits, train-only preprocessing and the device arrays."""

import dataclasses

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest

from feature_store import store as store_lib
from feature_store import synthetic_store
from moemil_jax import batching, device_data, preprocess, splits, store_reader
from moemil_jax.configs import test as test_config


@pytest.fixture(scope='module')
def store(tmp_path_factory):
  return synthetic_store.make_store(
    tmp_path_factory.mktemp('store'), patients=40, seed=1, median_patches=50, max_patches=300
  )


@pytest.fixture(scope='module')
def cohort(store):
  c = store_reader.load_store(store)
  c.split = splits.assign_splits(c, val_fraction=0.25, seed=0)
  return c


def test_load_store_one_bag_per_patient(store, cohort):
  clinical = pd.read_parquet(store / 'clinical.parquet')
  assert list(cohort.patient_id) == list(clinical.patient_id)
  per_patient = {}
  for path in store_lib.slide_files(store):
    bag = store_lib.read_slide(path)
    per_patient.setdefault(bag.patient_id, []).append(bag.embeddings)
  assert any(len(v) > 1 for v in per_patient.values())  # multi-slide patients exist
  for i, pid in enumerate(cohort.patient_id):
    want = np.concatenate(per_patient[pid]) if pid in per_patient else np.zeros((0, 1024))
    got = cohort.patches[cohort.patch_offset[i] : cohort.patch_offset[i] + cohort.patch_count[i]]
    np.testing.assert_array_equal(got, want)
  assert (cohort.patch_count[~clinical.has_wsi.to_numpy()] == 0).all()
  assert (cohort.mri_deep_count[~clinical.has_mri.to_numpy()] == 0).all()
  assert (cohort.has_radiomics == clinical.has_mri.to_numpy()).all()
  assert cohort.mri_deep.shape[2] == 2048


def test_splits_external_center_and_stratified(cohort):
  assert ((cohort.split == 'test') == (cohort.center == 'B')).all()
  a = cohort.center == 'A'
  for label in (0.0, 1.0):
    members = a & (cohort.response == label)
    n_val = (members & (cohort.split == 'val')).sum()
    assert n_val == round(0.25 * members.sum())
  again = splits.assign_splits(cohort, val_fraction=0.25, seed=0)
  np.testing.assert_array_equal(again, cohort.split)
  folds = [splits.assign_splits(cohort, folds=3, fold=f) for f in range(3)]
  val_sets = [set(np.flatnonzero(f == 'val')) for f in folds]
  assert set().union(*val_sets) == set(np.flatnonzero(a))
  assert sum(len(v) for v in val_sets) == a.sum()


def test_radiomics_preprocessing_fitted_on_train_only():
  rng = np.random.default_rng(0)
  n = 60
  y = (rng.random(n) < 0.5).astype(float)
  wide = pd.DataFrame(
    {
      't1:signal': y * 2 + rng.normal(size=n),
      't1:copy': None,
      't1:const': 3.0,
      't1:gaps': rng.normal(size=n),
      't2:noise': rng.normal(size=n),
    }
  )
  wide['t1:copy'] = wide['t1:signal'] * 5 + 1  # |r| = 1 with signal
  wide.loc[3, 't1:gaps'] = np.nan
  train = np.arange(n) < 40
  sel = preprocess.fit_radiomics(wide, train, y, corr_threshold=0.9, lasso=False)
  # t1:gaps lacks one training value: kept (imputed, with a t1 missingness indicator).
  assert sel.columns == ['t1:signal', 't1:gaps', 't2:noise'] and sel.sequences == ['t1']
  np.testing.assert_allclose(sel.mean, wide.loc[train, sel.columns].mean())
  moved = wide.copy()
  moved.loc[~train, 't1:signal'] += 100  # validation values must not move the statistics
  assert np.allclose(preprocess.fit_radiomics(moved, train, y, lasso=False).mean, sel.mean)
  lasso = preprocess.fit_radiomics(wide, train, y, corr_threshold=0.9, lasso=True, lasso_cs=5)
  assert 't1:signal' in lasso.columns
  z = sel.transform(wide)
  assert z.shape == (n, 4) and np.isfinite(z).all()
  assert z[3, 1] == 0.0 and not z[:, 3].any()  # a gap is imputed; t1 itself is never missing
  no_t2 = wide.copy()
  no_t2.loc[[5, 45], 't2:noise'] = np.nan  # two patients (one training) lack the t2 sequence
  sel = preprocess.fit_radiomics(no_t2, train, y, corr_threshold=0.9, lasso=False)
  z = sel.transform(no_t2)
  assert 't2:noise' in sel.columns and sel.sequences == ['t1', 't2']
  np.testing.assert_array_equal(np.flatnonzero(z[:, -1]), [5, 45])
  assert z[5, sel.columns.index('t2:noise')] == 0.0


def test_prepare_normalises_with_train_statistics(cohort):
  dev = device_data.prepare(cohort, test_config.get_config().data)
  train = cohort.split == 'train'
  rows = np.concatenate(
    [np.arange(o, o + c) for o, c in zip(cohort.patch_offset[train], cohort.patch_count[train])]
  )
  mean = cohort.patches[rows].astype(np.float64).mean(0)
  std = cohort.patches[rows].astype(np.float64).std(0)
  np.testing.assert_allclose(np.asarray(dev.patch_mean), mean, rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(1 / np.asarray(dev.patch_inv_std), std, rtol=1e-4, atol=1e-5)
  padded = np.asarray(dev.patches)[len(cohort.patches) :]
  assert len(padded) >= 1 and not padded.any()  # zero rows after the bags
  deep = np.asarray(dev.mri_deep)
  has = (cohort.mri_deep_count > 0) & train
  vals = np.concatenate([deep[i, : cohort.mri_deep_count[i]] for i in np.flatnonzero(has)])
  np.testing.assert_allclose(vals.mean(0), 0.0, atol=1e-4)
  assert not np.asarray(dev.has_radiomics)[cohort.mri_deep_count == 0].any()


def test_bag_groups_layout_and_device_array(cohort):
  """Four groups: patients dealt evenly, each bag in its group's block."""
  groups = 4
  layout = batching.bag_layout(cohort.patch_count, groups)
  sizes = np.bincount(layout.group, minlength=groups)
  assert sizes.max() - sizes.min() <= 1
  totals = np.bincount(layout.group, weights=cohort.patch_count, minlength=groups)
  assert totals.max() + 1 <= layout.rows < totals.max() + 1 + 256 and layout.rows % 256 == 0
  assert totals.max() <= 1.5 * totals.mean()  # snake dealing keeps patch totals close
  dev = np.asarray(
    device_data.prepare(cohort, test_config.get_config().data, layout=layout).patches
  )
  assert dev.shape == (groups * layout.rows, cohort.patches.shape[1])
  for p in range(cohort.num_patients):  # every bag where the layout says, pad rows zero
    o, c = cohort.patch_offset[p], cohort.patch_count[p]
    np.testing.assert_array_equal(
      dev[layout.offset[p] : layout.offset[p] + c], cohort.patches[o : o + c]
    )
  for g in range(groups):
    assert not dev[layout.pad_row(g)].any()


def test_load_store_reads_only_the_bags_asked_for(store, cohort):
  want = np.arange(cohort.num_patients) % 3 == 0
  part = store_reader.load_store(store, bags_to_read=lambda counts: want)
  assert part.bags_partitioned and not cohort.bags_partitioned
  np.testing.assert_array_equal(part.patch_count, cohort.patch_count)
  assert len(part.patches) == cohort.patch_count[want].sum()
  assert (part.patch_offset[~want] == -1).all()
  for p in np.flatnonzero(want):
    o, c = part.patch_offset[p], part.patch_count[p]
    np.testing.assert_array_equal(
      part.patches[o : o + c], cohort.patches[cohort.patch_offset[p] : cohort.patch_offset[p] + c]
    )
  layout = batching.bag_layout(part.patch_count, 3)
  with pytest.raises(ValueError, match='bag not read'):
    device_data.prepare(
      dataclasses.replace(part, split=cohort.split),
      test_config.get_config().data,
      layout=layout,
    )


def test_bad_clinical_names_the_file(store, tmp_path):
  import shutil

  bad = tmp_path / 'store'
  shutil.copytree(store, bad)
  table = pq.read_table(bad / 'clinical.parquet').to_pandas()
  table.loc[2, 'center'] = '../C'  # any safe name is a center; a path is not
  table.to_parquet(bad / 'clinical.parquet')
  with pytest.raises(store_lib.StoreError, match='clinical.parquet: row 2'):
    store_reader.load_store(bad)


def test_harmonise_centers_standardises_within_each_center(store):
  cohort = preprocess.harmonise_centers(store_reader.load_store(store))
  raw = store_reader.load_store(store)
  assert set(cohort.center) == {'A', 'B'}
  for center in ('A', 'B'):
    rows = cohort.center == center
    patch_rows = np.concatenate(
      [np.arange(o, o + c) for o, c in zip(cohort.patch_offset[rows], cohort.patch_count[rows])]
    )
    p = cohort.patches[patch_rows].astype(np.float64)
    live = raw.patches[patch_rows].astype(np.float64).std(0) > 1e-3  # non-constant features
    np.testing.assert_allclose(p.mean(0), 0.0, atol=2e-3)
    np.testing.assert_allclose(p.std(0)[live], 1.0, atol=2e-3)
    rad = cohort.radiomics.loc[rows].dropna(how='all')
    np.testing.assert_allclose(rad.mean(), 0.0, atol=1e-9)
    deep = np.concatenate(
      [cohort.mri_deep[i, : cohort.mri_deep_count[i]] for i in np.flatnonzero(rows)]
    )
    np.testing.assert_allclose(deep.mean(0), 0.0, atol=1e-4)
  # Padded MRI slots stay zero.
  assert not cohort.mri_deep[
    np.arange(cohort.mri_deep.shape[1])[None] >= cohort.mri_deep_count[:, None]
  ].any()


def test_univariate_selection_is_survival_aware_stable_and_train_only():
  rng = np.random.default_rng(1)
  n = 200
  latent = rng.normal(size=n)
  y = (rng.random(n) < 1 / (1 + np.exp(-2 * latent))).astype(float)
  e = (rng.random(n) < 0.7).astype(float)
  other = rng.normal(size=n)  # drives OS only
  t_os = rng.exponential(np.exp(-1.5 * other))
  cols = {f't1:noise{i}': rng.normal(size=n) for i in range(40)}
  cols['t1:response'] = latent + 0.5 * rng.normal(size=n)
  cols['t2:survival'] = other + 0.5 * rng.normal(size=n)
  wide = pd.DataFrame(cols)
  train = np.arange(n) < 150
  kw = dict(corr_threshold=0, lasso=False, top_k=2, transform='quantile')
  sel = preprocess.fit_radiomics(wide, train, y, os_months=t_os, os_event=e, **kw)
  assert sorted(sel.columns) == ['t1:response', 't2:survival']  # the OS-only column too
  # Without the survival outcome, only response counts.
  assert 't1:response' in preprocess.fit_radiomics(wide, train, y, **kw).columns
  # Outcomes of non-training patients do not move the selection.
  y2, t2 = y.copy(), t_os.copy()
  y2[~train], t2[~train] = 1 - y2[~train], t2[~train][::-1]
  again = preprocess.fit_radiomics(wide, train, y2, os_months=t2, os_event=e, **kw)
  assert again.columns == sel.columns
  np.testing.assert_allclose(again.mean, sel.mean)


def test_no_harmonisation_uses_no_statistic_of_the_test_center(store):
  """Everything fitted comes from training patients: center B's features cannot move it."""
  config = test_config.get_config().data
  config.harmonise = 'none'

  def fitted(cohort):
    assert preprocess.harmonise(cohort, config) == 'none'
    cohort.split = splits.assign_splits(cohort, seed=0)
    return device_data.prepare(cohort, config).fitted

  base = fitted(store_reader.load_store(store))
  shifted = store_reader.load_store(store)
  b = shifted.center == 'B'
  for p in np.flatnonzero(b):
    o, c = shifted.patch_offset[p], shifted.patch_count[p]
    shifted.patches[o : o + c] = (shifted.patches[o : o + c] * 3 + 5).astype(np.float16)
  shifted.mri_deep[b] = shifted.mri_deep[b] * 2 - 1
  shifted.radiomics.loc[b] = shifted.radiomics.loc[b] * 10 + 3
  moved = fitted(shifted)
  for name, value in base.arrays().items():
    np.testing.assert_array_equal(moved.arrays()[name], value, err_msg=name)
  assert moved.radiomics.columns == base.radiomics.columns


def test_per_center_harmonisation_needs_enough_patients_per_center(store):
  cohort = store_reader.load_store(store)
  config = test_config.get_config().data
  config.harmonise = 'per_center'
  config.min_center_patients = int((cohort.center == 'B').sum()) + 1
  with pytest.raises(ValueError, match="center 'B' has .* fewer than data.min_center_patients"):
    preprocess.harmonise(cohort, config)
  config.min_center_patients = 5
  assert preprocess.harmonise(cohort, config) == 'per_center'
  train_b = cohort.patches[cohort.patch_offset[cohort.center == 'B'][0]]
  assert np.isfinite(train_b.astype(np.float32)).all()


@pytest.mark.parametrize('selection', ['lasso', 'top_k'])
def test_radiomics_selection_sees_training_patients_only(selection):
  """Outcomes and values of non-training patients cannot change what is selected."""
  rng = np.random.default_rng(3)
  n, f = 160, 30
  y = (rng.random(n) < 0.5).astype(float)
  x = rng.normal(size=(n, f))
  x[:, :3] += 1.5 * y[:, None]  # three informative columns
  wide = pd.DataFrame(x, columns=[f't1:f{j:02d}' for j in range(f)])
  train = np.arange(n) < 100
  t = rng.exponential(30, n)
  e = (rng.random(n) < 0.6).astype(int)
  kw = dict(corr_threshold=0.0, lasso=selection == 'lasso', top_k=5 if selection == 'top_k' else 0)

  def fit(wide, y, t):
    return preprocess.fit_radiomics(wide, train, y, os_months=t, os_event=e, seed=0, **kw)

  base = fit(wide, y, t)
  assert {'t1:f00', 't1:f01', 't1:f02'} <= set(base.columns)  # it does find the signal
  other = wide.copy()
  other.loc[~train] = rng.normal(size=(n - 100, f)) * 50  # wild values outside training
  flipped = y.copy()
  flipped[~train] = 1 - flipped[~train]
  shuffled_t = t.copy()
  shuffled_t[~train] = rng.permutation(t[~train])
  moved = fit(other, flipped, shuffled_t)
  assert moved.columns == base.columns
  # Equal up to the summation order of the copied frame (1e-16), not merely close.
  np.testing.assert_allclose(moved.mean, base.mean, rtol=1e-12, atol=1e-14)
  np.testing.assert_allclose(moved.std, base.std, rtol=1e-12, atol=1e-14)


def test_cox_selection_brings_survival_features_and_sees_training_patients_only():
  """With `lasso`, an L1 Cox model on OS adds the columns that carry survival only."""
  rng = np.random.default_rng(4)
  n, f = 220, 30
  y = (rng.random(n) < 0.5).astype(float)
  x = rng.normal(size=(n, f))
  x[:, 0] += 1.5 * y  # response only
  t = rng.exponential(30 * np.exp(-0.9 * x[:, 1]))  # OS only
  e = (rng.random(n) < 0.7).astype(float)
  wide = pd.DataFrame(x, columns=[f't1:f{j:02d}' for j in range(f)])
  train = np.arange(n) < 160
  kw = dict(corr_threshold=0.0, lasso=True, lasso_cs=5, seed=0)
  without_os = preprocess.fit_radiomics(wide, train, y, **kw)
  with_os = preprocess.fit_radiomics(wide, train, y, os_months=t, os_event=e, **kw)
  assert set(without_os.columns) <= set(with_os.columns)  # response keeps its LASSO
  assert {'t1:f00', 't1:f01'} <= set(with_os.columns)
  # The Cox model alone finds the OS column and leaves most noise columns out.
  cox = preprocess._coxnet_select(x[train], np.arange(f), t[train], e[train], seed=0)
  assert 1 in cox and len(cox) <= f // 2, cox
  # Nothing of the held-out patients (values, OS, events) moves the Cox selection.
  held = ~train
  other, t2, e2 = wide.copy(), t.copy(), e.copy()
  other.loc[held] = rng.normal(size=(held.sum(), f)) * 50
  t2[held], e2[held] = rng.permutation(t[held]), 1 - e[held]
  moved = preprocess.fit_radiomics(other, train, y, os_months=t2, os_event=e2, **kw)
  assert moved.columns == with_os.columns
