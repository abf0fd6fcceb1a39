"""P3: K = 20 models (5 folds x 4 seeds) as one vmapped program against 20 separate trainings.

The headline baseline is what a user would otherwise run: K separate trainings
(`train.train_and_evaluate`, as `launch.train` does, each loading the store, fitting its
preprocessing and compiling for its own config), with the same epochs, no early stopping
(patience 0) and a "latest" checkpoint only at the end (`checkpoint_every = epochs`). Both
sides run the same loop (`trainer.fit`): K = 20 stacked members against K = 1, twenty
times. What still differs: a separate training saves a "best" checkpoint whenever its
smoothed validation score improves and writes predictions, run.json, a bundle and
TensorBoard curves; the sweep checkpoints nothing and evaluates every development patient
for every member each epoch (the pooled out-of-fold score). Wall time from call to result
on every side, the store load included (once for the sweep, once per separate training),
so is compilation. The sweep's mesh is the automatic one: on a host with several devices
(GPUs) its members are sharded over them. On a GPU or TPU the default recipe's ensemble is
also trained once as `launch.train` runs it (members over every local device) and timed.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import jax
from absl import logging

from moemil_jax import sweep as sweep_lib
from moemil_jax import train
from moemil_jax.bench import training
from moemil_jax.configs import paper
from moemil_jax.configs import test as test_config


def _improvements(history: list[dict]) -> int:
  """Epochs whose smoothed validation score improved on the best so far (the first counts):
  the "best" checkpoints `train.train_and_evaluate` saved."""
  best, saves = None, 0
  for h in history:
    v = h.get('smoothed')
    if saves == 0 or (v is not None and (best is None or v > best)):
      saves += 1
      best = v if v is not None else best
  return saves


def run(quick: bool = False, workdir: str | Path | None = None) -> dict[str, Any]:
  import tempfile

  workdir = Path(workdir or tempfile.mkdtemp(prefix='moemil_bench_'))
  # Small bags: a sweep is many short trainings. Enough patients that every validation
  # fold holds both response classes (sweep's DeLong report needs two of each).
  regime = training.Regime('sweep', 60 if quick else 128, 48 if quick else 64, 400)
  config = test_config.get_config() if quick else paper.get_config()
  config.store = str(training.bench_store(workdir, regime))
  config.data.radiomics_lasso = False
  config.split.test_center = 'B'  # the synthetic store's external center, named
  config.split.folds = 5
  config.train.epochs = 2 if quick else 5
  config.train.patience = 0  # equal work: every run trains every epoch
  # Quick: a smoke run of the same comparison with K = 4 (the suite's tests run it).
  folds, seeds = ((0, 1), (0, 1)) if quick else ((0, 1, 2, 3, 4), (0, 1, 2, 3))
  members = sweep_lib.grid(folds=folds, seeds=seeds)

  start = time.perf_counter()
  vmapped = sweep_lib.train_sweep(config, sweep_lib.load(config), members)
  vmapped_s = time.perf_counter() - start
  # Separate trainings: all K in full mode; in quick mode the first one, scaled to K.
  measured = members[:1] if quick else members
  best_saves = 0
  start = time.perf_counter()
  for k, m in enumerate(measured):
    c = config.copy_and_resolve_references()
    c.seed, c.split.fold, c.train.learning_rate = m.seed, m.fold, m.learning_rate
    c.train.checkpoint_every = c.train.epochs
    info = train.train_and_evaluate(c, workdir / 'separate' / f'run{time.time_ns()}_{k}')
    best_saves += _improvements(info['history'])
  separate_s = (time.perf_counter() - start) * len(members) / len(measured)
  patients = int(len(vmapped.splits[0]))
  out = {
    'models': len(members),
    'epochs': int(config.train.epochs),
    'patients': patients,
    'vmapped_s': float(vmapped_s),
    'vmapped_train_s': float(vmapped.seconds),
    'separate_trainings_s': float(separate_s),
    'separate_trainings_measured': len(measured),
    'separate_best_checkpoints': best_saves,
    'speedup': float(separate_s / vmapped_s),
    'mesh': vmapped.run_info['mesh'],
    'devices': len(vmapped.run_info['devices']),
    'note': f'K={len(members)}, {config.train.epochs} epochs, {patients} patients, store load '
    'and compile inside both timers; separate trainings: patience 0, latest checkpoint at the '
    f'end only, but per-epoch validation and {best_saves} "best" checkpoints '
    f'({len(measured)} runs), which the sweep does not do; sweep members share one packed step '
    f'shape (no padding to each other); sweep mesh {vmapped.run_info["mesh"]}'
    + (f'; separate trainings: {len(measured)} measured, scaled to K' if quick else ''),
  }
  if jax.default_backend() != 'cpu':  # GPU/TPU: the default recipe, members over devices
    out['default_ensemble'] = default_ensemble(config.store, workdir / 'default_ensemble')
  logging.info('P3: %s', out)
  return out


def default_ensemble(store: str, workdir: Path) -> dict[str, Any]:
  """The default recipe (`configs/moemil.py`: 5 members, 30 epochs) as `launch.train` runs
  it, on every local device: wall time, mesh, devices and compile counts."""
  from moemil_jax.configs import moemil

  c = moemil.get_config()
  c.store = store
  c.split.test_center = 'B'
  start = time.perf_counter()
  info = train.train_and_evaluate(c, workdir)
  return {
    'seconds': time.perf_counter() - start,
    **{k: info[k] for k in ('mesh', 'devices', 'compiled', 'epochs_run')},
  }
