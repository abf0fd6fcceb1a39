"""Packed batches: what a step holds, one shape per run, random Cox risk sets, padding."""

import numpy as np
import pytest
from scipy.stats import spearmanr

from moemil_jax import batching


def _lognormal_counts(n, seed=0, median=2000, lo=16, hi=20000):
  rng = np.random.default_rng(seed)
  return np.clip(rng.lognormal(np.log(median), 1.0, n), lo, hi).astype(np.int64)


def _check_batches(batches, counts, layout, packing, patients, whole):
  """Every patient once; each slot points into its own patient's bag in its own block."""
  shape = {(b.patch_index.shape, b.patient.shape) for b in batches}
  assert len(shape) == 1  # one shape for the whole epoch
  seen = []
  for b in batches:
    assert b.patch_index.shape == (layout.groups, packing.capacity)
    assert b.patient.shape == (layout.groups * packing.rows,)
    for p, rows in b.patient_rows():
      seen.append(p)
      lo, hi = layout.offset[p], layout.offset[p] + counts[p]
      assert ((rows >= lo) & (rows < hi)).all() and len(set(rows)) == len(rows)
      take = min(counts[p], packing.max_patches) if packing.max_patches else counts[p]
      if whole:
        assert len(rows) == take
      else:  # the patient that fills a block may keep only part (at least half) of its bag
        assert (take + 1) // 2 <= len(rows) <= take
    for g in range(layout.groups):
      empty = b.patch_segment[g] == packing.rows
      assert (b.patch_index[g][empty] == layout.pad_row(g)).all()
      block = (g * layout.rows, (g + 1) * layout.rows)
      assert ((b.patch_index[g] >= block[0]) & (b.patch_index[g] < block[1])).all()
      for slot in np.flatnonzero(b.patient_mask[g * packing.rows : (g + 1) * packing.rows]):
        assert layout.group[b.patient[g * packing.rows + slot]] == g
  assert sorted(seen) == sorted(patients)


@pytest.mark.parametrize('groups', [1, 4])
def test_train_and_eval_batches_cover_every_patient_in_one_shape(groups):
  counts = _lognormal_counts(120, median=60, hi=2000)
  counts[::9] = 0  # patients without slides
  layout = batching.bag_layout(counts, groups)
  train_ids = np.arange(100)
  packing = batching.training_packing(
    counts[train_ids], layout.group[train_ids], batch_size=16, groups=groups, max_patches=256
  )
  assert packing.capacity >= 256 and packing.capacity % 8 == 0
  rng = np.random.default_rng(0)
  batches = batching.train_batches(train_ids, counts, layout, packing, rng=rng)
  _check_batches(batches, counts, layout, packing, train_ids, whole=False)
  ev = batching.evaluation_packing(counts, packing)
  assert ev.capacity >= counts.max()
  full = batching.eval_batches(np.arange(120), counts, layout, ev)
  _check_batches(full, counts, layout, ev, np.arange(120), whole=True)
  with pytest.raises(ValueError, match='not divisible by 4 bag groups'):
    batching.training_packing(counts, batch_size=6, groups=4)


def test_batch_position_is_independent_of_bag_size():
  """Over many epochs, where a patient lands in the epoch has nothing to do with its bag."""
  counts = _lognormal_counts(200, seed=1)
  layout = batching.bag_layout(counts)
  packing = batching.training_packing(counts, batch_size=16, max_patches=4096)
  sizes, positions = [], []
  for epoch in range(40):
    batches = batching.train_batches(
      np.arange(200), counts, layout, packing, rng=np.random.default_rng([0, epoch])
    )
    for k, b in enumerate(batches):
      for p, _ in b.patient_rows():
        sizes.append(counts[p])
        positions.append(k / (len(batches) - 1))
  rho = spearmanr(sizes, positions).statistic
  assert abs(rho) < 0.03, rho  # 8,000 pairs: the null sd is about 0.011
  # The old size-sorted batching had |rho| far from 0 within a batch's composition:
  # here the bag sizes of one batch are as spread as the cohort's.
  spread = [
    np.std(np.log([counts[p] for p, _ in b.patient_rows()]))
    for b in batching.train_batches(
      np.arange(200), counts, layout, packing, rng=np.random.default_rng(5)
    )[:-1]
  ]
  assert np.median(spread) > 0.6  # lognormal sigma 1: a size-sorted batch would be ~0.1


def test_min_events_per_batch_gives_every_batch_its_events():
  counts = _lognormal_counts(160, seed=2, median=200, hi=2000)
  rng = np.random.default_rng(3)
  events = rng.random(160) < 0.2  # 32 events in about 10 batches
  layout = batching.bag_layout(counts)
  packing = batching.training_packing(counts, batch_size=16)
  few = []
  for epoch in range(20):
    plain = batching.train_batches(
      np.arange(160), counts, layout, packing, rng=np.random.default_rng([1, epoch])
    )
    few += [sum(events[p] for p, _ in b.patient_rows()) for b in plain]
    batches = batching.train_batches(
      np.arange(160),
      counts,
      layout,
      packing,
      rng=np.random.default_rng([1, epoch]),
      events=events,
      min_events_per_batch=2,
    )
    _check_batches(batches, counts, layout, packing, np.arange(160), whole=False)
    assert min(sum(events[p] for p, _ in b.patient_rows()) for b in batches) >= 2
  assert min(few) < 2  # without the option some batches do lack events


def test_padding_is_small_on_lognormal_bags():
  counts = _lognormal_counts(404, seed=4)
  layout = batching.bag_layout(counts)
  train_ids = np.arange(300)
  packing = batching.training_packing(counts[train_ids], batch_size=16, max_patches=4096)
  fractions = [
    batching.padding_fraction(
      batching.train_batches(
        train_ids, counts, layout, packing, rng=np.random.default_rng([0, epoch])
      )
    )
    for epoch in range(10)
  ]
  assert max(fractions) <= 0.05, fractions


def test_pack_keeps_the_order_and_the_limits():
  take = _lognormal_counts(200, seed=6, median=50, hi=400)
  packing = batching.Packing(rows=12, capacity=600)
  for fill in (False, True):
    blocks = batching.pack(range(200), take, packing, lookahead=4, fill=fill)
    where = {p: k for k, block in enumerate(blocks) for p, _ in block}
    assert sorted(where) == list(range(200))
    assert all(sum(t for _, t in b) <= 600 and len(b) <= 12 for b in blocks)
    assert all(t == take[p] or (fill and 2 * t >= take[p]) for b in blocks for p, t in b)
    lag = [max(where[q] for q in range(p + 1)) - where[p] for p in range(200)]
    assert max(lag) <= 2  # a patient lands at most two blocks after its place in the order
  full = [sum(t for _, t in b) for b in blocks[:-1]]
  assert np.mean(full) >= 0.98 * 600  # with fill, blocks are (nearly) full


def test_patient_batch_puts_the_whole_bag_first():
  counts = np.array([3, 40, 0, 7])
  layout = batching.bag_layout(counts)
  b = batching.patient_batch(1, 40, layout)
  assert b.patch_index.shape == (1, 40) and b.patient.tolist() == [1]
  np.testing.assert_array_equal(b.patch_index[0], layout.offset[1] + np.arange(40))
  assert (b.patch_segment == 0).all()
