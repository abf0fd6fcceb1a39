"""Per-model, per-split clinical results from predictions.parquet files, plus the baselines.

Input: a workdir with one folder per trained model, each holding `predictions.parquet`
(one row per patient) and `run.json` (names the model and the feature store). Every
threshold is fixed once and applied unchanged to every split: the Youden threshold for
response and the median log-risk for OS, on out-of-fold predictions when the run has them
(ensembles), else on the validation split (model selection), else on training; never on the
external test. A model trained to fit its training patients would look perfect there, so
training is the last resort (the results say which was used: `threshold_fixed_on`).
The comparators of `moemil_jax.baselines` (TNM; TNM + EBV DNA; penalised logistic and Cox
models on radiomics and on mean-pooled slide embeddings) are fitted on training patients
only, with the primary model's split assignment, and evaluated here exactly as the deep
models are; one that cannot be fitted is left out with a note.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np
import pandas as pd
from absl import logging

from moemil_jax import bundle, metrics, preprocess

PREDICTIONS = 'predictions.parquet'
RUN_JSON = 'run.json'
SPLITS = ('train', 'val', 'test')
# 'oof' is not a split of predictions.parquet but the development patients' out-of-fold
# predictions (`oof_response_logit`, `oof_log_risk`), scored as a column of its own; 'train'
# is in-sample (every model has fitted those patients). Columns, in reporting order:
OOF = 'oof'
REPORT_SPLITS = (OOF, 'val', 'test', 'train')
SPLIT_NAMES = {
  OOF: 'Development (out-of-fold)',
  'train': 'Training (in-sample)',
  'val': 'Validation (model selection)',
  'test': 'External test',
}
# bundle.operating_points' names for where a threshold was fixed, as the report prints them.
FIXED_ON = {
  'out_of_fold': 'development out-of-fold predictions',
  'validation': 'the validation split',
  'training': 'in-sample training predictions',
}
MODEL_ORDER = (
  'moemil',
  'moemil_clinical',
  'dlr',
  'pathomics',
  'tnm',
  'tnm_ebv',
  'radiomics_linear',
  'wsi_meanpool',
  'wsi_prototypes',
  'key_patch_oracle',
  'ceiling_wsi',
  'ceiling_mri',
  'ceiling',
  'oracle',
)
DISPLAY_NAMES = {
  'moemil': 'MoEMIL',
  'dlr': 'DLR',
  'pathomics': 'Pathomics',
  'tnm': 'TNM',
  'tnm_ebv': 'TNM + EBV DNA',
  'radiomics_linear': 'Radiomics (L2 logistic / Cox)',
  'wsi_meanpool': 'WSI mean-pool (L2 logistic / Cox)',
  'moemil_clinical': 'MoEMIL + clinical (TNM, EBV DNA)',
  'wsi_prototypes': 'WSI prototypes (L2 logistic / Cox)',
  'key_patch_oracle': 'Key-patch oracle (L2 on the true key patches)',
  'ceiling_wsi': 'Ceiling, slides alone',
  'ceiling_mri': 'Ceiling, MRI alone',
  'ceiling': 'Ceiling (what the views allow)',
  'oracle': 'Oracle (truth)',
}
PRIMARY_MODEL = 'moemil'
HORIZONS_MONTHS = (36.0, 60.0)
PREDICTION_COLUMNS = (
  'patient_id',
  'center',
  'split',
  'model',
  'response_logit',
  'response_prob',
  'log_risk',
  'ic_response',
  'os_months',
  'os_event',
)
_FLOAT_PREDICTIONS = ('response_logit', 'response_prob', 'log_risk')


class EvaluationError(ValueError):
  """Predictions or clinical data cannot be evaluated; the message names the file and patients."""


def display_name(model: str) -> str:
  return DISPLAY_NAMES.get(model, model)


def _names(ids, limit: int = 10) -> str:
  ids = list(ids)
  more = f' and {len(ids) - limit} more' if len(ids) > limit else ''
  return ', '.join(map(str, ids[:limit])) + more


# --------------------------------------------------------------------------- reading


def check_predictions(df: pd.DataFrame, source: str) -> pd.DataFrame:
  """Validates one model's predictions; refuses NaN predictions naming the patients."""
  missing = [c for c in PREDICTION_COLUMNS if c not in df.columns]
  if missing:
    raise EvaluationError(f'{source}: missing columns {missing}')
  if df.empty:
    raise EvaluationError(f'{source}: no rows')
  dup = df['patient_id'][df['patient_id'].duplicated()].unique()
  if len(dup):
    raise EvaluationError(f'{source}: duplicate patient_id {_names(dup)}')
  bad_split = sorted(set(df['split']) - set(SPLITS))
  if bad_split:
    raise EvaluationError(f'{source}: split must be one of {SPLITS}, found {bad_split}')
  for col in _FLOAT_PREDICTIONS:
    values = pd.to_numeric(df[col], errors='coerce').astype(float)
    bad = df['patient_id'][~np.isfinite(values.to_numpy())]
    if len(bad):
      raise EvaluationError(
        f'{source}: {col} is NaN or infinite for {len(bad)} patients: '
        f'{_names(bad)}; refusing to evaluate incomplete predictions'
      )
  prob = df['response_prob'].astype(float)
  if ((prob < 0) | (prob > 1)).any():
    bad = df['patient_id'][(prob < 0) | (prob > 1)]
    raise EvaluationError(f'{source}: response_prob outside [0, 1] for {_names(bad)}')
  out = df.copy()
  out['ic_response'] = pd.to_numeric(out['ic_response'], errors='coerce').astype('Float64')
  out['os_months'] = pd.to_numeric(out['os_months'], errors='coerce').astype(float)
  out['os_event'] = pd.to_numeric(out['os_event'], errors='coerce').astype(float)
  checks = {
    'ic_response not 0, 1 or null': out['ic_response'].notna() & ~out['ic_response'].isin([0, 1]),
    'os_event not 0 or 1': out['os_event'].notna() & ~out['os_event'].isin([0.0, 1.0]),
    'os_months negative': out['os_months'] < 0,
  }
  for what, bad in checks.items():
    bad = np.asarray(bad.fillna(False), bool)
    if bad.any():
      raise EvaluationError(f'{source}: {what} for {_names(out["patient_id"][bad])}')
  return out.reset_index(drop=True)


def read_model_dir(model_dir: Path) -> tuple[str, pd.DataFrame, dict[str, Any]]:
  """(model name, predictions, run info) from one model folder."""
  path = Path(model_dir) / PREDICTIONS
  try:
    df = pd.read_parquet(path)
  except Exception as e:  # pyarrow raises several types for a corrupt file
    raise EvaluationError(f'{path}: unreadable Parquet file ({e})') from e
  run_path = Path(model_dir) / RUN_JSON
  info = json.loads(run_path.read_text()) if run_path.exists() else {}
  name = str(info.get('model') or Path(model_dir).name)
  return name, check_predictions(df, str(path)), info


def discover_models(workdir: Path) -> dict[str, tuple[pd.DataFrame, dict[str, Any]]]:
  workdir = Path(workdir)
  found = {}
  for sub in sorted(p for p in workdir.iterdir() if (p / PREDICTIONS).exists()):
    name, df, info = read_model_dir(sub)
    if name in found:
      raise EvaluationError(f'{sub}: model {name!r} appears twice in {workdir}')
    found[name] = (df, info)
  if not found:
    raise EvaluationError(f'{workdir}: no */{PREDICTIONS} found; run training first')
  return found


def has_out_of_fold(df: pd.DataFrame) -> bool:
  return 'oof_response_logit' in df and bool(df['oof_response_logit'].notna().any())


def split_rows(df: pd.DataFrame, split: str) -> pd.DataFrame:
  """The rows scored in a column: a split's rows, or for 'oof' the development patients'
  out-of-fold predictions put in place of response_logit/response_prob/log_risk (and their
  out-of-fold risk group as high_risk)."""
  if split != OOF:
    return df[df['split'] == split]
  if not has_out_of_fold(df) or 'oof_log_risk' not in df:
    return df.iloc[:0]
  logit, risk = df['oof_response_logit'].astype(float), df['oof_log_risk'].astype(float)
  part = df[logit.notna() & risk.notna() & (df['split'] != 'test')].copy()
  part['response_logit'] = part['oof_response_logit'].astype(float)
  part['response_prob'] = 1.0 / (1.0 + np.exp(-part['response_logit']))
  part['log_risk'] = part['oof_log_risk'].astype(float)
  if 'oof_high_risk' in part:
    part['high_risk'] = part['oof_high_risk']
  part['split'] = OOF
  return part


def shown_splits(results: Mapping[str, Any]) -> list[str]:
  """The columns some model has patients in (an ensemble has no validation split; a single
  model no out-of-fold predictions), in reporting order."""
  per_model = results['per_model']
  return [
    split
    for split in results.get('splits', REPORT_SPLITS)
    if any(
      (tasks.get(task, {}).get(split) or {}).get('n')
      for tasks in per_model.values()
      for task in ('response', 'survival')
    )
  ]


def check_split_agreement(predictions: Mapping[str, pd.DataFrame]) -> None:
  """The same patient must be in the same split for every model."""
  merged = None
  for name, df in predictions.items():
    s = df.set_index('patient_id')['split'].rename(name)
    merged = s.to_frame() if merged is None else merged.join(s, how='outer')
  disagree = merged.index[merged.apply(lambda r: r.dropna().nunique() > 1, axis=1)]
  if len(disagree):
    raise EvaluationError(f'models put patients in different splits: {_names(disagree)}')


# --------------------------------------------------------------------------- comparators


def tnm_predictions(clinical: pd.DataFrame, split_of: pd.Series) -> pd.DataFrame:
  """The TNM comparator, now in `baselines` (which imports this module), kept for callers."""
  from moemil_jax import baselines

  return baselines.tnm_predictions(clinical, split_of)


def oracle_predictions(
  truth: pd.DataFrame, reference: pd.DataFrame, *, ceiling: bool | str = False
) -> pd.DataFrame:
  """The synthetic cohort's ground truth as a model: the ceiling no model can beat.

  `truth` is a synthetic cohort's truth.csv (patient_id, response_prob, log_hazard);
  `reference` is another model's predictions, whose splits and outcomes are reused.
  ceiling: use the posterior-mean columns instead (`ceiling_response_prob`,
  `ceiling_log_hazard`): the best prediction the image views allow; 'wsi' or 'mri': what
  that view allows alone (`ceiling_wsi_*`, `ceiling_mri_*`; model 'ceiling_wsi' / 'ceiling_mri').
  """
  name = 'oracle' if not ceiling else 'ceiling' if ceiling is True else f'ceiling_{ceiling}'
  prefix = '' if name == 'oracle' else f'{name}_'
  prob_col, hazard_col = f'{prefix}response_prob', f'{prefix}log_hazard'
  missing = {'patient_id', prob_col, hazard_col} - set(truth.columns)
  if missing:
    raise EvaluationError(f'truth.csv: missing columns {sorted(missing)}')
  truth = truth.assign(patient_id=truth['patient_id'].astype(str)).set_index('patient_id')
  absent = reference.loc[~reference['patient_id'].isin(truth.index), 'patient_id']
  if len(absent):
    raise EvaluationError(f'truth.csv has no row for {_names(absent)}')
  prob = truth.loc[reference['patient_id'], prob_col].to_numpy(float)
  out = reference.loc[:, list(PREDICTION_COLUMNS)].copy()
  out['model'] = name
  out['response_prob'] = prob
  # truth.csv keeps 6 decimals, so a strongly determined cohort has probabilities of 0 or 1.
  clipped = np.clip(prob, 1e-7, 1 - 1e-7)
  out['response_logit'] = np.log(clipped) - np.log1p(-clipped)
  out['log_risk'] = truth.loc[reference['patient_id'], hazard_col].to_numpy(float)
  if has_out_of_fold(reference):  # the truth needs no fit: its out-of-fold rows are its own
    oof = reference['oof_response_logit'].notna().to_numpy()
    out['oof_response_logit'] = np.where(oof, out['response_logit'], np.nan)
    out['oof_log_risk'] = np.where(oof, out['log_risk'], np.nan)
  return check_predictions(out, 'truth.csv')


# --------------------------------------------------------------------------- results


def _try(fn: Callable, *args, **kwargs) -> tuple[Any, str | None]:
  """(value, None), or (None, reason) when the metric is undefined for these data."""
  try:
    return fn(*args, **kwargs), None
  except metrics.UndefinedMetric as e:
    return None, str(e)


def _clean(value: Any) -> Any:
  """JSON-friendly: numpy scalars to Python, NaN to None."""
  if isinstance(value, dict):
    return {str(k): _clean(v) for k, v in value.items()}
  if isinstance(value, (list, tuple)):
    return [_clean(v) for v in value]
  if isinstance(value, (np.integer,)):
    return int(value)
  if isinstance(value, (float, np.floating)):
    return None if not math.isfinite(float(value)) else float(value)
  return value


def _labelled(df: pd.DataFrame) -> pd.DataFrame:
  return df[df['ic_response'].notna()]


def _with_os(df: pd.DataFrame) -> pd.DataFrame:
  return df[df['os_months'].notna() & df['os_event'].notna()]


def response_results(df: pd.DataFrame, *, n_bootstrap: int, ci_method: str) -> dict[str, Any]:
  """AUC (CI), Youden threshold (`bundle.operating_points`), threshold metrics, Brier and
  calibration per split."""
  out: dict[str, Any] = {}
  points = bundle.operating_points(df)
  threshold = None
  if points['threshold_fixed_on'].startswith('default'):
    out['threshold_undefined'] = 'no split with both response classes to fix the Youden threshold'
  else:
    threshold = points['threshold']
    out['threshold_fixed_on'] = points['threshold_fixed_on']
    if points['threshold_fixed_on'] == 'training':
      out['threshold_warning'] = (
        'Youden threshold fixed on in-sample training predictions (no out-of-fold or '
        'validation predictions)'
      )
  out['threshold'] = threshold
  for split in REPORT_SPLITS:
    part = split_rows(df, split)
    lab = _labelled(part)
    y, prob = lab['ic_response'].astype(int).to_numpy(), lab['response_prob'].to_numpy(float)
    res: dict[str, Any] = {'n': len(part), 'n_labelled': len(lab), 'n_responders': int(y.sum())}
    if len(part) == 0:
      res['undefined'] = (
        'no out-of-fold predictions' if split == OOF else 'no patients in this split'
      )
      out[split] = res
      continue
    auc, reason = _try(metrics.roc_auc_ci, y, prob, method=ci_method, n_bootstrap=n_bootstrap)
    if reason:
      res['auc_undefined'] = reason
    else:
      res['auc'], res['auc_lo'], res['auc_hi'] = auc
    if threshold is not None and len(lab):
      res.update(metrics.confusion_at(y, prob, threshold).as_dict())
    if len(lab):
      res['brier'] = metrics.brier_score(y, prob)
      cal, reason = _try(metrics.calibration_intercept_slope, y, prob)
      if reason:
        res['calibration_undefined'] = reason
      else:
        res['calibration_intercept'], res['calibration_slope'] = cal
    out[split] = res
  return out


def survival_results(
  df: pd.DataFrame, *, horizons: tuple[float, ...], n_bootstrap: int
) -> dict[str, Any]:
  """C-index (CI), median-risk groups (`bundle.operating_points`), log-rank, HR and
  time-dependent AUC per split."""
  out: dict[str, Any] = {}
  points = bundle.operating_points(df)
  cutoff = None if points['cutoff_fixed_on'].startswith('default') else points['cutoff']
  out['cutoff'] = cutoff
  out['cutoff_fixed_on'] = points['cutoff_fixed_on']
  if points['cutoff_fixed_on'] == 'training':
    out['cutoff_warning'] = (
      'median log-risk cutoff fixed on in-sample training predictions (no out-of-fold or '
      'validation predictions)'
    )
  for split in REPORT_SPLITS:
    rows = split_rows(df, split)
    part = _with_os(rows)
    t, e = part['os_months'].to_numpy(float), part['os_event'].to_numpy(float)
    risk = part['log_risk'].to_numpy(float)
    res: dict[str, Any] = {
      'n': len(part),
      'events': int(e.sum()),
      'n_without_os': int(len(rows) - len(part)),
    }
    if res['n_without_os']:
      res['os_warning'] = f'{res["n_without_os"]} patients without OS follow-up left out'
    if len(part) == 0 or cutoff is None:
      res['undefined'] = (
        ('no out-of-fold predictions' if split == OOF else 'no patients with OS in this split')
        if len(part) == 0
        else 'no patients with a log-risk to fix the risk cutoff'
      )
      out[split] = res
      continue
    c, reason = _try(metrics.concordance_index_ci, t, e, risk, n_bootstrap=n_bootstrap)
    if reason:
      res['c_index_undefined'] = reason
    else:
      res['c_index'], res['c_index_lo'], res['c_index_hi'] = c
    high = (risk > cutoff).astype(int)
    res['n_high'], res['n_low'] = int(high.sum()), int(len(high) - high.sum())
    res['events_high'], res['events_low'] = int(e[high == 1].sum()), int(e[high == 0].sum())
    lr, reason = _try(metrics.logrank_test, t, e, high)
    if reason:
      res['logrank_undefined'] = reason
    else:
      res['logrank_chi2'], res['logrank_p'] = lr
      if e.sum() < metrics.MIN_EVENTS_LOGRANK:
        res['logrank_warning'] = (
          f'only {int(e.sum())} events (fewer than '
          f'{metrics.MIN_EVENTS_LOGRANK}): log-rank P is unreliable'
        )
    hr, reason = _try(metrics.hazard_ratio, t, e, high)
    if reason:
      res['hr_undefined'] = reason
    else:
      res['hr'], res['hr_lo'], res['hr_hi'], res['hr_p'] = hr
    td = {}
    for h in horizons:
      # Censoring weights from the evaluated split's own patients: follow-up differs between
      # centers, and another center's censoring curve would weight these patients wrongly.
      value, reason = _try(metrics.time_dependent_auc, t, e, t, e, risk, h)
      td[f'{h:g}'] = value if reason is None else {'undefined': reason}
    res['td_auc'] = td
    out[split] = res
  return out


def delong_comparisons(predictions: Mapping[str, pd.DataFrame], primary: str) -> dict[str, Any]:
  """Paired DeLong tests of the primary model against each comparator, per split."""
  out: dict[str, Any] = {}
  base = predictions[primary]
  for split in REPORT_SPLITS:
    out[split] = {}
    a = _labelled(split_rows(base, split))[['patient_id', 'ic_response', 'response_prob']]
    for name, df in predictions.items():
      if name == primary:
        continue
      b = split_rows(df, split)[['patient_id', 'response_prob']]
      m = a.merge(b, on='patient_id', suffixes=('_a', '_b'))
      res: dict[str, Any] = {'n': len(m)}
      zp, reason = (
        _try(
          metrics.delong_test,
          m['ic_response'].astype(int),
          m['response_prob_a'],
          m['response_prob_b'],
        )
        if len(m)
        else (None, 'no patients in common')
      )
      if reason:
        res['undefined'] = reason
      else:
        res['z'], res['p'] = zp
      out[split][name] = res
  return out


@dataclasses.dataclass
class Evaluation:
  """Everything the report needs: predictions (with risk groups) and the results tree."""

  predictions: dict[str, pd.DataFrame]
  results: dict[str, Any]

  @property
  def models(self) -> list[str]:
    return list(self.predictions)


def _ordered(names) -> list[str]:
  names = list(names)
  return [m for m in MODEL_ORDER if m in names] + sorted(m for m in names if m not in MODEL_ORDER)


def evaluate_predictions(
  predictions: Mapping[str, pd.DataFrame],
  *,
  primary: str | None = None,
  horizons: tuple[float, ...] = HORIZONS_MONTHS,
  n_bootstrap: int = 1000,
  ci_method: str = 'delong',
  notes: list[str] | None = None,
  lr_tests: Mapping[str, Any] | None = None,
) -> Evaluation:
  """Results for already-loaded predictions (e.g. including the TNM comparator).

  lr_tests: `baselines.nested_lr_tests` of MoEMIL + clinical against TNM + EBV DNA, put in
  results['added_value'] beside the differences."""
  predictions = {m: predictions[m].copy() for m in _ordered(predictions)}
  check_split_agreement(predictions)
  primary = primary or (PRIMARY_MODEL if PRIMARY_MODEL in predictions else next(iter(predictions)))
  per_model = {}
  for name, df in predictions.items():
    logging.info('evaluating %s (%d patients)', name, len(df))
    surv = survival_results(df, horizons=horizons, n_bootstrap=n_bootstrap)
    if surv['cutoff'] is not None:
      df['high_risk'] = (df['log_risk'] > surv['cutoff']).astype(int)
      if has_out_of_fold(df) and 'oof_log_risk' in df:
        df['oof_high_risk'] = (df['oof_log_risk'] > surv['cutoff']).astype(int)
    per_model[name] = {
      'response': response_results(df, n_bootstrap=n_bootstrap, ci_method=ci_method),
      'survival': surv,
    }
  results = {
    'primary': primary,
    'models': list(predictions),
    'splits': list(REPORT_SPLITS),
    'ci_method': ci_method,
    'horizons_months': list(horizons),
    'per_model': per_model,
    'delong': delong_comparisons(predictions, primary),
    'notes': list(notes or []),
  }
  combined, clinical = 'moemil_clinical', 'tnm_ebv'
  if combined in predictions and clinical in predictions:
    pair = {k: predictions[k] for k in (combined, clinical)}
    results['delong_combined_vs_clinical'] = delong_comparisons(pair, combined)
  results['added_value'] = added_value(
    predictions, per_model, primary, n_bootstrap=n_bootstrap, lr_tests=lr_tests
  )
  return Evaluation(predictions=dict(predictions), results=_clean(results))


# --------------------------------------------------------------------------- added value

COMBINED_MODEL, CLINICAL_MODEL = 'moemil_clinical', 'tnm_ebv'
# The truth, never a comparator.
REFERENCE_MODELS = ('oracle', 'ceiling', 'ceiling_wsi', 'ceiling_mri', 'key_patch_oracle')


def best_baseline(per_model: Mapping[str, Any], task: str, key: str) -> tuple[str | None, str]:
  """(the baseline with the highest `key`, the column it was chosen on): chosen on the
  development out-of-fold figures, else validation, else in-sample training; never on the
  external test."""
  from moemil_jax import baselines

  candidates = [m for m in per_model if m in baselines.BASELINES]
  for split in (OOF, 'val', 'train'):
    scored = {m: per_model[m][task][split].get(key) for m in candidates}
    scored = {m: v for m, v in scored.items() if v is not None}
    if scored:
      return max(scored, key=scored.get), split
  return None, ''


def _paired(a: pd.DataFrame, b: pd.DataFrame, cols: list[str]) -> pd.DataFrame:
  keep = ['patient_id', *cols]
  return a[keep].merge(b[['patient_id', *cols[-1:]]], on='patient_id', suffixes=('_a', '_b'))


def compare_pair(
  a: pd.DataFrame, b: pd.DataFrame, split: str, *, n_bootstrap: int, seed: int = 0
) -> dict[str, Any]:
  """AUC and C-index of model a minus model b on the patients both score in `split`: paired
  bootstrap intervals (`metrics.auc_difference_ci`, `metrics.cindex_difference_ci`) and the
  DeLong test of the AUC difference."""
  ra, rb = split_rows(a, split), split_rows(b, split)
  out: dict[str, Any] = {}
  lab = _paired(_labelled(ra), rb, ['ic_response', 'response_prob'])
  resp: dict[str, Any] = {'n': len(lab)}
  y = lab['ic_response'].astype(int).to_numpy()
  pa, pb = lab['response_prob_a'].to_numpy(float), lab['response_prob_b'].to_numpy(float)
  if len(lab) == 0:
    resp['undefined'] = 'no patients in common'
  else:
    boot, reason = _try(metrics.auc_difference_ci, y, pa, pb, n_bootstrap=n_bootstrap, seed=seed)
    if reason:
      resp['undefined'] = reason
    else:
      resp['diff'], resp['lo'], resp['hi'] = boot
      dl, reason = _try(metrics.delong_difference, y, pa, pb)
      if reason:
        resp['delong_undefined'] = reason
      else:
        _, resp['delong_lo'], resp['delong_hi'], resp['delong_z'], resp['delong_p'] = dl
  out['auc'] = resp
  sa, sb = _with_os(ra), _with_os(rb)
  os_ = _paired(sa, sb, ['os_months', 'os_event', 'log_risk'])
  surv: dict[str, Any] = {'n': len(os_)}
  if len(os_) == 0:
    surv['undefined'] = 'no patients in common'
  else:
    c, reason = _try(
      metrics.cindex_difference_ci,
      os_['os_months'].to_numpy(float),
      os_['os_event'].to_numpy(float),
      os_['log_risk_a'].to_numpy(float),
      os_['log_risk_b'].to_numpy(float),
      n_bootstrap=n_bootstrap,
      seed=seed,
    )
    if reason:
      surv['undefined'] = reason
    else:
      surv['diff'], surv['lo'], surv['hi'] = c
  out['c_index'] = surv
  return out


def added_value(
  predictions: Mapping[str, pd.DataFrame],
  per_model: Mapping[str, Any],
  primary: str,
  *,
  n_bootstrap: int,
  lr_tests: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
  """Does the image model add to TNM + EBV DNA? Per column (out-of-fold, validation,
  external): MoEMIL + clinical minus TNM + EBV DNA, and MoEMIL minus the best baseline (chosen
  per metric on development figures), in AUC and C-index; plus the likelihood-ratio tests."""
  out: dict[str, Any] = {'comparisons': [], 'lr_test': dict(lr_tests or {})}
  pairs = []
  if COMBINED_MODEL in predictions and CLINICAL_MODEL in predictions:
    pairs.append((COMBINED_MODEL, CLINICAL_MODEL, ('auc', 'c_index'), ''))
  for metric, task, key in (('auc', 'response', 'auc'), ('c_index', 'survival', 'c_index')):
    best, chosen_on = best_baseline(per_model, task, key)
    if best is not None and primary in predictions:
      where = {OOF: 'out-of-fold', 'val': 'validation', 'train': 'in-sample'}[chosen_on]
      why = f'best baseline by {where} {"AUC" if metric == "auc" else "C-index"}'
      pairs.append((primary, best, (metric,), why))
  for a, b, wanted, why in pairs:
    entry: dict[str, Any] = {'model': a, 'comparator': b, 'metrics': list(wanted), 'why': why}
    for split in REPORT_SPLITS:
      if split == 'train':  # in-sample differences say nothing about added value
        continue
      res = compare_pair(predictions[a], predictions[b], split, n_bootstrap=n_bootstrap)
      if res['auc']['n'] or res['c_index']['n']:
        entry[split] = {m: res[m] for m in wanted}
    out['comparisons'].append(entry)
  return out


def _diff_text(r: Mapping[str, Any], prefix: str = '') -> str:
  if r.get(prefix + 'lo') is None or r.get('diff') is None:
    return 'n/a'
  return f'{r["diff"]:+.3f} ({r[prefix + "lo"]:+.3f} to {r[prefix + "hi"]:+.3f})'


def added_value_table(ev: Evaluation) -> pd.DataFrame:
  """One row per comparison and metric: the difference (paired bootstrap 95% CI) per
  column, and for the AUC the DeLong P."""
  rows = []
  av = ev.results.get('added_value') or {}
  shown = [s for s in shown_splits(ev.results) if s != 'train']
  for entry in av.get('comparisons', []):
    for metric in entry['metrics']:
      name = 'AUC' if metric == 'auc' else 'C-index'
      row = {
        'Comparison': f'{display_name(entry["model"])} - {display_name(entry["comparator"])}',
        'Metric': name + (f' ({entry["why"]})' if entry.get('why') else ''),
      }
      for split in shown:
        r = (entry.get(split) or {}).get(metric) or {}
        row[f'{SPLIT_NAMES[split]} (95% CI)'] = _diff_text(r)
        row[f'{SPLIT_NAMES[split]} DeLong P'] = (
          format_p(r.get('delong_p')) if metric == 'auc' else '-'
        )
      rows.append(row)
  if not rows:
    return pd.DataFrame(columns=['Comparison']).set_index('Comparison')
  return pd.DataFrame(rows).set_index('Comparison')


def lr_test_lines(ev: Evaluation) -> list[str]:
  """The likelihood-ratio tests of MoEMIL + clinical against TNM + EBV DNA, one line each."""
  lr = (ev.results.get('added_value') or {}).get('lr_test') or {}
  where = lr.get('fitted_on', 'out-of-fold')
  lines = []
  for task, what in (('response', 'IC response, logistic'), ('survival', 'OS, Cox')):
    r = lr.get(task)
    if not r:
      continue
    if r.get('undefined'):
      lines.append(f'Likelihood-ratio test ({what}): {r["undefined"]}')
      continue
    lines.append(
      f'Likelihood-ratio test, TNM + EBV DNA + MoEMIL score vs TNM + EBV DNA ({what}, '
      f'development center, {where} scores, n={r["n"]}): chi2 {r["chi2"]:.2f} (1 df), '
      f'P {format_p(r["p"])}; score coefficient {r["coef_per_sd"]:+.3f} per SD'
    )
  return lines


def evaluate(
  workdir: Path,
  *,
  horizons: tuple[float, ...] = HORIZONS_MONTHS,
  n_bootstrap: int = 1000,
  ci_method: str = 'delong',
  with_tnm: bool = True,
  with_baselines: bool = True,
  truth: str | Path | None = None,
) -> Evaluation:
  """Reads every model folder under `workdir`, adds the comparators, computes all results.

  with_tnm: the TNM comparator; with_baselines: the other `baselines` (TNM + EBV DNA,
  radiomics, WSI mean-pool), all fitted on the primary model's training patients from the
  store its run.json names. `truth`: a synthetic cohort's truth.csv, added as the 'oracle'
  row (the ceiling).
  """
  from moemil_jax import baselines

  found = discover_models(workdir)
  predictions = {name: df for name, (df, _) in found.items()}
  notes: list[str] = []
  primary = PRIMARY_MODEL if PRIMARY_MODEL in found else next(iter(found))
  folds = development_folds(predictions[primary], notes)
  wanted = [
    name
    for name in baselines.BASELINES
    if (with_tnm if name == 'tnm' else with_baselines) and name not in predictions
  ]
  if wanted:
    store = found[primary][1].get('store')
    clinical_path = Path(store) / 'clinical.parquet' if store else None
    if clinical_path is None or not clinical_path.exists():
      for name in wanted:
        notes.append(
          f'{baselines.label(name)} skipped: clinical.parquet not found '
          f'(run.json of {primary} names store {store!r})'
        )
        logging.warning('%s', notes[-1])
    else:
      split_of = predictions[primary].set_index('patient_id')['split']
      data_config = found[primary][1].get('config', {}).get('data')
      predictions.update(
        baselines.baseline_predictions(
          store, split_of, names=wanted, notes=notes, data_config=data_config, folds=folds
        )
      )
  lr_tests = None
  if with_baselines and 'moemil_clinical' not in predictions:
    store = found[primary][1].get('store')
    try:
      clinical = pd.read_parquet(Path(store) / 'clinical.parquet')
      clinical['patient_id'] = clinical['patient_id'].astype(str)
      predictions['moemil_clinical'] = baselines.combined_predictions(
        clinical, predictions[primary], folds
      )
      lr_tests = predictions['moemil_clinical'].attrs.get('lr_test')
      if predictions['moemil_clinical'].attrs.get('oof_failed'):
        notes.append(
          f'{baselines.label("moemil_clinical")}: no out-of-fold predictions '
          f'({predictions["moemil_clinical"].attrs["oof_failed"]})'
        )
    except (EvaluationError, ValueError, OSError, TypeError) as e:
      notes.append(f'{baselines.label("moemil_clinical")} skipped: {e}')
      logging.warning('%s', notes[-1])
  for name, (_, info) in found.items():
    data_config = info.get('config', {}).get('data', {})
    if data_config and preprocess.harmonise_mode(data_config) == 'per_center':
      notes.append(
        f'{display_name(name)}: features standardised within each center on its own patients '
        '(data.harmonise=per_center, transductive: it needs a batch of patients per center)'
      )
    if data_config and preprocess.harmonise_mode(data_config) == 'combat':
      notes.append(
        f'{display_name(name)}: radiomics ComBat-harmonised to the development center '
        "(data.harmonise=combat, transductive: each other center's location and scale are "
        "estimated from that center's own patients, the external test's included, so a new "
        'center needs a batch of patients; external figures are not those of one new patient)'
      )
  if truth is not None:
    truth_table = pd.read_csv(truth, dtype={'patient_id': str})
    predictions['oracle'] = oracle_predictions(truth_table, predictions[primary])
    if 'ceiling_response_prob' in truth_table.columns:  # older truth.csv files lack it
      predictions['ceiling'] = oracle_predictions(truth_table, predictions[primary], ceiling=True)
    for view in ('wsi', 'mri'):
      if f'ceiling_{view}_response_prob' in truth_table.columns:
        predictions[f'ceiling_{view}'] = oracle_predictions(
          truth_table, predictions[primary], ceiling=view
        )
    store = found[primary][1].get('store')
    key_patches = Path(truth).parent / 'truth_key_patches.parquet'
    if store and key_patches.exists():  # a synthetic store's planted informative patches
      split_of = predictions[primary].set_index('patient_id')['split']
      try:
        predictions['key_patch_oracle'] = baselines.key_patch_oracle(store, split_of, key_patches)
      except baselines.BaselineSkipped as e:
        notes.append(f'key-patch oracle skipped: {e}')
  return evaluate_predictions(
    predictions,
    horizons=horizons,
    n_bootstrap=n_bootstrap,
    ci_method=ci_method,
    notes=notes,
    lr_tests=lr_tests,
  )


def development_folds(primary: pd.DataFrame, notes: list[str]) -> pd.Series | None:
  """patient_id -> development fold for the comparators' out-of-fold fits: the primary
  model's `oof_fold` (ensembles), else, when it has out-of-fold predictions without it, 5
  folds stratified by response (noted); None without out-of-fold predictions."""
  if not has_out_of_fold(primary):
    return None
  ids = primary['patient_id'].astype(str)
  if 'oof_fold' in primary:
    fold = pd.Series(pd.to_numeric(primary['oof_fold'], errors='coerce').to_numpy(), index=ids)
    fold = fold[fold >= 0]
    if len(fold):
      return fold.astype(int)
  from sklearn.model_selection import StratifiedKFold

  dev = primary[primary['oof_response_logit'].notna()]
  y = pd.to_numeric(dev['ic_response'], errors='coerce').fillna(-1).to_numpy()
  k = min(5, int(np.unique(y, return_counts=True)[1].min()))
  if k < 2:
    return None
  fold = np.empty(len(dev), int)
  for f, (_, held) in enumerate(StratifiedKFold(k, shuffle=True, random_state=0).split(y, y)):
    fold[held] = f
  notes.append(
    f'the predictions carry no oof_fold: the comparators were fitted out of fold on {k} folds '
    "stratified by response, not the ensemble's own folds"
  )
  return pd.Series(fold, index=dev['patient_id'].astype(str).to_numpy())


# --------------------------------------------------------------------------- tables


def format_p(p: float | None) -> str:
  if p is None:
    return 'n/a'
  return '<0.001' if p < 0.001 else f'{p:.3f}'


def _ci(res: Mapping[str, Any], key: str, digits: int = 3) -> str:
  if res.get(key) is None:
    return 'n/a'
  return f'{res[key]:.{digits}f} ({res[key + "_lo"]:.{digits}f}-{res[key + "_hi"]:.{digits}f})'


def split_sizes(ev: Evaluation) -> str:
  """One line: how many patients each split has (all models' patients), e.g. 'Patients:
  Training 100 (96 with IC response, 38 deaths); ...; External test 100, center B (95 ..., 41 ...)'."""
  cols = ['patient_id', 'split', 'center', 'ic_response', 'os_event']
  parts = []
  for split in shown_splits(ev.results):
    frames = [split_rows(df, split)[[c for c in cols if c in df]] for df in ev.predictions.values()]
    part = pd.concat(frames).drop_duplicates('patient_id') if frames else pd.DataFrame()
    text = f'{SPLIT_NAMES[split]} {len(part)}'
    centers = sorted(part['center'].dropna().astype(str).unique()) if 'center' in part else []
    if split == 'test' and centers:
      text += f', center{"s" if len(centers) > 1 else ""} {", ".join(centers)}'
    if len(part):
      labelled = int(part['ic_response'].notna().sum()) if 'ic_response' in part else 0
      events = int((part['os_event'] == 1).sum()) if 'os_event' in part else 0
      text += f' ({labelled} with IC response, {events} deaths)'
    parts.append(text)
  return 'Patients: ' + '; '.join(parts)


def fixed_on(ev: Evaluation) -> str:
  """Where the models' thresholds and cutoffs were fixed, e.g. 'development out-of-fold
  predictions (every model)' or '...out-of-fold predictions (MoEMIL, ...); the validation split
  (DLR)'."""
  where: dict[str, list[str]] = {}
  for name, r in ev.results['per_model'].items():
    for key in (r['response'].get('threshold_fixed_on'), r['survival'].get('cutoff_fixed_on')):
      if key and not key.startswith('default'):
        models = where.setdefault(FIXED_ON.get(key, key), [])
        if display_name(name) not in models:
          models.append(display_name(name))
  if len(where) == 1:
    return f'{next(iter(where))} (every model)'
  return '; '.join(f'{k} ({", ".join(v)})' for k, v in where.items()) or 'nowhere (undefined)'


def comparison_table(ev: Evaluation) -> pd.DataFrame:
  """The paper's table: one row per model and baseline; AUC (95% CI), C-index and log-rank P per split."""
  rows = []
  shown = shown_splits(ev.results)
  for name in ev.models:
    r = ev.results['per_model'][name]
    row = {'Model': display_name(name)}
    for split in shown:
      row[f'AUC {SPLIT_NAMES[split]} (95% CI)'] = _ci(r['response'][split], 'auc')
    for split in shown:
      row[f'C-index {SPLIT_NAMES[split]} (95% CI)'] = _ci(r['survival'][split], 'c_index')
    for split in shown:
      s = r['survival'][split]
      p = format_p(s.get('logrank_p'))
      row[f'Log-rank P {SPLIT_NAMES[split]}'] = p + ('*' if s.get('logrank_warning') else '')
    rows.append(row)
  table = pd.DataFrame(rows).set_index('Model')
  table.attrs['split_sizes'] = split_sizes(ev)  # printed under the title by format_comparison
  table.attrs['fixed_on'] = fixed_on(ev)
  table.attrs['added_value'] = format_added_value(ev)
  return table


def response_table(ev: Evaluation, split: str) -> pd.DataFrame:
  rows = []
  delong = ev.results['delong'][split]
  for name in ev.models:
    r = ev.results['per_model'][name]['response'][split]

    def f(k):
      return 'n/a' if r.get(k) is None else f'{r[k]:.3f}'

    d = delong.get(name, {})
    rows.append(
      {
        'Model': display_name(name),
        'N (responders)': f'{r.get("n_labelled", 0)} ({r.get("n_responders", 0)})',
        'AUC (95% CI)': _ci(r, 'auc'),
        'Accuracy': f('accuracy'),
        'Sensitivity': f('sensitivity'),
        'Specificity': f('specificity'),
        'PPV': f('ppv'),
        'NPV': f('npv'),
        'Brier': f('brier'),
        'Calibration slope': f('calibration_slope'),
        'Threshold fixed on': FIXED_ON.get(
          ev.results['per_model'][name]['response'].get('threshold_fixed_on', ''), 'n/a'
        ),
        f'DeLong P vs {display_name(ev.results["primary"])}': '-'
        if name == ev.results['primary']
        else format_p(d.get('p')),
      }
    )
  return pd.DataFrame(rows).set_index('Model')


def hr_text(s: dict) -> str:
  """'HR (lo-hi)'; a bound lifelines could not estimate (tiny groups: inf or NaN) shows as n/a."""

  def num(v):
    return f'{v:.2f}' if isinstance(v, (int, float)) and np.isfinite(v) else 'n/a'

  return (
    'n/a'
    if s.get('hr') is None
    else f'{num(s["hr"])} ({num(s.get("hr_lo"))}-{num(s.get("hr_hi"))})'
  )


def survival_table(ev: Evaluation, split: str) -> pd.DataFrame:
  rows = []
  for name in ev.models:
    s = ev.results['per_model'][name]['survival'][split]
    row = {
      'Model': display_name(name),
      'N (events)': f'{s.get("n", 0)} ({s.get("events", 0)})',
      'C-index (95% CI)': _ci(s, 'c_index'),
      'High/low risk': f'{s.get("n_high", 0)}/{s.get("n_low", 0)}',
      'HR high vs low (95% CI)': hr_text(s),
      'Log-rank P': format_p(s.get('logrank_p')) + ('*' if s.get('logrank_warning') else ''),
      'Cutoff fixed on': FIXED_ON.get(
        ev.results['per_model'][name]['survival'].get('cutoff_fixed_on', ''), 'n/a'
      ),
    }
    for h, v in (s.get('td_auc') or {}).items():
      row[f'AUC({float(h) / 12:g} y)'] = f'{v:.3f}' if isinstance(v, float) else 'n/a'
    rows.append(row)
  return pd.DataFrame(rows).set_index('Model')


def undefined_notes(ev: Evaluation) -> list[str]:
  """Every 'undefined' reason and warning in the results, one line per kind: the notes,
  then e.g. 'survival: no patients with OS in this split (Validation: MoEMIL, DLR)'."""
  lines = list(ev.results.get('notes', []))
  groups: dict[tuple[str, str], dict[str, list[str]]] = {}
  per_model = ev.results['per_model']
  # A split that no model has a patient in (an ensemble's validation split) is one line, not
  # one per task and comparison.
  shown = shown_splits(ev.results) if per_model else []
  empty = [split for split in ev.results.get('splits', REPORT_SPLITS) if split not in shown]
  for split in empty:
    oof = any(
      t.get('response', {}).get('threshold_fixed_on') == 'out_of_fold' for t in per_model.values()
    )
    if split == OOF:
      lines.append(f'{SPLIT_NAMES[split]}: no model has out-of-fold predictions (column left out)')
      continue
    why = ': ensembles choose their epoch on out-of-fold predictions instead' if oof else ''
    lines.append(
      f'{SPLIT_NAMES[split]}: no patients in this split (all models; column left out){why}'
    )

  def add(kind: str, message: str, split: str, model: str) -> None:
    if split in empty:
      return
    by_split = groups.setdefault((kind, message), {})
    by_split.setdefault(SPLIT_NAMES.get(split, split), []).append(display_name(model))

  for model, tasks in per_model.items():
    for task, result in tasks.items():
      for key, value in result.items():
        if key.endswith(('undefined', 'warning')) and isinstance(value, str):
          add(task, value, 'all splits', model)
      for split in ev.results.get('splits', REPORT_SPLITS):
        for key, value in (result.get(split) or {}).items():
          if key.endswith(('undefined', 'warning')) and isinstance(value, str):
            add(task, value, split, model)
  for split, by_model in ev.results.get('delong', {}).items():
    for model, result in by_model.items():
      if isinstance(result.get('undefined'), str):
        add('DeLong vs MoEMIL', result['undefined'], split, model)
  everyone = {display_name(m) for m in ev.results.get('models', [])}
  comparators = everyone - {display_name(ev.results.get('primary', ''))}

  def names(models: list[str]) -> str:
    return 'all models' if comparators <= set(models) else ', '.join(models)

  for (kind, message), by_split in groups.items():
    where = '; '.join(f'{split}: {names(models)}' for split, models in by_split.items())
    lines.append(f'{kind}: {message} ({where})')
  return lines


def format_comparison(table: pd.DataFrame) -> str:
  """The comparison table as fixed-width text for the terminal (splits stacked as row blocks)."""
  where = table.attrs.get('fixed_on', 'out-of-fold or validation predictions')
  lines = [f'MoEMIL vs comparators (thresholds and cutoffs fixed on {where})']
  if table.attrs.get('split_sizes'):
    lines.append(table.attrs['split_sizes'])
  metrics_cols = ('AUC', 'C-index', 'Log-rank P')
  for metric in metrics_cols:
    cols = [c for c in table.columns if c.startswith(metric + ' ')]
    header = ['Model'] + [c[len(metric) + 1 :].removesuffix(' (95% CI)') for c in cols]
    block = [[str(m)] + [str(table.loc[m, c]) for c in cols] for m in table.index]
    # A split no model has (an ensemble has no validation split) is left out.
    kept = [0] + [i + 1 for i in range(len(cols)) if any(r[i + 1] != 'n/a' for r in block)]
    block = [[r[i] for i in kept] for r in block]
    header_kept = [header[i] for i in kept]
    title = metric + (' (95% CI)' if metric != 'Log-rank P' else '')
    widths = [max(len(r[i]) for r in block + [header_kept]) for i in range(len(header_kept))]
    lines.append('')
    lines.append(title)
    lines.append('  '.join(h.ljust(w) for h, w in zip(header_kept, widths)))
    lines.append('  '.join('-' * w for w in widths))
    lines.extend('  '.join(v.ljust(w) for v, w in zip(r, widths)) for r in block)
  if table.apply(lambda c: c.astype(str).str.endswith('*')).to_numpy().any():
    lines.append('')
    lines.append(f'* fewer than {metrics.MIN_EVENTS_LOGRANK} events: log-rank P unreliable')
  if table.attrs.get('added_value'):
    lines += ['', table.attrs['added_value']]
  return '\n'.join(lines)


def format_added_value(ev: Evaluation) -> str:
  """The added-value block: differences (paired bootstrap 95% CI, DeLong P) and the
  likelihood-ratio tests, as fixed-width text ('' when there is nothing to compare)."""
  table = added_value_table(ev)
  if table.empty:
    return ''
  lines = ['Added value (model minus comparator; paired bootstrap 95% CI; DeLong P for AUC)']
  cols = list(table.columns)
  block = [[str(i)] + [str(v) for v in row] for i, row in zip(table.index, table.to_numpy())]
  header = ['Comparison', *cols]
  widths = [max(len(r[i]) for r in block + [header]) for i in range(len(header))]
  lines.append('  '.join(h.ljust(w) for h, w in zip(header, widths)))
  lines.append('  '.join('-' * w for w in widths))
  lines.extend('  '.join(v.ljust(w) for v, w in zip(r, widths)) for r in block)
  lines.extend(lr_test_lines(ev))
  return '\n'.join(lines)
