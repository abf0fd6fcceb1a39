"""Morphological prototypes: a fixed-length slide vector that a few hundred patients can learn from.

Attention MIL has to find the rare informative tissue (2-6% of patches) from the bag label
alone; at n ~ 300 it does not (docs/slide_branch.md). Prototypes split that job in two, as
PANTHER (Song et al., CVPR 2024) and MMP (ICML 2024) do: an unsupervised step, fitted on the
training patients' patches only, groups patches into K tissue types (k-means on their leading
principal components), and each slide becomes, per type, the share of its patches of that type
and where the mean of those patches lies along the type's main directions of between-patient
variation (a per-type PCA of the patients' per-type means). A rare type's mean keeps its
signal however few patches carry it, where a bag mean dilutes it 20-50 fold and mixes it with
look-alike decoy tissue. The slide vector is linear in each type's patches, so every patch's
share of a linear score is exact (`patch_contributions`), which is what heatmaps draw.
"""

from __future__ import annotations

import dataclasses

import numpy as np
from absl import logging

ARRAYS = (
  'reduce_mean',
  'reduce_components',
  'centroids',
  'type_mean',
  'type_components',
  'feature_mean',
  'feature_std',
)


@dataclasses.dataclass
class SlidePrototypes:
  """What `fit` learned from the training patients: enough to summarise anyone's slides."""

  reduce_mean: np.ndarray  # (D,) patch mean; centring for the clustering projection
  reduce_components: np.ndarray  # (r, D) leading principal directions of training patches
  centroids: np.ndarray  # (K, r) k-means centres in the projected space
  type_mean: np.ndarray  # (K, D) mean over training patients of their per-type patch mean
  type_components: np.ndarray  # (K, m, D) per-type directions of between-patient variation
  feature_mean: np.ndarray  # (W,) slide-vector statistics on training patients with slides
  feature_std: np.ndarray  # (W,)

  @property
  def width(self) -> int:
    k, m = self.type_components.shape[:2]
    return k * (m + 1)

  def assign(self, patches: np.ndarray) -> np.ndarray:
    """(n,) the tissue type of each patch: its nearest centre in the projected space."""
    z = (np.asarray(patches, np.float32) - self.reduce_mean) @ self.reduce_components.T
    d = (z**2).sum(1, keepdims=True) - 2 * z @ self.centroids.T + (self.centroids**2).sum(1)
    return np.argmin(d, 1)

  def raw_vector(self, patches: np.ndarray) -> np.ndarray:
    """(W,) unstandardised slide vector of one bag: per type, m projections, then K shares."""
    k, m, _ = self.type_components.shape
    if len(patches) == 0:
      return np.zeros(self.width, np.float32)
    x = np.asarray(patches, np.float32)
    types = self.assign(x)
    counts = np.bincount(types, minlength=k).astype(np.float64)
    sums = _type_sums(types, x, k)
    means = np.where(counts[:, None] > 0, sums / np.maximum(counts, 1)[:, None], self.type_mean)
    proj = np.einsum('kmd,kd->km', self.type_components, means - self.type_mean)
    return np.concatenate([proj.reshape(-1), counts / len(x)]).astype(np.float32)

  def transform(self, bags) -> np.ndarray:
    """(P, W) standardised slide vectors of a list of bags; 0 (the training mean) for empty bags."""
    from threadpoolctl import threadpool_limits

    out = np.zeros((len(bags), self.width), np.float32)
    # Many small products: one BLAS thread is faster, and far faster on a busy machine.
    with threadpool_limits(limits=1):
      for i, bag in enumerate(bags):
        if len(bag):
          out[i] = (self.raw_vector(bag) - self.feature_mean) / self.feature_std
    return out

  def patch_contributions(
    self, patches: np.ndarray, weights: np.ndarray, reference: np.ndarray | None = None
  ) -> np.ndarray:
    """(n,) each patch's exact share of weights . transform([patches]): a patch of type k moves
    its type's mean by (x - mean_k) / n_k and its type's share by 1 / n, and the value at the
    training mean is spread evenly, so the shares sum to the score (empty types add nothing).

    reference: the bag whose type counts to use (for patches scored beside a stored bag,
    e.g. half-step neighbours in a heatmap); default the patches themselves."""
    k, m, _ = self.type_components.shape
    x = np.asarray(patches, np.float32)
    if len(x) == 0:
      return np.zeros(0, np.float32)
    bag_types = self.assign(np.asarray(reference, np.float32)) if reference is not None else None
    w = np.asarray(weights, np.float64) / self.feature_std
    w_proj, w_share = w[: k * m].reshape(k, m), w[k * m :]
    types = self.assign(x)
    counts = np.bincount(types if bag_types is None else bag_types, minlength=k)
    counts = np.maximum(counts, 1)
    n = len(x) if bag_types is None else len(bag_types)
    # The projection of every patch on its own type's directions, weighted.
    direction = np.einsum('km,kmd->kd', w_proj, self.type_components)  # (K, D)
    along = np.einsum('nd,nd->n', x - self.type_mean[types], direction[types])
    share = along / counts[types] + w_share[types] / n
    # Centring: the score at the training mean, spread evenly so the shares still add up.
    offset = -float(w @ self.feature_mean) / n
    return (share + offset).astype(np.float32)

  def arrays(self) -> dict[str, np.ndarray]:
    return {name: np.asarray(getattr(self, name)) for name in ARRAYS}

  @classmethod
  def from_arrays(cls, arrays: dict[str, np.ndarray]) -> 'SlidePrototypes':
    return cls(**{name: np.asarray(arrays[name], np.float32) for name in ARRAYS})


def _type_sums(types: np.ndarray, x: np.ndarray, k: int) -> np.ndarray:
  """(K, D) sum of the patches of each type (a one-hot matmul: np.add.at is far slower)."""
  return (np.arange(k)[:, None] == types[None]).astype(np.float32) @ x


def _leading_directions(x: np.ndarray, c: int) -> np.ndarray:
  """(c, D) unit principal directions of the rows of x, deterministic: the eigenvectors of the
  smaller of the n x n Gram and D x D covariance matrices (scipy's SVD is far slower here,
  and scikit-learn's randomized PCA differs from run to run in the fourth decimal)."""
  centred = np.asarray(x, np.float64) - np.asarray(x, np.float64).mean(0)
  gram = centred.shape[0] <= centred.shape[1]
  values, vectors = np.linalg.eigh(centred @ centred.T if gram else centred.T @ centred)
  top = np.argsort(values)[::-1][:c]
  directions = vectors[:, top].T @ centred if gram else vectors[:, top].T
  directions = directions / np.maximum(np.linalg.norm(directions, axis=1, keepdims=True), 1e-12)
  # A sign convention, so that equal inputs give equal outputs whatever the eigensolver does.
  signs = np.sign(directions[np.arange(len(directions)), np.abs(directions).argmax(1)])
  return directions * np.where(signs == 0, 1.0, signs)[:, None]


def bags_of(cohort, rows: np.ndarray | None = None) -> list[np.ndarray]:
  """Each patient's patches (a view into cohort.patches; empty for patients without slides)."""
  rows = np.arange(cohort.num_patients) if rows is None else rows
  empty = cohort.patches[:0]
  return [
    cohort.patches[cohort.patch_offset[i] : cohort.patch_offset[i] + cohort.patch_count[i]]
    if cohort.patch_count[i] > 0
    else empty
    for i in rows
  ]


def fit(
  bags,
  train: np.ndarray,
  *,
  types: int = 16,
  components: int = 4,
  reduce_dims: int = 32,
  sample_per_patient: int = 64,
  seed: int = 0,
) -> SlidePrototypes | None:
  """Prototypes from the bags of `train` patients only (None when fewer than 4 have slides).

  k-means runs on `sample_per_patient` patches of each training patient, projected on their
  `reduce_dims` leading principal components (tissue types differ along those; the noise of
  the other directions would only blur the clusters), so every patient weighs the same
  whatever the size of their bag.
  """
  from threadpoolctl import threadpool_limits

  with threadpool_limits(limits=1):  # small products; see SlidePrototypes.transform
    return _fit(bags, train, types, components, reduce_dims, sample_per_patient, seed)


def _fit(bags, train, types, components, reduce_dims, sample_per_patient, seed):
  from sklearn.cluster import KMeans

  rows = [i for i in np.flatnonzero(train) if len(bags[i])]
  if len(rows) < 4:
    logging.warning('slide prototypes: %d training patients with slides; too few', len(rows))
    return None
  rng = np.random.default_rng(seed)
  sample = np.concatenate(
    [
      np.asarray(bags[i][rng.choice(len(bags[i]), min(len(bags[i]), sample_per_patient), False)])
      for i in rows
    ]
  ).astype(np.float32)
  r = int(min(reduce_dims, sample.shape[1], len(sample) - 1))
  reduce_mean = sample.mean(0)
  reduce_components = _leading_directions(sample, r).astype(np.float32)
  k = int(min(types, len(sample)))
  km = KMeans(k, n_init=4, random_state=seed).fit((sample - reduce_mean) @ reduce_components.T)
  dim = sample.shape[1]
  protos = SlidePrototypes(
    reduce_mean=reduce_mean.astype(np.float32),
    reduce_components=reduce_components,
    centroids=km.cluster_centers_.astype(np.float32),
    type_mean=np.zeros((k, dim), np.float32),
    type_components=np.zeros((k, components, dim), np.float32),
    feature_mean=np.zeros(k * (components + 1), np.float32),
    feature_std=np.ones(k * (components + 1), np.float32),
  )
  # Per type: every training patient's mean over their patches of that type (when they have
  # some), the mean of those means, and their leading directions of variation.
  means = np.zeros((len(rows), k, dim), np.float32)
  present = np.zeros((len(rows), k), bool)
  for j, i in enumerate(rows):
    x = np.asarray(bags[i], np.float32)
    t = protos.assign(x)
    counts = np.bincount(t, minlength=k)
    means[j] = _type_sums(t, x, k)
    present[j] = counts > 0
    means[j][present[j]] /= counts[present[j], None]
  for t in range(k):
    m = means[present[:, t], t]
    if len(m) == 0:
      continue
    protos.type_mean[t] = m.mean(0)
    c = int(min(components, len(m) - 1))
    if c > 0:
      protos.type_components[t, :c] = _leading_directions(m, c)
  raw = np.stack([protos.raw_vector(bags[i]) for i in rows])  # (n_rows, W)
  sd = raw.std(0)
  protos.feature_mean = raw.mean(0).astype(np.float32)
  protos.feature_std = np.where(sd > 1e-6, sd, 1.0).astype(np.float32)
  logging.info(
    'slide prototypes: %d types from %d patches of %d training patients; slide vector of %d',
    k,
    len(sample),
    len(rows),
    protos.width,
  )
  return protos
