"""The cohort manifest (manifest.csv): read it, validate every row before any work.

A bad row must never cost a multi-hour extraction run, nor silently drop a
patient: every problem is reported with its CSV line (1-based, header = line 1)
and column, bad rows are skipped and the rest is processed.
"""

from __future__ import annotations

import csv
import dataclasses
import math
from pathlib import Path

import numpy as np
import pyarrow as pa

from feature_store import store

MANIFEST_COLUMNS = store.CLINICAL_COLUMNS + ('slides', 'mri_t1', 'mri_t2', 'mri_t1c', 'mri_mask')
MAX_MPP = 8.0  # um/px; above is no diagnostic scan (a magnification such as 20 or 40 typed in)
SEXES = ('M', 'F')
OVERALL_STAGES = ('I', 'II', 'III', 'IVA', 'IVB')
T_STAGES = (1, 2, 3, 4)
N_STAGES = (0, 1, 2, 3)


@dataclasses.dataclass(frozen=True)
class RowError:
  """One validation problem: where (line, column) and what."""

  line: int
  column: str
  message: str
  patient_id: str = ''

  def __str__(self) -> str:
    return f'line {self.line}, column {self.column!r}: {self.message}'


@dataclasses.dataclass(frozen=True)
class Slide:
  slide_id: str
  path: Path
  mpp: float | None = None  # the manifest's um/px for this slide; overrides the slide's own


@dataclasses.dataclass(frozen=True)
class Patient:
  """One valid manifest row: typed clinical values plus resolved absolute file paths."""

  line: int
  clinical: dict
  slides: tuple[Slide, ...]
  mri: dict  # sequence ("t1", "t2", "t1c") -> Path, only those given
  mri_mask: Path | None

  @property
  def patient_id(self) -> str:
    return self.clinical['patient_id']


@dataclasses.dataclass(frozen=True)
class Manifest:
  path: Path
  patients: tuple[Patient, ...]
  errors: tuple[RowError, ...]


class ManifestError(ValueError):
  """The manifest as a whole is unusable (unreadable, header wrong)."""


def _int_in(value: str, allowed: tuple[int, ...]) -> int:
  try:
    as_float = float(value)
  except ValueError:
    raise ValueError(f'{value!r} is not a number; expected one of {list(allowed)}') from None
  if not as_float.is_integer() or int(as_float) not in allowed:
    raise ValueError(f'{value!r} is not one of {list(allowed)}')
  return int(as_float)


def _float(value: str, *, positive: bool = False, non_negative: bool = False) -> float:
  try:
    x = float(value)
  except ValueError:
    raise ValueError(f'{value!r} is not a number') from None
  if not math.isfinite(x):
    raise ValueError(f'{value!r} is not finite')
  if positive and x <= 0:
    raise ValueError(f'{value!r} must be > 0')
  if non_negative and x < 0:
    raise ValueError(f'{value!r} must be >= 0')
  return x


def _mpp(value: str) -> float:
  x = _float(value, positive=True)
  if x > MAX_MPP:
    raise ValueError(
      f'{value!r} um/px is no slide scan: the mpp column is micrometres per pixel (about 0.25 '
      'for a 40x scan, 0.5 for 20x), not a magnification'
    )
  return x


def _slide_mpps(raw: str, n_slides: int) -> list[float | None]:
  """The `mpp` cell: empty, one value for every slide of the row, or one per slide (`;`,
  in the order of the `slides` column; an empty entry keeps that slide's own MPP)."""
  parts = [p.strip() for p in raw.split(';')] if raw.strip() else []
  if not parts:
    return [None] * n_slides
  if len(parts) == 1:
    return [_mpp(parts[0])] * n_slides
  if len(parts) != n_slides:
    raise ValueError(
      f'{len(parts)} values for {n_slides} slide(s): give one value for every slide of the '
      'row, or one per slide separated by ";" in the order of the slides column'
    )
  return [_mpp(p) if p else None for p in parts]


def _parse_clinical(
  row: dict[str, str], outcomes_required: bool = True
) -> tuple[dict, list[tuple[str, str]]]:
  """Typed clinical values and a list of (column, message) problems. Without
  `outcomes_required` (patients to be scored), OS may be empty too."""
  out: dict = {}
  problems: list[tuple[str, str]] = []

  def field(column: str, parse):
    raw = (row.get(column) or '').strip()
    try:
      out[column] = parse(raw)
    except ValueError as e:
      problems.append((column, str(e)))

  def patient_id(raw: str) -> str:
    if not raw:
      raise ValueError('empty patient_id')
    return store.validate_id(raw, what='patient_id')

  def choice(allowed):
    def parse(raw: str) -> str:
      if raw not in allowed:
        raise ValueError(f'{raw!r} is not one of {list(allowed)}')
      return raw

    return parse

  def optional_float(raw: str) -> float | None:
    return None if raw == '' else _float(raw, non_negative=True)

  def binary(optional: bool):
    def parse(raw: str) -> int | None:
      if raw == '' and optional:
        return None
      if raw not in ('0', '1', '0.0', '1.0'):
        allowed = '0, 1 or empty' if optional else '0 or 1'
        raise ValueError(f'{raw!r} is not {allowed}')
      return int(float(raw))

    return parse

  field('patient_id', patient_id)
  field('center', lambda raw: store.validate_id(raw, what='center'))
  field('age', optional_float)
  field('sex', choice(SEXES))
  field('ebv_dna', optional_float)
  field('t_stage', lambda raw: _int_in(raw, T_STAGES))
  field('n_stage', lambda raw: _int_in(raw, N_STAGES))
  field('overall_stage', choice(OVERALL_STAGES))
  field('ic_response', binary(optional=True))
  if outcomes_required:
    field('os_months', lambda raw: _float(raw, positive=True))
  else:
    field('os_months', lambda raw: None if raw == '' else _float(raw, positive=True))
  field('os_event', binary(optional=not outcomes_required))
  return out, problems


def read_manifest(path: Path | str, *, outcomes_required: bool = True) -> Manifest:
  """Reads and validates manifest.csv; file paths are resolved relative to it."""
  path = Path(path)
  root = path.resolve().parent
  try:
    # utf-8-sig: Excel's "CSV UTF-8" starts with a byte-order mark.
    with open(path, newline='', encoding='utf-8-sig') as f:
      reader = csv.DictReader(f)
      header = [h.strip() for h in (reader.fieldnames or [])]
      rows = list(reader)
  except FileNotFoundError as e:
    raise ManifestError(f'{path}: no such manifest file; check --manifest') from e
  except OSError as e:
    raise ManifestError(f'{path}: cannot read manifest ({e})') from e
  except UnicodeDecodeError as e:
    raise ManifestError(
      f'{path}: not UTF-8 text (byte {e.start}); save it as "CSV UTF-8" and rerun'
    ) from e
  except csv.Error as e:
    raise ManifestError(f'{path}: not a readable CSV file ({e})') from e
  missing = [c for c in MANIFEST_COLUMNS if c not in header]
  if missing:
    raise ManifestError(
      f'{path}: header lacks columns {missing}; expected {list(MANIFEST_COLUMNS)}'
    )
  if len(set(header)) != len(header):
    raise ManifestError(f'{path}: duplicate column names in header {header}')

  patients: list[Patient] = []
  errors: list[RowError] = []
  seen_patients: dict[str, int] = {}
  seen_slides: dict[str, int] = {}

  def resolve(raw: str, line: int, column: str, problems: list[RowError], pid: str) -> Path | None:
    p = (root / raw).resolve()
    if not p.exists():
      problems.append(RowError(line, column, f'file not found: {p}', pid))
      return None
    return p

  for i, raw_row in enumerate(rows):
    line = i + 2  # the header is line 1
    row = {k.strip(): (v if v is not None else '') for k, v in raw_row.items() if k is not None}
    if None in raw_row:
      errors.append(RowError(line, '*', f'{len(raw_row[None])} more fields than the header'))
      continue
    clinical, problems = _parse_clinical(row, outcomes_required)
    pid = clinical.get('patient_id', (row.get('patient_id') or '').strip())
    row_errors = [RowError(line, c, m, pid) for c, m in problems]
    if 'patient_id' in clinical:
      if pid in seen_patients:
        row_errors.append(
          RowError(
            line,
            'patient_id',
            f'duplicate patient_id {pid!r} (first on line {seen_patients[pid]})',
            pid,
          )
        )
      else:
        seen_patients[pid] = line

    slides: list[Slide] = []
    slide_entries = [s for s in (s.strip() for s in (row.get('slides') or '').split(';')) if s]
    try:
      mpps = _slide_mpps(row.get('mpp') or '', len(slide_entries))
    except ValueError as e:
      row_errors.append(RowError(line, 'mpp', str(e), pid))
      mpps = [None] * len(slide_entries)
    for raw, mpp in zip(slide_entries, mpps):
      p = resolve(raw, line, 'slides', row_errors, pid)
      if p is None:
        continue
      try:
        slide_id = store.validate_id(Path(raw).stem, what='slide_id')
      except ValueError as e:
        row_errors.append(RowError(line, 'slides', str(e), pid))
        continue
      if slide_id in seen_slides:
        row_errors.append(
          RowError(
            line,
            'slides',
            f'duplicate slide_id {slide_id!r} (first on line {seen_slides[slide_id]})',
            pid,
          )
        )
        continue
      seen_slides[slide_id] = line
      slides.append(Slide(slide_id, p, mpp))

    mri: dict[str, Path] = {}
    for seq in store.MRI_SEQUENCES:
      raw = (row.get(f'mri_{seq}') or '').strip()
      if raw and (p := resolve(raw, line, f'mri_{seq}', row_errors, pid)) is not None:
        mri[seq] = p
    raw_mask = (row.get('mri_mask') or '').strip()
    mask = resolve(raw_mask, line, 'mri_mask', row_errors, pid) if raw_mask else None
    if mri and not raw_mask:
      row_errors.append(
        RowError(line, 'mri_mask', 'MRI sequences given without a tumour mask', pid)
      )

    if row_errors:
      errors.extend(row_errors)
      continue
    patients.append(Patient(line, clinical, tuple(slides), mri, mask))
  return Manifest(path, tuple(patients), tuple(errors))


def clinical_table(
  patients: list[Patient] | tuple[Patient, ...],
  *,
  has_wsi: dict[str, bool] | None = None,
  has_mri: dict[str, bool] | None = None,
) -> pa.Table:
  """clinical.parquet: typed clinical columns plus has_wsi / has_mri modality flags.

  By default a modality is present when the manifest lists it; extraction
  passes what actually reached the store.
  """

  def col(name):
    return [p.clinical[name] for p in patients]

  pids = col('patient_id')
  has_wsi = has_wsi if has_wsi is not None else {p.patient_id: bool(p.slides) for p in patients}
  has_mri = has_mri if has_mri is not None else {p.patient_id: bool(p.mri) for p in patients}
  return pa.table(
    {
      'patient_id': pa.array(pids, pa.string()),
      'center': pa.array(col('center'), pa.string()),
      'age': pa.array(col('age'), pa.float64()),
      'sex': pa.array(col('sex'), pa.string()),
      'ebv_dna': pa.array(col('ebv_dna'), pa.float64()),
      't_stage': pa.array(np.asarray(col('t_stage'), np.int8), pa.int8()),
      'n_stage': pa.array(np.asarray(col('n_stage'), np.int8), pa.int8()),
      'overall_stage': pa.array(col('overall_stage'), pa.string()),
      'ic_response': pa.array(col('ic_response'), pa.int8()),
      'os_months': pa.array(col('os_months'), pa.float64()),
      'os_event': pa.array(col('os_event'), pa.int8()),  # null for patients to score
      'has_wsi': pa.array([bool(has_wsi.get(p, False)) for p in pids], pa.bool_()),
      'has_mri': pa.array([bool(has_mri.get(p, False)) for p in pids], pa.bool_()),
    }
  )
