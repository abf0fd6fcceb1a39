"""Store v2: a timm slide encoder of any width, imported CLAM / TRIDENT features, the fast
layout, schema-1 stores, fingerprints that refuse mixed precision, and file permissions."""

import csv
import dataclasses
import json
import os
import subprocess
import sys

import h5py
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import tiny_extraction

from feature_store import extract, imported, store
from moemil_jax import predict, store_reader, train
from moemil_jax.configs import test as test_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# A 2-block ViT-Tiny (192-d, not 1024) with random weights: real timm, seconds on a CPU.
CFG = tiny_extraction.config(
  encoder_kwargs={'depth': 2}, target_mpp=4.0, patch_px=32, batch_size=16, workers=2
)


@pytest.fixture(scope='module')
def cohort(tmp_path_factory):
  out = tmp_path_factory.mktemp('v2_cohort')  # MRI for three patients: time
  return tiny_extraction.manifest_with_mri(out, patients=24, seed=7, keep=3, mri_slices=6)


@pytest.fixture(scope='module')
def timm_store(cohort, tmp_path_factory):
  out = tmp_path_factory.mktemp('timm_store')
  summary = extract.extract(cohort, out, CFG)
  assert summary.finalised and summary.failed == 0
  return out


def _train_and_predict(store_dir, workdir):
  c = test_config.get_config()
  c.store = str(store_dir)
  c.train.epochs = 2
  c.split.test_center = ''
  train.train_and_evaluate(c, workdir)
  return predict.load_bundle(workdir).predict(store_dir).sort_values('patient_id')


def test_timm_encoder_extracts_a_192_wide_store(timm_store):
  info = store.read_store_json(timm_store)
  assert info['schema_version'] == 2
  assert info['encoder']['dim'] == 192 and info['provenance'] == 'extracted'
  enc = info['wsi']['fingerprint']['encoder']
  assert enc['name'] == 'timm:vit_tiny_patch16_224' and enc['kwargs']['depth'] == 2
  assert enc['precision'] == 'fp32' and enc['device_type'] == 'cpu'
  assert enc['normalisation'] == {'mean': [0.5] * 3, 'std': [0.5] * 3}  # timm's cfg for it
  path = store.slide_files(timm_store)[0]
  field = pq.read_schema(path).field('embedding')
  assert field.type == pa.binary(192 * 2)  # fixed_size_binary float16 rows
  assert field.metadata[store.EMB_DTYPE_KEY] == b'float16'
  cohort = store_reader.load_store(timm_store)
  assert cohort.patches.shape[1] == 192 and cohort.patches.dtype == np.float16
  assert np.abs(cohort.patches.astype(np.float32)).max() > 0.01  # really extracted, not zeros


def _write_h5(store_dir, out_dir, fmt):
  """Each slide of the store as a CLAM or TRIDENT features file (float32, as they write)."""
  out_dir.mkdir()
  for path in store.slide_files(store_dir):
    bag = store.read_slide(path)
    sub = out_dir / 'h5_files' if fmt == 'clam' else out_dir
    sub.mkdir(exist_ok=True)
    with h5py.File(sub / f'{bag.slide_id}.h5', 'w') as f:
      f.create_dataset('features', data=bag.embeddings.astype(np.float32))
      coords = f.create_dataset('coords', data=bag.xy.astype(np.int64))
      if fmt == 'trident':
        coords.attrs['patch_size'] = 32
        coords.attrs['target_magnification'] = 2.5  # 4 um/px
        coords.attrs['patch_size_level0'] = 256
  return out_dir


@pytest.mark.slow  # trains three small models
def test_imported_clam_and_trident_features_train_and_predict_as_extracted(
  cohort, timm_store, tmp_path
):
  want = _train_and_predict(timm_store, tmp_path / 'run_extracted')
  assert len(want) == 24 and np.isfinite(want.response_prob).all()
  loaded = store_reader.load_store(timm_store)
  for fmt, extra in (('clam', {'patch_px': 32, 'mpp': 4.0}), ('trident', {})):
    feats = _write_h5(timm_store, tmp_path / f'{fmt}_feats', fmt)
    out = tmp_path / f'{fmt}_store'
    cfg = imported.ImportConfig(
      format=fmt,
      features_dir=str(feats),
      encoder_name='vit-tiny-2',
      extract=CFG,
      **extra,
    )
    summary = imported.import_features(cohort, out, cfg)
    assert summary.finalised and summary.failed == 0 and summary.slides_done > 0
    info = store.read_store_json(out)
    assert info['provenance'] == 'imported' and info['encoder']['name'] == 'vit-tiny-2'
    assert info['wsi']['fingerprint']['target_mpp'] == pytest.approx(4.0)
    got = store_reader.load_store(out)
    np.testing.assert_array_equal(got.patches, loaded.patches)
    np.testing.assert_array_equal(got.patch_count, loaded.patch_count)
    np.testing.assert_array_equal(got.mri_deep, loaded.mri_deep)  # MRI extracted as usual
    # Everything training reads is equal, so one trained import stands for both formats.
    assert got.radiomics.equals(loaded.radiomics)
    for name in ('patient_id', 'center', 'response', 'os_months', 'os_event'):
      np.testing.assert_array_equal(getattr(got, name), getattr(loaded, name), err_msg=name)
    if fmt == 'clam':
      pred = _train_and_predict(out, tmp_path / f'run_{fmt}')
      np.testing.assert_allclose(pred.response_prob, want.response_prob, rtol=0, atol=1e-6)
      np.testing.assert_allclose(pred.log_risk, want.log_risk, rtol=0, atol=1e-5)


def test_store_started_in_fp32_is_refused_in_fp16(cohort, timm_store):
  with pytest.raises(extract.FingerprintMismatch, match='another fingerprint'):
    extract.extract(cohort, timm_store, dataclasses.replace(CFG, precision='fp16'))


def _as_schema1(src, dst):
  """The store rewritten as the previous version wrote it: dictionary-encoded
  fixed_size_list<float16> embeddings and schema_version 1."""
  import shutil

  shutil.copytree(src, dst)
  for path in store.slide_files(dst):
    table = pq.read_table(path)
    emb = store.read_embeddings(table)
    col = pa.FixedSizeListArray.from_arrays(pa.array(emb.reshape(-1), pa.float16()), emb.shape[1])
    table = table.set_column(table.schema.get_field_index('embedding'), 'embedding', col)
    pq.write_table(table, path, compression='zstd')  # dictionary on, as schema 1 was
  info = json.loads((dst / store.STORE_JSON).read_text())
  info['schema_version'] = 1
  (dst / store.STORE_JSON).write_text(json.dumps(info))
  return dst


def test_schema1_store_loads_and_upgrades_in_place(timm_store, tmp_path):
  old = _as_schema1(timm_store, tmp_path / 'v1')
  assert pa.types.is_fixed_size_list(pq.read_schema(store.slide_files(old)[0]).field(4).type)
  want = store_reader.load_store(timm_store)
  np.testing.assert_array_equal(store_reader.load_store(old).patches, want.patches)
  done = subprocess.run(
    [sys.executable, '-m', 'launch.extract', f'--store={old}', '--upgrade_store'],
    capture_output=True,
    text=True,
    cwd=ROOT,
    timeout=300,
  )
  assert done.returncode == 0, done.stderr[-2000:]
  assert f'{len(store.slide_files(old))} slide file(s) converted' in done.stdout
  assert store.read_store_json(old)['schema_version'] == 2
  assert pa.types.is_fixed_size_binary(pq.read_schema(store.slide_files(old)[0]).field(4).type)
  np.testing.assert_array_equal(store_reader.load_store(old).patches, want.patches)
  assert store.upgrade_store(old) == 0  # idempotent


def test_store_files_follow_the_umask(tmp_path):
  old = os.umask(0o027)
  try:
    path = store.write_slide(tmp_path, 's1', 'P1', np.zeros((2, 2)), np.ones((2, 3)), {})
    js = store.write_store_json(tmp_path, {})
  finally:
    os.umask(old)
  assert path.stat().st_mode & 0o777 == 0o640
  assert js.stat().st_mode & 0o777 == 0o640


def test_missing_h5_is_a_failure_and_bad_h5_is_refused(cohort, tmp_path):
  feats = tmp_path / 'feats'
  feats.mkdir()
  with open(cohort, newline='') as f:
    first = next(csv.DictReader(f))['slides'].split(';')[0]
  stem = os.path.splitext(os.path.basename(first))[0]
  with h5py.File(feats / f'{stem}.h5', 'w') as f:
    f.create_dataset('features', data=np.ones((3, 8), np.float32))
    f.create_dataset('coords', data=np.zeros((2, 2), np.int64))  # 3 features, 2 coords
  cfg = imported.ImportConfig(features_dir=str(feats), encoder_name='x', mpp=0.5, patch_px=256)
  with pytest.raises(imported.FeatureImportError, match='do not match'):
    imported.import_features(cohort, tmp_path / 'store', cfg)


def test_predict_extracts_new_patients_with_the_training_stores_encoder(
  cohort, timm_store, tmp_path
):
  """launch.predict --manifest rebuilds the slide encoder (timm name, kwargs, precision) from
  the bundle's fingerprint: the new store's fingerprints equal the training store's."""
  from moemil_jax import bundle

  trained = bundle.store_fingerprint(timm_store)
  cfg = predict.extraction_config({'trained_on': trained})
  assert cfg.wsi_encoder == 'timm:vit_tiny_patch16_224' and cfg.encoder_kwargs['depth'] == 2
  with open(cohort, newline='') as f:
    rows = list(csv.DictReader(f))[:2]
  manifest = cohort.parent / 'new_patients.csv'  # beside it: its paths are relative
  with open(manifest, 'w', newline='') as f:
    w = csv.DictWriter(f, list(rows[0]))
    w.writeheader()
    w.writerows(dict(r, ic_response='', os_months='', os_event='') for r in rows)
  new = tmp_path / 'new_store'
  assert extract.extract(manifest, new, cfg).finalised
  assert bundle.fingerprint_difference(trained, bundle.store_fingerprint(new)) is None
