"""Where the WSI branch looks: CLAM-style attention heatmaps and top-attended patch tiles.

Raw attention scores (before the softmax, so comparable across bags of any size) are
rank-normalised to percentiles within a slide and painted over the slide at one pyramid
level, inside tissue only. Everything is allocated at the output resolution: the slide is
read strip by strip at the chosen level, scores accumulate on a float canvas of the output
size, and colours come from a 256-entry lookup table, so a 100,000 px slide drawn at a
4,000 px level costs tens of MB, never a level-0 canvas (CLAM users report 40 GB).

Optional overlapping re-scoring (CLAM's `overlap`): patches half a patch away from every
stored patch are read, embedded with the caller's encoder and scored with the trained
attention network, then ranked against the slide's original scores, which sharpens the map.

Only the image pyramid is read: a slide's associated images (label, macro, thumbnail) can
carry patient identifiers and never reach any output.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Callable

import cv2
import numpy as np
import pandas as pd
import pyarrow.parquet as pq
from absl import logging

from feature_store import slides, store

STRIP_PX = 1024  # rows of the output read per read_region call


class HeatmapError(ValueError):
  """A heatmap cannot be drawn as asked (level too fine, no patches); the message says why."""


# --------------------------------------------------------------------------- percentiles


def percentiles(reference: np.ndarray, values: np.ndarray | None = None) -> np.ndarray:
  """Percentile (0-100] of each value among `reference` scores, ties averaged.

  scipy.stats.percentileofscore(reference, v, kind="rank") for every v, vectorised; with
  values=None the reference scores themselves (their average rank / n * 100), as CLAM does.
  """
  ref = np.sort(np.asarray(reference, np.float64).ravel())
  if len(ref) == 0:
    raise HeatmapError('no reference scores to rank against')
  vals = np.asarray(reference if values is None else values, np.float64)
  left = np.searchsorted(ref, vals, side='left')
  right = np.searchsorted(ref, vals, side='right')
  return (left + right + (left < right)) * 50.0 / len(ref)


# --------------------------------------------------------------------------- geometry


def patch_level0_px(metadata: dict, *, patch_px: int | None = None) -> float:
  """A stored patch's side in level-0 px from wsi/<slide>.parquet metadata."""
  if metadata.get('patch_level0_px'):
    return float(metadata['patch_level0_px'])
  enc = metadata.get('encoder') or {}
  mpp = metadata.get('mpp')
  target = metadata.get('target_mpp', enc.get('target_mpp'))
  px = patch_px or enc.get('patch_px')
  if mpp and target and px:
    return float(px) * float(target) / float(mpp)
  raise HeatmapError(
    'slide metadata has neither patch_level0_px nor mpp + target_mpp + patch_px '
    f'(keys: {sorted(metadata)})'
  )


def choose_level(slide, max_side: int) -> int:
  """The finest pyramid level whose longer side is at most `max_side` (else the coarsest)."""
  for level, (w, h) in enumerate(slide.level_dimensions):
    if max(w, h) <= max_side:
      return level
  return slide.level_count - 1


# --------------------------------------------------------------------------- rendering


@dataclasses.dataclass(frozen=True)
class HeatmapParams:
  """How to draw. `blur` is the Gaussian sigma in patch sides (0 = blocky patches)."""

  level: int | None = None  # pyramid level; None = choose_level(max_side)
  max_side: int = 4096
  max_pixels: int = 64_000_000  # refuse outputs larger than this (a level too fine)
  alpha: float = 0.5
  blur: float = 0.0
  cmap: str = 'jet'
  colorbar: bool = True  # a percentile colour bar to the right of the slide
  tissue_only: bool = True
  tissue: slides.TissueParams = slides.TissueParams()


def _lut(cmap: str) -> np.ndarray:
  import matplotlib

  return (matplotlib.colormaps[cmap](np.linspace(0, 1, 256))[:, :3] * 255).round().astype(np.uint8)


def read_level(slide, level: int, *, max_pixels: int = HeatmapParams.max_pixels) -> np.ndarray:
  """The whole slide at `level` as RGB uint8, read in strips (no RGBA copy of the whole level)."""
  w, h = slide.level_dimensions[level]
  if w * h > max_pixels:
    raise HeatmapError(
      f'level {level} is {w} x {h} px ({w * h / 1e6:.0f} MP), above max_pixels '
      f'{max_pixels / 1e6:.0f} MP; choose a coarser level (levels: {slide.level_dimensions})'
    )
  ds = float(slide.level_downsamples[level])
  out = np.empty((h, w, 3), np.uint8)
  for r0 in range(0, h, STRIP_PX):
    r1 = min(h, r0 + STRIP_PX)
    out[r0:r1] = slides.read_rgb(slide, (0, int(round(r0 * ds))), level, (w, r1 - r0))
  return out


def _accumulate(shape, xy, values, patch_l0, ds):
  """Mean of `values` over the (possibly overlapping) patches covering every output pixel."""
  h, w = shape
  total = np.zeros((h, w), np.float32)
  count = np.zeros((h, w), np.float32)
  x0 = np.clip(np.floor(xy[:, 0] / ds), 0, w).astype(np.int64)
  y0 = np.clip(np.floor(xy[:, 1] / ds), 0, h).astype(np.int64)
  x1 = np.clip(np.ceil((xy[:, 0] + patch_l0) / ds), 0, w).astype(np.int64)
  y1 = np.clip(np.ceil((xy[:, 1] + patch_l0) / ds), 0, h).astype(np.int64)
  for a, b, c, d, v in zip(x0, y0, x1, y1, values):
    total[b:d, a:c] += v
    count[b:d, a:c] += 1.0
  covered = count > 0
  np.divide(total, count, out=total, where=covered)
  return total, covered


def render(
  slide,
  xy: np.ndarray,
  percentile: np.ndarray,
  patch_l0: float,
  params: HeatmapParams = HeatmapParams(),
) -> tuple[np.ndarray, int]:
  """(RGB uint8 overlay at the chosen level, level). Memory ~ 20 bytes per output pixel."""
  xy = np.asarray(xy, np.float64).reshape(-1, 2)
  percentile = np.asarray(percentile, np.float32)
  if len(xy) != len(percentile):
    raise HeatmapError(f'{len(xy)} coordinates but {len(percentile)} scores')
  level = choose_level(slide, params.max_side) if params.level is None else int(params.level)
  if not 0 <= level < slide.level_count:
    raise HeatmapError(f'level {level} not in [0, {slide.level_count})')
  ds = float(slide.level_downsamples[level])
  canvas = read_level(slide, level, max_pixels=params.max_pixels)
  score, covered = _accumulate(canvas.shape[:2], xy, percentile, patch_l0, ds)
  if params.blur > 0:
    sigma = params.blur * patch_l0 / ds
    weight = covered.astype(np.float32)
    score *= weight
    score = cv2.GaussianBlur(score, (0, 0), sigma)
    weight = cv2.GaussianBlur(weight, (0, 0), sigma)
    np.divide(score, weight, out=score, where=weight > 1e-3)
    del weight
  draw = covered
  if params.tissue_only:
    draw &= slides.tissue_mask(canvas, params.tissue, patch_area_px=max((patch_l0 / ds) ** 2, 1.0))
  lut = _lut(params.cmap)
  for r0 in range(0, canvas.shape[0], STRIP_PX):
    rows = slice(r0, r0 + STRIP_PX)
    m = draw[rows]
    if not m.any():
      continue
    colour = lut[np.clip(score[rows][m] * 2.55, 0, 255).astype(np.uint8)].astype(np.float32)
    base = canvas[rows][m].astype(np.float32)
    strip = canvas[rows]
    strip[m] = np.clip((1 - params.alpha) * base + params.alpha * colour, 0, 255).astype(np.uint8)
  return canvas, level


def add_colorbar(image: np.ndarray, cmap: str = 'jet', label: str = 'percentile') -> np.ndarray:
  """The image with a white panel on its right holding the colour map, 0 (bottom) to 100."""
  h, w = image.shape[:2]
  panel_w = int(max(48, min(160, w // 8)))
  panel = np.full((h, panel_w, 3), 255, np.uint8)
  top, bottom = int(0.1 * h), int(0.9 * h)
  if bottom - top >= 2:
    ramp = np.linspace(255, 0, bottom - top).round().astype(np.uint8)  # 100 at the top
    bar = slice(panel_w // 8, panel_w // 8 + max(4, panel_w // 5))
    panel[top:bottom, bar] = _lut(cmap)[ramp][:, None, :]
    scale = max(0.3, min(1.0, h / 600))
    x = bar.stop + 3
    for frac, text in ((0.0, '100'), (0.5, '50'), (1.0, '0')):
      y = int(top + frac * (bottom - top - 1)) + int(4 * scale)
      cv2.putText(panel, text, (x, y), cv2.FONT_HERSHEY_SIMPLEX, 0.4 * scale, (0, 0, 0), 1)
    cv2.putText(
      panel, label, (2, max(top - 4, 10)), cv2.FONT_HERSHEY_SIMPLEX, 0.35 * scale, (0, 0, 0), 1
    )
  return np.concatenate([image, panel], 1)


def write_png(path: Path, rgb: np.ndarray) -> Path:
  ok, buf = cv2.imencode('.png', cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
  if not ok:
    raise HeatmapError(f'{path}: PNG encoding failed')
  store.atomic_write_bytes(Path(path), buf.tobytes())
  return Path(path)


# --------------------------------------------------------------------------- overlapping re-scoring


def read_patches(slide, xy: np.ndarray, patch_l0: float, patch_px: int) -> np.ndarray:
  """(n, patch_px, patch_px, 3) uint8 read as extraction reads them (level just finer, resized)."""
  level = slide.get_best_level_for_downsample((patch_l0 / patch_px) * 1.001)
  ds = float(slide.level_downsamples[level])
  side = max(1, int(round(patch_l0 / ds)))
  out = np.empty((len(xy), patch_px, patch_px, 3), np.uint8)
  for i, (x, y) in enumerate(np.asarray(xy, np.int64)):
    patch = slides.read_rgb(slide, (int(x), int(y)), level, (side, side))
    out[i] = (
      patch
      if side == patch_px
      else cv2.resize(
        patch,
        (patch_px, patch_px),
        interpolation=cv2.INTER_AREA if side > patch_px else cv2.INTER_LINEAR,
      )
    )
  return out


def half_step_neighbours(
  xy: np.ndarray, patch_l0: float, level0_size: tuple[int, int]
) -> np.ndarray:
  """Patch corners half a patch away from stored patches (8-neighbourhood), not stored, in bounds."""
  xy = np.asarray(xy, np.int64)
  step = patch_l0 / 2
  offsets = np.array([(dx, dy) for dx in (-1, 0, 1) for dy in (-1, 0, 1) if dx or dy]) * step
  cand = np.round(xy[:, None, :] + offsets[None]).reshape(-1, 2).astype(np.int64)
  w, h = level0_size
  ok = (cand >= 0).all(1) & (cand[:, 0] + patch_l0 <= w) & (cand[:, 1] + patch_l0 <= h)
  cand = np.unique(cand[ok], axis=0)
  stored = {tuple(p) for p in xy.tolist()}
  return np.array([p for p in cand.tolist() if tuple(p) not in stored], np.int64).reshape(-1, 2)


def rescore_overlapping(
  slide,
  xy: np.ndarray,
  raw_scores: np.ndarray,
  patch_l0: float,
  *,
  encoder: Callable[[np.ndarray], np.ndarray],
  score_fn: Callable[[np.ndarray], np.ndarray],
  patch_px: int,
  batch_size: int = 32,
  max_new: int = 20000,
) -> tuple[np.ndarray, np.ndarray]:
  """(xy, percentiles) of stored plus half-step patches, all ranked against the stored scores.

  encoder: uint8 patches (n, px, px, 3) -> raw features as the store holds them;
  score_fn: raw features -> raw attention scores of the trained model.
  """
  new_xy = half_step_neighbours(xy, patch_l0, slide.dimensions)
  if len(new_xy) > max_new:
    raise HeatmapError(
      f'overlapping re-scoring would embed {len(new_xy)} patches (> max_new '
      f'{max_new}); raise max_new or draw without overlap'
    )
  new_scores = []
  from tqdm.auto import tqdm

  for start in tqdm(
    range(0, len(new_xy), batch_size),
    desc='re-scoring half-step patches',
    unit='batch',
    leave=False,
  ):
    chunk = new_xy[start : start + batch_size]
    feats = encoder(read_patches(slide, chunk, patch_l0, patch_px))
    new_scores.append(np.asarray(score_fn(feats), np.float64).reshape(-1))
  new_scores = np.concatenate(new_scores) if new_scores else np.zeros(0)
  all_xy = np.concatenate([np.asarray(xy, np.int64), new_xy])
  all_pct = np.concatenate([percentiles(raw_scores), percentiles(raw_scores, new_scores)])
  logging.info('overlap: %d stored + %d half-step patches', len(xy), len(new_xy))
  return all_xy, all_pct


# --------------------------------------------------------------------------- top-k tiles


def save_top_tiles(
  slide,
  slide_id: str,
  xy: np.ndarray,
  raw_scores: np.ndarray,
  patch_l0: float,
  out_dir: Path,
  *,
  k: int = 8,
  patch_px: int = 256,
) -> pd.DataFrame:
  """The k most attended patches as PNG tiles named with their level-0 corner, plus a CSV."""
  store.validate_id(slide_id, what='slide_id')
  out_dir = Path(out_dir)
  out_dir.mkdir(parents=True, exist_ok=True)
  raw_scores = np.asarray(raw_scores, np.float64)
  pct = percentiles(raw_scores)
  order = np.argsort(-raw_scores, kind='stable')[:k]
  tiles = read_patches(slide, np.asarray(xy)[order], patch_l0, patch_px)
  rows = []
  for rank, (i, tile) in enumerate(zip(order, tiles), start=1):
    x, y = int(xy[i][0]), int(xy[i][1])
    name = f'{slide_id}_top{rank:02d}_x{x}_y{y}.png'
    write_png(out_dir / name, tile)
    rows.append(
      {
        'slide_id': slide_id,
        'rank': rank,
        'row': int(i),
        'x': x,
        'y': y,
        'size_level0': float(patch_l0),
        'raw_score': float(raw_scores[i]),
        'percentile': float(pct[i]),
        'file': name,
      }
    )
  frame = pd.DataFrame(rows)
  store.atomic_write_bytes(out_dir / f'{slide_id}_top{k}.csv', frame.to_csv(index=False).encode())
  return frame


# --------------------------------------------------------------------------- one slide, end to end


def slide_heatmap(
  slide_path: Path | str,
  slide_id: str,
  xy: np.ndarray,
  raw_scores: np.ndarray,
  patch_l0: float,
  out_png: Path,
  *,
  params: HeatmapParams = HeatmapParams(),
  rescore: dict | None = None,
  tiles_dir: Path | None = None,
  top_k: int = 8,
  patch_px: int = 256,
) -> dict:
  """Draws one slide's heatmap (and its top-k tiles); returns what was written.

  rescore: None, or {"encoder": ..., "score_fn": ...} for overlapping re-scoring.
  """
  xy = np.asarray(xy)
  raw_scores = np.asarray(raw_scores, np.float64)
  if len(xy) == 0:
    raise HeatmapError(f'{slide_id}: no patches in the store')
  slide = slides.open_slide(slide_path)
  try:
    if rescore:
      draw_xy, pct = rescore_overlapping(
        slide, xy, raw_scores, patch_l0, patch_px=patch_px, **rescore
      )
    else:
      draw_xy, pct = xy, percentiles(raw_scores)
    image, level = render(slide, draw_xy, pct, patch_l0, params)
    if params.colorbar:
      image = add_colorbar(image, params.cmap)
    write_png(out_png, image)
    out = {
      'slide_id': slide_id,
      'png': Path(out_png),
      'level': level,
      'size': (image.shape[1], image.shape[0]),
      'patches': int(len(draw_xy)),
    }
    del image
    if tiles_dir is not None and top_k > 0:
      out['tiles'] = save_top_tiles(
        slide, slide_id, xy, raw_scores, patch_l0, tiles_dir, k=top_k, patch_px=patch_px
      )
    return out
  finally:
    slide.close()


# --------------------------------------------------------------------------- a trained run


@dataclasses.dataclass
class SlideAttention:
  slide_id: str
  xy: np.ndarray  # (n, 2) level-0 corners
  raw_scores: np.ndarray  # (n,) attention scores before the softmax
  metadata: dict


@dataclasses.dataclass
class TrainedRun:
  """A trained model (from its bundle) with the patients of a feature store.

  Built from the run's model bundle: the model sees exactly the normalisation it was trained
  with, on the training store or on any store made with the same encoder and settings.
  """

  workdir: Path
  config: object
  store_dir: Path
  cohort: object
  device_data: object
  model: object
  mri_mean: np.ndarray
  mri_std: np.ndarray
  slide_table: pd.DataFrame  # slide_id, patient_id, path, n in bag order

  def patient_index(self, patient_id: str) -> int:
    hits = np.flatnonzero(self.cohort.patient_id == patient_id)
    if not len(hits):
      raise KeyError(f'patient {patient_id!r} is not in {self.store_dir}/clinical.parquet')
    return int(hits[0])

  def patient_inputs(self, patient_id: str) -> dict:
    """Model inputs (batch of 1, whole bag, same gather as training) for one patient."""
    import jax.numpy as jnp

    from moemil_jax import batching

    i = self.patient_index(patient_id)
    counts = (
      self.cohort.patch_count
      if 'wsi' in self.config.model.modalities
      else np.zeros_like(self.cohort.patch_count)
    )
    batch = batching.patient_batch(i, counts[i], batching.bag_layout(self.cohort.patch_count))
    inputs, _ = batching.gather_inputs(
      self.device_data.tree(), batch.tree(), jnp.dtype(self.config.model.compute_dtype)
    )
    return inputs

  @property
  def scores_patches(self) -> bool:
    return self.model.wsi is not None or self.model.wsi_vector is not None

  def _slide_vector_gradient(self, patient_id: str, task: str) -> np.ndarray:
    """(W,) gradient of the task output in the patient's prototype slide vector: the weights
    of its linearisation (exact for the linear slide terms)."""
    import jax
    import jax.numpy as jnp

    inputs = self.patient_inputs(patient_id)
    key = 'response_logit' if task == 'response' else 'log_risk'

    def output(summary):
      return self.model(dict(inputs, wsi_summary=summary), rngs=None)[key][0]

    return np.asarray(jax.grad(output)(jnp.asarray(inputs['wsi_summary'])), np.float64)[0]

  def _bag(self, patient_id: str) -> np.ndarray:
    from moemil_jax import prototypes

    return prototypes.bags_of(self.cohort, [self.patient_index(patient_id)])[0]

  def slide_attention(self, patient_id: str, task: str = 'response') -> list[SlideAttention]:
    """A score for every stored patch of the patient, slide by slide: the raw attention score
    (attention pathway; also for 'both'), or, for the prototype pathway, the patch's exact share
    of the task output's linearisation in the slide vector (`prototypes.patch_contributions`:
    positive pushes towards response, or higher risk)."""
    n = int(self.cohort.patch_count[self.patient_index(patient_id)])
    if self.model.wsi is not None:
      out = _forward(self.model, self.patient_inputs(patient_id))
      scores = np.asarray(out['attention_scores'][0, :n], np.float64)
    elif self.model.wsi_vector is not None:
      weights = self._slide_vector_gradient(patient_id, task)
      protos = self.device_data.fitted.slide_prototypes
      scores = protos.patch_contributions(self._bag(patient_id), weights).astype(np.float64)
    else:
      raise HeatmapError(f'model {self.config.name!r} has no WSI branch')
    result, start = [], 0
    for row in self.slide_table[self.slide_table.patient_id == patient_id].itertuples():
      table = pq.read_table(row.path, columns=['x', 'y'])
      xy = np.stack([table.column('x').to_numpy(), table.column('y').to_numpy()], 1)
      result.append(
        SlideAttention(
          row.slide_id, xy, scores[start : start + row.n], store.table_metadata(Path(row.path))
        )
      )
      start += row.n
    if start != n:
      raise HeatmapError(f'patient {patient_id}: {n} patches in the bag but {start} in its slides')
    return result

  def patch_scorer(
    self, patient_id: str | None = None, task: str = 'response'
  ) -> Callable[[np.ndarray], np.ndarray]:
    """Raw store features (n, d) -> scores on the scale of `slide_attention`: raw attention
    scores as inside the trained WSI branch, or (prototype pathway) shares of the patient's
    task output, as if each patch sat in the patient's stored bag."""
    import jax
    import jax.numpy as jnp

    if self.model.wsi is None and self.model.wsi_vector is not None:
      if patient_id is None:
        raise HeatmapError('the prototype pathway scores patches for one patient: name it')
      weights = self._slide_vector_gradient(patient_id, task)
      protos, bag = self.device_data.fitted.slide_prototypes, self._bag(patient_id)
      return lambda feats: protos.patch_contributions(feats, weights, reference=bag)

    wsi = self.model.wsi
    mean, inv_std = self.device_data.patch_mean, self.device_data.patch_inv_std
    dtype = jnp.dtype(self.config.model.compute_dtype)

    def score(feats):
      x = ((jnp.asarray(feats, jnp.float16).astype(jnp.float32) - mean) * inv_std).astype(dtype)
      return np.asarray(wsi.attention(jax.nn.relu(wsi.fc(x))), np.float64)

    return score


def _forward(model, inputs):
  from flax import nnx

  global _JIT_FORWARD
  if _JIT_FORWARD is None:
    _JIT_FORWARD = nnx.jit(lambda m, x: m(x, rngs=None))
  return _JIT_FORWARD(model, inputs)


_JIT_FORWARD = None


def load_run(workdir: str | Path, store_dir: str | Path | None = None) -> TrainedRun:
  """A trained run's model (member 0 of an ensemble) from its bundle, with the patients of
  `store_dir` (default: the store it was trained on) preprocessed as in training."""
  from moemil_jax import predict

  workdir = Path(workdir)
  trained = predict.load_bundle(workdir)
  config, members, member = trained.config, trained.members, trained.members[0]
  store_dir = Path(store_dir or trained.meta['trained_on']['store'])
  cohort = trained.load(store_dir)  # refuses a store made otherwise
  device_data, model = predict.member_model(config, member, cohort)
  if len(members) > 1:
    logging.info(
      '%s is an ensemble of %d: explaining member %s', workdir, len(members), member.name
    )
  rows = []
  for path in store.slide_files(store_dir):
    t = pq.read_table(path, columns=['patient_id'])
    if len(t):
      rows.append(
        {
          'slide_id': path.stem,
          'patient_id': t.column('patient_id')[0].as_py(),
          'path': str(path),
          'n': len(t),
        }
      )
  slide_table = pd.DataFrame(rows, columns=['slide_id', 'patient_id', 'path', 'n'])
  logging.info('restored %s (%s) from %s', config.name, member.name, workdir)
  return TrainedRun(
    workdir,
    config,
    store_dir,
    cohort,
    device_data,
    model,
    member.fitted.deep_mean.astype(np.float32),
    member.fitted.deep_std.astype(np.float32),
    slide_table,
  )
