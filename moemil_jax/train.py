"""Training loop: split once, plain `jax.jit` around the whole step, orbax best/latest.

The step receives only index arrays; bags, features and labels stay on the device. Host
RNG streams are derived from (seed, epoch) and device keys from (seed, epoch, step), so a
run resumed from the latest checkpoint (saved at the end of an epoch) continues exactly as
the uninterrupted run would have.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import orbax.checkpoint as ocp
import pandas as pd
from absl import logging
from flax import nnx

from moemil_jax import (
  batching,
  bundle,
  losses,
  metrics,
  models,
  parallel,
  preprocess,
  splits,
  store_reader,
)
from moemil_jax import device_data as device_data_lib

PREDICTIONS = 'predictions.parquet'
RUN_JSON = 'run.json'


# --------------------------------------------------------------------------- model, optimizer, steps


def build_model(config, radiomics_dim: int, patch_dim: int = 1024) -> models.MoEMIL:
  """The model for these input widths: the store's patch embedding width (1,024 for the
  ResNet50-layer3 trunk) and the selected radiomics columns."""
  return models.MoEMIL(
    config.model,
    radiomics_dim=radiomics_dim,
    wsi_dim=patch_dim,
    slide_vector_dim=device_data_lib.slide_vector_width(config.data),
    rngs=nnx.Rngs(params=config.seed),
  )


def make_optimizer(tc, steps_per_epoch: int) -> optax.GradientTransformation:
  total = max(tc.epochs * steps_per_epoch, 1)
  warmup = min(int(tc.warmup_epochs * steps_per_epoch), total - 1)
  schedule = optax.warmup_cosine_decay_schedule(
    0.0,
    tc.learning_rate,
    warmup_steps=max(warmup, 0),
    decay_steps=total,
    end_value=tc.learning_rate * 0.01,
  )
  return optax.chain(
    optax.clip_by_global_norm(tc.grad_clip), optax.adamw(schedule, weight_decay=tc.weight_decay)
  )


def make_loss_fn(config, graphdef, *, mesh=None, gather_inputs=batching.gather_inputs):
  """The training loss, (params, rest, data, batch, key) -> (loss, terms).

  Shared by training and sweeps (which pass their own per-fold `gather_inputs`).
  """
  dtype = jnp.dtype(config.model.compute_dtype)
  weights = {k: float(config.loss[k]) for k in ('response', 'survival', 'instance', 'gate_balance')}
  loss_kw = dict(
    ties=config.loss.ties, k=config.loss.instance_k, subtyping=config.loss.instance_subtyping
  )

  def loss_fn(params, rest, data, batch, key):
    model = nnx.merge(graphdef, params, rest)
    inputs, targets = gather_inputs(data, batch, dtype, mesh)
    out = model(inputs, rngs=nnx.Rngs(dropout=key))
    out, targets = parallel.gather_for_loss(out, targets, mesh)  # Cox sorts the global batch
    return losses.total_loss(out, targets, weights, **loss_kw)

  return loss_fn


@functools.lru_cache(maxsize=8)
def compiled_steps(
  config_json: str, radiomics_dim: int, steps_per_epoch: int, patch_dim: int = 1024
):
  """Jitted train/eval steps, cached so runs with the same config share compilations."""
  config = ml_collections.ConfigDict(json.loads(config_json))
  graphdef, _, _ = nnx.split(build_model(config, radiomics_dim, patch_dim), nnx.Param, ...)
  tx = make_optimizer(config.train, steps_per_epoch)
  dtype = jnp.dtype(config.model.compute_dtype)
  mesh = parallel.mesh_from_config(config)  # None: single device, as without config.mesh
  loss_fn = make_loss_fn(config, graphdef, mesh=mesh)

  @functools.partial(jax.jit, donate_argnums=(0, 1))
  def train_step(params, opt_state, rest, data, batch, key):
    (loss, terms), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, rest, data, batch, key)
    updates, opt_state = tx.update(grads, opt_state, params)
    params = optax.apply_updates(params, updates)
    params, opt_state = parallel.constrain_replicated((params, opt_state), mesh)
    return params, opt_state, {'loss': loss, 'grad_norm': optax.tree.norm(grads), **terms}

  @jax.jit
  def eval_step(params, rest, data, batch):
    model = nnx.merge(graphdef, params, rest)
    inputs, _ = batching.gather_inputs(data, batch, dtype, mesh)
    out = model(inputs, rngs=None)
    return parallel.constrain_replicated(
      {k: out[k] for k in ('response_logit', 'log_risk', 'gates')}, mesh
    )

  return tx, train_step, eval_step


# --------------------------------------------------------------------------- metrics


def validation_metric(name: str, auc: float, cindex: float) -> float:
  if name == 'auc':
    return auc
  if name == 'cindex':
    return cindex
  if name == 'auc+cindex':
    vals = [v for v in (auc, cindex) if not math.isnan(v)]
    return float(np.mean(vals)) if vals else float('nan')
  raise ValueError(f"train.val_metric {name!r}: use 'auc', 'cindex' or 'auc+cindex'")


# --------------------------------------------------------------------------- checkpoints


def checkpoint_managers(workdir: Path):
  """(latest, best) orbax managers under <workdir>/checkpoints, one checkpoint each."""

  def opts():
    return ocp.CheckpointManagerOptions(max_to_keep=1, create=True)

  root = workdir / 'checkpoints'
  return (
    ocp.CheckpointManager((root / 'latest').resolve(), options=opts()),
    ocp.CheckpointManager((root / 'best').resolve(), options=opts()),
  )


def save_checkpoint(mgr, step, params, opt_state, meta):
  """Async save of parameters, optimiser state and the JSON run state (epoch, best, history)."""
  tree = {'params': nnx.to_pure_dict(params), 'opt_state': opt_state}
  mgr.save(
    step, args=ocp.args.Composite(state=ocp.args.StandardSave(tree), meta=ocp.args.JsonSave(meta))
  )


def restore_checkpoint(mgr, step, params, opt_state):
  """Restores into the given structures; returns (params, opt_state, run state)."""
  target = {'params': nnx.to_pure_dict(params), 'opt_state': opt_state}
  abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, target)
  got = mgr.restore(
    step,
    args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract), meta=ocp.args.JsonRestore()),
  )
  nnx.replace_by_pure_dict(params, got.state['params'])
  return params, got.state['opt_state'], dict(got.meta)


# --------------------------------------------------------------------------- the run


@dataclasses.dataclass
class RunData:
  """Everything the loop reads: the cohort, its device arrays and the fixed step shapes."""

  cohort: store_reader.Cohort
  device_data: device_data_lib.DeviceData
  layout: batching.BagLayout
  patch_counts: np.ndarray  # per patient; zeros for models without a WSI branch
  train_ids: np.ndarray
  val_ids: np.ndarray
  events: np.ndarray  # (P,) bool, an observed OS event
  train_packing: batching.Packing
  eval_packing: batching.Packing
  split_counts: dict[str, int]

  def train_batches(self, config, epoch: int) -> list[batching.Batch]:
    """The epoch's random batches, from (seed, epoch) alone (a resumed run sees the same)."""
    return batching.train_batches(
      self.train_ids,
      self.patch_counts,
      self.layout,
      self.train_packing,
      rng=np.random.default_rng([config.seed, epoch]),
      events=self.events,
      min_events_per_batch=int(config.train.get('min_events_per_batch', 0)),
    )

  def eval_batches(self, patients: np.ndarray, seed: int) -> list[batching.Batch]:
    return batching.eval_batches(
      patients, self.patch_counts, self.layout, self.eval_packing, seed=seed
    )


def load_data(config, mesh) -> RunData:
  """Reads the store (each process only its devices' bags), splits, fits preprocessing on
  the training patients and puts the arrays on the device; fixes the step shapes."""
  store_dir = Path(config.store).resolve()
  tc, dc = config.train, config.data
  groups = parallel.bag_groups(config, mesh)
  own_groups = parallel.local_groups(mesh, groups)
  # Slide prototypes are fitted on every training patient's patches, so with them every
  # process reads every bag; without them each reads only its own devices' bags.
  every_bag = jax.process_count() == 1 or int(dc.get('slide_prototypes', 0)) > 0
  if jax.process_count() > 1 and every_bag:
    logging.info('data.slide_prototypes > 0: every process reads every bag')
  cohort = store_reader.load_store(
    store_dir,
    bags_to_read=None
    if every_bag
    else lambda counts: np.isin(batching.bag_layout(counts, groups).group, own_groups),
  )
  layout = batching.bag_layout(cohort.patch_count, groups)
  preprocess.harmonise(cohort, dc)
  cohort.split = splits.assign_splits(
    cohort,
    test_center=config.split.test_center,
    val_fraction=config.split.val_fraction,
    seed=config.split.seed,
    folds=config.split.folds,
    fold=config.split.fold,
  )
  counts = {s: int((cohort.split == s).sum()) for s in splits.SPLITS}
  logging.info('split: %s', counts)
  if counts['train'] == 0:
    raise splits.SplitError(
      f'{store_dir}: no training patients (center != {config.split.test_center})'
    )
  if counts['val'] == 0:
    raise splits.SplitError(
      f'{store_dir}: no validation patients (split.val_fraction={config.split.val_fraction}, '
      f'{counts["train"]} development patients), so no checkpoint can be chosen: raise '
      'split.val_fraction or train an ensemble (--ensemble=5), which selects out of fold'
    )
  data = device_data_lib.prepare(cohort, dc, seed=config.seed, layout=layout, mesh=mesh)
  patch_counts = (
    cohort.patch_count if 'wsi' in config.model.modalities else np.zeros_like(cohort.patch_count)
  )
  train_ids = np.flatnonzero(cohort.split == 'train')
  train_packing = batching.training_packing(
    patch_counts[train_ids],
    layout.group[train_ids],
    batch_size=tc.batch_size,
    groups=groups,
    max_patches=dc.max_train_patches,
  )
  return RunData(
    cohort=cohort,
    device_data=data,
    layout=layout,
    patch_counts=patch_counts,
    train_ids=train_ids,
    val_ids=np.flatnonzero(cohort.split == 'val'),
    events=(cohort.os_event == 1) & ~np.isnan(cohort.os_months),
    train_packing=train_packing,
    eval_packing=batching.evaluation_packing(
      patch_counts, train_packing, max_patches=dc.max_eval_patches
    ),
    split_counts=counts,
  )


def predict_patients(
  eval_step, params, rest, device_data, batches, num_patients, num_experts, mesh=None
):
  """Dispatches every evaluation step; returns a function that fetches the predictions
  (so the host can plan the next epoch while the device evaluates)."""
  data_tree = device_data.tree()
  outs = [
    (b, eval_step(params, rest, data_tree, parallel.shard_batch(b.tree(), mesh))) for b in batches
  ]

  def fetch():
    logit = np.full(num_patients, np.nan)
    risk = np.full(num_patients, np.nan)
    gates = np.full((num_patients, len(models.TASKS), num_experts), np.nan)
    for b, out in outs:
      out = jax.device_get(out)
      rows, mask = b.patient[b.patient_mask], b.patient_mask
      logit[rows] = out['response_logit'][mask]
      risk[rows] = out['log_risk'][mask]
      gates[rows] = out['gates'][mask]
    return logit, risk, gates

  return fetch


def _improved(meta: dict, metric: float) -> bool:
  """The first epoch, then only a finite metric above the best (NaN never improves)."""
  if meta['best_epoch'] is None:
    return True
  return math.isfinite(metric) and (meta['best_metric'] is None or metric > meta['best_metric'])


def _record_epoch(writer, meta, step_metrics, first_step, validation, log_every) -> dict:
  """TensorBoard scalars and the history entry of the epoch just run; its mean metrics."""
  auc, cidx, metric = validation
  for i, m in enumerate(step_metrics):
    if (first_step + i + 1) % log_every == 0:
      for k, v in m.items():
        writer.add_scalar(f'train/{k}', float(v), first_step + i + 1)
  means = {k: float(np.mean([x[k] for x in step_metrics])) for k in step_metrics[0]}
  epoch = meta['epoch'] + 1
  for k, v in means.items():
    writer.add_scalar(f'epoch/train_{k}', v, epoch)
  writer.add_scalar('epoch/val_auc', auc, epoch)
  writer.add_scalar('epoch/val_cindex', cidx, epoch)
  meta['epoch'] = epoch
  meta['history'].append(
    {
      'epoch': epoch,
      'train_loss': _finite_or_none(means['loss']),
      'val_auc': _finite_or_none(auc),
      'val_cindex': _finite_or_none(cidx),
      'val_metric': _finite_or_none(metric),
    }
  )
  return means


def write_outputs(config, workdir: Path, rd: RunData, model_state, eval_step, mesh, summary):
  """Scores every patient with the given (best) parameters and writes predictions.parquet,
  run.json (the config, the split, `summary` of training) and the model bundle."""
  params, rest = model_state
  cohort, device_data = rd.cohort, rd.device_data
  logit, risk, gates = predict_patients(
    eval_step,
    params,
    rest,
    device_data,
    rd.eval_batches(np.arange(cohort.num_patients), config.seed),
    cohort.num_patients,
    config.model.num_experts,
    mesh,
  )()
  frame = predictions_frame(config.name, cohort, logit, risk, gates)
  summary = dict(summary)
  padding = summary.pop('train_padding')
  run_info = {
    'model': config.name,
    'store': str(Path(config.store).resolve()),
    'seed': int(config.seed),
    'config': config.to_dict(),
    **summary,
    'split_counts': rd.split_counts,
    'step_shape': {
      'bag_groups': rd.layout.groups,
      'patient_slots': rd.train_packing.rows,
      'train_patch_slots': rd.train_packing.capacity,
      'eval_patch_slots': rd.eval_packing.capacity,
      'train_padding': padding,
    },
    'radiomics_columns': device_data.radiomics_columns,
    'processes': jax.process_count(),
    'bag_groups': rd.layout.groups,
    'harmonise': preprocess.harmonise_mode(config.data),
  }
  if parallel.is_writer():
    frame.to_parquet(workdir / PREDICTIONS, index=False)
    (workdir / RUN_JSON).write_text(json.dumps(run_info, indent=2, default=_jsonable) + '\n')
    member = bundle.Member(
      'best',
      _host_tree(nnx.to_pure_dict(params)),
      device_data.fitted,
      int(device_data.radiomics.shape[1]),
    )
    bundle.write(workdir, config, [member], bundle.operating_points(frame), config.store)
  prob = frame.response_prob.to_numpy()
  final_auc = {
    split: metrics.labelled_auc_or_nan(
      cohort.response[cohort.split == split], prob[cohort.split == split]
    )
    for split in splits.SPLITS
  }
  return {**run_info, 'final_auc': final_auc}


@dataclasses.dataclass
class TrainState:
  """What changes during training: parameters, optimiser state and the run's JSON state
  (epoch, step, best epoch and metric, patience count, history), checkpointed together."""

  params: Any
  rest: Any  # non-trainable model state (nnx.split's remainder)
  opt_state: Any
  meta: dict[str, Any]


def create_train_state(config, rd: RunData, mesh, steps_per_epoch: int):
  """(train_step, eval_step, a fresh TrainState): the model built at the store's widths, the
  compiled steps, parameters committed to their devices (as restored ones are, so that both
  share one compiled program)."""
  radiomics_dim = int(rd.device_data.radiomics.shape[1])
  patch_dim = int(rd.device_data.patches.shape[1])
  config_json = json.dumps(config.to_dict(), sort_keys=True)
  tx, train_step, eval_step = compiled_steps(config_json, radiomics_dim, steps_per_epoch, patch_dim)
  _, params, rest = nnx.split(build_model(config, radiomics_dim, patch_dim), nnx.Param, ...)
  opt_state = tx.init(params)
  params, rest, opt_state = (
    parallel.replicate((params, rest, opt_state), mesh)
    if mesh is not None
    else jax.device_put((params, rest, opt_state), jax.devices()[0])
  )
  logging.info(
    'model %s: %d parameters, modalities %s; steps of %d patient and %d patch slots per '
    'bag group (%d groups), about %d steps per epoch',
    config.name,
    sum(x.size for x in jax.tree.leaves(params)),
    tuple(config.model.modalities),
    rd.train_packing.rows,
    rd.train_packing.capacity,
    rd.layout.groups,
    steps_per_epoch,
  )
  meta = {
    'epoch': 0,
    'step': 0,
    'best_metric': None,
    'best_epoch': None,
    'bad_epochs': 0,
    'done': False,
    'history': [],
  }
  return train_step, eval_step, TrainState(params, rest, opt_state, meta)


def restore_or_start(state: TrainState, latest_mgr, resume: bool, workdir: Path) -> TrainState:
  """The latest checkpoint when resuming; refuses to overwrite a run otherwise."""
  if latest_mgr.latest_step() is None:
    return state
  if not resume:
    raise FileExistsError(
      f'{workdir}/checkpoints already holds a run: pass --resume or use a fresh --workdir'
    )
  params, opt_state, meta = restore_checkpoint(
    latest_mgr, latest_mgr.latest_step(), state.params, state.opt_state
  )
  logging.info('resumed from epoch %d (step %d)', meta['epoch'], meta['step'])
  return TrainState(params, state.rest, opt_state, meta)


def train_epoch(train_step, state: TrainState, data_tree, plan, key, mesh):
  """Dispatches every step of the epoch without waiting for the device; returns the step
  metrics (device arrays) and the (patch slots, real patches) it used."""
  step_metrics, slots, real = [], 0, 0
  for i, batch in enumerate(plan):
    state.params, state.opt_state, m = train_step(
      state.params,
      state.opt_state,
      state.rest,
      data_tree,
      parallel.shard_batch(batch.tree(), mesh),
      jax.random.fold_in(key, i),
    )
    step_metrics.append(m)
    slots += batch.patch_segment.size
    real += batch.real_slots()
  return step_metrics, slots, real


def validation_scores(config, rd: RunData, fetch) -> tuple[float, float, float]:
  """(AUC, C-index, the selection metric) on the validation patients; `fetch` is the epoch's
  one host sync."""
  logit, risk, _ = fetch()
  ids, cohort = rd.val_ids, rd.cohort
  auc = metrics.labelled_auc_or_nan(cohort.response[ids], logit[ids])
  cidx = metrics.cindex_or_nan(cohort.os_months[ids], cohort.os_event[ids], risk[ids])
  return auc, cidx, validation_metric(config.train.val_metric, auc, cidx)


def update_best(state: TrainState, metric: float, best_mgr, patience: int) -> bool:
  """Saves "best" when the metric improved; counts toward early stopping otherwise."""
  meta = state.meta
  if _improved(meta, metric):
    meta.update(best_metric=_finite_or_none(metric), best_epoch=meta['epoch'], bad_epochs=0)
    save_checkpoint(best_mgr, meta['epoch'], state.params, state.opt_state, meta)
    return True
  meta['bad_epochs'] += 1
  if patience and meta['bad_epochs'] >= patience:
    meta['done'] = True
    logging.info('early stopping: no improvement for %d epochs', patience)
  return False


def train_and_evaluate(
  config: ml_collections.ConfigDict,
  workdir: str | Path,
  *,
  resume: bool = False,
  stop_after_epochs: int | None = None,
) -> dict[str, Any]:
  """Trains, keeps best/latest checkpoints, writes predictions.parquet and run.json.

  stop_after_epochs: end this call after that many epochs (saving "latest", as a job told
  to stop would); a later call with resume=True finishes the run.
  """
  from tensorboardX import SummaryWriter

  # Setup: data, model, optimiser, checkpoints.
  workdir = Path(workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  if not config.store:
    raise ValueError('config.store is empty: pass --store or --config.store')
  tc = config.train
  parallel.initialize_distributed(config)  # multi-host: before any other JAX call
  mesh = parallel.mesh_from_config(config)
  parallel.check_batch_size(tc.batch_size, mesh)
  rd = load_data(config, mesh)
  first_plan = rd.train_batches(config, 0)
  # Later epochs differ by a step or so: the schedule's unit.
  train_step, eval_step, state = create_train_state(config, rd, mesh, len(first_plan))
  latest_mgr, best_mgr = checkpoint_managers(workdir)
  state = restore_or_start(state, latest_mgr, resume, workdir)
  meta = state.meta
  every = max(int(tc.get('checkpoint_every', 10)), 1)
  writer = SummaryWriter(str(workdir / 'tensorboard')) if parallel.is_writer() else _NoWriter()
  val_batches = rd.eval_batches(rd.val_ids, config.seed)
  base_key = jax.random.key(config.seed)
  data_tree = rd.device_data.tree()
  epochs_this_call = slots = real = 0
  t0 = time.time()
  plan = first_plan if meta['epoch'] == 0 else rd.train_batches(config, meta['epoch'])
  while not meta['done'] and meta['epoch'] < tc.epochs:
    epoch, first_step = meta['epoch'], meta['step']
    step_metrics, epoch_slots, epoch_real = train_epoch(
      train_step, state, data_tree, plan, jax.random.fold_in(base_key, epoch), mesh
    )
    meta['step'] += len(plan)
    slots, real = slots + epoch_slots, real + epoch_real

    # Evaluation: dispatched, then the next epoch is planned while the device works.
    fetch = predict_patients(
      eval_step,
      state.params,
      state.rest,
      rd.device_data,
      val_batches,
      rd.cohort.num_patients,
      config.model.num_experts,
      mesh,
    )
    plan = rd.train_batches(config, epoch + 1) if epoch + 1 < tc.epochs else []
    auc, cidx, metric = validation_scores(config, rd, fetch)
    train_means = _record_epoch(
      writer, meta, jax.device_get(step_metrics), first_step, (auc, cidx, metric), tc.log_every
    )

    # Checkpoints: "best" on improvement, "latest" every few epochs and at the end.
    improved = update_best(state, metric, best_mgr, tc.patience)
    logging.info(
      'epoch %d/%d: loss %.4f (resp %.4f, surv %.4f) val auc %.3f cindex %.3f%s [%.1fs]',
      meta['epoch'],
      tc.epochs,
      train_means['loss'],
      train_means['response'],
      train_means['survival'],
      auc,
      cidx,
      ' *' if improved else '',
      time.time() - t0,
    )
    epochs_this_call += 1
    stopping = stop_after_epochs is not None and epochs_this_call >= stop_after_epochs
    last = meta['done'] or meta['epoch'] >= tc.epochs
    if meta['epoch'] % every == 0 or last or stopping:
      save_checkpoint(latest_mgr, meta['epoch'], state.params, state.opt_state, meta)
    if stopping and not last:
      latest_mgr.wait_until_finished()
      best_mgr.wait_until_finished()
      writer.close()
      logging.info('stopping after %d epochs as asked', epochs_this_call)
      return {'stopped_at_epoch': meta['epoch']}
  latest_mgr.wait_until_finished()
  best_mgr.wait_until_finished()
  padding = 1.0 - real / max(slots, 1)
  logging.info(
    'train_step compiled %d times, eval_step %d times; %.1f%% of training patch slots empty',
    train_step._cache_size(),
    eval_step._cache_size(),
    100 * padding,
  )

  # Predictions with the best checkpoint, for every patient; run.json; the model bundle.
  params, _, best_meta = restore_checkpoint(
    best_mgr, best_mgr.latest_step(), state.params, state.opt_state
  )
  run_info = write_outputs(
    config,
    workdir,
    rd,
    (params, state.rest),
    eval_step,
    mesh,
    {
      'best_step': int(best_meta['epoch']),
      'best_train_step': int(best_meta['step']),
      'val_metric': best_meta['best_metric'],
      'val_metric_name': tc.val_metric,
      'epochs_run': int(meta['epoch']),
      'compiled': {'train_step': train_step._cache_size(), 'eval_step': eval_step._cache_size()},
      'train_padding': padding if slots else None,
      'history': meta['history'],
    },
  )
  for split in splits.SPLITS:
    writer.add_scalar(f'final/{split}_auc', run_info['final_auc'][split], meta['epoch'])
  writer.close()
  logging.info(
    '%s %s and %s (best epoch %d, val %s %s)',
    'wrote' if parallel.is_writer() else 'process 0 writes',
    workdir / PREDICTIONS,
    workdir / RUN_JSON,
    best_meta['epoch'],
    tc.val_metric,
    'undefined' if best_meta['best_metric'] is None else f'{best_meta["best_metric"]:.3f}',
  )
  run_info.pop('final_auc')
  return {
    **run_info,
    'process_index': jax.process_index(),
    'patches_read': int(len(rd.cohort.patches)),
  }


class _NoWriter:
  """Stands in for the TensorBoard writer on processes other than 0."""

  def add_scalar(self, *args, **kwargs):
    pass

  def close(self):
    pass


def _host_tree(tree):
  """Device arrays (replicated ones too, on any process) as host numpy arrays."""
  return jax.tree.map(
    lambda x: np.asarray(x.addressable_data(0)) if isinstance(x, jax.Array) else np.asarray(x),
    tree,
  )


def _finite_or_none(x: float) -> float | None:
  return float(x) if math.isfinite(x) else None


def _jsonable(x):
  if isinstance(x, (np.integer, np.floating)):
    return x.item()
  if isinstance(x, (tuple, set)):
    return list(x)
  return str(x)


def predictions_frame(name, cohort: store_reader.Cohort, logit, risk, gates) -> pd.DataFrame:
  """One row per patient, columns as the evaluation contract asks (plus gate weights)."""
  frame = pd.DataFrame(
    {
      'patient_id': cohort.patient_id.astype(str),
      'center': cohort.center.astype(str),
      'split': cohort.split.astype(str),
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
