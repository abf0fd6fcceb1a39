"""Simple comparators for the deep models, fitted on training patients only.

A deep model is only worth its complexity if it beats what a linear model makes of the same
inputs. Every baseline here gives one row per patient in the predictions format
(`evaluation.PREDICTION_COLUMNS`), so `evaluation` scores it with exactly the code, thresholds
and splits it uses for the deep models:

  tnm               T, N and overall stage: L2 logistic regression (C=1) for response and a
                    lightly ridge-penalised Cox model for OS (the paper's clinical comparator).
  tnm_ebv           the same on T, N, overall stage and log10(EBV DNA + 1); missing EBV DNA
                    takes the training median.
  radiomics_linear  the radiomics columns the deep model sees: the store's radiomics after the
                    primary run's `data.harmonise` (per_center or ComBat, as the deep model's
                    inputs), then `preprocess.fit_radiomics` with its `data` settings
                    (correlation filter, transform, missing-value rule, `radiomics_top_k`)
                    but without LASSO, fitted on training patients: L2 logistic regression
                    with C chosen by 5-fold stratified CV AUC, and a ridge Cox model whose
                    penalty is chosen by 5-fold CV C-index.
  wsi_meanpool      each patient's patch embeddings as the store holds them (not harmonised),
                    averaged over all slides, standardised and reduced to 32 principal
                    components, then the same two models.
  wsi_prototypes    the prototype slide vector of the deep model's default slide pathway
                    (`moemil_jax/prototypes.py`: k-means tissue types and per-type PCA, fitted
                    on the training patients' patches with the primary run's
                    `data.slide_prototypes` / `prototype_components`, default 16 / 4), then
                    the same two models: the cheap slide model a deep one must beat.

Splits come from the primary model's predictions; every statistic (standardisation, PCA,
imputation, CV, the fits) uses training patients only, so validation and test outcomes never
reach a fit. Patients without the modality get the prediction at the training mean (all-zero
standardised inputs). A baseline that cannot be fitted is skipped with a note, never a crash.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import pandas as pd
from absl import logging
from scipy.special import expit

from feature_store import store as store_lib
from moemil_jax import evaluation, metrics, preprocess, store_reader

BASELINES = ('tnm', 'tnm_ebv', 'radiomics_linear', 'wsi_meanpool', 'wsi_prototypes')
COMBINED = 'moemil_clinical'
ALL_BASELINES = BASELINES
LABELS = {
  'tnm': 'TNM comparator',
  'tnm_ebv': 'TNM + EBV DNA baseline',
  'radiomics_linear': 'Radiomics baseline',
  'wsi_meanpool': 'WSI mean-pool baseline',
  'wsi_prototypes': 'WSI prototypes baseline',
  COMBINED: 'MoEMIL + clinical (TNM, EBV DNA)',
}
STAGE_ORDER = {'I': 1, 'II': 2, 'III': 3, 'IVA': 4, 'IVB': 5}
TNM_FEATURES = ('t_stage', 'n_stage', 'overall_stage')
OUTCOMES = ('ic_response', 'os_months', 'os_event')
CV_FOLDS = 5
# Both grids run from the strongest penalty: np.argmax keeps the first of tied CV scores, so
# ties go to the simpler model. At n ~ 250 and ~500 correlated radiomics columns CV wants a
# strong penalty: with the grids' old strong ends (C 1e-4, Cox penalizer 10) it chose the end on
# every realistic cohort, and the wider grids below raised the CV C-index (0.679 -> 0.687,
# 0.602 -> 0.619 on realistic seeds 0 and 1) at penalizers 300-1e5; on two hard cohorts (963
# columns) CV went the other way, to 1e-3, hence the weak end of 1e-4. At the strong ends the
# scores' ranking has converged (the coefficients tend to the score vector at zero, one
# univariate weighting), so a choice there is not a truncated search; at the weak end it is,
# and `_linear_predictions` warns.
LOGISTIC_CS = tuple(np.logspace(-7, 2, 19))
COX_PENALIZERS = tuple(np.logspace(5, -4, 19))
WSI_COMPONENTS = 32
# What a fit may raise on data it cannot use (lifelines' ConvergenceError and numpy's
# LinAlgError are ValueErrors); anything else is a bug and propagates.
_UNFITTABLE = (evaluation.EvaluationError, store_lib.StoreError, ValueError)


class BaselineSkipped(evaluation.EvaluationError):
  """This baseline cannot be fitted on these data; the message says why."""


def label(name: str) -> str:
  return LABELS.get(name, f'Baseline {name}')


# --------------------------------------------------------------------------- shared


def _patients(clinical: pd.DataFrame, split_of: pd.Series, columns: Sequence[str]) -> pd.DataFrame:
  """Clinical rows of the patients the primary model has, with their split, in store order."""
  missing = [c for c in ('patient_id', *columns, *OUTCOMES) if c not in clinical.columns]
  if missing:
    raise evaluation.EvaluationError(f'clinical.parquet: missing columns {missing}')
  df = clinical[clinical['patient_id'].isin(split_of.index)].copy().reset_index(drop=True)
  df['split'] = df['patient_id'].map(split_of)
  return df


def _frame(df: pd.DataFrame, model: str, logit: np.ndarray, log_risk: np.ndarray) -> pd.DataFrame:
  """Predictions in the evaluation format, outcomes copied from the clinical table."""
  logit = np.asarray(logit, float)
  return evaluation.check_predictions(
    pd.DataFrame(
      {
        'patient_id': df['patient_id'].astype(str),
        'center': df['center'].astype(str) if 'center' in df else '',
        'split': df['split'],
        'model': model,
        'response_logit': logit,
        'response_prob': expit(logit),
        'log_risk': np.asarray(log_risk, float),
        'ic_response': pd.to_numeric(df['ic_response'], errors='coerce').astype('Float64'),
        'os_months': df['os_months'].astype(float),
        'os_event': df['os_event'].astype(float),
      }
    ),
    label(model),
  )


def _outcomes(df: pd.DataFrame) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """(response, os_months, os_event) as float arrays, NaN when unknown."""
  y = pd.to_numeric(df['ic_response'], errors='coerce').to_numpy(float)
  t = pd.to_numeric(df['os_months'], errors='coerce').to_numpy(float)
  e = pd.to_numeric(df['os_event'], errors='coerce').to_numpy(float)
  return y, t, e


# --------------------------------------------------------------------------- clinical


def _stage_matrix(clinical: pd.DataFrame) -> np.ndarray:
  overall = clinical['overall_stage'].map(lambda s: STAGE_ORDER.get(str(s).strip().upper()))
  x = pd.DataFrame(
    {
      't_stage': pd.to_numeric(clinical['t_stage'], errors='coerce'),
      'n_stage': pd.to_numeric(clinical['n_stage'], errors='coerce'),
      'overall_stage': overall.astype(float),
    }
  )
  bad = clinical['patient_id'][x.isna().any(axis=1).to_numpy()]
  if len(bad):
    raise evaluation.EvaluationError(
      f'clinical.parquet: missing or unknown stage (T, N, or overall in '
      f'{sorted(STAGE_ORDER)}) for {evaluation._names(bad)}'
    )
  return x.to_numpy(float)


def _clinical_predictions(
  clinical: pd.DataFrame, split_of: pd.Series, *, with_ebv: bool
) -> pd.DataFrame:
  """Stages (and log EBV DNA) z-scored on training; fixed light penalties, as the paper's TNM."""
  from lifelines import CoxPHFitter
  from sklearn.linear_model import LogisticRegression

  model = 'tnm_ebv' if with_ebv else 'tnm'
  df = _patients(clinical, split_of, TNM_FEATURES + (('ebv_dna',) if with_ebv else ()))
  x = _stage_matrix(df)
  names = list(TNM_FEATURES)
  train = (df['split'] == 'train').to_numpy()
  if with_ebv:
    ebv = np.log10(pd.to_numeric(df['ebv_dna'], errors='coerce').to_numpy(float) + 1.0)
    known = np.isfinite(ebv)
    if not (train & known).any():
      raise BaselineSkipped('no training patient has EBV DNA')
    ebv = np.where(known, ebv, np.median(ebv[train & known]))
    x, names = np.column_stack([x, ebv]), names + ['log10_ebv_dna']
  mean, sd = x[train].mean(0), x[train].std(0)
  z = (x - mean) / np.where(sd > 0, sd, 1.0)
  y, t, e = _outcomes(df)
  labelled = train & np.isfinite(y)
  if len(np.unique(y[labelled])) < 2:
    raise BaselineSkipped('training patients have one response class only')
  lr = LogisticRegression(C=1.0, max_iter=1000).fit(z[labelled], y[labelled].astype(int))
  os_ok = train & np.isfinite(t) & np.isfinite(e)
  cox_df = pd.DataFrame(z[os_ok], columns=names).assign(os_months=t[os_ok], os_event=e[os_ok])
  cph = CoxPHFitter(penalizer=0.01).fit(cox_df, 'os_months', 'os_event')
  log_risk = np.asarray(cph.predict_log_partial_hazard(pd.DataFrame(z, columns=names)))
  return _frame(df, model, lr.decision_function(z), log_risk)


def _clinical_z(df: pd.DataFrame, train: np.ndarray) -> tuple[np.ndarray, list[str]]:
  """Stages and log10(EBV DNA + 1) (missing: the training median), z-scored on `train`."""
  ebv = np.log10(pd.to_numeric(df['ebv_dna'], errors='coerce').to_numpy(float) + 1.0)
  known = np.isfinite(ebv)
  if not (train & known).any():
    raise BaselineSkipped('no patient of the fitting set has EBV DNA')
  x = np.column_stack([_stage_matrix(df), np.where(known, ebv, np.median(ebv[train & known]))])
  mean, sd = x[train].mean(0), x[train].std(0)
  return (x - mean) / np.where(sd > 0, sd, 1.0), [*TNM_FEATURES, 'log10_ebv_dna']


def combined_predictions(
  clinical: pd.DataFrame, primary: pd.DataFrame, folds: pd.Series | None = None
) -> pd.DataFrame:
  """The nomogram NPC papers report: the model's score with TNM and EBV DNA.

  The TNM + EBV DNA model (the same inputs z-scored on the fitting patients, the same L2
  logistic regression C=1 and ridge Cox penalizer 0.01) plus one input, the model's response
  logit (logistic) or log-risk (Cox), so TNM + EBV DNA is its nested comparator and a score
  that adds nothing gets a weight near zero. Fitted where the model's scores are honest: its
  out-of-fold predictions (ensembles: each development patient's score from the members
  that did not train on it), else its validation split; never its training predictions nor
  the external test. The score is standardised with the fitting patients' mean and SD and the
  same map is applied to the model's own prediction (the ensemble mean) for every patient.

  Its own out-of-fold predictions (`oof_response_logit`, `oof_log_risk`) come from the same
  fit repeated per fold of `folds` (the primary's `oof_fold`; without it, 5 folds stratified
  by response) on the other folds' out-of-fold scores. `attrs['lr_test']` holds the
  likelihood-ratio tests of the nested models (`nested_lr_tests`).
  """
  split_of = primary.set_index('patient_id')['split']
  df = _patients(clinical, split_of, (*TNM_FEATURES, 'ebv_dna'))
  p = primary.set_index('patient_id').loc[df['patient_id']]
  if 'oof_response_logit' in p and p['oof_response_logit'].notna().any():
    logit_fit, risk_fit = p['oof_response_logit'].to_numpy(float), p['oof_log_risk'].to_numpy(float)
    fit = np.isfinite(logit_fit) & np.isfinite(risk_fit)
    source = 'out-of-fold'
  else:
    fit = (df['split'] == 'val').to_numpy()
    logit_fit, risk_fit = p['response_logit'].to_numpy(float), p['log_risk'].to_numpy(float)
    source = 'validation'
  if fit.sum() < 10:
    raise BaselineSkipped('fewer than 10 out-of-fold or validation patients to fit it on')
  y, t, e = _outcomes(df)
  logit_all, risk_all = p['response_logit'].to_numpy(float), p['log_risk'].to_numpy(float)
  logit, log_risk = _combined_fit(df, fit, logit_fit, risk_fit, logit_all, risk_all, y, t, e)

  # Out of fold only where the primary is (an ensemble): a single model's validation split
  # is too small to refit the combination on parts of it.
  fold = _fit_folds(df, fit, y, folds) if source == 'out-of-fold' else np.full(len(df), -1)
  oof_logit, oof_risk = np.full(len(df), np.nan), np.full(len(df), np.nan)
  filled_l, filled_r = np.nan_to_num(logit_fit), np.nan_to_num(risk_fit)
  oof_failed = None
  for f in np.unique(fold[fold >= 0]):
    held = fold == f
    try:
      lg, rk = _combined_fit(df, fit & ~held, logit_fit, risk_fit, filled_l, filled_r, y, t, e)
    except _UNFITTABLE as err:  # a small fold (a single model's validation split)
      oof_failed = f'fold {f}: {err}'
      break
    oof_logit[held], oof_risk[held] = lg[held], rk[held]
  out = _frame(df, COMBINED, logit, log_risk)
  if oof_failed is None and (fold >= 0).any():
    out['oof_response_logit'], out['oof_log_risk'], out['oof_fold'] = oof_logit, oof_risk, fold
  else:
    out.attrs['oof_failed'] = oof_failed
  out.attrs['fitted_on'] = source
  out.attrs['lr_test'] = nested_lr_tests(df, fit, logit_fit, risk_fit, y, t, e)
  out.attrs['lr_test']['fitted_on'] = source
  return out


def _fit_folds(
  df: pd.DataFrame, fit: np.ndarray, y: np.ndarray, folds: pd.Series | None
) -> np.ndarray:
  """(P,) fold of each fitting patient (-1 for the others): `folds` where given, else 5 folds
  stratified by response (unknown its own stratum)."""
  from sklearn.model_selection import StratifiedKFold

  out = np.full(len(df), -1, np.int64)
  if folds is not None:
    f = folds.copy()
    f.index = f.index.astype(str)
    mapped = f.reindex(df['patient_id'].astype(str)).to_numpy(float)
    known = fit & np.isfinite(mapped) & (np.nan_to_num(mapped, nan=-1) >= 0)
    if known.any():
      out[known] = mapped[known].astype(np.int64)
      return out
  rows = np.flatnonzero(fit)
  strata = np.where(np.isnan(y[rows]), -1, y[rows])
  k = min(CV_FOLDS, int(np.unique(strata, return_counts=True)[1].min()))
  if k < 2:
    return out
  split = StratifiedKFold(n_splits=k, shuffle=True, random_state=0).split(rows, strata)
  for f, (_, held) in enumerate(split):
    out[rows[held]] = f
  return out


def _combined_fit(df, rows, logit_fit, risk_fit, logit_out, risk_out, y, t, e):
  """(logit, log_risk) for every patient from the combined models fitted on `rows`: clinical
  inputs z-scored on those rows plus the model's score standardised on them (the map is
  applied to `logit_out` / `risk_out`)."""
  from lifelines import CoxPHFitter
  from sklearn.linear_model import LogisticRegression

  z, names = _clinical_z(df, rows)

  def standard(fit_values, out_values):
    mean, sd = fit_values[rows].mean(), fit_values[rows].std()
    return (out_values - mean) / (sd if sd > 0 else 1.0), (fit_values - mean) / (sd or 1.0)

  s_out, s_fit = standard(logit_fit, logit_out)
  r_out, r_fit = standard(risk_fit, risk_out)
  labelled = rows & np.isfinite(y)
  if len(np.unique(y[labelled])) < 2:
    raise BaselineSkipped('the fitting set has one response class only')
  lr = LogisticRegression(C=1.0, max_iter=1000).fit(
    np.column_stack([s_fit, z])[labelled], y[labelled].astype(int)
  )
  logit = lr.decision_function(np.column_stack([s_out, z]))
  cols = ['model_log_risk', *names]
  os_ok = rows & np.isfinite(t) & np.isfinite(e)
  cox_df = pd.DataFrame(np.column_stack([r_fit, z])[os_ok], columns=cols)
  cph = CoxPHFitter(penalizer=0.01).fit(
    cox_df.assign(os_months=t[os_ok], os_event=e[os_ok]), 'os_months', 'os_event'
  )
  log_risk = np.asarray(
    cph.predict_log_partial_hazard(pd.DataFrame(np.column_stack([r_out, z]), columns=cols))
  )
  return logit, log_risk


def nested_lr_tests(df, rows, logit_fit, risk_fit, y, t, e) -> dict[str, Any]:
  """Likelihood-ratio tests, on `rows`, of TNM + EBV DNA + the model's score against TNM +
  EBV DNA alone (1 degree of freedom): unpenalised logistic regressions (statsmodels) and Cox
  models (lifelines), the score standardised on those rows."""
  import statsmodels.api as sm
  from lifelines import CoxPHFitter
  from scipy import stats

  z, names = _clinical_z(df, rows)
  out: dict[str, Any] = {}
  labelled = rows & np.isfinite(y)
  s = (logit_fit - logit_fit[rows].mean()) / (logit_fit[rows].std() or 1.0)
  try:
    x0 = sm.add_constant(z[labelled], has_constant='add')
    x1 = np.column_stack([x0, s[labelled]])
    reduced = sm.Logit(y[labelled], x0).fit(disp=0)
    full = sm.Logit(y[labelled], x1).fit(disp=0)
    chi2 = max(0.0, 2 * (full.llf - reduced.llf))
    out['response'] = {
      'n': int(labelled.sum()),
      'chi2': float(chi2),
      'df': 1,
      'p': float(stats.chi2.sf(chi2, 1)),
      'coef_per_sd': float(full.params[-1]),
    }
  except Exception as err:  # statsmodels raises several types on (quasi-)separation
    out['response'] = {'undefined': f'logistic likelihood-ratio test failed: {err}'}
  os_ok = rows & np.isfinite(t) & np.isfinite(e)
  r = (risk_fit - risk_fit[rows].mean()) / (risk_fit[rows].std() or 1.0)
  base = pd.DataFrame(z[os_ok], columns=names).assign(os_months=t[os_ok], os_event=e[os_ok])
  try:
    reduced = CoxPHFitter().fit(base, 'os_months', 'os_event')
    full = CoxPHFitter().fit(base.assign(model_log_risk=r[os_ok]), 'os_months', 'os_event')
    chi2 = max(0.0, 2 * (full.log_likelihood_ - reduced.log_likelihood_))
    out['survival'] = {
      'n': int(os_ok.sum()),
      'events': int(e[os_ok].sum()),
      'chi2': float(chi2),
      'df': 1,
      'p': float(stats.chi2.sf(chi2, 1)),
      'coef_per_sd': float(full.params_['model_log_risk']),
    }
  except Exception as err:  # lifelines' ConvergenceError and numpy's LinAlgError
    out['survival'] = {'undefined': f'Cox likelihood-ratio test failed: {err}'}
  return out


def tnm_predictions(clinical: pd.DataFrame, split_of: pd.Series) -> pd.DataFrame:
  """TNM comparator in the predictions format, fitted on training patients only.

  Stages enter as ordinal numbers (standardised with training mean and SD); response by
  L2-regularised logistic regression, OS by a Cox model with a small ridge penalty (stage
  variables are collinear).
  """
  return _clinical_predictions(clinical, split_of, with_ebv=False)


def tnm_ebv_predictions(clinical: pd.DataFrame, split_of: pd.Series) -> pd.DataFrame:
  """TNM plus log10(EBV DNA + 1), the strongest routine prognostic marker in NPC."""
  return _clinical_predictions(clinical, split_of, with_ebv=True)


# --------------------------------------------------------------------------- linear models


@dataclasses.dataclass
class LinearFit:
  """Both tasks' scores for every patient, and the hyperparameters CV chose."""

  logit: np.ndarray  # (P,) response logit
  log_risk: np.ndarray  # (P,) Cox linear predictor
  C: float  # inverse L2 strength of the logistic regression
  cv_auc: float  # mean CV AUC at C
  cox_penalizer: float  # ridge penalty, lifelines' `penalizer` scale
  cv_c_index: float  # mean CV C-index at that penalizer
  train_c_index: float  # concordance of the final Cox fit on its own fit rows


def _folds(strata: np.ndarray, seed: int):
  from sklearn.model_selection import StratifiedKFold

  k = min(CV_FOLDS, int(np.unique(strata, return_counts=True)[1].min()))
  if k < 2:
    return None
  return StratifiedKFold(n_splits=k, shuffle=True, random_state=seed)


def logistic_cv(x: np.ndarray, y: np.ndarray, *, seed: int = 0) -> tuple[float, float]:
  """(C, mean CV AUC): L2 logistic regression, C by stratified k-fold CV AUC."""
  import sklearn
  from sklearn.linear_model import LogisticRegressionCV

  classes, counts = np.unique(y, return_counts=True)
  if len(classes) < 2:
    raise BaselineSkipped('training patients have one response class only')
  cv = _folds(y, seed)
  if cv is None:
    raise BaselineSkipped(f'too few training patients per response class ({counts.min()})')
  modern = tuple(int(v) for v in sklearn.__version__.split('.')[:2]) >= (1, 8)
  l2 = dict(l1_ratios=(0.0,), use_legacy_attributes=False) if modern else dict(penalty='l2')
  clf = LogisticRegressionCV(
    Cs=list(LOGISTIC_CS),
    cv=cv,
    scoring='roc_auc',
    refit=False,
    max_iter=5000,
    random_state=seed,
    **l2,
  ).fit(x, y.astype(int))
  scores = np.asarray(clf.scores_ if modern else clf.scores_[classes[1]]).reshape(cv.n_splits, -1)
  best = int(np.argmax(scores.mean(0)))
  return float(LOGISTIC_CS[best]), float(scores.mean(0)[best])


def logistic_fit(x: np.ndarray, y: np.ndarray, C: float):
  """The final L2 logistic regression (lbfgs, converged tightly so refits agree to 1e-6)."""
  from sklearn.linear_model import LogisticRegression

  return LogisticRegression(C=C, tol=1e-10, max_iter=10000).fit(x, y.astype(int))


@dataclasses.dataclass
class RidgeCox:
  """Cox model with an L2 penalty, parameterised as lifelines' `CoxPHFitter(penalizer=p)`.

  Maximises the Breslow partial log-likelihood minus n * p / 2 * |b|^2 on inputs z-scored with
  the fit rows' mean and SD (ddof 1), as lifelines does; without tied times Breslow and
  lifelines' Efron likelihood coincide. Written out because lifelines takes 1-3 s per fit with
  ~150 radiomics inputs and CV needs dozens of fits; Newton's method here takes milliseconds.
  """

  coef: np.ndarray  # on the z-scored inputs
  mean: np.ndarray
  std: np.ndarray

  @classmethod
  def fit(
    cls, x: np.ndarray, t: np.ndarray, e: np.ndarray, penalizer: float, *, gtol: float = 1e-10
  ) -> RidgeCox:
    if penalizer <= 0:
      raise ValueError('RidgeCox needs penalizer > 0')
    mean = x.mean(0)
    std = x.std(0, ddof=1) if len(x) > 1 else np.ones(x.shape[1])
    std = np.where(std > 1e-12, std, 1.0)
    z = (x - mean) / std
    order = np.argsort(-t, kind='stable')  # risk sets are prefixes in descending time
    z, t, e = z[order], t[order], e[order].astype(float)
    n = len(t)
    first = np.searchsorted(-t, -t, side='left')  # tie groups: risk set = all with t_j >= t_i
    last = np.searchsorted(-t, -t, side='right') - 1

    def objective(b):
      eta = z @ b
      m = eta.max()
      w = np.exp(eta - m)
      s0 = np.cumsum(w)[last]
      with np.errstate(divide='ignore', invalid='ignore'):  # an overlong trial step: inf
        ll = float(e @ (eta - m - np.log(s0)))
      f = -ll / n + 0.5 * penalizer * float(b @ b)
      return (f if np.isfinite(f) else np.inf), w, s0

    b = np.zeros(z.shape[1])
    f, w, s0 = objective(b)
    for _ in range(100):
      s1 = np.cumsum(w[:, None] * z, 0)[last]
      mu = s1 / s0[:, None]
      grad = -(e @ (z - mu)) / n + penalizer * b
      if float(np.abs(grad).max()) < gtol:
        break
      c = np.cumsum((e / s0)[::-1])[::-1][first]  # sum of 1/S0 over events at or before t_j
      hess = ((z.T * (w * c)) @ z - (mu.T * e) @ mu) / n + penalizer * np.eye(len(b))
      step = np.linalg.solve(hess, grad)
      size = 1.0
      # Backtracking (the objective is strictly convex: a short step decreases it), unless the
      # predicted decrease is below f's rounding, as near the optimum (a strong penalty's first
      # step lands there): no line search can judge a step then, so Newton's is taken.
      decrease = float(grad @ step)
      trial = objective(b - step)
      if decrease > 1e-12 * max(1.0, abs(f)):
        while trial[0] > f - 1e-4 * size * decrease and size >= 1e-8:
          size *= 0.5
          trial = objective(b - size * step)
      b = b - size * step
      f, w, s0 = trial
    else:
      raise ValueError(f'ridge Cox did not converge (penalizer {penalizer:g})')
    return cls(b, mean, std)

  def predict(self, x: np.ndarray) -> np.ndarray:
    """Log partial hazard centred on the fit rows' mean (lifelines' predict_log_partial_hazard)."""
    return ((x - self.mean) / self.std) @ self.coef


def cox_cv(x: np.ndarray, t: np.ndarray, e: np.ndarray, *, seed: int = 0) -> tuple[float, float]:
  """(penalizer, mean CV C-index): ridge Cox, penalty by stratified k-fold CV C-index."""
  if e.sum() < 2:
    raise BaselineSkipped(f'{int(e.sum())} OS events in training: too few to fit a Cox model')
  cv = _folds(e, seed)
  if cv is None:
    raise BaselineSkipped('too few censored training patients to cross-validate the Cox model')
  scores = np.full((cv.n_splits, len(COX_PENALIZERS)), np.nan)
  for k, (fit, held) in enumerate(cv.split(x, e)):
    for j, pen in enumerate(COX_PENALIZERS):
      try:
        risk = RidgeCox.fit(x[fit], t[fit], e[fit], pen).predict(x[held])
      except ValueError:  # did not converge at this penalty on this fold
        continue
      scores[k, j] = metrics.cindex_or_nan(t[held], e[held], risk)
  valid = ~np.isnan(scores)
  mean = np.where(valid.any(0), np.nansum(scores, 0) / np.maximum(valid.sum(0), 1), -np.inf)
  if not np.isfinite(mean).any():
    raise BaselineSkipped('the Cox model converged for no penalty in cross-validation')
  best = int(np.argmax(mean))
  return float(COX_PENALIZERS[best]), float(mean[best])


def fit_linear(
  x: np.ndarray,
  fit_rows: np.ndarray,
  response: np.ndarray,
  os_months: np.ndarray,
  os_event: np.ndarray,
  *,
  seed: int = 0,
) -> LinearFit:
  """Penalised logistic and Cox models fitted on `fit_rows` (training patients with the
  modality), hyperparameters by CV on those rows only; scores for every row of x."""
  labelled = fit_rows & np.isfinite(response)
  C, cv_auc = logistic_cv(x[labelled], response[labelled], seed=seed)
  logit = logistic_fit(x[labelled], response[labelled], C).decision_function(x)
  with_os = fit_rows & np.isfinite(os_months) & np.isfinite(os_event)
  t, e = os_months[with_os], os_event[with_os]
  pen, cv_c = cox_cv(x[with_os], t, e, seed=seed)
  cox = RidgeCox.fit(x[with_os], t, e, pen)
  log_risk = cox.predict(x)
  train_c = metrics.concordance_index(t, e, log_risk[with_os])
  return LinearFit(logit, log_risk, C, cv_auc, pen, cv_c, train_c)


def _linear_predictions(
  df: pd.DataFrame, model: str, x: np.ndarray, has: np.ndarray, *, seed: int
) -> pd.DataFrame:
  train = (df['split'] == 'train').to_numpy()
  fit_rows = train & has
  if not fit_rows.any():
    raise BaselineSkipped('no training patient has this modality')
  y, t, e = _outcomes(df)
  fit = fit_linear(x, fit_rows, y, t, e, seed=seed)
  logging.info(
    '%s: %d features, %d training patients; C=%.3g (CV AUC %.3f), Cox penalizer %.3g '
    '(CV C-index %.3f)',
    model,
    x.shape[1],
    fit_rows.sum(),
    fit.C,
    fit.cv_auc,
    fit.cox_penalizer,
    fit.cv_c_index,
  )
  for what, value, grid in (
    ('C', fit.C, LOGISTIC_CS),
    ('Cox penalizer', fit.cox_penalizer, COX_PENALIZERS),
  ):
    if value == grid[-1]:
      logging.warning(
        '%s: CV chose the weakest penalty on the grid (%s=%g); a weaker one might score higher',
        model,
        what,
        value,
      )
  out = _frame(df, model, fit.logit, fit.log_risk)
  out.attrs['fit'] = {k: v for k, v in dataclasses.asdict(fit).items() if np.isscalar(v)}
  return out


# --------------------------------------------------------------------------- image features


def radiomics_matrix(
  wide: pd.DataFrame,
  train: np.ndarray,
  response: np.ndarray,
  *,
  data_config: Mapping[str, Any] | None = None,
  seed: int = 0,
  os_months: np.ndarray | None = None,
  os_event: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
  """(x, has): the deep model's radiomics preprocessing (its `data` config: correlation
  filter, transform, missing-value rule and `radiomics_top_k`, the univariate selection on
  response and, given os_months/os_event, OS), fitted on training patients, without the LASSO
  so the penalised model does its own shrinkage; rows without radiomics are 0."""
  has = wide.notna().any(axis=1).to_numpy()
  if wide.shape[1] == 0 or not has.any():
    raise BaselineSkipped('the store has no radiomics')
  dc = dict(data_config or {})
  sel = preprocess.fit_radiomics(
    wide,
    train,
    response,
    corr_threshold=dc.get('radiomics_corr_threshold', 0.9),
    transform=dc.get('radiomics_transform', 'zscore'),
    min_present=dc.get('radiomics_min_present', 0.5),
    lasso=False,
    seed=seed,
    top_k=int(dc.get('radiomics_top_k', 0) or 0),
    os_months=os_months,
    os_event=os_event,
  )
  if not sel.columns:
    raise BaselineSkipped('no usable radiomics column on the training patients')
  x = np.asarray(sel.transform(wide), np.float64)
  x[~has] = 0.0
  return x, has


def harmonised_radiomics(cohort, data_config: Mapping[str, Any] | None) -> pd.DataFrame:
  """The cohort's radiomics after the primary run's `data.harmonise`, as the deep model saw
  them: per_center z-scores within each center, combat maps other centers onto the
  development center's (`preprocess.harmonise` does the same to the deep model's inputs)."""
  dc = dict(data_config or {})
  mode = preprocess.harmonise_mode(dc)
  if mode == 'combat':
    from moemil_jax import combat

    return combat.combat_to_reference(
      cohort.radiomics,
      cohort.center,
      preprocess.combat_reference(dc, cohort.center),
      min_patients=int(dc.get('min_center_patients', 20)),
    )
  if mode == 'per_center':
    rad = cohort.radiomics.copy()
    for center in np.unique(cohort.center):
      rows = cohort.center == center
      part = rad.loc[rows]
      rad.loc[rows] = (part - part.mean()) / part.std(ddof=0).where(lambda v: v > 1e-12, 1.0)
    return rad
  return cohort.radiomics


def wsi_mean_embeddings(
  store_dir: str | Path,
  patient_ids: Sequence[str],
  rows: Mapping[str, np.ndarray] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
  """(means (P, D) float64, patch counts (P,)): patches averaged over all of a patient's
  slides, read one slide at a time so memory stays at one slide. `rows`: slide_id -> the rows
  to average (e.g. a synthetic store's key patches); slides not in it are left out."""
  root = Path(store_dir)
  dim = int(store_lib.read_store_json(root).get('encoder', {}).get('dim', store_lib.WSI_DIM))
  index = {str(p): i for i, p in enumerate(patient_ids)}
  sums = np.zeros((len(index), dim))
  counts = np.zeros(len(index), np.int64)
  for path in store_lib.slide_files(root):
    bag = store_lib.read_slide(path, expected_dim=dim)
    i = index.get(bag.patient_id)
    if i is None:
      continue
    emb = bag.embeddings
    if rows is not None:
      emb = emb[rows.get(bag.slide_id, np.zeros(0, np.int64))]
    sums[i] += emb.astype(np.float64).sum(0)
    counts[i] += len(emb)
  return sums / np.maximum(counts, 1)[:, None], counts


def wsi_matrix(
  means: np.ndarray, has: np.ndarray, train: np.ndarray, *, components: int = WSI_COMPONENTS
) -> np.ndarray:
  """Mean embeddings z-scored on training patients with slides, then projected on the first
  `components` principal components of those patients (unit variance each).

  With 1024 inputs and ~100-300 training patients the Cox model is far from identifiable
  (p >> events), each Newton step solves a 1024 x 1024 system and CV needs ~50 fits: on a
  404-patient synthetic store the 1024-d fits took 22 s against 0.3 s, for no better
  external AUC or C-index (0.72 / 0.63 against 0.74 / 0.63). Rows without slides are 0 (the
  training mean).
  """
  from sklearn.decomposition import PCA

  if not has.any():
    raise BaselineSkipped('the store has no slides')
  rows = train & has
  if rows.sum() < 3:
    raise BaselineSkipped(f'{int(rows.sum())} training patients with slides: too few')
  mean, sd = means[rows].mean(0), means[rows].std(0)
  z = (means - mean) / np.where(sd > 1e-12, sd, 1.0)
  k = int(min(components, rows.sum() - 1, z.shape[1]))
  pca = PCA(n_components=k, svd_solver='full', whiten=True).fit(z[rows])
  x = pca.transform(z)
  x[~has] = 0.0
  return x


def prototype_bags(root: Path, patient_ids: Sequence[str]) -> list:
  """Each patient's patch embeddings (`prototypes.bags_of`), in `patient_ids` order."""
  from moemil_jax import prototypes

  cohort = store_reader.load_store(root)
  return prototypes.bags_of(
    cohort, pd.Index(cohort.patient_id).get_indexer(pd.Index(patient_ids).astype(str))
  )


def wsi_prototype_matrix(
  root: Path,
  patient_ids: Sequence[str],
  train: np.ndarray,
  *,
  data_config: Mapping[str, Any] | None = None,
  seed: int = 0,
  bags: list | None = None,
) -> tuple[np.ndarray, np.ndarray]:
  """(x, has): prototype slide vectors (`prototypes.fit` on the `train` rows' bags only, as
  the deep model's preprocessing does); rows without slides are 0 (the training mean).
  `bags`: `prototype_bags(root, patient_ids)`, when already read."""
  from moemil_jax import prototypes

  bags = prototype_bags(root, patient_ids) if bags is None else bags
  has = np.array([len(b) > 0 for b in bags])
  if not has.any():
    raise BaselineSkipped('the store has no slides')
  dc = dict(data_config or {})
  fitted = prototypes.fit(
    bags,
    train,
    types=int(dc.get('slide_prototypes') or 16),
    components=int(dc.get('prototype_components', 4)),
    seed=seed,
  )
  if fitted is None:
    raise BaselineSkipped(f'{int((train & has).sum())} training patients with slides: too few')
  return fitted.transform(bags).astype(np.float64), has


def key_patch_oracle(store_dir, split_of: pd.Series, key_patches) -> pd.DataFrame:
  """A synthetic store's key-patch oracle: the mean of each patient's true key patches
  (`truth_key_patches.parquet`: slide_id, row), standardised and reduced as `wsi_matrix`
  does, then the penalised logistic and Cox models of the other baselines, fitted on the
  training patients: the best an instance-level reader of these embeddings can do."""
  root = Path(store_dir)
  keys = pd.read_parquet(key_patches).groupby('slide_id')['row'].apply(np.asarray).to_dict()
  clinical = pd.read_parquet(root / store_lib.CLINICAL)
  clinical['patient_id'] = clinical['patient_id'].astype(str)
  split_of = split_of.copy()
  split_of.index = split_of.index.astype(str)
  df = _patients(clinical, split_of, ())
  means, counts = wsi_mean_embeddings(root, df['patient_id'], rows=keys)
  has = counts > 0
  x = wsi_matrix(means, has, (df['split'] == 'train').to_numpy())
  return _linear_predictions(df, 'key_patch_oracle', x, has, seed=0)


# --------------------------------------------------------------------------- all baselines


def baseline_predictions(
  store_dir: str | Path,
  split_of: pd.Series,
  *,
  names: Sequence[str] = ALL_BASELINES,
  notes: list[str] | None = None,
  data_config: Mapping[str, Any] | None = None,
  seed: int = 0,
  folds: pd.Series | None = None,
) -> dict[str, pd.DataFrame]:
  """{name: predictions} for each baseline in `names` that could be fitted.

  `folds`: patient_id -> development fold (the primary model's `oof_fold`): each baseline is
  also refitted once per fold on the training patients outside it, exactly as it is fitted on
  all of them (CV, preprocessing and all), and its predictions for the held-out fold become
  its `oof_response_logit` / `oof_log_risk`, so its thresholds are fixed out of fold too.

  `split_of`: patient_id -> split, from the primary model's predictions (so every row of the
  comparison uses the same patients in the same splits). A baseline that cannot be fitted is
  left out and a line saying why is logged and appended to `notes`. `data_config`: the
  primary model's `config.data` (run.json), so radiomics are preprocessed as that model's were.
  """
  from threadpoolctl import threadpool_limits  # a scikit-learn dependency

  unknown = sorted(set(names) - set(BASELINES))
  if unknown:
    raise ValueError(f'unknown baselines {unknown}; choose from {BASELINES}')
  notes = [] if notes is None else notes
  split_of = split_of.copy()
  split_of.index = split_of.index.astype(str)
  # Hundreds of small solves: one BLAS thread each is faster, and far faster on a busy machine.
  reads: dict = {}  # the slides' reads do not depend on the split: once for every fold
  with threadpool_limits(limits=1):
    out = _baseline_predictions(Path(store_dir), split_of, names, notes, data_config, seed, reads)
    if folds is not None and out:
      _add_out_of_fold(out, Path(store_dir), split_of, folds, notes, data_config, seed, reads)
  return out


def _add_out_of_fold(
  out: dict[str, pd.DataFrame],
  root: Path,
  split_of: pd.Series,
  folds: pd.Series,
  notes: list[str],
  data_config: Mapping[str, Any] | None,
  seed: int,
  reads: dict,
) -> None:
  """Adds oof_response_logit, oof_log_risk and oof_fold to each frame of `out` (in place):
  per fold, the baselines refitted with that fold's patients moved out of training."""
  folds = folds.copy()
  folds.index = folds.index.astype(str)
  folds = folds[folds.index.isin(split_of.index[split_of == 'train'])]
  logits: dict[str, list[pd.Series]] = {name: [] for name in out}
  risks: dict[str, list[pd.Series]] = {name: [] for name in out}
  failed: dict[str, str] = {}
  for fold in sorted(folds.unique()):
    held = folds.index[folds == fold]
    split_f = split_of.copy()
    split_f[split_f.index.isin(held)] = 'val'
    fold_notes: list[str] = []
    names = [n for n in out if n not in failed]
    got = _baseline_predictions(root, split_f, names, fold_notes, data_config, seed, reads)
    for name in names:
      if name not in got:
        failed[name] = f'fold {fold}: ' + '; '.join(n for n in fold_notes if label(name) in n)
        continue
      g = got[name].set_index('patient_id')
      g = g[g.index.isin(held)]
      logits[name].append(g['response_logit'].astype(float))
      risks[name].append(g['log_risk'].astype(float))
  for name, df in out.items():
    if name in failed:
      notes.append(f'{label(name)}: no out-of-fold predictions ({failed[name]})')
      logging.warning('%s', notes[-1])
      continue
    ids = df['patient_id'].astype(str)
    df['oof_response_logit'] = pd.concat(logits[name]).reindex(ids).to_numpy(float)
    df['oof_log_risk'] = pd.concat(risks[name]).reindex(ids).to_numpy(float)
    df['oof_fold'] = folds.reindex(ids).fillna(-1).astype(int).to_numpy()


def _baseline_predictions(
  root: Path,
  split_of: pd.Series,
  names: Sequence[str],
  notes: list[str],
  data_config: Mapping[str, Any] | None,
  seed: int,
  reads: dict | None = None,
) -> dict[str, pd.DataFrame]:
  """baseline_predictions without the thread limit; the store is read once for all baselines
  (and, with `reads` kept between calls, the slides once for all folds)."""
  reads = {} if reads is None else reads

  def skip(name: str, reason: str) -> None:
    notes.append(f'{label(name)} skipped: {reason}')
    logging.warning('%s', notes[-1])

  def read(key, fn, *args):
    if (key, *args) not in reads:
      reads[(key, *args)] = fn(root, *args)
    return reads[(key, *args)]

  clinical_path = root / store_lib.CLINICAL
  if not clinical_path.exists():
    for name in names:
      skip(name, f'{clinical_path} not found')
    return {}
  clinical = pd.read_parquet(clinical_path)
  clinical['patient_id'] = clinical['patient_id'].astype(str)
  out: dict[str, pd.DataFrame] = {}
  clinical_only = {'tnm': tnm_predictions, 'tnm_ebv': tnm_ebv_predictions}
  for name in [n for n in names if n in clinical_only]:  # clinical.parquet is all they need
    try:
      out[name] = clinical_only[name](clinical, split_of)
    except _UNFITTABLE as e:
      skip(name, str(e))
  rest = [n for n in names if n not in clinical_only]
  if not rest:
    return out
  try:
    # Validates STORE.json and the clinical table, reads radiomics; the bags are read slide by
    # slide below, so none is read here.
    cohort = store_reader.load_store(root, bags_to_read=lambda c: np.zeros(len(c), bool))
  except _UNFITTABLE as e:
    for name in rest:
      skip(name, f'{root} is not a readable feature store ({e})')
    return out
  df = _patients(clinical, split_of, ())
  rows = pd.Index(cohort.patient_id).get_indexer(df['patient_id'])
  train_all = pd.Series(cohort.patient_id).map(split_of).eq('train').to_numpy()
  train = (df['split'] == 'train').to_numpy()
  for name in rest:
    try:
      if name == 'radiomics_linear':
        # Same rows and response as training: the whole store, training patients by split.
        x, has = radiomics_matrix(
          harmonised_radiomics(cohort, data_config),
          train_all,
          cohort.response,
          data_config=data_config,
          seed=seed,
          os_months=cohort.os_months,
          os_event=cohort.os_event,
        )
        x, has = x[rows], has[rows]
      elif name == 'wsi_prototypes':
        x, has = wsi_prototype_matrix(
          root,
          df['patient_id'],
          train,
          data_config=data_config,
          seed=seed,
          bags=read('bags', prototype_bags, tuple(df['patient_id'])),
        )
      else:
        means, counts = read('means', wsi_mean_embeddings, tuple(df['patient_id']))
        has = counts > 0
        x = wsi_matrix(means, has, train)
      out[name] = _linear_predictions(df, name, x, has, seed=seed)
    except _UNFITTABLE as e:
      skip(name, str(e))
  return out
