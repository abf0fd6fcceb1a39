"""P3: K = 20 models (5 folds x 4 seeds) as one vmapped program against 20 sequential trainings.

The headline baseline is what a user would otherwise run: K separate trainings
(`train.train_and_evaluate`, as `launch.train` does, each loading the store, fitting its
preprocessing, compiling for its own config and writing checkpoints), with the same
epochs and no early stopping. Also reported: the sweep program run one member at a time
(`vectorize=False`: one compilation shared by all members), which isolates what vmap
itself adds. Wall time from call to result on every side, so compilation is included.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from absl import logging

from moemil_jax import sweep as sweep_lib
from moemil_jax import train
from moemil_jax.bench import training
from moemil_jax.configs import paper
from moemil_jax.configs import test as test_config


def run(quick: bool = False, workdir: str | Path | None = None) -> dict[str, Any]:
  import tempfile

  workdir = Path(workdir or tempfile.mkdtemp(prefix='moemil_bench_'))
  # Small bags: a sweep is many short trainings. Enough patients that every validation
  # fold holds both response classes (sweep's DeLong report needs two of each).
  regime = training.Regime('sweep', 60 if quick else 128, 48 if quick else 64, 400)
  config = test_config.get_config() if quick else paper.get_config()
  config.store = str(training.bench_store(workdir, regime))
  config.data.radiomics_lasso = False
  config.split.folds = 5
  config.train.epochs = 2 if quick else 5
  folds, seeds = (0, 1, 2, 3, 4), ((0, 1) if quick else (0, 1, 2, 3))
  members = sweep_lib.grid(folds=folds, seeds=seeds)
  cohort = sweep_lib.load(config)
  vmapped = sweep_lib.train_sweep(config, cohort, members, vectorize=True)
  sequential = sweep_lib.train_sweep(config, cohort, members, vectorize=False)
  # Separate trainings: all K in full mode; in quick mode the first 2, scaled to K.
  measured = members[:2] if quick else members
  start = time.perf_counter()
  for k, m in enumerate(measured):
    c = config.copy_and_resolve_references()
    c.seed, c.split.fold, c.train.learning_rate, c.train.patience = (
      m.seed,
      m.fold,
      m.learning_rate,
      0,
    )
    train.train_and_evaluate(c, workdir / 'separate' / f'run{time.time_ns()}_{k}')
  separate_s = (time.perf_counter() - start) * len(members) / len(measured)
  out = {
    'models': len(members),
    'epochs': int(config.train.epochs),
    'patients': int(cohort.num_patients),
    'vmapped_s': float(vmapped.seconds),
    'separate_trainings_s': float(separate_s),
    'one_program_sequential_s': float(sequential.seconds),
    'speedup': float(separate_s / vmapped.seconds),
    'speedup_vs_one_program_sequential': float(sequential.seconds / vmapped.seconds),
    'note': f'K={len(members)}, {config.train.epochs} epochs, {cohort.num_patients} patients, '
    'compile included' + ('; separate trainings: 2 measured, scaled to K' if quick else ''),
  }
  logging.info('P3: %s', out)
  return out
