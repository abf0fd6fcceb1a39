"""Data parallelism with `jax.sharding`: one mesh axis "data", batches split along it.

Training stays a single SPMD program. Parameters, optimiser state and the small
per-patient arrays are replicated on every device. Patients are dealt to one group per
device (`data.bag_layout`); the patches array is split in blocks along "data" so each
device holds only its group's bags, and each batch puts a group's patients in that
device's rows, so the gather (`gather_local_rows`) never moves patches between devices.
Per-patient outputs and targets are resharded to replicated before the loss: the Cox
partial likelihood sorts the *global* batch by time, and a sort over a batch-sharded array
would otherwise sort only within each shard (explicit axes refuse it, auto axes would hide
the cross-device gather).

The mesh uses `AxisType.Auto` axes so that XLA's sharding propagation places every
intermediate; jax 0.10's `jax.make_mesh` default (Explicit) would demand annotations on
every gather of the model.

Config (all optional; a config without `mesh` trains on the default device as before):

  config.mesh.data = -1          # devices on the data axis; -1 = all (over all hosts)
  config.mesh.distributed = False  # call jax.distributed.initialize() first (multi-host)
  config.mesh.coordinator = ""   # host:port of process 0; "" = from the cluster environment
  config.mesh.num_processes = 0  # 0 = from the cluster environment
  config.mesh.process_id = -1    # -1 = from the cluster environment

On TPU pods, SLURM and Open MPI, `jax.distributed.initialize()` finds the coordinator and
process ids by itself, so only `distributed = True` is needed. Every process runs the same
program on the same host-side batch plan (same seeds); `shard_batch` hands each device only
its rows, so a process transfers just its own part of every batch, and each process reads
from the store only the bags its own devices hold.
"""

from __future__ import annotations

from typing import Any, Sequence

import jax
import ml_collections
import numpy as np
from absl import logging
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

DATA = 'data'


def mesh_config() -> ml_collections.ConfigDict:
  """Defaults for `config.mesh` (single device, no multi-host)."""
  return ml_collections.ConfigDict(
    {'data': 0, 'distributed': False, 'coordinator': '', 'num_processes': 0, 'process_id': -1}
  )


def _mesh_fields(config) -> ml_collections.ConfigDict | None:
  mc = config.get('mesh') if hasattr(config, 'get') else None
  if mc is None:
    return None
  merged = mesh_config()
  merged.update(mc.to_dict() if hasattr(mc, 'to_dict') else dict(mc))
  return merged


def initialize_distributed(config) -> None:
  """jax.distributed.initialize() when config.mesh.distributed; idempotent.

  Must run before anything touches a JAX backend (launch.train calls training first thing).
  """
  mc = _mesh_fields(config)
  if mc is None or not mc.distributed or jax.distributed.is_initialized():
    return
  kwargs: dict[str, Any] = {}
  if mc.coordinator:
    kwargs['coordinator_address'] = mc.coordinator
  if mc.num_processes:
    kwargs['num_processes'] = int(mc.num_processes)
  if mc.process_id >= 0:
    kwargs['process_id'] = int(mc.process_id)
  jax.distributed.initialize(**kwargs)
  logging.info(
    'jax.distributed: process %d of %d, %d local / %d global devices',
    jax.process_index(),
    jax.process_count(),
    jax.local_device_count(),
    jax.device_count(),
  )


def make_mesh(data: int = -1) -> jax.sharding.Mesh:
  """A 1-D mesh over `data` devices (-1 = every device of every process)."""
  n = jax.device_count() if data in (-1, None) else int(data)
  if not 1 <= n <= jax.device_count():
    raise ValueError(
      f'mesh.data={data}: this job has {jax.device_count()} devices '
      f'({jax.process_count()} processes)'
    )
  if jax.process_count() > 1 and n != jax.device_count():
    raise ValueError(
      f'mesh.data={data}: with {jax.process_count()} processes the data axis '
      f'must span all {jax.device_count()} devices (use -1)'
    )
  return jax.make_mesh((n,), (DATA,), axis_types=(AxisType.Auto,), devices=jax.devices()[:n])


def mesh_from_config(config) -> jax.sharding.Mesh | None:
  """The data mesh asked for by config.mesh.data, or None (plain single-device run)."""
  mc = _mesh_fields(config)
  if mc is None or not mc.data:
    return None
  return make_mesh(int(mc.data))


def replicated(mesh: jax.sharding.Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def batch_sharded(mesh: jax.sharding.Mesh) -> NamedSharding:
  return NamedSharding(mesh, P(DATA))


def check_batch_size(batch_size: int, mesh: jax.sharding.Mesh | None) -> None:
  if mesh is not None and batch_size % mesh.shape[DATA]:
    raise ValueError(
      f'train.batch_size={batch_size} is not divisible by the {mesh.shape[DATA]} '
      'devices of mesh.data; pick a multiple'
    )


def replicate(tree, mesh: jax.sharding.Mesh | None):
  """Host or device arrays -> replicated on every device of the mesh (no-op without one)."""
  if mesh is None:
    return tree
  return jax.device_put(tree, replicated(mesh))


def shard_batch(tree: dict[str, np.ndarray], mesh: jax.sharding.Mesh | None):
  """Host batch (leading axis = patients) -> global arrays split along "data".

  Every process holds the same host batch (same seeds); each device receives only its rows,
  which works unchanged on one host and across hosts.
  """
  if mesh is None:
    return tree
  sharding = batch_sharded(mesh)

  def place(x):
    x = np.asarray(x)
    return jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])

  return jax.tree.map(place, tree)


def constrain_replicated(tree, mesh: jax.sharding.Mesh | None):
  """Inside jit: gather (reshard) to every device, e.g. before sorting the global batch."""
  if mesh is None:
    return tree
  return jax.lax.with_sharding_constraint(tree, replicated(mesh))


def bag_groups(config, mesh: jax.sharding.Mesh | None) -> int:
  """Groups of the bag layout (`data.bag_layout`): one per device on the data axis.

  config.data.bag_groups > 0 asks for that many on a single device too, which reproduces
  the batches (and so the training) of a data-parallel run with that many devices.
  """
  asked = int(config.data.get('bag_groups', 0) or 0)
  if mesh is None:
    return asked or 1
  if asked and asked != mesh.shape[DATA]:
    raise ValueError(
      f'data.bag_groups={asked} but the data axis has {mesh.shape[DATA]} '
      'devices; use 0 (one group per device)'
    )
  return mesh.shape[DATA]


def local_groups(mesh: jax.sharding.Mesh | None, groups: int) -> np.ndarray:
  """Positions on the data axis whose devices belong to this process (all without a mesh)."""
  if mesh is None:
    return np.arange(groups)
  return np.array(
    [i for i, d in enumerate(mesh.devices.flat) if d.process_index == jax.process_index()]
  )


def gather_local_rows(table: jax.Array, index: jax.Array, mesh: jax.sharding.Mesh | None):
  """Inside jit: table[index], where table and index are split alike along "data".

  Each device holds one block of the table (its patients' bags) and the batch rows that
  point into that block, so the gather runs device by device without moving any table row
  (a plain gather on a sharded table would all-gather it first). Indices are global rows.
  """
  if mesh is None:
    return table[index]

  def local(block, idx):
    return block[idx - jax.lax.axis_index(DATA) * block.shape[0]]

  return jax.shard_map(local, mesh=mesh, in_specs=(P(DATA), P(DATA)), out_specs=P(DATA))(
    table, index
  )


def sum_over_processes(arrays: Sequence[np.ndarray]) -> list[np.ndarray]:
  """float64 host arrays summed over every process (unchanged with one process).

  Sent as int32 bit patterns: JAX without x64 would round float64 to float32 on the way.
  """
  arrays = [np.asarray(a, np.float64) for a in arrays]
  if jax.process_count() == 1:
    return arrays
  from jax.experimental import multihost_utils

  flat = np.concatenate([a.ravel() for a in arrays])
  gathered = np.asarray(multihost_utils.process_allgather(flat.view(np.int32)))
  total = gathered.view(np.float64).reshape(jax.process_count(), -1).sum(0)
  cuts = np.cumsum([a.size for a in arrays])[:-1]
  return [t.reshape(a.shape) for t, a in zip(np.split(total, cuts), arrays)]


def is_writer() -> bool:
  """Process 0 writes predictions, run.json and TensorBoard events; the others only compute."""
  return jax.process_index() == 0


# Per-patient model outputs the losses combine across the whole batch.
PATIENT_OUTPUTS = ('response_logit', 'log_risk', 'gates')


def gather_for_loss(outputs: dict, targets: dict, mesh: jax.sharding.Mesh | None):
  """Inside jit: per-patient outputs and all targets resharded to replicated.

  Bag-level outputs (attention scores, instance logits) stay split by patient: the
  instance loss works row by row and only its sums cross devices.
  """
  if mesh is None:
    return outputs, targets
  outputs = dict(outputs)
  for k in PATIENT_OUTPUTS:
    if k in outputs:
      outputs[k] = constrain_replicated(outputs[k], mesh)
  return outputs, constrain_replicated(targets, mesh)
