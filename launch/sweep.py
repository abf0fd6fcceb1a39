"""Trains K models (folds x seeds x learning rates) in one vmapped program.

python -m launch.sweep --config=moemil_jax/configs/moemil.py --store=STORE --workdir=runs/sweep \
    --folds=0,1,2,3,4 --seeds=0,1 --learning_rates=3e-4,1e-3 --config.split.folds=5

Writes workdir/sweep.json (per-member, per-fold and ensemble metrics) and
workdir/predictions.parquet (one row per member and patient, plus member "ensemble").
"""

from absl import app, flags, logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file(
  'config', None, 'Config file (get_config()).', lock_config=True
)
_WORKDIR = flags.DEFINE_string('workdir', None, 'Where sweep.json and predictions go.')
_STORE = flags.DEFINE_string('store', None, 'Feature store directory (overrides config.store).')
_FOLDS = flags.DEFINE_list('folds', None, 'Validation folds (default: all of split.folds, or 0).')
_SEEDS = flags.DEFINE_list('seeds', ['0'], 'Seeds (initialisation, dropout, batch order).')
_LRS = flags.DEFINE_list('learning_rates', None, "Peak learning rates (default: the config's).")
_SEQUENTIAL = flags.DEFINE_bool(
  'sequential', False, 'Train the members one after another (same results, slower).'
)
flags.mark_flags_as_required(['config', 'workdir'])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  from moemil_jax import sweep  # after flag parsing: keeps --help fast

  config = _CONFIG.value
  if _STORE.value:
    config.store = _STORE.value
  folds = (
    [int(f) for f in _FOLDS.value] if _FOLDS.value else list(range(max(int(config.split.folds), 1)))
  )
  lrs = [float(x) for x in _LRS.value] if _LRS.value else [float(config.train.learning_rate)]
  members = sweep.grid(folds=folds, seeds=[int(s) for s in _SEEDS.value], learning_rates=lrs)
  logging.info('config:\n%s\n%d members', config, len(members))
  result = sweep.train_sweep(config, sweep.load(config), members, vectorize=not _SEQUENTIAL.value)
  sweep.write(result, _WORKDIR.value)
  print(result.metrics.to_string(index=False))
  print(result.fold_metrics.to_string(index=False))
  print('ensemble:', result.ensemble)


def run():
  app.run(main)


if __name__ == '__main__':
  run()
