"""Sweeps: K members (folds x seeds x learning rates) in one program, and their report.

Python API (what `launch.sweep` and the benchmarks call):

  from moemil_jax import sweep
  cohort = sweep.load(config)                       # the store, read once into host arrays
  members = sweep.grid(folds=(0, 1, 2, 3, 4), seeds=(0, 1), learning_rates=(3e-4, 1e-3))
  result = sweep.train_sweep(config, cohort, members)   # trainer.fit: one vmapped program
  result.metrics        # DataFrame, one row per member: val/test AUC and C-index
  result.fold_metrics   # per fold: mean and sd over that fold's members
  result.ensemble       # test-set AUC and C-index of the averaged members, out-of-fold AUC
  result.predictions    # DataFrame: one row per (member, patient), plus member "ensemble"
  result.params         # parameters stacked along a leading K axis (host pure dict)

A member is (fold, seed, learning_rate). `config.split.folds` > 1 gives k-fold splits of
center A (`fold` picks the validation fold); otherwise every member uses the hold-out split
and `fold` must be 0. The seed drives initialisation, dropout and the batch order, exactly
as `config.seed` does for a single run; the learning rate scales the update of an
optimiser built with peak rate 1 (the warmup-cosine schedule is linear in its peak).
Training is `trainer.fit`, the loop every run uses: members keep the parameters of the
epoch with the best smoothed pooled out-of-fold score (with `train.patience`, stopping
together), and sharded over devices when there are several (`parallel.training_mesh`).
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any, Sequence

import ml_collections
import numpy as np
import pandas as pd
from absl import logging

from moemil_jax import metrics, splits, store_reader, trainer
from moemil_jax.trainer import Member, grid, load  # noqa: F401  (the sweep API)


@dataclasses.dataclass
class SweepResult:
  members: list[Member]
  params: Any  # host pure dict, every leaf with a leading K axis
  logits: np.ndarray  # (K, P) response logits, every patient
  log_risk: np.ndarray  # (K, P)
  splits: np.ndarray  # (K, P) "train" / "val" / "test"
  train_loss: np.ndarray  # (K, epochs run) mean training loss per epoch
  metrics: pd.DataFrame
  fold_metrics: pd.DataFrame
  ensemble: dict[str, float]
  predictions: pd.DataFrame
  seconds: float
  best_epoch: int
  run_info: dict  # the trainer's: devices, mesh, compile counts, step shape


def train_sweep(
  config: ml_collections.ConfigDict,
  cohort: store_reader.Cohort,
  members: Sequence[Member],
  *,
  workdir: str | Path | None = None,
  resume: bool = False,
) -> SweepResult:
  """Trains every member together (`trainer.fit`; checkpoints under `workdir` if given)."""
  config = config.copy_and_resolve_references()
  result = trainer.fit(config, cohort, members, workdir=workdir, resume=resume)
  config.split.test_center = splits.resolve_test_center(cohort.center, config.split.test_center)[0]
  members = result.members
  table, by_fold, ensemble, frame = _report(
    config, cohort, members, result.logits, result.log_risk, result.splits
  )
  # Out-of-fold only: the log is read while recipes are still being chosen, and a test figure
  # there invites choosing on the test set (launch.evaluate reports it once the choice is made).
  logging.info(
    'sweep done in %.1fs: %d members, out-of-fold AUC %.3f',
    result.run_info['seconds'],
    ensemble['members'],
    ensemble['oof_val_auc'],
  )
  return SweepResult(
    members,
    result.params,
    result.logits,
    result.log_risk,
    result.splits,
    np.array(result.meta['train_loss']).T,
    table,
    by_fold,
    ensemble,
    frame,
    result.run_info['seconds'],
    result.best_epoch,
    result.run_info,
  )


# --------------------------------------------------------------------------- reporting


def _report(config, cohort, members, logits, risks, splits):
  y, t, e = cohort.response, cohort.os_months, cohort.os_event
  rows = []
  for k, m in enumerate(members):
    row = {'member': m.name, 'fold': m.fold, 'seed': m.seed, 'learning_rate': m.learning_rate}
    for split in ('val', 'test'):
      ids = splits[k] == split
      row[f'{split}_auc'] = metrics.labelled_auc_or_nan(y[ids], logits[k, ids])
      row[f'{split}_cindex'] = metrics.cindex_or_nan(t[ids], e[ids], risks[k, ids])
    rows.append(row)
  table = pd.DataFrame(rows)
  by_fold = table.groupby('fold')[['val_auc', 'val_cindex', 'test_auc', 'test_cindex']].agg(
    ['mean', 'std']
  )
  by_fold.columns = [f'{a}_{b}' for a, b in by_fold.columns]
  by_fold = by_fold.reset_index()

  # Ensemble: mean logit; log-risks centred on each member's training median first (the Cox
  # likelihood fixes a member's log-risk only up to a constant).
  ens_logit, ens_risk = trainer.member_mean(logits, risks, splits)
  test = cohort.center == config.split.test_center
  oof = trainer.out_of_fold(logits, splits)
  has_oof = ~np.isnan(oof)
  ensemble = {
    'members': len(members),
    'test_auc': metrics.labelled_auc_or_nan(y[test], ens_logit[test]),
    'test_cindex': metrics.cindex_or_nan(t[test], e[test], ens_risk[test]),
    'oof_val_auc': metrics.labelled_auc_or_nan(y[has_oof], oof[has_oof]),
  }

  frames = []
  for k, m in enumerate(members):
    frames.append(
      pd.DataFrame(
        {
          'member': m.name,
          'fold': m.fold,
          'seed': m.seed,
          'learning_rate': m.learning_rate,
          'patient_id': cohort.patient_id.astype(str),
          'center': cohort.center.astype(str),
          'split': splits[k],
          'response_logit': logits[k],
          'log_risk': risks[k],
        }
      )
    )
  frames.append(
    pd.DataFrame(
      {
        'member': 'ensemble',
        'fold': -1,
        'seed': -1,
        'learning_rate': np.nan,
        'patient_id': cohort.patient_id.astype(str),
        'center': cohort.center.astype(str),
        'split': np.where(test, 'test', 'dev'),
        'response_logit': ens_logit,
        'log_risk': ens_risk,
      }
    )
  )
  frame = pd.concat(frames, ignore_index=True)
  frame['response_prob'] = 1.0 / (1.0 + np.exp(-frame.response_logit))
  frame['ic_response'] = np.tile(cohort.response, len(members) + 1)
  frame['os_months'] = np.tile(t, len(members) + 1)
  frame['os_event'] = np.tile(e, len(members) + 1).astype(np.int64)
  return table, by_fold, ensemble, frame


TEST_COLUMNS = ('test_auc', 'test_cindex')


def reported(result: SweepResult, report_test: str = 'selected') -> dict[str, Any]:
  """The tables a user sees. 'selected': validation metrics for every member and test
  metrics only for the member chosen on validation (best mean of validation AUC and
  C-index) and for the ensemble, so that no choice can be made on the test set; 'all':
  every member's test metrics too (for method comparisons, said explicitly)."""
  if report_test not in ('selected', 'all'):
    raise ValueError(f"report_test={report_test!r}: use 'selected' or 'all'")
  table, folds = result.metrics, result.fold_metrics
  score = table[['val_auc', 'val_cindex']].mean(axis=1, skipna=True)
  chosen = table.loc[score.fillna(-np.inf).idxmax()]
  selected = {
    'member': chosen['member'],
    'chosen_on': 'mean of validation AUC and C-index',
    **{c: chosen[c] for c in ('val_auc', 'val_cindex', *TEST_COLUMNS)},
  }
  if report_test == 'selected':
    table = table.drop(columns=list(TEST_COLUMNS))
    folds = folds[[c for c in folds.columns if not c.startswith('test_')]]
  return {
    'report_test': report_test,
    'metrics': table,
    'fold_metrics': folds,
    'selected_member': selected,
    'ensemble': result.ensemble,
  }


def write(result: SweepResult, workdir, report_test: str = 'selected') -> None:
  """sweep.json (members, per-member, per-fold and ensemble metrics, as `reported` shows
  them) + predictions.parquet."""
  workdir = Path(workdir)
  workdir.mkdir(parents=True, exist_ok=True)

  def clean(x):
    return None if isinstance(x, float) and not math.isfinite(x) else x

  shown = reported(result, report_test)
  summary = {
    'members': [dataclasses.asdict(m) for m in result.members],
    'seconds': result.seconds,
    'report_test': report_test,
    'metrics': [
      {k: clean(v) for k, v in r.items()} for r in shown['metrics'].to_dict(orient='records')
    ],
    'fold_metrics': [
      {k: clean(v) for k, v in r.items()} for r in shown['fold_metrics'].to_dict(orient='records')
    ],
    'selected_member': {k: clean(v) for k, v in shown['selected_member'].items()},
    'ensemble': {k: clean(v) for k, v in result.ensemble.items()},
    'best_epoch': result.best_epoch,
    'train_loss': result.train_loss.tolist(),
    **{k: result.run_info[k] for k in ('devices', 'mesh', 'compiled')},
  }
  (workdir / 'sweep.json').write_text(json.dumps(summary, indent=2, default=float) + '\n')
  result.predictions.to_parquet(workdir / 'predictions.parquet', index=False)
