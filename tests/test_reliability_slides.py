"""Reliability, slides: truncated or corrupt files, pen marks, mostly white glass, a huge slide.

Unopenable format and blank slides are in test_extract.py and test_slides.py; slides without
MPP (objective power, the manifest's mpp column, the fallback) in test_mpp.py.
"""

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import cv2
import numpy as np
import pytest
import tifffile

from feature_store import encoders, extract, slides, store
from feature_store.synthetic_cohort import render_slide, write_pyramidal_tiff

ROOT = Path(__file__).resolve().parents[1]
CFG = extract.ExtractConfig(
  encoder_weights='random', target_mpp=0.5, patch_px=64, batch_size=8, workers=2
)


@pytest.fixture(scope='module')
def he_tiff(tmp_path_factory) -> Path:
  path = tmp_path_factory.mktemp('slides') / 'he.tiff'
  write_pyramidal_tiff(
    path, render_slide(np.random.default_rng(0), 0.0, 'A', 1024), mpp=0.5, tile=128
  )
  return path


def _extract(path: Path, out: Path):
  encoder = encoders.Encoder('wsi', 'random')
  return extract.extract_slide(path, 's1', 'P1', out, encoder, CFG, {}, 'sha')


def test_truncated_file_is_a_slide_error_and_writes_nothing(he_tiff, tmp_path):
  data = he_tiff.read_bytes()
  truncated = tmp_path / 'truncated.tiff'
  truncated.write_bytes(data[: len(data) // 2])
  with pytest.raises(slides.SlideError, match='truncated.tiff: OpenSlide cannot read it'):
    _extract(truncated, tmp_path / 'store')
  assert not store.wsi_path(tmp_path / 'store', 's1').exists()


def test_corrupt_tiles_are_a_slide_error_not_a_crash(he_tiff, tmp_path):
  """Header intact, level-0 tile bytes zeroed: the read fails and extract() records it."""
  with tifffile.TiffFile(he_tiff) as tif:
    page = tif.pages[0]
    start, end = min(page.dataoffsets), max(page.dataoffsets)
  data = bytearray(he_tiff.read_bytes())
  data[start:end] = bytes(end - start)
  corrupt = tmp_path / 'corrupt.tiff'
  corrupt.write_bytes(bytes(data))
  slides.open_slide(corrupt).close()  # still opens
  with pytest.raises(slides.SlideError, match='corrupt or truncated'):
    _extract(corrupt, tmp_path / 'store')
  assert not store.wsi_path(tmp_path / 'store', 's1').exists()


def _pen_marked(path: Path) -> tuple[np.ndarray, np.ndarray]:
  """An H&E disc plus thick green, blue and black marker strokes on glass."""
  rng = np.random.default_rng(0)
  side = 1024
  rgb = np.clip(244 + rng.integers(-3, 4, (side, side, 3)), 0, 255).astype(np.uint8)
  tissue = np.zeros((side, side), np.uint8)
  cv2.circle(tissue, (256, 256), 160, 1, -1)
  nuclei = rng.random((side, side)) < 0.08
  he = np.where(nuclei[..., None], np.array([75, 45, 135]), np.array([236, 160, 200]))
  rgb[tissue == 1] = he[tissue == 1]
  ink = np.zeros((side, side), np.uint8)
  for colour, y in (((40, 150, 80), 560), ((30, 60, 170), 720), ((28, 28, 34), 880)):
    cv2.line(rgb, (80, y), (950, y - 60), colour, 40)
    cv2.line(ink, (80, y), (950, y - 60), 1, 40)
  write_pyramidal_tiff(path, rgb, mpp=0.5, tile=128, min_levels=3)
  return tissue.astype(bool), ink.astype(bool)


def test_pen_marks_do_not_become_tissue(tmp_path):
  tissue, ink = _pen_marked(tmp_path / 'pen.tiff')
  slide = slides.open_slide(tmp_path / 'pen.tiff')
  l0 = 64  # 32 px at 1 um/px on a 0.5 um/px slide

  def plan(pen_filter):
    p = slides.plan_patches(
      slide,
      target_mpp=1.0,
      patch_px=32,
      tissue=slides.TissueParams(mask_px_per_patch=8, pen_filter=pen_filter),
    )

    def on(m):
      return {
        tuple(xy) for xy in p.xy.tolist() if m[xy[1] : xy[1] + l0, xy[0] : xy[0] + l0].mean() > 0.25
      }

    return on(ink), on(tissue)

  ink_patches, tissue_patches = plan(True)
  unfiltered_ink, unfiltered_tissue = plan(False)
  assert unfiltered_ink, (
    'the strokes should fool a saturation-only mask (else the test proves nothing)'
  )
  assert not ink_patches
  assert tissue_patches == unfiltered_tissue and len(tissue_patches) >= 16


def test_mostly_white_slide_keeps_only_its_small_tissue(tmp_path):
  rgb = np.clip(245 + np.random.default_rng(1).integers(-4, 5, (1024, 1024, 3)), 0, 255).astype(
    np.uint8
  )
  rgb[600:728, 300:428] = (200, 120, 170)  # 1.6% of the slide is tissue
  write_pyramidal_tiff(tmp_path / 'white.tiff', rgb, mpp=0.5, tile=128)
  plan = slides.plan_patches(
    slides.open_slide(tmp_path / 'white.tiff'),
    target_mpp=1.0,
    patch_px=32,
    tissue=slides.TissueParams(mask_px_per_patch=8),
  )
  assert 0 < len(plan.xy) <= 9 and plan.tissue_fraction < 0.03
  assert all(300 - 64 <= x < 428 and 600 - 64 <= y < 728 for x, y in plan.xy.tolist())


# A 49152^2 px slide (7 GB as RGB) that is blank glass except a 1024^2 px tissue square;
# level-0 tiles are all identical JPEGs, so the file is small and quick to write.
_LARGE_SLIDE = textwrap.dedent("""
    import numpy as np, tifffile, sys
    side, tile, sq0, sq1 = 49152, 512, 24576, 25600   # tissue square [sq0, sq1)^2 at level 0
    def tiles(s, ds):
        blank = np.full((tile, tile, 3), 244, np.uint8)
        a, b = sq0 // ds, sq1 // ds
        n = -(-s // tile)
        for r in range(n):
            for c in range(n):
                y0, x0 = r * tile, c * tile
                if y0 < b and a < y0 + tile and x0 < b and a < x0 + tile:
                    t = blank.copy()
                    t[max(a - y0, 0):b - y0, max(a - x0, 0):b - x0] = (190, 100, 160)
                    yield t
                else:
                    yield blank
    with tifffile.TiffWriter(sys.argv[1], bigtiff=True) as tif:
        for i, ds in enumerate((1, 4, 16, 64)):
            s = side // ds
            tif.write(tiles(s, ds), shape=(s, s, 3), dtype=np.uint8, tile=(tile, tile),
                      photometric="rgb", compression="jpeg", resolution=(1e4 / (0.5 * ds),) * 2,
                      resolutionunit="CENTIMETER", subfiletype=1 if i else 0)
""")


_MEASURE = textwrap.dedent("""
    import json, resource, sys
    from feature_store import encoders, extract, slides, store
    encoder = encoders.Encoder("wsi", "random")
    cfg = extract.ExtractConfig(encoder_weights="random", target_mpp=2.0, patch_px=64, batch_size=16,
                                workers=2)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    n = extract.extract_slide(sys.argv[1], "big", "P1", sys.argv[2], encoder, cfg, {}, "sha")
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"patches": n, "growth_mb": (after - before) / 1024}))
""")


@pytest.mark.slow  # day-to-day subset stays under 3 minutes
def test_huge_slide_extracts_with_bounded_memory(tmp_path):
  path = tmp_path / 'huge.tiff'
  subprocess.run([sys.executable, '-c', _LARGE_SLIDE, str(path)], check=True, timeout=300)
  assert path.stat().st_size < 200e6
  slide = slides.open_slide(path)
  assert slide.dimensions == (49152, 49152) and slide.level_count == 4
  slide.close()
  done = subprocess.run(
    [sys.executable, '-c', _MEASURE, str(path), str(tmp_path / 'store')],
    cwd=ROOT,
    capture_output=True,
    encoding='utf-8',
    errors='replace',
    timeout=600,
  )
  assert done.returncode == 0, done.stderr[-3000:]
  result = json.loads(done.stdout.strip().splitlines()[-1])
  # The 1024 px square at 2 um/px (256 level-0 px per patch) is a 4x4 grid.
  assert 9 <= result['patches'] <= 25
  # Level 0 as RGB would be 7 GB; the mask level is 768^2. Peak growth stays small.
  assert result['growth_mb'] < 300, result
