"""P1 and P2: how fast the real jitted training step runs.

P1: FLOPs of one compiled training step (XLA's own cost analysis) per second of step time,
as a fraction of a large matmul's FLOP/s measured in the same process and dtype.
P2: epoch time of the PyTorch eager reference (`moemil_jax.bench.torch_reference`, one bag per
forward as CLAM does, features in RAM, same thread count) divided by the epoch time of our
jitted step, on the same patients, the same subsampled patches and the same loss. Two
regimes: paper-like bags (lognormal, median ~2,000 patches, up to 20,000) and small bags.
JAX and PyTorch epochs alternate so load from other processes hits both alike.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import statistics
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import torch
from absl import logging

from moemil_jax import batching, store_reader
from moemil_jax import device_data as device_data_lib
from moemil_jax import train as train_lib
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

  def packing(self) -> batching.Packing:
    return batching.training_packing(
      self.cohort.patch_count[self.train_ids],
      batch_size=self.config.train.batch_size,
      max_patches=self.config.data.max_train_patches,
    )

  def batches(self, epoch: int = 0) -> list[batching.Batch]:
    return batching.train_batches(
      self.train_ids,
      self.cohort.patch_count,
      batching.bag_layout(self.cohort.patch_count),
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
    config, cohort, device_data, train_ids, math.ceil(len(train_ids) / config.train.batch_size)
  )


# --------------------------------------------------------------------------- JAX side


class JaxTrainer:
  """The project's own compiled training step (`moemil_jax.train`), state carried along."""

  def __init__(self, s: Setup):
    from flax import nnx

    self.s = s
    radiomics_dim = int(s.device_data.radiomics.shape[1])
    config_json = json.dumps(s.config.to_dict(), sort_keys=True)
    tx, self.step, _ = train_lib.compiled_steps(config_json, radiomics_dim, s.steps_per_epoch)
    _, self.params, self.rest = nnx.split(
      train_lib.build_model(s.config, radiomics_dim), nnx.Param, ...
    )
    self.opt_state = tx.init(self.params)
    self.data = s.device_data.tree()
    self.key = jax.random.key(s.config.seed)

  def run_step(self, batch: batching.Batch, i: int = 0):
    self.params, self.opt_state, m = self.step(
      self.params,
      self.opt_state,
      self.rest,
      self.data,
      batch.tree(),
      jax.random.fold_in(self.key, i),
    )
    return m

  def epoch(self, epoch: int = 0) -> float:
    start = time.perf_counter()
    m = None
    for i, batch in enumerate(self.s.batches(epoch)):
      m = self.run_step(batch, i)
    jax.block_until_ready((self.params, m))
    return time.perf_counter() - start

  def step_flops(self, batch: batching.Batch) -> float:
    compiled = self.step.lower(
      self.params, self.opt_state, self.rest, self.data, batch.tree(), self.key
    ).compile()
    cost = compiled.cost_analysis()
    if isinstance(cost, (list, tuple)):
      cost = cost[0]
    return float(cost['flops'])


# --------------------------------------------------------------------------- PyTorch side


class TorchTrainer:
  """CLAM-style eager training: each patient's real patches through the network on their own,
  the step's loss over its B patients, backward, clipping, AdamW."""

  def __init__(self, s: Setup):
    self.s = s
    c = s.config
    d = s.device_data
    radiomics_dim = int(d.radiomics.shape[1])
    torch.manual_seed(c.seed)
    self.model = torch_reference.TorchMoEMIL(c.model, radiomics_dim=radiomics_dim).train()
    self.opt = torch.optim.AdamW(
      self.model.parameters(), lr=c.train.learning_rate, weight_decay=c.train.weight_decay
    )
    total = max(c.train.epochs * s.steps_per_epoch, 1)
    warmup = max(int(c.train.warmup_epochs * s.steps_per_epoch), 1)
    self.sched = torch.optim.lr_scheduler.LambdaLR(
      self.opt, lambda t: min((t + 1) / warmup, 0.5 * (1 + math.cos(math.pi * min(t / total, 1))))
    )
    self.patches = torch.from_numpy(s.cohort.patches)  # float16 in RAM, as the JAX side keeps it
    self.mean = torch.from_numpy(np.array(d.patch_mean))
    self.inv_std = torch.from_numpy(np.array(d.patch_inv_std))
    self.radiomics = torch.from_numpy(np.array(d.radiomics))
    self.has_radiomics = np.asarray(d.has_radiomics)
    self.mri_deep = torch.from_numpy(np.array(d.mri_deep))
    self.mri_count = np.asarray(d.mri_deep_count)
    self.targets = {
      k: np.asarray(getattr(d, k))
      for k in ('response', 'has_response', 'os_months', 'os_event', 'has_survival')
    }
    self.weights = {
      k: float(c.loss[k]) for k in ('response', 'survival', 'instance', 'gate_balance')
    }

  def patient(self, p: int, patch_rows: np.ndarray) -> dict[str, Any]:
    wsi = (
      self.patches[torch.from_numpy(patch_rows.astype(np.int64))].float() - self.mean
    ) * self.inv_std
    return {
      'wsi': wsi,
      'radiomics': self.radiomics[p],
      'mri_deep': self.mri_deep[p, : self.mri_count[p]],
      'has_wsi': len(patch_rows) > 0,
      'has_radiomics': bool(self.has_radiomics[p]),
      'has_mri_deep': bool(self.mri_count[p] > 0),
    }

  def run_step(self, batch: batching.Batch) -> float:
    c = self.s.config
    bags = list(batch.patient_rows())
    pids = np.array([p for p, _ in bags])
    self.opt.zero_grad(set_to_none=True)
    outs = [self.model(self.patient(p, rows)) for p, rows in bags]
    loss = torch_reference.total_loss(
      outs,
      {k: v[pids] for k, v in self.targets.items()},
      self.weights,
      ties=c.loss.ties,
      k=c.loss.instance_k,
    )
    loss.backward()
    torch.nn.utils.clip_grad_norm_(self.model.parameters(), c.train.grad_clip)
    self.opt.step()
    self.sched.step()
    return loss.item()

  def epoch(self, epoch: int = 0) -> float:
    start = time.perf_counter()
    for batch in self.s.batches(epoch):
      self.run_step(batch)
    return time.perf_counter() - start


# --------------------------------------------------------------------------- figures


def p2_regime(s: Setup, *, repeats: int) -> dict[str, Any]:
  """Alternating JAX/PyTorch epochs on the same batches; medians and their ratio."""
  torch.set_num_threads(os.cpu_count() or 1)
  jt, tt = JaxTrainer(s), TorchTrainer(s)
  batches = s.batches(0)
  jax_first = jt.epoch(0)  # compiles the one step shape
  torch_first = tt.epoch(0)
  jax_times, torch_times = [], []
  for _ in range(repeats):
    jax_times.append(jt.epoch(0))
    torch_times.append(tt.epoch(0))
  jax_s, torch_s = statistics.median(jax_times), statistics.median(torch_times)
  return {
    'patients': int(s.cohort.num_patients),
    'median_bag': float(np.median(s.cohort.patch_count)),
    'max_bag': int(s.cohort.patch_count.max()),
    'steps_per_epoch': len(batches),
    'step_shape': list(batches[0].patch_index.shape),
    'real_patch_fraction': 1.0 - batching.padding_fraction(batches),
    'jax_epoch_s': jax_s,
    'torch_epoch_s': torch_s,
    'jax_first_epoch_s': jax_first,
    'torch_first_epoch_s': torch_first,
    'jax_epochs_s': jax_times,
    'torch_epochs_s': torch_times,
    'speedup': torch_s / jax_s,
  }


def p1(s: Setup, *, repeats: int) -> dict[str, Any]:
  """Compiled FLOPs of a training step / its time / matmul peak (float32)."""
  jt = JaxTrainer(s)
  batches = s.batches(0)
  batch = max(batches, key=lambda b: b.real_slots())
  flops = jt.step_flops(batch)
  step_s = timing.median_seconds(lambda: jt.run_step(batch), repeats=repeats, warmup=1)
  dtype = jnp.dtype(s.config.model.compute_dtype)
  peak = timing.matmul_peak_flops(dtype=dtype)
  return {
    'batch_shape': list(batch.patch_index.shape),
    'real_patch_fraction': batch.real_slots() / batch.patch_segment.size,
    'step_flops': flops,
    'step_s': step_s,
    'achieved_flops_per_s': flops / step_s,
    'matmul_peak_flops_per_s': peak,
    'dtype': str(dtype),
    'fraction_of_peak': flops / step_s / peak,
  }


def run(
  quick: bool = False, workdir: str | Path | None = None, only=('p1', 'p2')
) -> dict[str, Any]:
  """P1 on the paper-like regime, P2 on both; stores are cached under workdir."""
  import tempfile

  workdir = Path(workdir or tempfile.mkdtemp(prefix='moemil_bench_'))
  repeats = 2 if quick else 3
  out: dict[str, Any] = {}
  setups = {}
  for regime in regimes(quick):
    # --quick is a smoke run: the tiny test model, so compiles and epochs take seconds.
    config = test_config.get_config() if quick else paper.get_config()
    setups[regime.name] = setup(bench_store(workdir, regime), config)
  if 'p1' in only:
    out['p1'] = p1(setups['paper_bags'], repeats=repeats)
    logging.info('P1: %s', out['p1'])
  if 'p2' in only:
    out['p2'] = {name: p2_regime(s, repeats=repeats) for name, s in setups.items()}
    logging.info('P2: %s', out['p2'])
  return out
