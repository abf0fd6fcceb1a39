"""Packed batches: every step has the same shape, whatever the bag sizes.

A step holds, per bag group (one per device of the data axis), `rows` patient slots and a
flat axis of `capacity` patch slots. Whole patients are packed into it back to back; each
patch slot carries the row of its patient (`patch_segment`, `rows` for an empty slot), and
the model pools with segment operations. So one compiled training step and one evaluation
step serve a whole run, and empty slots are only what is left at the end of each block.

Cox partial likelihood per batch. The survival loss compares each event with the patients
of its own step who are still at risk, so what a batch holds decides which risk
differences get a gradient. Training batches are therefore drawn at random each epoch,
independently of bag size: the patients of a group are shuffled (optionally stratified so
that events are spread evenly, `min_events_per_batch`), then packed in that order; a patient
that does not fit is tried first in the next step. The capacity spreads an epoch's
patches evenly over about n / batch_size steps, so batches hold about `batch_size` patients
on average (at most twice that), and the patient that closes a full block keeps a random
part (at least half) of its bag in that step, so blocks have almost no empty slots.

The patches themselves stay on the device (`device_data.DeviceData.patches`, laid out by
`BagLayout`); a batch only carries indices into them.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

LOOKAHEAD = 4  # patients tried past one that does not fit before a training block is closed
EVAL_LOOKAHEAD = 64  # evaluation order is free: pack tighter


# --------------------------------------------------------------------------- bag layout


@dataclasses.dataclass(frozen=True)
class BagLayout:
  """Where every bag lives in `DeviceData.patches`.

  The patches array is `groups` blocks of `rows` rows (`data.bag_groups`; a multiple of
  256 rows); each block ends in zero rows, the last of which padding points at. Patient
  p's bag is in block `group[p]`, from the global row `offset[p]`. Batches put a group's
  patients in that group's rows, so the groups of a step can be split over the devices of
  the mesh's data axis. One group (the default): bags back to back in patient order, then
  one zero row.
  """

  group: np.ndarray  # (P,) int32
  offset: np.ndarray  # (P,) int64, global row of the bag's first patch
  rows: int  # rows per block, zero pad row included
  groups: int

  def pad_row(self, g: int) -> int:
    return (g + 1) * self.rows - 1


def bag_layout(counts: np.ndarray, groups: int = 1) -> BagLayout:
  """Deals patients to groups (snake order by bag size: equal patient numbers, similar
  patch totals), then places each group's bags in patient order."""
  counts = np.asarray(counts, np.int64)
  if groups < 1:
    raise ValueError(f'bag groups must be >= 1, got {groups}')
  by_size = np.argsort(-counts, kind='stable')
  lap, pos = np.divmod(np.arange(len(counts)), groups)
  group = np.empty(len(counts), np.int32)
  group[by_size] = np.where(lap % 2 == 0, pos, groups - 1 - pos)
  totals = np.bincount(group, weights=counts, minlength=groups).astype(np.int64)
  rows = _round_up(int(totals.max(initial=0)) + 1, 256)  # patch statistics sum 256-row blocks
  offset = np.zeros(len(counts), np.int64)
  for g in range(groups):
    members = np.flatnonzero(group == g)
    offset[members] = g * rows + np.concatenate([[0], np.cumsum(counts[members])[:-1]])
  return BagLayout(group, offset, rows, groups)


# --------------------------------------------------------------------------- step shape


@dataclasses.dataclass(frozen=True)
class Packing:
  """The shape of every step: per group, `rows` patient slots and `capacity` patch slots;
  bags longer than `max_patches` (0: no limit) are randomly subsampled to it."""

  rows: int
  capacity: int
  max_patches: int = 0

  def take(self, counts: np.ndarray) -> np.ndarray:
    counts = np.asarray(counts, np.int64)
    return np.minimum(counts, self.max_patches) if self.max_patches else counts


def _round_up(n: int, multiple: int = 8) -> int:
  return max(multiple, -(-int(n) // multiple) * multiple)


def rows_per_group(batch_size: int, groups: int) -> int:
  if batch_size % groups:
    raise ValueError(
      f'batch size {batch_size} is not divisible by {groups} bag groups '
      '(devices on the data axis); pick a multiple'
    )
  return batch_size // groups


def training_packing(
  counts: np.ndarray,
  groups_of: np.ndarray | None = None,
  *,
  batch_size: int,
  groups: int = 1,
  max_patches: int = 0,
) -> Packing:
  """Chosen once per run from the training patients' bag sizes (`counts`, and the bag group
  of each in `groups_of`).

  An epoch of a group's n patients takes about n / (batch_size / groups) steps; the
  capacity is the group's patches (bags subsampled to `max_patches`) spread evenly over
  those steps, 2% over, and at least the largest bag. Patient slots: twice the mean batch,
  so that a block of small bags is not cut short.
  """
  bg = rows_per_group(batch_size, groups)
  take = Packing(0, 0, max_patches).take(counts)
  groups_of = np.zeros(len(take), np.int64) if groups_of is None else np.asarray(groups_of)
  capacity = int(take.max(initial=0))
  for g in range(groups):
    members = take[groups_of == g]
    steps = max(1, round(len(members) / bg))
    capacity = max(capacity, math.ceil(1.02 * members.sum() / steps))
  rows = 2 * bg if take.any() else bg
  return Packing(rows=rows, capacity=_round_up(capacity), max_patches=max_patches)


def evaluation_packing(counts: np.ndarray, train: Packing, *, max_patches: int = 0) -> Packing:
  """The training shape, widened to hold the largest bag evaluated whole (or `max_patches`)."""
  take = Packing(0, 0, max_patches).take(counts)
  capacity = _round_up(max(train.capacity, int(take.max(initial=0))))
  return Packing(rows=train.rows, capacity=capacity, max_patches=max_patches)


# --------------------------------------------------------------------------- batches


@dataclasses.dataclass
class Batch:
  """Host index arrays of one step (G groups of R patient slots and C patch slots).

  Patient slot r of group g is row g*R + r of the per-patient arrays; unused slots are
  masked. Patch slot c of group g points at global row `patch_index[g, c]` of the patches
  and belongs to slot `patch_segment[g, c]` of that group (R: an empty slot, pointing at
  the group's zero row).
  """

  patient: np.ndarray  # (G*R,) int32, 0 for empty slots
  patient_mask: np.ndarray  # (G*R,) bool
  patch_index: np.ndarray  # (G, C) int32
  patch_segment: np.ndarray  # (G, C) int32 in [0, R]

  def tree(self) -> dict[str, np.ndarray]:
    return dataclasses.asdict(self)

  @property
  def rows(self) -> int:
    return len(self.patient) // len(self.patch_index)

  def real_slots(self) -> int:
    return int((self.patch_segment < self.rows).sum())

  def patient_rows(self) -> Iterator[tuple[int, np.ndarray]]:
    """(patient, its patch rows in the patches array) for every real patient slot."""
    r = self.rows
    for slot in np.flatnonzero(self.patient_mask):
      g, local = divmod(int(slot), r)
      yield int(self.patient[slot]), self.patch_index[g][self.patch_segment[g] == local]


def _fill(blocks: list[list], counts, layout: BagLayout, g: int, packing: Packing, rng):
  """Index arrays of group g's blocks, each a list of (patient, patches taken)."""
  r, c = packing.rows, packing.capacity
  steps = len(blocks)
  patient = np.zeros((steps, r), np.int32)
  mask = np.zeros((steps, r), bool)
  index = np.full((steps, c), layout.pad_row(g), np.int32)
  segment = np.full((steps, c), r, np.int32)
  for s, members in enumerate(blocks):
    pos = 0
    for j, (p, t) in enumerate(members):
      if t < counts[p]:
        chosen = np.sort(rng.choice(counts[p], size=t, replace=False))
      else:
        chosen = np.arange(t)
      index[s, pos : pos + t] = layout.offset[p] + chosen
      segment[s, pos : pos + t] = j
      patient[s, j], mask[s, j] = p, True
      pos += t
  return patient, mask, index, segment


def empty_block(layout: BagLayout, packing: Packing, g: int = 0) -> tuple[np.ndarray, ...]:
  """(patient, patient_mask, patch_index, patch_segment) of group g holding no patient."""
  return (
    np.zeros(packing.rows, np.int32),
    np.zeros(packing.rows, bool),
    np.full(packing.capacity, layout.pad_row(g), np.int32),
    np.full(packing.capacity, packing.rows, np.int32),
  )


def empty_batch(layout: BagLayout, packing: Packing) -> Batch:
  """A step holding no patient in any group (a member's no-op step)."""
  parts = [empty_block(layout, packing, g) for g in range(layout.groups)]
  return Batch(
    np.concatenate([p[0] for p in parts]),
    np.concatenate([p[1] for p in parts]),
    np.stack([p[2] for p in parts]),
    np.stack([p[3] for p in parts]),
  )


def _assemble(per_group: list[tuple], layout: BagLayout, packing: Packing) -> list[Batch]:
  """Step k = block k of every group (an all-empty block where a group has fewer)."""
  steps = max(len(p[0]) for p in per_group)
  batches = []
  for k in range(steps):
    parts = []
    for g, (patient, mask, index, segment) in enumerate(per_group):
      if k < len(patient):
        parts.append((patient[k], mask[k], index[k], segment[k]))
      else:
        parts.append(empty_block(layout, packing, g))
    batches.append(
      Batch(
        np.concatenate([p[0] for p in parts]),
        np.concatenate([p[1] for p in parts]),
        np.stack([p[2] for p in parts]),
        np.stack([p[3] for p in parts]),
      )
    )
  return batches


def pack(
  order: Sequence[int],
  take: np.ndarray,
  packing: Packing,
  *,
  lookahead: int,
  fill: bool,
  events: np.ndarray | None = None,
  min_events: int = 0,
) -> list[list[tuple[int, int]]]:
  """Patients in `order` into blocks of at most `rows` patients and `capacity` patches;
  each block a list of (patient, patches taken).

  A patient that does not fit is tried again first in the next block; a block closes after
  `lookahead` such misses. With
  `fill`, a patient that does not fit but would keep at least half its patches takes the
  room left instead (a random subset, as for bags above `max_patches`), so blocks are nearly
  full: at most one patient per block loses patches, in that step only.
  With `min_events`, each block starts with the next `min_events` patients of the order
  that have `events` (brought forward a few places).
  """
  queue = list(order)
  blocks = []
  while queue:
    allowed = len(queue)
    if min_events:  # bring events forward; keep enough for the blocks still to come
      first = [j for j, p in enumerate(queue) if events[p]]
      later = max(0, math.ceil(sum(take[p] for p in queue) / packing.capacity) - 1)
      allowed = max(min_events, len(first) - min_events * later)
      first = set(first[:min_events])
      queue = [queue[j] for j in sorted(first)] + [p for j, p in enumerate(queue) if j not in first]
    block, used, deferred, n_events = [], 0, [], 0
    for j, p in enumerate(queue):
      if len(block) == packing.rows:
        deferred.extend(queue[j:])
        break
      t, room = int(take[p]), packing.capacity - used
      if min_events and events[p] and n_events >= allowed:
        deferred.append(p)  # saved for a later block; not a miss
        continue
      if t <= room:
        block.append((p, t))
        used += t
        n_events += bool(min_events and events[p])
      elif fill and 2 * room >= t:
        block.append((p, room))
        deferred.extend(queue[j + 1 :])
        break
      else:
        deferred.append(p)
        if len(deferred) > lookahead:
          deferred.extend(queue[j + 1 :])
          break
    blocks.append(block)
    queue = deferred
  return blocks


def _event_spread_order(patients: np.ndarray, events: np.ndarray, rng) -> np.ndarray:
  """A random order in which events and non-events are each spread evenly."""
  position = np.empty(len(patients))
  for stratum in (events, ~events):
    n = int(stratum.sum())
    position[stratum] = (rng.permutation(n) + rng.uniform(size=n)) / max(n, 1)
  return patients[np.argsort(position, kind='stable')]


def train_batches(
  patients: np.ndarray,
  counts: np.ndarray,
  layout: BagLayout,
  packing: Packing,
  *,
  rng: np.random.Generator,
  events: np.ndarray | None = None,
  min_events_per_batch: int = 0,
) -> list[Batch]:
  """One epoch of random batches: each group's patients shuffled and packed in that order.

  events: (P,) bool, patients with an observed OS event. With `min_events_per_batch`, the
  shuffle spreads events evenly and each group's block of a step starts with
  ceil(min / groups) of them.
  """
  patients = np.asarray(patients)
  take = packing.take(counts)
  per_group = []
  need = -(-min_events_per_batch // layout.groups) if min_events_per_batch else 0
  for g in range(layout.groups):
    members = patients[layout.group[patients] == g]
    if need:
      order = _event_spread_order(members, np.asarray(events)[members], rng)
    else:
      order = rng.permutation(members)
    blocks = pack(
      order, take, packing, lookahead=LOOKAHEAD, fill=True, events=events, min_events=need
    )
    if need and min(sum(bool(events[p]) for p, _ in b) for b in blocks) < need:
      logging.log_first_n(
        logging.WARNING,
        'train.min_events_per_batch=%d: some batches have fewer (%d events among %d '
        'training patients of bag group %d in %d batches)',
        1,
        min_events_per_batch,
        int(np.asarray(events)[members].sum()),
        len(members),
        g,
        len(blocks),
      )
    per_group.append(_fill(blocks, counts, layout, g, packing, rng))
  return _assemble(per_group, layout, packing)


def eval_batches(
  patients: np.ndarray,
  counts: np.ndarray,
  layout: BagLayout,
  packing: Packing,
  *,
  seed: int = 0,
) -> list[Batch]:
  """Deterministic batches: each group's patients, largest bags first, packed tightly
  (whole bags unless `packing.max_patches`)."""
  patients = np.asarray(patients)
  take = packing.take(counts)
  rng = np.random.default_rng(seed)
  per_group = []
  for g in range(layout.groups):
    members = patients[layout.group[patients] == g]
    order = members[np.argsort(-take[members], kind='stable')]
    blocks = pack(order, take, packing, lookahead=EVAL_LOOKAHEAD, fill=False)
    per_group.append(_fill(blocks, counts, layout, g, packing, rng))
  return _assemble(per_group, layout, packing)


def patient_batch(p: int, count: int, layout: BagLayout) -> Batch:
  """Patient p alone with its whole bag in slots 0..count-1 (heatmaps, prediction)."""
  packing = Packing(rows=1, capacity=_round_up(max(int(count), 1)))
  counts = np.zeros(p + 1, np.int64)
  counts[p] = count
  g = int(layout.group[p])
  patient, mask, index, segment = _fill([[(p, int(count))]], counts, layout, g, packing, None)
  return Batch(patient[0], mask[0], index, segment)


def padding_fraction(batches: Sequence[Batch]) -> float:
  """Share of patch slots that hold no patch."""
  slots = sum(b.patch_segment.size for b in batches)
  return 1.0 - sum(b.real_slots() for b in batches) / max(slots, 1)


# --------------------------------------------------------------------------- inside jit


def gather_inputs(data: dict[str, jax.Array], batch: dict[str, jax.Array], compute_dtype):
  """Inside jit: model inputs and targets of one batch from the resident arrays."""
  p = batch['patient']
  segment = batch['patch_segment']
  groups, rows = segment.shape[0], p.shape[0] // segment.shape[0]
  wsi = data['patches'][batch['patch_index']]
  wsi = wsi.astype(jnp.float32)
  wsi = ((wsi - data['patch_mean']) * data['patch_inv_std']).astype(compute_dtype)
  bag_size = jax.vmap(lambda s: jnp.bincount(s, length=rows + 1)[:rows])(segment)
  s = data['mri_deep'].shape[1]
  deep_count = data['mri_deep_count'][p]
  pmask = batch['patient_mask']
  inputs = {
    'wsi': wsi,
    'wsi_segment': segment,
    'has_wsi': (bag_size.reshape(groups * rows) > 0) & pmask,
    'radiomics': data['radiomics'][p],
    'has_radiomics': data['has_radiomics'][p] & pmask,
    'mri_deep': data['mri_deep'][p].astype(compute_dtype),
    'mri_deep_valid': jnp.arange(s)[None] < deep_count[:, None],
    'has_mri_deep': (deep_count > 0) & pmask,
  }
  if 'wsi_summary' in data:  # prototype slide vectors (device_data.slide_vectors)
    inputs['wsi_summary'] = data['wsi_summary'][p]
  targets = {
    'patient_mask': pmask,
    'response': data['response'][p],
    'has_response': data['has_response'][p],
    'os_months': data['os_months'][p],
    'os_event': data['os_event'][p],
    'has_survival': data['has_survival'][p],
  }
  return inputs, targets


def pack_bags(bags: Sequence[np.ndarray], capacity: int | None = None):
  """Dense bags (a list of (n_i, D) arrays) -> packed model inputs ('wsi' (1, C, D) and
  'wsi_segment' (1, C)), for callers that hold features in memory (tests, references)."""
  sizes = [len(b) for b in bags]
  capacity = capacity or _round_up(max(sum(sizes), 1))
  if sum(sizes) > capacity:
    raise ValueError(f'{sum(sizes)} patches do not fit {capacity} slots')
  dim = bags[0].shape[1] if bags else 0
  wsi = np.zeros((1, capacity, dim), np.float32)
  segment = np.full((1, capacity), len(bags), np.int32)
  pos = 0
  for j, b in enumerate(bags):
    wsi[0, pos : pos + len(b)] = b
    segment[0, pos : pos + len(b)] = j
    pos += len(b)
  return {'wsi': wsi, 'wsi_segment': segment}
