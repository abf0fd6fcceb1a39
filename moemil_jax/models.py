"""MoEMIL in Flax NNX: gated-attention MIL (WSI) + MRI encoders -> MMoE -> response, log-risk.

Bags arrive packed (`batching`): per bag group, a flat axis of patch slots, each tagged
with the row of its patient, so one jitted program serves every bag-size distribution. Modalities switched off in the config are never built, which is how the DLR
(MRI only) and pathomics (WSI only) baselines are the same code.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

MODALITIES = ('wsi', 'radiomics', 'mri_deep')
TASKS = ('response', 'survival')
WSI_PATHWAYS = ('attention', 'prototypes', 'both')


def masked_softmax(scores: jax.Array, valid: jax.Array) -> jax.Array:
  """Softmax over the last axis restricted to `valid`; all-zero weights for an empty row."""
  valid = jnp.asarray(valid, bool)
  scores = scores.astype(jnp.float32)
  m = jnp.max(jnp.where(valid, scores, -jnp.inf), axis=-1, keepdims=True)
  m = jax.lax.stop_gradient(jnp.where(jnp.isfinite(m), m, 0.0))
  e = jnp.where(valid, jnp.exp(jnp.where(valid, scores - m, 0.0)), 0.0)
  return e / jnp.maximum(jnp.sum(e, axis=-1, keepdims=True), 1e-30)


def segment_softmax(scores: jax.Array, segment: jax.Array, rows: int) -> jax.Array:
  """Softmax of (C,) scores within each segment in [0, rows); slots of segment `rows`
  (empty) get weight 0. Dense one-hot sums: deterministic and matmul-friendly."""
  scores = scores.astype(jnp.float32)
  member = segment[:, None] == jnp.arange(rows)[None]  # (C, rows)
  m = jnp.max(jnp.where(member, scores[:, None], -jnp.inf), axis=0)  # (rows,)
  m = jax.lax.stop_gradient(jnp.where(jnp.isfinite(m), m, 0.0))
  valid = segment < rows
  shift = jnp.append(m, 0.0)[segment]
  e = jnp.where(valid, jnp.exp(jnp.where(valid, scores - shift, 0.0)), 0.0)
  denom = jnp.sum(jnp.where(member, e[:, None], 0.0), axis=0)  # (rows,)
  return e / jnp.maximum(jnp.append(denom, 1.0)[segment], 1e-30)


class GatedAttention(nnx.Module):
  """score = w^T (tanh(V h) * sigmoid(U h)) (Ilse et al. 2018; CLAM's Attn_Net_Gated).

  w has no bias (CLAM's has one): softmax and top-k are shift invariant, so a bias would get
  an exactly-zero gradient that Adam turns into round-off-driven steps.
  """

  def __init__(self, dim: int, hidden: int, *, dtype, rngs: nnx.Rngs):
    self.a = nnx.Linear(dim, hidden, dtype=dtype, rngs=rngs)
    self.b = nnx.Linear(dim, hidden, dtype=dtype, rngs=rngs)
    self.c = nnx.Linear(hidden, 1, use_bias=False, dtype=dtype, rngs=rngs)

  def __call__(self, h: jax.Array) -> jax.Array:
    return self.c(jnp.tanh(self.a(h)) * jax.nn.sigmoid(self.b(h)))[..., 0]


class WSIBranch(nnx.Module):
  """CLAM single-branch: Linear+ReLU+dropout, gated attention over each patient's bag.

  Works on packed bags: (G, C, D) patch slots whose `segment` (G, C) names the patient row
  of the slot within its group (R rows per group; R marks an empty slot). Returns the pooled
  (G*R, dim) vectors and, for heatmaps and instance clustering, the raw attention scores and
  per-class instance-classifier logits of every slot.
  """

  def __init__(
    self,
    in_dim: int,
    dim: int,
    attn_dim: int,
    dropout: float,
    num_classes: int,
    *,
    dtype,
    rngs: nnx.Rngs,
  ):
    self.fc = nnx.Linear(in_dim, dim, dtype=dtype, rngs=rngs)
    self.dropout = nnx.Dropout(dropout)
    self.attention = GatedAttention(dim, attn_dim, dtype=dtype, rngs=rngs)
    self.instance = nnx.Linear(dim, num_classes * 2, dtype=dtype, rngs=rngs)
    self.num_classes = num_classes

  def __call__(self, patches, segment, rows: int, *, rngs: nnx.Rngs | None):
    h = self.dropout(jax.nn.relu(self.fc(patches)), deterministic=rngs is None, rngs=rngs)
    scores = self.attention(h).astype(jnp.float32)  # (G, C)
    weights = jax.vmap(segment_softmax, (0, 0, None))(scores, segment, rows)
    member = (segment[..., None] == jnp.arange(rows)).astype(h.dtype)  # (G, C, R)
    pooled = jnp.einsum('gcr,gc,gcd->grd', member, weights.astype(h.dtype), h)
    inst = self.instance(h).reshape(*h.shape[:2], self.num_classes, 2)
    return pooled.reshape(-1, h.shape[-1]), {
      'attention_scores': scores,
      'attention': weights,
      'patch_segment': segment,
      'instance_logits': inst,
    }


class MLP(nnx.Module):
  """Linear+ReLU+dropout layers."""

  def __init__(
    self, dims: Sequence[int], dropout: float, *, dtype, rngs: nnx.Rngs, use_bias: bool = True
  ):
    self.layers = nnx.List(
      [
        nnx.Linear(i, o, use_bias=use_bias, dtype=dtype, rngs=rngs)
        for i, o in zip(dims[:-1], dims[1:])
      ]
    )
    self.dropout = nnx.Dropout(dropout)

  def __call__(self, x, *, rngs: nnx.Rngs | None):
    for layer in self.layers:
      x = self.dropout(jax.nn.relu(layer(x)), deterministic=rngs is None, rngs=rngs)
    return x


class MRIDeepBranch(nnx.Module):
  """Per-slice MLP on deep MRI features, pooled over all slices of all sequences."""

  def __init__(self, in_dim: int, dim: int, pooling: str, dropout: float, *, dtype, rngs: nnx.Rngs):
    if pooling not in ('attention', 'mean'):
      raise ValueError(f"mri_deep pooling must be 'attention' or 'mean', got {pooling!r}")
    self.mlp = MLP((in_dim, dim), dropout, dtype=dtype, rngs=rngs)
    self.attention = (
      GatedAttention(dim, max(dim // 2, 1), dtype=dtype, rngs=rngs)
      if pooling == 'attention'
      else None
    )

  def __call__(self, slices, valid, *, rngs):
    h = self.mlp(slices, rngs=rngs)
    if self.attention is not None:
      weights = masked_softmax(self.attention(h), valid)
    else:
      v = jnp.asarray(valid, jnp.float32)
      weights = v / jnp.maximum(jnp.sum(v, -1, keepdims=True), 1.0)
    return jnp.einsum('bn,bnd->bd', weights.astype(h.dtype), h)


class MMoE(nnx.Module):
  """E shared experts; one softmax gate per task mixes them for that task's tower."""

  def __init__(
    self,
    in_dim: int,
    num_experts: int,
    expert_dim: int,
    tower_dim: int,
    num_tasks: int,
    dropout: float,
    *,
    dtype,
    rngs: nnx.Rngs,
  ):
    self.experts = nnx.Linear(in_dim, num_experts * expert_dim, dtype=dtype, rngs=rngs)
    self.gates = nnx.Linear(in_dim, num_tasks * num_experts, dtype=dtype, rngs=rngs)
    # The survival tower and head have no biases: the Cox partial likelihood ignores a
    # constant shift of log-risk, so a head bias (or the bias of a tower unit active for
    # every patient) would get an exactly-zero gradient, and Adam would turn its round-off
    # into learning-rate-sized steps that change nothing but make equal programs disagree.
    survival = [TASKS[t] == 'survival' for t in range(num_tasks)]
    self.towers = nnx.List(
      [
        MLP((expert_dim, tower_dim), dropout, dtype=dtype, rngs=rngs, use_bias=not survival[t])
        for t in range(num_tasks)
      ]
    )
    self.heads = nnx.List(
      [nnx.Linear(tower_dim, 1, use_bias=not survival[t], rngs=rngs) for t in range(num_tasks)]
    )
    self.dropout = nnx.Dropout(dropout)
    self.num_experts, self.expert_dim, self.num_tasks = num_experts, expert_dim, num_tasks

  def __call__(self, x, *, rngs):
    b = x.shape[0]
    experts = jax.nn.relu(self.experts(x)).reshape(b, self.num_experts, self.expert_dim)
    experts = self.dropout(experts, deterministic=rngs is None, rngs=rngs)
    gates = jax.nn.softmax(
      self.gates(x).astype(jnp.float32).reshape(b, self.num_tasks, self.num_experts), -1
    )
    mixed = jnp.einsum('bte,bed->btd', gates.astype(experts.dtype), experts)
    outs = [
      head(tower(mixed[:, t], rngs=rngs).astype(jnp.float32))[:, 0]
      for t, (tower, head) in enumerate(zip(self.towers, self.heads))
    ]
    return outs, gates


class MoEMIL(nnx.Module):
  """The full model; `modalities` picks the branches (MoEMIL, DLR or pathomics)."""

  def __init__(
    self,
    config,
    *,
    radiomics_dim: int,
    wsi_dim: int = 1024,
    mri_deep_dim: int = 2048,
    slide_vector_dim: int = 0,
    rngs: nnx.Rngs,
  ):
    mods = tuple(config.modalities)
    unknown = set(mods) - set(MODALITIES)
    if unknown or not mods:
      raise ValueError(f'model.modalities {mods}: choose a non-empty subset of {MODALITIES}')
    self.modalities = mods
    dtype = jnp.dtype(config.get('compute_dtype', 'float32'))
    self.modality_dropout = float(config.get('modality_dropout', 0.0))
    pathway = config.get('wsi_pathway', 'attention') if 'wsi' in mods else None
    if pathway is not None and pathway not in WSI_PATHWAYS:
      raise ValueError(f'model.wsi_pathway {pathway!r}: choose one of {WSI_PATHWAYS}')
    uses_vector = pathway in ('prototypes', 'both')
    if uses_vector and slide_vector_dim <= 1:
      raise ValueError(
        f'model.wsi_pathway={pathway!r} reads the prototype slide vector: set '
        'data.slide_prototypes > 0, or model.wsi_pathway="attention"'
      )
    # The prototype slide vector (moemil_jax/prototypes.py) through an MLP to the experts.
    self.wsi_vector = (
      MLP((slide_vector_dim, config.wsi_hidden_dim), config.dropout, dtype=dtype, rngs=rngs)
      if uses_vector
      else None
    )
    self.wsi = (
      WSIBranch(
        wsi_dim,
        config.wsi_hidden_dim,
        config.attention_dim,
        config.dropout,
        2,
        dtype=dtype,
        rngs=rngs,
      )
      if pathway in ('attention', 'both')
      else None
    )
    self.radiomics = (
      MLP((radiomics_dim, *config.radiomics_hidden_dims), config.dropout, dtype=dtype, rngs=rngs)
      if 'radiomics' in mods
      else None
    )
    self.mri_deep = (
      MRIDeepBranch(
        mri_deep_dim,
        config.mri_deep_hidden_dim,
        config.mri_deep_pooling,
        config.dropout,
        dtype=dtype,
        rngs=rngs,
      )
      if 'mri_deep' in mods
      else None
    )
    fused = (
      len(mods)  # one presence bit per modality
      + (config.wsi_hidden_dim if self.wsi is not None else 0)
      + (config.wsi_hidden_dim if self.wsi_vector is not None else 0)
      + (config.radiomics_hidden_dims[-1] if self.radiomics is not None else 0)
      + (config.mri_deep_hidden_dim if self.mri_deep is not None else 0)
    )

    # Linear terms in the log-risk and the response logit, from zero (wide and deep), on the
    # radiomics and on the prototype slide vector: early-stopped gradient descent from zero
    # on them approaches strongly penalised Cox and logistic models, the baselines that win at
    # n ~ 170.
    def wide(flag, branch, dim):
      if not (config.get(flag, False) and branch is not None):
        return None
      init = nnx.initializers.zeros
      return nnx.Linear(dim, 1, use_bias=False, kernel_init=init, rngs=rngs)

    self.wide_survival = wide('wide_survival', self.radiomics, radiomics_dim)
    self.wide_response = wide('wide_response', self.radiomics, radiomics_dim)
    self.slide_wide_survival = wide('wide_slide', self.wsi_vector, slide_vector_dim)
    self.slide_wide_response = wide('wide_slide', self.wsi_vector, slide_vector_dim)
    self.mmoe = MMoE(
      fused,
      config.num_experts,
      config.expert_dim,
      config.tower_dim,
      len(TASKS),
      config.dropout,
      dtype=dtype,
      rngs=rngs,
    )

  def _presence(self, inputs, rngs):
    """Modality masks (B, M); in training, drop whole modalities but keep at least one."""
    present = jnp.stack([jnp.asarray(inputs[f'has_{m}'], bool) for m in self.modalities], -1)
    if rngs is None or self.modality_dropout <= 0 or len(self.modalities) < 2:
      return present
    drop = jax.random.bernoulli(rngs.dropout(), self.modality_dropout, present.shape)
    kept = present & ~drop
    return jnp.where(jnp.any(kept, -1, keepdims=True), kept, present)

  def __call__(self, inputs: Mapping[str, jax.Array], *, rngs: nnx.Rngs | None = None):
    """inputs: wsi (G,C,1024) packed patch slots + wsi_segment (G,C) (see WSIBranch; the
    B = G*R patients are the rows of the other inputs), wsi_summary (B,W) prototype slide
    vectors (wsi_pathway 'prototypes' or 'both'), radiomics (B,F), mri_deep
    (B,S,2048) + mri_deep_valid, and has_<modality> (B,) bools. rngs=None means inference
    (no dropout)."""
    present = self._presence(inputs, rngs)
    parts, out = [], {}
    for i, m in enumerate(self.modalities):
      if m == 'wsi':
        pooled = []
        if self.wsi is not None:
          rows = present.shape[0] // inputs['wsi'].shape[0]
          z, extra = self.wsi(inputs['wsi'], inputs['wsi_segment'], rows, rngs=rngs)
          out.update(extra)
          pooled.append(z)
        if self.wsi_vector is not None:
          pooled.append(self.wsi_vector(inputs['wsi_summary'], rngs=rngs))
        z = jnp.concatenate([p.astype(jnp.float32) for p in pooled], -1)
      elif m == 'radiomics':
        z = self.radiomics(inputs['radiomics'], rngs=rngs)
      else:
        z = self.mri_deep(inputs['mri_deep'], inputs['mri_deep_valid'], rngs=rngs)
      parts.append(z.astype(jnp.float32) * present[:, i : i + 1])
    parts.append(present.astype(jnp.float32))
    (response_logit, log_risk), gates = self.mmoe(jnp.concatenate(parts, -1), rngs=rngs)
    for modality, key, terms in (
      ('radiomics', 'radiomics', (self.wide_response, self.wide_survival)),
      ('wsi', 'wsi_summary', (self.slide_wide_response, self.slide_wide_survival)),
    ):
      if modality not in self.modalities:
        continue
      has = present[:, self.modalities.index(modality)]
      response_term, survival_term = terms
      if response_term is not None:
        response_logit = response_logit + response_term(inputs[key])[:, 0] * has
      if survival_term is not None:
        log_risk = log_risk + survival_term(inputs[key])[:, 0] * has
    out.update(
      response_logit=response_logit, log_risk=log_risk, gates=gates, modality_present=present
    )
    return out
