import numpy as np
import pyarrow.parquet as pq
import pytest

from feature_store import store, synthetic_store


def test_store_follows_the_contract(small_store):
  info = store.read_store_json(small_store)
  assert info['synthetic'] is True
  clinical = pq.read_table(small_store / store.CLINICAL)
  assert clinical.schema.equals(store.CLINICAL_SCHEMA)
  assert clinical.num_rows == 60
  for path in store.slide_files(small_store):
    bag = store.read_slide(path, expected_dim=store.WSI_DIM)
    assert bag.embeddings.dtype == np.float16 and (bag.embeddings >= 0).all()
    assert bag.xy.dtype == np.int32 and len(np.unique(bag.xy, axis=0)) == len(bag.xy)
    assert path.stem == bag.slide_id and bag.slide_id.startswith(bag.patient_id)
  deep = pq.read_table(small_store / store.MRI_DEEP)
  assert deep.schema.field('embedding').type.list_size == store.MRI_DEEP_DIM
  radiomics = pq.read_table(small_store / store.RADIOMICS)
  assert set(radiomics.column('sequence').to_pylist()) == set(store.MRI_SEQUENCES)
  assert info['counts']['slides'] == len(store.slide_files(small_store))


def test_bag_sizes_are_lognormal_around_the_median(tmp_path):
  out = synthetic_store.make_store(
    tmp_path,
    patients=80,
    seed=2,
    median_patches=200,
    max_patches=1000,
    knobs=synthetic_store.synthetic.Knobs(missing_wsi_rate=0.0),
  )
  per_patient = {}
  for path in store.slide_files(out):
    bag = store.read_slide(path)
    per_patient[bag.patient_id] = per_patient.get(bag.patient_id, 0) + len(bag.xy)
  sizes = np.array(list(per_patient.values()))
  assert len(sizes) == 80 and sizes.max() <= 1000
  assert 130 < np.median(sizes) < 300


def test_key_patches_carry_the_signal(small_store):
  """Mean key-patch projection on the signal direction tracks the patient's latent; others do not."""
  truth = synthetic_store.read_truth(small_store).set_index('patient_id')
  keys = pq.read_table(small_store / 'truth_key_patches.parquet').to_pandas()
  key_score, other_score, latent = [], [], []
  for path in store.slide_files(small_store):
    bag = store.read_slide(path)
    rows = keys[keys.slide_id == bag.slide_id].row.to_numpy()
    if len(rows) == 0:
      continue
    is_key = np.zeros(len(bag.xy), bool)
    is_key[rows] = True
    emb = bag.embeddings.astype(np.float32)
    key_score.append(emb[is_key].mean(0))
    other_score.append(emb[~is_key].mean(0))
    latent.append(truth.loc[bag.patient_id, 'latent'])
  # The direction separating high- and low-latent key means must not separate the non-key means.
  key_score, other_score, latent = map(np.asarray, (key_score, other_score, latent))
  direction = key_score[latent > 0].mean(0) - key_score[latent <= 0].mean(0)
  r_key = np.corrcoef(key_score @ direction, latent)[0, 1]
  r_other = np.corrcoef(other_score @ direction, latent)[0, 1]
  assert r_key > 0.5 and abs(r_other) < r_key - 0.3


def test_same_seed_same_store(tmp_path):
  a = synthetic_store.make_store(tmp_path / 'a', patients=8, seed=5, median_patches=20)
  b = synthetic_store.make_store(tmp_path / 'b', patients=8, seed=5, median_patches=20)
  for pa_, pb in zip(store.slide_files(a), store.slide_files(b)):
    assert np.array_equal(store.read_slide(pa_).embeddings, store.read_slide(pb).embeddings)
  assert (a / 'truth.csv').read_text() == (b / 'truth.csv').read_text()


def test_unsafe_ids_are_refused(tmp_path):
  for bad in ('../escape', 'a/b', '..', '.hidden', ''):
    with pytest.raises(ValueError):
      store.validate_id(bad)
  with pytest.raises(ValueError, match='slide_id'):
    store.write_slide(tmp_path, '../x', 'P1', np.zeros((1, 2)), np.zeros((1, 4)), {})
