"""Reliability, MRI: a label absent from the mask, NaN/inf voxels, a missing sequence.

Non-finite voxels are refused with a clear error (not repaired: see mri.check_finite); in
extraction that becomes a recorded failure for that sequence, and the patient's other
sequences are still extracted. A patient with a missing sequence still trains.
"""

import numpy as np
import pyarrow.parquet as pq
import pytest
import SimpleITK as sitk

from feature_store import encoders, extract, manifest, mri, store, synthetic_store
from moemil_jax import device_data, splits, store_reader
from moemil_jax.configs import test as test_config

FAST_PARAMS = {
  'imageType': {'Original': {}},
  'featureClass': {'firstorder': None},
  'setting': {'binWidth': 25, 'label': 1},
}


def _volume(values: np.ndarray, spacing=(1.0, 1.0, 2.0)) -> sitk.Image:
  image = sitk.GetImageFromArray(values)
  image.SetSpacing(spacing)
  return image


def _phantom(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
  """A (z, y, x) float32 volume with a bright sphere and its label-1 mask."""
  rng = np.random.default_rng(seed)
  z, y, x = np.mgrid[:10, :40, :40]
  sphere = ((z - 5) * 2) ** 2 + (y - 20) ** 2 + (x - 20) ** 2 <= 8**2
  vol = (300 + 40 * rng.standard_normal(z.shape) + 200 * sphere).astype(np.float32)
  return vol, sphere.astype(np.uint8)


def test_label_absent_from_mask_is_a_mask_error_naming_the_label():
  vol, mask = _phantom()
  image, label = _volume(vol), _volume(mask)
  assert mri.radiomics_features(image, label, FAST_PARAMS)  # label 1 is there
  params = {**FAST_PARAMS, 'setting': {**FAST_PARAMS['setting'], 'label': 7}}
  with pytest.raises(mri.MaskError, match=r'Label \(7\) not present'):
    mri.radiomics_features(image, label, params)


@pytest.mark.parametrize('bad', [np.nan, np.inf, -np.inf])
def test_non_finite_voxels_are_refused_with_a_count(bad):
  vol, mask = _phantom()
  vol[0, :2, :3] = bad
  image, label = _volume(vol), _volume(mask)
  with pytest.raises(ValueError, match=r'6 NaN or infinite voxels'):
    mri.radiomics_features(image, label, FAST_PARAMS)
  with pytest.raises(ValueError, match=r'6 NaN or infinite voxels'):
    mri.roi_slices(image, label, 2)
  # Integer volumes cannot hold NaN and pass.
  mri.check_finite(_volume(mask))


def test_bad_and_missing_sequences_leave_the_rest_extracted(tmp_path):
  """t1 fine, t2 holds NaN, t1c absent: the patient keeps t1, t2 is a named failure.

  MHA, not NIfTI: ITK's NIfTI reader itself turns NaN into 0 before any check can see it.
  """
  vol, mask = _phantom()
  for name, array in (
    ('t1', vol),
    ('t2', np.where(vol > 450, np.nan, vol).astype(np.float32)),
    ('mask', mask),
  ):
    sitk.WriteImage(_volume(array), str(tmp_path / f'{name}.mha'))
  patient = manifest.Patient(
    line=2,
    clinical={'patient_id': 'P1'},
    slides=(),
    mri={'t1': tmp_path / 't1.mha', 't2': tmp_path / 't2.mha'},
    mri_mask=tmp_path / 'mask.mha',
  )
  cfg = extract.ExtractConfig(encoder_weights='random', mri_slices=1, radiomics_params=FAST_PARAMS)
  failures = extract.extract_mri(
    patient, tmp_path / 'store', encoders.Encoder('mri', 'random'), cfg, 'sha'
  )
  assert {(f['item'], f['stage']) for f in failures} == {
    ('P1/t2', 'radiomics'),
    ('P1/t2', 'mri_deep'),
  }
  assert all('NaN or infinite' in f['reason'] for f in failures)
  rad_path, deep_path = extract._mri_paths(tmp_path / 'store', 'P1')
  assert pq.read_table(rad_path).column('sequence').to_pylist() == ['t1']
  deep = pq.read_table(deep_path)
  assert deep.column('sequence').to_pylist() == ['t1']
  assert np.isfinite(store.embeddings_from_column(deep.column('embedding'))).all()


def test_training_data_with_a_missing_sequence(tmp_path):
  """Patients missing t1c (radiomics and deep rows) load, normalise and stay finite."""
  root = synthetic_store.make_store(
    tmp_path / 'store', patients=24, seed=4, median_patches=8, max_patches=16, mri_slices=2
  )
  rad = pq.read_table(root / store.RADIOMICS).to_pandas()
  deep = pq.read_table(root / store.MRI_DEEP)
  with_mri = sorted(rad['patient_id'].unique())[:3]
  drop = rad['patient_id'].isin(with_mri) & (rad['sequence'] == 't1c')
  store.write_radiomics(root, rad[~drop].to_dict('records'), {})
  keep = ~(
    deep.column('patient_id').to_numpy(zero_copy_only=False).astype(str)[:, None]
    == np.array(with_mri)[None]
  ).any(1) | (deep.column('sequence').to_numpy(zero_copy_only=False) != 't1c')
  deep = deep.filter(keep)
  store.write_mri_deep(
    root,
    deep.column('patient_id').to_pylist(),
    deep.column('sequence').to_pylist(),
    deep.column('slice_index').to_pylist(),
    store.embeddings_from_column(deep.column('embedding')),
    {},
  )

  cohort = store_reader.load_store(root)
  rows = [int(np.flatnonzero(cohort.patient_id == p)[0]) for p in with_mri]
  assert list(cohort.mri_deep_count[rows]) == [4, 4, 4]  # t1 and t2, 2 slices each
  assert cohort.has_radiomics[rows].all()
  assert cohort.radiomics.iloc[rows].filter(like='t1c:').isna().all(axis=None)
  cohort.split = splits.assign_splits(cohort)
  device = device_data.prepare(cohort, test_config.get_config().data)
  for name, array in device.tree().items():
    if np.issubdtype(np.asarray(array).dtype, np.floating):
      assert np.isfinite(np.asarray(array, np.float32)).all(), name
  assert np.asarray(device.has_radiomics)[rows].all()
