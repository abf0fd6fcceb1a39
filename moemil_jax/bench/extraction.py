"""P4: slide extraction throughput against its two bounds.

Three ways through the same slides, same ResNet50 trunk (random weights: speed does not
depend on them), same batch size, same device:
  - end to end: `feature_store.extract.extract_slide` (open, tissue filter, blocked reads
    decoded by worker threads ahead of the model, model, atomic Parquet write);
  - encoder only: the same patches already in memory, straight through the encoder;
  - naive: one `read_region` per patch in the main thread, then the encoder, as CLAM's
    Whole_Slide_Bag_FP does.
Figures: end-to-end / encoder-only patches/s (how much of the model's speed the pipeline
keeps) and end-to-end / naive; the read path alone (ours against one read_region per
patch, no model) shows where the pipeline's advantage lives when the model dominates.

Stain normalisation (issue 28): end to end with each normalisation (Macenko, Reinhard;
per patch, per slide and per center; histogram matching per center) on the encoder's
device (target fitted on the first slide's patches) against the same run without,
alternated `stain_repeats` times each so that a busy machine slows both alike; the figure
is the ratio of the median patches/s (on / off), and P4 with it on (encoder-only / end to
end with normalisation).
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch
from absl import logging

from feature_store import encoders, extract, slides, stain, synthetic_cohort
from feature_store import manifest as manifest_lib

AUGMENT_VIEWS = 2  # stain augmentation's views per patch in the comparison (--stain_augment)


def _slides(root: Path, patients: int, slide_px: int, seed: int = 0) -> list[tuple[str, str, Path]]:
  manifest = root / 'cohort' / synthetic_cohort.MANIFEST
  if not manifest.exists():
    synthetic_cohort.make_cohort(
      root / 'cohort',
      patients=patients,
      seed=seed,
      slide_px=slide_px,
      mri_px=32,
      mri_slices=4,
      progress=False,
    )
  man = manifest_lib.read_manifest(manifest)
  return [(s.slide_id, p.patient_id, Path(s.path)) for p in man.patients for s in p.slides]


def _naive_patches(slide, plan: slides.PatchPlan, start: int, stop: int) -> np.ndarray:
  """CLAM-style: one read_region per patch, RGBA -> RGB, resize to patch_px."""
  out = []
  for x, y in plan.xy[start:stop]:
    rgb = slides.read_rgb(slide, (int(x), int(y)), plan.read_level, (plan.read_px, plan.read_px))
    if plan.read_px != plan.patch_px:
      rgb = cv2.resize(rgb, (plan.patch_px, plan.patch_px), interpolation=cv2.INTER_AREA)
    out.append(rgb)
  return np.stack(out)


def _read_ours(path: Path, cfg: extract.ExtractConfig) -> list[np.ndarray]:
  slide = slides.open_slide(path)
  try:
    plan = extract.plan_patches(slide, cfg, None)
    return [
      p
      for _, p in slides.iter_patch_batches(
        slide, plan, batch_size=cfg.batch_size, workers=cfg.workers, block=extract.READ_BLOCK
      )
    ]
  finally:
    slide.close()


def _read_naive(path: Path, cfg: extract.ExtractConfig) -> list[np.ndarray]:
  slide = slides.open_slide(path)
  try:
    plan = extract.plan_patches(slide, cfg, None)
    return [
      _naive_patches(slide, plan, i, i + cfg.batch_size)
      for i in range(0, len(plan.xy), cfg.batch_size)
    ]
  finally:
    slide.close()


def _stain_comparison(
  items, encoder, cfg, fp, sha, out_dir: Path, device: str, repeats: int, methods
) -> dict[str, Any]:
  """Median end-to-end patches/s with each normalisation method and without, alternated."""
  sync = (lambda: torch.cuda.synchronize()) if device.startswith('cuda') else (lambda: None)
  patches = np.concatenate(_read_ours(items[0][2], cfg))
  augment = f'augment{AUGMENT_VIEWS}'
  times: dict[str, list[float]] = {'none': [], **{m: [] for m in methods}, augment: []}
  normalisers = {'none': None}
  # 'macenko', or 'macenko_slide' / 'macenko_center' for the other scopes. The center's stain
  # is the first slide's, fitted once per extraction as the target is, and set up (Reinhard:
  # its colour table) before the timed runs; the setup's seconds are reported beside them.
  center_stain, setup_s = {}, {}
  for m in methods:
    method, _, scope = m.partition('_')
    target = stain.fit_target(patches, method, 'bench: first slide', device=device)
    normalisers[m] = stain.Normaliser(target, device, scope or 'patch')
    center_stain[m] = target
    if scope == 'center':
      start = time.perf_counter()
      normalisers[m].use_stain(target)
      sync()
      setup_s[m] = time.perf_counter() - start
  augmenter = stain.Augmenter(stain.AugmentParams(views=AUGMENT_VIEWS), device)
  total = fallbacks = 0
  for _ in range(repeats):
    for name in [*normalisers, augment]:
      norm = normalisers.get(name)
      start = time.perf_counter()
      n = 0
      for slide_id, patient_id, path in items:
        n += extract.extract_slide(
          path,
          slide_id,
          patient_id,
          out_dir,
          encoder,
          cfg,
          {**fp, 'stain_augment': augmenter.params.fingerprint()} if name == augment else fp,
          sha,
          normaliser=norm,
          augmenter=augmenter if name == augment else None,
          center_stain=center_stain.get(name),
        )
      sync()
      times[name].append(n / (time.perf_counter() - start))
      total = n
      if norm is not None:
        fallbacks = norm.pop_fallbacks()
  median = {k: float(np.median(v)) for k, v in times.items()}
  # The normaliser's own cost beside the encoder's, on the same in-memory patches (batches
  # as extraction forms them), alternated: less at the mercy of a busy machine than the
  # end-to-end runs; the ratio it implies is 1 / (1 + normaliser s / encoder s).
  batches = [patches[i : i + cfg.batch_size] for i in range(0, len(patches), cfg.batch_size)]
  cost: dict[str, list[float]] = {'encoder': [], **{m: [] for m in methods}}
  for _ in range(repeats):
    start = time.perf_counter()
    for b in batches:
      encoder(b)
    sync()
    cost['encoder'].append(time.perf_counter() - start)
    for m in methods:
      x = [torch.from_numpy(b).to(device) for b in batches]
      norm = normalisers[m]
      sync()
      start = time.perf_counter()
      if norm.scope == 'slide':  # the slide's own stain, from up to 64 of its patches
        sample = torch.from_numpy(patches[:: max(1, len(patches) // 64)][:64]).to(device)
        norm.start_slide([stain.estimate(sample, norm.target.method, norm.params)])
      elif norm.scope == 'center':
        norm.use_stain(center_stain[m])
      for b in x:
        norm(b)
      sync()
      cost[m].append(time.perf_counter() - start)
  out = {
    'stain_repeats': repeats,
    'stain_patches_per_s': {k: [round(x, 3) for x in v] for k, v in times.items()},
    'stain_median_patches_per_s': median,
    'stain_patches': total,
    'stain_fallback_patches_last_run': fallbacks,
  }
  for m in methods:
    out[f'stain_ratio_{m}'] = median[m] / median['none']
    share = float(np.median(cost[m]) / np.median(cost['encoder']))
    out[f'stain_cost_vs_encoder_{m}'] = share
    out[f'stain_implied_ratio_{m}'] = 1.0 / (1.0 + share)
  out['stain_cost_patches'] = len(patches)
  out['stain_center_setup_s'] = setup_s
  # Augmentation encodes K + 1 images per patch: patches/s falls to about 1 / (K + 1) at best.
  out['augment_views'] = AUGMENT_VIEWS
  out['augment_ratio'] = median[augment] / median['none']
  out['augment_images_ratio'] = out['augment_ratio'] * (AUGMENT_VIEWS + 1)
  return out


def run(
  quick: bool = False,
  workdir: str | Path | None = None,
  device: str = 'cpu',
  stain_methods: tuple[str, ...] = (
    'macenko',
    'reinhard',
    'macenko_slide',
    'reinhard_slide',
    'macenko_center',
    'reinhard_center',
    'histogram_center',
  ),
  stain_repeats: int | None = None,
) -> dict[str, Any]:
  root = Path(workdir or tempfile.mkdtemp(prefix='moemil_bench_extract_'))
  patients, slide_px, max_slides = (4, 1536, 1) if quick else (4, 2048, 4)
  batch = 16
  items = _slides(root / f'extract_{patients}_{slide_px}', patients, slide_px)[:max_slides]
  cfg = extract.ExtractConfig(device=device, batch_size=batch, workers=4, encoder_weights='random')
  encoder = encoders.Encoder('wsi', 'random', device)
  fp = {'encoder': encoder.fingerprint, 'bench': True}
  sha = extract.fingerprint_sha(fp)
  sync = (lambda: torch.cuda.synchronize()) if device.startswith('cuda') else (lambda: None)

  # Warm-up: every batch length the slides will produce goes through the encoder once
  # (allocations and kernel selection per shape), so no path pays it alone.
  lengths = set()
  for _, _, path in items:
    slide = slides.open_slide(path)
    n = len(extract.plan_patches(slide, cfg, None).xy)
    slide.close()
    lengths |= {min(batch, n)} | ({n % batch} if n % batch else set())
  for n in sorted(lengths):
    encoder(np.zeros((n, cfg.patch_px, cfg.patch_px, 3), np.uint8))

  out_dir = Path(tempfile.mkdtemp(prefix='store_', dir=root))
  start = time.perf_counter()
  patches = 0
  for slide_id, patient_id, path in items:
    patches += extract.extract_slide(path, slide_id, patient_id, out_dir, encoder, cfg, fp, sha)
  sync()
  e2e_s = time.perf_counter() - start

  # The same patches, decoded beforehand, through the encoder alone.
  start = time.perf_counter()
  in_memory = [b for _, _, path in items for b in _read_ours(path, cfg)]
  ours_read_s = time.perf_counter() - start
  start = time.perf_counter()
  for b in in_memory:
    encoder(b)
  sync()
  encoder_s = time.perf_counter() - start
  assert sum(len(b) for b in in_memory) == patches, 'read path and extract_slide disagree'

  start = time.perf_counter()
  naive_batches = [b for _, _, path in items for b in _read_naive(path, cfg)]
  naive_read_s = time.perf_counter() - start
  start = time.perf_counter()
  for b in naive_batches:  # CLAM: read a batch, then run the model on it (no overlap)
    encoder(b)
  sync()
  naive_s = naive_read_s + time.perf_counter() - start

  stain_result = _stain_comparison(
    items,
    encoder,
    cfg,
    fp,
    sha,
    out_dir,
    device,
    stain_repeats or (1 if quick else 3),
    stain_methods,
  )
  result = {
    **stain_result,
    'slides': len(items),
    'patches': patches,
    'batch_size': batch,
    'device': device,
    'encoder': 'resnet50-layer3 (random weights)',
    'end_to_end_patches_per_s': patches / e2e_s,
    'encoder_only_patches_per_s': patches / encoder_s,
    'naive_patches_per_s': patches / naive_s,
    'ratio_to_encoder': encoder_s / e2e_s,
    'speedup_vs_naive': naive_s / e2e_s,
    'read_only_patches_per_s': patches / ours_read_s,
    'naive_read_only_patches_per_s': patches / naive_read_s,
    'read_speedup_vs_naive': naive_read_s / ours_read_s,
    'torch_threads': torch.get_num_threads(),
  }
  for m in stain_methods:  # P4 with normalisation on: the same ratio, scaled by on / off
    result[f'ratio_to_encoder_{m}'] = result['ratio_to_encoder'] * result[f'stain_ratio_{m}']
  logging.info('P4: %s', result)
  return result
