"""Each prediction with its uncertainty: the columns `predict` adds from the bundle.

From the bundle's `uncertainty` entry (`bundle.uncertainty`, fitted at training time):

  os_prob_<h>m            OS probability at h months: exp(-H0(h) exp(log_risk)) with the
                          Breslow baseline H0 of the development patients' (out-of-fold)
                          log-risks; NaN beyond the development follow-up.
  os_prob_<h>m_lo/_hi     the lowest and highest of the members' own OS probabilities (each
                          member's log-risk): the ensemble's spread, equal to the point for one
                          member.
  response_prob_lo/_hi    the members' lowest and highest response probability.
  response_set            the class-conditional conformal prediction set at response_set_level:
                          'responder', 'non-responder', 'uncertain' (both: refer) or 'empty'.
  p_responder,            the conformal p-values behind the set (a label is in the set when its
  p_non_responder         p-value exceeds 1 - level).

A spread wider than `Options.spread_warning` (in probability) of the response or of the OS
probability at `Options.spread_horizon` adds a warning: the members disagree about this
patient. Bundles written before these entries existed give empty columns and one note.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import numpy as np
import pandas as pd

from moemil_jax import conformal, survival_probability


@dataclasses.dataclass
class Options:
  horizons: Sequence[float] = survival_probability.HORIZONS_MONTHS
  level: float = conformal.LEVEL
  spread_warning: float = 0.2  # members' max - min probability that adds a warning
  spread_horizon: float = 36.0  # the OS horizon whose spread is checked


@dataclasses.dataclass(eq=False)  # compared by identity: pandas compares attrs on concat
class Extras:
  """What a predictions table keeps in attrs['uncertainty'] for its curves and cards."""

  patient_id: np.ndarray  # (P,) the rows member_log_risk belongs to
  member_log_risk: np.ndarray  # (M, P)
  baseline: survival_probability.Baseline | None
  notes: list[str]


def extras(frame: pd.DataFrame) -> Extras | None:
  return frame.attrs.get('uncertainty')


def horizon_column(h: float) -> str:
  return f'os_prob_{h:g}m'


def baseline(meta: dict[str, Any]) -> survival_probability.Baseline | None:
  entry = meta.get('uncertainty', {}).get('survival')
  return survival_probability.Baseline.from_json(entry) if entry else None


def calibration(meta: dict[str, Any]) -> conformal.Mondrian | None:
  entry = meta.get('uncertainty', {}).get('conformal')
  return conformal.Mondrian.from_json(entry['scores']) if entry else None


def add_columns(
  frame: pd.DataFrame,
  meta: dict[str, Any],
  member_logits: np.ndarray,
  member_risks: np.ndarray,
  options: Options | None = None,
) -> pd.DataFrame:
  """`frame` (one row per patient, from predict) with the uncertainty columns; the members'
  log-risks and the baseline are kept in frame.attrs['uncertainty'] for curves and cards."""
  options = options or Options()
  frame = frame.copy()
  notes = []
  member_prob = 1.0 / (1.0 + np.exp(-np.asarray(member_logits, np.float64)))
  frame['response_prob_lo'] = member_prob.min(0)
  frame['response_prob_hi'] = member_prob.max(0)
  prob = frame['response_prob'].to_numpy(np.float64)
  mondrian = calibration(meta)
  if mondrian is None:
    notes.append(_missing(meta, 'conformal', 'no response sets'))
    frame['response_set'] = ''
    frame['response_set_level'] = np.nan
    frame['p_responder'] = frame['p_non_responder'] = np.nan
  else:
    frame['response_set'] = conformal.set_names(mondrian.predict_set(prob, options.level))
    frame['response_set_level'] = float(options.level)
    p = mondrian.p_values(prob)
    frame['p_responder'], frame['p_non_responder'] = p[:, 1], p[:, 0]
  base = baseline(meta)
  risk = frame['log_risk'].to_numpy(np.float64)
  members_s = None
  if base is None:
    notes.append(_missing(meta, 'survival', 'no OS probabilities'))
    for h in options.horizons:
      for suffix in ('', '_lo', '_hi'):
        frame[horizon_column(h) + suffix] = np.nan
  else:
    horizons = np.asarray(options.horizons, np.float64)
    point = base.survival(risk, horizons)
    members_s = base.survival(np.asarray(member_risks, np.float64), horizons)  # (M, P, H)
    for j, h in enumerate(horizons):
      frame[horizon_column(h)] = point[:, j]
      frame[horizon_column(h) + '_lo'] = members_s[:, :, j].min(0)
      frame[horizon_column(h) + '_hi'] = members_s[:, :, j].max(0)
    beyond = [h for h in horizons if h > base.max_time]
    if beyond:
      notes.append(
        f'OS probability at {", ".join(f"{h:g}" for h in beyond)} months not estimated: the '
        f'development follow-up ends at {base.max_time:.1f} months'
      )
  if len(member_prob) > 1:
    frame['warnings'] = _spread_warnings(frame, base, member_risks, options)
  frame.attrs['uncertainty'] = Extras(
    frame['patient_id'].to_numpy(), np.asarray(member_risks, np.float64), base, notes
  )
  return frame


def _missing(meta, key, what) -> str:
  reason = meta.get('uncertainty', {}).get(f'{key}_undefined')
  return f'{what}: ' + (reason or 'the bundle predates them (retrain to add them)')


def _spread_warnings(frame, base, member_risks, options) -> list[str]:
  width = (frame['response_prob_hi'] - frame['response_prob_lo']).to_numpy()
  os_lo = os_hi = None
  if base is not None and options.spread_horizon <= base.max_time:
    s = base.survival(np.asarray(member_risks, np.float64), [options.spread_horizon])[..., 0]
    os_lo, os_hi = s.min(0), s.max(0)
  out = []
  for i, existing in enumerate(frame['warnings']):
    notes = [existing] if existing else []
    if width[i] > options.spread_warning:
      notes.append(
        f'members disagree on the response probability ({frame.response_prob_lo.iloc[i]:.2f}'
        f'-{frame.response_prob_hi.iloc[i]:.2f})'
      )
    if os_lo is not None and os_hi[i] - os_lo[i] > options.spread_warning:
      notes.append(
        f'members disagree on the {options.spread_horizon:g}-month OS probability '
        f'({os_lo[i]:.2f}-{os_hi[i]:.2f})'
      )
    out.append('; '.join(notes))
  return out


def curves(frame: pd.DataFrame, step: float = 1.0) -> pd.DataFrame:
  """The whole OS curve of every patient, long format: patient_id, month, os_prob (at the
  ensemble's log-risk), os_prob_lo/_hi (the members' spread), population (the development
  Kaplan-Meier curve); months 0 to the development follow-up, every `step`."""
  ex = extras(frame)
  base = ex.baseline if ex else None
  if base is None:
    return pd.DataFrame(
      columns=['patient_id', 'month', 'os_prob', 'os_prob_lo', 'os_prob_hi', 'population']
    )
  grid = np.arange(0.0, base.max_time + 1e-9, step)
  point = base.survival(frame['log_risk'].to_numpy(np.float64), grid)  # (P, T)
  index = {p: i for i, p in enumerate(ex.patient_id)}  # the table may be a subset of rows
  rows = np.array([index[p] for p in frame['patient_id']], np.int64)
  members = base.survival(ex.member_log_risk[:, rows], grid)  # (M, P, T)
  n, t = point.shape
  return pd.DataFrame(
    {
      'patient_id': np.repeat(frame['patient_id'].to_numpy(), t),
      'month': np.tile(grid, n),
      'os_prob': point.ravel(),
      'os_prob_lo': members.min(0).ravel(),
      'os_prob_hi': members.max(0).ravel(),
      'population': np.tile(base.population(grid), n),
    }
  )
