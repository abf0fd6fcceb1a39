"""MRI: SimpleITK reading, PyRadiomics pass-through, 2.5D tumour slices."""

import numpy as np
import pytest
import SimpleITK as sitk
from radiomics import featureextractor

from feature_store import mri

SMALL_PARAMS = {
  'imageType': {'Original': {}, 'LoG': {'sigma': [2.0]}},
  'featureClass': {'firstorder': None, 'shape': None, 'glcm': None},
  'setting': {'binWidth': 25, 'label': 1},
}


def _reference(image, mask, params):
  result = featureextractor.RadiomicsFeatureExtractor(params).execute(str(image), str(mask))
  return {k: float(v) for k, v in result.items() if not k.startswith('diagnostics_')}


@pytest.mark.parametrize('params', ['dict', 'default_yaml'])
def test_radiomics_equal_pyradiomics(shared_data, params):
  image, mask = shared_data / 'breast1_image.nrrd', shared_data / 'breast1_label.nrrd'
  params = dict(SMALL_PARAMS) if params == 'dict' else str(mri.DEFAULT_PARAMS)
  ours = mri.radiomics_features(image, mask, params)
  ref = _reference(image, mask, params)
  assert ours.keys() == ref.keys() and len(ours) > 50
  for k in ref:
    assert ours[k] == ref[k] or (np.isnan(ours[k]) and np.isnan(ref[k])), k
  if params == str(mri.DEFAULT_PARAMS):  # Original + LoG + Wavelet, resampled
    assert any(k.startswith('wavelet-') for k in ours) and any(
      k.startswith('log-sigma') for k in ours
    )


def test_radiomics_empty_mask_is_a_mask_error(shared_data):
  mask = sitk.ReadImage(str(shared_data / 'breast1_label.nrrd'))
  empty = sitk.Image(mask.GetSize(), mask.GetPixelID())
  empty.CopyInformation(mask)
  with pytest.raises(mri.MaskError, match='PyRadiomics refused'):
    mri.radiomics_features(shared_data / 'breast1_image.nrrd', empty, SMALL_PARAMS)


def _volume(shape=(10, 40, 40), spacing=(0.8, 0.8, 3.0)):
  rng = np.random.default_rng(0)
  vol = rng.normal(100, 10, shape).astype(np.int16)
  mask = np.zeros(shape, np.uint8)
  areas = {3: (4, 4), 4: (8, 8), 5: (10, 12), 6: (6, 6), 7: (2, 2)}
  for z, (h, w) in areas.items():
    mask[z, 15 : 15 + h, 12 : 12 + w] = 1
    vol[z, 15 : 15 + h, 12 : 12 + w] += 200
  image, label = sitk.GetImageFromArray(vol), sitk.GetImageFromArray(mask)
  for im in (image, label):
    im.SetSpacing(spacing)
  return image, label


def test_roi_slices_pick_largest_tumour_slices():
  image, mask = _volume()
  roi = mri.roi_slices(image, mask, k=3)
  np.testing.assert_array_equal(roi.slice_index, [4, 5, 6])
  np.testing.assert_array_equal(roi.tumour_area, [64, 120, 36])
  n, side, side2, ch = roi.images.shape
  assert (n, ch) == (3, 3) and side == side2 and side >= 12
  assert roi.images.min() >= 0 and roi.images.max() <= 1
  # The middle channel is the slice itself; neighbours are z-1 and z+1.
  top, left, side = roi.crop
  vol = sitk.GetArrayFromImage(image).astype(np.float32)
  lo, hi = np.percentile(vol, (0.5, 99.5))
  expect = np.clip((vol[5, top : top + side, left : left + side] - lo) / (hi - lo), 0, 1)
  np.testing.assert_allclose(roi.images[1, :, :, 1], expect, rtol=1e-5)
  np.testing.assert_allclose(
    roi.images[1, :, :, 0],
    np.clip((vol[4, top : top + side, left : left + side] - lo) / (hi - lo), 0, 1),
    rtol=1e-5,
  )
  # Fewer tumour slices than K: all of them.
  assert len(mri.roi_slices(image, mask, k=9).slice_index) == 5


def test_roi_slices_reject_empty_and_misaligned_masks():
  image, mask = _volume()
  empty = sitk.Image(mask.GetSize(), mask.GetPixelID())
  empty.CopyInformation(mask)
  with pytest.raises(mri.MaskError, match='empty'):
    mri.roi_slices(image, empty)
  shifted = sitk.Image(mask)
  shifted.SetOrigin((5.0, 0.0, 0.0))
  with pytest.raises(mri.MaskError, match='misaligned.*origin'):
    mri.roi_slices(image, shifted)
  small = sitk.GetImageFromArray(np.ones((10, 20, 20), np.uint8))
  with pytest.raises(mri.MaskError, match='size'):
    mri.roi_slices(image, small)


def test_read_nifti_nrrd_and_dicom_folder(tmp_path, shared_data):
  image, _ = _volume()
  sitk.WriteImage(image, str(tmp_path / 'vol.nii.gz'))
  np.testing.assert_array_equal(
    sitk.GetArrayFromImage(mri.read_image(tmp_path / 'vol.nii.gz')), sitk.GetArrayFromImage(image)
  )
  assert mri.read_image(shared_data / 'breast1_image.nrrd').GetDimension() == 3

  # A DICOM series: one file per slice, written by SimpleITK's GDCM writer.
  series = tmp_path / 'dicom'
  series.mkdir()
  arr = sitk.GetArrayFromImage(image)
  writer = sitk.ImageFileWriter()
  writer.KeepOriginalImageUIDOn()
  for z in range(arr.shape[0]):
    sl = image[:, :, z]
    sl.SetMetaData('0020|000e', '1.2.826.0.1.3680043.2.1125.1.1')  # series instance UID
    sl.SetMetaData('0020|0013', str(z + 1))  # instance number
    sl.SetMetaData('0020|0032', '\\'.join(map(str, image.TransformIndexToPhysicalPoint((0, 0, z)))))
    sl.SetMetaData('0020|0037', '1\\0\\0\\0\\1\\0')
    sl.SetMetaData('0008|0060', 'MR')
    writer.SetFileName(str(series / f'{z:03d}.dcm'))
    writer.Execute(sl)
  back = mri.read_image(series)
  assert back.GetSize() == image.GetSize()
  np.testing.assert_array_equal(sitk.GetArrayFromImage(back), arr)
  assert back.GetSpacing()[2] == pytest.approx(3.0, rel=1e-3)

  (tmp_path / 'empty').mkdir()
  with pytest.raises(ValueError, match='no DICOM series'):
    mri.read_image(tmp_path / 'empty')
  with pytest.raises(ValueError, match='SimpleITK cannot read it'):
    mri.read_image(tmp_path / 'missing.nii.gz')
