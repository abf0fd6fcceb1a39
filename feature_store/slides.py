"""Whole-slide images: open with OpenSlide, find tissue, lay a patch grid, read it fast.

Tissue is segmented CLAM-style on a low-resolution image (saturation, median
blur, Otsu or fixed threshold, morphological closing, minimum tissue and hole
areas). Patches form a non-overlapping grid at a target um/px, read from the
pyramid level just finer than needed and resized. Regions are read in blocks of
up to `block` x `block` grid cells (one `read_region` per block, patches cut out
of it) by worker threads that run ahead of the model; OpenSlide is thread-safe
and releases the GIL while decoding.

Only the image pyramid is ever read: a slide's associated images (label, macro)
can carry patient identifiers and are never touched.
"""

from __future__ import annotations

import collections
import dataclasses
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Iterator

import cv2
import numpy as np
import openslide


class SlideError(RuntimeError):
  """A slide cannot be used (unreadable, no MPP); the message says why."""


@dataclasses.dataclass(frozen=True)
class TissueParams:
  """Tissue segmentation; CLAM's `seg_params` are the anchor.

  CLAM: sthresh=8, mthresh=7, close=4, use_otsu=False, a_t=100 and a_h=16
  reference patches of 512 level-0 px. CLAM's areas are sized for resection
  slides at 20-40x; nasopharyngeal biopsies are a few mm, so areas here are in
  units of one target patch (patch_px at target_mpp) and default small: a
  fragment that cannot hold one patch gives none anyway. Under Otsu the
  threshold never drops below `sthresh`, so a blank slide stays blank instead
  of Otsu splitting its noise.
  """

  sthresh: int = 8  # saturation threshold (0-255): fixed, or floor under Otsu
  mthresh: int = 7  # median blur kernel (odd)
  close: int = 4  # morphological closing kernel (mask px); 0 = none
  use_otsu: bool = True
  min_tissue_area: float = 1.0  # drop tissue components smaller than this (patch areas)
  min_hole_area: float = 0.25  # fill holes smaller than this (patch areas)
  min_patch_tissue: float = 0.5  # keep a patch when this fraction of it is tissue
  mask_px_per_patch: int = 16  # segmentation resolution: mask px along one patch side
  pen_filter: bool = True  # drop marker ink (see `pen_mask`) from the tissue mask
  pen_margin: int = 10  # blue/green ink: red weaker than both green and blue by this
  pen_dark: int = 50  # black ink: every channel below this
  pen_min_area: float = 0.25  # ignore ink specks smaller than this (patch areas)

  def as_dict(self) -> dict:
    return dataclasses.asdict(self)


def open_slide(path: Path | str) -> openslide.OpenSlide:
  try:
    return openslide.OpenSlide(str(path))
  except (openslide.OpenSlideError, openslide.OpenSlideUnsupportedFormatError, OSError) as e:
    raise SlideError(f'{path}: OpenSlide cannot read it ({type(e).__name__}: {e})') from e


MPP_SOURCES = ('manifest', 'slide', 'objective', 'fallback')


def objective_power(slide: openslide.OpenSlide) -> float | None:
  """The scanner's objective magnification (openslide.objective-power), or None."""
  try:
    power = float(slide.properties[openslide.PROPERTY_NAME_OBJECTIVE_POWER])
  except (KeyError, ValueError):
    return None
  return power if np.isfinite(power) and power > 0 else None


def slide_mpp(
  slide: openslide.OpenSlide,
  fallback_mpp: float | None = None,
  *,
  manifest_mpp: float | None = None,
  from_objective: bool = False,
) -> tuple[float, str]:
  """Level-0 um/px and where it came from, first found of (`MPP_SOURCES`):

  'manifest': the manifest's `mpp` for this slide (the person who knows the scanner wins);
  'slide': openslide.mpp-x/y; 'objective': 10 / openslide.objective-power, when
  `from_objective` (20x -> 0.5, 40x -> 0.25 um/px, the convention CLAM and TRIDENT use);
  'fallback': `fallback_mpp`. None of them: a SlideError saying what to give.
  """
  if manifest_mpp:
    return float(manifest_mpp), 'manifest'
  props = slide.properties
  values = []
  for key in (openslide.PROPERTY_NAME_MPP_X, openslide.PROPERTY_NAME_MPP_Y):
    try:
      v = float(props[key])
    except (KeyError, ValueError):
      continue
    if np.isfinite(v) and v > 0:
      values.append(v)
  if values:
    return float(np.mean(values)), 'slide'
  power = objective_power(slide)
  if from_objective and power:
    return 10.0 / power, 'objective'
  if fallback_mpp:
    return float(fallback_mpp), 'fallback'
  if power and not from_objective:
    hint = f'; or --mpp_from_objective (it says {power:g}x: {10.0 / power:g} um/px)'
  elif from_objective:
    hint = ' (it records no objective power for --mpp_from_objective)'
  else:
    hint = ''
  raise SlideError(
    "slide has no MPP (openslide.mpp-x/y): give it in the manifest's mpp column, or pass "
    '--fallback_mpp=UM_PER_PX (about 0.25 for a 40x scan, 0.5 for 20x)' + hint
  )


def _to_rgb(region: np.ndarray) -> np.ndarray:
  """RGBA from OpenSlide -> RGB with transparent pixels (outside scanned area) white."""
  rgb = region[..., :3]
  alpha = region[..., 3:4]
  if alpha.min() == 255:
    return np.ascontiguousarray(rgb)
  return np.where(alpha == 0, np.uint8(255), rgb)


def read_rgb(
  slide: openslide.OpenSlide, location: tuple[int, int], level: int, size: tuple[int, int]
) -> np.ndarray:
  """A region as RGB; a decode failure (truncated or corrupt file) becomes a SlideError."""
  try:
    region = slide.read_region(location, level, size)
  except openslide.OpenSlideError as e:
    raise SlideError(
      f'cannot read region {location} at level {level} (corrupt or truncated file? {e})'
    ) from e
  return _to_rgb(np.asarray(region))


def tissue_mask(rgb: np.ndarray, params: TissueParams, *, patch_area_px: float) -> np.ndarray:
  """Boolean tissue mask of a low-resolution RGB image; `patch_area_px` = one patch in mask px^2."""
  hsv = cv2.cvtColor(np.ascontiguousarray(rgb), cv2.COLOR_RGB2HSV)
  sat = hsv[..., 1]
  k = max(1, int(params.mthresh) | 1)
  if min(sat.shape) >= k and k > 1:
    sat = cv2.medianBlur(sat, k)
  if params.use_otsu:
    otsu, _ = cv2.threshold(sat, 0, 255, cv2.THRESH_BINARY + cv2.THRESH_OTSU)
    thresh = max(float(otsu), float(params.sthresh))
  else:
    thresh = float(params.sthresh)
  mask = sat > thresh
  if params.pen_filter:
    mask &= ~pen_mask(rgb, params, min_area_px=params.pen_min_area * patch_area_px)
  if params.close > 0:
    kernel = np.ones((params.close, params.close), np.uint8)
    mask = cv2.morphologyEx(mask.astype(np.uint8), cv2.MORPH_CLOSE, kernel).astype(bool)
  min_tissue = int(round(params.min_tissue_area * patch_area_px))
  min_hole = int(round(params.min_hole_area * patch_area_px))
  if min_tissue > 1:
    mask = _drop_small_components(mask, min_tissue)
  if min_hole > 1:
    holes = ~mask & ~_drop_small_components(~mask, min_hole, keep_border=True)
    mask = mask | holes
  return mask


def pen_mask(rgb: np.ndarray, params: TissueParams, *, min_area_px: float = 0.0) -> np.ndarray:
  """Pixels of marker ink, which is saturated like stain but is not tissue.

  Eosin and hematoxylin both leave red the strongest (or near-strongest) channel;
  blue, green and cyan markers absorb red, so red is the weakest channel by a
  margin. Black marker is dark in every channel. Marker strokes are large, so
  ink specks under `min_area_px` (mask px) are ignored; what remains is dilated
  by the closing kernel so the strokes' anti-aliased rims do not survive as tissue.
  """
  rgb = np.asarray(rgb).astype(np.int16)
  r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
  ink = ((r + params.pen_margin < g) & (r + params.pen_margin < b)) | (
    rgb.max(-1) < params.pen_dark
  )
  if min_area_px > 1 and ink.any():
    ink = _drop_small_components(ink, int(round(min_area_px)))
  if params.close > 0 and ink.any():
    kernel = np.ones((params.close, params.close), np.uint8)
    ink = cv2.dilate(ink.astype(np.uint8), kernel).astype(bool)
  return ink


def _drop_small_components(
  mask: np.ndarray, min_area: int, keep_border: bool = False
) -> np.ndarray:
  """`mask` without connected components smaller than `min_area` px (optionally keeping any touching the border)."""
  n, labels, stats, _ = cv2.connectedComponentsWithStats(mask.astype(np.uint8), connectivity=8)
  keep = stats[:, cv2.CC_STAT_AREA] >= min_area
  if keep_border:
    x, y = stats[:, cv2.CC_STAT_LEFT], stats[:, cv2.CC_STAT_TOP]
    w, h = stats[:, cv2.CC_STAT_WIDTH], stats[:, cv2.CC_STAT_HEIGHT]
    keep |= (x == 0) | (y == 0) | (x + w == mask.shape[1]) | (y + h == mask.shape[0])
  keep[0] = False  # label 0 is the complement
  return keep[labels]


@dataclasses.dataclass(frozen=True)
class PatchPlan:
  """Where a slide's patches are and how to read them."""

  mpp: float  # level-0 um/px
  mpp_source: str  # one of MPP_SOURCES
  level0_size: tuple[int, int]
  patch_l0: float  # patch side in level-0 px
  read_level: int
  read_downsample: float
  read_px: int  # patch side at the read level (resized to patch_px)
  patch_px: int
  cells: np.ndarray  # (n, 2) int32 grid (col, row) of kept patches
  xy: np.ndarray  # (n, 2) int32 level-0 top-left corners
  mask_level: int
  mask_shape: tuple[int, int]
  tissue_fraction: float  # of the slide area

  def metadata(self) -> dict:
    return {
      'mpp': self.mpp,
      'mpp_source': self.mpp_source,
      'level0_width': self.level0_size[0],
      'level0_height': self.level0_size[1],
      'patch_level0_px': self.patch_l0,
      'read_level': self.read_level,
      'read_downsample': self.read_downsample,
      'read_px': self.read_px,
      'patch_px': self.patch_px,
      'mask_level': self.mask_level,
      'mask_shape': list(self.mask_shape),
      'tissue_fraction': self.tissue_fraction,
      'num_patches': int(len(self.xy)),
    }


def _grid_origin(index: np.ndarray, patch_l0: float) -> np.ndarray:
  return np.round(index * patch_l0).astype(np.int64)


def plan_patches(
  slide: openslide.OpenSlide,
  *,
  target_mpp: float = 0.5,
  patch_px: int = 256,
  tissue: TissueParams = TissueParams(),
  fallback_mpp: float | None = None,
  manifest_mpp: float | None = None,
  mpp_from_objective: bool = False,
) -> PatchPlan:
  """Segments tissue and lays the patch grid; reads only a low-resolution level."""
  mpp, mpp_source = slide_mpp(
    slide, fallback_mpp, manifest_mpp=manifest_mpp, from_objective=mpp_from_objective
  )
  w0, h0 = slide.dimensions
  patch_l0 = patch_px * target_mpp / mpp
  cols, rows = int(w0 // patch_l0), int(h0 // patch_l0)

  # Segmentation at ~mask_px_per_patch px per patch side, from the best level.
  mask_ds = max(patch_l0 / params_px(tissue), 1.0)
  mask_level = slide.get_best_level_for_downsample(mask_ds * 1.001)
  lw, lh = slide.level_dimensions[mask_level]
  rgb = read_rgb(slide, (0, 0), mask_level, (lw, lh))
  mw, mh = max(1, int(round(w0 / mask_ds))), max(1, int(round(h0 / mask_ds)))
  if (mw, mh) != (lw, lh):
    rgb = cv2.resize(rgb, (mw, mh), interpolation=cv2.INTER_AREA if mw < lw else cv2.INTER_LINEAR)
  sx, sy = w0 / mw, h0 / mh
  mask = tissue_mask(rgb, tissue, patch_area_px=(patch_l0 / sx) * (patch_l0 / sy))

  # Fraction of tissue in every grid cell via an integral image.
  integral = np.pad(mask.astype(np.float64).cumsum(0).cumsum(1), ((1, 0), (1, 0)))
  cells = np.zeros((0, 2), np.int64)
  if cols and rows:
    xs0 = _grid_origin(np.arange(cols), patch_l0)
    ys0 = _grid_origin(np.arange(rows), patch_l0)
    mx0 = np.clip(np.floor(xs0 / sx), 0, mw - 1).astype(int)
    mx1 = np.clip(np.ceil((xs0 + patch_l0) / sx), mx0 + 1, mw).astype(int)
    my0 = np.clip(np.floor(ys0 / sy), 0, mh - 1).astype(int)
    my1 = np.clip(np.ceil((ys0 + patch_l0) / sy), my0 + 1, mh).astype(int)
    total = (
      integral[my1][:, mx1] - integral[my0][:, mx1] - integral[my1][:, mx0] + integral[my0][:, mx0]
    )
    area = (my1 - my0)[:, None] * (mx1 - mx0)[None, :]
    frac = total / area
    r, c = np.nonzero(frac >= tissue.min_patch_tissue)
    cells = np.stack([c, r], 1)
  xy = _grid_origin(cells, patch_l0).astype(np.int32)

  read_level = slide.get_best_level_for_downsample((target_mpp / mpp) * 1.001)
  read_ds = float(slide.level_downsamples[read_level])
  return PatchPlan(
    mpp=mpp,
    mpp_source=mpp_source,
    level0_size=(w0, h0),
    patch_l0=patch_l0,
    read_level=read_level,
    read_downsample=read_ds,
    read_px=max(1, int(round(patch_l0 / read_ds))),
    patch_px=patch_px,
    cells=cells.astype(np.int32),
    xy=xy,
    mask_level=mask_level,
    mask_shape=mask.shape,
    tissue_fraction=float(mask.mean()),
  )


def params_px(tissue: TissueParams) -> int:
  return max(1, int(tissue.mask_px_per_patch))


def _blocks(cells: np.ndarray, block: int) -> list[np.ndarray]:
  """Indices of patches grouped by `block` x `block` grid tiles, in row-major tile order."""
  keys = collections.defaultdict(list)
  for i, (c, r) in enumerate(cells):
    keys[(int(r) // block, int(c) // block)].append(i)
  return [np.asarray(keys[k]) for k in sorted(keys)]


def _read_block(slide: openslide.OpenSlide, plan: PatchPlan, idx: np.ndarray) -> np.ndarray:
  """One read_region covering the patches `idx`; returns (len(idx), patch_px, patch_px, 3) uint8."""
  xy = plan.xy[idx].astype(np.int64)
  x0, y0 = xy.min(0)
  ds = plan.read_downsample
  offsets = np.round((xy - (x0, y0)) / ds).astype(int)
  w, h = offsets.max(0) + plan.read_px
  region = read_rgb(slide, (int(x0), int(y0)), plan.read_level, (int(w), int(h)))
  out = np.empty((len(idx), plan.patch_px, plan.patch_px, 3), np.uint8)
  interp = cv2.INTER_AREA if plan.read_px > plan.patch_px else cv2.INTER_LINEAR
  for k, (ox, oy) in enumerate(offsets):
    patch = region[oy : oy + plan.read_px, ox : ox + plan.read_px]
    if plan.read_px != plan.patch_px:
      patch = cv2.resize(patch, (plan.patch_px, plan.patch_px), interpolation=interp)
    out[k] = patch
  return out


def iter_patch_batches(
  slide: openslide.OpenSlide,
  plan: PatchPlan,
  *,
  batch_size: int = 64,
  workers: int = 4,
  block: int = 8,
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
  """Yields (xy, patches uint8 NHWC) batches in block order (deterministic), read ahead by `workers` threads."""
  blocks = _blocks(plan.cells, block)
  order = np.concatenate(blocks) if blocks else np.zeros(0, int)

  def produce() -> Iterator[np.ndarray]:
    if workers <= 0:
      for b in blocks:
        yield _read_block(slide, plan, b)
      return
    with ThreadPoolExecutor(workers, thread_name_prefix='slide-read') as pool:
      pending: collections.deque = collections.deque()
      it = iter(blocks)
      for b in it:
        pending.append(pool.submit(_read_block, slide, plan, b))
        if len(pending) >= 2 * workers:
          break
      while pending:
        result = pending.popleft().result()
        nxt = next(it, None)
        if nxt is not None:
          pending.append(pool.submit(_read_block, slide, plan, nxt))
        yield result

  buf: list[np.ndarray] = []
  buffered = 0
  start = 0
  for patches in produce():
    buf.append(patches)
    buffered += len(patches)
    while buffered >= batch_size:
      allp = np.concatenate(buf)
      yield plan.xy[order[start : start + batch_size]], allp[:batch_size]
      start += batch_size
      buf, buffered = [allp[batch_size:]], buffered - batch_size
  if buffered:
    yield plan.xy[order[start:]], np.concatenate(buf)
