r"""Imports slide features made by CLAM or TRIDENT (.h5 per slide) into a feature store.

  python -m launch.import_features --format=trident --features_dir=feats/features_uni_v1 \
      --manifest=cohort/manifest.csv --store=store/ --encoder_name=uni

Slides are matched to the manifest by file stem (<features_dir>/<stem>.h5 or
<features_dir>/h5_files/<stem>.h5). MRI is extracted as `launch.extract` does, with the same
MRI flags. The store trains like an extracted one. Exit status as `launch.extract`: 0 done,
1 when rows were rejected or items failed (--keep_going: 0), 2 when nothing could start.
"""

from __future__ import annotations

import sys

from absl import flags

from launch import cli

EXAMPLE = (
  '--format=clam --features_dir=FEATURES --manifest=cohort/manifest.csv --store=store/ '
  '--encoder_name=uni'
)

_FORMAT = flags.DEFINE_enum('format', None, ['clam', 'trident'], 'Layout of the .h5 files.')
_FEATURES = flags.DEFINE_string('features_dir', None, 'Folder of per-slide .h5 feature files.')
_MANIFEST = flags.DEFINE_string('manifest', None, 'Cohort manifest CSV.')
_STORE = flags.DEFINE_string('store', None, 'Feature store directory.')
_ENCODER = flags.DEFINE_string(
  'encoder_name', None, 'The encoder that made the features (recorded in the fingerprint).'
)
_PATCH_PX = flags.DEFINE_integer(
  'patch_px', None, 'Patch side in px, where the .h5 does not record it (TRIDENT does).'
)
_MPP = flags.DEFINE_float(
  'mpp', None, 'Patch um/px, where the .h5 records neither it nor a magnification.'
)
_DEVICE = flags.DEFINE_string('device', 'auto', 'torch device for the MRI encoder.')
_WEIGHTS = flags.DEFINE_string(
  'encoder_weights', 'imagenet', "MRI ResNet50 weights: 'imagenet', 'random' or a file."
)
_RADIOMICS = flags.DEFINE_string(
  'radiomics_params', None, 'PyRadiomics YAML; default feature_store/params/mr_default.yaml.'
)
_MRI_SLICES = flags.DEFINE_integer(
  'mri_slices', 5, 'Axial slices with the largest tumour area per sequence.'
)
_PRECISION = flags.DEFINE_enum('precision', 'auto', ['auto', 'fp32', 'fp16', 'bf16'], 'MRI.')
_OVERWRITE = flags.DEFINE_bool('overwrite', False, 'Replace features with another fingerprint.')
_PRUNE = flags.DEFINE_bool('prune', False, 'Remove files of patients not in the manifest.')
_KEEP_GOING = flags.DEFINE_bool('keep_going', False, 'Exit 0 despite rejected rows or failures.')


def main(argv):
  if len(argv) > 1:
    raise cli.UserError(f'unexpected arguments {argv[1:]}: flags take the form --name=value')
  for flag in (_FORMAT, _FEATURES, _MANIFEST, _STORE, _ENCODER):
    if not flag.value:
      raise cli.UserError(f'--{flag.name} is required (example: {EXAMPLE})')
  import torch

  from feature_store import extract, imported

  device = _DEVICE.value
  if device == 'auto':
    device = 'cuda' if torch.cuda.is_available() else 'cpu'
  cfg = imported.ImportConfig(
    format=_FORMAT.value,
    features_dir=_FEATURES.value,
    encoder_name=_ENCODER.value,
    patch_px=_PATCH_PX.value,
    mpp=_MPP.value,
    extract=extract.ExtractConfig(
      device=device,
      encoder_weights=_WEIGHTS.value,
      radiomics_params=_RADIOMICS.value,
      mri_slices=_MRI_SLICES.value,
      precision=_PRECISION.value,
      overwrite=_OVERWRITE.value,
      prune=_PRUNE.value,
    ),
  )
  summary = imported.import_features(_MANIFEST.value, _STORE.value, cfg)
  print(summary.counts('imported'))
  print(summary.line(_STORE.value, 'imported'), flush=True)
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
