"""A trained model as a self-contained bundle: everything needed to score a new patient.

Training writes `<workdir>/bundle/` beside its checkpoints:

  bundle.json  the config; per member its radiomics input width, log-risk offset and the
               metadata of its fitted preprocessing (radiomics columns, sequences,
               transform, training bag-size range); the operating points (response
               threshold, risk-group cutoff, and which predictions fixed them); the
               fingerprint of the store it was trained on (encoder, weights hash, patch
               size and MPP, radiomics parameters); the code version; `uncertainty`: the
               Breslow baseline hazard and the conformal calibration scores (`uncertainty`).
  state.parquet  one row per array: per member, the model parameters and the fitted
               preprocessing arrays (patch, deep MRI and radiomics statistics, quantile
               maps), each as its dtype, shape and raw little-endian bytes.

JSON and Parquet only, no pickle, and nothing refers back to the training store. A single
run has one member; an ensemble (`--ensemble=K`) one per fold.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from feature_store import store as store_lib
from moemil_jax import metrics, preprocess

BUNDLE_DIR = 'bundle'
BUNDLE_JSON = 'bundle.json'
STATE = 'state.parquet'
PREDICTIONS = 'predictions.parquet'  # the run's, written before the bundle
FORMAT = 1


class BundleError(ValueError):
  """A bundle that is missing, unreadable, or does not fit the store it is applied to."""


@dataclasses.dataclass
class Member:
  """One model of the bundle with the preprocessing it was trained with."""

  name: str
  params: Any  # nnx pure dict of the parameters
  fitted: preprocess.Fitted
  radiomics_width: int  # the model's radiomics input width (the fitted columns, zero-padded)
  risk_offset: float = 0.0  # subtracted from its log-risk (an ensemble member's training median)


def code_version() -> str:
  from importlib import metadata

  try:
    version = metadata.version('moemil-jax')
  except metadata.PackageNotFoundError:
    version = 'unknown'
  head = Path(__file__).resolve().parents[1] / '.git' / 'HEAD'
  commit = ''
  try:
    ref = head.read_text().strip()
    if ref.startswith('ref: '):
      ref = (head.parent / ref[5:]).read_text().strip()
    commit = f'+{ref[:12]}'
  except OSError:
    pass
  return version + commit


def store_fingerprint(store_dir: str | Path) -> dict[str, Any]:
  """What makes features comparable: the encoder, its weights and the extraction settings."""
  info = store_lib.read_store_json(Path(store_dir))
  wsi, mri = info.get('wsi', {}), info.get('mri', {})
  return {
    'wsi_sha256': wsi.get('fingerprint_sha256'),
    'mri_sha256': mri.get('fingerprint_sha256'),
    'encoder': info.get('encoder') or wsi.get('fingerprint', {}).get('encoder'),
    'wsi': wsi.get('fingerprint'),
    'mri': mri.get('fingerprint'),
  }


def fingerprint_difference(trained: dict[str, Any], other: dict[str, Any]) -> str | None:
  """The first difference in what defines the features, as '<field>: <trained> vs <other>',
  or None when they match; the environment (device, precision, library versions) is not
  compared here (`store_lib.compare_fingerprints` lists it)."""
  return store_lib.compare_fingerprints(trained, other)[0]


def operating_points(frame) -> dict[str, Any]:
  """The response threshold (Youden) and risk-group cutoff (median log-risk) a bundle
  applies, fixed on out-of-fold predictions when the run has them (ensembles), else on the
  validation split, else (no validation patients) on training; never on the test center."""
  sources = []
  if 'oof_response_logit' in frame:
    oof = frame[frame.oof_response_logit.notna()]
    sources.append(
      ('out_of_fold', oof, 1 / (1 + np.exp(-oof.oof_response_logit)), oof.oof_log_risk)
    )
  for split, name in (('val', 'validation'), ('train', 'training')):
    part = frame[frame.split == split]
    sources.append((name, part, part.response_prob, part.log_risk))
  out: dict[str, Any] = {'threshold': 0.5, 'threshold_fixed_on': 'default 0.5', 'cutoff': 0.0}
  out['cutoff_fixed_on'] = 'default 0'
  for name, part, prob, _ in sources:
    labelled = part.ic_response.notna().to_numpy()
    y = part.ic_response.to_numpy()[labelled]
    if labelled.sum() >= 4 and len(set(y.astype(int))) == 2:
      out['threshold'] = float(metrics.youden_threshold(y.astype(int), prob.to_numpy()[labelled]))
      out['threshold_fixed_on'] = name
      break
  for name, part, _, risk in sources:
    risk = risk.to_numpy(np.float64)
    risk = risk[np.isfinite(risk)]
    if len(risk):
      out['cutoff'] = float(np.median(risk))
      out['cutoff_fixed_on'] = name
      break
  return out


def uncertainty(frame) -> dict[str, Any]:
  """What a bundle needs to state its uncertainty, fitted on a run's predictions: the Breslow
  baseline hazard of the development log-risks (`survival_probability`) and the per-class
  conformal calibration scores of the response (`conformal`), both from out-of-fold
  predictions when the run has them. An entry that cannot be fitted holds why not."""
  from moemil_jax import conformal, survival_probability

  out: dict[str, Any] = {}
  try:
    out['survival'] = survival_probability.fit_frame(frame).to_json()
  except (ValueError, KeyError) as e:
    out['survival_undefined'] = str(e)
  try:
    mondrian, source = conformal.fit_frame(frame)
    out['conformal'] = {'calibrated_on': source, 'scores': mondrian.to_json()}
  except (ValueError, KeyError) as e:
    out['conformal_undefined'] = str(e)
  return out


def write(
  workdir: str | Path,
  config,
  members: list[Member],
  operating: dict[str, Any],
  store_dir: str | Path,
  frame=None,
) -> Path:
  """Writes <workdir>/bundle (replacing an earlier one). `frame`: the run's predictions, for
  the survival baseline and conformal calibration (default: <workdir>/predictions.parquet)."""
  if frame is None and (Path(workdir) / PREDICTIONS).exists():
    import pandas as pd

    frame = pd.read_parquet(Path(workdir) / PREDICTIONS)
  path = (Path(workdir) / BUNDLE_DIR).resolve()
  if path.exists():
    shutil.rmtree(path)
  path.mkdir(parents=True)
  rows = []
  for k, m in enumerate(members):
    for kind, tree in (('params', m.params), ('preprocess', m.fitted.arrays())):
      for key, value in _flatten(tree):
        value = np.ascontiguousarray(np.asarray(value))
        rows.append((k, kind, key, value.dtype.str, list(value.shape), value.tobytes()))
  columns = list(zip(*rows))
  table = pa.table(
    {
      'member': pa.array(columns[0], pa.int32()),
      'kind': columns[1],
      'key': columns[2],
      'dtype': columns[3],
      'shape': pa.array(columns[4], pa.list_(pa.int64())),
      'data': pa.array(columns[5], pa.large_binary()),
    }
  )
  pq.write_table(table, path / STATE, compression='zstd')
  meta = {
    'format': FORMAT,
    'code_version': code_version(),
    'config': config.to_dict(),
    'members': [
      {
        'name': m.name,
        'radiomics_width': int(m.radiomics_width),
        'risk_offset': float(m.risk_offset),
        'preprocess': m.fitted.metadata(),
      }
      for m in members
    ],
    'operating_points': operating,
    'uncertainty': uncertainty(frame) if frame is not None else {},
    'trained_on': {'store': str(Path(store_dir).resolve()), **store_fingerprint(store_dir)},
  }
  (path / BUNDLE_JSON).write_text(json.dumps(meta, indent=2, default=_jsonable) + '\n')
  return path


def read(run_dir: str | Path) -> tuple[dict[str, Any], list[Member]]:
  """bundle.json and the members of <run_dir>/bundle (or of a bundle directory itself)."""
  path = Path(run_dir)
  if (path / BUNDLE_DIR / BUNDLE_JSON).exists():
    path = path / BUNDLE_DIR
  if not (path / BUNDLE_JSON).exists():
    raise BundleError(
      f'{run_dir}: no model bundle ({BUNDLE_DIR}/{BUNDLE_JSON}); pass a finished training '
      'workdir (python -m launch.train writes the bundle)'
    )
  meta = json.loads((path / BUNDLE_JSON).read_text())
  if meta.get('format') != FORMAT:
    raise BundleError(f'{path}: bundle format {meta.get("format")}, this code reads {FORMAT}')
  state: dict[tuple[int, str], dict] = {}
  for row in pq.read_table(path / STATE).to_pylist():
    value = np.frombuffer(row['data'], np.dtype(row['dtype'])).reshape(row['shape'])
    _unflatten(state.setdefault((row['member'], row['kind']), {}), row['key'], value.copy())
  members = []
  for k, m in enumerate(meta['members']):
    arrays = state.get((k, 'preprocess'), {})
    members.append(
      Member(
        name=m['name'],
        params=state.get((k, 'params'), {}),
        fitted=preprocess.Fitted.from_saved(arrays, m['preprocess']),
        radiomics_width=int(m['radiomics_width']),
        risk_offset=float(m['risk_offset']),
      )
    )
  return meta, members


def _flatten(tree, prefix=''):
  """(key path 'a/b/0', leaf) pairs of a nested dict."""
  if isinstance(tree, dict):
    for key, value in tree.items():
      yield from _flatten(value, f'{prefix}/{key}' if prefix else str(key))
  else:
    yield prefix, tree


def _unflatten(out: dict, key: str, value) -> None:
  *parents, leaf = key.split('/')
  for part in parents:
    out = out.setdefault(_key(part), {})
  out[_key(leaf)] = value


def _key(part: str):
  return int(part) if part.isdigit() else part  # nnx.List children are numbered


def _jsonable(x):
  if isinstance(x, (np.integer, np.floating)):
    return x.item()
  if isinstance(x, np.ndarray):
    return x.tolist()
  if isinstance(x, (tuple, set)):
    return list(x)
  return str(x)
