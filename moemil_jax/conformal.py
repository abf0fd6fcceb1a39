"""Class-conditional (Mondrian) split-conformal prediction sets for the IC response.

Nonconformity of label c for a patient with predicted response probability p: 1 - p_c
(p_1 = p, p_0 = 1 - p). For each class, the calibration patients of that class give the
p-value of a candidate label, p_c = (#{calibration scores of class c >= score} + 1) /
(n_c + 1), and the set holds every label with p_c > 1 - level (crepes' non-smoothed
Mondrian p-values with the labels as bins). Conditional on the true class, a patient
exchangeable with the calibration patients of that class is covered with probability at
least `level`; responders and non-responders are each covered, not only on average.

Sets: {responder}, {non-responder}, {both} = 'uncertain' (the model cannot tell them apart
at this level: refer), or, rarely, 'empty' (neither label is plausible: an atypical patient).

Calibration: an ensemble's out-of-fold response probabilities of the labelled development
patients (each predicted by members that did not train on it), else a single model's
validation split. The development coverage is cross-conformal: a patient of fold k is scored
by sets calibrated on the other folds only (leave-one-out for runs without `oof_fold`);
coverage on the calibration patients themselves would prove nothing.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd

LEVEL = 0.9
LABELS = ('non-responder', 'responder')
SET_NAMES = {(True, False): 'non-responder', (False, True): 'responder'}
MIN_PER_CLASS = 5  # fewer calibration patients in a class: no sets


def scores(prob: np.ndarray, label: np.ndarray | int) -> np.ndarray:
  """1 - the predicted probability of `label` (1 = responder)."""
  prob = np.asarray(prob, np.float64)
  return np.where(np.asarray(label) == 1, 1.0 - prob, prob)


class Mondrian:
  """Per-class calibration scores; p-values and prediction sets of new probabilities."""

  def __init__(self, prob: np.ndarray, label: np.ndarray):
    prob, label = np.asarray(prob, np.float64), np.asarray(label).astype(int)
    self.calibration = {c: np.sort(scores(prob[label == c], c)) for c in (0, 1)}
    small = [LABELS[c] for c in (0, 1) if len(self.calibration[c]) < MIN_PER_CLASS]
    if small:
      raise ValueError(
        f'{len(self.calibration[0])} non-responders and {len(self.calibration[1])} responders '
        f'to calibrate the response sets: at least {MIN_PER_CLASS} of each are needed'
      )

  def p_values(self, prob: np.ndarray) -> np.ndarray:
    """(n, 2) p-values of non-responder and responder."""
    prob = np.asarray(prob, np.float64)
    out = np.empty((len(prob), 2))
    for c in (0, 1):
      cal = self.calibration[c]
      s = scores(prob, c)
      at_least = len(cal) - np.searchsorted(cal, s, side='left')
      out[:, c] = (at_least + 1) / (len(cal) + 1)
    return out

  def predict_set(self, prob: np.ndarray, level: float = LEVEL) -> np.ndarray:
    """(n, 2) bool: whether non-responder / responder is in each patient's set."""
    if not 0 < level < 1:
      raise ValueError(f'conformal level {level}: use a value between 0 and 1, e.g. 0.9')
    return self.p_values(prob) > 1.0 - level

  def to_json(self) -> dict[str, Any]:
    return {LABELS[c]: [float(x) for x in self.calibration[c]] for c in (0, 1)}

  @classmethod
  def from_json(cls, d: dict[str, Any]) -> Mondrian:
    self = cls.__new__(cls)
    self.calibration = {c: np.sort(np.asarray(d[LABELS[c]], np.float64)) for c in (0, 1)}
    return self


def set_names(sets: np.ndarray) -> np.ndarray:
  """'responder', 'non-responder', 'uncertain' (both) or 'empty' per row of (n, 2) sets."""
  sets = np.asarray(sets, bool)
  return np.where(
    sets.all(1),
    'uncertain',
    np.where(sets[:, 1], 'responder', np.where(sets[:, 0], 'non-responder', 'empty')),
  )


def calibration_rows(frame: pd.DataFrame) -> tuple[np.ndarray, np.ndarray, np.ndarray, str]:
  """(probabilities, labels, folds or None, source) of the calibration patients: labelled
  development patients' out-of-fold predictions when the run has them, else validation."""
  lab = frame['ic_response'].notna()
  if 'oof_response_logit' in frame and frame['oof_response_logit'].notna().any():
    part = frame[lab & frame['oof_response_logit'].notna()]
    prob = 1.0 / (1.0 + np.exp(-part['oof_response_logit'].to_numpy(np.float64)))
    folds = part['oof_fold'].to_numpy() if 'oof_fold' in part else None
    return prob, part['ic_response'].to_numpy(int), folds, 'out_of_fold'
  part = frame[lab & (frame['split'] == 'val')]
  return part['response_prob'].to_numpy(np.float64), part['ic_response'].to_numpy(int), None, 'val'


def fit_frame(frame: pd.DataFrame) -> tuple[Mondrian, str]:
  prob, y, _, source = calibration_rows(frame)
  return Mondrian(prob, y), source


def cross_conformal(prob, label, folds, level: float = LEVEL) -> np.ndarray:
  """(n, 2) sets, each patient's from a calibration on the other folds only."""
  prob, label, folds = np.asarray(prob), np.asarray(label).astype(int), np.asarray(folds)
  sets = np.zeros((len(prob), 2), bool)
  for k in np.unique(folds):
    m = folds == k
    sets[m] = Mondrian(prob[~m], label[~m]).predict_set(prob[m], level)
  return sets


def set_summary(sets: np.ndarray, label: np.ndarray | None) -> dict[str, Any]:
  """Coverage (overall and per true class), mean set size and the share of each set."""
  sets = np.asarray(sets, bool)
  names = set_names(sets)
  out: dict[str, Any] = {'n': len(sets), 'mean_set_size': float(sets.sum(1).mean())}
  for name in ('responder', 'non-responder', 'uncertain', 'empty'):
    out[f'share_{name}'] = float((names == name).mean())
  if label is not None:
    label = np.asarray(label).astype(int)
    covered = sets[np.arange(len(sets)), label]
    out['coverage'] = float(covered.mean())
    for c in (0, 1):
      if (label == c).any():
        out[f'coverage_{LABELS[c]}'] = float(covered[label == c].mean())
  return out


def evaluate(frame: pd.DataFrame, level: float = LEVEL) -> dict[str, Any]:
  """Coverage and set sizes per split and per center. Development ('train' for an ensemble):
  cross-conformal over the folds on out-of-fold predictions; the other splits: sets
  calibrated on all calibration patients, applied to the model's predictions."""
  prob, y, folds, source = calibration_rows(frame)
  try:
    mondrian = Mondrian(prob, y)
  except ValueError as e:
    return {'undefined': str(e)}
  out: dict[str, Any] = {'level': level, 'calibrated_on': source, 'per_split': {}}
  out['per_center'] = {}
  lab = frame['ic_response'].notna()
  rows = []
  if source == 'out_of_fold':
    part = frame[lab & frame['oof_response_logit'].notna()]
    how = 'cross-conformal'
    if folds is None or len(np.unique(folds)) < 2:  # runs from before oof_fold: leave one out
      folds, how = np.arange(len(prob)), 'leave-one-out conformal'
    rows.append(('train', part, cross_conformal(prob, y, folds, level), how))
  for split in ('train', 'val', 'test'):
    if (rows and split == 'train') or (split == 'val' and source == 'val'):
      continue  # already scored out of fold, or the calibration set itself
    part = frame[lab & (frame['split'] == split)]
    if len(part):
      sets = mondrian.predict_set(part['response_prob'].to_numpy(np.float64), level)
      rows.append((split, part, sets, 'split-conformal'))
  for split, part, sets, how in rows:
    label = part['ic_response'].to_numpy(int)
    out['per_split'][split] = {'method': how, **set_summary(sets, label)}
    for center in sorted(part['center'].astype(str).unique()):
      m = (part['center'].astype(str) == center).to_numpy()
      out['per_center'][f'{center} ({split})'] = {'method': how, **set_summary(sets[m], label[m])}
  return out


def summary_table(results: dict[str, Any], key: str = 'per_split') -> pd.DataFrame:
  rows = []
  for name, r in results.get(key, {}).items():
    rows.append(
      {
        key.removeprefix('per_'): name,
        'method': r['method'],
        'n': r['n'],
        'coverage': round(r['coverage'], 3),
        'coverage responders': _r(r.get('coverage_responder')),
        'coverage non-responders': _r(r.get('coverage_non-responder')),
        'mean set size': round(r['mean_set_size'], 3),
        'uncertain': round(r['share_uncertain'], 3),
        'empty': round(r['share_empty'], 3),
      }
    )
  return pd.DataFrame(rows)


def _r(x):
  return None if x is None else round(float(x), 3)
