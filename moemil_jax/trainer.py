"""The one training loop: K stacked members on a `member` x `data` device mesh.

Every run trains here. A single model is K = 1 (its hold-out split), the default ensemble
K = folds x repeats, a sweep folds x seeds x learning rates. The state is always stacked
along a leading member axis and every step is one `jax.vmap`ped, jitted program:

  setup        per-fold preprocessing (fitted on that fold's training patients), the bag
               layout, the packed step shape, the models and optimiser states, the mesh;
  epoch loop   each member's batches (from (seed, epoch) alone, so a resumed run sees the
               same), a member whose epoch is shorter takes masked no-op steps;
  evaluation   every member predicts its validation patients; the selection score is the
               validation metric over all of them pooled (out of fold for an ensemble),
               smoothed, and the best epoch's parameters are kept for every member;
  checkpoints  orbax "latest" (every `train.checkpoint_every` epochs and at the end) and
               "best" of the stacked state, so a killed run resumes where it was.

The mesh (`parallel.training_mesh`) shards members over devices and, when the config asks
for bag groups, each member's batch over the data axis. Sharding only places the program:
the batches depend on the config alone, so a run gives the same predictions on 1 or 8
devices (to round-off). Outputs (predictions, run.json, bundle) are written by `train.py`.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import time
from pathlib import Path
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import orbax.checkpoint as ocp
from absl import logging
from flax import nnx

from moemil_jax import (
  batching,
  device_data,
  losses,
  metrics,
  models,
  parallel,
  preprocess,
  store_reader,
)
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
SELECTION_EMA = 0.5  # weight of the newest epoch in the smoothed selection score


@dataclasses.dataclass(frozen=True)
class Member:
  """One model of the stack: its validation fold, seed and learning rate."""

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
  """The store named by config.store, read once into host arrays, harmonised as configured."""
  if not config.store:
    raise ValueError('config.store is empty: pass --store or --config.store')
  cohort = store_reader.load_store(
    config.store, stain_views=int(config.data.get('stain_views', 0) or 0)
  )
  preprocess.harmonise(cohort, config.data)
  return cohort


# --------------------------------------------------------------------------- model, optimiser, loss


def build_model(config, radiomics_dim: int, patch_dim: int = 1024) -> models.MoEMIL:
  """The model for these input widths: the store's patch embedding width (1,024 for the
  ResNet50-layer3 trunk) and the selected radiomics columns."""
  return models.MoEMIL(
    config.model,
    radiomics_dim=radiomics_dim,
    wsi_dim=patch_dim,
    slide_vector_dim=device_data.slide_vector_width(config.data),
    rngs=nnx.Rngs(params=config.seed),
  )


def make_optimizer(tc, steps_per_epoch: int) -> optax.GradientTransformation:
  """AdamW on a warmup-cosine schedule with peak `tc.learning_rate`.

  `tc.slide_lr_multiplier` (default 1: the plain chain, unchanged) multiplies the final
  updates of the slide branch's parameters only (top-level modules `wsi`, `wsi_vector`,
  `slide_wide_response`, `slide_wide_survival` of models.MoEMIL): a per-branch learning rate
  (weight decay included, as AdamW scales it by the rate), after the global gradient clip. The
  labels come from the parameter tree's paths, so the optimiser is built before the params.
  """
  total = max(tc.epochs * steps_per_epoch, 1)
  warmup = min(int(tc.warmup_epochs * steps_per_epoch), total - 1)
  schedule = optax.warmup_cosine_decay_schedule(
    0.0,
    tc.learning_rate,
    warmup_steps=max(warmup, 0),
    decay_steps=total,
    end_value=tc.learning_rate * 0.01,
  )
  tx = optax.chain(
    optax.clip_by_global_norm(tc.grad_clip), optax.adamw(schedule, weight_decay=tc.weight_decay)
  )
  multiplier = float(tc.get('slide_lr_multiplier', 1.0))
  if multiplier == 1.0:
    return tx
  slide_modules = ('wsi', 'wsi_vector', 'slide_wide_response', 'slide_wide_survival')

  def scale_slide(updates, params=None):
    del params

    def leaf(path, u):
      head = path[0] if path else None
      name = getattr(head, 'key', getattr(head, 'name', None))
      return u * jnp.asarray(multiplier, u.dtype) if name in slide_modules else u

    return jax.tree_util.tree_map_with_path(leaf, updates)

  return optax.chain(tx, optax.stateless(scale_slide))


def member_inputs(data, batch, dtype, view=None):
  """batching.gather_inputs, with deep MRI features z-scored by the member's own fold.

  With stain views (patches (V, rows, D), config.data.stain_views) it reads view `view`,
  the original (0) when None."""
  if 'wsi_summary' in data and data['wsi_summary'].ndim == 3:  # each view's slide vectors
    data = {**data, 'wsi_summary': data['wsi_summary'][0 if view is None else view]}
  if data['patches'].ndim == 3:
    v, rows, d = data['patches'].shape
    data = {**data, 'patches': data['patches'].reshape(v * rows, d)}
    if view is not None:
      batch = {**batch, 'patch_index': batch['patch_index'] + view * rows}
  inputs, targets = batching.gather_inputs(data, batch, dtype)
  raw = data['mri_deep'][batch['patient']]
  z = (raw - data['deep_mean']) * data['deep_inv_std']
  inputs['mri_deep'] = (z * inputs['mri_deep_valid'][..., None]).astype(dtype)
  return inputs, targets


def make_loss_fn(config, graphdef):
  """The training loss of one member, (params, rest, data, batch, key) -> (loss, terms)."""
  dtype = jnp.dtype(config.model.compute_dtype)
  weights = {k: float(config.loss[k]) for k in ('response', 'survival', 'instance', 'gate_balance')}
  loss_kw = dict(
    ties=config.loss.ties, k=config.loss.instance_k, subtyping=config.loss.instance_subtyping
  )

  def loss_fn(params, rest, data, batch, key, view=None):
    model = nnx.merge(graphdef, params, rest)
    inputs, targets = member_inputs(data, batch, dtype, view)
    out = model(inputs, rngs=nnx.Rngs(dropout=key))
    return losses.total_loss(out, targets, weights, **loss_kw)

  return loss_fn


def validation_metric(name: str, auc: float, cindex: float) -> float:
  if name == 'auc':
    return auc
  if name == 'cindex':
    return cindex
  if name == 'auc+cindex':
    vals = [v for v in (auc, cindex) if not math.isnan(v)]
    return float(np.mean(vals)) if vals else float('nan')
  raise ValueError(f"train.val_metric {name!r}: use 'auc', 'cindex' or 'auc+cindex'")


# --------------------------------------------------------------------------- data


def member_splits(config, cohort, folds: Sequence[int]) -> dict[int, np.ndarray]:
  """Per fold: every patient's 'train' / 'val' / 'test' split."""
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
    counts = {s: int((out[f] == s).sum()) for s in splits_lib.SPLITS}
    if not counts['train']:
      raise splits_lib.SplitError(
        f'{config.store}: no training patients in fold {f} (center != {sc.test_center})'
      )
    if not counts['val']:
      raise splits_lib.SplitError(
        f'{config.store}: no validation patients (split.val_fraction={sc.val_fraction}, '
        f'{counts["train"]} development patients), so no epoch can be chosen: raise '
        'split.val_fraction or train an ensemble (--ensemble=5), which selects out of fold'
      )
  return out


def fold_data(config, cohort, splits: dict[int, np.ndarray], layout: batching.BagLayout):
  """(shared host arrays, per-fold host arrays stacked along a fold axis, radiomics width,
  {fold: preprocess.Fitted}): preprocessing fitted on each fold's training patients."""
  cpu = jax.local_devices(backend='cpu')[0]  # this process's own (multi-process runs)
  per_fold = {k: [] for k in PER_FOLD}
  fitted, shared = {}, None
  views = int(config.data.get('stain_views', 0) or 0)
  for f, split in splits.items():
    c = dataclasses.replace(cohort, split=split)
    d = device_data.prepare(c, config.data, seed=config.seed, device=cpu, layout=layout)
    fitted[f] = d.fitted
    for k in ('patch_mean', 'patch_inv_std', 'radiomics', 'has_radiomics', 'wsi_summary'):
      per_fold[k].append(np.asarray(getattr(d, k)))
    if views:  # (1 + views, P, W): the slide vectors of each view, prototypes from the original
      per_fold['wsi_summary'][-1] = device_data.view_slide_vectors(
        c, config.data, d.fitted, per_fold['wsi_summary'][-1], views
      )
    per_fold['deep_mean'].append(d.fitted.deep_mean.astype(np.float32))
    per_fold['deep_inv_std'].append((1.0 / d.fitted.deep_std).astype(np.float32))
    if shared is None:
      shared = {k: np.asarray(getattr(d, k)) for k in SHARED if k != 'mri_deep'}
    del d
  width = max(r.shape[1] for r in per_fold['radiomics'])
  per_fold['radiomics'] = [
    np.pad(r, ((0, 0), (0, width - r.shape[1]))) for r in per_fold['radiomics']
  ]
  shared['mri_deep'] = cohort.mri_deep.astype(np.float32)
  if views:  # (1 + views, rows, D): member_step picks one view per epoch
    shared['patches'] = device_data.view_patches(cohort, layout, shared['patches'], views)
  return shared, {k: np.stack(v) for k, v in per_fold.items()}, width, fitted


def _member_data(shared, per_fold, fold_index):
  return {**shared, **{k: v[fold_index] for k, v in per_fold.items()}}


@dataclasses.dataclass
class Plan:
  """The fixed step shapes and the host-side batch plans of a run."""

  layout: batching.BagLayout
  patch_counts: np.ndarray  # per patient; zeros for models without a WSI branch
  packing: batching.Packing
  eval_packing: batching.Packing
  events: np.ndarray  # (P,) bool, an observed OS event

  def epoch(self, config, members, splits, epoch: int):
    """Per step: stacked (K, ...) batches and the (K,) mask of members with a real batch.

    Every member's steps have the same packed shape, so members never pad to each other;
    one whose epoch has fewer steps gets empty (fully masked) steps at the end.
    """
    per_member = [
      batching.train_batches(
        np.flatnonzero(splits[m.fold] == 'train'),
        self.patch_counts,
        self.layout,
        self.packing,
        rng=np.random.default_rng([m.seed, epoch]),
        events=self.events,
        min_events_per_batch=int(config.train.get('min_events_per_batch', 0)),
      )
      for m in members
    ]
    empty = batching.empty_batch(self.layout, self.packing)
    steps = []
    for i in range(max(len(b) for b in per_member)):
      here = [b[i] if i < len(b) else empty for b in per_member]
      stacked = {k: np.stack([h.tree()[k] for h in here]) for k in here[0].tree()}
      real = sum(h.real_slots() for h in here)
      steps.append((stacked, np.array([i < len(b) for b in per_member]), real))
    return steps

  def eval_batches(self, patients, seed: int) -> list[batching.Batch]:
    return batching.eval_batches(
      patients, self.patch_counts, self.layout, self.eval_packing, seed=seed
    )


def make_plan(config, cohort, groups: int) -> Plan:
  tc, dc = config.train, config.data
  layout = batching.bag_layout(cohort.patch_count, groups)
  patch_counts = (
    cohort.patch_count if 'wsi' in config.model.modalities else np.zeros_like(cohort.patch_count)
  )
  development = np.flatnonzero(cohort.center != config.split.test_center)
  packing = batching.training_packing(
    patch_counts[development],
    layout.group[development],
    batch_size=tc.batch_size,
    groups=groups,
    max_patches=dc.max_train_patches,
  )
  return Plan(
    layout,
    patch_counts,
    packing,
    batching.evaluation_packing(patch_counts, packing, max_patches=dc.max_eval_patches),
    (cohort.os_event == 1) & ~np.isnan(cohort.os_months),
  )


# --------------------------------------------------------------------------- steps


def make_steps(config, graphdef, steps_per_epoch: int, mesh: jax.sharding.Mesh):
  """(optimiser, train step, eval step), both vmapped over the member axis and jitted for
  the mesh: member state stays split over `member`, metrics and predictions come back
  replicated (every process can read them)."""
  tc = config.train.copy_and_resolve_references()
  tc.learning_rate = 1.0  # members scale the updates by their own rate
  tx = make_optimizer(tc, steps_per_epoch)
  dtype = jnp.dtype(config.model.compute_dtype)
  loss_fn = make_loss_fn(config, graphdef)

  def member_step(
    params, opt_state, rest, lr, fold_index, seed, active, shared, per_fold, batch, t
  ):
    data = _member_data(shared, per_fold, fold_index)
    key = jax.random.fold_in(jax.random.fold_in(jax.random.key(seed), t[0]), t[1])
    # Stain views: epoch t[0] of the member reads view (seed + epoch) % V of every patch.
    view = (seed + t[0]) % data['patches'].shape[0] if data['patches'].ndim == 3 else None
    (loss, terms), grads = jax.value_and_grad(loss_fn, has_aux=True)(
      params, rest, data, batch, key, view
    )
    updates, new_state = tx.update(grads, opt_state, params)
    updates = jax.tree.map(lambda u: lr * u, updates)
    new_params = optax.apply_updates(params, updates)

    def keep(new, old):
      return jax.tree.map(lambda a, b: jnp.where(active, a, b), new, old)

    return keep(new_params, params), keep(new_state, opt_state), {'loss': loss, **terms}

  def member_eval(params, rest, fold_index, shared, per_fold, batch):
    model = nnx.merge(graphdef, params, rest)
    inputs, _ = member_inputs(_member_data(shared, per_fold, fold_index), batch, dtype)
    out = model(inputs, rngs=None)
    return out['response_logit'], out['log_risk'], out['gates']

  member = parallel.member_sharding(mesh)
  step = jax.jit(
    jax.vmap(member_step, in_axes=(0, 0, 0, 0, 0, 0, 0, None, None, 0, None)),
    donate_argnums=(0, 1),
    out_shardings=(member, member, parallel.replicated(mesh)),
  )
  evaluate = jax.jit(
    jax.vmap(member_eval, in_axes=(0, 0, 0, None, None, None)),
    out_shardings=parallel.replicated(mesh),
  )
  return tx, step, evaluate


def _stack(trees):
  return jax.tree.map(lambda *xs: np.stack([np.asarray(x) for x in xs]), *trees)


# --------------------------------------------------------------------------- checkpoints


class Checkpoints:
  """orbax "latest" and "best" of the stacked state under <workdir>/checkpoints, one each,
  with the run's JSON state (epoch, selection, history) beside the arrays."""

  def __init__(self, workdir: Path):
    self.root = root = Path(workdir) / 'checkpoints'
    opts = ocp.CheckpointManagerOptions(max_to_keep=1, create=True)
    self.latest = ocp.CheckpointManager((root / 'latest').resolve(), options=opts)
    self.best = ocp.CheckpointManager((root / 'best').resolve(), options=opts)

  def save(self, manager, epoch: int, tree, meta: dict) -> None:
    """Saves asynchronously. orbax writes the JSON in the background while training goes on
    and mutates `meta`, so a deep copy is saved: the state as it is now, not as it is then."""
    meta = copy.deepcopy(meta)
    manager.save(
      epoch,
      args=ocp.args.Composite(state=ocp.args.StandardSave(tree), meta=ocp.args.JsonSave(meta)),
    )

  def restore(self, manager, like):
    """(the tree, shaped and sharded like `like`; the JSON state) of the manager's step."""
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, like)
    got = manager.restore(
      manager.latest_step(),
      args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract), meta=ocp.args.JsonRestore()
      ),
    )
    return got.state, dict(got.meta)

  def wait(self) -> None:
    self.latest.wait_until_finished()
    self.best.wait_until_finished()


# --------------------------------------------------------------------------- selection


def centred_log_risk(risks: np.ndarray, splits: np.ndarray) -> np.ndarray:
  """(K, P) log-risks minus each member's training median: the Cox likelihood fixes a
  member's log-risk only up to a constant, so members are put on one scale before averaging.
  Training patients not scored (a single model's epochs score only its validation split)
  are skipped; a member with none scored is left as it is (one member needs no scale)."""
  medians = []
  for k in range(len(risks)):
    train = risks[k, splits[k] == 'train']
    train = train[np.isfinite(train)]
    medians.append(np.median(train) if train.size else 0.0)
  return risks - np.array(medians)[:, None]


def member_mean(logits: np.ndarray, risks: np.ndarray, splits: np.ndarray):
  """The ensemble's prediction: mean logit and mean median-centred log-risk over members."""
  return logits.mean(0), centred_log_risk(risks, splits).mean(0)


def out_of_fold(values: np.ndarray, splits: np.ndarray) -> np.ndarray:
  """(P,) each patient's value from the member(s) validating on it; NaN for the others."""
  val = splits == 'val'
  total = np.where(val, values, 0.0).sum(0)
  return np.where(val.any(0), total / np.maximum(val.sum(0), 1), np.nan)


def selection_scores(metric_name, cohort, splits, logits, risks) -> tuple[float, float, float]:
  """(AUC, C-index, the selection metric) over every member's validation patients pooled."""
  oof_logit = out_of_fold(logits, splits)
  oof_risk = out_of_fold(centred_log_risk(risks, splits), splits)
  rows = ~np.isnan(oof_logit)
  auc = metrics.labelled_auc_or_nan(cohort.response[rows], oof_logit[rows])
  cindex = metrics.cindex_or_nan(cohort.os_months[rows], cohort.os_event[rows], oof_risk[rows])
  return auc, cindex, validation_metric(metric_name, auc, cindex)


def _fresh_meta() -> dict[str, Any]:
  return {
    'epoch': 0,
    'step': 0,
    'smoothed': None,
    'best_score': None,
    'best_epoch': None,
    'bad_epochs': 0,
    'done': False,
    'train_loss': [],  # per epoch: (K,) mean training loss of each member
    'history': [],  # per epoch: pooled validation AUC, C-index, score, smoothed score
    'slots': 0,
    'real_slots': 0,
  }


def _select(meta: dict, auc: float, cidx: float, score: float, patience: int) -> bool:
  """Updates the smoothed score, the best epoch and early stopping; True on improvement.

  The first epoch always counts; after it only a finite smoothed score above the best does
  (a NaN never replaces the best)."""
  smoothed = meta['smoothed']
  if smoothed is None or not math.isfinite(smoothed):
    smoothed = score
  else:
    smoothed = SELECTION_EMA * score + (1 - SELECTION_EMA) * smoothed
  meta['smoothed'] = _finite_or_none(smoothed)
  meta['history'].append(
    {
      'epoch': meta['epoch'],
      'val_auc': _finite_or_none(auc),
      'val_cindex': _finite_or_none(cidx),
      'val_metric': _finite_or_none(score),
      'smoothed': _finite_or_none(smoothed),
    }
  )
  first = meta['best_epoch'] is None
  if first or (
    math.isfinite(smoothed) and (meta['best_score'] is None or smoothed > meta['best_score'])
  ):
    meta.update(best_score=_finite_or_none(smoothed), best_epoch=meta['epoch'], bad_epochs=0)
    return True
  meta['bad_epochs'] += 1
  if patience and meta['bad_epochs'] >= patience:
    meta['done'] = True
    logging.info('early stopping: no improvement for %d epochs', patience)
  return False


def _epoch_means(outs, real: np.ndarray) -> dict[str, np.ndarray]:
  """Per real member, the mean of every step metric over its active steps of the epoch."""
  sums, counts = {}, np.zeros(len(real))
  for active, m in outs:
    for k, v in m.items():
      sums[k] = sums.get(k, 0.0) + np.where(active, parallel.host(v), 0.0)
    counts += active
  return {k: (v / np.maximum(counts, 1))[real] for k, v in sums.items()}


def _finite_or_none(x) -> float | None:
  return float(x) if x is not None and math.isfinite(x) else None


# --------------------------------------------------------------------------- the run


@dataclasses.dataclass
class Result:
  members: list[Member]
  params: Any  # host pure dict, every leaf with a leading K axis (the selected epoch's)
  logits: np.ndarray  # (K, P) response logits, every patient
  log_risk: np.ndarray  # (K, P)
  gates: np.ndarray  # (K, P, tasks, experts)
  splits: np.ndarray  # (K, P) "train" / "val" / "test"
  fitted: dict  # fold -> preprocess.Fitted on that fold's training patients
  radiomics_dim: int  # the members' radiomics input width (the widest fold's selection)
  meta: dict  # the run's JSON state: epochs, selection history, training losses
  run_info: dict  # devices, mesh, compile counts, step shape, padding, seconds

  @property
  def best_epoch(self) -> int:
    return int(self.meta['best_epoch'])


class Stopped(Exception):
  """`fit(stop_after_epochs=N)` ended the call after N epochs, checkpoints saved."""

  def __init__(self, epoch: int):
    super().__init__(f'stopped after epoch {epoch}')
    self.epoch = epoch


@dataclasses.dataclass
class Setup:
  """What the loop reads and never changes: members (padded to the mesh), their splits and
  data on the mesh, the step shapes and the compiled steps."""

  config: ml_collections.ConfigDict
  cohort: store_reader.Cohort
  members: list[Member]  # the real members
  stacked: list[Member]  # the members, then idle copies up to a multiple of the member axis
  splits: dict[int, np.ndarray]  # fold -> every patient's split
  plan: Plan
  mesh: jax.sharding.Mesh
  fitted: dict  # fold -> preprocess.Fitted
  radiomics_dim: int
  step: Any  # make_steps' jitted programs
  evaluate: Any
  rests: Any  # the members' non-trainable model state, on the mesh
  member_args: tuple  # per member: learning rate, fold index, seed (on the mesh)
  data: tuple  # (shared, per_fold) on the mesh

  @property
  def real(self) -> np.ndarray:
    return np.arange(len(self.stacked)) < len(self.members)

  @property
  def split_rows(self) -> np.ndarray:
    return np.stack([self.splits[m.fold] for m in self.stacked])


def setup(config, cohort, members: list[Member]):
  """(Setup, initial parameters, optimiser states): splits and per-fold preprocessing, step
  shapes, the mesh, the members' models and optimisers, all placed on the mesh."""
  folds = sorted({m.fold for m in members})
  splits = member_splits(config, cohort, folds)
  groups = int(config.data.get('bag_groups', 0) or 0) or 1
  plan = make_plan(config, cohort, groups)
  shared, per_fold, radiomics_dim, fitted = fold_data(config, cohort, splits, plan.layout)
  mesh = parallel.training_mesh(config, len(members), groups)
  stacked = members + [members[-1]] * (parallel.padded_members(mesh, len(members)) - len(members))
  steps_per_epoch = len(plan.epoch(config, stacked, splits, 0))
  inits = []
  for m in stacked:
    c = config.copy_and_resolve_references()
    c.seed = m.seed
    model = build_model(c, radiomics_dim, int(shared['patches'].shape[-1]))
    inits.append(nnx.split(model, nnx.Param, ...))
  graphdef = inits[0][0]
  tx, step, evaluate = make_steps(config, graphdef, steps_per_epoch, mesh)
  on_member = parallel.member_sharding(mesh)
  params, rests = parallel.put(
    (_stack([i[1] for i in inits]), _stack([i[2] for i in inits])), on_member
  )
  opt_state = jax.jit(jax.vmap(tx.init), out_shardings=on_member)(params)
  member_args = parallel.put(
    (
      np.array([m.learning_rate for m in stacked], np.float32),
      np.array([folds.index(m.fold) for m in stacked], np.int32),
      np.array([m.seed for m in stacked], np.int32),
    ),
    on_member,
  )
  data = parallel.put((shared, per_fold), parallel.replicated(mesh))
  logging.info(
    'training %d member%s (%d folds, %s), %d parameters each, %d steps/epoch, mesh %s '
    'over %d of %d devices%s',
    len(members),
    's' if len(members) > 1 else '',
    len(folds),
    config.name,
    sum(x[0].size for x in jax.tree.leaves(params)),
    steps_per_epoch,
    dict(mesh.shape),
    mesh.devices.size,
    jax.device_count(),
    f' ({len(stacked) - len(members)} idle padding members)' if len(stacked) > len(members) else '',
  )
  run = Setup(
    config,
    cohort,
    members,
    stacked,
    splits,
    plan,
    mesh,
    {f: fitted[f] for f in folds},
    radiomics_dim,
    step,
    evaluate,
    rests,
    member_args,
    data,
  )
  return run, params, opt_state


def train_epoch(run: Setup, params, opt_state, meta: dict):
  """One epoch of every member, each step dispatched without waiting for the device;
  returns the new state and each real member's mean loss terms."""
  epoch, outs = meta['epoch'], []
  on_member, on_batch = parallel.member_sharding(run.mesh), parallel.batch_sharding(run.mesh)
  for i, (batch, active, real_slots) in enumerate(
    run.plan.epoch(run.config, run.stacked, run.splits, epoch)
  ):
    params, opt_state, m = run.step(
      params,
      opt_state,
      run.rests,
      *run.member_args,
      parallel.put(active, on_member),
      *run.data,
      parallel.put(batch, on_batch),
      parallel.put(np.array([epoch, i], np.int32), parallel.replicated(run.mesh)),
    )
    outs.append((active, m))
    meta['slots'] += int(batch['patch_segment'][active].size)
    meta['real_slots'] += int(real_slots)
  meta['step'] += len(outs)
  meta['epoch'] = epoch + 1
  terms = _epoch_means(outs, run.real)
  meta['train_loss'].append(terms['loss'].tolist())
  return params, opt_state, terms


def predict(run: Setup, params, patients) -> tuple[np.ndarray, ...]:
  """(K, P) logits and log-risks, (K, P, tasks, experts) gates of every stacked member;
  NaN for the patients not asked for."""
  k, p = len(run.stacked), run.cohort.num_patients
  logits, risks = np.full((k, p), np.nan), np.full((k, p), np.nan)
  gates = np.full((k, p, len(models.TASKS), run.config.model.num_experts), np.nan)
  on_all = parallel.replicated(run.mesh)
  outs = [
    (
      b,
      run.evaluate(
        params, run.rests, run.member_args[1], *run.data, parallel.put(b.tree(), on_all)
      ),
    )
    for b in run.plan.eval_batches(patients, run.config.seed)
  ]
  for b, out in outs:
    lg, rk, gt = (parallel.host(x) for x in out)
    rows = b.patient[b.patient_mask]
    logits[:, rows] = lg[:, b.patient_mask]
    risks[:, rows] = rk[:, b.patient_mask]
    gates[:, rows] = gt[:, b.patient_mask]
  return logits, risks, gates


def evaluate_epoch(run: Setup, params, meta: dict, terms: dict) -> bool:
  """Scores the validation patients of every member, pooled, and updates the selection;
  True when the epoch is the best so far."""
  real, rows = run.real, run.split_rows[run.real]
  patients = np.flatnonzero((rows == 'val').any(0))
  logits, risks, _ = predict(run, params, patients)
  tc = run.config.train
  auc, cidx, score = selection_scores(tc.val_metric, run.cohort, rows, logits[real], risks[real])
  improved = _select(meta, auc, cidx, score, int(tc.get('patience', 0)))
  meta['history'][-1].update({f'train_{k}': float(v.mean()) for k, v in terms.items()})
  logging.info(
    'epoch %d/%d: loss %.4f (resp %.4f, surv %.4f), %s auc %.3f cindex %.3f (smoothed %s %.3f)%s',
    meta['epoch'],
    tc.epochs,
    terms['loss'].mean(),
    terms['response'].mean(),
    terms['survival'].mean(),
    'out-of-fold' if len(run.members) > 1 else 'val',
    auc,
    cidx,
    tc.val_metric,
    float('nan') if meta['smoothed'] is None else meta['smoothed'],
    ' *' if improved else '',
  )
  return improved


def restore_or_start(ckpt: Checkpoints | None, resume: bool, params, opt_state):
  """(params, opt_state, best params or None, run state): the latest checkpoint when
  resuming; a fresh start when there is none; refuses to overwrite a run otherwise."""
  if ckpt is None or ckpt.latest.latest_step() is None:
    return params, opt_state, None, _fresh_meta()
  if not resume:
    raise FileExistsError(
      f'{ckpt.root}/ already holds a run: pass --resume or use a fresh --workdir'
    )
  like = {'params': nnx.to_pure_dict(params), 'opt_state': opt_state}
  state, meta = ckpt.restore(ckpt.latest, like)
  nnx.replace_by_pure_dict(params, state['params'])
  best, _ = ckpt.restore(ckpt.best, {'params': like['params']})
  best_params = jax.tree.map(jnp.copy, params)
  nnx.replace_by_pure_dict(best_params, best['params'])
  logging.info('resumed from epoch %d', meta['epoch'])
  return params, state['opt_state'], best_params, meta


def fit(
  config: ml_collections.ConfigDict,
  cohort: store_reader.Cohort,
  members: Sequence[Member],
  *,
  workdir: str | Path | None = None,
  resume: bool = False,
  stop_after_epochs: int | None = None,
) -> Result:
  """Trains the members together and returns each one's parameters and predictions from
  the selected epoch. With `workdir`, keeps orbax checkpoints there; `resume` continues
  from the latest one (a resumed run ends as the uninterrupted one would have);
  `stop_after_epochs` ends the call after that many epochs (raises `Stopped`)."""
  members = list(members)
  if not members:
    raise ValueError('no members to train')
  t0 = time.time()
  config = config.copy_and_resolve_references()
  config.split.test_center = splits_lib.resolve_test_center(
    cohort.center, config.split.test_center
  )[0]
  tc = config.train
  run, params, opt_state = setup(config, cohort, members)
  ckpt = Checkpoints(Path(workdir)) if workdir is not None else None
  params, opt_state, best_params, meta = restore_or_start(ckpt, resume, params, opt_state)
  every = max(int(tc.get('checkpoint_every', 10)), 1)
  epochs_this_call = 0
  while not meta['done'] and meta['epoch'] < tc.epochs:
    params, opt_state, terms = train_epoch(run, params, opt_state, meta)
    improved = evaluate_epoch(run, params, meta, terms)
    if improved:
      best_params = jax.tree.map(jnp.copy, params)  # the steps donate `params`

    # Checkpoints: "best" on improvement, "latest" every few epochs, at the end and on a stop.
    epochs_this_call += 1
    stopping = stop_after_epochs is not None and epochs_this_call >= stop_after_epochs
    last = meta['done'] or meta['epoch'] >= tc.epochs
    if ckpt is not None:
      if improved:
        ckpt.save(ckpt.best, meta['epoch'], {'params': nnx.to_pure_dict(best_params)}, meta)
      if meta['epoch'] % every == 0 or last or stopping:
        tree = {'params': nnx.to_pure_dict(params), 'opt_state': opt_state}
        ckpt.save(ckpt.latest, meta['epoch'], tree, meta)
    if stopping and not last:
      if ckpt is not None:
        ckpt.wait()
      raise Stopped(meta['epoch'])
  if ckpt is not None:
    ckpt.wait()

  # The selected epoch's predictions for every patient.
  logits, risks, gates = predict(run, best_params, np.arange(cohort.num_patients))
  run_info = _run_info(run, meta, time.time() - t0)
  real = run.real
  return Result(
    members,
    jax.tree.map(lambda x: parallel.host(x)[real], nnx.to_pure_dict(best_params)),
    logits[real],
    risks[real],
    gates[real],
    run.split_rows[real],
    run.fitted,
    run.radiomics_dim,
    meta,
    run_info,
  )


def _run_info(run: Setup, meta: dict, seconds: float) -> dict[str, Any]:
  """What run.json says of the training: devices, mesh, compile counts, step shape."""
  compiled = {'train_step': run.step._cache_size(), 'eval_step': run.evaluate._cache_size()}
  info = {
    'devices': [str(d) for d in run.mesh.devices.flat],
    'device_count': jax.device_count(),
    'processes': jax.process_count(),
    'mesh': {k: int(v) for k, v in run.mesh.shape.items()},
    'padding_members': len(run.stacked) - len(run.members),
    'compiled': compiled,
    'step_shape': {
      'bag_groups': run.plan.layout.groups,
      'patient_slots': run.plan.packing.rows,
      'train_patch_slots': run.plan.packing.capacity,
      'eval_patch_slots': run.plan.eval_packing.capacity,
      'train_padding': 1.0 - meta['real_slots'] / max(meta['slots'], 1),
    },
    'seconds': seconds,
  }
  logging.info(
    'train_step compiled %d times, eval_step %d times; mesh %s on %d devices; %.1f%% of '
    'training patch slots empty; members kept from epoch %d [%.1fs]',
    compiled['train_step'],
    compiled['eval_step'],
    info['mesh'],
    run.mesh.devices.size,
    100 * info['step_shape']['train_padding'],
    meta['best_epoch'],
    seconds,
  )
  return info
