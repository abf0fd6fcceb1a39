"""A training run: one model or a fold ensemble, trained by `trainer.fit`, then written.

`train_and_evaluate` picks the members (`config.train.ensemble` = K > 1: member k trains on
every development fold but k, R = `train.ensemble_repeats` seeds each; 0: one model on the
hold-out split), trains them together in the one loop of `trainer.py` (the epoch chosen on
the pooled out-of-fold, or validation, score; orbax checkpoints; resume), and writes into
the workdir what every later tool reads:

  predictions.parquet  one row per patient: the members' mean response logit and mean
                       (median-centred) log-risk, gates; an ensemble adds each development
                       patient's out-of-fold prediction (`oof_*`) and its fold (`oof_fold`);
  run.json             the config, the split, the selected epoch and its history, compile
                       counts, devices and mesh; out-of-fold (or validation) figures for the
                       members, never a test-center figure of a single member;
  bundle/              the members' parameters and fitted preprocessing (`bundle.py`);
  tensorboard/         the epoch curves.

Process 0 alone writes. Development patients of an ensemble are reported as the 'train'
split (each was seen by K - 1 members).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import jax
import ml_collections
import numpy as np
import pandas as pd
from absl import logging

from moemil_jax import bundle, metrics, models, parallel, preprocess, splits, store_reader, trainer

PREDICTIONS = 'predictions.parquet'
RUN_JSON = 'run.json'


def ensemble_config(config: ml_collections.ConfigDict, k: int) -> ml_collections.ConfigDict:
  """The config with K-fold splits of the development center (one member per fold)."""
  if k < 2:
    raise ValueError(f'train.ensemble={k}: an ensemble needs at least 2 folds')
  config = config.copy_and_resolve_references()
  with config.unlocked():
    config.split.folds = k
    config.train.ensemble = k
  return config


def run_members(config: ml_collections.ConfigDict) -> list[trainer.Member]:
  """An ensemble's K folds x `train.ensemble_repeats` seeds (config.seed, config.seed + 1,
  ...), or the one model of the hold-out split (fold `split.fold`)."""
  k = int(config.train.get('ensemble', 0) or 0)
  if not k:
    return [trainer.Member(int(config.split.fold), int(config.seed), config.train.learning_rate)]
  repeats = int(config.train.get('ensemble_repeats', 1))
  if repeats < 1:
    raise ValueError(f'train.ensemble_repeats={repeats}: use 1 or more members per fold')
  seed = int(config.seed)
  return trainer.grid(
    folds=range(k), seeds=range(seed, seed + repeats), learning_rates=(config.train.learning_rate,)
  )


def train_and_evaluate(
  config: ml_collections.ConfigDict,
  workdir: str | Path,
  *,
  resume: bool = False,
  stop_after_epochs: int | None = None,
) -> dict[str, Any]:
  """Trains the run's members, writes predictions.parquet, run.json, the bundle and the
  TensorBoard curves; returns run.json's content (plus 'result', the trainer's `Result`).

  stop_after_epochs: end this call after that many epochs (saving "latest", as a job told
  to stop would); a later call with resume=True finishes the run.
  """
  parallel.initialize_distributed(config)  # multi-host: before any other JAX call
  workdir = Path(workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  k = int(config.train.get('ensemble', 0) or 0)
  if k:
    config = ensemble_config(config, k)
  cohort = trainer.load(config)
  config.split.test_center = splits.resolve_test_center(cohort.center, config.split.test_center)[0]
  members = run_members(config)
  try:
    result = trainer.fit(
      config,
      cohort,
      members,
      workdir=workdir,
      resume=resume,
      stop_after_epochs=stop_after_epochs,
    )
  except trainer.Stopped as stop:
    logging.info('stopping after epoch %d as asked', stop.epoch)
    return {'stopped_at_epoch': stop.epoch}
  frame = predictions_frame(config.name, cohort, result, ensemble=bool(k))
  run_info = _run_info(config, cohort, result, frame)
  if parallel.is_writer():
    frame.to_parquet(workdir / PREDICTIONS, index=False)
    (workdir / RUN_JSON).write_text(json.dumps(run_info, indent=2, default=_jsonable) + '\n')
    _write_bundle(workdir, config, result, frame)
    _write_curves(workdir, result.meta)
  logging.info(
    '%s %s and %s (members from epoch %d, %.0fs)',
    'wrote' if parallel.is_writer() else 'process 0 writes',
    workdir / PREDICTIONS,
    workdir / RUN_JSON,
    result.best_epoch,
    result.run_info['seconds'],
  )
  return {**run_info, 'process_index': jax.process_index(), 'result': result}


def predictions_frame(name, cohort, result: trainer.Result, *, ensemble: bool) -> pd.DataFrame:
  """One row per patient, columns as the evaluation contract asks (plus gate weights): the
  members' mean; an ensemble adds the out-of-fold columns."""
  logit, risk = trainer.member_mean(result.logits, result.log_risk, result.splits)
  split = (
    result.splits[0] if not ensemble else np.where(result.splits[0] == 'test', 'test', 'train')
  )
  frame = _frame(name, cohort, split, logit, risk, result.gates.mean(0))
  if ensemble:
    frame['oof_response_logit'] = trainer.out_of_fold(result.logits, result.splits)
    frame['oof_log_risk'] = trainer.out_of_fold(
      trainer.centred_log_risk(result.log_risk, result.splits), result.splits
    )
    # The development fold each patient was validated in (-1: the test center), for the
    # cross-conformal coverage of the response sets (moemil_jax/conformal.py).
    fold = np.full(cohort.num_patients, -1, np.int64)
    for m, rows in zip(result.members, result.splits):
      fold[rows == 'val'] = m.fold
    frame['oof_fold'] = fold
  return frame


def member_metrics(cohort, result: trainer.Result) -> list[dict[str, Any]]:
  """Each member's validation AUC and C-index (its held-out fold; never the test center)."""
  rows = []
  for m, logit, risk, split in zip(result.members, result.logits, result.log_risk, result.splits):
    val = split == 'val'
    rows.append(
      {
        'member': m.name,
        'val_auc': _finite_or_none(metrics.labelled_auc_or_nan(cohort.response[val], logit[val])),
        'val_cindex': _finite_or_none(
          metrics.cindex_or_nan(cohort.os_months[val], cohort.os_event[val], risk[val])
        ),
      }
    )
  return rows


def _run_info(config, cohort, result: trainer.Result, frame) -> dict[str, Any]:
  meta = result.meta
  best = next(h for h in meta['history'] if h['epoch'] == meta['best_epoch'])
  first = result.fitted[result.members[0].fold]
  return {
    'model': config.name,
    'store': str(Path(config.store).resolve()),
    'seed': int(config.seed),
    'config': config.to_dict(),
    'members': member_metrics(cohort, result),
    'best_step': int(meta['best_epoch']),
    'selected': {
      'epoch': int(meta['best_epoch']),
      'on': 'out-of-fold' if len(result.members) > 1 else 'validation',
      'metric': config.train.val_metric,
      'auc': best['val_auc'],
      'cindex': best['val_cindex'],
      'smoothed': meta['best_score'],
    },
    'val_metric': meta['best_score'],
    'val_metric_name': config.train.val_metric,
    'epochs_run': int(meta['epoch']),
    'history': meta['history'],
    'split_counts': {s: int((frame.split == s).sum()) for s in ('train', 'val', 'test')},
    'radiomics_columns': list(first.radiomics.columns),
    'harmonise': preprocess.harmonise_mode(config.data),
    **result.run_info,
  }


def _write_bundle(workdir: Path, config, result: trainer.Result, frame) -> None:
  members = [
    bundle.Member(
      m.name,
      jax.tree.map(lambda x, k=k: np.asarray(x)[k], result.params),
      result.fitted[m.fold],
      result.radiomics_dim,
      float(np.median(result.log_risk[k, result.splits[k] == 'train'])),
    )
    for k, m in enumerate(result.members)
  ]
  bundle.write(workdir, config, members, bundle.operating_points(frame), config.store, frame=frame)


def _write_curves(workdir: Path, meta: dict) -> None:
  """TensorBoard: per epoch the members' mean training loss and the selection scores."""
  from tensorboardX import SummaryWriter

  writer = SummaryWriter(str(workdir / 'tensorboard'))
  for h, loss in zip(meta['history'], meta['train_loss']):
    writer.add_scalar('epoch/train_loss', float(np.mean(loss)), h['epoch'])
    for key in ('val_auc', 'val_cindex', 'val_metric', 'smoothed'):
      if h[key] is not None:
        writer.add_scalar(f'epoch/{key}', h[key], h['epoch'])
  writer.close()


def _finite_or_none(x) -> float | None:
  return float(x) if x is not None and math.isfinite(x) else None


def _jsonable(x):
  if isinstance(x, (np.integer, np.floating)):
    return x.item()
  if isinstance(x, (tuple, set)):
    return list(x)
  return str(x)


def _frame(name, cohort: store_reader.Cohort, split, logit, risk, gates) -> pd.DataFrame:
  """One row per patient, columns as the evaluation contract asks (plus gate weights)."""
  frame = pd.DataFrame(
    {
      'patient_id': cohort.patient_id.astype(str),
      'center': cohort.center.astype(str),
      'split': np.asarray(split).astype(str),
      'model': name,
      'response_logit': logit.astype(np.float64),
      'response_prob': (1.0 / (1.0 + np.exp(-logit))).astype(np.float64),
      'log_risk': risk.astype(np.float64),
      'ic_response': pd.array(
        np.where(np.isnan(cohort.response), None, np.nan_to_num(cohort.response).astype(int)),
        dtype='Int64',
      ),
      'os_months': cohort.os_months.astype(np.float64),
      'os_event': cohort.os_event.astype(np.int64),
    }
  )
  for t, task in enumerate(models.TASKS):
    for e in range(gates.shape[-1]):
      frame[f'gate_{task}_e{e}'] = gates[:, t, e].astype(np.float64)
  return frame
