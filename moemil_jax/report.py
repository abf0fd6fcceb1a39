"""Writes the clinical report: metrics.json, CSV and Markdown tables, PNG plots, report.html.

The HTML embeds every image as a base64 data URI so the single file can be mailed to the
clinicians reviewing the model or attached to a manuscript submission.
"""

from __future__ import annotations

import base64
import html
import io
import json
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use('Agg')
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from absl import logging  # noqa: E402

from feature_store.store import atomic_write_bytes  # noqa: E402
from moemil_jax import evaluation, metrics  # noqa: E402
from moemil_jax.evaluation import SPLIT_NAMES, Evaluation, display_name  # noqa: E402

FIGURES = 'figures'
DCA_THRESHOLDS = np.linspace(0.01, 0.99, 99)
_COLORS = {'moemil': '#d62728', 'dlr': '#1f77b4', 'pathomics': '#2ca02c', 'tnm': '#7f7f7f'}


def _color(model: str, i: int) -> str:
  return _COLORS.get(model, f'C{i + 4}')


def to_markdown(df: pd.DataFrame) -> str:
  """A GitHub-flavoured Markdown table (index as the first column)."""
  df = df.reset_index()
  cells = [[str(c) for c in df.columns]] + [[str(v) for v in row] for row in df.to_numpy()]
  cells = [[c.replace('|', '\\|') for c in row] for row in cells]
  widths = [max(len(r[i]) for r in cells) for i in range(len(cells[0]))]

  def line(row):
    return '| ' + ' | '.join(c.ljust(w) for c, w in zip(row, widths)) + ' |'

  return (
    '\n'.join(
      [
        line(cells[0]),
        '| ' + ' | '.join('-' * w for w in widths) + ' |',
        *(line(r) for r in cells[1:]),
      ]
    )
    + '\n'
  )


def _save(fig, path: Path) -> Path:
  buf = io.BytesIO()
  fig.savefig(buf, format='png', dpi=110, bbox_inches='tight')
  plt.close(fig)
  atomic_write_bytes(path, buf.getvalue())
  return path


def _labelled(df: pd.DataFrame, split: str) -> tuple[np.ndarray, np.ndarray]:
  part = evaluation.split_rows(df, split)
  part = part[part['ic_response'].notna()]
  return part['ic_response'].astype(int).to_numpy(), part['response_prob'].to_numpy(float)


def plot_roc(ev: Evaluation, split: str, path: Path) -> Path:
  from sklearn.metrics import roc_curve

  fig, ax = plt.subplots(figsize=(5, 5))
  for i, name in enumerate(ev.models):
    y, prob = _labelled(ev.predictions[name], split)
    r = ev.results['per_model'][name]['response'][split]
    if r.get('auc') is None:
      ax.plot([], [], color=_color(name, i), label=f'{display_name(name)}: AUC n/a')
      continue
    fpr, tpr, _ = roc_curve(y, prob)
    ax.plot(
      fpr,
      tpr,
      color=_color(name, i),
      lw=2 if name == ev.results['primary'] else 1.3,
      label=f'{display_name(name)}: {r["auc"]:.3f} ({r["auc_lo"]:.3f}-{r["auc_hi"]:.3f})',
    )
  ax.plot([0, 1], [0, 1], ls='--', color='0.6', lw=0.8)
  ax.set(
    xlabel='1 - specificity',
    ylabel='Sensitivity',
    xlim=(0, 1),
    ylim=(0, 1.01),
    title=f'IC response ROC: {SPLIT_NAMES[split]}',
  )
  ax.legend(loc='lower right', fontsize=8, title='AUC (95% CI)', title_fontsize=8)
  return _save(fig, path)


def plot_calibration(ev: Evaluation, split: str, path: Path) -> Path:
  fig, ax = plt.subplots(figsize=(5, 5))
  for i, name in enumerate(ev.models):
    y, prob = _labelled(ev.predictions[name], split)
    if len(y) == 0:
      continue
    mean_pred, frac, _ = metrics.calibration_bins(y, prob, n_bins=5)
    brier = ev.results['per_model'][name]['response'][split].get('brier')
    ax.plot(
      mean_pred,
      frac,
      'o-',
      color=_color(name, i),
      ms=4,
      label=f'{display_name(name)} (Brier {brier:.3f})',
    )
  ax.plot([0, 1], [0, 1], ls='--', color='0.6', lw=0.8, label='Ideal')
  ax.set(
    xlabel='Predicted probability of response',
    ylabel='Observed fraction of responders',
    xlim=(0, 1),
    ylim=(0, 1),
    title=f'Calibration (quintiles): {SPLIT_NAMES[split]}',
  )
  ax.legend(loc='upper left', fontsize=8)
  return _save(fig, path)


def plot_decision_curve(ev: Evaluation, split: str, path: Path) -> Path:
  fig, ax = plt.subplots(figsize=(6, 4.5))
  treat_all = None
  for i, name in enumerate(ev.models):
    y, prob = _labelled(ev.predictions[name], split)
    if len(y) == 0:
      continue
    nb, treat_all = metrics.net_benefit(y, prob, DCA_THRESHOLDS)
    ax.plot(DCA_THRESHOLDS, nb, color=_color(name, i), label=display_name(name))
  if treat_all is not None:
    ax.plot(DCA_THRESHOLDS, treat_all, color='k', lw=0.8, label='Treat all')
    top = max(0.05, float(np.nanmax(treat_all)) * 1.15)
  else:
    top = 0.5
  ax.axhline(0, color='k', ls=':', lw=0.8, label='Treat none')
  ax.set(
    xlabel='Threshold probability',
    ylabel='Net benefit',
    xlim=(0, 1),
    ylim=(-0.05, top),
    title=f'Decision curves: {SPLIT_NAMES[split]}',
  )
  ax.legend(fontsize=8)
  return _save(fig, path)


def plot_added_value_curve(ev: Evaluation, split: str, path: Path) -> Path | None:
  """Decision curves of MoEMIL + clinical and TNM + EBV DNA alone (None if either is missing)."""
  names = [evaluation.COMBINED_MODEL, evaluation.CLINICAL_MODEL]
  if not all(n in ev.predictions for n in names):
    return None
  fig, ax = plt.subplots(figsize=(6, 4.5))
  treat_all = None
  for name, color in zip(names, ('#d62728', '#7f7f7f')):
    y, prob = _labelled(ev.predictions[name], split)
    if len(y) == 0:
      plt.close(fig)
      return None
    nb, treat_all = metrics.net_benefit(y, prob, DCA_THRESHOLDS)
    ax.plot(DCA_THRESHOLDS, nb, color=color, label=display_name(name))
  ax.plot(DCA_THRESHOLDS, treat_all, color='k', lw=0.8, label='Treat all')
  ax.axhline(0, color='k', ls=':', lw=0.8, label='Treat none')
  ax.set(
    xlabel='Threshold probability',
    ylabel='Net benefit',
    xlim=(0, 1),
    ylim=(-0.05, max(0.05, float(np.nanmax(treat_all)) * 1.15)),
    title=f'Added value, decision curves: {SPLIT_NAMES[split]}',
  )
  ax.legend(fontsize=8)
  return _save(fig, path)


def plot_km(ev: Evaluation, model: str, split: str, path: Path) -> Path:
  """Kaplan-Meier of high vs low risk with numbers at risk and log-rank P. The cutoff is the
  median out-of-fold or validation log-risk (in-sample training only as a warned fallback)."""
  from lifelines import KaplanMeierFitter
  from lifelines.plotting import add_at_risk_counts

  part = evaluation.split_rows(ev.predictions[model], split)
  part = part[part['os_months'].notna() & part['os_event'].notna()]
  s = ev.results['per_model'][model]['survival'][split]
  fig, ax = plt.subplots(figsize=(5.5, 4.8))
  fitters = []
  if 'high_risk' in part:
    for label, value, color in (('Low risk', 0, '#1f77b4'), ('High risk', 1, '#d62728')):
      g = part[part['high_risk'] == value]
      if len(g) == 0:
        continue
      kmf = KaplanMeierFitter(label=f'{label} (n={len(g)})')
      kmf.fit(g['os_months'], g['os_event'])
      kmf.plot_survival_function(
        ax=ax, ci_show=False, show_censors=True, color=color, censor_styles={'ms': 4, 'marker': '|'}
      )
      fitters.append(kmf)
  if s.get('logrank_p') is not None:
    text = f'Log-rank P {evaluation.format_p(s["logrank_p"])}'
    if s.get('hr') is not None:
      text += f'\nHR {evaluation.hr_text(s)}'
    if s.get('logrank_warning'):
      text += f'\n{s["logrank_warning"]}'
  else:
    text = s.get('logrank_undefined') or s.get('undefined') or 'log-rank not available'
  where = ev.results['per_model'][model]['survival'].get('cutoff_fixed_on', '')
  if where and not where.startswith('default'):
    text += f'\nCutoff: median log-risk of {evaluation.FIXED_ON.get(where, where)}'
  ax.text(
    0.03,
    0.05,
    text,
    transform=ax.transAxes,
    fontsize=8,
    va='bottom',
    bbox={'facecolor': 'white', 'alpha': 0.8, 'edgecolor': '0.8'},
  )
  ax.set(
    xlabel='Months',
    ylabel='Overall survival',
    ylim=(0, 1.05),
    title=f'{display_name(model)}: {SPLIT_NAMES[split]}',
  )
  if fitters:  # an empty split has no curves (and no legend)
    ax.legend(loc='upper right', fontsize=8)
    add_at_risk_counts(*fitters, ax=ax, rows_to_show=['At risk'], fig=fig)
  return _save(fig, path)


def write_tables(ev: Evaluation, workdir: Path) -> dict[str, Path]:
  out = {}
  tables = {'comparison': evaluation.comparison_table(ev)}
  for split in evaluation.shown_splits(ev.results):
    tables[f'response_{split}'] = evaluation.response_table(ev, split)
    tables[f'survival_{split}'] = evaluation.survival_table(ev, split)
  added = evaluation.added_value_table(ev)
  if not added.empty:
    tables['added_value'] = added
  for name, df in tables.items():
    atomic_write_bytes(workdir / f'{name}.csv', df.to_csv().encode())
    atomic_write_bytes(workdir / f'{name}.md', to_markdown(df).encode())
    out[f'{name}.csv'], out[f'{name}.md'] = workdir / f'{name}.csv', workdir / f'{name}.md'
  return out


def write_figures(ev: Evaluation, workdir: Path) -> dict[str, Path]:
  fig_dir = workdir / FIGURES
  out = {}
  for split in evaluation.shown_splits(ev.results):
    for kind, plot in (
      ('roc', plot_roc),
      ('calibration', plot_calibration),
      ('decision_curve', plot_decision_curve),
    ):
      out[f'{kind}_{split}'] = plot(ev, split, fig_dir / f'{kind}_{split}.png')
    for model in ev.models:
      out[f'km_{model}_{split}'] = plot_km(ev, model, split, fig_dir / f'km_{model}_{split}.png')
    if split != 'train':
      added = plot_added_value_curve(ev, split, fig_dir / f'decision_curve_added_{split}.png')
      if added is not None:
        out[f'decision_curve_added_{split}'] = added
    logging.info('figures for %s written', split)
  return out


def _img(path: Path, alt: str) -> str:
  data = base64.b64encode(Path(path).read_bytes()).decode()
  return f'<img src="data:image/png;base64,{data}" alt="{html.escape(alt)}">'


def _table(df: pd.DataFrame) -> str:
  return df.to_html(classes='t', border=0, escape=True)


_CSS = """
body { font-family: -apple-system, 'Segoe UI', Helvetica, Arial, sans-serif; margin: 2em auto;
       max-width: 1200px; color: #222; line-height: 1.4; }
h1 { font-size: 1.6em; } h2 { border-bottom: 1px solid #ddd; padding-bottom: .2em; margin-top: 1.6em; }
table.t { border-collapse: collapse; font-size: .85em; margin: .6em 0; }
table.t th, table.t td { padding: .25em .6em; border-bottom: 1px solid #e5e5e5; text-align: left; }
table.t thead th { border-bottom: 2px solid #999; }
.grid { display: flex; flex-wrap: wrap; gap: 1em; } .grid img { max-width: 380px; height: auto; }
.notes li { font-size: .85em; color: #8a4b00; }
"""


EXPLAIN = 'explain'
_INTERPRETATION_START = '<!-- interpretation -->'
_INTERPRETATION_END = '<!-- /interpretation -->'


def interpretation_pngs(report_dir: Path) -> list[Path]:
  """PNGs written by launch.explain into <dir>/explain/ or <dir>/<model>/explain/."""
  report_dir = Path(report_dir)
  return sorted(report_dir.glob(f'{EXPLAIN}/*.png')) + sorted(report_dir.glob(f'*/{EXPLAIN}/*.png'))


def interpretation_html(report_dir: Path) -> str:
  """The optional "Interpretation" section (empty string when there is nothing to show)."""
  pngs = interpretation_pngs(report_dir)
  if not pngs:
    return ''
  items = [
    _img(p, p.stem)
    + f'<div><small>{html.escape(p.relative_to(report_dir).as_posix())}</small></div>'
    for p in pngs
  ]
  return '\n'.join(
    [
      _INTERPRETATION_START,
      '<h2>Interpretation</h2>',
      '<p>Attention heatmaps (raw WSI attention scores as within-slide percentiles, tissue only) '
      'and MRI Grad-CAM of the task output through the fused model (ResNet50 layer4; white: '
      'tumour contour).</p>',
      "<div class='grid'>",
      *(f'<div>{i}</div>' for i in items),
      '</div>',
      _INTERPRETATION_END,
    ]
  )


def add_interpretation(report_html: Path) -> Path:
  """Puts (or replaces) the Interpretation section of an existing report.html in place."""
  report_html = Path(report_html)
  text = report_html.read_text()
  if _INTERPRETATION_START in text:
    head, rest = text.split(_INTERPRETATION_START, 1)
    text = head + rest.split(_INTERPRETATION_END, 1)[-1]
  section = interpretation_html(report_html.parent)
  text = text.replace(
    '</body></html>', f'{section}\n</body></html>' if section else '</body></html>'
  )
  atomic_write_bytes(report_html, text.encode())
  return report_html


def write_html(ev: Evaluation, figures: dict[str, Path], path: Path) -> Path:
  primary = display_name(ev.results['primary'])
  parts = [
    "<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>",
    f'<title>{html.escape(primary)}: clinical evaluation</title><style>{_CSS}</style></head><body>',
    f'<h1>{html.escape(primary)}: IC response and overall survival</h1>',
    '<p>Thresholds are fixed once and applied unchanged to every split: the Youden threshold '
    'of the response probability and the median log-risk for high/low OS risk groups, on '
    'development out-of-fold predictions (ensembles, and the baselines and MoEMIL + clinical '
    'refitted on the same folds), else on the validation split (model selection), else, with a '
    'warning, on in-sample training predictions; never on the external test. Here they were '
    f'fixed on {html.escape(evaluation.fixed_on(ev))}. The Development (out-of-fold) column '
    'scores each development patient with models that did not see that patient (its threshold '
    'and cutoff were fixed on those same predictions, so its sensitivity, specificity and '
    'log-rank are mildly optimistic); Training (in-sample) scores models on patients they '
    'were fitted on and says nothing about generalisation. Time-dependent AUC: censoring weights '
    "from each split's own patients. AUC 95% CI: "
    f'{html.escape(ev.results["ci_method"])}; C-index 95% CI: patient bootstrap. '
    'TNM: logistic regression (response) and Cox model (OS) on T, N and overall stage, fitted '
    'on training patients only.</p>',
    '<h2>Comparison</h2>',
    f'<p>{html.escape(evaluation.split_sizes(ev))}</p>',
    _table(evaluation.comparison_table(ev)),
  ]
  added = evaluation.added_value_table(ev)
  if not added.empty:
    parts += [
      '<h2>Added value over TNM + EBV DNA</h2>',
      '<p>Differences in AUC and C-index (model minus comparator) on the patients both score, '
      'with paired patient-bootstrap 95% intervals (and the DeLong test and interval for the '
      'AUC), on the development out-of-fold predictions and the external test. MoEMIL + '
      'clinical is TNM + EBV DNA (same inputs, same penalties) plus the MoEMIL score, fitted '
      "on the development center's out-of-fold scores; the best baseline is chosen on "
      'development figures, never on the external test.</p>',
      _table(added),
      *(f'<p>{html.escape(line)}</p>' for line in evaluation.lr_test_lines(ev)),
      "<div class='grid'>",
      *(
        _img(figures[k], k.replace('_', ' '))
        for k in sorted(figures)
        if k.startswith('decision_curve_added_')
      ),
      '</div>',
    ]
  notes = evaluation.undefined_notes(ev)
  if notes:
    parts.append(
      "<h3>Undefined metrics and warnings</h3><ul class='notes'>"
      + ''.join(f'<li>{html.escape(n)}</li>' for n in notes)
      + '</ul>'
    )
  for split in evaluation.shown_splits(ev.results):
    name = SPLIT_NAMES[split]
    parts += [
      f'<h2>{html.escape(name)}</h2>',
      '<h3>IC response</h3>',
      _table(evaluation.response_table(ev, split)),
      "<div class='grid'>",
      _img(figures[f'roc_{split}'], f'ROC curves, {name}'),
      _img(figures[f'calibration_{split}'], f'Calibration, {name}'),
      _img(figures[f'decision_curve_{split}'], f'Decision curves, {name}'),
      '</div>',
      '<h3>Overall survival</h3>',
      _table(evaluation.survival_table(ev, split)),
      "<div class='grid'>",
      *(
        _img(figures[f'km_{m}_{split}'], f'Kaplan-Meier, {display_name(m)}, {name}')
        for m in ev.models
      ),
      '</div>',
    ]
  interpretation = interpretation_html(Path(path).parent)
  if interpretation:
    parts.append(interpretation)
  parts.append('</body></html>')
  atomic_write_bytes(path, '\n'.join(parts).encode())
  return path


def write_report(ev: Evaluation, workdir: Path) -> dict[str, Path]:
  """Writes metrics.json, tables, figures and report.html into `workdir`; returns their paths."""
  workdir = Path(workdir)
  out: dict[str, Any] = {}
  metrics_path = workdir / 'metrics.json'
  atomic_write_bytes(
    metrics_path, (json.dumps(ev.results, indent=2, allow_nan=False) + '\n').encode()
  )
  out['metrics.json'] = metrics_path
  out.update(write_tables(ev, workdir))
  figures = write_figures(ev, workdir)
  out.update(figures)
  out['report.html'] = write_html(ev, figures, workdir / 'report.html')
  return out
