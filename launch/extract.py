r"""Extracts slide-patch and MRI features once into a Parquet feature store.

  python -m launch.extract --manifest=cohort/manifest.csv --store=store/ --device=cuda
  python -m launch.extract ... --wsi_encoder=uni            # or virchow2, timm:<model>, ...
  python -m launch.extract --store=store/ --upgrade_store   # schema-1 store -> fast layout

Rerunning the same command resumes: finished slides and MRI are skipped. Shards:
--shard_index/--num_shards, or torchrun's RANK/WORLD_SIZE when the flags are left at their
defaults. The last line reads `N patients extracted, K rejected, F failed`. Exit status 0 when
every manifest row was valid and every item extracted (or --keep_going); 1 when rows were
rejected or items failed (the log names each, failures.parquet records them); 2 when nothing
could start (no valid row, a store made with another fingerprint, weights unavailable,
unreadable manifest); 130 when interrupted (the store stays intact: rerun to resume).

Slide resolution (level-0 um/px), first found: the manifest's optional `mpp` column, the
slide's own MPP, 10 / its objective power (--mpp_from_objective), --fallback_mpp. Each slide
file records it as `mpp` and `mpp_source`; giving or changing the fallback re-extracts only
the slides that use it.
"""

from __future__ import annotations

import os
import sys

from absl import flags, logging

from launch import cli

EXAMPLE = '--manifest=cohort/manifest.csv --store=store/ [--device=cuda --wsi_encoder=uni]'

_MANIFEST = flags.DEFINE_string('manifest', None, 'Cohort manifest CSV.')
_STORE = flags.DEFINE_string('store', None, 'Feature store directory.', required=True)
_DEVICE = flags.DEFINE_string('device', 'auto', 'torch device: auto, cpu, cuda, cuda:1, ...')
_BATCH = flags.DEFINE_integer(
  'batch_size', 0, 'Patches per encoder batch (0: 256 on CUDA, 64 on a CPU).'
)
_WORKERS = flags.DEFINE_integer(
  'workers', 0, 'Threads reading and decoding slide regions (0: the CPU count).'
)
_WSI_ENCODER = flags.DEFINE_string(
  'wsi_encoder',
  'resnet50_trunc',
  'Slide patch encoder: resnet50_trunc, uni, uni2-h, virchow2, h-optimus-0, h-optimus-1, '
  'prov-gigapath, or timm:<model name> (BUILD.md, "Slide encoders").',
)
_WSI_WEIGHTS = flags.DEFINE_string(
  'wsi_encoder_weights',
  None,
  "Slide encoder weights: 'hub' (Hugging Face cache or hub; gated models need your token), "
  "'random' (tests only) or a local file; default: --encoder_weights.",
)
_ENCODER_KWARGS = flags.DEFINE_string(
  'encoder_kwargs', None, 'JSON kwargs for a timm:<model> encoder, e.g. \'{"img_size": 224}\'.'
)
_PRECISION = flags.DEFINE_enum(
  'precision',
  'auto',
  ['auto', 'fp32', 'fp16', 'bf16'],
  "Encoder precision (auto: the encoder's own on CUDA, fp32 on a CPU); in the fingerprint.",
)
_UPGRADE = flags.DEFINE_bool(
  'upgrade_store',
  False,
  'Convert a schema-1 store in place to the fast schema-2 layout (file by file, atomically) '
  'and exit; needs only --store.',
)
_TARGET_MPP = flags.DEFINE_float('target_mpp', 0.5, 'Patch resolution in um/px (0.5 ~ 20x).')
_PATCH_PX = flags.DEFINE_integer(
  'patch_px', 256, 'Patch side in px at target_mpp (resized to 224).'
)
_WEIGHTS = flags.DEFINE_string(
  'encoder_weights',
  'imagenet',
  "MRI ResNet50 (and slide encoder) weights: 'imagenet' (= 'hub'), 'random' (not "
  "pretrained; tests only), a state_dict file, or 'auto': imagenet when its weights are in "
  'the torch cache, else random.',
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
_FALLBACK_MPP = flags.DEFINE_float(
  'fallback_mpp',
  None,
  'um/px of the slides that record no MPP and have none in the manifest (about 0.25 for a 40x '
  "scan, 0.5 for 20x); in those slides' fingerprint only, recorded as mpp_source=fallback.",
)
_MPP_FROM_OBJECTIVE = flags.DEFINE_bool(
  'mpp_from_objective',
  False,
  'Slides that record no MPP: take 10 / their objective power (20x: 0.5, 40x: 0.25 um/px), '
  'before --fallback_mpp; recorded as mpp_source=objective.',
)
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
_STAIN_NORM = flags.DEFINE_enum(
  'stain_norm',
  'none',
  ['none', 'macenko', 'reinhard', 'histogram'],
  'Stain-normalise slide patches on the extraction device before the encoder (docs/stain.md); '
  'in the slide fingerprint: changing it re-extracts the slides (with --overwrite), not MRI.',
)
_STAIN_REFERENCE = flags.DEFINE_string(
  'stain_reference',
  None,
  'With --stain_norm: an H&E image (PNG, JPEG, TIFF) whose stain is the target; default: a '
  "pooled estimate over a sample of the development center's tissue patches.",
)
_STAIN_FIT_CENTERS = flags.DEFINE_list(
  'stain_fit_centers',
  [],
  'With --stain_norm and no --stain_reference: the centers whose patches the target is fitted '
  'on (default: every center but the second by name, the external one training holds out).',
)
_STAIN_SCOPE = flags.DEFINE_enum(
  'stain_scope',
  'patch',
  ['patch', 'slide', 'center'],
  "With --stain_norm: map each patch from its own stain (patch), from its slide's (slide: "
  "pooled over a sample of the slide's patches), or from its hospital's (center: pooled over "
  "a sample of the center's slides, as the target is). The wider the scope, the more of the "
  'differences between patches and patients survive. In the slide fingerprint.',
)
_STAIN_SLIDE_PATCHES = flags.DEFINE_integer(
  'stain_slide_patches',
  64,
  "With --stain_scope=slide: the patches (evenly spread) a slide's stain is estimated from.",
  lower_bound=1,
)
_STAIN_AUGMENT = flags.DEFINE_integer(
  'stain_augment',
  0,
  'Stain augmentation for training (docs/stain.md): also store K embeddings per patch of '
  'HED-jittered copies (the slide files grow (K + 1)-fold); training draws one view per epoch '
  'with --config.data.stain_views=K. 0: off. In the slide fingerprint.',
  lower_bound=0,
)
_STAIN_AUGMENT_SCALE = flags.DEFINE_float(
  'stain_augment_scale', 0.05, 'With --stain_augment: HED scale alpha ~ U(1 - s, 1 + s).'
)
_STAIN_AUGMENT_SHIFT = flags.DEFINE_float(
  'stain_augment_shift',
  0.05,
  'With --stain_augment: HED shift beta ~ U(-b, b), in optical density (natural log).',
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
  import json

  from feature_store import encoders, extract, manifest, slides, store

  if _UPGRADE.value:
    n = store.upgrade_store(_STORE.value)
    print(f'{_STORE.value}: {n} slide file(s) converted; schema {store.SCHEMA_VERSION}')
    return
  if not _MANIFEST.value:
    raise cli.UserError('--manifest is required (except with --upgrade_store)')
  kwargs = None
  if _ENCODER_KWARGS.value:
    try:
      kwargs = json.loads(_ENCODER_KWARGS.value)
      assert isinstance(kwargs, dict)
    except (ValueError, AssertionError):
      raise cli.UserError(
        f'--encoder_kwargs={_ENCODER_KWARGS.value}: expected a JSON object'
      ) from None
  shard_index = (
    _SHARD_INDEX.value if _SHARD_INDEX.value is not None else int(os.environ.get('RANK', 0))
  )
  shard_count = (
    _SHARD_COUNT.value if _SHARD_COUNT.value is not None else int(os.environ.get('WORLD_SIZE', 1))
  )
  if not 0 <= shard_index < shard_count:
    raise cli.UserError(f'--shard_index={shard_index} must be in [0, --num_shards={shard_count})')
  if _FALLBACK_MPP.value is not None and not 0 < _FALLBACK_MPP.value <= manifest.MAX_MPP:
    raise cli.UserError(
      f'--fallback_mpp={_FALLBACK_MPP.value:g}: give micrometres per pixel (about 0.25 for a '
      '40x scan, 0.5 for 20x), not a magnification'
    )
  device = _device(_DEVICE.value)
  weights = _WEIGHTS.value
  if weights == 'auto':
    weights = 'imagenet' if encoders.imagenet_cached() else 'random'
    if weights == 'imagenet':  # 'random' says so once, when the encoder is built
      print('encoder weights: imagenet (found in the torch cache)')
  if device == 'cuda' and 'LOCAL_RANK' in os.environ:  # torchrun: one GPU per local process
    device = f'cuda:{os.environ["LOCAL_RANK"]}'
  wsi_weights = _WSI_WEIGHTS.value
  if wsi_weights == 'auto':
    wsi_weights = 'hub' if encoders.weights_available(_WSI_ENCODER.value) else 'random'
  cuda = device.startswith('cuda')
  cfg = extract.ExtractConfig(
    device=device,
    batch_size=_BATCH.value or (encoders.CUDA_BATCH if cuda else 64),
    workers=_WORKERS.value or (os.cpu_count() or 4),
    wsi_encoder=_WSI_ENCODER.value,
    wsi_encoder_weights=wsi_weights,
    encoder_kwargs=kwargs,
    precision=_PRECISION.value,
    target_mpp=_TARGET_MPP.value,
    patch_px=_PATCH_PX.value,
    encoder_weights=weights,
    radiomics_params=_RADIOMICS.value,
    mri_slices=_MRI_SLICES.value,
    shard_index=shard_index,
    shard_count=shard_count,
    fallback_mpp=_FALLBACK_MPP.value,
    mpp_from_objective=_MPP_FROM_OBJECTIVE.value,
    overwrite=_OVERWRITE.value,
    prune=_PRUNE.value,
    stain_norm=_STAIN_NORM.value,
    stain_reference=_STAIN_REFERENCE.value,
    stain_fit_centers=tuple(_STAIN_FIT_CENTERS.value),
    stain_scope=_STAIN_SCOPE.value,
    stain_slide_patches=_STAIN_SLIDE_PATCHES.value,
    stain_augment=_STAIN_AUGMENT.value,
    stain_augment_scale=_STAIN_AUGMENT_SCALE.value,
    stain_augment_shift=_STAIN_AUGMENT_SHIFT.value,
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
  from feature_store import stain

  try:
    summary = extract.extract(_MANIFEST.value, _STORE.value, cfg)
  except stain.StainError as e:
    raise cli.UserError(str(e)) from None
  print(summary.counts())
  print(summary.line(_STORE.value), flush=True)
  if (summary.rejected or summary.failed) and not _KEEP_GOING.value:
    sys.exit(cli.EXIT_FAILURES)


def run():
  cli.run(
    main,
    example=EXAMPLE,
    interrupted='interrupted: the store is intact (every finished slide and MRI is kept); '
    'run the same command again to resume',
  )


if __name__ == '__main__':
  run()
