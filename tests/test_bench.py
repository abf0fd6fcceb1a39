"""The benchmark suite in --quick mode as a smoke test: it runs and reports every figure.

No timing is asserted (the machine is shared). Checked: each figure was measured, is a
finite number and lands in bench.json and BENCH.md, and the relations that a broken
benchmark would violate hold: real-slot FLOPs within the compiled step's, padding as
recomputed from the batches, and both sides of P2 training the same patients and patches.
"""

import json
import math

import numpy as np
import pytest

from moemil_jax.bench import suite, training

pytestmark = pytest.mark.slow  # the quick benchmark suite (a few minutes)

EXPECTED = {
  'p1',
  'padding',
  'p2_paper_bags',
  'p2_small_bags',
  'p2_clam_as_run',
  'p3',
  'p4_encoder',
  'p4_naive',
  'p4_stain',
  'p4_stain_reinhard',
  'p4_stain_macenko_slide',
  'p4_stain_reinhard_slide',
  'p4_stain_macenko_center',
  'p4_stain_reinhard_center',
  'p4_stain_histogram_center',
  'p4_augment',
  'p5',
  'p5_bytes',
  'p5_gbps',
  'p6',
  'eval_cindex_ci_1e5_s',
  'eval_tdauc_1e5_mb',
}


@pytest.fixture(scope='module')
def quick_report(tmp_path_factory):
  tmp = tmp_path_factory.mktemp('bench')
  report = suite.run_suite(quick=True, workdir=tmp / 'work')
  json_path, md_path = suite.write_reports(report, tmp / 'out')
  return json.loads(json_path.read_text()), md_path.read_text(), tmp / 'work'


def test_quick_suite_reports_every_figure(quick_report):
  saved, text, _ = quick_report
  assert saved['errors'] == {}, saved['errors']
  figures = {f['key']: f for f in saved['figures']}
  assert set(figures) == EXPECTED
  for key, f in figures.items():
    assert isinstance(f['measured'], float) and math.isfinite(f['measured']), key
    assert f['measured'] >= 0 if key == 'padding' else f['measured'] > 0, key
    assert isinstance(f['met'], bool)
  assert saved['machine']['cpu_count'] >= 1 and saved['mode'] == 'quick'
  assert '| figure | measured | target | met? |' in text and 'Machine:' in text
  rows = [line for line in text.splitlines() if line.startswith('| ')]
  assert len(rows) == 1 + len(EXPECTED)  # the header, then one row per figure
  assert len(saved['not_measured']) == 2 and 'need a GPU' in text


def test_p5_gbps_is_the_loaded_embeddings_over_the_load_time(quick_report):
  """Every patch's float16 embedding is counted once, and the rate is bytes / median time."""
  p5 = quick_report[0]['details']['p5']
  assert p5['embedding_bytes'] == p5['patches'] * p5['payload_bytes_per_patch']
  assert p5['schema_version'] == 2 and p5['bytes_per_patch'] >= p5['payload_bytes_per_patch']
  assert math.isclose(p5['p5_gbps'], p5['embedding_bytes'] / p5['load_store_s'] / 1e9)


def test_p1_counts_real_slots_within_the_compiled_step(quick_report):
  p1 = quick_report[0]['details']['p1']
  assert 0 < p1['real_slots'] <= p1['slots']
  assert 0 < p1['real_flops_per_epoch'] <= p1['compiled_flops_per_epoch']
  assert p1['compiled_flops_per_epoch'] == pytest.approx(p1['step_flops'] * p1['steps'])
  # The affine fit from XLA's cost analysis agrees with the analytic matmul count.
  assert 0.9 < p1['xla_over_analytic_per_slot'] < 1.5
  assert 0 <= p1['fixed_flops_share'] < 1
  assert p1['fraction_of_peak'] == pytest.approx(
    p1['real_flops_per_epoch'] / p1['epoch_steps_s'] / p1['matmul_peak_flops_per_s']
  )


def test_padding_is_recomputed_from_the_batches(quick_report):
  saved, _, workdir = quick_report
  details = saved['details']['padding']
  setups = training.setups(True, workdir)  # the stores the suite wrote
  for name, s in setups.items():
    d = details[name]
    real = slots = 0
    for e in range(d['epochs']):
      for b in s.batches(e):
        in_bags = sum(len(rows) for _, rows in b.patient_rows())
        assert in_bags == int((b.patch_segment < b.rows).sum())
        real += in_bags
        slots += b.patch_segment.size
    assert (d['real_slots'], d['slots']) == (real, slots)
    assert slots >= real > 0  # padded step slots hold every real patch
    assert d['padding'] == pytest.approx(1 - real / slots)
  paper = next(f for f in saved['figures'] if f['key'] == 'padding')
  assert paper['measured'] == pytest.approx(details['paper_bags']['padding'])


def test_p2_sides_train_the_same_patients(quick_report):
  saved = quick_report[0]
  for name, r in saved['details']['p2'].items():
    assert r['torch_device'] == 'cpu'
    # Every patient once an epoch, on each side; and the same patches.
    for side in ('jax', 'torch', 'clam'):
      assert r[f'{side}_patients_per_epoch'] == r['patients'], (name, side)
      assert r[f'{side}_patches_per_epoch'] == r['jax_patches_per_epoch'], (name, side)
    assert 0 <= r['padding'] < 1 and r['steps_per_epoch'] >= 1
    assert r['speedup'] == pytest.approx(r['torch_epoch_s'] / r['jax_epoch_s'])
    assert r['clam_speedup'] == pytest.approx(r['clam_epoch_s'] / r['jax_epoch_s'])


def test_p3_times_include_the_store_load(quick_report):
  p3 = quick_report[0]['details']['p3']
  assert p3['vmapped_s'] >= p3['vmapped_train_s'] > 0
  assert p3['speedup'] == pytest.approx(p3['separate_trainings_s'] / p3['vmapped_s'])


def test_pt_files_hold_the_store_bags(quick_report, tmp_path):
  import torch

  s = training.setups(True, quick_report[2])['small_bags']
  files = training.write_pt_files(s, tmp_path / 'pt')
  assert sorted(files) == list(np.flatnonzero(s.cohort.patch_count > 0))
  for p in (min(files), int(np.argmax(s.cohort.patch_count))):
    bag = torch.cat([torch.load(f, weights_only=True) for f in files[p]]).numpy()
    start = s.cohort.patch_offset[p]
    expected = s.cohort.patches[start : start + s.cohort.patch_count[p]].astype(np.float32)
    np.testing.assert_array_equal(bag, expected)
