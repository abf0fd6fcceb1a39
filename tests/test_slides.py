"""Slides: real OpenSlide reads of real and generated pyramidal TIFFs."""

import numpy as np
import pytest
import tifffile

from feature_store import slides
from feature_store.synthetic_cohort import write_pyramidal_tiff

TEST_TISSUE = slides.TissueParams(mask_px_per_patch=8)


def _slide_with_square(path, *, side=1024, square=(384, 256, 192), colour=(150, 60, 140), mpp=0.5):
  """White glass with one stained square (x, y, size in level-0 px)."""
  rgb = np.full((side, side, 3), 245, np.uint8)
  rgb += np.random.default_rng(0).integers(0, 6, rgb.shape, dtype=np.uint8)  # scanner noise
  if square:
    x, y, s = square
    rgb[y : y + s, x : x + s] = colour
  write_pyramidal_tiff(path, rgb, mpp=mpp, tile=128, min_levels=3)
  return path


def test_planted_square_is_found_and_nothing_else(tmp_path):
  x, y, s = 384, 256, 192
  slide = slides.open_slide(_slide_with_square(tmp_path / 'square.tiff', square=(x, y, s)))
  # 32 px at 1 um/px = 64 level-0 px per patch; the square spans 3x3 cells exactly.
  plan = slides.plan_patches(slide, target_mpp=1.0, patch_px=32, tissue=TEST_TISSUE)
  assert plan.mpp == pytest.approx(0.5, rel=1e-3) and plan.mpp_source == 'slide'
  assert plan.patch_l0 == pytest.approx(64)
  assert plan.read_level == 1 and plan.read_px == 32
  got = {tuple(v) for v in plan.xy.tolist()}
  expected = {(cx, cy) for cx in range(x, x + s, 64) for cy in range(y, y + s, 64)}
  assert expected <= got
  # Nothing farther than one patch from the square.
  far = [
    (px, py) for px, py in got if px < x - 64 or px >= x + s + 64 or py < y - 64 or py >= y + s + 64
  ]
  assert not far
  assert len(got) <= len(expected) + 4 * 3 + 4


def test_blank_slide_gives_no_patches(tmp_path):
  slide = slides.open_slide(_slide_with_square(tmp_path / 'blank.tiff', side=512, square=None))
  plan = slides.plan_patches(slide, target_mpp=1.0, patch_px=32, tissue=TEST_TISSUE)
  assert len(plan.xy) == 0 and plan.tissue_fraction == 0.0


def test_batched_block_reads_equal_single_reads(tmp_path):
  rgb = np.random.default_rng(1).integers(0, 255, (640, 640, 3), dtype=np.uint8)
  rgb[:, :320] = 245  # left half glass, right half "tissue"
  path = tmp_path / 'noise.tiff'
  write_pyramidal_tiff(path, rgb, mpp=0.25, tile=128, min_levels=3)
  slide = slides.open_slide(path)
  # 0.25 -> 0.8 um/px: downsample 3.2, read from level 1 (ds 2) and resized 51 -> 16 px.
  plan = slides.plan_patches(
    slide,
    target_mpp=0.8,
    patch_px=16,
    tissue=slides.TissueParams(mask_px_per_patch=8, use_otsu=False, sthresh=20, close=0, mthresh=1),
  )
  assert plan.read_level == 1 and plan.read_px == 26
  assert len(plan.xy) > 0 and plan.xy[:, 0].min() >= 320 - plan.patch_l0
  xys, batches = zip(*slides.iter_patch_batches(slide, plan, batch_size=7, workers=2, block=3))
  xy = np.concatenate(xys)
  patches = np.concatenate(batches)
  assert sorted(map(tuple, xy.tolist())) == sorted(map(tuple, plan.xy.tolist()))
  assert all(len(b) == 7 for b in batches[:-1])
  import cv2

  for (px, py), patch in zip(xy[:12], patches[:12]):
    single = slides.read_rgb(
      slide, (int(px), int(py)), plan.read_level, (plan.read_px, plan.read_px)
    )
    single = cv2.resize(single, (16, 16), interpolation=cv2.INTER_AREA)
    # Block reads round the offset within the block: at most one read-level pixel of shift.
    assert np.abs(patch.astype(int) - single.astype(int)).mean() < 40
  # Inline reading (workers=0) gives the same bytes as threaded reading.
  inline = np.concatenate(
    [p for _, p in slides.iter_patch_batches(slide, plan, batch_size=7, workers=0, block=3)]
  )
  np.testing.assert_array_equal(inline, patches)


def test_block_reads_exact_when_grid_aligned(tmp_path):
  rgb = np.random.default_rng(2).integers(0, 255, (512, 512, 3), dtype=np.uint8)
  path = tmp_path / 'aligned.tiff'
  write_pyramidal_tiff(path, rgb, mpp=0.5, tile=128, min_levels=2)
  slide = slides.open_slide(path)
  plan = slides.plan_patches(
    slide,
    target_mpp=1.0,
    patch_px=32,
    tissue=slides.TissueParams(use_otsu=False, sthresh=0, min_patch_tissue=0.0),
  )
  assert len(plan.xy) == 64
  for xy, batch in slides.iter_patch_batches(slide, plan, batch_size=16, workers=2, block=4):
    for (px, py), patch in zip(xy, batch):
      single = slides.read_rgb(slide, (int(px), int(py)), 1, (32, 32))
      np.testing.assert_array_equal(patch, single)


def test_missing_mpp_needs_fallback(tmp_path):
  path = tmp_path / 'nompp.tiff'
  rgb = np.full((256, 256, 3), 240, np.uint8)
  rgb[64:192, 64:192] = (140, 50, 150)
  tifffile.imwrite(path, rgb, tile=(128, 128), photometric='rgb', compression='jpeg')
  slide = slides.open_slide(path)
  with pytest.raises(slides.SlideError, match='no MPP.*--fallback_mpp=UM_PER_PX'):
    slides.plan_patches(slide, target_mpp=1.0, patch_px=32)
  plan = slides.plan_patches(
    slide, target_mpp=1.0, patch_px=32, fallback_mpp=0.5, tissue=TEST_TISSUE
  )
  assert plan.mpp_source == 'fallback' and len(plan.xy) >= 4


def test_shared_data_slides(shared_data):
  boxes = slides.open_slide(shared_data / 'boxes.tiff')
  assert slides.slide_mpp(boxes) == (pytest.approx(352.78, rel=1e-3), 'slide')
  # 300x250 px at 352.8 um/px; a 16 px patch at 2x the MPP = 32 level-0 px, read from level 1.
  plan = slides.plan_patches(
    boxes, target_mpp=2 * 352.7777798337701, patch_px=16, tissue=TEST_TISSUE
  )
  assert plan.read_level == 1 and plan.read_px == 16
  assert 0 < len(plan.xy) <= (300 // 32) * (250 // 32)
  batches = list(slides.iter_patch_batches(boxes, plan, batch_size=8, workers=2))
  assert sum(len(p) for _, p in batches) == len(plan.xy)
  assert batches[0][1].shape[1:] == (16, 16, 3) and batches[0][1].dtype == np.uint8

  svs = slides.open_slide(shared_data / 'small.svs')
  assert slides.slide_mpp(svs) == (pytest.approx(0.499), 'slide')
  plan = slides.plan_patches(
    svs,
    target_mpp=0.499,
    patch_px=8,
    tissue=slides.TissueParams(
      use_otsu=False, sthresh=0, min_patch_tissue=0.0, min_tissue_area=0, min_hole_area=0
    ),
  )
  assert len(plan.xy) == 4
  patches = np.concatenate(
    [p for _, p in slides.iter_patch_batches(svs, plan, batch_size=4, workers=0)]
  )
  assert patches.shape == (4, 8, 8, 3)

  with pytest.raises(slides.SlideError, match='OpenSlide cannot read it'):
    slides.open_slide(shared_data / 'unopenable.tiff')
