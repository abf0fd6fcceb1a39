"""A cross-validated ensemble: K members on K folds of the development center, one program.

Why: with ~200 development patients, one model trained on three quarters of them and
early-stopped on a 60-patient validation split is mostly noise (its validation AUC moves by
0.1 between epochs). Here member k trains on every development fold but k, all members run
in one vmapped program (`sweep.train_sweep`), the epoch is chosen once for all members from
the pooled out-of-fold score over every development patient, smoothed, and the prediction is
the mean of the members' response logits and (median-centred) log-risks. Every development
patient is used for training, the choice of epoch never sees the external test center, and
averaging K members removes much of the variance a small cohort gives each one.

`launch.train --ensemble=K` (or `config.train.ensemble = K`) runs this instead of
`train.train_and_evaluate` and writes the same outputs (predictions.parquet, run.json) plus
the members' parameters as an orbax checkpoint, so `launch.evaluate` treats it like any model.
Development patients are reported as the 'train' split (the ensemble has seen each of them
through K - 1 members); `oof_response_logit` and `oof_log_risk` hold their out-of-fold
predictions and `oof_fold` the fold that validated each (-1 for the test center).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from flax import nnx

from moemil_jax import bundle, preprocess, splits, sweep, train


def ensemble_config(config: ml_collections.ConfigDict, k: int) -> ml_collections.ConfigDict:
  """The config with K-fold splits of the development center (one member per fold)."""
  if k < 2:
    raise ValueError(f'train.ensemble={k}: an ensemble needs at least 2 folds')
  config = config.copy_and_resolve_references()
  with config.unlocked():
    config.split.folds = k
    config.train.ensemble = k
  return config


def ensemble_members(config: ml_collections.ConfigDict) -> list[sweep.Member]:
  """K folds x `train.ensemble_repeats` seeds (config.seed, config.seed + 1, ...), one rate."""
  repeats = int(config.train.get('ensemble_repeats', 1))
  if repeats < 1:
    raise ValueError(f'train.ensemble_repeats={repeats}: use 1 or more members per fold')
  seed = int(config.seed)
  return sweep.grid(
    folds=range(int(config.train.ensemble)),
    seeds=range(seed, seed + repeats),
    learning_rates=(config.train.learning_rate,),
  )


def train_ensemble(config: ml_collections.ConfigDict, workdir: str | Path) -> dict[str, Any]:
  """Trains config.train.ensemble members and writes predictions, run.json and parameters.

  Returns run.json's content plus 'result', the sweep's result (members' predictions).
  """
  k = int(config.train.ensemble)
  config = ensemble_config(config, k)
  workdir = Path(workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  cohort = sweep.load(config)
  config.split.test_center = splits.resolve_test_center(cohort.center, config.split.test_center)[0]
  members = ensemble_members(config)
  logging.info(
    'ensemble of %d members (%d per development fold), model %s',
    len(members),
    len(members) // k,
    config.name,
  )
  result = sweep.train_sweep(config, cohort, members, select_epoch=True)

  logit, risk = sweep.member_mean(result.logits, result.log_risk, result.splits)
  cohort.split = np.where(cohort.center == config.split.test_center, 'test', 'train')
  gates = np.full((cohort.num_patients, 2, config.model.num_experts), np.nan)
  frame = train.predictions_frame(config.name, cohort, logit, risk, gates)
  frame['oof_response_logit'] = sweep.out_of_fold(result.logits, result.splits)
  frame['oof_log_risk'] = sweep.out_of_fold(
    sweep.centred_log_risk(result.log_risk, result.splits), result.splits
  )
  # The development fold each patient was validated in (-1: the test center), for the
  # cross-conformal coverage of the response sets (moemil_jax/conformal.py).
  fold = np.full(cohort.num_patients, -1, np.int64)
  for k, m in enumerate(result.members):
    fold[result.splits[k] == 'val'] = m.fold
  frame['oof_fold'] = fold
  frame.to_parquet(workdir / train.PREDICTIONS, index=False)

  ckpt = ocp.StandardCheckpointer()
  path = (workdir / 'checkpoints' / 'ensemble').resolve()
  if path.exists():  # a rerun replaces the previous members
    shutil.rmtree(path)
  ckpt.save(path, nnx.to_pure_dict(result.params))
  ckpt.wait_until_finished()

  stacked = nnx.to_pure_dict(result.params)
  members = [
    bundle.Member(
      m.name,
      jax.tree.map(lambda x, k=k: np.asarray(x)[k], stacked),
      result.fitted[m.fold],
      result.radiomics_dim,
      float(np.median(result.log_risk[k, result.splits[k] == 'train'])),
    )
    for k, m in enumerate(result.members)
  ]
  bundle.write(workdir, config, members, bundle.operating_points(frame), config.store, frame=frame)

  run_info = {
    'model': config.name,
    'store': str(Path(config.store).resolve()),
    'seed': int(config.seed),
    'config': config.to_dict(),
    'ensemble': {
      'members': [m.name for m in result.members],
      'best_epoch': result.best_epoch,
      'selection_history': result.selection_history,
      'member_metrics': result.metrics.to_dict(orient='records'),
      'out_of_fold_auc': result.ensemble['oof_val_auc'],
    },
    'best_step': result.best_epoch,
    'epochs_run': int(config.train.epochs),
    'split_counts': {s: int((cohort.split == s).sum()) for s in ('train', 'val', 'test')},
    'seconds': result.seconds,
    'processes': jax.process_count(),
    'harmonise': preprocess.harmonise_mode(config.data),
  }
  (workdir / train.RUN_JSON).write_text(
    json.dumps(run_info, indent=2, default=train._jsonable) + '\n'
  )
  logging.info(
    'wrote %s and %s (members from epoch %d, %.0fs)',
    workdir / train.PREDICTIONS,
    workdir / train.RUN_JSON,
    result.best_epoch,
    result.seconds,
  )
  return {**run_info, 'result': result}
