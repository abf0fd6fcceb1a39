"""Trains K models (folds x seeds x learning rates) in one vmapped program (`trainer.fit`).

python -m launch.sweep --config=moemil --store=STORE --workdir=runs/sweep \
    --folds=0,1,2,3,4 --seeds=0,1 --learning_rates=3e-4,1e-3 --config.split.folds=5

Writes workdir/sweep.json (per-member, per-fold and ensemble metrics) and
workdir/predictions.parquet (one row per member and patient, plus member "ensemble"), and
keeps orbax checkpoints in workdir/checkpoints (--resume continues a killed sweep).
"""

import sys

from absl import flags, logging
from ml_collections import config_flags

from launch import cli

EXAMPLE = (
  '--config=moemil --store=store/ --workdir=runs/sweep --folds=0,1,2,3,4 --seeds=0,1 '
  '--config.split.folds=5'
)
_CONFIG = config_flags.DEFINE_config_file(
  'config',
  None,
  'Config: a packaged name (moemil, dlr, pathomics, paper, test) or a config file.',
  lock_config=True,
)
_WORKDIR = flags.DEFINE_string('workdir', None, 'Where sweep.json and predictions go.')
_STORE = flags.DEFINE_string('store', None, 'Feature store directory (overrides config.store).')
_FOLDS = flags.DEFINE_list('folds', None, 'Validation folds (default: all of split.folds, or 0).')
_SEEDS = flags.DEFINE_list('seeds', ['0'], 'Seeds (initialisation, dropout, batch order).')
_LRS = flags.DEFINE_list('learning_rates', None, "Peak learning rates (default: the config's).")
_RESUME = flags.DEFINE_bool('resume', False, 'Continue from the latest checkpoint in workdir.')
_REPORT_TEST = flags.DEFINE_enum(
  'report_test',
  'selected',
  ['selected', 'all'],
  "Test-set metrics: 'selected' shows them only for the member chosen on validation and for "
  "the ensemble (no choice can then be made on the test set); 'all' for every member.",
)
flags.mark_flags_as_required(['config', 'workdir'])


def main(argv):
  if len(argv) > 1:
    raise cli.UserError(f'unexpected arguments {argv[1:]}: flags take the form --name=value')
  config = _CONFIG.value
  if _STORE.value:
    config.store = _STORE.value
  logging.info('%s', cli.config_label(sys.argv, {'store': _STORE.value}))
  if not config.store:
    raise cli.UserError('no feature store given: pass --store=DIR (made by launch.extract)')
  from moemil_jax import splits, store_reader

  centers = store_reader.read_centers(config.store)
  test_center, note = splits.resolve_test_center(centers, config.split.test_center)
  splits.check_development_size(
    centers, test_center, folds=int(config.split.folds), store=config.store
  )
  config.split.test_center = test_center
  logging.info('%s', note)
  cli.add_log_filter(cli.EpochFilter(config.train.get('log_epochs', 5), improvements=False))
  from moemil_jax import sweep  # after flag parsing: keeps --help fast

  folds = (
    [int(f) for f in _FOLDS.value] if _FOLDS.value else list(range(max(int(config.split.folds), 1)))
  )
  lrs = [float(x) for x in _LRS.value] if _LRS.value else [float(config.train.learning_rate)]
  members = sweep.grid(folds=folds, seeds=[int(s) for s in _SEEDS.value], learning_rates=lrs)
  logging.info('%d members', len(members))
  if cli.verbose():
    logging.info('config:\n%s', config)
  result = sweep.train_sweep(
    config, sweep.load(config), members, workdir=_WORKDIR.value, resume=_RESUME.value
  )
  sweep.write(result, _WORKDIR.value, report_test=_REPORT_TEST.value)
  shown = sweep.reported(result, _REPORT_TEST.value)
  print(shown['metrics'].to_string(index=False, float_format='%.3f'))
  print(shown['fold_metrics'].to_string(index=False, float_format='%.3f'))
  chosen = shown['selected_member']
  print(
    f'chosen on validation: {chosen["member"]} (val AUC {chosen["val_auc"]:.3f}, C-index '
    f'{chosen["val_cindex"]:.3f}) -> test AUC {chosen["test_auc"]:.3f}, C-index '
    f'{chosen["test_cindex"]:.3f}'
  )
  ens = result.ensemble
  print(
    f'ensemble of {ens["members"]}: test AUC {ens["test_auc"]:.3f}, C-index '
    f'{ens["test_cindex"]:.3f}; out-of-fold AUC {ens["oof_val_auc"]:.3f}'
  )


def run():
  cli.run(
    main,
    example=EXAMPLE,
    interrupted='interrupted: the checkpoints are intact; run the same command with --resume '
    'to continue from the latest one',
  )


if __name__ == '__main__':
  run()
