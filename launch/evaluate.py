r"""Evaluates every trained model under a workdir and writes the clinical report.

  python -m launch.evaluate --workdir=runs/

Reads <workdir>/<model>/predictions.parquet (+ run.json naming the feature store), adds the
comparators fitted on the training patients of that store (TNM from clinical.parquet; with
--baselines also TNM + EBV DNA, radiomics and WSI mean-pool linear models, see
moemil_jax/baselines.py), writes metrics.json, CSV/Markdown tables, PNG figures and a
self-contained report.html into the workdir, and prints the comparison table.
"""

import json
from pathlib import Path

from absl import flags, logging

from launch import cli

EXAMPLE = '--workdir=runs/ [--truth=cohort/truth.csv] [--pseudonymise]'
PREDICTIONS, RUN_JSON = 'predictions.parquet', 'run.json'
FLAGS = flags.FLAGS
flags.DEFINE_string(
  'workdir',
  None,
  'Folder with one subfolder per trained model (the parent of each launch.train --workdir).',
  required=True,
)
flags.DEFINE_enum('ci_method', 'delong', ['delong', 'bootstrap'], '95% CI method for the AUC.')
flags.DEFINE_integer(
  'n_bootstrap',
  1000,
  'Bootstrap resamples for C-index (and AUC if bootstrap) CIs.',
  lower_bound=10,
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


def check_workdir(workdir: str) -> None:
  """Refuses, in one line that says what to pass instead, a folder that is not one holding
  trained models: missing, one model's own folder, empty, or two runs of one model name."""
  root = Path(workdir)
  example = 'python -m launch.train --config=moemil --store=STORE --workdir=RUNS/moemil'
  if not root.is_dir():
    raise cli.UserError(
      f'--workdir={workdir}: no such folder; pass the folder that holds one subfolder per '
      f'trained model (train one with {example})'
    )
  if (root / PREDICTIONS).exists():
    raise cli.UserError(
      f"--workdir={workdir} is one model's folder; pass the folder above it: "
      f'--workdir={root.parent}'
    )
  models = sorted(p for p in root.iterdir() if (p / PREDICTIONS).exists())
  if not models:
    unfinished = sorted(p.name for p in root.iterdir() if (p / 'checkpoints').exists())
    hint = (
      f' ({", ".join(unfinished)} started training but did not finish: rerun it)'
      if unfinished
      else ''
    )
    raise cli.UserError(
      f'--workdir={workdir}: no trained model in it (no */{PREDICTIONS}){hint}; '
      f'train one first: {example}'
    )
  names: dict[str, Path] = {}
  for sub in models:
    try:
      name = str(json.loads((sub / RUN_JSON).read_text()).get('model') or sub.name)
    except (OSError, ValueError):
      name = sub.name
    if name in names:
      raise cli.UserError(
        f'{names[name]} and {sub} are both model {name!r}; keep one of them in {workdir} or '
        f'retrain one under another name (--config.name=OTHER)'
      )
    names[name] = sub


def main(argv):
  if len(argv) > 1:
    raise cli.UserError(f'unexpected arguments {argv[1:]}: flags take the form --name=value')
  check_workdir(FLAGS.workdir)
  if FLAGS.truth and not Path(FLAGS.truth).is_file():
    raise cli.UserError(f"--truth={FLAGS.truth}: no such file (a synthetic cohort's truth.csv)")
  from moemil_jax import evaluation, report  # after flag parsing: keeps --help fast

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
  from moemil_jax import uncertainty_report  # OS probabilities and response sets

  paths.update(uncertainty_report.write(ev, FLAGS.workdir))
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
  cli.run(
    main,
    example=EXAMPLE,
    interrupted='interrupted: the trained models are untouched; run the same command again',
  )


if __name__ == '__main__':
  run()
