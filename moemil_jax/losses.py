"""Losses of MoEMIL: Cox partial likelihood, masked BCE, CLAM instance clustering, gate balance.

All functions are pure, jit-friendly and take masks instead of ragged inputs, so a padded
batch (patients without a label, padded patches) trains without host-side filtering.
"""

from __future__ import annotations

from typing import Mapping

import jax
import jax.numpy as jnp
import optax


def _very_negative(dtype) -> jax.Array:
  # Finite stand-in for -inf: keeps exp() at 0 and every gradient finite.
  return jnp.asarray(jnp.finfo(dtype).min / 4, dtype)


def cox_nll(
  log_risk: jax.Array,
  time: jax.Array,
  event: jax.Array,
  *,
  ties: str = 'breslow',
  mask: jax.Array | None = None,
  reduction: str = 'mean',
) -> jax.Array:
  """Minus the Cox log partial likelihood of `log_risk` (higher = higher hazard).

  Exact for tied times (Breslow or Efron) in O(n log n): sort by time, take a reverse
  cumulative logsumexp, read each tie group's risk set at its first sorted index (so a
  subject censored at t is at risk for events at t). Invariant to a shift of `log_risk`.

  Args:
    log_risk: (n,) linear predictor.
    time: (n,) follow-up times.
    event: (n,) 1 for an observed event, 0 for censored.
    ties: "breslow" or "efron".
    mask: optional (n,) bool; False rows take no part (not at risk, no event).
    reduction: "sum" is exactly minus the log partial likelihood; "mean" divides it by
      max(number of events, 1), so a batch without events gives 0 and zero gradient.
  """
  if ties not in ('breslow', 'efron'):
    raise ValueError(f"ties must be 'breslow' or 'efron', got {ties!r}")
  if reduction not in ('mean', 'sum'):
    raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
  log_risk = jnp.asarray(log_risk)
  if log_risk.dtype not in (jnp.float32, jnp.float64):  # low precision: compute in f32
    log_risk = log_risk.astype(jnp.float32)
  dtype = log_risk.dtype
  n = log_risk.shape[0]
  if mask is None:
    mask = jnp.ones((n,), bool)
  mask = jnp.asarray(mask, bool)
  event = jnp.logical_and(jnp.asarray(event) > 0, mask)
  time = jnp.where(mask, jnp.asarray(time, dtype), jnp.inf)
  neg = _very_negative(dtype)

  # Shift by the largest included log-risk: the likelihood is shift invariant.
  shift = jax.lax.stop_gradient(jnp.max(jnp.where(mask, log_risk, neg)))
  eta = jnp.where(mask, log_risk - shift, neg)

  order = jnp.argsort(time, stable=True)
  t_s, eta_s, ev_s = time[order], eta[order], event[order]
  first = jnp.searchsorted(t_s, t_s, side='left')  # first index of each tie group
  log_r = jax.lax.cumlogsumexp(eta_s, reverse=True)[first]  # log risk-set sum per subject

  ev_f = ev_s.astype(dtype)
  if ties == 'efron':
    # Per tie group: d events, D = sum of exp(eta) over them; the l-th tied event
    # (l = 0..d-1) sees the risk set R - (l/d) D.
    eta_ev = jnp.where(ev_s, eta_s, neg)
    grp_max = jax.ops.segment_max(eta_ev, first, num_segments=n)
    grp_sum = jax.ops.segment_sum(jnp.exp(eta_ev - grp_max[first]) * ev_f, first, num_segments=n)
    log_d = grp_max[first] + jnp.log(jnp.maximum(grp_sum[first], jnp.finfo(dtype).tiny))
    d = jax.ops.segment_sum(ev_f, first, num_segments=n)[first]
    cum_ev = jnp.cumsum(ev_f) - ev_f  # events before this index
    rank = cum_ev - cum_ev[first]
    frac = jnp.where(ev_s, rank / jnp.maximum(d, 1.0), 0.0)
    ratio = jnp.exp(jnp.minimum(log_d - log_r, 0.0))
    log_r = log_r + jnp.log1p(-frac * ratio)

  terms = jnp.where(ev_s, eta_s - log_r, 0.0)
  nll = -jnp.sum(terms)
  if reduction == 'mean':
    nll = nll / jnp.maximum(jnp.sum(ev_f), 1.0)
  return nll


def masked_bce(logits: jax.Array, labels: jax.Array, mask: jax.Array) -> jax.Array:
  """Mean binary cross-entropy over rows with a label; 0 (and zero gradient) if none."""
  logits = logits.astype(jnp.float32)
  mask = jnp.asarray(mask, bool)
  labels = jnp.where(mask, jnp.asarray(labels, jnp.float32), 0.0)
  losses = optax.sigmoid_binary_cross_entropy(logits, labels)
  m = mask.astype(jnp.float32)
  return jnp.sum(losses * m) / jnp.maximum(jnp.sum(m), 1.0)


def _rank_in_segment(scores: jax.Array, segment: jax.Array, rows: int):
  """(C,) rank of each slot's score within its segment (0 = highest) and (C,) the size of
  its segment; one sort by (segment, -score)."""
  c = scores.shape[0]
  slot = jnp.arange(c)
  seg_sorted, _, order = jax.lax.sort((segment, -scores, slot), num_keys=2)
  size = jnp.bincount(segment, length=rows + 1)
  start = jnp.cumsum(size) - size
  rank = jnp.zeros(c, jnp.int32).at[order].set(slot - start[seg_sorted])
  return rank, size[segment]


def instance_clustering(
  scores: jax.Array,
  segment: jax.Array,
  instance_logits: jax.Array,
  label: jax.Array,
  label_mask: jax.Array,
  *,
  k: int = 8,
  subtyping: bool = False,
) -> jax.Array:
  """CLAM instance clustering loss over packed bags.

  For each bag with a label c, the k most attended patches are pseudo-positive and the k
  least attended pseudo-negative for class c's instance classifier (with `subtyping`, the
  top-k are also negatives for the other classes). k shrinks to floor(n/2) for a bag of
  n < 2k patches, so top and bottom never overlap; empty slots are never picked.
  Cross-entropy, averaged over the picked instances of the batch.

  Args:
    scores: (G, C) raw attention scores of the patch slots.
    segment: (G, C) the slot's patient row within its group, in [0, R]; R = empty slot.
    instance_logits: (G, C, K, 2) per-slot logits of each class's instance classifier.
    label: (G*R,) int bag label in [0, K).
    label_mask: (G*R,) bool, bags with a label.
  """
  groups = segment.shape[0]
  rows = label.shape[0] // groups
  num_classes = instance_logits.shape[-2]
  scores = jax.lax.stop_gradient(scores.astype(jnp.float32))
  rank, size = jax.vmap(_rank_in_segment, (0, 0, None))(scores, segment, rows)
  k_eff = jnp.minimum(k, size // 2)
  valid = segment < rows
  top = valid & (rank < k_eff)
  bottom = valid & (rank >= size - k_eff)

  def per_slot(x, fill):  # (G*R,) patient values -> (G, C) slot values
    x = jnp.asarray(x).reshape(groups, rows)
    return jnp.take_along_axis(
      jnp.concatenate([x, jnp.full((groups, 1), fill, x.dtype)], 1), segment, axis=1
    )

  label = per_slot(jnp.clip(jnp.asarray(label, jnp.int32), 0, num_classes - 1), 0)
  labelled = per_slot(jnp.asarray(label_mask, bool), False)
  logits = instance_logits.astype(jnp.float32)
  in_cls = jax.nn.one_hot(label, num_classes, dtype=bool)  # (G, C, K)

  def ce(target):  # (G, C, K)
    return optax.softmax_cross_entropy_with_integer_labels(
      logits, jnp.full(logits.shape[:-1], target)
    )

  top_w = (top & labelled)[..., None].astype(jnp.float32)
  bot_w = (bottom & labelled)[..., None].astype(jnp.float32)
  total = jnp.sum(ce(1) * top_w * in_cls) + jnp.sum(ce(0) * bot_w * in_cls)
  count = jnp.sum(top_w * in_cls) + jnp.sum(bot_w * in_cls)
  if subtyping:
    out_w = top_w * ~in_cls
    total = total + jnp.sum(ce(0) * out_w)
    count = count + jnp.sum(out_w)
  return total / jnp.maximum(count, 1.0)


def gate_balance(gates: jax.Array, mask: jax.Array | None = None) -> jax.Array:
  """E * sum_e p_e^2 - 1 per task, averaged; p = mean gate over the batch. 0 when balanced.

  gates: (B, T, E) softmax weights; mask: (B,) real patients.
  """
  gates = gates.astype(jnp.float32)
  num_experts = gates.shape[-1]
  m = jnp.ones(gates.shape[:1]) if mask is None else jnp.asarray(mask, jnp.float32)
  p = jnp.sum(gates * m[:, None, None], axis=0) / jnp.maximum(jnp.sum(m), 1.0)  # (T, E)
  return jnp.mean(num_experts * jnp.sum(p * p, axis=-1) - 1.0)


def total_loss(
  outputs: Mapping[str, jax.Array],
  batch: Mapping[str, jax.Array],
  weights: Mapping[str, float],
  *,
  ties: str = 'efron',
  k: int = 8,
  subtyping: bool = False,
) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Weighted sum of the task losses; returns (loss, per-term dict for logging).

  outputs: model outputs (response_logit, log_risk, gates, and for the WSI branch
    attention_scores, patch_segment, instance_logits).
  batch: response, has_response, os_months, os_event, has_survival, patient_mask.
  weights: response, survival, instance, gate_balance.
  """
  pmask = jnp.asarray(batch['patient_mask'], bool)
  has_resp = pmask & jnp.asarray(batch['has_response'], bool)
  has_surv = pmask & jnp.asarray(batch['has_survival'], bool)
  terms = {
    'response': masked_bce(outputs['response_logit'], batch['response'], has_resp),
    'survival': cox_nll(
      outputs['log_risk'],
      batch['os_months'],
      batch['os_event'],
      ties=ties,
      mask=has_surv,
      reduction='mean',
    ),
  }
  if 'instance_logits' in outputs and weights.get('instance', 0.0):
    terms['instance'] = instance_clustering(
      outputs['attention_scores'],
      outputs['patch_segment'],
      outputs['instance_logits'],
      batch['response'],
      has_resp,
      k=k,
      subtyping=subtyping,
    )
  if 'gates' in outputs and weights.get('gate_balance', 0.0):
    terms['gate_balance'] = gate_balance(outputs['gates'], pmask)
  loss = sum(weights.get(name, 0.0) * value for name, value in terms.items())
  return loss, terms
