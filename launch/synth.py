r"""Writes a synthetic NPC cohort (images + manifest) or a synthetic feature store.

python -m launch.synth --out=/tmp/cohort --patients=40 --seed=0
python -m launch.synth --out=/tmp/cohort --patients=200 --center_b_patients=100 --slide_px=768
python -m launch.synth --kind=store --out=/tmp/store --patients=404 --median_patches=2000
python -m launch.synth --kind=store --preset=realistic --out=/tmp/store --patients=404

--preset picks a cohort (feature_store.synthetic_store.PRESETS: clean, realistic, hard); the
signal flags given explicitly on the command line override the preset's values.
"""

import dataclasses

from absl import flags

from feature_store import synthetic, synthetic_cohort, synthetic_store
from launch import cli

EXAMPLE = '--out=cohort/ --patients=40 [--kind=store --preset=realistic]'

FLAGS = flags.FLAGS
flags.DEFINE_string('out', None, 'Output folder.', required=True)
flags.DEFINE_enum(
  'kind',
  'cohort',
  ['cohort', 'store'],
  'cohort: slides, MRI and manifest.csv as a hospital exports them; '
  'store: a feature store written directly (no images, paper scale on a CPU).',
)
flags.DEFINE_integer('patients', 40, 'Number of patients.')
flags.DEFINE_integer('seed', 0, 'Random seed; the same seed gives identical files.')
flags.DEFINE_enum(
  'preset',
  'clean',
  sorted(synthetic_store.PRESETS),
  'clean: strong, clean signal; realistic / hard: what real two-hospital cohorts look like '
  '(BUILD.md, "Stress cohorts").',
)
# Signal and missingness knobs (feature_store.synthetic.Knobs).
_DEFAULT = synthetic.Knobs()
flags.DEFINE_float('wsi_signal', _DEFAULT.wsi_signal, 'Latent signal strength in slides (0-1).')
flags.DEFINE_float('mri_signal', _DEFAULT.mri_signal, 'Latent signal strength in MRI (0-1).')
flags.DEFINE_float(
  'tnm_signal', _DEFAULT.tnm_signal, 'Latent signal strength in T and N stage (0-1).'
)
flags.DEFINE_float(
  'censoring_rate', _DEFAULT.censoring_rate, 'Target fraction of censored patients.'
)
flags.DEFINE_float(
  'missing_wsi_rate', _DEFAULT.missing_wsi_rate, 'Fraction of patients without slides.'
)
flags.DEFINE_float(
  'missing_mri_rate', _DEFAULT.missing_mri_rate, 'Fraction of patients without MRI.'
)
flags.DEFINE_float(
  'missing_response_rate',
  _DEFAULT.missing_response_rate,
  'Fraction of patients without an IC-response label.',
)
flags.DEFINE_float(
  'center_b_fraction', _DEFAULT.center_b_fraction, 'Fraction from center B (external test).'
)
flags.DEFINE_integer(
  'center_b_patients',
  None,
  'Exactly this many patients from center B, the external test center (overrides '
  '--center_b_fraction; the other patients are as with the fraction alone).',
)
flags.DEFINE_float(
  'nuclear_hue',
  _DEFAULT.nuclear_hue,
  "Cohort slides: blue shift of the nuclei per tanh(patient's slide view); 0 puts the slide "
  'signal in nuclear density and size alone, so that stain is a center effect only.',
)
# Size knobs.
flags.DEFINE_integer(
  'slide_px', synthetic_cohort.CohortShape.slide_px, 'cohort: level-0 slide side in px.'
)
flags.DEFINE_integer(
  'mri_px', synthetic_cohort.CohortShape.mri_px, 'cohort: MRI in-plane matrix size.'
)
flags.DEFINE_integer(
  'median_patches',
  synthetic_store.StoreShape.median_patches,
  'store: median patches per patient (lognormal).',
)
flags.DEFINE_integer(
  'max_patches', synthetic_store.StoreShape.max_patches, 'store: most patches per patient.'
)


def main(argv):
  if len(argv) > 1:
    raise cli.UserError(f'unexpected arguments {argv[1:]}: flags take the form --name=value')
  if FLAGS.patients < 4:
    raise cli.UserError(f'--patients={FLAGS.patients}: a synthetic cohort needs at least 4')
  if FLAGS.center_b_patients is not None and not 0 <= FLAGS.center_b_patients < FLAGS.patients:
    raise cli.UserError(
      f'--center_b_patients={FLAGS.center_b_patients}: give 0 to {FLAGS.patients - 1} '
      f'(center A needs patients to train on), or raise --patients'
    )
  knobs, shape = synthetic_store.preset_config(FLAGS.preset)
  knob_flags = (
    'wsi_signal',
    'mri_signal',
    'tnm_signal',
    'censoring_rate',
    'missing_wsi_rate',
    'missing_mri_rate',
    'missing_response_rate',
    'center_b_fraction',
    'center_b_patients',
    'nuclear_hue',
  )
  knobs = dataclasses.replace(knobs, **{k: FLAGS[k].value for k in knob_flags if FLAGS[k].present})
  if FLAGS.kind == 'cohort':
    path = synthetic_cohort.make_cohort(
      FLAGS.out,
      patients=FLAGS.patients,
      seed=FLAGS.seed,
      knobs=knobs,
      slide_px=FLAGS.slide_px,
      mri_px=FLAGS.mri_px,
    )
    print(f'manifest: {path}')
  else:
    path = synthetic_store.make_store(
      FLAGS.out,
      patients=FLAGS.patients,
      seed=FLAGS.seed,
      knobs=knobs,
      shape=shape,
      median_patches=FLAGS.median_patches,
      max_patches=FLAGS.max_patches,
    )
    print(f'store: {path}')


def run():
  cli.run(
    main,
    example=EXAMPLE,
    interrupted='interrupted: files are written whole; run the same command again (the same seed writes the same files)',
  )


if __name__ == '__main__':
  run()
