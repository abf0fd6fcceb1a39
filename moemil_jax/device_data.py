"""The device-resident arrays of a run: preprocessed once, then only indexed by batches.

`prepare` fits the preprocessing on the training patients (radiomics selection and
scaling, deep MRI and patch statistics; `preprocess.Fitted`), or applies a saved one, and
puts every array on the device once, the
patches laid out by `batching.BagLayout`. The trainer takes these arrays to the host and
places them on its mesh (`trainer.fold_data`).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from moemil_jax import preprocess, prototypes
from moemil_jax.batching import BagLayout, bag_layout
from moemil_jax.store_reader import Cohort


@dataclasses.dataclass
class DeviceData:
  """Everything a step needs, resident on the device; batches only carry indices."""

  patches: jax.Array  # (total + 1, 1024) float16; last row is a zero pad
  patch_mean: jax.Array  # (1024,) float32
  patch_inv_std: jax.Array  # (1024,) float32
  radiomics: jax.Array  # (P, F) float32 (z-scored, 0 where missing)
  wsi_summary: jax.Array  # (P, W) float32 prototype slide vectors (z-scored, 0 without slides)
  has_radiomics: jax.Array  # (P,) bool
  mri_deep: jax.Array  # (P, S, 2048) float32 (z-scored)
  mri_deep_count: jax.Array  # (P,) int32
  response: jax.Array  # (P,) float32 (0 where unknown)
  has_response: jax.Array  # (P,) bool
  os_months: jax.Array  # (P,) float32
  os_event: jax.Array  # (P,) int32
  has_survival: jax.Array  # (P,) bool
  radiomics_columns: list[str]
  fitted: preprocess.Fitted  # what the arrays were normalised with (saved in model bundles)

  def tree(self) -> dict[str, jax.Array]:
    return {
      f.name: getattr(self, f.name)
      for f in dataclasses.fields(self)
      if f.name not in ('radiomics_columns', 'fitted')
    }


def _warn_degenerate_labels(cohort: Cohort, train: np.ndarray) -> None:
  """Says when a training split cannot teach a task; training still runs (the loss is 0 or
  one-sided) so that a multi-task model can learn the other task."""
  events = int(cohort.os_event[train & ~np.isnan(cohort.os_months)].sum())
  if events == 0:
    logging.warning(
      'training split: no OS events (%d patients, all censored or OS unknown); '
      'the survival loss is 0 and the risk head is untrained',
      int(train.sum()),
    )
  labels = cohort.response[train]
  classes = np.unique(labels[~np.isnan(labels)]).astype(int).tolist()
  if len(classes) < 2:
    logging.warning(
      'training split: IC response has %s (%d labelled patients); the response head '
      'cannot learn to separate classes',
      f'only class {classes}' if classes else 'no labels',
      int((~np.isnan(labels)).sum()),
    )


def prepare(
  cohort: Cohort,
  data_config,
  *,
  seed: int = 0,
  device=None,
  layout: BagLayout | None = None,
  fitted: preprocess.Fitted | None = None,
) -> DeviceData:
  """Fits preprocessing on cohort.split == 'train' (or applies `fitted`, for patients
  scored by a saved model) and puts the arrays on `device`."""
  layout = layout or bag_layout(cohort.patch_count)
  patches = _device_patches(cohort, layout, device)
  if fitted is None:
    fitted = _fit(cohort, data_config, seed, layout, patches, device)
  rad = fitted.radiomics.transform(cohort.radiomics) if len(cohort.radiomics.columns) else None
  if rad is None:
    rad = np.zeros((cohort.num_patients, max(fitted.radiomics.width, 1)), np.float32)
  has_rad = cohort.has_radiomics & (len(fitted.radiomics.columns) > 0)
  rad[~has_rad] = 0.0
  summary = slide_vectors(cohort, data_config, fitted)
  deep = ((cohort.mri_deep - fitted.deep_mean) / fitted.deep_std).astype(np.float32)
  deep *= (np.arange(deep.shape[1])[None] < cohort.mri_deep_count[:, None])[..., None]
  surv = ~np.isnan(cohort.os_months)

  def put(x):
    return jax.device_put(x, device)

  return DeviceData(
    patches=patches,
    patch_mean=put(fitted.patch_mean.astype(np.float32)),
    patch_inv_std=put(fitted.patch_inv_std.astype(np.float32)),
    radiomics=put(rad),
    wsi_summary=put(summary),
    has_radiomics=put(has_rad),
    mri_deep=put(deep),
    mri_deep_count=put(cohort.mri_deep_count.astype(np.int32)),
    response=put(np.nan_to_num(cohort.response).astype(np.float32)),
    has_response=put(~np.isnan(cohort.response)),
    os_months=put(np.nan_to_num(cohort.os_months).astype(np.float32)),
    os_event=put(cohort.os_event.astype(np.int32)),
    has_survival=put(surv),
    radiomics_columns=fitted.radiomics.columns,
    fitted=fitted,
  )


def slide_vector_width(data_config) -> int:
  """Width of the prototype slide vector that `data_config` asks for (1: off, a zero column)."""
  k = int(data_config.get('slide_prototypes', 0))
  return k * (int(data_config.get('prototype_components', 4)) + 1) if k > 0 else 1


def slide_vectors(cohort: Cohort, data_config, fitted: preprocess.Fitted) -> np.ndarray:
  """(P, W) prototype slide vectors; zeros when prototypes are off or could not be fitted."""
  out = np.zeros((cohort.num_patients, slide_vector_width(data_config)), np.float32)
  if fitted.slide_prototypes is not None:
    out[:] = fitted.slide_prototypes.transform(prototypes.bags_of(cohort))
  return out


def _fit_prototypes(cohort: Cohort, data_config, train: np.ndarray, seed: int):
  if int(data_config.get('slide_prototypes', 0)) <= 0:
    return None
  if cohort.bags_partitioned:
    raise ValueError(
      'data.slide_prototypes > 0 needs every bag on every process (prototypes are fitted on '
      'all training patients): load the store without bags_to_read, as trainer.load does'
    )
  return prototypes.fit(
    prototypes.bags_of(cohort),
    train,
    types=int(data_config.slide_prototypes),
    components=int(data_config.get('prototype_components', 4)),
    seed=seed,
  )


def _fit(cohort: Cohort, data_config, seed, layout, patches, device) -> preprocess.Fitted:
  """Radiomics selection and scaling, deep MRI statistics (host) and patch statistics
  (device) from the training patients."""
  if cohort.split is None:
    raise ValueError('prepare() needs cohort.split; call assign_splits first')
  train = cohort.split == 'train'
  _warn_degenerate_labels(cohort, train)
  sel = preprocess.fit_radiomics(
    cohort.radiomics,
    train,
    cohort.response,
    corr_threshold=data_config.radiomics_corr_threshold,
    lasso=data_config.radiomics_lasso,
    lasso_cs=data_config.radiomics_lasso_cs,
    seed=seed,
    transform=data_config.get('radiomics_transform', 'zscore'),
    min_present=data_config.get('radiomics_min_present', 0.5),
    top_k=data_config.get('radiomics_top_k', 0),
    os_months=cohort.os_months,
    os_event=cohort.os_event,
  )
  d_mean, d_std = preprocess.masked_mean_std(cohort.mri_deep, train, cohort.mri_deep_count)
  weights = _device_rows(layout, lambda g: _train_rows(cohort, layout, train, g), device)
  p_mean, p_inv_std = _patch_statistics(patches, weights)
  z_max = np.zeros(len(sel.columns))
  rows = train & cohort.has_radiomics
  if sel.columns and rows.any():
    z_max = np.abs(sel.transform(cohort.radiomics[rows])[:, : len(sel.columns)]).max(0)
  bags = cohort.patch_count[train & (cohort.patch_count > 0)]
  return preprocess.Fitted(
    radiomics=sel,
    deep_mean=d_mean,
    deep_std=d_std,
    patch_mean=np.asarray(p_mean.addressable_data(0)),
    patch_inv_std=np.asarray(p_inv_std.addressable_data(0)),
    radiomics_abs_z_max=z_max,
    bag_range=(int(bags.min(initial=0)), int(bags.max(initial=0))),
    slide_prototypes=_fit_prototypes(cohort, data_config, train, seed),
  )


def _bag_block(cohort: Cohort, layout: BagLayout, g: int) -> np.ndarray:
  block = np.zeros((layout.rows, cohort.patches.shape[1]), np.float16)
  for p in np.flatnonzero((layout.group == g) & (cohort.patch_count > 0)):
    o, c = cohort.patch_offset[p], cohort.patch_count[p]
    if o < 0:
      raise ValueError(
        f'patient {cohort.patient_id[p]}: bag not read by process '
        f'{jax.process_index()}, whose device holds group {g}'
      )
    start = layout.offset[p] - g * layout.rows
    block[start : start + c] = cohort.patches[o : o + c]
  return block


def _train_rows(cohort: Cohort, layout: BagLayout, train: np.ndarray, g: int) -> np.ndarray:
  """(rows,) float32 of block g: 1 on the training patients' patches."""
  w = np.zeros(layout.rows, np.float32)
  for p in np.flatnonzero((layout.group == g) & train & (cohort.patch_count > 0)):
    start = layout.offset[p] - g * layout.rows
    w[start : start + cohort.patch_count[p]] = 1.0
  return w


@jax.jit
def _patch_statistics(patches: jax.Array, weights: jax.Array):
  """Mean and 1/std of every feature over the weighted rows, on the device (two passes;
  sums over blocks of 256 rows, then over blocks, to keep float32 round-off small)."""
  x = patches.reshape(-1, 256, patches.shape[-1])
  w = weights.reshape(-1, 256, 1)
  n = jnp.maximum(jnp.sum(weights), 1.0)
  mean = jnp.sum(jnp.sum(w * x.astype(jnp.float32), 1), 0) / n
  var = jnp.sum(jnp.sum(w * jnp.square(x.astype(jnp.float32) - mean), 1), 0) / n
  std = jnp.sqrt(var)
  return mean, 1.0 / jnp.where(std > 1e-6, std, 1.0)


def _device_rows(layout: BagLayout, block, device) -> jax.Array:
  """A per-row array laid out like the patches: block(g) for each group g."""
  return jax.device_put(np.concatenate([block(g) for g in range(layout.groups)]), device)


def view_patches(cohort: Cohort, layout: BagLayout, patches: np.ndarray, views: int) -> np.ndarray:
  """(1 + views, rows, D) float16: `patches` (the original, laid out by `layout`), then the
  cohort's stain views 1..views laid out alike (config.data.stain_views, docs/stain.md)."""
  if cohort.patch_views is None or len(cohort.patch_views) < views:
    raise ValueError(
      f'data.stain_views={views}: the cohort was loaded with '
      f'{0 if cohort.patch_views is None else len(cohort.patch_views)} stain views '
      '(store_reader.load_store(stain_views=...), as trainer.load does)'
    )
  out = np.empty((1 + views, *patches.shape), np.float16)
  out[0] = patches
  for v in range(views):
    view = dataclasses.replace(cohort, patches=cohort.patch_views[v])
    out[1 + v] = np.concatenate([_bag_block(view, layout, g) for g in range(layout.groups)])
  return out


def view_slide_vectors(
  cohort: Cohort, data_config, fitted: preprocess.Fitted, summary: np.ndarray, views: int
) -> np.ndarray:
  """(1 + views, P, W): `summary` (the original's prototype slide vectors), then those of the
  cohort's stain views 1..views, with the prototypes fitted on the original."""
  out = [summary]
  for v in range(views):
    view = dataclasses.replace(cohort, patches=cohort.patch_views[v])
    out.append(slide_vectors(view, data_config, fitted))
  return np.stack(out)


def _device_patches(cohort: Cohort, layout: BagLayout, device) -> jax.Array:
  return _device_rows(layout, lambda g: _bag_block(cohort, layout, g), device)
