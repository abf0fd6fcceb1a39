"""The device mesh of training: two axes, `member` x `data`, with `AxisType.Auto`.

Training state is K stacked members (`trainer.py`). The member axis splits them over
devices: an ensemble on 8 GPUs trains one member per GPU with no communication at all,
the natural layout for a model of this size. The data axis splits each member's batch by
bag group (`data.bag_groups`), so a member's step is data-parallel. The batches depend on
the config alone, never on the device count: sharding only places the program, and XLA's
partitioner (auto axes) keeps its results those of one device, to round-off. Per-patient
tables and the patches are replicated on every device.

Config (all optional):

  config.mesh.member = 0          # devices on the member axis; 0 = automatic
  config.mesh.data = 0            # devices on the data axis; 0 or -1 = automatic
  config.mesh.distributed = False # call jax.distributed.initialize() first (multi-host)
  config.mesh.coordinator = ""    # host:port of process 0; "" = from the cluster environment
  config.mesh.num_processes = 0   # 0 = from the cluster environment
  config.mesh.process_id = -1     # -1 = from the cluster environment

Automatic: data = gcd(bag groups, devices) (1 without bag groups), member = the smallest
divisor of the remaining devices that holds every member (all of them with several
processes, which must all take part); members are padded with idle copies to a multiple of
the member axis. On TPU pods, SLURM and Open MPI `jax.distributed.initialize()` finds the
coordinator and process ids by itself, so only `distributed = True` is needed. Every
process runs the same program on the same host-side batch plan (same seeds) and places
only its own devices' parts (`put`); process 0 alone writes.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import jax
import ml_collections
import numpy as np
from absl import logging
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

MEMBER = 'member'
DATA = 'data'


def mesh_config() -> ml_collections.ConfigDict:
  """Defaults for `config.mesh` (automatic axes, no multi-host)."""
  return ml_collections.ConfigDict(
    {
      'member': 0,
      'data': 0,
      'distributed': False,
      'coordinator': '',
      'num_processes': 0,
      'process_id': -1,
    }
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

  Must run before anything touches a JAX backend (training calls it first thing).
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


def training_mesh(config, members: int, groups: int = 1) -> jax.sharding.Mesh:
  """The (member, data) mesh for `members` stacked members whose batches have `groups` bag
  groups (see the module docstring for the automatic rule)."""
  mc = _mesh_fields(config) or mesh_config()
  n = jax.device_count()
  data = int(mc.data) if int(mc.data) > 0 else math.gcd(groups, n)
  if groups % data or data > n:
    raise ValueError(
      f'mesh.data={data}: the data axis splits the {groups} bag groups of a step '
      f'(data.bag_groups) over devices, so it must divide them and fit the {n} devices; '
      'set data.bag_groups to a multiple of mesh.data'
    )
  member = int(mc.get('member', 0))
  if member <= 0:
    rest = n // data
    fits = [m for m in range(1, rest + 1) if rest % m == 0 and m >= members]
    member = rest if jax.process_count() > 1 or not fits else fits[0]
  if member * data > n:
    raise ValueError(f'mesh.member={member} x mesh.data={data} needs more than the {n} devices')
  if jax.process_count() > 1 and member * data != n:
    raise ValueError(
      f'mesh.member={member} x mesh.data={data}: with {jax.process_count()} processes the '
      f'mesh must span all {n} devices (use 0 for automatic)'
    )
  return jax.make_mesh(
    (member, data),
    (MEMBER, DATA),
    axis_types=(AxisType.Auto, AxisType.Auto),
    devices=jax.devices()[: member * data],
  )


def padded_members(mesh: jax.sharding.Mesh, members: int) -> int:
  """Members rounded up to a multiple of the member axis (the rest train as idle copies)."""
  m = mesh.shape[MEMBER]
  return -(-members // m) * m


def replicated(mesh: jax.sharding.Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def member_sharding(mesh: jax.sharding.Mesh) -> NamedSharding:
  """Leading member axis split over `member`."""
  return NamedSharding(mesh, P(MEMBER))


def batch_sharding(mesh: jax.sharding.Mesh) -> NamedSharding:
  """(members, bag groups or patient slots, ...) batches: members over `member`, groups
  (and their patient slots) over `data`."""
  return NamedSharding(mesh, P(MEMBER, DATA))


def put(tree, sharding: NamedSharding):
  """Host arrays (the same on every process) -> global arrays; each process transfers only
  the parts its own devices hold, on one host and across hosts alike."""

  def place(x):
    x = np.asarray(x)
    return jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])

  return jax.tree.map(place, tree)


def host(x) -> np.ndarray:
  """A global array as a host numpy array, on any process (gathered when it is split over
  devices of other processes)."""
  if not isinstance(x, jax.Array):
    return np.asarray(x)
  if x.is_fully_replicated:
    return np.asarray(x.addressable_data(0))
  if x.is_fully_addressable:
    return np.asarray(x)
  whole = jax.jit(lambda a: a, out_shardings=NamedSharding(x.sharding.mesh, P()))(x)
  return np.asarray(whole.addressable_data(0))


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
