"""Shared fixtures: the real test data beside the checkout, and small synthetic data.

`./launch/test.sh` runs the suite on pytest-xdist workers, one file per worker at a time
(`--dist loadfile`, so each module-scoped fixture is built once). Below: the heaviest files
are collected first, so that the long ones start early and no worker is left with one at
the end, and each worker's PyTorch keeps to its share of the cores.
"""

import locale
import os
import warnings
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / 'shared' / 'data'

# Two workers on two cores: PyTorch (ResNet50 extraction, here and in the subprocesses the
# tests start) would otherwise run a thread per core in each worker and the workers would
# fight over the cores. Set before any test module imports torch; a value given is kept.
_WORKERS = int(os.environ.get('PYTEST_XDIST_WORKER_COUNT', '1'))
if _WORKERS > 1:
  _THREADS = str(max(1, (os.cpu_count() or 1) // _WORKERS))
  os.environ.setdefault('OMP_NUM_THREADS', _THREADS)
  os.environ.setdefault('MKL_NUM_THREADS', _THREADS)

# Both also reach the launch.* subprocesses the tests start (they inherit the environment):
# - OpenMP threads that spin while they wait (libgomp's default) take the cores from the other
#   worker; passive waiting is what launch/__init__.py sets for the launchers too.
# - The tests train tiny models for a few epochs, so XLA's compile time dominates them; LLVM
#   at -O0 compiles about a quarter faster (tests/test_train.py 37 s -> 28 s, one
#   test_comparison seed 62 s -> 52 s). It changes code generation only, not the HLO the
#   tests check. Outside the tests, `python -m launch.bench` and the launchers keep XLA's
#   default.
os.environ.setdefault('OMP_WAIT_POLICY', 'PASSIVE')
if 'xla_backend_optimization_level' not in os.environ.get('XLA_FLAGS', ''):
  os.environ['XLA_FLAGS'] = (
    os.environ.get('XLA_FLAGS', '') + ' --xla_backend_optimization_level=0'
  ).strip()

# Files by their time on a 2-core CPU, longest first (measured with `--durations`, whole
# suite, one process); the others follow in their usual order. Only the order changes:
# every test still runs.
LONGEST_FIRST = (
  'test_comparison.py',
  'test_parallel.py',
  'test_bench.py',
  'test_cli.py',
  'test_reliability_faults.py',
  'test_predict.py',
  'test_store_v2.py',
  'test_sweep.py',
  'test_train.py',
  'test_explain.py',
  'test_ensemble.py',
  'test_extract_distributed.py',
  'test_losses.py',
  'test_extract.py',
  'test_heatmaps.py',
  'test_torch_reference.py',
  'test_report.py',
  'test_reliability_labels.py',
  'test_safety.py',
)


def pytest_collection_modifyitems(config, items):
  rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
  items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: files stay whole


_LC_CTYPE = locale.setlocale(locale.LC_CTYPE)


@pytest.fixture(autouse=True)
def _keep_the_locale(request):
  """A test whose code switches the process locale (seen under xdist: a later test in the same
  worker decoded a subprocess's UTF-8 output as ASCII) is named, and the locale restored, so
  that the outcome of a test does not depend on which tests ran before it in its worker."""
  yield
  now = locale.setlocale(locale.LC_CTYPE)
  if now != _LC_CTYPE:
    locale.setlocale(locale.LC_CTYPE, _LC_CTYPE)
    warnings.warn(f'{request.node.nodeid} changed LC_CTYPE from {_LC_CTYPE!r} to {now!r}')


@pytest.fixture(scope='session')
def shared_data() -> Path:
  if not (SHARED_DATA / 'small.svs').exists():
    pytest.skip(f'real test data not found at {SHARED_DATA} (checkout outside the project setup)')
  return SHARED_DATA


@pytest.fixture(scope='session')
def tiny_cohort(tmp_path_factory) -> Path:
  """Six patients with small slides and MRI; returns the manifest path."""
  from feature_store import synthetic_cohort

  out = tmp_path_factory.mktemp('cohort')
  return synthetic_cohort.make_cohort(
    out, patients=6, seed=3, slide_px=768, mri_px=64, mri_slices=8, progress=False
  )


@pytest.fixture(scope='session')
def small_store(tmp_path_factory) -> Path:
  """A 60-patient synthetic feature store with small bags, shared by model and data tests."""
  from feature_store import synthetic_store

  return synthetic_store.make_store(
    tmp_path_factory.mktemp('store'), patients=60, seed=0, median_patches=48, max_patches=400
  )
