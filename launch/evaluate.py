r"""Evaluates every trained model under a workdir and writes the clinical report.

  python -m launch.evaluate --workdir=/tmp/run

Reads <workdir>/<model>/predictions.parquet (+ run.json naming the feature store), adds the
comparators fitted on the training patients of that store (TNM from clinical.parquet; with
--baselines also TNM + EBV DNA, radiomics and WSI mean-pool linear models, see
moemil_jax/baselines.py), writes metrics.json, CSV/Markdown tables, PNG figures and a
self-contained report.html into the workdir, and prints the comparison table.
"""

from absl import app, flags, logging

from moemil_jax import evaluation, report

FLAGS = flags.FLAGS
flags.DEFINE_string('workdir', None, 'Folder with one subfolder per trained model.', required=True)
flags.DEFINE_enum('ci_method', 'delong', ['delong', 'bootstrap'], '95% CI method for the AUC.')
flags.DEFINE_integer(
  'n_bootstrap', 1000, 'Bootstrap resamples for C-index (and AUC if bootstrap) CIs.'
)
flags.DEFINE_bool('tnm', True, 'Add the TNM comparator fitted on training patients.')
flags.DEFINE_bool(
  'baselines',
  True,
  'Add the TNM + EBV DNA, radiomics and WSI mean-pool baselines fitted on training patients.',
)
flags.DEFINE_bool(
  'pseudonymise',
  False,
  'Replace patient IDs in every written output by stable salted '
  'hashes (and write predictions_pseudonymised.csv).',
)
flags.DEFINE_string(
  'pseudonym_salt',
  None,
  'Salt for --pseudonymise (default: $MOEMIL_PSEUDONYM_SALT, '
  'else one kept in <workdir>/.pseudonym_salt).',
)
flags.DEFINE_string(
  'truth', None, "A synthetic cohort's truth.csv: adds the oracle row (the ceiling)."
)


def main(argv):
  del argv
  ev = evaluation.evaluate(
    FLAGS.workdir,
    n_bootstrap=FLAGS.n_bootstrap,
    ci_method=FLAGS.ci_method,
    with_tnm=FLAGS.tnm,
    with_baselines=FLAGS.baselines,
    truth=FLAGS.truth,
  )
  original_ids = set()
  if FLAGS.pseudonymise:
    from moemil_jax import pseudonym

    original_ids = {i for df in ev.predictions.values() for i in df['patient_id'].astype(str)}
    ev = pseudonym.pseudonymise_evaluation(
      ev, pseudonym.salt_for(FLAGS.workdir, FLAGS.pseudonym_salt)
    )
  paths = report.write_report(ev, FLAGS.workdir)
  if FLAGS.pseudonymise:
    paths[pseudonym.PREDICTIONS_COPY] = pseudonym.write_predictions_copy(ev, FLAGS.workdir)
    leaks = pseudonym.find_ids(paths.values(), original_ids)
    if leaks:
      raise RuntimeError(
        f'patient IDs left in outputs despite --pseudonymise: {sorted({str(p) for p, _ in leaks})}'
      )
  print(evaluation.format_comparison(evaluation.comparison_table(ev)))
  notes = evaluation.undefined_notes(ev)
  if notes:
    print('\nUndefined metrics and warnings:')
    print('\n'.join(f'  - {n}' for n in notes))
  logging.info('wrote %d files', len(paths))
  print(f'\nreport: {paths["report.html"]}')


def run():
  app.run(main)


if __name__ == '__main__':
  run()
