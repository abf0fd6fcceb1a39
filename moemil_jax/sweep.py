"""K models in one program: `jax.vmap` over folds x seeds x learning rates.

Python API (what `launch.sweep` and the benchmarks call):

  from moemil_jax import sweep
  cohort = sweep.load(config)                       # the store, read once into host arrays
  members = sweep.grid(folds=(0, 1, 2, 3, 4), seeds=(0, 1), learning_rates=(3e-4, 1e-3))
  result = sweep.train_sweep(config, cohort, members)            # one vmapped program
  result = sweep.train_sweep(config, cohort, members, vectorize=False)  # same, one by one
  result.metrics        # DataFrame, one row per member: val/test AUC and C-index
  result.fold_metrics   # per fold: mean and sd over that fold's members
  result.ensemble       # test-set AUC and C-index of the averaged members, out-of-fold AUC
  result.predictions    # DataFrame: one row per (member, patient), plus member "ensemble"
  result.params         # parameters stacked along a leading K axis (nnx.State)

A member is (fold, seed, learning_rate). `config.split.folds` > 1 gives k-fold splits of
center A (`fold` picks the validation fold); otherwise every member uses the hold-out split
and `fold` must be 0. The seed drives initialisation, dropout and the batch order, exactly
as `config.seed` does in `train.train_and_evaluate`; the learning rate scales the update of
an optimiser built with peak rate 1 (the warmup-cosine schedule is linear in its peak).

What is vmapped: parameters, optimiser states, RNG keys, per-fold preprocessing (radiomics
selection, patch and MRI statistics fitted on that fold's training patients) and each
member's batches (its own training patients). Members whose epoch has fewer batches than
the longest take masked no-op steps; every step has the same packed shape (`batching`). The K-fold schedule is therefore the same whether vmapped or sequential
(`vectorize=False`), and the two agree to round-off. Runs are fixed-length: no early
stopping and no checkpoints (a sweep is for model selection; retrain the chosen setting
with `launch.train`). Radiomics inputs are zero-padded to the widest fold's selection.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pandas as pd
from absl import logging
from flax import nnx

from moemil_jax import batching, device_data, metrics, preprocess, store_reader, train
from moemil_jax import splits as splits_lib

SHARED = (
  'patches',
  'mri_deep',
  'mri_deep_count',
  'response',
  'has_response',
  'os_months',
  'os_event',
  'has_survival',
)
PER_FOLD = (
  'patch_mean',
  'patch_inv_std',
  'radiomics',
  'has_radiomics',
  'wsi_summary',
  'deep_mean',
  'deep_inv_std',
)


@dataclasses.dataclass(frozen=True)
class Member:
  fold: int
  seed: int
  learning_rate: float

  @property
  def name(self) -> str:
    return f'fold{self.fold}_seed{self.seed}_lr{self.learning_rate:g}'


def grid(
  *,
  folds: Sequence[int] = (0,),
  seeds: Sequence[int] = (0,),
  learning_rates: Sequence[float] = (3e-4,),
) -> list[Member]:
  """Every combination, fold-major."""
  return [Member(int(f), int(s), float(lr)) for f in folds for s in seeds for lr in learning_rates]


def load(config) -> store_reader.Cohort:
  if not config.store:
    raise ValueError('config.store is empty: pass --store or --config.store')
  cohort = store_reader.load_store(config.store)
  preprocess.harmonise(cohort, config.data)
  return cohort


@dataclasses.dataclass
class SweepResult:
  members: list[Member]
  params: Any  # nnx.State, every leaf with a leading K axis
  logits: np.ndarray  # (K, P) response logits, every patient
  log_risk: np.ndarray  # (K, P)
  splits: np.ndarray  # (K, P) "train" / "val" / "test"
  train_loss: np.ndarray  # (K, epochs) mean training loss per epoch
  metrics: pd.DataFrame
  fold_metrics: pd.DataFrame
  ensemble: dict[str, float]
  predictions: pd.DataFrame
  seconds: float
  fitted: dict | None = None  # fold -> preprocess.Fitted on that fold's training patients
  radiomics_dim: int = 0  # the members' radiomics input width (the widest fold's selection)
  best_epoch: int | None = None  # with select_epoch: the epoch the members were kept from
  selection_history: list | None = None  # with select_epoch: per-epoch out-of-fold score


# --------------------------------------------------------------------------- data


def _splits(config, cohort, folds: Sequence[int]) -> dict[int, np.ndarray]:
  sc = config.split
  out = {}
  for f in folds:
    if sc.folds <= 1 and f != 0:
      raise ValueError(
        f'member fold {f}: config.split.folds={sc.folds} means one hold-out '
        'split (fold 0); set split.folds > 1 for k-fold'
      )
    out[f] = splits_lib.assign_splits(
      cohort,
      test_center=sc.test_center,
      val_fraction=sc.val_fraction,
      seed=sc.seed,
      folds=sc.folds,
      fold=f,
    )
  return out


def _fold_data(config, cohort, splits: dict[int, np.ndarray]):
  """Shared arrays (once) and per-fold preprocessing stacked along a leading fold axis."""
  cpu = jax.devices('cpu')[0]
  per_fold = {k: [] for k in PER_FOLD}
  fitted = []
  for f, split in splits.items():
    c = dataclasses.replace(cohort, split=split)
    d = device_data.prepare(c, config.data, seed=config.seed, device=cpu)
    fitted.append(d.fitted)
    mean, std = d.fitted.deep_mean, d.fitted.deep_std
    per_fold['patch_mean'].append(np.asarray(d.patch_mean))
    per_fold['patch_inv_std'].append(np.asarray(d.patch_inv_std))
    per_fold['radiomics'].append(np.asarray(d.radiomics))
    per_fold['has_radiomics'].append(np.asarray(d.has_radiomics))
    per_fold['wsi_summary'].append(np.asarray(d.wsi_summary))
    per_fold['deep_mean'].append(mean.astype(np.float32))
    per_fold['deep_inv_std'].append((1.0 / std).astype(np.float32))
    if f == next(iter(splits)):
      shared = {k: np.asarray(getattr(d, k)) for k in SHARED if k != 'mri_deep'}
    del d
  width = max(r.shape[1] for r in per_fold['radiomics'])
  per_fold['radiomics'] = [
    np.pad(r, ((0, 0), (0, width - r.shape[1]))) for r in per_fold['radiomics']
  ]
  shared['mri_deep'] = cohort.mri_deep.astype(np.float32)
  return (
    jax.device_put(shared),
    jax.device_put({k: np.stack(v) for k, v in per_fold.items()}),
    width,
    dict(zip(splits, fitted)),
  )


def _member_data(shared, per_fold, fold_index):
  return {**shared, **{k: v[fold_index] for k, v in per_fold.items()}}


def _inputs(data, batch, dtype, mesh=None):
  """batching.gather_inputs, with deep MRI features z-scored by the member's own fold."""
  inputs, targets = batching.gather_inputs(data, batch, dtype, mesh)
  raw = data['mri_deep'][batch['patient']]
  z = (raw - data['deep_mean']) * data['deep_inv_std']
  inputs['mri_deep'] = (z * inputs['mri_deep_valid'][..., None]).astype(dtype)
  return inputs, targets


# --------------------------------------------------------------------------- batches


def _epoch_plan(config, members, splits, epoch, layout, patch_counts, packing, events):
  """Per step: stacked (K, ...) batches and the (K,) mask of members with a real batch.

  Every member's steps have the same packed shape, so members never pad to each other;
  one whose epoch has fewer steps gets empty (fully masked) steps at the end.
  """
  per_member = [
    batching.train_batches(
      np.flatnonzero(splits[m.fold] == 'train'),
      patch_counts,
      layout,
      packing,
      rng=np.random.default_rng([m.seed, epoch]),
      events=events,
      min_events_per_batch=int(config.train.get('min_events_per_batch', 0)),
    )
    for m in members
  ]
  empty = _empty_batch(layout, packing)
  plan = []
  for i in range(max(len(b) for b in per_member)):
    here = [b[i] if i < len(b) else empty for b in per_member]
    stacked = {k: np.stack([h.tree()[k] for h in here]) for k in here[0].tree()}
    plan.append((stacked, np.array([i < len(b) for b in per_member])))
  return plan


def _empty_batch(layout: batching.BagLayout, packing: batching.Packing) -> batching.Batch:
  patient, mask, index, segment = batching.empty_block(layout, packing)
  return batching.Batch(patient, mask, index[None], segment[None])


# --------------------------------------------------------------------------- steps


def _steps(config, graphdef, steps_per_epoch: int, vectorize: bool):
  tc = config.train.copy_and_resolve_references()
  tc.learning_rate = 1.0  # members scale the updates by their own rate
  tx = train.make_optimizer(tc, steps_per_epoch)
  dtype = jnp.dtype(config.model.compute_dtype)
  loss_fn = train.make_loss_fn(config, graphdef, gather_inputs=_inputs)

  def member_step(params, opt_state, rest, lr, fold_index, active, shared, per_fold, batch, key):
    data = _member_data(shared, per_fold, fold_index)
    (loss, terms), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, rest, data, batch, key)
    updates, new_state = tx.update(grads, opt_state, params)
    updates = jax.tree.map(lambda u: lr * u, updates)
    new_params = optax.apply_updates(params, updates)

    def keep(new, old):
      return jax.tree.map(lambda a, b: jnp.where(active, a, b), new, old)

    return keep(new_params, params), keep(new_state, opt_state), {'loss': loss, **terms}

  def member_eval(params, rest, fold_index, shared, per_fold, batch):
    model = nnx.merge(graphdef, params, rest)
    inputs, _ = _inputs(_member_data(shared, per_fold, fold_index), batch, dtype)
    out = model(inputs, rngs=None)
    return out['response_logit'], out['log_risk']

  step = jax.jit(
    jax.vmap(member_step, in_axes=(0, 0, 0, 0, 0, 0, None, None, 0, 0)), donate_argnums=(0, 1)
  )
  evaluate = jax.jit(jax.vmap(member_eval, in_axes=(0, 0, 0, None, None, None)))
  if not vectorize:  # one member at a time through the same program (a batch of one)

    def one(tree):
      return jax.tree.map(lambda x: jnp.asarray(x)[None], tree)

    def step_one(p, o, r, lr, f, a, shared, per_fold, b, k):
      return _take(
        step(one(p), one(o), one(r), one(lr), one(f), one(a), shared, per_fold, one(b), one(k)), 0
      )

    def eval_one(p, r, f, shared, per_fold, b):
      return _take(evaluate(one(p), one(r), one(f), shared, per_fold, b), 0)

    return tx, step_one, eval_one
  return tx, step, evaluate


def _stack(trees):
  return jax.tree.map(lambda *xs: jnp.stack(xs), *trees)


def _take(tree, k):
  return jax.tree.map(lambda x: x[k], tree)


# --------------------------------------------------------------------------- the sweep


def train_sweep(
  config: ml_collections.ConfigDict,
  cohort: store_reader.Cohort,
  members: Sequence[Member],
  *,
  vectorize: bool = True,
  select_epoch: bool = False,
) -> SweepResult:
  """Trains every member for config.train.epochs epochs; see the module docstring.

  select_epoch: after every epoch, score the pooled out-of-fold predictions (each
  development patient predicted by the member that holds it out; `config.train.val_metric`
  over all of them, far steadier than one small validation split) and keep every member's
  parameters from the epoch where an exponential moving average of that score peaked.
  The result then holds those parameters and predictions, and `best_epoch`.
  """
  members = list(members)
  if not members:
    raise ValueError('train_sweep: no members')
  config = config.copy_and_resolve_references()
  config.split.test_center = splits_lib.resolve_test_center(
    cohort.center, config.split.test_center
  )[0]
  t0 = time.time()
  tc, dc = config.train, config.data
  folds = sorted({m.fold for m in members})
  splits = _splits(config, cohort, folds)
  for f, s in splits.items():
    if not (s == 'train').any():
      raise ValueError(f'{config.store}: fold {f} has no training patients')
  fold_index = np.array([folds.index(m.fold) for m in members], np.int32)
  shared, per_fold, radiomics_dim, fitted = _fold_data(config, cohort, splits)
  layout = batching.bag_layout(cohort.patch_count)
  patch_counts = (
    cohort.patch_count if 'wsi' in config.model.modalities else np.zeros_like(cohort.patch_count)
  )
  development = np.flatnonzero(cohort.center != config.split.test_center)
  packing = batching.training_packing(
    patch_counts[development], batch_size=tc.batch_size, max_patches=dc.max_train_patches
  )
  eval_packing = batching.evaluation_packing(patch_counts, packing, max_patches=dc.max_eval_patches)
  events = (cohort.os_event == 1) & ~np.isnan(cohort.os_months)
  steps_per_epoch = len(
    _epoch_plan(config, members, splits, 0, layout, patch_counts, packing, events)
  )

  inits = []
  for m in members:
    c = config.copy_and_resolve_references()
    c.seed = m.seed
    graphdef, params, rest = nnx.split(
      train.build_model(c, radiomics_dim, int(cohort.patches.shape[1])), nnx.Param, ...
    )
    inits.append((params, rest))
  tx, step, evaluate = _steps(config, graphdef, steps_per_epoch, vectorize)
  params = [p for p, _ in inits]
  rests = [r for _, r in inits]
  states = [tx.init(p) for p in params]
  lrs = np.array([m.learning_rate for m in members], np.float32)
  if vectorize:
    params, states, rests = _stack(params), _stack(states), _stack(rests)
  logging.info(
    'sweep: %d members (%s), %d folds, radiomics width %d, %s',
    len(members),
    'vmapped' if vectorize else 'sequential',
    len(folds),
    radiomics_dim,
    f'{steps_per_epoch} steps/epoch',
  )

  eval_batches = batching.eval_batches(
    np.arange(cohort.num_patients), patch_counts, layout, eval_packing, seed=config.seed
  )

  def predict(params):
    """(K, P) response logits and log-risks of every member for every patient."""
    logits = np.full((len(members), cohort.num_patients), np.nan)
    risks = np.full_like(logits, np.nan)
    for b in eval_batches:
      rows = b.patient[b.patient_mask]
      if vectorize:
        lg, rk = jax.device_get(evaluate(params, rests, fold_index, shared, per_fold, b.tree()))
      else:
        got = jax.device_get(
          [
            evaluate(params[k], rests[k], fold_index[k], shared, per_fold, b.tree())
            for k in range(len(members))
          ]
        )
        lg, rk = np.stack([g[0] for g in got]), np.stack([g[1] for g in got])
      logits[:, rows] = lg[:, b.patient_mask]
      risks[:, rows] = rk[:, b.patient_mask]
    return logits, risks

  split_rows = np.stack([splits[m.fold] for m in members])
  best, smoothed, history, best_epoch = None, None, [], tc.epochs
  base_keys = [jax.random.key(m.seed) for m in members]
  train_loss = np.zeros((len(members), tc.epochs))
  for epoch in range(tc.epochs):
    plan = _epoch_plan(config, members, splits, epoch, layout, patch_counts, packing, events)
    keys = [
      [jax.random.fold_in(jax.random.fold_in(k, epoch), i) for k in base_keys]
      for i in range(len(plan))
    ]
    sums = np.zeros(len(members))
    counts = np.zeros(len(members))
    outs = []
    if vectorize:
      for i, (batch, active) in enumerate(plan):
        params, states, m = step(
          params,
          states,
          rests,
          lrs,
          fold_index,
          active,
          shared,
          per_fold,
          batch,
          jnp.stack(keys[i]),
        )
        outs.append((active, m['loss']))
    else:
      for k in range(len(members)):
        for i, (batch, active) in enumerate(plan):
          params[k], states[k], m = step(
            params[k],
            states[k],
            rests[k],
            lrs[k],
            fold_index[k],
            active[k],
            shared,
            per_fold,
            _take(batch, k),
            keys[i][k],
          )
          outs.append(
            (np.eye(len(members), dtype=bool)[k] & active[k], jnp.full(len(members), m['loss']))
          )
    for active, loss in jax.device_get(outs):
      sums += np.where(active, loss, 0.0)
      counts += active
    train_loss[:, epoch] = sums / np.maximum(counts, 1)
    selected = ''
    if select_epoch:
      logits, risks = predict(params)
      score = _oof_score(tc.val_metric, cohort, split_rows, logits, risks)
      smoothed = score if smoothed is None or math.isnan(smoothed) else 0.5 * (smoothed + score)
      if best is None or (math.isfinite(smoothed) and smoothed > best[0]):
        kept = jax.tree.map(jnp.copy, params)  # the steps donate `params`
        best = (smoothed, epoch + 1, kept, logits, risks)
        selected = ' *'
      history.append({'epoch': epoch + 1, 'oof_score': score, 'smoothed': smoothed})
      selected = f' out-of-fold {tc.val_metric} {score:.3f} (smoothed {smoothed:.3f}){selected}'
    logging.info(
      'sweep epoch %d/%d: mean train loss %.4f%s [%.1fs]',
      epoch + 1,
      tc.epochs,
      train_loss[:, epoch].mean(),
      selected,
      time.time() - t0,
    )

  if select_epoch:
    _, best_epoch, params, logits, risks = best
    logging.info('sweep: members kept from epoch %d (best smoothed out-of-fold score)', best_epoch)
  else:
    logits, risks = predict(params)
  if not vectorize:
    params = _stack(params)
  seconds = time.time() - t0
  table, by_fold, ensemble, frame = _report(config, cohort, members, logits, risks, split_rows)
  # Out-of-fold only: the log is read while recipes are still being chosen, and a test figure
  # there invites choosing on the test set (launch.evaluate reports it once the choice is made).
  logging.info(
    'sweep done in %.1fs: %d members, out-of-fold AUC %.3f',
    seconds,
    ensemble['members'],
    ensemble['oof_val_auc'],
  )
  return SweepResult(
    members,
    params,
    logits,
    risks,
    split_rows,
    train_loss,
    table,
    by_fold,
    ensemble,
    frame,
    seconds,
    fitted=fitted,
    radiomics_dim=radiomics_dim,
    best_epoch=best_epoch,
    selection_history=history,
  )


def centred_log_risk(risks: np.ndarray, splits: np.ndarray) -> np.ndarray:
  """(K, P) log-risks minus each member's training median: the Cox likelihood fixes a
  member's log-risk only up to a constant, so members are put on one scale before averaging."""
  medians = [np.median(risks[k, splits[k] == 'train']) for k in range(len(risks))]
  return risks - np.array(medians)[:, None]


def member_mean(logits: np.ndarray, risks: np.ndarray, splits: np.ndarray):
  """The ensemble's prediction: mean logit and mean median-centred log-risk over members."""
  return logits.mean(0), centred_log_risk(risks, splits).mean(0)


def out_of_fold(values: np.ndarray, splits: np.ndarray) -> np.ndarray:
  """(P,) each patient's value from the member(s) validating on it; NaN for the others."""
  val = splits == 'val'
  total = np.where(val, values, 0.0).sum(0)
  return np.where(val.any(0), total / np.maximum(val.sum(0), 1), np.nan)


def _oof_score(metric_name, cohort, splits, logits, risks) -> float:
  """The validation metric over every development patient's out-of-fold prediction."""
  oof_logit = out_of_fold(logits, splits)
  oof_risk = out_of_fold(centred_log_risk(risks, splits), splits)
  rows = ~np.isnan(oof_logit)
  auc = metrics.labelled_auc_or_nan(cohort.response[rows], oof_logit[rows])
  cindex = metrics.cindex_or_nan(cohort.os_months[rows], cohort.os_event[rows], oof_risk[rows])
  return train.validation_metric(metric_name, auc, cindex)


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
  ens_logit, ens_risk = member_mean(logits, risks, splits)
  test = cohort.center == config.split.test_center
  oof = out_of_fold(logits, splits)
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
  from pathlib import Path

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
    'train_loss': result.train_loss.tolist(),
  }
  (workdir / 'sweep.json').write_text(json.dumps(summary, indent=2, default=float) + '\n')
  result.predictions.to_parquet(workdir / 'predictions.parquet', index=False)
