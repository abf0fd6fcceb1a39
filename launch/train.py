"""Trains MoEMIL (or a baseline) from a feature store.

python -m launch.train --config=moemil_jax/configs/moemil.py --workdir=runs/moemil \
    --store=STORE [--config.train.epochs=30 ...] [--resume] [--ensemble=5]
"""

from absl import app, flags, logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file(
  'config', None, 'Config file (get_config()).', lock_config=True
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
_QUIET = flags.DEFINE_bool(
  'quiet_checkpoint_logs',
  True,
  "Hide orbax's per-save INFO lines (warnings and errors still show).",
)
flags.mark_flags_as_required(['config', 'workdir'])


def _hide_orbax_info(record) -> bool:
  """absl handler filter: orbax logs a dozen INFO lines per checkpoint save."""
  return record.levelno > logging.converter.STANDARD_INFO or 'orbax' not in record.pathname


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  from moemil_jax import ensemble, train  # after flag parsing: keeps --help fast

  if _QUIET.value:
    logging.get_absl_handler().addFilter(_hide_orbax_info)
  config = _CONFIG.value
  if _STORE.value:
    config.store = _STORE.value
  if _ENSEMBLE.value is not None:
    config.train.ensemble = _ENSEMBLE.value
  logging.info('config:\n%s', config)
  if config.train.ensemble:
    if _RESUME.value:
      raise app.UsageError('--resume is not supported for ensembles: rerun from the start')
    ensemble.train_ensemble(config, _WORKDIR.value)
  else:
    train.train_and_evaluate(config, _WORKDIR.value, resume=_RESUME.value)


def run():
  app.run(main)


if __name__ == '__main__':
  run()
