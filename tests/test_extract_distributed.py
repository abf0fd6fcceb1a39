"""Extraction under `torchrun --nproc_per_node=2` (CPU) builds the same store as one process.

Each rank reads RANK/WORLD_SIZE, extracts slides and MRI patients k % 2 == rank and writes
shards/<rank>-of-2.json; whichever rank finds both shard reports assembles the store-level
files (both may; the files are identical and written atomically).
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

pytestmark = pytest.mark.slow  # ResNet50 extraction under torchrun

ROOT = Path(__file__).resolve().parents[1]
FLAGS = [
  '--encoder_weights=random',
  '--device=cpu',
  '--workers=1',
  '--mri_slices=1',
  '--batch_size=16',
]


def _run(args, tmp_path):
  env = dict(os.environ, OMP_NUM_THREADS='1')
  env.pop('RANK', None)
  env.pop('WORLD_SIZE', None)
  proc = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, f'{args}\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}'
  return proc


def _files(store: Path) -> list[str]:
  return sorted(
    str(p.relative_to(store))
    for p in store.rglob('*')
    if p.is_file() and p.parts[len(store.parts)] != 'shards'
  )


def _assert_same_table(a: Path, b: Path):
  ta, tb = pq.read_table(a), pq.read_table(b)
  assert ta.schema.equals(tb.schema, check_metadata=True), a.name
  assert ta.num_rows == tb.num_rows, a.name
  for name in ta.column_names:
    ca, cb = ta.column(name), tb.column(name)
    if name == 'embedding':  # same weights, same patches; float16 round-off (~5e-4) at most
      from feature_store import store

      np.testing.assert_allclose(
        store.embeddings_from_column(ca).astype(np.float32),
        store.embeddings_from_column(cb).astype(np.float32),
        rtol=1e-3,
        atol=1e-3,
        err_msg=a.name,
      )
    else:
      assert ca.equals(cb) or np.allclose(ca.to_numpy(), cb.to_numpy(), equal_nan=True), (
        a.name,
        name,
      )


def test_torchrun_two_ranks_equal_one_process(tmp_path):
  from feature_store import synthetic_cohort

  manifest = synthetic_cohort.make_cohort(
    tmp_path / 'cohort', patients=4, seed=0, slide_px=1024, mri_px=48, mri_slices=6, progress=False
  )
  one, two = tmp_path / 'one', tmp_path / 'two'
  _run(
    [sys.executable, '-m', 'launch.extract', f'--manifest={manifest}', f'--store={one}', *FLAGS],
    tmp_path,
  )
  proc = _run(
    [
      sys.executable,
      '-m',
      'torch.distributed.run',
      '--standalone',
      '--nproc_per_node=2',
      '-m',
      'launch.extract',
      f'--manifest={manifest}',
      f'--store={two}',
      *FLAGS,
    ],
    tmp_path,
  )
  out = proc.stdout + proc.stderr
  assert 'shard 1 of 2' in out and 'shard 2 of 2' in out, out[-3000:]

  assert sorted(p.name for p in (two / 'shards').iterdir()) == ['0-of-2.json', '1-of-2.json']
  assert (one / 'shards' / '0-of-1.json').exists()
  # Each rank extracted its own, non-empty share (4 MRI patients: 2 per rank).
  assert out.count('MRI 2 patients') == 2, out[-3000:]
  assert _files(one) == _files(two)
  assert any(f.startswith('wsi/') for f in _files(one))
  for rel in _files(one):
    if rel.endswith('.parquet'):
      _assert_same_table(one / rel, two / rel)
  info1, info2 = (json.loads((s / 'STORE.json').read_text()) for s in (one, two))
  assert info1.pop('shards') == 1 and info2.pop('shards') == 2
  assert info1 == info2
