"""The generative model behind the synthetic NPC cohort, shared by both renderers.

One latent per patient (tumour aggressiveness) drives IC response, survival and
what each modality shows. Every modality sees the latent through its own noisy
channel whose strength is a knob, so a cohort can be made where MRI, WSI or
TNM carry more or less signal. `truth.csv` records the latent, the true
response probability and the true log-hazard: the oracle no model can beat.
`synthetic_cohort` renders patients as slides, MRI volumes and a manifest;
`synthetic_store` renders them directly as a feature store.

The default knobs give the clean cohort the project started with (one latent, each view at
correlation 0.85). `two_factor` and the knobs after it make a cohort that looks like a real
study: the MRI sees tumour burden, the slide sees tumour biology, response needs both (with an
interaction), the hazard is nonlinear, labels are noisy and the external center differs in
prevalence. They are drawn from their own random stream, so the clean cohort is unchanged.
`truth.csv` then also holds the posterior-mean ceiling: the best prediction the two views
allow (`ceiling_response_prob`, `ceiling_log_hazard`), and what each view allows alone
(`ceiling_wsi_*`: the slides only; `ceiling_mri_*`: the MRI only).
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pandas as pd


@dataclasses.dataclass(frozen=True)
class Knobs:
  """What a synthetic cohort looks like; defaults give an oracle AUC near 0.9."""

  response_strength: float = 2.5  # logit slope of response on the latent
  response_intercept: float = 0.8  # about 65% good responders, as in IC cohorts
  hazard_strength: float = 1.0  # log-hazard slope on the latent
  median_os_months: float = 60.0  # baseline median overall survival
  censoring_rate: float = 0.6  # target fraction censored
  max_follow_up_months: float = 120.0
  wsi_signal: float = 0.85  # correlation of the slides' view with the latent
  mri_signal: float = 0.85  # ... of the MRI view
  tnm_signal: float = 0.35  # ... in T and N stage (weak, as in the paper)
  center_b_fraction: float = 0.3  # external test hospital (each patient drawn at this rate)
  center_b_patients: int | None = None  # exactly this many from center B (overrides the rate)
  missing_wsi_rate: float = 0.05
  missing_mri_rate: float = 0.05
  missing_response_rate: float = 0.05
  center_shift: float = 1.0  # appearance shift of center B (0 = none)
  # Rendered slides (synthetic_cohort): blue-channel shift of the nuclei per tanh(WSI view),
  # a patient signal in nuclear hue beside density and size (0: morphology alone).
  nuclear_hue: float = 15.0
  # Realistic-cohort knobs (off by default: the clean cohort).
  two_factor: bool = False  # MRI sees burden u, slides see biology v; outcomes need both
  response_interaction: float = 0.0  # logit term in u * v
  hazard_curvature: float = 0.0  # log-hazard term in max(latent, 0)^2
  label_noise: float = 0.0  # fraction of response labels flipped
  center_b_response_shift: float = 0.0  # logit shift of response prevalence in center B


def _noisy_view(rng: np.random.Generator, latent: np.ndarray, signal: float) -> np.ndarray:
  """A unit-variance view of the latent whose correlation with it is `signal` (clipped to 1)."""
  rho = float(np.clip(signal, 0.0, 1.0))
  return rho * latent + np.sqrt(1.0 - rho**2) * rng.standard_normal(latent.shape)


def _stage(view: np.ndarray, cuts: tuple[float, ...], offset: int) -> np.ndarray:
  return (np.searchsorted(np.asarray(cuts), view) + offset).astype(np.int64)


def _overall_stage(t: np.ndarray, n: np.ndarray) -> np.ndarray:
  """AJCC 8th edition nasopharynx, M0: T4 or N3 -> IVA, T3 or N2 -> III, else II (or I)."""
  stage = np.full(t.shape, 'II', dtype=object)
  stage[(t == 1) & (n == 0)] = 'I'
  stage[(t == 3) | (n == 2)] = 'III'
  stage[(t == 4) | (n == 3)] = 'IVA'
  return stage


def _censoring_scale(
  rng: np.random.Generator, times: np.ndarray, rate: float, max_fu: float
) -> np.ndarray:
  """Censoring times: uniform accrual over a follow-up window tuned to hit `rate`."""
  u = rng.random(times.shape)
  if rate <= 0:
    return np.full(times.shape, np.inf)
  lo, hi = 1e-3, 1e4
  for _ in range(60):  # bisection on the window length
    mid = np.sqrt(lo * hi)
    frac = np.mean(np.minimum(u * mid, max_fu) < times)
    lo, hi = (mid, hi) if frac > rate else (lo, mid)
  return np.minimum(u * np.sqrt(lo * hi), max_fu)


def sample_patients(patients: int, seed: int, knobs: Knobs = Knobs()) -> pd.DataFrame:
  """One row per patient: clinical columns, labels, truth, modality views and availability."""
  if patients < 4:
    raise ValueError(f'patients must be at least 4, got {patients}')
  rng = np.random.default_rng(seed)
  n = patients
  latent = rng.standard_normal(n)
  center = _centers(rng.random(n), knobs)

  response_logit = knobs.response_intercept - knobs.response_strength * latent
  response_prob = 1.0 / (1.0 + np.exp(-response_logit))
  ic_response = (rng.random(n) < response_prob).astype(float)
  ic_response[rng.random(n) < knobs.missing_response_rate] = np.nan

  tnm_view = _noisy_view(rng, latent, knobs.tnm_signal)
  t_stage = _stage(tnm_view + 0.3 * rng.standard_normal(n), (-0.9, 0.0, 0.8), 1)
  n_stage = _stage(_noisy_view(rng, tnm_view, 0.8), (-1.2, -0.2, 0.9), 0)
  # LANPC: stage III-IVA only, as in the MoEMIL cohort.
  t_stage = np.where((t_stage < 3) & (n_stage < 2), 3, t_stage)

  log_hazard = knobs.hazard_strength * latent
  baseline = np.log(2.0) / knobs.median_os_months
  event_time = rng.exponential(1.0 / (baseline * np.exp(log_hazard)))
  censor_time = _censoring_scale(rng, event_time, knobs.censoring_rate, knobs.max_follow_up_months)
  os_months = np.maximum(np.minimum(event_time, censor_time), 0.5)
  os_event = (event_time <= censor_time).astype(np.int64)

  wsi_latent = mri_latent = latent
  if knobs.two_factor:
    extra = np.random.default_rng([seed, 7])  # its own stream: the clean draws stay as they were
    burden, biology = latent, extra.standard_normal(n)
    latent = (burden + biology) / np.sqrt(2.0)
    mri_latent, wsi_latent = burden, biology
    response_logit = _response_logit(knobs, latent, burden, biology, center == 'B')
    response_prob = 1.0 / (1.0 + np.exp(-response_logit))
    ic_response = (extra.random(n) < response_prob).astype(float)
    flip = extra.random(n) < knobs.label_noise
    ic_response[flip] = 1.0 - ic_response[flip]
    ic_response[extra.random(n) < knobs.missing_response_rate] = np.nan
    tnm_view = _noisy_view(extra, burden, knobs.tnm_signal)
    t_stage = _stage(tnm_view + 0.3 * extra.standard_normal(n), (-0.9, 0.0, 0.8), 1)
    n_stage = _stage(_noisy_view(extra, tnm_view, 0.8), (-1.2, -0.2, 0.9), 0)
    t_stage = np.where((t_stage < 3) & (n_stage < 2), 3, t_stage)
    log_hazard = _log_hazard(knobs, latent)
    event_time = extra.exponential(1.0 / (baseline * np.exp(log_hazard)))
    censor_time = _censoring_scale(
      extra, event_time, knobs.censoring_rate, knobs.max_follow_up_months
    )
    os_months = np.maximum(np.minimum(event_time, censor_time), 0.5)
    os_event = (event_time <= censor_time).astype(np.int64)

  width = len(str(n))
  frame = pd.DataFrame(
    {
      'patient_id': [f'NPC{i + 1:0{max(width, 3)}d}' for i in range(n)],
      'center': center,
      'age': np.clip(rng.normal(46, 10, n), 18, 80).round().astype(np.int64),
      'sex': np.where(rng.random(n) < 0.75, 'M', 'F'),
      'ebv_dna': np.round(np.exp(rng.normal(7.0 + 0.8 * tnm_view, 1.5)), 1),
      't_stage': t_stage,
      'n_stage': n_stage,
      'overall_stage': _overall_stage(t_stage, n_stage),
      'ic_response': ic_response,
      'os_months': np.round(os_months, 2),
      'os_event': os_event,
      # Truth and rendering inputs; never written to the manifest or the store.
      'latent': latent,
      'response_prob': response_prob,
      'log_hazard': log_hazard,
      'wsi_view': _noisy_view(rng, wsi_latent, knobs.wsi_signal),
      'mri_view': _noisy_view(rng, mri_latent, knobs.mri_signal),
      'has_wsi': rng.random(n) >= knobs.missing_wsi_rate,
      'has_mri': rng.random(n) >= knobs.missing_mri_rate,
      'n_slides': np.where(rng.random(n) < 0.3, 2, 1),
      'render_seed': rng.integers(0, 2**31 - 1, n),
    }
  )
  prob, hazard = posterior_ceiling(frame, knobs)
  frame = frame.assign(ceiling_response_prob=prob, ceiling_log_hazard=hazard)
  for view, other in (('wsi', 'has_mri'), ('mri', 'has_wsi')):  # what one view alone allows
    prob, hazard = posterior_ceiling(frame.assign(**{other: False}), knobs)
    frame[f'ceiling_{view}_response_prob'] = prob
    frame[f'ceiling_{view}_log_hazard'] = hazard
  return frame


def _centers(u: np.ndarray, knobs: Knobs) -> np.ndarray:
  """'A' or 'B' per patient from one uniform draw each: B below `center_b_fraction`, or, with
  `center_b_patients` = k, the k patients with the lowest draws (the same random stream either
  way, so everything else about the cohort stays as it was)."""
  k = knobs.center_b_patients
  if k is None:
    return np.where(u < knobs.center_b_fraction, 'B', 'A')
  if not 0 <= k < len(u):
    raise ValueError(f'center_b_patients must be from 0 to patients - 1 ({len(u) - 1}), got {k}')
  center = np.full(len(u), 'A')
  center[np.argsort(u, kind='stable')[:k]] = 'B'
  return center


def _response_logit(knobs: Knobs, latent, burden, biology, center_b) -> np.ndarray:
  logit = knobs.response_intercept - knobs.response_strength * latent
  logit = logit - knobs.response_strength * knobs.response_interaction * burden * biology
  return logit + knobs.center_b_response_shift * center_b


def _log_hazard(knobs: Knobs, latent) -> np.ndarray:
  return knobs.hazard_strength * (latent + knobs.hazard_curvature * np.maximum(latent, 0.0) ** 2)


def posterior_ceiling(frame: pd.DataFrame, knobs: Knobs, nodes: int = 24):
  """E[response probability | views] and E[log-hazard | views]: what the images allow.

  Each view is rho * factor + sqrt(1 - rho^2) * noise, so given the views present for a
  patient each factor's posterior is Gaussian (one factor: both views inform it; two
  factors: each view informs its own). The expectation over that posterior is taken by
  Gauss-Hermite quadrature. Center B's prevalence shift is known to the ceiling.
  """
  gh_x, gh_w = np.polynomial.hermite_e.hermegauss(nodes)
  gh_w = gh_w / gh_w.sum()

  def posterior(views):
    """Mean and sd of a N(0, 1) factor given the (view, rho, present) it is seen through."""
    precision, weighted = np.ones(len(frame)), np.zeros(len(frame))
    for view, rho, present in views:
      rho = min(float(rho), 0.999)
      precision = precision + present * rho**2 / (1 - rho**2)
      weighted = weighted + present * rho * view / (1 - rho**2)
    return weighted / precision, 1.0 / np.sqrt(precision)

  mri = (frame['mri_view'].to_numpy(), knobs.mri_signal, frame['has_mri'].to_numpy(float))
  wsi = (frame['wsi_view'].to_numpy(), knobs.wsi_signal, frame['has_wsi'].to_numpy(float))
  center_b = (frame['center'] == 'B').to_numpy()
  if knobs.two_factor:
    (mu_u, sd_u), (mu_v, sd_v) = posterior([mri]), posterior([wsi])
  else:
    mu_u, sd_u = posterior([mri, wsi])
    mu_v, sd_v = np.zeros(len(frame)), np.zeros(len(frame))
  prob, hazard = np.zeros(len(frame)), np.zeros(len(frame))
  for xu, wu in zip(gh_x, gh_w):
    for xv, wv in zip(gh_x, gh_w):
      u, v = mu_u + sd_u * xu, mu_v + sd_v * xv
      latent = (u + v) / np.sqrt(2.0) if knobs.two_factor else u
      logit = (
        _response_logit(knobs, latent, u, v, center_b)
        if knobs.two_factor
        else (knobs.response_intercept - knobs.response_strength * latent)
      )
      prob += wu * wv / (1.0 + np.exp(-logit))
      hazard += wu * wv * _log_hazard(knobs, latent)
  return prob, hazard


TRUTH_COLUMNS = (
  'patient_id',
  'latent',
  'response_prob',
  'log_hazard',
  'ceiling_response_prob',
  'ceiling_log_hazard',
  'ceiling_wsi_response_prob',
  'ceiling_wsi_log_hazard',
  'ceiling_mri_response_prob',
  'ceiling_mri_log_hazard',
)


def write_truth(frame: pd.DataFrame, path) -> None:
  frame.loc[:, list(TRUTH_COLUMNS)].to_csv(path, index=False, float_format='%.6f')
