"""Generated result tables (moemil_jax/docs_tables.py, python -m launch.docs)."""

import csv
import decimal
import re
import shutil
import statistics
import subprocess
import sys

import pytest

from moemil_jax import docs_tables

ROOT = docs_tables.ROOT


def _docs_cmd(*args, root=None):
  cmd = [sys.executable, '-m', 'launch.docs', *args]
  if root is not None:
    cmd.append(f'--root={root}')
  return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)


@pytest.fixture()
def repo_copy(tmp_path):
  """README.md, BUILD.md and docs/ copied, plus a page holding every generated table."""
  for name in ('README.md', 'BUILD.md'):
    shutil.copy(ROOT / name, tmp_path / name)
  shutil.copytree(ROOT / 'docs', tmp_path / 'docs')
  blocks = ''.join(
    f'<!-- generated:{n} -->\n<!-- /generated:{n} -->\n\n' for n in docs_tables.TABLES
  )
  (tmp_path / 'docs' / 'all_tables.md').write_text(f'# every table\n\n{blocks}')
  docs_tables.run(tmp_path)  # fills the new page; the committed documents are already current
  return tmp_path


def test_committed_documents_match_the_committed_outputs():
  assert docs_tables.run(ROOT, check=True) == []


def test_the_readme_holds_the_headline_and_performance_tables():
  text = (ROOT / 'README.md').read_text()
  for name in ('headline_realistic', 'headline_hard', 'performance'):
    assert f'<!-- generated:{name} -->' in text and f'<!-- /generated:{name} -->' in text


def test_a_hand_edited_number_fails_the_check_naming_file_and_table(repo_copy):
  assert _docs_cmd('--check', root=repo_copy).returncode == 0
  page = repo_copy / 'docs' / 'all_tables.md'
  text = page.read_text()
  start = text.index('<!-- generated:headline_hard -->')
  end = text.index('<!-- /generated:headline_hard -->')
  block = text[start:end]
  mean = block.split('| **MoEMIL** | **')[1][:5]  # MoEMIL's mean AUC, e.g. 0.592
  edited = block.replace(f'**{mean}**', '**0.999**', 1)
  assert edited != block
  page.write_text(text[:start] + edited + text[end:])

  proc = _docs_cmd('--check', root=repo_copy)
  assert proc.returncode == 1
  assert 'docs/all_tables.md: table headline_hard differs' in proc.stderr
  assert 'headline_realistic' not in proc.stderr  # only the edited table is named
  assert '0.999' in page.read_text()  # --check changes nothing

  assert _docs_cmd(root=repo_copy).returncode == 0  # regenerating puts the measured value back
  assert '0.999' not in page.read_text() and f'**{mean}**' in page.read_text()
  assert _docs_cmd('--check', root=repo_copy).returncode == 0


def test_a_new_run_in_docs_is_a_stale_table(repo_copy):
  path = repo_copy / 'docs' / 'stress_cpu_seeds5-9.csv'
  rows = list(csv.DictReader(path.open()))
  rows[0]['auc'] = '0.9999'
  with path.open('w', newline='') as f:
    w = csv.DictWriter(f, fieldnames=list(rows[0]))
    w.writeheader()
    w.writerows(rows)
  stale = docs_tables.run(repo_copy, check=True)
  readers = {n for n, t in docs_tables.TABLES.items() if 'stress_cpu_seeds5-9.csv' in t.sources}
  assert readers == {'seeds5-9', 'all_seeds'}
  assert {table for doc, table in stale if doc == 'docs/all_tables.md'} == readers


def test_means_and_ranges_match_a_plain_reading_of_the_csv():
  """The fresh-seed MoEMIL cell against the standard library's mean of the CSV rows."""
  rows = [
    r
    for r in csv.DictReader((ROOT / 'docs' / docs_tables.HEADLINE_CSV).open())
    if r['preset'] == 'realistic' and r['model'] == 'moemil'
  ]
  auc = [float(r['auc']) for r in rows]
  text = docs_tables.headline(ROOT / 'docs', 'realistic')

  def half_up(x):  # the CSV's 4-decimal values end in 5 at times (0.7725 -> 0.773)
    return str(decimal.Decimal(repr(x)).quantize(decimal.Decimal('0.001'), decimal.ROUND_HALF_UP))

  cell = f'**{half_up(round(statistics.mean(auc), 9))}** ({half_up(min(auc))}-{half_up(max(auc))})'
  assert cell in text
  assert f'{len(rows)} fresh cohort seeds' in text


def test_bars_missed_is_moemil_below_the_best_simple_baseline(tmp_path):
  rows = []
  for preset in ('realistic', 'hard'):
    for model, auc, cindex in (
      ('moemil', 0.70, 0.60),
      ('radiomics_linear', 0.65, 0.62 if preset == 'hard' else 0.55),
      ('tnm', 0.50, 0.50),
      ('ceiling', 0.90, 0.90),
    ):
      rows.append(f'{preset},0,{model},{auc},{cindex}')
  for name, _ in docs_tables.RECIPES:
    (tmp_path / name).write_text('preset,seed,model,auc,cindex\n' + '\n'.join(rows) + '\n')
  text = docs_tables.recipes(tmp_path)
  assert text.count('| hard C-index |') == len(docs_tables.RECIPES)
  assert '0.700 / 0.600 | 0.700 / 0.600 | hard C-index' in text


def test_rounding_is_half_up_whatever_the_float_noise():
  assert docs_tables.fmt(0.6665) == '0.667'
  assert docs_tables.fmt((0.7285 + 0.7285 + 0.7285) / 3) == '0.729'
  assert docs_tables.fmt(0.61049) == '0.610'
  assert docs_tables.fmt(0.8789, 2) == '0.88'


def test_a_broken_marker_names_the_file_and_line(tmp_path):
  (tmp_path / 'docs').mkdir()
  shutil.copy(ROOT / 'docs' / 'stress_cpu_fresh.csv', tmp_path / 'docs')
  (tmp_path / 'README.md').write_text('# x\n\n<!-- generated:headline_hard -->\n| old |\n')
  with pytest.raises(
    docs_tables.DocsError, match=r'README.md:3: .*has no <!-- /generated:headline_hard -->'
  ):
    docs_tables.run(tmp_path, check=True)
  (tmp_path / 'README.md').write_text(
    '<!-- generated:no_such_table -->\n<!-- /generated:no_such_table -->\n'
  )
  proc = _docs_cmd('--check', root=tmp_path)
  assert proc.returncode == 2
  assert "README.md:1: unknown table 'no_such_table'" in proc.stderr
  assert len(proc.stderr.strip().splitlines()) == 1


def test_every_test_the_reliability_table_names_exists():
  cases = docs_tables.reliability_cases(ROOT / 'docs')
  assert len(cases) > 40
  named = 0
  for case in cases:
    current = None
    for ref in re.findall(r'`([^`]*::[^`]*)`', case['test']):
      file, _, name = ref.partition('::')
      current = file or current
      source = (ROOT / 'tests' / current).read_text()
      assert f'def {name}(' in source, f'{case["area"]} / {case["case"]}: {current}::{name}'
      named += 1
  assert named >= len(cases)


def test_the_reliability_summary_counts_the_case_table(tmp_path):
  (tmp_path / 'docs').mkdir()
  (tmp_path / 'docs' / 'reliability.md').write_text(
    '<!-- generated:reliability_summary -->\n<!-- /generated:reliability_summary -->\n\n'
    '| Area | Case | Handling | Test |\n| --- | --- | --- | --- |\n'
    '| Slides | a | b | `t.py::x` |\n| Slides | c \\| d | e | f |\n| MRI | g | h | i |\n\nafter\n'
  )
  docs_tables.run(tmp_path)
  text = (tmp_path / 'docs' / 'reliability.md').read_text()
  assert '**3 cases**, each with its test (Slides 2, MRI 1).' in text


def _slug(heading: str) -> str:
  """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
  return re.sub(r'[^\w\- ]', '', heading.strip().lower()).replace(' ', '-')


def test_every_local_link_and_anchor_in_the_documents_resolves():
  broken = []
  for doc in docs_tables.documents(ROOT):
    for target in re.findall(r'\]\(([^)\s]+)\)', doc.read_text()):
      if re.match(r'[a-z]+:', target):
        continue  # a URL
      path, _, anchor = target.partition('#')
      file = (doc.parent / path).resolve() if path else doc
      if not file.exists():
        broken.append(f'{doc.name}: {target}')
        continue
      if anchor:
        heads = [_slug(x.lstrip('#')) for x in file.read_text().splitlines() if x.startswith('#')]
        if anchor not in heads:
          broken.append(f'{doc.name}: {target}')
  assert not broken
