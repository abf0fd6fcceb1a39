r"""Extracts slide-patch and MRI features once into a Parquet feature store.

  python -m launch.extract --manifest=cohort/manifest.csv --store=store/ \
      --device=cuda --batch_size=256 --workers=8

Rerunning the same command resumes: finished slides and MRI are skipped. Shards:
--shard_index/--num_shards, or torchrun's RANK/WORLD_SIZE when the flags are left at their
defaults. The last line reads `N patients extracted, K rejected, F failed`. Exit status 0 when
every manifest row was valid and every item extracted (or --keep_going); 1 when rows were
rejected or items failed (the log names each, failures.parquet records them); 2 when nothing
could start (no valid row, a store made with another fingerprint, weights unavailable,
unreadable manifest); 130 when interrupted (the store stays intact: rerun to resume).
"""

from __future__ import annotations

import os
import sys

from absl import flags, logging

from launch import cli

EXAMPLE = '--manifest=cohort/manifest.csv --store=store/ [--device=cuda --batch_size=256]'

_MANIFEST = flags.DEFINE_string('manifest', None, 'Cohort manifest CSV.', required=True)
_STORE = flags.DEFINE_string('store', None, 'Feature store directory.', required=True)
_DEVICE = flags.DEFINE_string('device', 'auto', 'torch device: auto, cpu, cuda, cuda:1, ...')
_BATCH = flags.DEFINE_integer('batch_size', 64, 'Patches per encoder batch.')
_WORKERS = flags.DEFINE_integer('workers', 4, 'Threads reading and decoding slide regions.')
_TARGET_MPP = flags.DEFINE_float('target_mpp', 0.5, 'Patch resolution in um/px (0.5 ~ 20x).')
_PATCH_PX = flags.DEFINE_integer(
  'patch_px', 256, 'Patch side in px at target_mpp (resized to 224).'
)
_WEIGHTS = flags.DEFINE_string(
  'encoder_weights',
  'imagenet',
  "'imagenet', 'random' (not pretrained; tests only), a state_dict file, "
  "or 'auto': imagenet when its weights are in the torch cache, else random.",
)
_RADIOMICS = flags.DEFINE_string(
  'radiomics_params', None, 'PyRadiomics YAML; default feature_store/params/mr_default.yaml.'
)
_MRI_SLICES = flags.DEFINE_integer(
  'mri_slices', 5, 'Axial slices with the largest tumour area per sequence.'
)
_SHARD_INDEX = flags.DEFINE_integer(
  'shard_index', None, "This process's shard (default: $RANK or 0)."
)
_SHARD_COUNT = flags.DEFINE_integer(
  'num_shards', None, 'Number of shards (default: $WORLD_SIZE or 1).'
)
_FALLBACK_MPP = flags.DEFINE_float('fallback_mpp', None, 'um/px for slides that do not record it.')
_OVERWRITE = flags.DEFINE_bool(
  'overwrite', False, 'Replace features made with another fingerprint.'
)
_SATURATION = flags.DEFINE_integer(
  'tissue_saturation', 8, 'Saturation threshold (floor under Otsu).'
)
_OTSU = flags.DEFINE_bool('tissue_otsu', True, 'Otsu threshold on saturation (else the fixed one).')
_MEDIAN = flags.DEFINE_integer('tissue_median', 7, 'Median blur kernel (odd).')
_CLOSE = flags.DEFINE_integer('tissue_close', 4, 'Morphological closing kernel (mask px).')
_MIN_AREA = flags.DEFINE_float(
  'tissue_min_area', 1.0, 'Smallest tissue piece kept, in patch areas.'
)
_MIN_HOLE = flags.DEFINE_float(
  'tissue_min_hole', 0.25, 'Holes smaller than this are filled, in patch areas.'
)
_MIN_PATCH = flags.DEFINE_float(
  'tissue_fraction', 0.5, 'Keep a patch with at least this tissue fraction.'
)
_PEN = flags.DEFINE_bool(
  'tissue_pen_filter', True, 'Drop blue, green and black marker ink from tissue.'
)
_PRUNE = flags.DEFINE_bool(
  'prune',
  False,
  'Remove the store files of patients no longer in the manifest (one log line each); '
  'without it they are kept, with a warning, and training ignores them.',
)
_KEEP_GOING = flags.DEFINE_bool(
  'keep_going',
  False,
  'Exit 0 when some manifest rows were rejected or some items failed (they are still logged '
  'and recorded in failures.parquet); without it such a run exits 1.',
)


def _device(name: str) -> str:
  import torch

  if name == 'auto':
    return 'cuda' if torch.cuda.is_available() else 'cpu'
  return name


def main(argv):
  if len(argv) > 1:
    raise cli.UserError(f'unexpected arguments {argv[1:]}: flags take the form --name=value')
  from feature_store import encoders, extract, slides

  shard_index = (
    _SHARD_INDEX.value if _SHARD_INDEX.value is not None else int(os.environ.get('RANK', 0))
  )
  shard_count = (
    _SHARD_COUNT.value if _SHARD_COUNT.value is not None else int(os.environ.get('WORLD_SIZE', 1))
  )
  if not 0 <= shard_index < shard_count:
    raise cli.UserError(f'--shard_index={shard_index} must be in [0, --num_shards={shard_count})')
  device = _device(_DEVICE.value)
  weights = _WEIGHTS.value
  if weights == 'auto':
    weights = 'imagenet' if encoders.imagenet_cached() else 'random'
    if weights == 'imagenet':  # 'random' says so once, when the encoder is built
      print('encoder weights: imagenet (found in the torch cache)')
  if device == 'cuda' and 'LOCAL_RANK' in os.environ:  # torchrun: one GPU per local process
    device = f'cuda:{os.environ["LOCAL_RANK"]}'
  cfg = extract.ExtractConfig(
    device=device,
    batch_size=_BATCH.value,
    workers=_WORKERS.value,
    target_mpp=_TARGET_MPP.value,
    patch_px=_PATCH_PX.value,
    encoder_weights=weights,
    radiomics_params=_RADIOMICS.value,
    mri_slices=_MRI_SLICES.value,
    shard_index=shard_index,
    shard_count=shard_count,
    fallback_mpp=_FALLBACK_MPP.value,
    overwrite=_OVERWRITE.value,
    prune=_PRUNE.value,
    tissue=slides.TissueParams(
      sthresh=_SATURATION.value,
      mthresh=_MEDIAN.value,
      close=_CLOSE.value,
      use_otsu=_OTSU.value,
      min_tissue_area=_MIN_AREA.value,
      min_hole_area=_MIN_HOLE.value,
      min_patch_tissue=_MIN_PATCH.value,
      pen_filter=_PEN.value,
    ),
  )
  logging.info('extracting on %s, shard %d of %d', device, shard_index + 1, shard_count)
  summary = extract.extract(_MANIFEST.value, _STORE.value, cfg)
  print(
    f'extracted {summary.slides_done} slides ({summary.patches} patches), skipped '
    f'{summary.slides_skipped}; MRI {summary.mri_done} patients, skipped {summary.mri_skipped}; '
    f'{summary.failed} failed'
  )
  print(summary_line(summary, _STORE.value), flush=True)
  if (summary.rejected or summary.failed) and not _KEEP_GOING.value:
    sys.exit(cli.EXIT_FAILURES)


def summary_line(summary, store: str) -> str:
  """`N patients extracted, K rejected, F failed: see STORE/failures.parquet`."""
  line = (
    f'{summary.patients} patients extracted, {summary.rejected} rejected, {summary.failed} failed'
  )
  if summary.orphans:
    line += f'; {len(summary.orphans)} in the store but no longer in the manifest: ' + (
      'pruned' if summary.pruned else 'kept, --prune removes them'
    )
  if not summary.finalised:
    return line + ' in this shard; store not assembled yet (other shards are still running)'
  if summary.rejected or summary.failed:
    line += f': see {os.path.join(store, "failures.parquet")}'
  return line


def run():
  cli.run(
    main,
    example=EXAMPLE,
    interrupted='interrupted: the store is intact (every finished slide and MRI is kept); '
    'run the same command again to resume',
  )


if __name__ == '__main__':
  run()
