"""Scoring new patients with trained models: `load_bundle(run_dir).predict(store)`.

  from moemil_jax import predict
  model = predict.load_bundle('runs/moemil')            # a finished training workdir
  table = model.predict('new_store', patients=['NPC101'])
  table[['patient_id', 'response_prob', 'response_class', 'log_risk', 'risk_group']]

  predict.predict_ensemble([predict.load_bundle(d) for d in run_dirs], 'new_store')

The store must hold features made as the training store's (same encoder, weights, patch
size and MPP, tissue, stain and radiomics settings): a store with another fingerprint is
refused with one line naming the difference. A store that differs only in the environment it
was made in (device, precision, torch / timm / pyradiomics versions) is scored, with one
warning line naming the differences. Each patient is scored from its own features only (unless
the model was trained with per-center harmonisation, which re-standardises the new store's
centers on their own patients, and says so), with every preprocessing statistic taken from
the bundle. Labels are not needed.
"""

from __future__ import annotations

import dataclasses
import functools
import json
from pathlib import Path
from typing import Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pandas as pd
from absl import logging
from flax import nnx

from moemil_jax import batching, bundle, models, preprocess, store_reader, trainer, uncertainty
from moemil_jax import device_data as device_data_lib

MODALITY_NAMES = {'wsi': 'WSI', 'radiomics': 'MRI radiomics', 'mri_deep': 'deep MRI'}
Z_WARNING = 1.5  # warn when a radiomics z-score exceeds this times the largest seen in training


def subset(cohort: store_reader.Cohort, rows: np.ndarray) -> store_reader.Cohort:
  """The cohort restricted to `rows` (patient indices), bags copied back to back."""
  rows = np.asarray(rows, np.int64)
  counts = cohort.patch_count[rows]
  offsets = np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(np.int64)
  patches = np.zeros((int(counts.sum()), cohort.patches.shape[1]), cohort.patches.dtype)
  for new, old in zip(offsets, rows):
    o, c = cohort.patch_offset[old], cohort.patch_count[old]
    patches[new : new + c] = cohort.patches[o : o + c]
  return dataclasses.replace(
    cohort,
    patient_id=cohort.patient_id[rows],
    center=cohort.center[rows],
    response=cohort.response[rows],
    os_months=cohort.os_months[rows],
    os_event=cohort.os_event[rows],
    patches=patches,
    patch_offset=offsets,
    patch_count=counts,
    radiomics=cohort.radiomics.iloc[rows],
    mri_deep=cohort.mri_deep[rows],
    mri_deep_count=cohort.mri_deep_count[rows],
    split=None,
  )


def member_model(config, member: bundle.Member, cohort, layout=None):
  """(device data of `cohort` preprocessed with the member's fitted state, the member's
  model with its parameters)."""
  data = device_data_lib.prepare(cohort, config.data, layout=layout, fitted=member.fitted)
  have = int(data.radiomics.shape[1])
  data.radiomics = jnp.pad(data.radiomics, ((0, 0), (0, member.radiomics_width - have)))
  model = trainer.build_model(config, member.radiomics_width, int(data.patches.shape[1]))
  _, params, _ = nnx.split(model, nnx.Param, ...)
  nnx.replace_by_pure_dict(params, member.params)
  nnx.update(model, params)
  return data, model


@functools.lru_cache(maxsize=8)
def _eval_step(config_json: str, radiomics_width: int, patch_dim: int):
  """A jitted forward pass of one member on this host's default device. The training mesh
  saved in the config is never applied: a bundle trained on 8 devices predicts on 1."""
  config = ml_collections.ConfigDict(json.loads(config_json))
  graphdef, _, _ = nnx.split(
    trainer.build_model(config, radiomics_width, patch_dim), nnx.Param, ...
  )
  dtype = jnp.dtype(config.model.compute_dtype)

  @jax.jit
  def eval_step(params, rest, data, batch):
    model = nnx.merge(graphdef, params, rest)
    inputs, _ = batching.gather_inputs(data, batch, dtype)
    out = model(inputs, rngs=None)
    return {k: out[k] for k in ('response_logit', 'log_risk', 'gates')}

  return eval_step


def predict_patients(eval_step, params, rest, device_data, batches, num_patients, num_experts):
  """(response logits, log-risks, gates) of every patient in `batches` (NaN elsewhere)."""
  data_tree = device_data.tree()
  outs = [(b, eval_step(params, rest, data_tree, b.tree())) for b in batches]
  logit = np.full(num_patients, np.nan)
  risk = np.full(num_patients, np.nan)
  gates = np.full((num_patients, len(models.TASKS), num_experts), np.nan)
  for b, out in outs:
    out = jax.device_get(out)
    rows, mask = b.patient[b.patient_mask], b.patient_mask
    logit[rows] = out['response_logit'][mask]
    risk[rows] = out['log_risk'][mask]
    gates[rows] = out['gates'][mask]
  return logit, risk, gates


class Bundle:
  """A loaded model bundle (one or more members) that scores patients of a feature store."""

  def __init__(self, run_dir: str | Path):
    self.run_dir = Path(run_dir)
    self.meta, self.members = bundle.read(run_dir)
    self.config = ml_collections.ConfigDict(self.meta['config'])
    self.operating_points = self.meta['operating_points']

  @property
  def name(self) -> str:
    return str(self.config.name)

  def check_store(self, store_dir: str | Path) -> str | None:
    """Refuses a store whose features were made otherwise than the training store's; returns
    (and logs, as one warning line) the environment differences, None when there are none."""
    from feature_store import store as store_lib

    diff, env = store_lib.compare_fingerprints(
      self.meta['trained_on'], bundle.store_fingerprint(store_dir)
    )
    if diff:
      raise bundle.BundleError(
        f'{store_dir}: features made differently from the store {self.run_dir} was trained '
        f'on ({diff}); extract the new patients with the same encoder and settings'
      )
    if not env:
      return None
    line = (
      f'{store_dir}: features made in another environment than the store {self.run_dir} was '
      f'trained on ({"; ".join(env)}): same encoder and settings, scoring it (such features '
      'differ by rounding only: docs/stain.md, "Fingerprints")'
    )
    logging.warning('%s', line)
    return line

  def load(self, store_dir: str | Path, patients: Sequence[str] | None = None):
    """The store's patients (or the named ones), as the model needs them."""
    self.check_store(store_dir)
    cohort = store_reader.load_store(store_dir)
    if patients:
      index = {p: i for i, p in enumerate(cohort.patient_id)}
      missing = [p for p in patients if p not in index]
      if missing:
        raise bundle.BundleError(f'{store_dir}: patient {missing[0]!r} is not in the store')
      cohort = subset(cohort, np.array([index[p] for p in patients]))
    preprocess.harmonise(cohort, self.config.data)
    return cohort

  def outputs(self, cohort) -> dict[str, np.ndarray]:
    """Per member: response logits, log-risks (minus the member's offset) and gates."""
    config = self.config
    counts = (
      cohort.patch_count if 'wsi' in config.model.modalities else np.zeros_like(cohort.patch_count)
    )
    layout = batching.bag_layout(cohort.patch_count)
    packing = batching.evaluation_packing(
      counts, batching.training_packing(counts, batch_size=config.train.batch_size)
    )
    batches = batching.eval_batches(np.arange(cohort.num_patients), counts, layout, packing)
    logits, risks, gates = [], [], []
    for member in self.members:
      data, model = member_model(config, member, cohort, layout)
      config_json = json.dumps(config.to_dict(), sort_keys=True)
      patch_dim = int(data.patches.shape[1])
      eval_step = _eval_step(config_json, member.radiomics_width, patch_dim)
      _, params, rest = nnx.split(model, nnx.Param, ...)
      params, rest = jax.device_put((params, rest), jax.devices()[0])
      logit, risk, gate = predict_patients(
        eval_step, params, rest, data, batches, cohort.num_patients, config.model.num_experts
      )
      logits.append(logit)
      risks.append(risk - member.risk_offset)
      gates.append(gate)
    return {'logit': np.stack(logits), 'log_risk': np.stack(risks), 'gates': np.stack(gates)}

  def predict(
    self,
    store_dir: str | Path,
    patients: Sequence[str] | None = None,
    options: uncertainty.Options | None = None,
  ) -> pd.DataFrame:
    """One row per patient: probabilities, classes, risks, groups, gates, warnings and the
    uncertainty columns (`moemil_jax/uncertainty.py`)."""
    cohort = self.load(store_dir, patients)
    out = self.outputs(cohort)
    frame = _table(
      cohort,
      out['logit'].mean(0),
      out['log_risk'].mean(0),
      out['gates'].mean(0),
      self.operating_points,
      self.config,
      self.members[0].fitted,
      f'{self.name} ({len(self.members)} member{"s" if len(self.members) > 1 else ""})',
    )
    return uncertainty.add_columns(frame, self.meta, out['logit'], out['log_risk'], options)


def load_bundle(run_dir: str | Path) -> Bundle:
  return Bundle(run_dir)


def predict_ensemble(
  bundles: Sequence[Bundle],
  store_dir: str | Path,
  patients: Sequence[str] | None = None,
  options: uncertainty.Options | None = None,
) -> pd.DataFrame:
  """Several runs (folds or seeds) averaged: mean logit, mean log-risk, mean gates; the
  threshold and cutoff are the runs' means; the members' spread is over every member of
  every run, the survival baseline and conformal calibration are the first run's. One run
  is just that run."""
  if len(bundles) == 1:
    return bundles[0].predict(store_dir, patients, options)
  first = bundles[0]
  for b in bundles[1:]:
    if tuple(b.config.model.modalities) != tuple(first.config.model.modalities):
      raise bundle.BundleError(
        f'{b.run_dir} uses modalities {tuple(b.config.model.modalities)}, {first.run_dir} '
        f'{tuple(first.config.model.modalities)}: an ensemble needs the same inputs'
      )
  cohort = first.load(store_dir, patients)
  for b in bundles[1:]:
    b.check_store(store_dir)
  outs = [b.outputs(cohort) for b in bundles]
  run_mean = {k: np.stack([o[k].mean(0) for o in outs]).mean(0) for k in outs[0]}
  points = {
    'threshold': float(np.mean([b.operating_points['threshold'] for b in bundles])),
    'cutoff': float(np.mean([b.operating_points['cutoff'] for b in bundles])),
  }
  gates = run_mean['gates'] if len({o['gates'].shape for o in outs}) == 1 else None
  frame = _table(
    cohort,
    run_mean['logit'],
    run_mean['log_risk'],
    gates,
    points,
    first.config,
    first.members[0].fitted,
    f'ensemble of {len(bundles)} runs: ' + ', '.join(str(b.run_dir) for b in bundles),
  )
  return uncertainty.add_columns(
    frame,
    first.meta,
    np.concatenate([o['logit'] for o in outs]),
    np.concatenate([o['log_risk'] for o in outs]),
    options,
  )


def _table(cohort, logit, risk, gates, points, config, fitted, model_name) -> pd.DataFrame:
  prob = 1.0 / (1.0 + np.exp(-logit))
  modalities = tuple(config.model.modalities)
  present = {
    'wsi': cohort.patch_count > 0,
    'radiomics': cohort.has_radiomics,
    'mri_deep': cohort.mri_deep_count > 0,
  }
  used = [
    '+'.join(m for m in modalities if present[m][i]) or 'none' for i in range(cohort.num_patients)
  ]
  frame = pd.DataFrame(
    {
      'patient_id': cohort.patient_id.astype(str),
      'response_prob': prob.astype(np.float64),
      'response_class': (prob >= points['threshold']).astype(np.int64),
      'log_risk': risk.astype(np.float64),
      'risk_group': np.where(risk > points['cutoff'], 'high', 'low'),
      'modalities_used': used,
    }
  )
  if gates is not None:
    for t, task in enumerate(models.TASKS):
      for e in range(gates.shape[-1]):
        frame[f'gate_{task}_e{e}'] = gates[:, t, e].astype(np.float64)
  frame['warnings'] = _warnings(cohort, modalities, present, fitted, config)
  frame['model'] = model_name
  frame.attrs.update(points)
  return frame


def _warnings(cohort, modalities, present, fitted, config) -> list[str]:
  """Per patient: missing modalities and inputs outside what training saw ('' if none)."""
  lo, hi = fitted.bag_range
  z = None
  if fitted.radiomics.columns and len(cohort.radiomics.columns):
    z = np.abs(fitted.radiomics.transform(cohort.radiomics)[:, : len(fitted.radiomics.columns)])
    limit = np.maximum(Z_WARNING * fitted.radiomics_abs_z_max, 3.0)
  out = []
  for i in range(cohort.num_patients):
    notes = [f'no {MODALITY_NAMES[m]}' for m in modalities if not present[m][i]]
    n = int(cohort.patch_count[i])
    if 'wsi' in modalities and n and hi and not lo <= n <= hi:
      notes.append(f'bag of {n} patches outside the training range {lo}-{hi}')
    if z is not None and 'radiomics' in modalities and present['radiomics'][i]:
      beyond = np.flatnonzero(z[i] > limit)
      if len(beyond):
        worst = beyond[np.argmax(z[i, beyond])]
        notes.append(
          f'{len(beyond)} radiomics feature(s) beyond the training range '
          f'(worst {fitted.radiomics.columns[worst]}, |z| {z[i, worst]:.1f})'
        )
    if preprocess.harmonise_mode(config.data) == 'per_center':
      notes.append("features standardised within this store's centers (harmonise=per_center)")
    out.append('; '.join(notes))
  return out


def extraction_config(
  meta: dict,
  *,
  device: str = 'cpu',
  weights: str | None = None,
  wsi_weights: str | None = None,
  fallback_mpp: float | None = None,
  mpp_from_objective: bool = False,
):
  """The ExtractConfig that reproduces the training store's features: the same slide encoder
  (name, timm kwargs, precision), MRI encoder, patching, tissue and radiomics settings."""
  from feature_store import extract, slides

  trained = meta['trained_on']
  wsi, mri = trained.get('wsi'), trained.get('mri')
  if not wsi or not mri:
    raise ValueError(
      'the model was trained on a store without extraction settings (a synthetic store): '
      'new patients cannot be extracted the same way'
    )
  encoder = wsi['encoder']
  if encoder.get('provenance') == 'imported' or 'weights' not in encoder:
    raise ValueError(
      f'the model was trained on imported {encoder.get("format", "")} features '
      f'({encoder.get("name")!r}, made outside this project): pass --features_dir=DIR with the '
      "new patients' .h5 files, made by the same pipeline, to import them instead"
    )
  wsi_encoder = 'resnet50_trunc' if encoder['name'].startswith('resnet50') else encoder['name']
  mri_name = mri['encoder']['weights']
  if mri_name not in ('imagenet', 'random') and not weights:
    raise ValueError(
      f'the model used MRI encoder weights {mri_name!r}: pass --encoder_weights=PATH'
    )
  wsi_name = encoder['weights']
  if wsi_name not in ('imagenet', 'random', 'hub') and not (wsi_weights or weights):
    raise ValueError(
      f'the model used slide encoder weights {wsi_name!r}: pass --wsi_encoder_weights=PATH'
    )
  return extract.ExtractConfig(
    device=device,
    target_mpp=wsi['target_mpp'],
    patch_px=wsi['patch_px'],
    encoder_weights=weights or mri_name,
    wsi_encoder=wsi_encoder,
    wsi_encoder_weights=wsi_weights or (None if weights else wsi_name),
    encoder_kwargs=encoder.get('kwargs') if wsi_encoder.startswith('timm:') else None,
    precision=encoder.get('precision', 'auto'),
    radiomics_params=mri['radiomics']['params'],
    mri_slices=mri['slices'],
    fallback_mpp=fallback_mpp,
    mpp_from_objective=mpp_from_objective,
    tissue=slides.TissueParams(**wsi.get('tissue', {})),
    stain_norm=(wsi.get('stain') or {}).get('method', 'none'),
    stain_target=wsi.get('stain'),
    stain_scope=(wsi.get('stain') or {}).get('scope', 'patch'),
    stain_slide_patches=(wsi.get('stain') or {}).get('slide_patches', 64),
    stain_fit_patches=(wsi.get('stain') or {}).get('center_patches', 256),
    outcomes_required=False,
  )


def import_config(meta: dict, features_dir: str | Path, *, device: str = 'cpu', weights=None):
  """The ImportConfig that imports new patients' CLAM / TRIDENT features as the training
  store's were (encoder name, format, patch size and MPP) and extracts their MRI as it did."""
  from feature_store import imported

  trained = meta['trained_on']
  wsi, mri = trained.get('wsi') or {}, trained.get('mri')
  encoder = wsi.get('encoder') or {}
  if encoder.get('provenance') != 'imported' or not mri:
    raise ValueError(
      '--features_dir: the model was not trained on imported features; drop --features_dir '
      'to extract the new patients with its encoder'
    )
  mri_name = mri['encoder']['weights']
  if mri_name not in ('imagenet', 'random') and not weights:
    raise ValueError(
      f'the model used MRI encoder weights {mri_name!r}: pass --encoder_weights=PATH'
    )
  from feature_store import extract

  return imported.ImportConfig(
    format=encoder.get('format', 'clam'),
    features_dir=str(features_dir),
    encoder_name=encoder['name'],
    patch_px=wsi.get('patch_px'),
    mpp=wsi.get('target_mpp'),
    extract=extract.ExtractConfig(
      device=device,
      encoder_weights=weights or mri_name,
      radiomics_params=mri['radiomics']['params'],
      mri_slices=mri['slices'],
      outcomes_required=False,
    ),
  )
