"""The report's uncertainty section: OS probability calibration and conformal set coverage.

`write(ev, workdir)` (called by launch.evaluate after the main report) evaluates the primary
model's predictions with `survival_probability.evaluate` (calibration at 12, 36 and 60
months by risk quintile, calibration slope, Brier and integrated Brier against the
Kaplan-Meier null model) and `conformal.evaluate` (90% Mondrian sets: development coverage
cross-conformal over the folds, the other splits and each center with sets calibrated on
every development patient), and writes uncertainty.json, uncertainty_*.csv/.md,
figures/os_calibration_<split>.png and a section of report.html.
"""

from __future__ import annotations

import html
import json
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use('Agg')
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402

from moemil_jax import conformal, survival_probability  # noqa: E402

_START, _END = '<!-- uncertainty -->', '<!-- /uncertainty -->'
SPLIT_NAMES = {'train': 'development', 'val': 'validation', 'test': 'external test'}


def evaluate(
  frame: pd.DataFrame,
  horizons=survival_probability.HORIZONS_MONTHS,
  level: float = conformal.LEVEL,
) -> dict[str, Any]:
  return {
    'survival': survival_probability.evaluate(frame, horizons),
    'conformal': conformal.evaluate(frame, level),
  }


def _clean(x):
  """JSON-safe: NaN -> None, numpy scalars -> Python."""
  if isinstance(x, dict):
    return {str(k): _clean(v) for k, v in x.items()}
  if isinstance(x, (list, tuple)):
    return [_clean(v) for v in x]
  if hasattr(x, 'item'):
    x = x.item()
  if isinstance(x, float) and x != x:
    return None
  return x


def _markdown(df: pd.DataFrame) -> str:
  from moemil_jax.report import to_markdown

  return to_markdown(df.set_index(df.columns[0])) if len(df) else ''


def write(ev, workdir: str | Path) -> dict[str, Path]:
  """Writes the primary model's uncertainty results; returns the paths."""
  workdir = Path(workdir)
  primary = ev.results['primary']
  results = evaluate(ev.predictions[primary])
  out: dict[str, Path] = {}
  path = workdir / 'uncertainty.json'
  path.write_text(json.dumps({'model': primary, **_clean(results)}, indent=2) + '\n')
  out['uncertainty.json'] = path
  tables = {
    'uncertainty_os': survival_probability.summary_table(results['survival']),
    'uncertainty_sets': conformal.summary_table(results['conformal']),
    'uncertainty_sets_center': conformal.summary_table(results['conformal'], 'per_center'),
  }
  for name, df in tables.items():
    (workdir / f'{name}.csv').write_text(df.to_csv(index=False))
    (workdir / f'{name}.md').write_text(_markdown(df))
    out[f'{name}.csv'], out[f'{name}.md'] = workdir / f'{name}.csv', workdir / f'{name}.md'
  figures = {}
  for split in ('train', 'val', 'test'):
    if split in results['survival']:
      fig, ax = plt.subplots(figsize=(5, 5))
      survival_probability.plot_calibration(results['survival'], split, ax)
      ax.set_title(ax.get_title().replace(f'({split})', f'({SPLIT_NAMES[split]})'))
      fig_path = workdir / 'figures' / f'os_calibration_{split}.png'
      fig_path.parent.mkdir(parents=True, exist_ok=True)
      fig.savefig(fig_path, dpi=110, bbox_inches='tight')
      plt.close(fig)
      figures[split] = out[f'os_calibration_{split}'] = fig_path
  report_html = workdir / 'report.html'
  if report_html.exists():
    add_section(report_html, results, tables, figures)
  return out


def section_html(results, tables, figures) -> str:
  from moemil_jax.report import _img

  sets = results['conformal']
  surv = results['survival']
  parts = [
    _START,
    '<h2>Uncertainty: OS probabilities and response sets</h2>',
    "<p>OS probabilities from a Breslow baseline hazard fitted on the development patients' "
    f'{html.escape(str(surv.get("baseline_source", "")).replace("_", "-"))} log-risks; '
    'calibration by risk quintile against Kaplan-Meier, calibration slope (Cox coefficient '
    'of the log-risk; 1 ideal), Brier and integrated Brier (IBS) beside the Kaplan-Meier null '
    'model.</p>',
    tables['uncertainty_os'].to_html(classes='t', border=0, index=False),
    "<div class='grid'>",
    *(_img(p, f'OS calibration, {SPLIT_NAMES[s]}') for s, p in figures.items()),
    '</div>',
  ]
  if 'undefined' in sets:
    parts.append(f'<p>Response sets: {html.escape(sets["undefined"])}</p>')
  else:
    parts += [
      f'<p>{sets["level"]:.0%} class-conditional conformal response sets calibrated on '
      f'{html.escape(sets["calibrated_on"].replace("_", "-"))} predictions; development '
      'coverage cross-conformal over the folds (each patient by sets calibrated without its '
      'fold).</p>',
      tables['uncertainty_sets'].to_html(classes='t', border=0, index=False),
      tables['uncertainty_sets_center'].to_html(classes='t', border=0, index=False),
    ]
  parts.append(_END)
  return '\n'.join(parts)


def add_section(report_html: Path, results, tables, figures) -> None:
  text = report_html.read_text()
  if _START in text:
    head, rest = text.split(_START, 1)
    text = head + rest.split(_END, 1)[-1]
  section = section_html(results, tables, figures)
  report_html.write_text(text.replace('</body></html>', f'{section}\n</body></html>'))
