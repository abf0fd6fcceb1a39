"""Reliability, faults: SIGKILL during training and during a checkpoint write, a full disk
during a store write, a misspelled config key. SIGKILL during extraction is in
test_extract.py; resume determinism (same seed, identical predictions) in test_train.py.
"""

import errno
import io
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from feature_store import store, synthetic_store

ROOT = Path(__file__).resolve().parents[1]


def _run(args, **kw):
  return subprocess.run(
    [sys.executable, *args], cwd=ROOT, capture_output=True, encoding='utf-8', errors='replace', **kw
  )


def _tmp_files(folder: Path) -> list[Path]:
  return sorted(folder.glob('.*.tmp'))


@pytest.fixture(scope='module')
def tiny_store(tmp_path_factory):
  return synthetic_store.make_store(
    tmp_path_factory.mktemp('store'),
    patients=20,
    seed=2,
    median_patches=8,
    max_patches=16,
    mri_slices=1,
  )


def _train_args(store_dir, workdir, *extra):
  return [
    '-m',
    'launch.train',
    '--config=moemil_jax/configs/test.py',
    f'--store={store_dir}',
    f'--workdir={workdir}',
    '--config.train.epochs=4',
    *extra,
  ]


def test_misspelled_config_key_is_rejected_by_name(tiny_store, tmp_path):
  done = _run(_train_args(tiny_store, tmp_path, '--config.train.epochz=3'), timeout=300)
  assert done.returncode != 0
  assert 'epochz' in done.stderr
  assert not (tmp_path / 'checkpoints').exists()


@pytest.mark.slow  # trains, is killed, resumes
def test_sigkill_during_training_then_resume_completes(tiny_store, tmp_path):
  latest = tmp_path / 'checkpoints' / 'latest'
  proc = subprocess.Popen(
    [sys.executable, *_train_args(tiny_store, tmp_path)],
    cwd=ROOT,
    stdout=subprocess.DEVNULL,
    stderr=subprocess.DEVNULL,
  )
  deadline = time.monotonic() + 400

  def finished():
    return [p for p in latest.glob('*') if p.name.isdigit()] if latest.exists() else []

  while not finished() and proc.poll() is None and time.monotonic() < deadline:
    time.sleep(0.02)
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  assert proc.returncode == -signal.SIGKILL, 'training finished before it could be killed'
  assert not (tmp_path / 'predictions.parquet').exists()
  done = _run(_train_args(tiny_store, tmp_path, '--resume'), timeout=600)
  assert done.returncode == 0, done.stderr[-3000:]
  assert 'resumed from epoch' in done.stderr
  info = json.loads((tmp_path / 'run.json').read_text())
  assert info['epochs_run'] == 4 and [h['epoch'] for h in info['history']] == [1, 2, 3, 4]
  pred = pd_read(tmp_path / 'predictions.parquet')
  assert np.isfinite(pred[['response_logit', 'log_risk']].to_numpy()).all()


def pd_read(path):
  import pandas as pd

  return pd.read_parquet(path)


_CHECKPOINT_WRITER = textwrap.dedent("""
    import sys, numpy as np, jax.numpy as jnp
    from pathlib import Path
    from flax import nnx
    from moemil_jax import trainer
    def tree(value, n):
      w = jnp.asarray(np.random.default_rng(value).random(n, np.float32))
      return {"params": {"w": w}, "opt_state": {"count": jnp.int32(value)}}
    ckpt = trainer.Checkpoints(Path(sys.argv[1]))
    ckpt.save(ckpt.latest, 1, tree(1, 1000), {"epoch": 1})
    ckpt.wait()
    print("saved 1", flush=True)
    ckpt.save(ckpt.latest, 2, tree(2, 150_000_000), {"epoch": 2})  # 600 MB: takes a while
    ckpt.wait()
    print("saved 2", flush=True)
""")


def test_sigkill_during_checkpoint_write_keeps_the_previous_one(tmp_path):
  import jax.numpy as jnp

  from moemil_jax import trainer

  proc = subprocess.Popen(
    [sys.executable, '-c', _CHECKPOINT_WRITER, str(tmp_path)],
    cwd=ROOT,
    stdout=subprocess.PIPE,
    stderr=subprocess.DEVNULL,
    encoding='utf-8',
  )
  assert proc.stdout.readline().strip() == 'saved 1'
  latest = tmp_path / 'checkpoints' / 'latest'
  deadline = time.monotonic() + 120
  while (
    not [p for p in latest.iterdir() if p.name.startswith('2')]
    and proc.poll() is None
    and time.monotonic() < deadline
  ):
    time.sleep(0.005)
  time.sleep(0.2)  # inside the write
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  assert proc.returncode == -signal.SIGKILL, 'the checkpoint write finished before the kill'
  assert not (latest / '2').exists() or not (latest / '2' / '_CHECKPOINT_METADATA').exists()

  ckpt = trainer.Checkpoints(tmp_path)
  assert ckpt.latest.latest_step() == 1
  like = {'params': {'w': jnp.zeros(1000, jnp.float32)}, 'opt_state': {'count': jnp.int32(0)}}
  tree, meta = ckpt.restore(ckpt.latest, like)
  np.testing.assert_array_equal(
    np.asarray(tree['params']['w']), np.random.default_rng(1).random(1000, np.float32)
  )
  assert meta == {'epoch': 1} and int(tree['opt_state']['count']) == 1


def test_a_checkpoint_keeps_the_run_state_of_its_epoch(tmp_path):
  """The save is asynchronous and training mutates its state right after it (the next
  epoch's count, before its history): the checkpoint holds the state as it was saved."""
  import jax.numpy as jnp

  from moemil_jax import trainer

  ckpt = trainer.Checkpoints(tmp_path)
  tree = {'params': {'w': jnp.ones(1000, jnp.float32)}}
  meta = {'epoch': 1, 'history': [{'epoch': 1}]}
  ckpt.save(ckpt.latest, 1, tree, meta)
  meta['epoch'] = 2
  meta['history'].append({'epoch': 2})
  ckpt.wait()
  assert ckpt.restore(ckpt.latest, tree)[1] == {'epoch': 1, 'history': [{'epoch': 1}]}


def _table(n: int, seed: int) -> pa.Table:
  return pa.table({'x': np.random.default_rng(seed).random(n)})


def test_full_disk_during_a_store_write_keeps_the_old_file(tmp_path, monkeypatch):
  """ENOSPC half-way through writing: the old file is intact and no temporary file is left."""
  path = tmp_path / 'clinical.parquet'
  store.atomic_write_table(_table(10, 0), path)
  old = path.read_bytes()
  real_write = pq.write_table

  def write_half_then_enospc(table, where, **kw):
    buf = io.BytesIO()
    real_write(table, buf, **kw)
    Path(where).write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(where))

  monkeypatch.setattr(store.pq, 'write_table', write_half_then_enospc)
  with pytest.raises(OSError) as err:
    store.atomic_write_table(_table(100_000, 1), path)
  assert err.value.errno == errno.ENOSPC
  assert path.read_bytes() == old and not _tmp_files(tmp_path)
  assert pq.read_table(path).equals(_table(10, 0))


_FILE_SIZE_LIMITED = textwrap.dedent("""
    import resource, signal, sys, numpy as np, pyarrow as pa
    from feature_store import store
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)    # a failed write() instead of a kill
    resource.setrlimit(resource.RLIMIT_FSIZE, (64 * 1024, resource.RLIM_INFINITY))
    try:
        store.atomic_write_table(pa.table({"x": np.random.default_rng(1).random(100_000)}), sys.argv[1])
    except OSError as e:
        print("refused", e.errno)
    try:
        store.atomic_write_bytes(sys.argv[2], np.random.default_rng(2).bytes(1 << 20))
    except OSError as e:
        print("refused", e.errno)
""")


def test_a_real_failed_write_keeps_the_old_files(tmp_path):
  """The kernel refuses the write (RLIMIT_FSIZE: EFBIG, as a full disk gives ENOSPC)."""
  table_path, json_path = tmp_path / 't.parquet', tmp_path / 'STORE.json'
  store.atomic_write_table(_table(10, 0), table_path)
  store.atomic_write_bytes(json_path, b'{"ok": true}\n')
  done = _run(['-c', _FILE_SIZE_LIMITED, str(table_path), str(json_path)], timeout=120)
  assert done.returncode == 0, done.stderr[-2000:]
  assert done.stdout.split() == ['refused', str(errno.EFBIG)] * 2
  assert pq.read_table(table_path).equals(_table(10, 0))
  assert json_path.read_bytes() == b'{"ok": true}\n'
  assert not _tmp_files(tmp_path)
