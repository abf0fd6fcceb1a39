"""The report: files in the workdir, tables, PNGs, and report.html rendered in headless Chromium."""

import base64
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import matplotlib.image
import numpy as np
import pandas as pd
import pytest
from test_evaluation import write_workdir

from moemil_jax import evaluation, report

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM_FLAGS = (
  '--headless',
  '--no-sandbox',
  '--disable-gpu',
  '--disable-background-networking',
  '--disable-component-update',
  '--disable-sync',
  '--no-first-run',
)
# Marks <body> with how many images exist and how many decoded (naturalWidth > 0).
IMAGE_PROBE = (
  "<script>window.addEventListener('load', () => {const imgs = [...document.images];"
  'document.body.dataset.images = imgs.length; document.body.dataset.loaded = '
  'imgs.filter(i => i.complete && i.naturalWidth > 0).length;});</script>'
)
# ROC, calibration, DCA per split + KM per model (6) per split + the added-value decision
# curves (MoEMIL + clinical vs TNM + EBV DNA) on validation and external test
N_IMAGES = 3 * 3 + 6 * 3 + 2


@pytest.fixture(scope='module')
def written(tmp_path_factory):
  workdir = write_workdir(tmp_path_factory.mktemp('report'))
  ev = evaluation.evaluate(workdir, n_bootstrap=50)
  return workdir, ev, report.write_report(ev, workdir)


def test_report_files(written):
  workdir, ev, paths = written
  assert json.loads((workdir / 'metrics.json').read_text()) == ev.results
  comparison = pd.read_csv(workdir / 'comparison.csv', index_col=0)
  assert list(comparison.index) == [
    'MoEMIL',
    'MoEMIL + clinical (TNM, EBV DNA)',
    'DLR',
    'Pathomics',
    'TNM',
    'TNM + EBV DNA',
  ]
  md = (workdir / 'comparison.md').read_text().splitlines()
  assert md[0].startswith('| Model') and set(md[1]) <= {'|', '-', ' '} and len(md) == 8
  for split in evaluation.SPLITS:
    assert (workdir / f'response_{split}.md').exists() and (
      workdir / f'survival_{split}.csv'
    ).exists()
  pngs = sorted((workdir / report.FIGURES).glob('*.png'))
  assert len(pngs) == N_IMAGES
  for png in pngs:
    img = matplotlib.image.imread(png)
    assert img.shape[0] > 200 and img.shape[1] > 200 and img.std() > 0, png


def test_html_is_self_contained(written):
  workdir, _, _ = written
  text = (workdir / 'report.html').read_text()
  sources = re.findall(r'<img src="([^"]+)"', text)
  assert len(sources) == N_IMAGES
  for src in sources:
    assert src.startswith('data:image/png;base64,')
    assert base64.b64decode(src.split(',', 1)[1])[:8] == b'\x89PNG\r\n\x1a\n'
  assert 'http://' not in text and 'https://' not in text
  assert 'MoEMIL' in text and 'External test' in text


def _render_counts(chromium: str, html_text: str, tmp_path) -> tuple[int, int]:
  page = tmp_path / 'probe.html'
  page.write_text(html_text.replace('</body>', IMAGE_PROBE + '</body>'))
  profile = tmp_path / f'profile-{len(list(tmp_path.iterdir()))}'
  result = subprocess.run(
    [
      chromium,
      *CHROMIUM_FLAGS,
      f'--user-data-dir={profile}',
      '--virtual-time-budget=10000',
      '--dump-dom',
      page.as_uri(),
    ],
    capture_output=True,
    text=True,
    timeout=180,
  )
  assert result.returncode == 0, result.stderr[-2000:]
  body = re.search(r'<body[^>]*>', result.stdout)
  assert body, result.stdout[:500]
  images = re.search(r'data-images="(\d+)"', body.group(0))
  loaded = re.search(r'data-loaded="(\d+)"', body.group(0))
  assert images and loaded, f'the probe did not run: {body.group(0)}'
  return int(images.group(1)), int(loaded.group(1))


def test_report_renders_in_headless_chromium(written, tmp_path):
  chromium = shutil.which('chromium') or shutil.which('chromium-browser')
  if chromium is None:
    pytest.skip(
      'chromium not installed (Debian: apt-get install -y chromium); '
      'cannot check that report.html renders'
    )
  workdir, _, _ = written
  text = (workdir / 'report.html').read_text()
  assert _render_counts(chromium, text, tmp_path) == (N_IMAGES, N_IMAGES)
  # Negative control: a corrupted image must be counted as not loaded.
  first = re.search(r'data:image/png;base64,([A-Za-z0-9+/=]{40})', text)
  broken = text.replace(first.group(1), 'A' * 40, 1)
  assert _render_counts(chromium, broken, tmp_path) == (N_IMAGES, N_IMAGES - 1)


def test_to_markdown_escapes_and_aligns():
  df = pd.DataFrame({'Model': ['A|B', 'C'], 'AUC': ['0.9', '0.85 (0.8-0.9)']}).set_index('Model')
  md = report.to_markdown(df).splitlines()
  assert md[2].startswith('| A\\|B') and len({len(line) for line in md}) == 1


@pytest.mark.slow  # day-to-day subset stays under 3 minutes
def test_launch_evaluate_prints_table_and_writes_report(tmp_path):
  workdir = write_workdir(tmp_path)
  result = subprocess.run(
    [sys.executable, '-m', 'launch.evaluate', f'--workdir={workdir}', '--n_bootstrap=20'],
    cwd=ROOT,
    capture_output=True,
    text=True,
    timeout=600,
  )
  assert result.returncode == 0, result.stderr[-3000:]
  assert 'AUC (95% CI)' in result.stdout and 'TNM' in result.stdout
  assert (workdir / 'report.html').exists() and (workdir / 'metrics.json').exists()
  assert np.isfinite(
    json.loads((workdir / 'metrics.json').read_text())['per_model']['moemil']['response']['test'][
      'auc'
    ]
  )
