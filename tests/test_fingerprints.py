"""Fingerprints that deploy: a store that differs from a model's training store only in the
environment (device, precision, library versions) is scored with one warning line; one that
differs in what defines the features is refused; a model trained on imported (CLAM /
TRIDENT) features predicts, from a store or from a manifest of new patients."""

import csv
import json
import os
import shutil
import subprocess
import sys

import h5py
import numpy as np
import pandas as pd
import pytest
import tiny_extraction

from feature_store import extract, imported, store
from moemil_jax import bundle, predict, train
from moemil_jax.configs import test as test_config

pytestmark = pytest.mark.slow  # trains two small models

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CFG = tiny_extraction.config(target_mpp=4.0, patch_px=32)


def test_environment_keys_are_split_from_the_feature_defining_ones():
  fp = {
    'encoder': {'name': 'uni', 'weights_sha256': 'abc', 'precision': 'fp16', 'torch': '2.4'},
    'wsi': {'patch_px': 256, 'encoder': {'device_type': 'cuda', 'name': 'uni'}},
    'mri': {'radiomics': {'pyradiomics': '3.0.1', 'params': {'binWidth': 25}}},
  }
  features, env = store.split_fingerprint(fp)
  assert env == {
    'encoder.precision': 'fp16',
    'encoder.torch': '2.4',
    'mri.radiomics.pyradiomics': '3.0.1',
    'wsi.encoder.device_type': 'cuda',
  }
  assert features['mri']['radiomics'] == {'params': {'binWidth': 25}}
  other = json.loads(json.dumps(fp))
  other['encoder'].update(precision='fp32', torch='2.9')
  other['wsi']['encoder']['device_type'] = 'cpu'
  diff, env_diff = store.compare_fingerprints(fp, other)
  assert diff is None and len(env_diff) == 3
  other['wsi']['patch_px'] = 224
  diff, _ = store.compare_fingerprints(fp, other)
  assert diff == 'wsi.patch_px: 256 vs 224'


@pytest.fixture(scope='module')
def cohort(tmp_path_factory):
  out = tmp_path_factory.mktemp('fp_cohort')
  return tiny_extraction.manifest_with_mri(out, patients=24, seed=11, keep=3, mri_slices=6)


def _train(store_dir, workdir):
  c = test_config.get_config()
  c.store = str(store_dir)
  c.train.epochs = 2
  c.split.test_center = ''
  train.train_and_evaluate(c, workdir)
  return predict.load_bundle(workdir)


@pytest.fixture(scope='module')
def extracted(cohort, tmp_path_factory):
  root = tmp_path_factory.mktemp('fp_extracted')
  assert extract.extract(cohort, root / 'store', CFG).finalised
  return root / 'store', _train(root / 'store', root / 'run')


def _edited(src, dst, edit):
  shutil.copytree(src, dst)
  info = json.loads((dst / store.STORE_JSON).read_text())
  edit(info)
  (dst / store.STORE_JSON).write_text(json.dumps(info))
  return dst


def test_a_store_made_in_another_environment_predicts_with_one_warning(extracted, tmp_path, caplog):
  store_dir, model = extracted
  want = model.predict(store_dir)

  def on_a_gpu(info):
    for enc in (info['encoder'], info['wsi']['fingerprint']['encoder']):
      enc.update(device_type='cuda', precision='fp16', torch='9.9.9', timm='9.9')
    info['mri']['fingerprint']['encoder'].update(device_type='cuda', torchvision='0.99')
    info['mri']['fingerprint']['radiomics']['pyradiomics'] = 'v9.9'

  other = _edited(store_dir, tmp_path / 'gpu_store', on_a_gpu)
  line = model.check_store(other)
  assert line is not None and '\n' not in line
  for key in ('device_type', 'precision', 'torch', 'timm', 'torchvision', 'pyradiomics'):
    assert key in line
  caplog.clear()
  with caplog.at_level('WARNING'):
    got = model.predict(other)
  warnings = [r for r in caplog.records if 'another environment' in r.getMessage()]
  assert len(warnings) == 1
  pd.testing.assert_frame_equal(got, want)


@pytest.mark.parametrize(
  'field,value',
  [('name', 'uni'), ('weights_sha256', '0' * 64), ('dim', 1024)],
)
def test_a_store_with_another_encoder_is_refused_in_one_line(extracted, tmp_path, field, value):
  store_dir, model = extracted

  def other_encoder(info):
    info['wsi']['fingerprint']['encoder'][field] = value

  other = _edited(store_dir, tmp_path / 'other', other_encoder)
  with pytest.raises(bundle.BundleError) as err:
    model.predict(other)
  assert '\n' not in str(err.value) and f'wsi.encoder.{field}' in str(err.value)


def test_a_store_with_other_stain_settings_is_refused(extracted, tmp_path):
  store_dir, model = extracted

  def normalised(info):
    info['wsi']['fingerprint']['stain'] = {'method': 'macenko', 'target': {}, 'source': 'x'}

  with pytest.raises(bundle.BundleError, match='wsi.stain'):
    model.predict(_edited(store_dir, tmp_path / 'stained', normalised))


def _write_h5(store_dir, out_dir):
  """Each slide of the store as a CLAM features file (h5_files/<slide>.h5, float32)."""
  sub = out_dir / 'h5_files'
  sub.mkdir(parents=True)
  for path in store.slide_files(store_dir):
    bag = store.read_slide(path)
    with h5py.File(sub / f'{bag.slide_id}.h5', 'w') as f:
      f.create_dataset('features', data=bag.embeddings.astype(np.float32))
      f.create_dataset('coords', data=bag.xy.astype(np.int64))
  return out_dir


def test_a_bundle_trained_on_imported_features_predicts(cohort, extracted, tmp_path):
  store_dir, _ = extracted
  feats = _write_h5(store_dir, tmp_path / 'clam')
  cfg = imported.ImportConfig(
    format='clam', features_dir=str(feats), encoder_name='uni', patch_px=32, mpp=4.0, extract=CFG
  )
  assert imported.import_features(cohort, tmp_path / 'imported', cfg).finalised
  model = _train(tmp_path / 'imported', tmp_path / 'run')
  assert len(model.predict(tmp_path / 'imported')) == 24

  # Re-extracting is impossible (the encoder ran elsewhere): one clear line, no KeyError.
  with pytest.raises(ValueError, match='--features_dir'):
    predict.extraction_config(model.meta)

  # New patients from a manifest: their .h5 files imported as training's were.
  with open(cohort, newline='') as f:
    rows = list(csv.DictReader(f))[:3]
  manifest = cohort.parent / 'new_imported.csv'  # beside it: its paths are relative
  with open(manifest, 'w', newline='') as f:
    w = csv.DictWriter(f, list(rows[0]))
    w.writeheader()
    w.writerows(dict(r, ic_response='', os_months='', os_event='') for r in rows)
  out = tmp_path / 'pred.csv'
  done = subprocess.run(
    [
      sys.executable,
      '-m',
      'launch.predict',
      f'--model={tmp_path / "run"}',
      f'--manifest={manifest}',
      f'--features_dir={feats}',
      f'--store={tmp_path / "new_store"}',
      f'--out={out}',
    ],
    cwd=ROOT,
    capture_output=True,
    text=True,
  )
  assert done.returncode == 0, done.stderr[-3000:]
  table = pd.read_csv(out)
  assert list(table.patient_id) == [r['patient_id'] for r in rows]
  assert np.isfinite(table.response_prob).all()
  assert (
    bundle.fingerprint_difference(
      model.meta['trained_on'], bundle.store_fingerprint(tmp_path / 'new_store')
    )
    is None
  )


def test_precisions_give_features_within_the_tolerance(shared_data):
  """What makes precision an environment key: the same real patches in fp32 and bf16
  (CPU autocast) give features with cosine > 0.999 (docs/stain.md, "Fingerprints")."""
  from feature_store import encoders, stain

  tile = stain.read_image(shared_data / 'he_tile_strong.png')
  crops = np.stack([tile[y : y + 224, x : x + 224] for y in (0, 200) for x in (0, 300)])
  feats = {
    p: encoders.Encoder(
      'wsi', 'random', name='timm:vit_tiny_patch16_224', kwargs={'depth': 2}, precision=p
    )(crops)
    for p in ('fp32', 'bf16')
  }
  a, b = feats['fp32'], feats['bf16']
  cos = (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)
  assert cos.min() > 0.999 and not np.array_equal(a, b)
