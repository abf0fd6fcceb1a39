"""MoEMIL written the way PyTorch MIL repositories write it (CLAM style), as a reference.

One bag at a time, real patches only, no padding and no masks: each patient's bag goes
through the network on its own (CLAM trains with batch size 1), so this is the natural
eager baseline to check the Flax model against and to time our jitted training against.
The losses are the same as `moemil_jax.losses` (BCE, Cox partial likelihood with Efron or
Breslow ties, CLAM instance clustering, gate balance), computed over the B patients of a
step from their per-bag outputs, so both implementations do the same work per step.

`copy_flax_params` copies the weights of a Flax NNX `MoEMIL` into a `TorchMoEMIL` built from
the same config: the module trees have the same names, kernels are transposed.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

MODALITIES = ('wsi', 'radiomics', 'mri_deep')
TASKS = ('response', 'survival')


class GatedAttention(nn.Module):
  """CLAM's Attn_Net_Gated: w^T (tanh(V h) * sigmoid(U h))."""

  def __init__(self, dim: int, hidden: int):
    super().__init__()
    self.a = nn.Linear(dim, hidden)
    self.b = nn.Linear(dim, hidden)
    self.c = nn.Linear(hidden, 1, bias=False)

  def forward(self, h: torch.Tensor) -> torch.Tensor:
    return self.c(torch.tanh(self.a(h)) * torch.sigmoid(self.b(h)))[..., 0]


class WSIBranch(nn.Module):
  """CLAM_SB on one bag (N, in_dim): fc + ReLU + dropout, gated attention, instance heads."""

  def __init__(self, in_dim: int, dim: int, attn_dim: int, dropout: float, num_classes: int):
    super().__init__()
    self.fc = nn.Linear(in_dim, dim)
    self.dropout = nn.Dropout(dropout)
    self.attention = GatedAttention(dim, attn_dim)
    self.instance = nn.Linear(dim, num_classes * 2)
    self.num_classes = num_classes

  def forward(self, patches: torch.Tensor):
    h = self.dropout(F.relu(self.fc(patches)))
    scores = self.attention(h)  # (N,)
    weights = torch.softmax(scores, 0)
    pooled = weights @ h  # (dim,)
    inst = self.instance(h).reshape(h.shape[0], self.num_classes, 2)
    return pooled, scores, inst


class MLP(nn.Module):
  def __init__(self, dims: Sequence[int], dropout: float, bias: bool = True):
    super().__init__()
    self.layers = nn.ModuleList([nn.Linear(i, o, bias=bias) for i, o in zip(dims[:-1], dims[1:])])
    self.dropout = nn.Dropout(dropout)

  def forward(self, x):
    for layer in self.layers:
      x = self.dropout(F.relu(layer(x)))
    return x


class MRIDeepBranch(nn.Module):
  def __init__(self, in_dim: int, dim: int, pooling: str, dropout: float):
    super().__init__()
    self.mlp = MLP((in_dim, dim), dropout)
    self.attention = GatedAttention(dim, max(dim // 2, 1)) if pooling == 'attention' else None
    self.dim = dim

  def forward(self, slices):  # (S, in_dim), real slices only
    if slices.shape[0] == 0:
      return slices.new_zeros(self.dim)
    h = self.mlp(slices)
    if self.attention is not None:
      return torch.softmax(self.attention(h), 0) @ h
    return h.mean(0)


class MMoE(nn.Module):
  def __init__(self, in_dim, num_experts, expert_dim, tower_dim, num_tasks, dropout):
    super().__init__()
    self.experts = nn.Linear(in_dim, num_experts * expert_dim)
    self.gates = nn.Linear(in_dim, num_tasks * num_experts)
    self.towers = nn.ModuleList(
      [MLP((expert_dim, tower_dim), dropout, bias=TASKS[t] != 'survival') for t in range(num_tasks)]
    )
    self.heads = nn.ModuleList(
      [nn.Linear(tower_dim, 1, bias=TASKS[t] != 'survival') for t in range(num_tasks)]
    )
    self.dropout = nn.Dropout(dropout)
    self.num_experts, self.expert_dim, self.num_tasks = num_experts, expert_dim, num_tasks

  def forward(self, x):  # (in_dim,)
    experts = self.dropout(F.relu(self.experts(x)).reshape(self.num_experts, self.expert_dim))
    gates = torch.softmax(self.gates(x).reshape(self.num_tasks, self.num_experts), -1)
    mixed = gates @ experts  # (T, D)
    outs = [
      head(tower(mixed[t]))[0] for t, (tower, head) in enumerate(zip(self.towers, self.heads))
    ]
    return outs, gates


class TorchMoEMIL(nn.Module):
  """Same architecture as `moemil_jax.models.MoEMIL`, one patient per forward call."""

  def __init__(self, config, *, radiomics_dim: int, wsi_dim: int = 1024, mri_deep_dim: int = 2048):
    super().__init__()
    mods = tuple(config.modalities)
    self.modalities = mods
    self.modality_dropout = float(config.get('modality_dropout', 0.0))
    self.wsi = (
      WSIBranch(wsi_dim, config.wsi_hidden_dim, config.attention_dim, config.dropout, 2)
      if 'wsi' in mods
      else None
    )
    self.radiomics = (
      MLP((radiomics_dim, *config.radiomics_hidden_dims), config.dropout)
      if 'radiomics' in mods
      else None
    )
    self.mri_deep = (
      MRIDeepBranch(
        mri_deep_dim, config.mri_deep_hidden_dim, config.mri_deep_pooling, config.dropout
      )
      if 'mri_deep' in mods
      else None
    )
    fused = (
      len(mods)
      + (config.wsi_hidden_dim if self.wsi is not None else 0)
      + (config.radiomics_hidden_dims[-1] if self.radiomics is not None else 0)
      + (config.mri_deep_hidden_dim if self.mri_deep is not None else 0)
    )
    self.mmoe = MMoE(
      fused, config.num_experts, config.expert_dim, config.tower_dim, len(TASKS), config.dropout
    )

    def wide(flag):
      if not (config.get(flag, False) and self.radiomics is not None):
        return None
      return nn.Linear(radiomics_dim, 1, bias=False)

    self.wide_survival = wide('wide_survival')
    self.wide_response = wide('wide_response')

  def forward(self, patient: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """patient: wsi (N, 1024) real patches, radiomics (F,), mri_deep (S, 2048) real slices,
    has_<modality> bools. Returns scalars response_logit, log_risk and the bag's outputs."""
    present = torch.tensor([bool(patient[f'has_{m}']) for m in self.modalities])
    if self.training and self.modality_dropout > 0 and len(self.modalities) > 1:
      kept = present & (torch.rand(len(self.modalities)) >= self.modality_dropout)
      present = kept if kept.any() else present
    parts, out = [], {}
    for i, m in enumerate(self.modalities):
      if m == 'wsi':
        if patient['wsi'].shape[0] > 0:  # instance clustering sees the bag even if dropped
          z, scores, inst = self.wsi(patient['wsi'])
          out.update(attention_scores=scores, instance_logits=inst)
        else:
          z = torch.zeros(self.wsi.fc.out_features)
      elif m == 'radiomics':
        z = self.radiomics(patient['radiomics'])
      else:
        z = self.mri_deep(patient['mri_deep'])
      parts.append(z * present[i].float())
    parts.append(present.float())
    (logit, log_risk), gates = self.mmoe(torch.cat(parts))
    if self.radiomics is not None:
      has_mri = present[self.modalities.index('radiomics')].float()
      if self.wide_survival is not None:
        log_risk = log_risk + self.wide_survival(patient['radiomics'])[0] * has_mri
      if self.wide_response is not None:
        logit = logit + self.wide_response(patient['radiomics'])[0] * has_mri
    out.update(response_logit=logit, log_risk=log_risk, gates=gates)
    return out


# --------------------------------------------------------------------------- weights


def _flatten(tree, prefix=()):
  if isinstance(tree, Mapping):
    for k, v in tree.items():
      yield from _flatten(v, prefix + (str(k),))
  else:
    yield prefix, tree


def copy_flax_params(torch_model: TorchMoEMIL, flax_model) -> TorchMoEMIL:
  """Copies `nnx.state(flax_model, nnx.Param)` into torch_model (kernel (in, out) -> weight (out, in))."""
  from flax import nnx

  pure = nnx.to_pure_dict(nnx.state(flax_model, nnx.Param))
  target = dict(torch_model.named_parameters())
  seen = set()
  with torch.no_grad():
    for path, value in _flatten(pure):
      *module, leaf = path
      name = '.'.join(module) + {'kernel': '.weight', 'bias': '.bias'}[leaf]
      if name not in target:
        raise KeyError(f'flax parameter {"/".join(path)} has no torch counterpart {name!r}')
      array = np.array(value, np.float32)  # a writable copy
      if leaf == 'kernel':
        array = array.T
      if tuple(target[name].shape) != array.shape:
        raise ValueError(f'{name}: torch shape {tuple(target[name].shape)} != flax {array.shape}')
      target[name].copy_(torch.from_numpy(np.ascontiguousarray(array)))
      seen.add(name)
  missing = sorted(set(target) - seen)
  if missing:
    raise KeyError(f'torch parameters without a flax value: {missing}')
  return torch_model


# --------------------------------------------------------------------------- losses


def cox_nll(
  log_risk: torch.Tensor, time: torch.Tensor, event: torch.Tensor, *, ties: str = 'efron'
) -> torch.Tensor:
  """Minus the Cox log partial likelihood / max(events, 1), written as survival repos do
  (an at-risk matrix; Efron by looping over tied event times)."""
  at_risk = (time[None, :] >= time[:, None]).float()  # (i, j): j at risk at t_i
  risk_sum = at_risk @ torch.exp(log_risk)
  ev = event > 0
  if ties == 'breslow':
    nll = -torch.sum(torch.where(ev, log_risk - torch.log(risk_sum), torch.zeros_like(log_risk)))
  else:
    nll = log_risk.new_zeros(())
    for t in torch.unique(time[ev]):
      tied = ev & (time == t)
      d = int(tied.sum())
      tied_sum = torch.exp(log_risk[tied]).sum()
      r = risk_sum[tied][0]
      ls = torch.arange(d, dtype=log_risk.dtype) / d
      nll = nll - (log_risk[tied].sum() - torch.log(r - ls * tied_sum).sum())
  return nll / max(int(ev.sum()), 1)


def instance_loss(
  scores: torch.Tensor, inst: torch.Tensor, label: int, k: int
) -> tuple[torch.Tensor, int]:
  """CLAM inst_eval for one bag: (summed CE, number of instances); k shrinks for small bags."""
  k = min(k, scores.shape[0] // 2)
  if k == 0:
    return scores.new_zeros(()), 0
  top = torch.topk(scores, k).indices
  bot = torch.topk(-scores, k).indices
  logits = torch.cat([inst[top, label], inst[bot, label]])
  targets = torch.cat([torch.ones(k, dtype=torch.long), torch.zeros(k, dtype=torch.long)])
  return F.cross_entropy(logits, targets, reduction='sum'), 2 * k


def total_loss(
  outputs: Sequence[Mapping[str, torch.Tensor]],
  targets: Mapping[str, np.ndarray],
  weights: Mapping[str, float],
  *,
  ties: str = 'efron',
  k: int = 8,
) -> torch.Tensor:
  """The same weighted loss as `moemil_jax.losses.total_loss`, from per-patient outputs.

  targets: response, has_response, os_months, os_event, has_survival for the B patients.
  """
  logit = torch.stack([o['response_logit'] for o in outputs])
  log_risk = torch.stack([o['log_risk'] for o in outputs])
  has_resp = torch.as_tensor(np.asarray(targets['has_response'], bool))
  has_surv = torch.as_tensor(np.asarray(targets['has_survival'], bool))
  resp = torch.as_tensor(np.asarray(targets['response'], np.float32))
  loss = logit.new_zeros(())
  if has_resp.any():
    loss = loss + weights['response'] * F.binary_cross_entropy_with_logits(
      logit[has_resp], resp[has_resp]
    )
  if has_surv.any():
    loss = loss + weights['survival'] * cox_nll(
      log_risk[has_surv],
      torch.as_tensor(np.asarray(targets['os_months'], np.float32))[has_surv],
      torch.as_tensor(np.asarray(targets['os_event']))[has_surv],
      ties=ties,
    )
  if weights.get('instance', 0.0):
    inst_sum, inst_n = logit.new_zeros(()), 0
    for o, labelled, y in zip(outputs, has_resp.tolist(), resp.tolist()):
      if labelled and 'attention_scores' in o:
        s, n = instance_loss(o['attention_scores'], o['instance_logits'], int(y), k)
        inst_sum, inst_n = inst_sum + s, inst_n + n
    loss = loss + weights['instance'] * inst_sum / max(inst_n, 1)
  if weights.get('gate_balance', 0.0):
    p = torch.stack([o['gates'] for o in outputs]).mean(0)  # (T, E)
    loss = loss + weights['gate_balance'] * torch.mean(p.shape[-1] * (p * p).sum(-1) - 1.0)
  return loss
