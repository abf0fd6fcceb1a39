"""One page per patient: the prediction with its uncertainty, for the clinician.

`write_cards(table, out_dir)` renders, for each row of a `predict` table (with the columns of
`moemil_jax/uncertainty.py`), <out_dir>/<patient_id>.png and/or .html: the response
probability with the members' interval, the decision threshold and the conformal set; the OS
curve with the members' band beside the development cohort's Kaplan-Meier curve; the OS
probabilities at the horizons; the risk group; the modalities used; the warnings; and, when
`explain_dir` holds them (launch.predict --explain), the slide attention heatmap and MRI
Grad-CAM thumbnails of the patient.
"""

from __future__ import annotations

import base64
import html
import io
import re
import textwrap
from pathlib import Path
from typing import Sequence

import matplotlib

matplotlib.use('Agg')
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from moemil_jax import uncertainty  # noqa: E402

FORMATS = ('png', 'html')
MAX_THUMBNAILS = 4
_SET_TEXT = {
  'responder': '{responder}',
  'non-responder': '{non-responder}',
  'uncertain': 'both: uncertain, refer',
  'empty': 'none (empty): atypical, refer',
  '': 'not available',
}


def safe_name(patient_id: str) -> str:
  return re.sub(r'[^A-Za-z0-9._-]', '_', str(patient_id)) or 'patient'


def thumbnails(explain_dir: Path | None, patient_id: str) -> list[Path]:
  """The patient's explanation PNGs (launch.explain names them <patient>_...png)."""
  if explain_dir is None or not Path(explain_dir).is_dir():
    return []
  prefix = f'{patient_id}_'
  found = sorted(p for p in Path(explain_dir).glob('*.png') if p.name.startswith(prefix))
  return found[:MAX_THUMBNAILS]


def _horizons(row: pd.Series) -> list[float]:
  out = []
  for col in row.index:
    m = re.fullmatch(r'os_prob_([0-9.]+)m', col)
    if m:
      out.append(float(m.group(1)))
  return sorted(out)


def _fmt(x, digits=2) -> str:
  return 'n/a' if x is None or not np.isfinite(x) else f'{x:.{digits}f}'


def text_lines(row: pd.Series, threshold: float | None) -> list[tuple[str, str]]:
  """(label, value) lines of the card's text panel."""
  level = row.get('response_set_level', np.nan)
  set_label = f'{level:.0%} response set' if np.isfinite(level) else 'Response set'
  lines = [
    (
      'Response probability',
      f'{_fmt(row.response_prob)} (members {_fmt(row.get("response_prob_lo"))}'
      f'-{_fmt(row.get("response_prob_hi"))})',
    ),  # fmt: skip
    (
      'Predicted class',
      ('responder' if row.response_class == 1 else 'non-responder')
      + (f' (threshold {threshold:.2f})' if threshold is not None else ''),
    ),
    (set_label, _SET_TEXT.get(row.get('response_set', ''), str(row.get('response_set')))),
    ('OS risk group', f'{row.risk_group} (log relative hazard {row.log_risk:+.2f})'),
  ]
  for h in _horizons(row):
    c = uncertainty.horizon_column(h)
    lines.append(
      (
        f'OS at {h:g} months',
        f'{_fmt(row[c])} (members {_fmt(row.get(c + "_lo"))}-{_fmt(row.get(c + "_hi"))})',
      )
    )
  lines.append(('Modalities used', str(row.modalities_used)))
  return lines


def render(
  row: pd.Series,
  curve: pd.DataFrame | None,
  *,
  threshold: float | None = None,
  thumbs: Sequence[Path] = (),
) -> bytes:
  """The card of one patient as PNG bytes."""
  thumbs = list(thumbs)
  fig = plt.figure(figsize=(11, 8.5 if thumbs else 6.2))
  rows = 2 if thumbs else 1
  grid = fig.add_gridspec(rows, 2, height_ratios=[3, 2] if thumbs else [1], width_ratios=[1, 1.1])
  fig.suptitle(f'Patient {row.patient_id}', x=0.02, ha='left', fontsize=15, weight='bold')
  fig.text(0.02, 0.925 if thumbs else 0.9, f'Model: {row.model}', fontsize=8, color='0.35')

  left = fig.add_subplot(grid[0, 0])
  left.axis('off')
  y = 0.97
  for label, value in text_lines(row, threshold):
    left.text(0.0, y, label, fontsize=9.5, weight='bold', va='top', transform=left.transAxes)
    left.text(0.46, y, value, fontsize=9.5, va='top', transform=left.transAxes, wrap=True)
    y -= 0.075
  # The response probability on a 0-1 scale: members' interval, point, threshold.
  bar = left.inset_axes([0.0, y - 0.1, 0.95, 0.06])
  bar.set_xlim(0, 1)
  bar.set_yticks([])
  bar.axvspan(row.get('response_prob_lo', row.response_prob), row.get('response_prob_hi', row.response_prob), color='#d62728', alpha=0.25)  # fmt: skip
  bar.plot([row.response_prob], [0.5], 'o', color='#d62728')
  if threshold is not None:
    bar.axvline(threshold, color='k', ls='--', lw=1)
  bar.set_xlabel('Response probability (band: members; dashed: threshold)', fontsize=8)
  bar.tick_params(labelsize=8)
  y -= 0.24
  warnings = str(row.get('warnings', '') or '')
  left.text(0.0, y, 'Warnings', fontsize=9.5, weight='bold', va='top', transform=left.transAxes)
  body = '\n'.join(textwrap.fill(w, 60, subsequent_indent='  ') for w in warnings.split('; ') if w)
  left.text(
    0.0, y - 0.06, body or 'none', fontsize=8.5, va='top', color='#8a4b00' if body else '0.3',
    transform=left.transAxes,
  )  # fmt: skip

  ax = fig.add_subplot(grid[0, 1])
  if curve is not None and len(curve):
    ax.fill_between(
      curve.month, curve.os_prob_lo, curve.os_prob_hi, step='post', color='#d62728', alpha=0.2,
      label='Members (min-max)',
    )  # fmt: skip
    ax.step(curve.month, curve.os_prob, where='post', color='#d62728', lw=2, label='This patient')
    ax.step(
      curve.month, curve.population, where='post', color='0.4', ls='--', lw=1.2,
      label='Development cohort (Kaplan-Meier)',
    )  # fmt: skip
    for h in _horizons(row):
      v = row[uncertainty.horizon_column(h)]
      if np.isfinite(v):
        ax.plot([h], [v], 'o', color='#d62728', ms=5)
        ax.annotate(f'{v:.2f}', (h, v), textcoords='offset points', xytext=(4, 6), fontsize=8)
    ax.legend(loc='lower left', fontsize=8)
  else:
    ax.text(0.5, 0.5, 'no OS probabilities\n(bundle without baseline hazard)', ha='center',
            va='center', transform=ax.transAxes)  # fmt: skip
  ax.set(xlabel='Months', ylabel='Overall survival probability', ylim=(0, 1.02))
  ax.set_title('Overall survival', fontsize=11)
  ax.grid(alpha=0.3)

  if thumbs:
    sub = grid[1, :].subgridspec(1, len(thumbs))
    for k, path in enumerate(thumbs):
      t = fig.add_subplot(sub[0, k])
      t.imshow(plt.imread(path))
      t.axis('off')
      t.set_title(path.stem.removeprefix(f'{row.patient_id}_'), fontsize=8)
  buf = io.BytesIO()
  fig.savefig(buf, format='png', dpi=100, bbox_inches='tight')
  plt.close(fig)
  return buf.getvalue()


def card_html(row: pd.Series, png: bytes, threshold: float | None) -> str:
  cells = ''.join(
    f'<tr><th>{html.escape(k)}</th><td>{html.escape(v)}</td></tr>'
    for k, v in text_lines(row, threshold)
  )
  warnings = str(row.get('warnings', '') or '')
  items = (
    ''.join(f'<li>{html.escape(w)}</li>' for w in warnings.split('; ') if w) or '<li>none</li>'
  )
  data = base64.b64encode(png).decode()
  return (
    "<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>"
    f'<title>Patient {html.escape(str(row.patient_id))}</title><style>'
    'body{font-family:Helvetica,Arial,sans-serif;max-width:1100px;margin:1em auto;color:#222}'
    'th{text-align:left;padding-right:1em}li{color:#8a4b00}img{max-width:100%}</style></head>'
    f'<body><h1>Patient {html.escape(str(row.patient_id))}</h1><table>{cells}</table>'
    f'<h3>Warnings</h3><ul>{items}</ul>'
    f"<img src='data:image/png;base64,{data}' alt='patient card'></body></html>\n"
  )


def write_cards(
  table: pd.DataFrame,
  out_dir: str | Path,
  *,
  explain_dir: str | Path | None = None,
  formats: Sequence[str] = FORMATS,
) -> list[Path]:
  """One card per row of a predict table; returns the files written."""
  bad = [f for f in formats if f not in FORMATS]
  if bad:
    raise ValueError(f'card format {bad[0]!r}: use {" and/or ".join(FORMATS)}')
  out_dir = Path(out_dir)
  out_dir.mkdir(parents=True, exist_ok=True)
  curves = uncertainty.curves(table)
  by_patient = dict(tuple(curves.groupby('patient_id'))) if len(curves) else {}
  threshold = table.attrs.get('threshold')
  written = []
  for _, row in table.iterrows():
    png = render(
      row,
      by_patient.get(row.patient_id),
      threshold=threshold,
      thumbs=thumbnails(Path(explain_dir) if explain_dir else None, row.patient_id),
    )
    name = safe_name(row.patient_id)
    if 'png' in formats:
      (out_dir / f'{name}.png').write_bytes(png)
      written.append(out_dir / f'{name}.png')
    if 'html' in formats:
      (out_dir / f'{name}.html').write_text(card_html(row, png, threshold))
      written.append(out_dir / f'{name}.html')
  return written
