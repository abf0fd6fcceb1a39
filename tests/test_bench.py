"""The benchmark suite in --quick mode as a smoke test: it runs and reports every figure.

No timing is asserted (the machine is shared); only that each figure was measured, is a
finite number and lands in bench.json and BENCH.md.
"""

import json
import math

import pytest

from moemil_jax.bench import suite

pytestmark = pytest.mark.slow  # the quick benchmark suite (about 4 minutes)

EXPECTED = {
  'p1',
  'p2_paper_bags',
  'p2_small_bags',
  'p3',
  'p4_encoder',
  'p4_naive',
  'p5',
  'p5_bytes',
  'p6',
}


def test_quick_suite_reports_every_figure(tmp_path):
  report = suite.run_suite(quick=True, workdir=tmp_path / 'work')
  json_path, md_path = suite.write_reports(report, tmp_path / 'out')
  saved = json.loads(json_path.read_text())
  assert saved['errors'] == {}, saved['errors']
  figures = {f['key']: f for f in saved['figures']}
  assert set(figures) == EXPECTED
  for key, f in figures.items():
    assert (
      isinstance(f['measured'], float) and math.isfinite(f['measured']) and f['measured'] > 0
    ), key
    assert isinstance(f['met'], bool)
  assert saved['machine']['cpu_count'] >= 1 and saved['mode'] == 'quick'
  # The reference epoch and ours trained the same batches of real patches.
  for regime in saved['details']['p2'].values():
    assert 0 < regime['real_patch_fraction'] <= 1 and regime['steps_per_epoch'] >= 1
  text = md_path.read_text()
  assert '| figure | measured | target | met? |' in text and 'Machine:' in text
  assert text.count('\n| P') == len(EXPECTED)
