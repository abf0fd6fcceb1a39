"""MRI volumes: read them, compute radiomics, and cut 2.5D tumour slices for the CNN.

Radiomics are PyRadiomics with the caller's parameters passed through unchanged,
so a published params file reproduces published features.

Deep features (the "DLR" branch) are 2.5D: volumes are reoriented to LPS so the
array's first axis is axial; the K axial slices with the largest tumour area
are chosen, and each becomes a 3-channel image of the slices (z-1, z, z+1) so
the ImageNet trunk sees a little through-plane context without a 3-D network.
All K images share one square crop around the tumour (its bounding box over the
K slices plus a margin) and one intensity scale per volume (0.5th-99.5th
percentile of the whole volume -> [0, 1]), so contrast between patients is not
normalised away inside the tumour.
"""

from __future__ import annotations

import copy
import dataclasses
import logging as std_logging
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import radiomics
import SimpleITK as sitk
import yaml
from radiomics import featureextractor

DEFAULT_PARAMS = Path(__file__).resolve().parent / 'params' / 'mr_default.yaml'


class MaskError(ValueError):
  """The tumour mask is empty or does not match its image."""


def read_image(path: Path | str) -> sitk.Image:
  """NIfTI, NRRD, MHA... by file, or a DICOM series by folder (the series with most files)."""
  path = Path(path)
  if path.is_dir():
    ids = sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(path)) or []
    if not ids:
      raise ValueError(f'{path}: folder holds no DICOM series')
    files = max((sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(path), i) for i in ids), key=len)
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(files)
    return reader.Execute()
  try:
    return sitk.ReadImage(str(path))
  except RuntimeError as e:
    raise ValueError(f'{path}: SimpleITK cannot read it ({str(e).strip().splitlines()[-1]})') from e


def _as_image(x: Path | str | sitk.Image) -> sitk.Image:
  return x if isinstance(x, sitk.Image) else read_image(x)


def load_params(params: Path | str | Mapping[str, Any] | None) -> dict[str, Any]:
  """The parameter dict a params file or dict stands for (for fingerprints)."""
  if params is None:
    params = DEFAULT_PARAMS
  if isinstance(params, Mapping):
    return copy.deepcopy(dict(params))
  with open(params) as f:
    return yaml.safe_load(f) or {}


def radiomics_fingerprint(params: Path | str | Mapping[str, Any] | None) -> dict[str, Any]:
  return {'pyradiomics': radiomics.__version__, 'params': load_params(params)}


def check_finite(image: sitk.Image) -> None:
  """Raises ValueError when a volume holds NaN or infinite voxels.

  Refused rather than repaired: no fill value is neutral for both PyRadiomics
  (first-order and texture features) and the CNN's percentile scaling, and a
  volume with non-finite voxels usually means a broken conversion upstream.
  """
  array = sitk.GetArrayViewFromImage(image)
  if np.issubdtype(array.dtype, np.floating):
    bad = int(np.size(array) - np.count_nonzero(np.isfinite(array)))
    if bad:
      raise ValueError(
        f'image has {bad} NaN or infinite voxels of {array.size}; '
        'fix the conversion that produced it'
      )


def radiomics_features(
  image_path: Path | str | sitk.Image,
  mask_path: Path | str | sitk.Image,
  params: Path | str | Mapping[str, Any] | None = None,
) -> dict[str, float]:
  """PyRadiomics features (diagnostics dropped) as floats; params go to PyRadiomics unchanged."""
  if params is None:
    params = DEFAULT_PARAMS
  arg = copy.deepcopy(dict(params)) if isinstance(params, Mapping) else str(params)
  # PyRadiomics logs per feature class and pykwalify once per params validation: hush both.
  std_logging.getLogger('radiomics').setLevel(std_logging.ERROR)
  std_logging.getLogger('pykwalify').setLevel(std_logging.WARNING)
  extractor = featureextractor.RadiomicsFeatureExtractor(arg)
  image, mask = _as_image(image_path), _as_image(mask_path)
  check_finite(image)
  try:
    result = extractor.execute(image, mask)
  except (ValueError, RuntimeError) as e:
    raise MaskError(f'PyRadiomics refused image/mask: {e}') from e
  return {k: float(v) for k, v in result.items() if not k.startswith('diagnostics_')}


def check_geometry(image: sitk.Image, mask: sitk.Image, tol: float = 1e-3) -> None:
  """Raises MaskError unless mask and image share size, spacing, origin and direction."""
  problems = []
  if image.GetSize() != mask.GetSize():
    problems.append(f'size {mask.GetSize()} vs image {image.GetSize()}')
  for name in ('GetSpacing', 'GetOrigin', 'GetDirection'):
    a, b = np.asarray(getattr(image, name)()), np.asarray(getattr(mask, name)())
    if a.shape != b.shape or not np.allclose(
      a, b, atol=tol * max(1.0, float(np.abs(a).max(initial=0)))
    ):
      problems.append(
        f'{name[3:].lower()} {tuple(np.round(b, 4))} vs image {tuple(np.round(a, 4))}'
      )
  if problems:
    raise MaskError('mask is misaligned with the image: ' + '; '.join(problems))


@dataclasses.dataclass(frozen=True)
class RoiSlices:
  slice_index: np.ndarray  # (k,) axial indices in the LPS-oriented volume
  images: np.ndarray  # (k, side, side, 3) float32 in [0, 1]: slices z-1, z, z+1
  tumour_area: np.ndarray  # (k,) tumour voxels on each slice
  crop: tuple[int, int, int]  # (row0, col0, side) in the oriented slice


def roi_slices(
  image: Path | str | sitk.Image,
  mask: Path | str | sitk.Image,
  k: int = 5,
  *,
  margin: float = 0.25,
  percentiles: tuple[float, float] = (0.5, 99.5),
) -> RoiSlices:
  """The K axial 2.5D tumour crops for the CNN (see module docstring)."""
  image, mask = _as_image(image), _as_image(mask)
  if image.GetDimension() != 3 or image.GetNumberOfComponentsPerPixel() != 1:
    raise ValueError(
      f'expected a 3-D scalar volume, got {image.GetDimension()}-D '
      f'with {image.GetNumberOfComponentsPerPixel()} components'
    )
  check_geometry(image, mask)
  check_finite(image)
  vol = sitk.GetArrayFromImage(sitk.DICOMOrient(image, 'LPS')).astype(np.float32)  # (z, y, x)
  tumour = sitk.GetArrayFromImage(sitk.DICOMOrient(mask, 'LPS')) > 0
  area = tumour.sum((1, 2))
  if not area.any():
    raise MaskError('tumour mask is empty')
  order = np.argsort(-area, kind='stable')
  chosen = np.sort(order[: min(k, int((area > 0).sum()))])

  lo, hi = np.percentile(vol, percentiles)
  scaled = np.clip((vol - lo) / max(float(hi - lo), 1e-6), 0.0, 1.0)

  rows = np.nonzero(tumour[chosen].any((0, 2)))[0]
  cols = np.nonzero(tumour[chosen].any((0, 1)))[0]
  r0, r1, c0, c1 = rows[0], rows[-1] + 1, cols[0], cols[-1] + 1
  side = int(np.ceil(max(r1 - r0, c1 - c0) * (1 + 2 * margin))) + 2
  rc, cc = (r0 + r1) / 2, (c0 + c1) / 2
  top, left = int(round(rc - side / 2)), int(round(cc - side / 2))
  pad = side
  padded = np.pad(scaled, ((0, 0), (pad, pad), (pad, pad)))
  nz = vol.shape[0]
  images = np.empty((len(chosen), side, side, 3), np.float32)
  for i, z in enumerate(chosen):
    for ch, dz in enumerate((-1, 0, 1)):
      zz = int(np.clip(z + dz, 0, nz - 1))
      images[i, :, :, ch] = padded[zz, top + pad : top + pad + side, left + pad : left + pad + side]
  return RoiSlices(
    chosen.astype(np.int32), images, area[chosen].astype(np.int64), (top, left, side)
  )
