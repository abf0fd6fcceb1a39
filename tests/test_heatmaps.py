"""Attention heatmaps: percentiles, rendering real slides, bounded memory, planted key patches."""

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import cv2
import numpy as np
import openslide
import pandas as pd
import pytest
import scipy.stats

from feature_store import synthetic, synthetic_store
from moemil_jax import heatmaps, train
from moemil_jax.configs import test as test_config

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def no_associated_images(monkeypatch):
  """Any access to a slide's label/macro/thumbnail images fails the test."""

  def refuse(self):
    raise AssertionError('associated images (label, macro) must never be read')

  monkeypatch.setattr(openslide.OpenSlide, 'associated_images', property(refuse))


def test_percentiles_match_scipy():
  rng = np.random.default_rng(0)
  ref = rng.integers(0, 30, 200).astype(float)  # many ties
  new = np.array([-5.0, 0.0, 12.5, 29.0, 40.0])
  np.testing.assert_allclose(
    heatmaps.percentiles(ref), [scipy.stats.percentileofscore(ref, v, kind='rank') for v in ref]
  )
  np.testing.assert_allclose(
    heatmaps.percentiles(ref, new),
    [scipy.stats.percentileofscore(ref, v, kind='rank') for v in new],
  )


def test_heatmap_of_small_svs_renders(shared_data, tmp_path, no_associated_images):
  path = shared_data / 'small.svs'
  xy = np.array([(x, y) for y in range(0, 16, 4) for x in range(0, 16, 4)])
  scores = np.arange(len(xy), dtype=float)
  res = heatmaps.slide_heatmap(
    path,
    'small',
    xy,
    scores,
    4.0,
    tmp_path / 'small.png',
    params=heatmaps.HeatmapParams(alpha=1.0, tissue_only=False, colorbar=False),
    tiles_dir=tmp_path / 'tiles',
    top_k=3,
    patch_px=8,
  )
  img = cv2.cvtColor(cv2.imread(str(res['png'])), cv2.COLOR_BGR2RGB)
  assert img.shape == (16, 16, 3) and res['level'] == 0
  lut = heatmaps._lut('jet')
  # alpha 1: every patch shows exactly its percentile's colour (top patch: 100th percentile).
  np.testing.assert_array_equal(img[12:16, 12:16], np.broadcast_to(lut[255], (4, 4, 3)))
  pct = heatmaps.percentiles(scores)
  np.testing.assert_array_equal(img[0, 0], lut[int(pct[0] * 2.55)])
  tiles = pd.read_csv(tmp_path / 'tiles' / 'small_top3.csv')
  assert (
    list(tiles['rank']) == [1, 2, 3] and list(tiles.x) == [12, 8, 4] and list(tiles.y) == [12] * 3
  )
  assert sorted(p.name for p in (tmp_path / 'tiles').glob('*.png')) == [
    'small_top01_x12_y12.png',
    'small_top02_x8_y12.png',
    'small_top03_x4_y12.png',
  ]
  slide = openslide.OpenSlide(str(path))
  expected = cv2.resize(
    np.asarray(slide.read_region((12, 12), 0, (4, 4)))[..., :3],
    (8, 8),
    interpolation=cv2.INTER_LINEAR,
  )
  np.testing.assert_array_equal(
    cv2.imread(str(tmp_path / 'tiles' / 'small_top01_x12_y12.png'))[..., ::-1], expected
  )

  # Tissue only: pixels outside the tissue mask keep the slide's own colour.
  heatmaps.slide_heatmap(
    path,
    'small',
    xy,
    scores,
    4.0,
    tmp_path / 'tissue.png',
    params=heatmaps.HeatmapParams(alpha=1.0, blur=0.5, colorbar=False),
  )
  tissue = cv2.imread(str(tmp_path / 'tissue.png'))[..., ::-1]
  rgb = np.asarray(slide.read_region((0, 0), 0, (16, 16)))[..., :3]
  from feature_store import slides

  mask = slides.tissue_mask(rgb, slides.TissueParams(), patch_area_px=16.0)
  np.testing.assert_array_equal(tissue[~mask], rgb[~mask])


def test_overlapping_rescoring_ranks_new_patches_against_stored(shared_data):
  from feature_store import encoders

  enc = encoders.Encoder('wsi', 'random')
  w = np.random.default_rng(0).normal(size=1024)
  xy = np.array([(0, 0), (8, 0), (0, 8), (8, 8)])
  raw = np.array([0.1, 0.4, -0.2, 0.3])
  slide = openslide.OpenSlide(str(shared_data / 'small.svs'))
  new = heatmaps.half_step_neighbours(xy, 8.0, slide.dimensions)
  assert {tuple(p) for p in new} == {(4, 0), (0, 4), (4, 4), (8, 4), (4, 8)}
  seen = []

  def encoder(patches):
    assert patches.shape[1:] == (16, 16, 3) and patches.dtype == np.uint8
    seen.append(enc(patches))
    return seen[-1]

  all_xy, pct = heatmaps.rescore_overlapping(
    slide, xy, raw, 8.0, encoder=encoder, score_fn=lambda f: f @ w, patch_px=16
  )
  np.testing.assert_array_equal(all_xy[:4], xy)
  np.testing.assert_allclose(pct[:4], heatmaps.percentiles(raw))
  new_raw = np.concatenate(seen) @ w
  assert len(new_raw) == 5
  np.testing.assert_allclose(pct[4:], heatmaps.percentiles(raw, new_raw))
  image, _ = heatmaps.render(slide, all_xy, pct, 8.0, heatmaps.HeatmapParams(tissue_only=False))
  assert image.shape == (16, 16, 3)


def _write_blank_pyramid(path: Path, side: int, tile: int = 512) -> None:
  """A side x side generic pyramidal TIFF written tile by tile (never a full-size array)."""
  import tifffile

  white = np.full((tile, tile, 3), 255, np.uint8)
  pink = np.full((tile, tile, 3), (225, 140, 190), np.uint8)
  with tifffile.TiffWriter(path) as tif:
    level, size = 0, side
    while True:
      n = -(-size // tile)
      lo, hi = n // 3, 2 * n // 3  # tissue in the middle third
      tiles = (pink if lo <= r < hi and lo <= c < hi else white for r in range(n) for c in range(n))
      px_per_cm = 1e4 / (0.5 * 2**level)
      tif.write(
        tiles,
        shape=(size, size, 3),
        dtype=np.uint8,
        tile=(tile, tile),
        photometric='rgb',
        compression='jpeg',
        resolution=(px_per_cm, px_per_cm),
        resolutionunit='CENTIMETER',
        subfiletype=1 if level else 0,
      )
      if size <= 2 * tile:
        break
      level, size = level + 1, size // 2


def test_heatmap_memory_is_bounded_by_output_size(tmp_path):
  side = 20000
  path = tmp_path / 'large.tiff'
  _write_blank_pyramid(path, side)
  script = textwrap.dedent(f"""
      import json, resource, tracemalloc
      import numpy as np
      from moemil_jax import heatmaps
      from feature_store import slides
      slide = slides.open_slide({str(path)!r})
      step = 256
      xy = np.array([(x, y) for y in range(0, {side} - step, step) for x in range(0, {side} - step, step)])
      pct = heatmaps.percentiles(np.random.default_rng(0).random(len(xy)))
      before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
      tracemalloc.start()
      image, level = heatmaps.render(slide, xy, pct, step, heatmaps.HeatmapParams(max_side=1500, blur=1.0))
      heatmaps.write_png({str(tmp_path / 'large.png')!r}, image)
      traced = tracemalloc.get_traced_memory()[1]
      after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
      print(json.dumps({{"level": level, "shape": image.shape, "rss_growth": (after - before) * 1024,
                         "traced_peak": traced, "levels": slide.level_count}}))
  """)
  proc = subprocess.run(
    [sys.executable, '-c', script], capture_output=True, text=True, cwd=ROOT, timeout=120
  )
  assert proc.returncode == 0, proc.stderr[-2000:]
  out = json.loads(proc.stdout.strip().splitlines()[-1])
  level0_canvas = side * side * 3  # 1.2 GB
  h, w = out['shape'][:2]
  assert out['level'] > 0 and max(h, w) <= 1500
  assert out['traced_peak'] < 40 * h * w  # a few float/uint8 planes of the output
  assert out['rss_growth'] < level0_canvas / 10  # far below a level-0 canvas
  png = cv2.imread(str(tmp_path / 'large.png'))
  assert png.shape[:2] == (h, w)
  # Tissue (the pink middle third) is coloured; white glass is left alone.
  assert (png[: h // 4, : w // 4] == 255).all()
  assert not (
    png[h // 2, w // 2] == cv2.cvtColor(np.uint8([[[225, 140, 190]]]), cv2.COLOR_RGB2BGR)[0, 0]
  ).all()


def _planted_store(tmp_path_factory):
  """40 patients whose slide signal sits in 10% planted key patches (truth_key_patches)."""
  return synthetic_store.make_store(
    tmp_path_factory.mktemp('store'),
    patients=40,
    seed=1,
    knobs=synthetic.Knobs(response_strength=6.0, wsi_signal=0.95, mri_signal=0.95),
    median_patches=50,
    max_patches=120,
    key_fraction=0.1,
    wsi_key_gain=3.0,
  )


def _trained_pathomics(tmp_path_factory, pathway: str, slide_prototypes: int, **model):
  """A WSI-only model on the planted store, through one slide pathway."""
  store = _planted_store(tmp_path_factory)
  c = test_config.get_config()
  c.store = str(store)
  c.model.modalities = ('wsi',)
  c.model.wsi_pathway = pathway
  c.model.update(model)
  c.data.slide_prototypes = slide_prototypes
  c.train.epochs = 12
  c.train.learning_rate = 2e-3
  c.split.val_fraction = 0.4
  workdir = tmp_path_factory.mktemp('run')
  train.train_and_evaluate(c, workdir)
  return store, workdir


@pytest.fixture(scope='module')
def trained(tmp_path_factory):
  # The attention pathway alone: beside the prototype vector (the test config's 'both') the
  # attention need not find the key patches, and did not.
  return _trained_pathomics(tmp_path_factory, 'attention', 0, dropout=0.0)


@pytest.mark.slow  # day-to-day subset stays under 3 minutes
def test_planted_key_patches_get_the_highest_attention_percentiles(trained):
  store, workdir = trained
  run = heatmaps.load_run(workdir)
  truth = pd.read_parquet(store / 'truth_key_patches.parquet')
  key_pct, other_pct = [], []
  for pid in run.cohort.patient_id[run.cohort.patch_count > 0]:
    for att in run.slide_attention(pid):
      pct = heatmaps.percentiles(att.raw_scores)
      is_key = np.zeros(len(pct), bool)
      is_key[truth[truth.slide_id == att.slide_id].row.to_numpy()] = True
      key_pct.append(pct[is_key])
      other_pct.append(pct[~is_key])
  key_pct, other_pct = np.concatenate(key_pct), np.concatenate(other_pct)
  assert len(key_pct) > 100
  assert np.median(key_pct) > 80, (np.median(key_pct), np.median(other_pct))
  assert np.median(other_pct) < 55


@pytest.fixture(scope='module')
def trained_prototypes(tmp_path_factory):
  """A pathomics model whose slide pathway is the prototype one (the default)."""
  return _trained_pathomics(tmp_path_factory, 'prototypes', 8)


def test_prototype_pathway_scores_every_patch_and_the_scores_add_up(trained_prototypes):
  _, workdir = trained_prototypes
  run = heatmaps.load_run(workdir)
  assert run.model.wsi is None and run.scores_patches
  for pid in run.cohort.patient_id[run.cohort.patch_count > 0][:12]:
    shares = run.slide_attention(pid)
    total = sum(s.raw_scores.sum() for s in shares)
    # The shares add up to the patient's slide-vector linearisation: gradient . vector.
    grad = run._slide_vector_gradient(pid, 'response')
    vector = np.asarray(run.patient_inputs(pid)['wsi_summary'])[0]
    np.testing.assert_allclose(total, grad @ vector, rtol=1e-3, atol=1e-4)
    assert all(np.isfinite(s.raw_scores).all() and s.raw_scores.std() > 0 for s in shares)


def test_prototype_heatmap_renders_with_overlap_blur_and_a_colour_bar(
  trained_prototypes, shared_data, tmp_path
):
  from feature_store import encoders

  _, workdir = trained_prototypes
  run = heatmaps.load_run(workdir)
  pid = run.cohort.patient_id[run.cohort.patch_count > 0][0]
  scorer = run.patch_scorer(pid)
  enc = encoders.Encoder('wsi', 'random')
  xy = np.array([(0, 0), (8, 0), (0, 8), (8, 8)])
  params = heatmaps.HeatmapParams(blur=0.5, tissue_only=False, alpha=1.0)
  res = heatmaps.slide_heatmap(
    shared_data / 'small.svs',
    'small',
    xy,
    scorer(enc(np.zeros((4, 16, 16, 3), np.uint8) + 200)),
    8.0,
    tmp_path / 'small.png',
    params=params,
    rescore={'encoder': enc, 'score_fn': scorer},
    patch_px=16,
  )
  assert res['patches'] == 4 + 5  # stored plus half-step neighbours
  img = cv2.imread(str(res['png']))[..., ::-1]
  assert img.shape[0] == 16 and img.shape[1] > 16  # the slide, then the colour bar panel
  lut = heatmaps._lut('jet')
  bar = img[:, 16:]
  # The bar shows the colour map's ends: 100th percentile near the top, 0th near the bottom.
  assert (np.abs(bar.astype(int) - lut[255]).sum(-1) < 40).any()
  assert (np.abs(bar.astype(int) - lut[0]).sum(-1) < 40).any()
