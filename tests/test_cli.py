"""The launch tools as a user runs them (real commands in subprocesses): --help, one-line
errors with exit status 2, Ctrl-C (130), extraction's summary line and exit status, configs
by name from any directory, external centers by name, quiet training logs."""

import csv
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from feature_store import manifest, store, synthetic_store
from launch import cli

ROOT = Path(__file__).resolve().parents[1]
TOOLS = {  # tool -> a flag of its own that --help must show
  'synth': '--patients',
  'extract': '--manifest',
  'train': '--workdir',
  'evaluate': '--pseudonymise',
  'sweep': '--folds',
  'explain': '--patients',
  'bench': '--quick',
  'stress': '--presets',
  'predict': '--model',
}


def _run(args, *, cwd=ROOT, timeout=300, env=None, exe=None):
  return subprocess.run(
    [exe] + list(args) if exe else [sys.executable, *args],
    cwd=cwd,
    capture_output=True,
    encoding='utf-8',
    errors='replace',
    timeout=timeout,
    env={**os.environ, **(env or {})},
  )


def _error_line(done, tool: str) -> str:
  """The single error line (the last one on stderr); no traceback anywhere."""
  assert done.returncode == 2, done.stderr[-3000:]
  assert 'Traceback' not in done.stderr, done.stderr[-3000:]
  errors = [line for line in done.stderr.splitlines() if ': error: ' in line]
  assert len(errors) == 1, done.stderr[-3000:]
  assert done.stderr.rstrip().splitlines()[-1] == errors[0]
  assert errors[0].startswith(f'launch.{tool}: error: ')
  return errors[0]


def _train(*args):
  return ['-m', 'launch.train', *args]


@pytest.fixture(scope='module')
def small_store(tmp_path_factory):
  return synthetic_store.make_store(
    tmp_path_factory.mktemp('store'), patients=60, seed=0, median_patches=16, max_patches=64
  )


@pytest.fixture(scope='module')
def named_centers_store(tmp_path_factory):
  """A 24-patient store whose centers are hospital names, not A and B."""
  root = synthetic_store.make_store(
    tmp_path_factory.mktemp('named'), patients=24, seed=2, median_patches=8, max_patches=16
  )
  table = pq.read_table(root / store.CLINICAL).to_pandas()
  table['center'] = table['center'].map({'A': 'Foshan', 'B': 'Guangzhou'})
  table.to_parquet(root / store.CLINICAL, index=False)
  return root


# --------------------------------------------------------------------------- --help


@pytest.mark.parametrize('tool', sorted(TOOLS))
def test_help_shows_a_usage_example_and_the_tools_own_flags(tool):
  done = _run(['-m', f'launch.{tool}', '--help'], timeout=120)
  assert done.returncode == 0, done.stderr[-2000:]
  lines = done.stdout.splitlines()
  assert lines[0].startswith(f'usage: python -m launch.{tool} --'), lines[0]
  assert TOOLS[tool] in done.stdout and '--verbose' in done.stdout
  assert 'Try --helpfull' not in done.stdout


@pytest.mark.parametrize('tool', sorted(t for t in TOOLS if t in cli.CONSOLE_SCRIPTS))
def test_console_script_help_shows_the_tools_own_flags(tool):
  script = Path(sys.executable).parent / f'moemil-{tool}'
  if not script.exists():
    pytest.skip(f'{script} not installed')
  done = _run(['--help'], exe=str(script), timeout=120)
  assert done.returncode == 0, done.stderr[-2000:]
  lines = done.stdout.splitlines()
  assert lines[0].startswith(f'usage: python -m launch.{tool} --')
  assert lines[1].startswith(f'   or: moemil-{tool} --')
  assert TOOLS[tool] in done.stdout
  flag_lines = [line for line in lines if line.startswith('  --')]
  assert len(flag_lines) >= 3, done.stdout  # the flags themselves, not "Try --helpfull"


# --------------------------------------------------------------------------- configs


def test_unknown_config_key_is_one_line_naming_it(small_store, tmp_path):
  # Outside the repository, with the README's path form and with the packaged name.
  for config in ('moemil_jax/configs/moemil.py', 'moemil'):
    done = _run(
      _train(
        f'--config={config}',
        f'--store={small_store}',
        f'--workdir={tmp_path / "run"}',
        '--config.model.nonexistent=3',
      ),
      cwd=tmp_path,
    )
    line = _error_line(done, 'train')
    assert "config.model has no key 'nonexistent'" in line and 'num_experts' in line
  near = _run(
    _train(
      '--config=moemil', f'--store={small_store}', '--workdir=x', '--config.model.num_expert=3'
    ),
    cwd=tmp_path,
  )
  line = _error_line(near, 'train')
  assert 'did you mean config.model.num_experts?' in line and '\\n' not in line
  assert not (tmp_path / 'run').exists() and not (tmp_path / 'x').exists()
  verbose = _run(
    _train('--config=moemil', '--workdir=x', '--config.model.nonexistent=3', '--verbose'),
    cwd=tmp_path,
  )
  assert verbose.returncode == 2 and 'Traceback' in verbose.stderr


@pytest.mark.slow  # day-to-day subset stays under 3 minutes
def test_configs_resolve_by_name_from_anywhere(tmp_path):
  for name in ('moemil', 'dlr', 'pathomics', 'paper', 'test'):
    # The config resolves: the one line is about the missing store, not the config.
    done = _run(
      _train(f'--config={name}', f'--store={tmp_path / "nostore"}', f'--workdir={tmp_path}/r'),
      cwd=tmp_path,
    )
    line = _error_line(done, 'train')
    assert 'not a feature store' in line and 'launch.extract' in line, line
    assert f'config: {name}, overrides: store=' in done.stderr
  done = _run(_train('--config=nonesuch', '--workdir=r'), cwd=tmp_path)
  line = _error_line(done, 'train')
  assert 'not a packaged config' in line and 'moemil' in line and 'pathomics' in line
  missing = _run(_train('--config=moemil'), cwd=tmp_path)
  assert '--workdir is required' in _error_line(missing, 'train')


def test_resolve_config_keeps_paths_and_finds_packaged_names(tmp_path):
  own = tmp_path / 'mine.py'
  own.write_text('def get_config():\n  return None\n')
  assert cli.resolve_config(str(own)) == str(own)
  assert cli.resolve_config('dlr') == str(cli.CONFIG_DIR / 'dlr.py')
  assert cli.resolve_config('moemil:arg') == f'{cli.CONFIG_DIR / "moemil.py"}:arg'
  assert cli.resolve_config('/elsewhere/moemil_jax/configs/paper.py') == str(
    cli.CONFIG_DIR / 'paper.py'
  )
  with pytest.raises(cli.UserError, match='not a packaged config'):
    cli.resolve_config('/elsewhere/moemil.py')


# --------------------------------------------------------------------------- training


def test_too_few_patients_is_one_line(tmp_path):
  tiny = synthetic_store.make_store(tmp_path / 'store', patients=6, seed=1, median_patches=4)
  done = _run(_train('--config=moemil', f'--store={tiny}', f'--workdir={tmp_path / "r"}'))
  line = _error_line(done, 'train')
  assert 'development patients' in line and 'at least 10' in line and 'add patients' in line
  assert not (tmp_path / 'r').exists()


def test_unknown_test_center_names_the_stores_centers(named_centers_store, tmp_path):
  done = _run(
    _train(
      '--config=moemil',
      f'--store={named_centers_store}',
      f'--workdir={tmp_path / "r"}',
      '--config.split.test_center=B',
    )
  )
  line = _error_line(done, 'train')
  assert "test_center='B'" in line and 'Foshan, Guangzhou' in line
  no_val = _run(
    _train(
      '--config=moemil',
      '--ensemble=0',
      f'--store={named_centers_store}',
      f'--workdir={tmp_path / "r"}',
      '--config.split.val_fraction=0',
    )
  )
  assert 'one model needs validation patients' in _error_line(no_val, 'train')


def test_interrupted_training_says_how_to_resume(small_store, tmp_path):
  proc = subprocess.Popen(
    [
      sys.executable,
      '-m',
      'launch.train',
      '--config=test',
      f'--store={small_store}',
      f'--workdir={tmp_path / "r"}',
    ],
    cwd=ROOT,
    stdout=subprocess.PIPE,
    stderr=subprocess.PIPE,
    encoding='utf-8',
    errors='replace',
  )
  seen = []
  for line in proc.stderr:  # the first log line comes from main, past flag parsing
    seen.append(line)
    if 'external test center' in line:
      break
  proc.send_signal(signal.SIGINT)
  out, err = proc.communicate(timeout=120)
  assert proc.returncode == cli.EXIT_INTERRUPTED, ''.join(seen) + err
  last = err.rstrip().splitlines()[-1]
  assert last.startswith('launch.train: interrupted: the checkpoints in')
  assert '--resume' in last and 'Traceback' not in err


@pytest.mark.slow  # trains the default five-member ensemble for 30 epochs (about a minute)
def test_default_training_prints_at_most_30_lines(small_store, tmp_path):
  workdir = tmp_path / 'runs' / 'moemil'
  done = _run(
    _train('--config=moemil', f'--store={small_store}', f'--workdir={workdir}'), timeout=900
  )
  assert done.returncode == 0, done.stderr[-3000:]
  lines = (done.stdout + done.stderr).splitlines()
  assert len(lines) <= 30, '\n'.join(lines)
  text = '\n'.join(lines)
  for noise in ('NumExpr', "initialize backend 'tpu'", 'checkpoint', 'name: moemil'):
    assert noise not in text
  assert f'config: moemil, overrides: store={small_store}' in text
  assert 'external test center: B (the second of centers A, B by name' in text
  assert re.fullmatch(
    r'best epoch \d+: out-of-fold AUC (\d\.\d{3}|undefined), C-index (\d\.\d{3}|undefined) -> '
    + re.escape(f'{workdir}; next: python -m launch.evaluate --workdir={workdir.parent}'),
    done.stdout.strip().splitlines()[-1],
  )
  info = json.loads((workdir / 'run.json').read_text())
  assert (
    info['config']['model']['num_experts'] == 4 and info['config']['split']['test_center'] == 'B'
  )


@pytest.mark.slow  # trains one model for two epochs
def test_named_centers_default_to_the_second_by_name(named_centers_store, tmp_path):
  import pandas as pd

  workdir = tmp_path / 'runs' / 'moemil'
  done = _run(
    _train(
      '--config=test',
      '--config.split.test_center=',
      f'--store={named_centers_store}',
      f'--workdir={workdir}',
      '--config.train.epochs=2',
    ),
    timeout=600,
  )
  assert done.returncode == 0, done.stderr[-3000:]
  assert 'external test center: Guangzhou (the second of centers Foshan, Guangzhou' in done.stderr
  pred = pd.read_parquet(workdir / 'predictions.parquet')
  assert ((pred.split == 'test') == (pred.center == 'Guangzhou')).all()
  assert re.fullmatch(
    r'best epoch \d+: val AUC \S+, C-index \S+ -> .*; next: python -m launch.evaluate '
    r'--workdir=.*',
    done.stdout.strip().splitlines()[-1],
  )
  again = _run(
    _train('--config=test', f'--store={named_centers_store}', f'--workdir={workdir}'), timeout=120
  )
  assert 'already holds a run: pass --resume' in _error_line(again, 'train')


# --------------------------------------------------------------------------- evaluation


def test_evaluate_wrong_workdirs_are_one_line(tmp_path):
  def evaluate(workdir):
    return _run(['-m', 'launch.evaluate', f'--workdir={workdir}'])

  line = _error_line(evaluate(tmp_path / 'missing'), 'evaluate')
  assert 'no such folder' in line and 'launch.train' in line
  runs = tmp_path / 'runs'
  for name, model in (('moemil', 'moemil'), ('moemil_again', 'moemil')):
    (runs / name).mkdir(parents=True)
    (runs / name / 'predictions.parquet').write_bytes(b'')
    (runs / name / 'run.json').write_text(json.dumps({'model': model}))
  line = _error_line(evaluate(runs / 'moemil'), 'evaluate')
  assert "is one model's folder" in line and f'--workdir={runs}' in line
  line = _error_line(evaluate(runs), 'evaluate')
  assert "are both model 'moemil'" in line and '--config.name' in line
  (tmp_path / 'empty' / 'dlr' / 'checkpoints').mkdir(parents=True)
  line = _error_line(evaluate(tmp_path / 'empty'), 'evaluate')
  assert 'no trained model' in line and 'dlr started training' in line


# --------------------------------------------------------------------------- extraction


def _row(pid, **kw):
  row = dict.fromkeys(manifest.MANIFEST_COLUMNS, '')
  row.update(
    patient_id=pid,
    center='Guangzhou',
    age='51',
    sex='M',
    ebv_dna='1200',
    t_stage='3',
    n_stage='1',
    overall_stage='III',
    ic_response='1',
    os_months='40',
    os_event='0',
  )
  row.update(kw)
  return row


def _manifest(path: Path, rows, *, bom=False) -> Path:
  with open(path, 'w', newline='', encoding='utf-8-sig' if bom else 'utf-8') as f:
    w = csv.DictWriter(f, list(manifest.MANIFEST_COLUMNS))
    w.writeheader()
    w.writerows(rows)
  return path


def _extract(manifest_path, store_dir, *extra):
  return _run(
    [
      '-m',
      'launch.extract',
      f'--manifest={manifest_path}',
      f'--store={store_dir}',
      '--encoder_weights=random',
      *extra,
    ]
  )


@pytest.mark.slow  # day-to-day subset stays under 3 minutes
def test_extraction_of_an_excel_manifest_with_named_centers(tmp_path):
  path = _manifest(tmp_path / 'manifest.csv', [_row('P1'), _row('P2', center='Foshan')], bom=True)
  done = _extract(path, tmp_path / 'store')
  assert done.returncode == 0, done.stderr[-3000:]
  assert done.stdout.strip().splitlines()[-1] == '2 patients extracted, 0 rejected, 0 failed'
  assert done.stderr.count('encoder weights are RANDOM') == 1
  clinical = pq.read_table(tmp_path / 'store' / store.CLINICAL).to_pandas()
  assert clinical.center.tolist() == ['Guangzhou', 'Foshan']


@pytest.mark.slow  # day-to-day subset stays under 3 minutes
def test_extraction_with_rejected_rows_exits_1_unless_keep_going(tmp_path):
  path = _manifest(tmp_path / 'manifest.csv', [_row('P1'), _row('P2', slides='missing.tiff')])
  done = _extract(path, tmp_path / 'store')
  assert done.returncode == 1, done.stderr[-3000:]
  assert "line 3, column 'slides': file not found" in done.stderr
  failures = tmp_path / 'store' / 'failures.parquet'
  assert done.stdout.strip().splitlines()[-1] == (
    f'1 patients extracted, 1 rejected, 0 failed: see {failures}'
  )
  assert pq.read_table(failures).column('stage').to_pylist() == ['manifest']
  kept = _extract(path, tmp_path / 'store', '--keep_going')
  assert kept.returncode == 0, kept.stderr[-3000:]
  assert kept.stdout.strip().splitlines()[-1].startswith('1 patients extracted, 1 rejected')


@pytest.mark.slow  # day-to-day subset stays under 3 minutes
def test_extraction_with_no_valid_row_assembles_no_store(tmp_path):
  path = _manifest(
    tmp_path / 'manifest.csv', [_row('P1', os_months='-1'), _row('P2', slides='missing.tiff')]
  )
  line = _error_line(_extract(path, tmp_path / 'store'), 'extract')
  assert 'no valid patient row (2 problems' in line
  assert not (tmp_path / 'store').exists()
  line = _error_line(_extract(tmp_path / 'nope.csv', tmp_path / 'store'), 'extract')
  assert 'no such manifest file' in line


@pytest.mark.slow  # three extraction runs (about 25 s)
def test_patients_dropped_from_the_manifest_are_kept_with_a_warning_or_pruned(tmp_path):
  import numpy as np

  from moemil_jax import store_reader

  path = _manifest(tmp_path / 'manifest.csv', [_row('P1'), _row('P2', center='Foshan')])
  store_dir = tmp_path / 'store'
  assert _extract(path, store_dir).returncode == 0
  # P3's slide, from an earlier run whose manifest still listed P3.
  sha = store.read_store_json(store_dir)['wsi']['fingerprint_sha256']
  store.write_slide(
    store_dir, 'P3_s1', 'P3', np.zeros((2, 2)), np.ones((2, 1024)), {'fingerprint_sha256': sha}
  )
  kept = _extract(path, store_dir)
  assert kept.returncode == 0, kept.stderr[-3000:]
  assert 'patient(s) no longer in the manifest (P3)' in kept.stderr
  assert kept.stdout.strip().splitlines()[-1] == (
    '2 patients extracted, 0 rejected, 0 failed; 1 in the store but no longer in the manifest: '
    'kept, --prune removes them'
  )
  cohort = store_reader.load_store(store_dir)  # training ignores P3 instead of refusing
  assert sorted(cohort.patient_id) == ['P1', 'P2'] and len(cohort.patches) == 0
  pruned = _extract(path, store_dir, '--prune')
  assert pruned.returncode == 0, pruned.stderr[-3000:]
  assert 'pruned P3: 1 file(s), no longer in the manifest' in pruned.stderr
  assert pruned.stdout.strip().splitlines()[-1].endswith('no longer in the manifest: pruned')
  assert not store.slide_files(store_dir)


@pytest.mark.slow  # ResNet50 on a few slides, interrupted, then the rerun
def test_ctrl_c_during_extraction_keeps_the_store_and_the_rerun_resumes(tmp_path):
  from feature_store.synthetic_cohort import make_cohort

  path = make_cohort(
    tmp_path / 'cohort', patients=4, seed=5, slide_px=512, mri_px=32, mri_slices=6, progress=False
  )
  with open(path, newline='') as f:
    rows = [dict(r, mri_t1='', mri_t2='', mri_t1c='', mri_mask='') for r in csv.DictReader(f)]
  _manifest(path, rows)  # slides only: the MRI would only add minutes
  store_dir = tmp_path / 'store'
  args = [
    f'--manifest={path}',
    f'--store={store_dir}',
    '--encoder_weights=random',
    '--target_mpp=4.0',
    '--patch_px=32',
    '--batch_size=8',
    '--workers=2',
    '--tissue_min_area=0.1',
    '--tissue_fraction=0.25',
  ]
  proc = subprocess.Popen(
    [sys.executable, '-m', 'launch.extract', *args],
    cwd=ROOT,
    stdout=subprocess.PIPE,
    stderr=subprocess.PIPE,
    encoding='utf-8',
    errors='replace',
  )
  deadline = time.monotonic() + 300
  while not store.slide_files(store_dir) and proc.poll() is None and time.monotonic() < deadline:
    time.sleep(0.05)
  proc.send_signal(signal.SIGINT)
  _, err = proc.communicate(timeout=120)
  assert proc.returncode == cli.EXIT_INTERRUPTED, err[-3000:]
  assert 'Traceback' not in err
  assert err.rstrip().splitlines()[-1] == (
    'launch.extract: interrupted: the store is intact (every finished slide and MRI is kept); '
    'run the same command again to resume'
  )
  assert not (store_dir / store.STORE_JSON).exists()
  done_before = len(store.slide_files(store_dir))
  rerun = _run(['-m', 'launch.extract', *args])
  assert rerun.returncode == 0, rerun.stderr[-3000:]
  assert f'skipped {done_before};' in rerun.stdout
  assert rerun.stdout.strip().splitlines()[-1] == '4 patients extracted, 0 rejected, 0 failed'
