"""P1, padding and P2: how fast the real jitted training step runs, and on what.

P1: FLOP/s on real patch slots only (of `trainer.make_steps`' step, one member), as a fraction of a large matmul's FLOP/s measured in
the same process, dtype and device, alternating with the step. The FLOPs come from XLA's
cost analysis of the compiled step at two capacities: a step's FLOPs are affine in its
patch slots, F(C) = fixed + per_slot * C, so an epoch's real FLOPs are the sum over its
steps of fixed + per_slot * (real slots of that step). The per-slot count is cross-checked
against an analytic count of the patch-proportional matmuls (forward and backward).
Padding: the share of empty patch slots over training epochs (`batching.padding_fraction`).
P2: epoch time of the PyTorch eager reference (`torch_reference`, one bag per forward as
CLAM does, features in the device's memory) divided by the epoch time of our jitted step, on
the same patients, the same subsampled patches and the same loss, on the same device (cuda
with --device=gpu). Also the loop CLAM users actually run: a batch of one bag, its features
read from per-slide `.pt` files (`torch.load`, float32, written once from the store outside
the timer) every step, an optimiser step per bag. Two regimes: paper-like bags (lognormal,
median ~2,000 patches, up to 20,000) and small bags. On a CPU the reference runs at the
thread count that is fastest for it here (1 or all cores; chosen by timing both), because
on a shared machine two spinning OpenMP threads can be several times slower than one.
JAX and PyTorch epochs alternate so load from other processes hits both alike.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import statistics
import time
from pathlib import Path
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import torch
from absl import logging

from moemil_jax import batching, store_reader
from moemil_jax import device_data as device_data_lib
from moemil_jax.bench import timing, torch_reference
from moemil_jax.configs import paper
from moemil_jax.configs import test as test_config


@dataclasses.dataclass(frozen=True)
class Regime:
  """A synthetic store's size: patients and the lognormal bag-size distribution."""

  name: str
  patients: int
  median_patches: int
  max_patches: int


def regimes(quick: bool) -> list[Regime]:
  if quick:
    return [Regime('paper_bags', 8, 600, 6000), Regime('small_bags', 24, 64, 400)]
  return [Regime('paper_bags', 32, 2000, 20000), Regime('small_bags', 128, 64, 400)]


def bench_store(root: str | Path, regime: Regime, seed: int = 0) -> Path:
  """The regime's synthetic store under root, written once and reused."""
  from feature_store import store as store_lib
  from feature_store import synthetic_store

  out = Path(root) / f'store_{regime.name}_{regime.patients}_{regime.median_patches}'
  if not (out / store_lib.STORE_JSON).exists():
    logging.info('writing bench store %s', out)
    synthetic_store.make_store(
      out,
      patients=regime.patients,
      seed=seed,
      median_patches=regime.median_patches,
      max_patches=regime.max_patches,
    )
  return out


@dataclasses.dataclass
class Setup:
  """Everything both implementations train from: one cohort, all patients in training."""

  config: Any
  cohort: store_reader.Cohort
  device_data: device_data_lib.DeviceData
  train_ids: np.ndarray
  steps_per_epoch: int
  store_dir: Path | None = None

  def packing(self) -> batching.Packing:
    return batching.training_packing(
      self.cohort.patch_count[self.train_ids],
      batch_size=self.config.train.batch_size,
      max_patches=self.config.data.max_train_patches,
    )

  def layout(self) -> batching.BagLayout:
    return batching.bag_layout(self.cohort.patch_count)

  def batches(self, epoch: int = 0) -> list[batching.Batch]:
    return batching.train_batches(
      self.train_ids,
      self.cohort.patch_count,
      self.layout(),
      self.packing(),
      rng=np.random.default_rng([self.config.seed, epoch]),
    )


def setup(store_dir: Path, config=None) -> Setup:
  config = config or paper.get_config()
  config.store = str(store_dir)
  config.data.radiomics_lasso = False  # preprocessing is not what is timed
  cohort = store_reader.load_store(store_dir)
  cohort.split = np.full(cohort.num_patients, 'train')
  device_data = device_data_lib.prepare(cohort, config.data, seed=config.seed)
  train_ids = np.arange(cohort.num_patients)
  return Setup(
    config,
    cohort,
    device_data,
    train_ids,
    math.ceil(len(train_ids) / config.train.batch_size),
    Path(store_dir),
  )


def slot_counts(batches: list[batching.Batch]) -> dict[str, int]:
  """Real and total patch slots and real patients of a list of steps."""
  return {
    'real_slots': int(sum(b.real_slots() for b in batches)),
    'slots': int(sum(b.patch_segment.size for b in batches)),
    'patients': int(sum(b.patient_mask.sum() for b in batches)),
    'steps': len(batches),
  }


# --------------------------------------------------------------------------- JAX side


class JaxTrainer:
  """The project's own compiled training step (`trainer.make_steps`: the stacked-member
  step every run uses, here with one member on one device), state carried along."""

  def __init__(self, s: Setup):
    from flax import nnx

    from moemil_jax import parallel, trainer

    self.s = s
    d = s.device_data
    config = s.config.copy_and_resolve_references()
    config.mesh = parallel.mesh_config()
    config.mesh.update(member=1, data=1)
    mesh = parallel.training_mesh(config, 1)
    graphdef, params, rest = nnx.split(
      trainer.build_model(config, int(d.radiomics.shape[1]), int(d.patches.shape[1])),
      nnx.Param,
      ...,
    )
    tx, self.step, _ = trainer.make_steps(config, graphdef, s.steps_per_epoch, mesh)
    one = parallel.member_sharding(mesh)
    self.params, self.rest = parallel.put(
      jax.tree.map(lambda x: np.asarray(x)[None], (params, rest)), one
    )
    self.opt_state = jax.jit(jax.vmap(tx.init), out_shardings=one)(self.params)
    # The device data is already preprocessed (deep MRI z-scored): identity statistics.
    shared = {k: getattr(d, k) for k in trainer.SHARED}
    per_fold = {
      k: np.asarray(getattr(d, k))[None]
      for k in ('patch_mean', 'patch_inv_std', 'radiomics', 'has_radiomics', 'wsi_summary')
    }
    per_fold['deep_mean'] = np.zeros((1, d.mri_deep.shape[-1]), np.float32)
    per_fold['deep_inv_std'] = np.ones((1, d.mri_deep.shape[-1]), np.float32)
    self.data = parallel.put((shared, per_fold), parallel.replicated(mesh))
    self.member = parallel.put(
      (
        np.array([config.train.learning_rate], np.float32),
        np.zeros(1, np.int32),
        np.array([config.seed], np.int32),
        np.ones(1, bool),
      ),
      one,
    )
    self.patients = 0  # real patients trained on, over every epoch run
    self.patches = 0

  def _args(self, batch: batching.Batch, i: int):
    tree = {k: v[None] for k, v in batch.tree().items()}
    return (self.rest, *self.member, *self.data, tree, np.array([0, i], np.int32))

  def run_step(self, batch: batching.Batch, i: int = 0):
    self.params, self.opt_state, m = self.step(self.params, self.opt_state, *self._args(batch, i))
    self.patients += int(batch.patient_mask.sum())
    self.patches += batch.real_slots()
    return m

  def run_steps(self, batches: list[batching.Batch]) -> float:
    start = time.perf_counter()
    m = None
    for i, batch in enumerate(batches):
      m = self.run_step(batch, i)
    jax.block_until_ready((self.params, m))
    return time.perf_counter() - start

  def epoch(self, epoch: int = 0) -> float:
    """One epoch as the training loop runs it: batches planned on the host, then stepped."""
    start = time.perf_counter()
    self.run_steps(self.s.batches(epoch))
    return time.perf_counter() - start

  def step_flops(self, batch: batching.Batch) -> float:
    """XLA's cost analysis of the training step compiled for this batch's shape."""
    compiled = self.step.lower(self.params, self.opt_state, *self._args(batch, 0)).compile()
    cost = compiled.cost_analysis()
    if isinstance(cost, (list, tuple)):
      cost = cost[0]
    return float(cost['flops'])


def analytic_flops_per_slot(model_config, rows: int, in_dim: int = 1024) -> float:
  """Matmul FLOPs per patch slot of one training step, forward and backward.

  fc (in_dim -> wsi_hidden_dim): forward and the weight gradient (the input needs none); gated
  attention (two wsi_hidden_dim -> attention_dim, one attention_dim -> 1), the instance classifier
  (wsi_hidden_dim -> 4) and the one-hot pooling over the `rows` patient slots: forward, input and
  weight gradients (3x). Elementwise work (normalisation, activations, softmax) is left out.
  """
  w, a = int(model_config.wsi_hidden_dim), int(model_config.attention_dim)
  rest = 2 * (2 * w * a + a + 4 * w + rows * w)
  return 4.0 * in_dim * w + 3.0 * rest


# --------------------------------------------------------------------------- PyTorch side


def torch_device(device: str) -> str:
  """The torch device for the suite's --device: cuda on a GPU run, as JAX runs there."""
  return 'cuda' if device == 'gpu' else 'cpu'


def _sync(device: str) -> None:
  if device == 'cuda':
    torch.cuda.synchronize()


def _on_device(device: str):
  """Tensors that `torch_reference` creates without a device (masks, presence bits, loss
  targets) land on `device`. A no-op on the CPU. The mode sees every torch call: on a CPU
  it made the tiny test model's eager epoch about 1.5x slower, so a GPU P2 figure measured
  with it is an upper bound until `torch_reference` creates its tensors on its inputs'
  device."""
  return torch.device(device) if device != 'cpu' else contextlib.nullcontext()


class _TorchBase:
  """The reference model, optimiser and per-patient arrays, on one torch device."""

  def __init__(self, s: Setup, device: str = 'cpu', *, clip: bool = True):
    self.s, self.device, self.clip = s, device, clip
    c = s.config
    d = s.device_data
    radiomics_dim = int(d.radiomics.shape[1])
    torch.manual_seed(c.seed)
    self.model = (
      torch_reference.TorchMoEMIL(c.model, radiomics_dim=radiomics_dim).to(device).train()
    )
    self.opt = torch.optim.AdamW(
      self.model.parameters(), lr=c.train.learning_rate, weight_decay=c.train.weight_decay
    )
    self.mean = torch.from_numpy(np.array(d.patch_mean)).to(device)
    self.inv_std = torch.from_numpy(np.array(d.patch_inv_std)).to(device)
    self.radiomics = torch.from_numpy(np.array(d.radiomics)).to(device)
    self.has_radiomics = np.asarray(d.has_radiomics)
    self.mri_deep = torch.from_numpy(np.array(d.mri_deep)).to(device)
    self.mri_count = np.asarray(d.mri_deep_count)
    self.targets = {
      k: np.asarray(getattr(d, k))
      for k in ('response', 'has_response', 'os_months', 'os_event', 'has_survival')
    }
    self.weights = {
      k: float(c.loss[k]) for k in ('response', 'survival', 'instance', 'gate_balance')
    }
    self.threads = torch.get_num_threads()
    self.patients = 0  # bags trained on, over every epoch run
    self.patches = 0

  def scheduler(self, steps_per_epoch: int):
    c = self.s.config
    total = max(c.train.epochs * steps_per_epoch, 1)
    warmup = max(int(c.train.warmup_epochs * steps_per_epoch), 1)
    return torch.optim.lr_scheduler.LambdaLR(
      self.opt, lambda t: min((t + 1) / warmup, 0.5 * (1 + math.cos(math.pi * min(t / total, 1))))
    )

  def patient(self, p: int, wsi: torch.Tensor) -> dict[str, Any]:
    return {
      'wsi': (wsi.float() - self.mean) * self.inv_std,
      'radiomics': self.radiomics[p],
      'mri_deep': self.mri_deep[p, : self.mri_count[p]],
      'has_wsi': wsi.shape[0] > 0,
      'has_radiomics': bool(self.has_radiomics[p]),
      'has_mri_deep': bool(self.mri_count[p] > 0),
    }

  def update(self, outs, pids: np.ndarray) -> float:
    """Loss over the step's patients, backward, (clipping,) AdamW and the schedule."""
    c = self.s.config
    loss = torch_reference.total_loss(
      outs,
      {k: v[pids] for k, v in self.targets.items()},
      self.weights,
      ties=c.loss.ties,
      k=c.loss.instance_k,
    )
    loss.backward()
    if self.clip:
      torch.nn.utils.clip_grad_norm_(self.model.parameters(), c.train.grad_clip)
    self.opt.step()
    self.sched.step()
    self.opt.zero_grad(set_to_none=True)
    return loss.item()

  def epoch(self, epoch: int = 0) -> float:
    torch.set_num_threads(self.threads)
    start = time.perf_counter()
    with _on_device(self.device):
      self.run_epoch(self.s.batches(epoch))
    _sync(self.device)
    return time.perf_counter() - start

  def run_epoch(self, batches: list[batching.Batch]) -> None:
    raise NotImplementedError


class TorchTrainer(_TorchBase):
  """CLAM-style eager training on our batches: each patient's patches (kept in the device's
  memory, float16 as the JAX side keeps them) through the network on their own, the step's
  loss over its patients, backward, clipping, AdamW."""

  def __init__(self, s: Setup, device: str = 'cpu'):
    super().__init__(s, device)
    self.sched = self.scheduler(s.steps_per_epoch)
    self.patches_f16 = torch.from_numpy(s.cohort.patches).to(device)

  def run_epoch(self, batches: list[batching.Batch]) -> None:
    for batch in batches:
      bags = list(batch.patient_rows())
      outs = []
      for p, rows in bags:
        index = torch.from_numpy(rows.astype(np.int64)).to(self.device)
        outs.append(self.model(self.patient(p, self.patches_f16[index])))
        self.patches += len(rows)
      self.update(outs, np.array([p for p, _ in bags]))
      self.patients += len(bags)


def write_pt_files(s: Setup, out_dir: Path) -> dict[int, list[Path]]:
  """One float32 `.pt` tensor per slide of the store (CLAM's feature files), written once;
  returns each patient's files in the order `load_store` concatenates them."""
  from feature_store import store as store_lib

  out_dir.mkdir(parents=True, exist_ok=True)
  index = {str(pid): i for i, pid in enumerate(s.cohort.patient_id)}
  files: dict[int, list[Path]] = {}
  filled = np.zeros(s.cohort.num_patients, np.int64)
  for path in store_lib.slide_files(s.store_dir):
    pid, rows = store_lib.slide_patient_and_rows(path)
    if not rows or pid not in index:
      continue
    p = index[pid]
    start = int(s.cohort.patch_offset[p] + filled[p])
    filled[p] += rows
    target = out_dir / f'{path.stem}.pt'
    if not target.exists():
      features = np.asarray(s.cohort.patches[start : start + rows], np.float32)
      torch.save(torch.from_numpy(features), target)
    files.setdefault(p, []).append(target)
  if not np.array_equal(filled, s.cohort.patch_count):
    raise ValueError(f'{s.store_dir}: slide files do not add up to the bags load_store read')
  return files


class ClamRunner(_TorchBase):
  """The loop CLAM users run: one bag per step, its features `torch.load`ed from its slides'
  `.pt` files every step (then moved to the device), loss, backward and an optimiser step
  per bag (no clipping, as CLAM). It trains the same patients and patches as our epoch (the
  bag's patches that our batch took), so the two do the same model work; the loss of a
  one-patient step has no Cox term that can move anything (a risk set of one)."""

  def __init__(self, s: Setup, files: dict[int, list[Path]], device: str = 'cpu'):
    super().__init__(s, device, clip=False)
    self.files = files
    self.offset = s.layout().offset
    self.sched = self.scheduler(len(s.train_ids))
    self.load_s = 0.0  # time spent in torch.load, over every epoch run

  def run_epoch(self, batches: list[batching.Batch]) -> None:
    for batch in batches:
      for p, rows in batch.patient_rows():
        start = time.perf_counter()
        files = self.files.get(p, [])
        if files:
          bag = torch.cat([torch.load(f, weights_only=True) for f in files])
        else:  # a patient without slides
          bag = torch.zeros((0, self.s.cohort.patches.shape[1]))
        self.load_s += time.perf_counter() - start
        bag = bag.to(self.device)
        if len(rows) < len(bag):  # a subsampled bag: the rows our step took
          bag = bag[torch.from_numpy(rows - self.offset[p]).to(self.device)]
        out = self.model(self.patient(p, bag))
        self.update([out], np.array([p]))
        self.patients += 1
        self.patches += len(rows)


def choose_threads(runner: _TorchBase, candidates: list[int], *, trials: int = 1) -> dict:
  """Sets the runner's torch thread count to the fastest of `candidates` (min of `trials`
  epochs each); returns the times."""
  times = {}
  for t in candidates:
    runner.threads = t
    times[t] = min(runner.epoch(0) for _ in range(trials))
  runner.threads = min(times, key=times.get)
  return {str(k): v for k, v in times.items()}


# --------------------------------------------------------------------------- figures


def p2_regime(
  s: Setup, *, repeats: int, device: str = 'cpu', pt_dir: Path | None = None
) -> dict[str, Any]:
  """Alternating JAX / PyTorch / CLAM-as-run epochs on the same batches; medians, ratios."""
  tdev = torch_device(device)
  jt, tt = JaxTrainer(s), TorchTrainer(s, tdev)
  runners: dict[str, Any] = {'jax': jt, 'torch': tt}
  if pt_dir is not None:
    runners['clam'] = ClamRunner(s, write_pt_files(s, pt_dir), tdev)
  first = {name: r.epoch(0) for name, r in runners.items()}  # JAX: compiles its one shape
  threads = {}
  if tdev == 'cpu':
    candidates = sorted({1, os.cpu_count() or 1})
    threads = {name: choose_threads(r, candidates) for name, r in runners.items() if name != 'jax'}
  for r in runners.values():  # count the timed epochs only
    r.patients = r.patches = 0
    r.load_s = 0.0
  times: dict[str, list[float]] = {name: [] for name in runners}
  for e in range(repeats):
    for name, r in runners.items():
      times[name].append(r.epoch(e + 1))
  med = {name: statistics.median(t) for name, t in times.items()}
  counts = [slot_counts(s.batches(e + 1)) for e in range(repeats)]
  out = {
    'patients': int(s.cohort.num_patients),
    'median_bag': float(np.median(s.cohort.patch_count)),
    'max_bag': int(s.cohort.patch_count.max()),
    'max_train_patches': int(s.config.data.max_train_patches),
    'steps_per_epoch': statistics.median(c['steps'] for c in counts),
    'step_shape': list(s.batches(0)[0].patch_index.shape),
    'padding': 1.0 - sum(c['real_slots'] for c in counts) / sum(c['slots'] for c in counts),
    'torch_device': tdev,
    'torch_threads': {name: r.threads for name, r in runners.items() if name != 'jax'},
    'torch_thread_trials_s': threads,
    'jax_epoch_s': med['jax'],
    'torch_epoch_s': med['torch'],
    'jax_first_epoch_s': first['jax'],
    'torch_first_epoch_s': first['torch'],
    'jax_epochs_s': times['jax'],
    'torch_epochs_s': times['torch'],
    'speedup': med['torch'] / med['jax'],
  }
  for name, r in runners.items():  # what each side trained, per timed epoch
    out[f'{name}_patients_per_epoch'] = r.patients / repeats
    out[f'{name}_patches_per_epoch'] = r.patches / repeats
  if 'clam' in runners:
    clam = runners['clam']
    out.update(
      clam_epoch_s=med['clam'],
      clam_first_epoch_s=first['clam'],
      clam_epochs_s=times['clam'],
      clam_load_s_per_epoch=clam.load_s / repeats,
      clam_speedup=med['clam'] / med['jax'],
    )
  return out


def padding(setups: dict[str, Setup], *, epochs: int) -> dict[str, Any]:
  """Empty patch slots over `epochs` training epochs of each regime, plus a paper-scale
  cohort (404 patients, the synthetic store's lognormal bag sizes) planned from counts alone."""
  out = {}
  for name, s in setups.items():
    c = [slot_counts(s.batches(e)) for e in range(epochs)]
    real, slots = sum(x['real_slots'] for x in c), sum(x['slots'] for x in c)
    out[name] = {
      'epochs': epochs,
      'real_slots': real,
      'slots': slots,
      'padding': 1.0 - real / slots,
      'patients': int(s.cohort.num_patients),
      'step_shape': list(s.batches(0)[0].patch_index.shape),
      'batch_size': int(s.config.train.batch_size),
      'max_train_patches': int(s.config.data.max_train_patches),
    }
  # 404 patients as the paper (and the GPU target): bag sizes as synthetic_store draws them.
  rng = np.random.default_rng(0)
  counts = np.clip(np.round(np.exp(rng.normal(np.log(2000), 0.8, 404))), 16, 20000).astype(int)
  config = paper.get_config()
  packing = batching.training_packing(
    counts, batch_size=config.train.batch_size, max_patches=config.data.max_train_patches
  )
  layout = batching.bag_layout(counts)
  real = slots = 0
  for e in range(epochs):
    bs = batching.train_batches(
      np.arange(404), counts, layout, packing, rng=np.random.default_rng([0, e])
    )
    real += sum(b.real_slots() for b in bs)
    slots += sum(b.patch_segment.size for b in bs)
  out['paper_404'] = {
    'epochs': epochs,
    'real_slots': int(real),
    'slots': int(slots),
    'padding': 1.0 - real / slots,
    'patients': 404,
    'step_shape': [1, packing.capacity],
  }
  return out


def _cut(batch: batching.Batch, capacity: int) -> batching.Batch:
  """The batch with only its first `capacity` patch slots (a smaller compiled shape)."""
  return batching.Batch(
    batch.patient,
    batch.patient_mask,
    batch.patch_index[:, :capacity],
    batch.patch_segment[:, :capacity],
  )


def p1(s: Setup, *, repeats: int) -> dict[str, Any]:
  """Real-slot FLOPs of an epoch of training steps / its time / the matmul peak."""
  jt = JaxTrainer(s)
  batches = s.batches(0)
  groups, capacity = batches[0].patch_index.shape
  half = max(8, capacity // 2 // 8 * 8)
  step_flops = jt.step_flops(batches[0])  # every step of the run has this shape
  half_flops = jt.step_flops(_cut(batches[0], half))
  per_slot = (step_flops - half_flops) / (groups * (capacity - half))
  fixed = step_flops - per_slot * groups * capacity
  real = [b.real_slots() for b in batches]
  real_flops = sum(fixed + per_slot * r for r in real)
  compiled_flops = step_flops * len(batches)
  analytic = analytic_flops_per_slot(s.config.model, batches[0].rows)

  dtype = jnp.dtype(s.config.model.compute_dtype)
  peak = timing.MatmulPeak(dtype=dtype)
  jt.run_steps(batches)  # compiles
  step_times, peak_times = [], []
  for _ in range(repeats):  # alternating, so load from other processes hits both alike
    step_times.append(jt.run_steps(batches))
    peak_times.append(statistics.median(peak.seconds() for _ in range(3)))
  epoch_s = statistics.median(step_times)
  peak_flops = peak.flops / statistics.median(peak_times)
  achieved = real_flops / epoch_s
  return {
    'steps': len(batches),
    'batch_shape': [groups, capacity],
    'patient_slots': batches[0].rows,
    'real_slots': int(sum(real)),
    'slots': int(groups * capacity * len(batches)),
    'real_patch_fraction': sum(real) / (groups * capacity * len(batches)),
    'step_flops': step_flops,
    'xla_flops_per_slot': per_slot,
    'analytic_flops_per_slot': analytic,
    'xla_over_analytic_per_slot': per_slot / analytic,
    'fixed_flops_per_step': fixed,
    'fixed_flops_share': fixed / step_flops,
    'real_flops_per_epoch': real_flops,
    'compiled_flops_per_epoch': compiled_flops,
    'epoch_steps_s': epoch_s,
    'epoch_steps_s_all': step_times,
    'achieved_flops_per_s': achieved,
    'compiled_flops_per_s': compiled_flops / epoch_s,
    'matmul_n': peak.n,
    'matmul_s': statistics.median(peak_times),
    'matmul_peak_flops_per_s': peak_flops,
    'dtype': str(dtype),
    'fraction_of_peak': achieved / peak_flops,
  }


def setups(quick: bool, workdir: Path) -> dict[str, Setup]:
  """Both regimes' stores (cached under workdir), loaded and prepared for training."""
  out = {}
  for regime in regimes(quick):
    # --quick is a smoke run: the tiny test model, so compiles and epochs take seconds.
    config = test_config.get_config() if quick else paper.get_config()
    out[regime.name] = setup(bench_store(workdir, regime), config)
  return out


def figures(
  setups: dict[str, Setup], quick: bool, workdir: Path, device: str = 'cpu'
) -> dict[str, Callable[[], Any]]:
  """P1 on the paper-like regime, padding and P2 on both: one function per figure."""
  repeats = 2 if quick else 3
  return {
    'p1': lambda: p1(setups['paper_bags'], repeats=repeats),
    'padding': lambda: padding(setups, epochs=3 if quick else 10),
    'p2': lambda: {
      name: p2_regime(s, repeats=repeats, device=device, pt_dir=workdir / f'pt_{name}')
      for name, s in setups.items()
    },
  }


def run(
  quick: bool = False,
  workdir: str | Path | None = None,
  only=('p1', 'padding', 'p2'),
  device: str = 'cpu',
) -> dict[str, Any]:
  """The figures in `only`; stores are cached under workdir."""
  import tempfile

  workdir = Path(workdir or tempfile.mkdtemp(prefix='moemil_bench_'))
  out = {}
  for key, fn in figures(setups(quick, workdir), quick, workdir, device).items():
    if key in only:
      out[key] = fn()
      logging.info('%s: %s', key, out[key])
  return out
