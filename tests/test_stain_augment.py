"""Stain augmentation (issue 28, item 4; docs/stain.md): HED jitter against scikit-image,
K views per patch in the slide files (deterministic, in the fingerprint), and training
that reads one view per epoch while evaluation reads the original."""

import dataclasses
import shutil

import numpy as np
import pyarrow.parquet as pq
import pytest
import tiny_extraction
import torch
from skimage.color import hed2rgb, hed_from_rgb, rgb2hed, rgb_from_hed, separate_stains

from feature_store import extract, stain, store, synthetic_store
from moemil_jax import store_reader, trainer
from moemil_jax.configs import test as test_config


@pytest.fixture(scope='module')
def tiles(shared_data):
  """Six 96 px crops of the two real H&E tiles (very different stains)."""
  import cv2

  out = []
  for name in ('he_tile_strong.png', 'he_tile_pale.png'):
    image = cv2.imread(str(shared_data / name))[..., ::-1]
    out += [image[y : y + 96, x : x + 96] for y, x in ((0, 0), (150, 200), (300, 400))]
  return np.ascontiguousarray(np.stack(out))


def _skimage_jitter(image, alpha, beta):
  """scikit-image's HED jitter of one uint8 image with beta in optical density units.

  rgb2hed clips negative concentrations at 0; the unclipped ones are rgb2hed(x) minus
  separate_stains(x, -hed_from_rgb) (its clipped negative part), all scikit-image's own code."""
  hed = rgb2hed(image) - separate_stains(image, -hed_from_rgb)
  return np.round(hed2rgb(alpha * hed + beta / stain.SKIMAGE_OD_SCALE) * 255)


def test_hed_jitter_matches_scikit_image(tiles):
  np.testing.assert_allclose(stain.RGB_FROM_HED, rgb_from_hed)
  np.testing.assert_allclose(stain.HED_FROM_RGB, hed_from_rgb, rtol=1e-6)
  x = torch.from_numpy(tiles)
  n = len(tiles)

  # No jitter: the patch comes back, to a grey level.
  same = stain.hed_jitter(x, torch.ones(n, 3), torch.zeros(n, 3)).numpy()
  assert np.abs(same.astype(int) - tiles).max() <= 1

  # A given alpha and beta per patch and channel: scikit-image's computation, patch by patch.
  rng = np.random.default_rng(0)
  alpha, beta = rng.uniform(0.9, 1.1, (n, 3)), rng.uniform(-0.1, 0.1, (n, 3))
  out = stain.hed_jitter(x, torch.tensor(alpha), torch.tensor(beta)).numpy()
  compared = 0
  for i in range(n):
    ref = _skimage_jitter(tiles[i], alpha[i], beta[i])
    assert np.abs(out[i] - ref).max() <= 1, i
    # Where rgb2hed clips nothing, it is rgb2hed / hed2rgb themselves.
    hed = rgb2hed(tiles[i])
    unclipped = (hed > 0).all(-1)
    direct = np.round(hed2rgb(alpha[i] * hed + beta[i] / stain.SKIMAGE_OD_SCALE) * 255)
    compared += int(unclipped.sum())
    assert np.abs(out[i][unclipped] - direct[unclipped]).max() <= 1
  assert compared > 1000  # pixels compared with rgb2hed's own output
  assert np.abs(out.astype(int) - tiles).mean() > 2  # it did change the colours

  # Batched: each patch is jittered with its own parameters only.
  alone = stain.hed_jitter(x[2:3], torch.tensor(alpha[2:3]), torch.tensor(beta[2:3])).numpy()
  np.testing.assert_array_equal(alone[0], out[2])


def test_jitter_parameters_are_seeded_by_slide_and_view():
  p = stain.AugmentParams(views=3, scale=0.05, shift=0.02)
  a1, b1 = stain.jitter_parameters('S1', 40, p)
  a2, b2 = stain.jitter_parameters('S1', 40, p)
  assert a1.shape == b1.shape == (3, 40, 3)
  np.testing.assert_array_equal(a1, a2)
  np.testing.assert_array_equal(b1, b2)
  assert np.abs(a1 - 1).max() <= 0.05 and np.abs(b1).max() <= 0.02
  assert not np.allclose(a1[0], a1[1])  # views differ
  assert not np.allclose(stain.jitter_parameters('S2', 40, p)[0], a1)  # slides differ
  # A view's parameters do not depend on how many views are asked for.
  np.testing.assert_array_equal(
    stain.jitter_parameters('S1', 40, dataclasses.replace(p, views=1))[0][0], a1[0]
  )


# --------------------------------------------------------------------------- extraction

CFG = tiny_extraction.config(batch_size=16)


@pytest.fixture(scope='module')
def cohort(tmp_path_factory):
  return tiny_extraction.manifest_with_mri(
    tmp_path_factory.mktemp('augment_cohort'), patients=4, seed=5
  )


def _column_bytes(path):
  md = pq.read_metadata(path)
  out = {}
  for g in range(md.num_row_groups):
    for c in range(md.num_columns):
      col = md.row_group(g).column(c)
      out[col.path_in_schema] = out.get(col.path_in_schema, 0) + col.total_compressed_size
  return out


def _views_of(path, k):
  return store.read_slide_views(path, k)


def test_extraction_writes_k_views_deterministically_in_the_fingerprint(cohort, tmp_path):
  out = tmp_path / 'store'
  plain = extract.extract(cohort, out, CFG)
  assert plain.finalised and plain.failed == 0 and plain.slides_done >= 4
  wsi = store.read_store_json(out)['wsi']
  assert 'stain_augment' not in wsi['fingerprint']  # off: the fingerprint stores had before
  before = {p.name: store.read_slide(p) for p in store.slide_files(out)}
  from moemil_jax import bundle

  plain_fp = bundle.store_fingerprint(out)

  aug = dataclasses.replace(CFG, stain_augment=2)
  with pytest.raises(extract.FingerprintMismatch, match='another fingerprint'):
    extract.extract(cohort, out, aug)
  done = extract.extract(cohort, out, dataclasses.replace(aug, overwrite=True))
  assert done.slides_done == plain.slides_done and done.slides_skipped == 0
  assert done.mri_done == 0 and done.mri_skipped == 1  # the slides only
  info = store.read_store_json(out)
  assert info['wsi']['fingerprint_sha256'] != wsi['fingerprint_sha256']
  assert info['wsi']['fingerprint']['stain_augment']['views'] == 2
  assert store_reader.store_views(info) == 2

  for path in store.slide_files(out):
    names = pq.read_schema(path).names
    assert names[-2:] == ['embedding_view1', 'embedding_view2']
    bag = store.read_slide(path)
    views = _views_of(path, 2)
    assert views.shape == (2, *bag.embeddings.shape) and views.dtype == np.float16
    np.testing.assert_array_equal(bag.xy, before[path.name].xy)
    # View 0 is the plain embedding (the encoder saw a larger batch: to float16 round-off).
    np.testing.assert_allclose(bag.embeddings, before[path.name].embeddings, atol=2e-2, rtol=1e-2)
    # Each view is a different, nearby embedding.
    for v in views:
      assert not np.allclose(v, bag.embeddings, atol=1e-3)
      cos = (v * bag.embeddings).astype(np.float32).sum(1) / (
        np.linalg.norm(v.astype(np.float32), axis=1)
        * np.linalg.norm(bag.embeddings.astype(np.float32), axis=1)
      )
      assert cos.min() > 0.9
    assert not np.allclose(views[0], views[1], atol=1e-3)
    assert bag.metadata['stain_augment']['views'] == 2
    # The store grows (K + 1)-fold in embeddings: each view column is the size of the original.
    sizes = _column_bytes(path)
    assert sizes['embedding_view1'] == sizes['embedding_view2'] == sizes['embedding']
    assert sizes['embedding'] >= bag.embeddings.nbytes

  # The same run again, into another store: the same bytes.
  again = tmp_path / 'again'
  extract.extract(cohort, again, aug)
  for path in store.slide_files(out):
    other = store.wsi_path(again, path.stem)
    np.testing.assert_array_equal(_views_of(path, 2), _views_of(other, 2))
    np.testing.assert_array_equal(
      store.read_slide(path).embeddings, store.read_slide(other).embeddings
    )

  # Readers: views only when asked for; more than the store holds is one clear line.
  cohort_plain = store_reader.load_store(out)
  assert cohort_plain.patch_views is None
  loaded = store_reader.load_store(out, stain_views=2)
  assert loaded.patch_views.shape == (2, *loaded.patches.shape)
  np.testing.assert_array_equal(loaded.patches, cohort_plain.patches)
  first = store.slide_files(out)[0]
  p = list(loaded.patient_id).index(store.read_slide(first).patient_id)
  o = loaded.patch_offset[p]
  np.testing.assert_array_equal(loaded.patch_views[:, o : o + 3], _views_of(first, 2)[:, :3])
  with pytest.raises(store.StoreError, match='holds 2 stain views') as err:
    store_reader.load_store(out, stain_views=3)
  assert '\n' not in str(err.value)

  # A model trained on the augmented store scores a store extracted without views.
  assert store.compare_fingerprints(bundle.store_fingerprint(out), plain_fp) == (None, [])


def test_bad_augmentation_settings_are_one_line_errors(cohort, tmp_path):
  with pytest.raises(stain.StainError, match='stain_augment_scale'):
    extract.extract(
      cohort, tmp_path / 'a', dataclasses.replace(CFG, stain_augment=1, stain_augment_scale=1.5)
    )
  with pytest.raises(stain.StainError, match='stain_augment=-1'):
    extract.extract(cohort, tmp_path / 'b', dataclasses.replace(CFG, stain_augment=-1))


# --------------------------------------------------------------------------- training


@pytest.fixture(scope='module')
def stores(tmp_path_factory):
  """(plain, augmented): a small synthetic store, and the same store with two stain views
  per patch (the original plus deterministic noise), as --stain_augment=2 records them."""
  root = tmp_path_factory.mktemp('augment_train')
  plain = synthetic_store.make_store(
    root / 'plain', patients=30, seed=0, median_patches=24, max_patches=64
  )
  views = root / 'views'
  shutil.copytree(plain, views)
  rng = np.random.default_rng(0)
  for path in store.slide_files(views):
    bag = store.read_slide(path)
    noise = rng.normal(0, 0.5, (2, *bag.embeddings.shape)).astype(np.float32)
    view = (bag.embeddings.astype(np.float32) + noise).astype(np.float16)
    store.write_slide(
      views, bag.slide_id, bag.patient_id, bag.xy, bag.embeddings, bag.metadata, view
    )
  info = store.read_store_json(views)
  info.pop('schema_version')
  wsi = dict(info.get('wsi') or {})
  wsi['fingerprint'] = {
    **(wsi.get('fingerprint') or {}),
    'stain_augment': stain.AugmentParams(2).fingerprint(),
  }
  store.write_store_json(views, {**info, 'wsi': wsi})
  return plain, views


def _config(store_dir, views=0, epochs=2):
  c = test_config.get_config()
  c.store = str(store_dir)
  c.train.epochs = epochs
  c.data.stain_views = views
  return c


def test_member_inputs_read_the_asked_view():
  rows, d = 9, 4
  table = np.arange(3 * rows * d, dtype=np.float32).reshape(3, rows, d).astype(np.float16)
  batch = {
    'patient': np.zeros(2, np.int32),
    'patient_mask': np.ones(2, bool),
    'patch_segment': np.array([[0, 0, 1, 2]], np.int32),
    'patch_index': np.array([[1, 4, 7, 8]], np.int32),
  }
  data = {
    'patch_mean': np.zeros(d, np.float32),
    'patch_inv_std': np.ones(d, np.float32),
    'mri_deep': np.zeros((1, 1, 2), np.float32),
    'mri_deep_count': np.zeros(1, np.int32),
    'deep_mean': np.zeros(2, np.float32),
    'deep_inv_std': np.ones(2, np.float32),
    'radiomics': np.zeros((1, 1), np.float32),
    'has_radiomics': np.zeros(1, bool),
    **{k: np.zeros(1, np.float32) for k in ('response', 'os_months')},
    **{k: np.zeros(1, bool) for k in ('has_response', 'has_survival')},
    'os_event': np.zeros(1, np.int32),
  }
  summary = np.arange(3 * 2, dtype=np.float32).reshape(3, 1, 2)  # (views, P, W)
  seen = {}
  for view in (None, 0, 1, 2):
    both = {**data, 'patches': table, 'wsi_summary': summary}
    inputs, _ = trainer.member_inputs(both, batch, np.float32, view)
    seen[view] = np.asarray(inputs['wsi']), np.asarray(inputs['wsi_summary'])
  plain = {**data, 'patches': table[0], 'wsi_summary': summary[0]}
  plain = trainer.member_inputs(plain, batch, np.float32)[0]
  np.testing.assert_array_equal(seen[None][0], np.asarray(plain['wsi']))  # the original
  np.testing.assert_array_equal(seen[None][1], np.asarray(plain['wsi_summary']))
  for v in (0, 1, 2):
    np.testing.assert_array_equal(seen[v][0], table[v][batch['patch_index']].astype(np.float32))
    np.testing.assert_array_equal(seen[v][1], summary[v][batch['patient']])
  assert not np.array_equal(seen[1][0], seen[2][0])


@pytest.mark.slow  # three small trainings, about a minute
def test_training_draws_one_view_per_epoch_and_evaluates_on_the_original(stores):
  plain, views = stores
  members = trainer.grid(folds=(0,), seeds=(0,))
  base = trainer.fit(_config(plain), trainer.load(_config(plain)), members)
  # data.stain_views = 0 on the augmented store: the run on the store without views.
  off = trainer.fit(_config(views), trainer.load(_config(views)), members)
  assert trainer.load(_config(views)).patch_views is None
  np.testing.assert_array_equal(off.logits, base.logits)
  assert off.meta['train_loss'] == base.meta['train_loss']

  config = _config(views, views=2)
  cohort = trainer.load(config)
  assert cohort.patch_views.shape == (2, *cohort.patches.shape)
  on = trainer.fit(config, cohort, members)
  # Member seed 0: epoch 0 reads view 0 (the original), epoch 1 view 1.
  assert on.meta['train_loss'][0] == base.meta['train_loss'][0]
  assert on.meta['train_loss'][1] != base.meta['train_loss'][1]

  # Evaluation and prediction read the original: the same parameters predict the same.
  run_on, params_on, _ = trainer.setup(config, cohort, members)
  run_off, params_off, _ = trainer.setup(_config(plain), trainer.load(_config(plain)), members)
  assert run_on.data[0]['patches'].shape[0] == 3
  assert run_on.data[1]['wsi_summary'].shape[:2] == (1, 3)  # (folds, views, P, W)
  summary = np.asarray(run_on.data[1]['wsi_summary'])[0]
  np.testing.assert_array_equal(summary[0], np.asarray(run_off.data[1]['wsi_summary'])[0])
  assert not np.allclose(summary[1], summary[0])  # the views' own slide vectors
  patients = np.arange(cohort.num_patients)
  np.testing.assert_array_equal(
    trainer.predict(run_on, params_on, patients)[0],
    trainer.predict(run_off, params_off, patients)[0],
  )


def test_more_views_than_the_store_holds_is_one_line(stores):
  plain, _ = stores
  with pytest.raises(store.StoreError, match='stain_augment=2') as err:
    trainer.load(_config(plain, views=2))
  assert '\n' not in str(err.value)
