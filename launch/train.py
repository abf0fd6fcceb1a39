"""Trains MoEMIL (or a baseline) from a feature store.

By default a five-member ensemble on five folds of the development center(s), predicting
with the members' mean (--ensemble=0: one model, its epoch chosen on a validation split);
both train in the one loop of moemil_jax/trainer.py, over every local device (the members
split between them) and, with --config.mesh.distributed, over every host. The external test
center is config.split.test_center (default: the second center by name, stated in the log).
Writes predictions.parquet, run.json (with the whole config, devices, mesh and compile
counts), checkpoints, the bundle and TensorBoard curves into --workdir; --resume continues a
killed run. The last line names the chosen epoch, its validation scores and the next command
(launch.evaluate on the folder above --workdir).
"""

import sys
from pathlib import Path

from absl import flags, logging
from ml_collections import config_flags

from launch import cli

EXAMPLE = '--config=moemil --store=store/ --workdir=runs/moemil [--config.train.epochs=30]'
_CONFIG = config_flags.DEFINE_config_file(
  'config',
  None,
  'Config: a packaged name (moemil, dlr, pathomics, paper, test) or a config file.',
  lock_config=True,
)
_WORKDIR = flags.DEFINE_string('workdir', None, 'Checkpoints, events, predictions.')
_STORE = flags.DEFINE_string('store', None, 'Feature store directory (overrides config.store).')
_RESUME = flags.DEFINE_bool('resume', False, 'Continue from the latest checkpoint in workdir.')
_ENSEMBLE = flags.DEFINE_integer(
  'ensemble',
  None,
  'K > 1: train K members on K folds of the development center in one program and predict '
  'with their mean (sets config.train.ensemble; 0 = one model).',
)
flags.mark_flags_as_required(['config', 'workdir'])


def _score(x) -> str:
  return 'undefined' if x is None or x != x else f'{x:.3f}'


def final_line(info: dict, workdir: str | Path, ensemble: bool) -> str:
  """`best epoch E: val AUC a, C-index c -> WORKDIR; next: python -m launch.evaluate ...`."""
  workdir = Path(workdir)
  epoch = info.get('best_step')
  if ensemble:
    import pandas as pd

    from moemil_jax import metrics

    frame = pd.read_parquet(workdir / 'predictions.parquet')
    oof = frame['oof_response_logit'].notna().to_numpy()
    dev = frame[oof]
    auc = metrics.labelled_auc_or_nan(dev['ic_response'].astype(float), dev['oof_response_logit'])
    cindex = metrics.cindex_or_nan(dev['os_months'], dev['os_event'], dev['oof_log_risk'])
    what = 'out-of-fold'
  else:
    best = next((h for h in info.get('history', []) if h.get('epoch') == epoch), {})
    auc, cindex, what = best.get('val_auc'), best.get('val_cindex'), 'val'
  return (
    f'best epoch {epoch}: {what} AUC {_score(auc)}, C-index {_score(cindex)} -> {workdir}; '
    f'next: python -m launch.evaluate --workdir={workdir.parent}'
  )


def _interrupted() -> str:
  return (
    f'interrupted: the checkpoints in {_WORKDIR.value} are intact; run the same command with '
    '--resume to continue from the latest one'
  )


def main(argv):
  if len(argv) > 1:
    raise cli.UserError(f'unexpected arguments {argv[1:]}: flags take the form --name=value')
  config = _CONFIG.value
  if _STORE.value:
    config.store = _STORE.value
  if _ENSEMBLE.value is not None:
    config.train.ensemble = _ENSEMBLE.value
  logging.info(
    '%s', cli.config_label(sys.argv, {'store': _STORE.value, 'ensemble': _ENSEMBLE.value})
  )
  if cli.verbose():
    logging.info('config:\n%s', config)
  if not config.store:
    raise cli.UserError('no feature store given: pass --store=DIR (made by launch.extract)')
  k = int(config.train.ensemble or 0)
  if k == 1 or k < 0:
    raise cli.UserError(f'--ensemble={k}: use 0 for one model or K >= 2 for K fold members')
  if not k and int(config.split.folds) <= 1 and not 0 < config.split.val_fraction < 1:
    raise cli.UserError(
      f'config.split.val_fraction={config.split.val_fraction}: one model needs validation '
      'patients to choose its epoch: use a fraction between 0 and 1 (e.g. 0.25), or train an '
      'ensemble (--ensemble=5)'
    )
  latest = Path(_WORKDIR.value) / 'checkpoints' / 'latest'
  if not _RESUME.value and latest.is_dir() and any(latest.glob('[0-9]*')):
    raise cli.UserError(
      f'--workdir={_WORKDIR.value} already holds a run: pass --resume to continue it, or '
      'another --workdir'
    )

  from moemil_jax import splits, store_reader

  centers = store_reader.read_centers(config.store)
  test_center, note = splits.resolve_test_center(centers, config.split.test_center)
  splits.check_development_size(
    centers, test_center, folds=k or int(config.split.folds), store=config.store
  )
  config.split.test_center = test_center
  logging.info('%s', note)
  cli.add_log_filter(cli.EpochFilter(config.train.get('log_epochs', 5), improvements=not k))

  from moemil_jax import train  # after flag parsing: keeps --help fast

  info = train.train_and_evaluate(config, _WORKDIR.value, resume=_RESUME.value)
  if info.get('process_index', 0) == 0 and 'stopped_at_epoch' not in info:
    print(final_line(info, _WORKDIR.value, bool(k)), flush=True)


def run():
  cli.run(main, example=EXAMPLE, interrupted=_interrupted)


if __name__ == '__main__':
  run()
