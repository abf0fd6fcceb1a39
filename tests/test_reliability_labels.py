"""Reliability, labels: a messy cohort still trains, and degenerate labels are said out loud.

One small training run on a synthetic store where the training split has every patient
censored and a single response class, some patients have no labels, and some have no slide
or no MRI. Manifest-level cases (duplicates, unsafe IDs, OS <= 0) are in test_manifest.py.
"""

import logging

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest

from feature_store import manifest, store, synthetic_store
from moemil_jax import train
from moemil_jax.configs import test as test_config


@pytest.fixture(scope='module')
def messy_store(tmp_path_factory):
  root = synthetic_store.make_store(
    tmp_path_factory.mktemp('messy'),
    patients=28,
    seed=7,
    median_patches=10,
    max_patches=24,
    mri_slices=1,
  )
  clinical = pq.read_table(root / store.CLINICAL).to_pandas()
  a = clinical['center'] == 'A'
  clinical.loc[a, 'os_event'] = 0  # every center-A patient censored
  clinical.loc[a, 'ic_response'] = 1  # one response class in center A
  ids = clinical['patient_id'].tolist()
  no_labels, no_wsi, no_mri = ids[:2], ids[2:4], ids[4:6]
  clinical.loc[clinical['patient_id'].isin(no_labels), ['ic_response', 'os_months']] = None
  clinical.loc[clinical['patient_id'].isin(no_wsi), 'has_wsi'] = False
  clinical.loc[clinical['patient_id'].isin(no_mri), 'has_mri'] = False
  store.write_clinical(root, store.clinical_table(clinical))
  for path in store.slide_files(root):
    if store.read_slide(path).patient_id in no_wsi:
      path.unlink()
  rad = pq.read_table(root / store.RADIOMICS).to_pandas()
  store.write_radiomics(root, rad[~rad['patient_id'].isin(no_mri)].to_dict('records'), {})
  deep = pq.read_table(root / store.MRI_DEEP)
  keep = ~pd.Series(deep.column('patient_id').to_pylist()).isin(no_mri).to_numpy()
  deep = deep.filter(keep)
  store.write_mri_deep(
    root,
    deep.column('patient_id').to_pylist(),
    deep.column('sequence').to_pylist(),
    deep.column('slice_index').to_pylist(),
    store.embeddings_from_column(deep.column('embedding')),
    {},
  )
  return root, {'no_labels': no_labels, 'no_wsi': no_wsi, 'no_mri': no_mri}


@pytest.mark.slow  # day-to-day subset stays under 3 minutes
def test_all_censored_one_class_and_missing_modalities_train(messy_store, tmp_path, caplog):
  root, groups = messy_store
  config = test_config.get_config()
  config.store = str(root)
  config.train.epochs = 2
  with caplog.at_level(logging.INFO):
    info = train.train_and_evaluate(config, tmp_path)
  text = caplog.text
  assert 'training split: no OS events' in text and 'survival loss is 0' in text
  assert 'training split: IC response has only class [1]' in text
  # The survival term is exactly 0 in every epoch's log line; the run completes.
  epoch_lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith('epoch ')]
  assert len(epoch_lines) == 2 and all('surv 0.0000' in line for line in epoch_lines)
  assert info['epochs_run'] == 2
  pred = pd.read_parquet(tmp_path / 'predictions.parquet').set_index('patient_id')
  assert np.isfinite(pred[['response_logit', 'log_risk']].to_numpy()).all()
  for group in groups.values():  # patients without a label or a modality still get predictions
    assert set(group) <= set(pred.index)
  assert pred.loc[groups['no_labels'], 'ic_response'].isna().all()
  assert pred.loc[groups['no_labels'], 'os_months'].isna().all()


def test_missing_modalities_and_labels_in_the_manifest(tmp_path):
  """A row without slides or MRI and without a response is valid; without OS it is refused."""
  header = ','.join(manifest.MANIFEST_COLUMNS)
  rows = ['P1,A,50,M,1000,2,1,III,,40,1,,,,,', 'P2,A,50,M,1000,2,1,III,1,,1,,,,,']
  path = tmp_path / 'manifest.csv'
  path.write_text('\n'.join([header, *rows]) + '\n')
  m = manifest.read_manifest(path)
  assert [p.patient_id for p in m.patients] == ['P1']
  assert m.patients[0].clinical['ic_response'] is None
  assert not m.patients[0].slides and not m.patients[0].mri
  assert [(e.line, e.column) for e in m.errors] == [(3, 'os_months')]
  table = manifest.clinical_table(m.patients)
  assert table.column('has_wsi').to_pylist() == [False] and table.column('has_mri').to_pylist() == [
    False
  ]
