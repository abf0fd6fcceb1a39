"""The result tables of README.md and docs/*.md, written from the committed outputs in docs/.

A document holds a generated table between two marker comments, each a line of its own:

  <!-- generated:NAME -->
  (anything: replaced)
  <!-- /generated:NAME -->

`python -m launch.docs` rewrites every such block from the CSV and JSON files that the
measuring tools wrote into docs/ (`launch.stress`: docs/stress_cpu*.csv; `launch.bench`:
docs/bench_cpu*.json); `--check` changes nothing and names each file and table that differs,
so a number typed over by hand, or a table left behind by a new run, fails CI. A table reads
only the files TABLES names (the reliability summary counts the case table of
docs/reliability.md).
"""

from __future__ import annotations

import dataclasses
import decimal
import json
import os
import re
from pathlib import Path
from typing import Callable, Iterable

import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
DOCUMENTS = ('README.md', 'BUILD.md', 'docs/*.md')

# The simple baselines every deep model must beat (moemil_jax/baselines.py), and the rows that
# are references rather than competitors.
BASELINES = ('tnm', 'tnm_ebv', 'radiomics_linear', 'wsi_meanpool', 'wsi_prototypes')
REFERENCES = ('ceiling', 'oracle', 'ceiling_wsi', 'ceiling_mri', 'key_patch_oracle')
LABELS = {
  'moemil': 'MoEMIL',
  'moemil_clinical': 'MoEMIL + clinical (TNM, EBV DNA; fitted out of fold)',
  'moemil_no_wide_response': 'MoEMIL without the response term (the previous default)',
  'moemil_no_wide': 'MoEMIL without a wide term',
  'tnm': 'TNM',
  'tnm_ebv': 'TNM + EBV DNA',
  'radiomics_linear': 'Radiomics (L2 logistic / Cox)',
  'wsi_meanpool': 'WSI mean-pool (L2 logistic / Cox)',
  'wsi_prototypes': 'WSI prototypes (L2 logistic / Cox)',
  'dlr': 'DLR (MRI only)',
  'pathomics': 'Pathomics (WSI only)',
  'key_patch_oracle': 'Key-patch oracle (L2 on the true key patches)',
  'ceiling_wsi': 'Ceiling, slides alone',
  'ceiling_mri': 'Ceiling, MRI alone',
  'ceiling': 'Ceiling (what the views allow)',
  'oracle': 'Oracle (truth)',
}
METRICS = (('auc', 'AUC'), ('cindex', 'C-index'))

_BEGIN = re.compile(r'^<!-- generated:([\w.-]+) -->$', re.MULTILINE)  # a line of its own
_END = '<!-- /generated:{} -->'


class DocsError(Exception):
  """A marker block that cannot be regenerated (unknown name, no end marker, no source)."""


@dataclasses.dataclass(frozen=True)
class Table:
  """One generated block: the function that writes it and the files it reads (under docs/)."""

  render: Callable[[Path, str], str]  # (docs folder, its path relative to the document)
  sources: tuple[str, ...]


# --------------------------------------------------------------------------- reading


def _csv(docs: Path, name: str) -> pd.DataFrame:
  path = docs / name
  if not path.exists():
    raise DocsError(f'{path} is missing: it is the output the table is written from')
  return pd.read_csv(path)


def _seeds(seeds: Iterable[int]) -> str:
  """'10-14', '0, 1, 5-9': runs of consecutive seeds."""
  seeds = sorted(set(int(s) for s in seeds))
  runs: list[list[int]] = []
  for s in seeds:
    if runs and s == runs[-1][-1] + 1:
      runs[-1].append(s)
    else:
      runs.append([s])
  return ', '.join(f'{r[0]}-{r[-1]}' if len(r) > 1 else f'{r[0]}' for r in runs)


def fmt(x: float, places: int = 3) -> str:
  """`x` rounded half up, after the float noise of a mean is gone (0.6665 -> '0.667')."""
  exact = decimal.Decimal(repr(round(float(x), 9)))
  return str(exact.quantize(decimal.Decimal(1).scaleb(-places), decimal.ROUND_HALF_UP))


def _mean_range(values: pd.Series, bold: bool = False) -> str:
  mean = f'**{fmt(values.mean())}**' if bold else fmt(values.mean())
  return f'{mean} ({fmt(values.min())}-{fmt(values.max())})'


def _label(model: str) -> str:
  return LABELS.get(model, model)


def _best_baseline(part: pd.DataFrame, metric: str) -> str:
  means = part[part.model.isin(BASELINES)].groupby('model')[metric].mean()
  return str(means.idxmax())


def _rows(lines: list[str]) -> str:
  return '\n'.join(lines) + '\n'


# --------------------------------------------------------------------------- stress tables


HEADLINE_CSV = 'stress_cpu_slide_lr3.csv'  # the current default on seeds no choice had seen
SLIDE_CSV = 'stress_cpu_slide.csv'  # the prototype pathway at one learning rate, seeds 20-24


def headline(docs: Path, preset: str) -> str:
  """MoEMIL against the best simple baseline (per metric) and the ceiling, fresh seeds."""
  table = _csv(docs, HEADLINE_CSV)
  part = table[table.preset == preset]
  if part.empty:
    raise DocsError(f'{docs / HEADLINE_CSV} has no {preset} rows')
  best = {metric: _best_baseline(part, metric) for metric, _ in METRICS}
  rows = [('moemil', '**MoEMIL**')]
  if best['auc'] == best['cindex']:
    rows.append((best['auc'], f'best simple baseline: {_label(best["auc"])}'))
  else:
    rows.append((best['auc'], f'best simple baseline in AUC: {_label(best["auc"])}'))
    rows.append((best['cindex'], f'best simple baseline in C-index: {_label(best["cindex"])}'))
  rows.append(('ceiling', _label('ceiling')))
  means = {m: part[part.model == m][['auc', 'cindex']].mean() for m in ('moemil', 'ceiling')}
  share = ' / '.join(fmt(means['moemil'][k] / means['ceiling'][k], 2) for k, _ in METRICS)
  lines = [
    f'{preset} preset, {part.seed.nunique()} fresh cohort seeds ({_seeds(part.seed)}), '
    f'external test (center B); MoEMIL at {share} of the ceiling (AUC / C-index)',
    '',
    '| model | AUC mean (range) | C-index mean (range) |',
    '| --- | --- | --- |',
  ]
  for model, label in rows:
    m = part[part.model == model]
    cells = [_mean_range(m[k], bold=model == 'moemil') for k, _ in METRICS]
    lines.append(f'| {label} | {cells[0]} | {cells[1]} |')
  return _rows(lines)


def stress_table(
  docs: Path,
  csv: str,
  preset: str,
  models: tuple[str, ...],
  labels: dict[str, str] | None = None,
  bold: str = 'moemil',
) -> str:
  """Every listed model's external-test mean (range) over one preset's seeds in `csv`.

  bold: 'moemil' marks MoEMIL's means; 'best' marks each column's best competitor.
  """
  labels = {**LABELS, **(labels or {})}
  table = _csv(docs, csv)
  part = table[table.preset == preset]
  absent = [m for m in models if m not in set(part.model)]
  if part.empty or absent:
    raise DocsError(f'{docs / csv}: no {preset} rows for {absent or "any model"}')
  means = part.groupby('model')[['auc', 'cindex']].mean()
  best = {k: means.loc[[m for m in models if m not in REFERENCES], k].idxmax() for k, _ in METRICS}
  lines = [
    f'{preset} preset, cohort seeds {_seeds(part.seed)}, external test (center B)',
    '',
    '| model | AUC mean (range) | C-index mean (range) |',
    '| --- | --- | --- |',
  ]
  for model in models:
    m = part[part.model == model]
    marked = {
      k: (model == 'moemil') if bold == 'moemil' else (model == best[k]) for k, _ in METRICS
    }
    label = labels[model]
    if bold == 'moemil' and model == 'moemil':
      label = f'**{label}**'
    cells = [_mean_range(m[k], bold=marked[k]) for k, _ in METRICS]
    lines.append(f'| {label} | {cells[0]} | {cells[1]} |')
  return _rows(lines)


def slide_bars(docs: Path, csv: str) -> str:
  """Issue 27's bars per preset, from the means over seeds: pathomics against the key-patch
  oracle (ratio) and WSI mean-pool (difference), MoEMIL against DLR (mean of AUC and C-index)."""
  table = _csv(docs, csv)
  lines = [
    '| preset (seeds) | pathomics / key-patch oracle, AUC; C-index (bar 0.9) '
    '| pathomics - WSI mean-pool, AUC; C-index (bar 0.03) '
    '| MoEMIL - DLR, mean of AUC and C-index (bar 0.02) |',
    '| --- | --- | --- | --- |',
  ]
  for preset, part in table.groupby('preset', sort=False):
    means = part.groupby('model')[['auc', 'cindex']].mean()
    ratio = means.loc['pathomics'] / means.loc['key_patch_oracle']
    gain = means.loc['pathomics'] - means.loc['wsi_meanpool']
    fusion = (means.loc['moemil'] - means.loc['dlr']).mean()
    lines.append(
      f'| {preset} ({_seeds(part.seed)}) | {fmt(ratio.auc, 2)}; {fmt(ratio.cindex, 2)} '
      f'| {fmt(gain.auc)}; {fmt(gain.cindex)} | {fmt(fusion)} |'
    )
  return _rows(lines)


_SLIDE_MODELS = (
  'moemil',
  'dlr',
  'pathomics',
  'wsi_prototypes',
  'wsi_meanpool',
  'radiomics_linear',
  'tnm_ebv',
  'key_patch_oracle',
  'ceiling_wsi',
  'ceiling_mri',
  'ceiling',
)

# The five recipes run once on seeds 0-4 of both presets, in the order they were tried.
RECIPES = (
  ('stress_cpu_no_wide.csv', 'no wide term'),
  ('stress_cpu_top64.csv', '... with the top 64 radiomics columns'),
  ('stress_cpu_repeats2.csv', '... with two seeds per fold'),
  ('stress_cpu_wsi32.csv', '... with a WSI branch of width 32'),
  ('stress_cpu.csv', 'with the wide survival term'),
)


def _pair(part: pd.DataFrame, model: str) -> str:
  m = part[part.model == model]
  return f'{fmt(m.auc.mean())} / {fmt(m.cindex.mean())}'


def recipes(docs: Path, link: str = '') -> str:
  """Each recipe run on every seed 0-4: MoEMIL's mean AUC / C-index and the bars it missed.

  A bar is missed where MoEMIL's mean is below the best simple baseline's mean, for one
  preset and one metric, in that recipe's own run.
  """
  lines = [
    '| recipe | realistic | hard | bars missed |',
    '| --- | --- | --- | --- |',
  ]
  for csv, label in RECIPES:
    table = _csv(docs, csv)
    cells, missed = [], []
    for preset in ('realistic', 'hard'):
      part = table[table.preset == preset]
      cells.append(_pair(part, 'moemil'))
      for metric, name in METRICS:
        top = part[part.model.isin(BASELINES)].groupby('model')[metric].mean().max()
        if part[part.model == 'moemil'][metric].mean() < top:
          missed.append(f'{preset} {name}')
    lines.append(
      f'| {label} ([{csv}]({link}{csv})) | {cells[0]} | {cells[1]} | {", ".join(missed) or "none"} |'
    )
  base = _csv(docs, 'stress_cpu.csv')
  cells = [_pair(base[base.preset == p], 'radiomics_linear') for p in ('realistic', 'hard')]
  lines.append(f'| radiomics baseline (L2 logistic / ridge Cox) | {cells[0]} | {cells[1]} | |')
  return _rows(lines)


def all_seeds(docs: Path) -> str:
  """The default on every seed it was run on (seeds 0-9 and the fresh seeds), mean AUC / C-index.

  The survival-term-only row joins the runs of that recipe: docs/stress_cpu.csv (seeds 0-4),
  docs/stress_cpu_seeds5-9.csv (its `moemil`) and the fresh seeds' `moemil_no_wide_response`.
  """
  default = pd.concat([_csv(docs, 'stress_cpu_seeds0-9.csv'), _csv(docs, 'stress_cpu_fresh.csv')])
  fresh = _csv(docs, 'stress_cpu_fresh.csv')
  survival_only = pd.concat(
    [
      _csv(docs, 'stress_cpu.csv').query('model == "moemil"'),
      _csv(docs, 'stress_cpu_seeds5-9.csv').query('model == "moemil"'),
      fresh[fresh.model == 'moemil_no_wide_response'].assign(model='moemil'),
    ]
  )
  presets = ('realistic', 'hard')
  heads = []
  for p in presets:
    seeds = default[(default.preset == p) & (default.model == 'moemil')].seed
    heads.append(f'{p}, {seeds.nunique()} seeds ({_seeds(seeds)})')
  lines = [f'| model | {heads[0]} | {heads[1]} |', '| --- | --- | --- |']
  rows = (
    ('**MoEMIL (default)**', default, 'moemil', True),
    ('MoEMIL, survival term only (the previous default)', survival_only, 'moemil', False),
    (LABELS['moemil_clinical'], default, 'moemil_clinical', False),
    (LABELS['radiomics_linear'], default, 'radiomics_linear', False),
    (LABELS['tnm'], default, 'tnm', False),
    (LABELS['tnm_ebv'], default, 'tnm_ebv', False),
    (LABELS['ceiling'], default, 'ceiling', False),
  )
  for label, table, model, bold in rows:
    cells = []
    for p in presets:
      part = table[table.preset == p]
      if part[part.model == model].seed.nunique() != part.seed.nunique():
        raise DocsError(f'{label}: not every {p} seed has a {model} row')
      cells.append(f'**{_pair(part, model)}**' if bold else _pair(part, model))
    lines.append(f'| {label} | {cells[0]} | {cells[1]} |')
  return _rows(lines)


# --------------------------------------------------------------------------- benchmarks

# launch.bench runs, oldest first: a later run's figure replaces an earlier one's by key.
BENCH_RUNS = ('bench_cpu_p5_eval.json', 'bench_cpu.json', 'bench_cpu_p3.json', 'bench_cpu_p4.json')


# The order of the figures in BENCHMARKS.md, by the key's first word.
_BENCH_ORDER = ('p1', 'padding', 'p2', 'p3', 'p4', 'p5', 'p6', 'eval')


def _bench_value(f: dict) -> str:
  text = f'{f["measured"]:.3g}'
  return f'{text}x' if f['unit'] == 'x' else f'{text} {f["unit"]}'.strip()


def _bench_rank(key: str) -> int:
  first = key.split('_')[0]
  return _BENCH_ORDER.index(first) if first in _BENCH_ORDER else len(_BENCH_ORDER)


def performance(docs: Path, link: str = '') -> str:
  """Every measured figure with its target (report-only figures left out), newest run wins."""
  figures: dict[str, dict] = {}
  runs = []
  for name in BENCH_RUNS:
    path = docs / name
    if not path.exists():
      raise DocsError(f'{path} is missing: it is the output the table is written from')
    report = json.loads(path.read_text())
    runs.append(f'[{name}]({link}{name}) (`{report["command"].split(" --out")[0]}`)')
    for f in report['figures']:
      figures[f['key']] = f
  lines = ['| figure | measured | target | met? |', '| --- | --- | --- | --- |']
  for f in sorted(figures.values(), key=lambda f: _bench_rank(f['key'])):
    if f['target'].startswith('('):
      continue
    lines.append(
      f'| {f["name"]} | {_bench_value(f)} | {f["target"]} | {"yes" if f["met"] else "no"} |'
    )
  lines += ['', 'From ' + ' and '.join(runs) + '.']
  return _rows(lines)


# --------------------------------------------------------------------------- reliability

RELIABILITY = 'reliability.md'
_CASES_HEADER = '| Area | Case | Handling | Test |'


def reliability_cases(docs: Path) -> list[dict[str, str]]:
  """The rows of the case table in docs/reliability.md (area, case, handling, test)."""
  path = docs / RELIABILITY
  if not path.exists():
    raise DocsError(f'{path} is missing: it holds the case table the summary counts')
  lines = path.read_text().splitlines()
  if _CASES_HEADER not in lines:
    raise DocsError(f'{path}: no case table (a line {_CASES_HEADER!r})')
  rows = []
  for line in lines[lines.index(_CASES_HEADER) + 2 :]:
    if not line.startswith('|'):
      break
    cells = [c.strip() for c in re.split(r'(?<!\\)\|', line.strip().strip('|'))]
    rows.append(dict(zip(('area', 'case', 'handling', 'test'), cells)))
  return rows


def reliability_summary(docs: Path) -> str:
  """How many cases the table holds, per area, in the table's order."""
  rows = reliability_cases(docs)
  areas = list(dict.fromkeys(r['area'] for r in rows))
  counts = ', '.join(f'{a} {sum(r["area"] == a for r in rows)}' for a in areas)
  return _rows([f'**{len(rows)} cases**, each with its test ({counts}).'])


# --------------------------------------------------------------------------- links

# The guides at the top level, then every docs/*.md (by name), each with its first heading.
LINKED = ('BUILD.md', 'BENCHMARKS.md')


def doc_links(docs: Path) -> str:
  """A list of the project's other documents, for README.md: a new docs/*.md is listed by
  running launch.docs, and --check fails until it is."""
  root = docs.parent
  paths = [root / p for p in LINKED if (root / p).exists()] + sorted(docs.glob('*.md'))
  lines = []
  for path in paths:
    title = next(
      (x[2:].strip() for x in path.read_text().splitlines() if x.startswith('# ')), path.stem
    )
    rel = path.relative_to(root).as_posix()
    lines.append(f'- [{rel}]({rel}): {title}')
  return _rows(lines)


# --------------------------------------------------------------------------- the registry

_FRESH_MODELS = (
  'moemil',
  'moemil_no_wide_response',
  'moemil_clinical',
  'tnm',
  'tnm_ebv',
  'radiomics_linear',
  'wsi_meanpool',
  'ceiling',
  'oracle',
)
_SEEDS59_MODELS = (
  'moemil',
  'moemil_no_wide',
  'moemil_clinical',
  'radiomics_linear',
  'tnm_ebv',
  'ceiling',
)

TABLES: dict[str, Table] = {
  'headline_realistic': Table(lambda d, _: headline(d, 'realistic'), (HEADLINE_CSV,)),
  'headline_hard': Table(lambda d, _: headline(d, 'hard'), (HEADLINE_CSV,)),
  'slide_realistic': Table(
    lambda d, _: stress_table(d, SLIDE_CSV, 'realistic', _SLIDE_MODELS), (SLIDE_CSV,)
  ),
  'slide_hard': Table(lambda d, _: stress_table(d, SLIDE_CSV, 'hard', _SLIDE_MODELS), (SLIDE_CSV,)),
  'slide_bars': Table(lambda d, _: slide_bars(d, SLIDE_CSV), (SLIDE_CSV,)),
  'slide_bars_lr3': Table(lambda d, _: slide_bars(d, HEADLINE_CSV), (HEADLINE_CSV,)),
  'slide_lr3_realistic': Table(
    lambda d, _: stress_table(d, HEADLINE_CSV, 'realistic', _SLIDE_MODELS), (HEADLINE_CSV,)
  ),
  'slide_lr3_hard': Table(
    lambda d, _: stress_table(d, HEADLINE_CSV, 'hard', _SLIDE_MODELS), (HEADLINE_CSV,)
  ),
  'fresh_realistic': Table(
    lambda d, _: stress_table(d, 'stress_cpu_fresh.csv', 'realistic', _FRESH_MODELS),
    ('stress_cpu_fresh.csv',),
  ),
  'fresh_hard': Table(
    lambda d, _: stress_table(d, 'stress_cpu_fresh.csv', 'hard', _FRESH_MODELS),
    ('stress_cpu_fresh.csv',),
  ),
  'recipes_seeds0-4': Table(recipes, tuple(csv for csv, _ in RECIPES)),
  'all_seeds': Table(
    lambda d, _: all_seeds(d),
    (
      'stress_cpu_seeds0-9.csv',
      'stress_cpu_fresh.csv',
      'stress_cpu.csv',
      'stress_cpu_seeds5-9.csv',
    ),
  ),
  'seeds5-9': Table(
    lambda d, _: stress_table(
      d,
      'stress_cpu_seeds5-9.csv',
      'realistic',
      _SEEDS59_MODELS,
      labels={'moemil': 'MoEMIL with the wide survival term'},
      bold='best',
    ),
    ('stress_cpu_seeds5-9.csv',),
  ),
  'performance': Table(performance, BENCH_RUNS),
  'reliability_summary': Table(lambda d, _: reliability_summary(d), (RELIABILITY,)),
  'doc_links': Table(lambda d, _: doc_links(d), ('*.md',)),
}


# --------------------------------------------------------------------------- documents


def documents(root: Path = ROOT) -> list[Path]:
  """README.md, BUILD.md and docs/*.md under `root` (those that exist)."""
  paths: list[Path] = []
  for pattern in DOCUMENTS:
    paths += sorted(root.glob(pattern))
  return [p for p in paths if p.is_file()]


def regenerate(
  text: str, docs: Path, where: str = '<text>', link: str = ''
) -> tuple[str, list[str]]:
  """`text` with every marker block rewritten; also the names of the blocks that changed.

  link: the docs folder as the document links to it ('docs/' from README.md, '' in docs/).
  """
  out, changed, pos = [], [], 0
  for begin in _BEGIN.finditer(text):
    if begin.start() < pos:  # a begin marker inside a block already replaced
      continue
    name = begin.group(1)
    line = text.count('\n', 0, begin.start()) + 1
    if name not in TABLES:
      raise DocsError(f'{where}:{line}: unknown table {name!r}; known: {", ".join(TABLES)}')
    close = re.compile(f'^{re.escape(_END.format(name))}$', re.MULTILINE).search(text, begin.end())
    if close is None:
      raise DocsError(f'{where}:{line}: {begin.group(0)} has no {_END.format(name)}')
    end = close.start()
    new = '\n' + TABLES[name].render(docs, link)
    if text[begin.end() : end] != new:
      changed.append(name)
    out += [text[pos : begin.end()], new]
    pos = end
  out.append(text[pos:])
  return ''.join(out), changed


def run(root: Path = ROOT, check: bool = False) -> list[tuple[str, str]]:
  """Regenerates (or with check=True only compares) every document under `root`.

  Returns (document, table) for each block that differed from its outputs in root/docs.
  """
  docs = root / 'docs'
  stale = []
  for path in documents(root):
    rel = str(path.relative_to(root))
    text = path.read_text()
    link = os.path.relpath(docs, path.parent).replace(os.sep, '/') + '/'
    new, changed = regenerate(text, docs, rel, '' if link == './' else link)
    stale += [(rel, name) for name in changed]
    if changed and not check:
      path.write_text(new)
  return stale
