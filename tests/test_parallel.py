"""Data-parallel training on 8 (virtual CPU) devices equals training on one device, and
two processes of 4 devices each (jax.distributed over localhost) equal one process of 8.

XLA_FLAGS must be set before JAX starts, and the rest of the test session has already
started it with one device, so the runs happen in fresh subprocesses.
"""

import json
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

pytestmark = pytest.mark.slow  # trains on 8 simulated devices and two processes

ROOT = Path(__file__).resolve().parents[1]

CHILD = textwrap.dedent(r"""
    import json, sys
    import jax, jax.numpy as jnp, numpy as np, ml_collections
    from flax import nnx
    from feature_store import synthetic_store
    from moemil_jax import batching, device_data, losses, parallel, splits, store_reader, train
    from moemil_jax.configs import test as test_config

    out_dir = sys.argv[1]
    assert jax.device_count() == 8, jax.devices()
    store = synthetic_store.make_store(out_dir + "/store", patients=40, seed=1,
                                       median_patches=40, max_patches=120)

    def config(devices):
        c = test_config.get_config()
        c.store = str(store)
        c.train.epochs = 3
        # Partitioned bag reading is what this file checks; slide prototypes make every
        # process read every bag (train.load_data), so the runs here use attention only.
        c.data.slide_prototypes = 0
        c.model.wsi_pathway = "attention"
        c.mesh = parallel.mesh_config()
        c.mesh.data = devices
        return c

    # ---------------------------------------------------------------- one step
    cohort = store_reader.load_store(store)
    cohort.split = splits.assign_splits(cohort, seed=0)
    train_ids = np.flatnonzero(cohort.split == "train")
    layout = batching.bag_layout(cohort.patch_count, 8)  # one device reads the same blocks
    packing = batching.training_packing(cohort.patch_count[train_ids],
                                        layout.group[train_ids], batch_size=8, groups=8,
                                        max_patches=128)
    batch = batching.train_batches(train_ids, cohort.patch_count, layout, packing,
                                   rng=np.random.default_rng(0))[0]
    key = jax.random.key(7)
    results = {}
    for devices in (0, 8):
        c = config(devices)
        mesh = parallel.mesh_from_config(c)
        host_data = device_data.prepare(cohort, c.data, seed=0, layout=layout, mesh=mesh)
        data = host_data.tree()
        if mesh is not None:  # each device holds only its own group's bags
            shards = data["patches"].addressable_shards
            assert len(shards) == 8 and shards[0].data.shape[0] == layout.rows
        rdim = int(host_data.radiomics.shape[1])
        tx, train_step, _ = train.compiled_steps(
            json.dumps(c.to_dict(), sort_keys=True), rdim, 4)
        graphdef, params, rest = nnx.split(train.build_model(c, rdim), nnx.Param, ...)
        opt_state = tx.init(params)
        params, rest, opt_state = parallel.replicate((params, rest, opt_state), mesh)
        b = parallel.shard_batch(batch.tree(), mesh)
        if mesh is not None:
            assert b["patch_index"].sharding.spec == jax.sharding.PartitionSpec("data")
            assert len(b["patch_index"].addressable_shards) == 8

        loss_fn = train.make_loss_fn(c, graphdef, mesh=mesh)  # the training loss
        loss, grads = jax.jit(jax.value_and_grad(lambda p: loss_fn(p, rest, data, b, key)[0]))(
            params)
        new_params, _, metrics = train_step(params, opt_state, rest, data, b, key)
        if mesh is not None:
            leaf = jax.tree.leaves(new_params)[0]
            assert leaf.sharding.is_fully_replicated, leaf.sharding
        results[devices] = jax.device_get(
            (float(loss), grads, nnx.to_pure_dict(new_params), metrics))

    (l1, g1, p1, m1), (l8, g8, p8, m8) = results[0], results[8]
    np.testing.assert_allclose(l8, l1, rtol=1e-5, atol=1e-5)
    assert sorted(m1) == sorted(m8)
    for k in m1:
        np.testing.assert_allclose(m8[k], m1[k], rtol=1e-5, atol=1e-5, err_msg=k)
    np.testing.assert_allclose(m8["loss"], l1, rtol=1e-5, atol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5), g8, g1)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5), p8, p1)
    assert max(float(np.abs(x).max()) for x in jax.tree.leaves(g1)) > 0  # real gradients

    # ---------------------------------------------------------------- short run
    runs = {}
    for devices in (0, 8):
        c = config(devices)
        c.data.bag_groups = 8  # one device, batches dealt as on eight
        info = train.train_and_evaluate(c, f"{out_dir}/run{devices}")
        runs[devices] = info
    json.dump({"one_step_loss": l1, "history_1": runs[0]["history"],
               "history_8": runs[8]["history"]}, open(out_dir + "/result.json", "w"))
    print("CHILD OK")
""")


MULTI_PROCESS = textwrap.dedent(r"""
    import json, sys
    from moemil_jax import parallel, train
    from moemil_jax.configs import test as test_config

    process_id, port, out_dir = int(sys.argv[1]), sys.argv[2], sys.argv[3]
    c = test_config.get_config()
    c.store = out_dir + "/store"
    c.train.epochs = 3
    c.data.slide_prototypes = 0  # as in the 8-device run: partitioned bag reading
    c.model.wsi_pathway = "attention"
    c.mesh = parallel.mesh_config()
    c.mesh.update(data=-1, distributed=True, coordinator=f"localhost:{port}", num_processes=2,
                  process_id=process_id)
    info = train.train_and_evaluate(c, out_dir + "/run_2x4")
    json.dump({k: info[k] for k in ("history", "process_index", "processes", "patches_read")},
              open(f"{out_dir}/process{process_id}.json", "w"))
    print("PROCESS OK")
""")


def _child_env(devices: int) -> dict[str, str]:
  flags = f'{os.environ.get("XLA_FLAGS", "")} --xla_force_host_platform_device_count={devices}'
  return dict(os.environ, XLA_FLAGS=flags.strip(), JAX_PLATFORMS='cpu')


def _assert_same_history(h1, h2):
  assert len(h1) == len(h2) == 3
  for a, b in zip(h1, h2):
    for k in ('train_loss', 'val_auc', 'val_cindex', 'val_metric'):
      assert (a[k] is None) == (b[k] is None), k
      if a[k] is not None:
        assert b[k] == pytest.approx(a[k], rel=1e-5, abs=1e-5), (k, a, b)


def _assert_same_predictions(dir1: Path, dir2: Path):
  p1 = pd.read_parquet(dir1 / 'predictions.parquet')
  p2 = pd.read_parquet(dir2 / 'predictions.parquet')
  # The Cox likelihood is invariant to a shift of log-risk, so log-risk is compared up to one
  # constant (the survival pathway has no biases, so the constant should be round-off).
  shift = (p2.log_risk - p1.log_risk).to_numpy()
  np.testing.assert_allclose(shift, shift.mean(), atol=1e-5)
  p2 = p2.assign(log_risk=p2.log_risk - shift.mean())
  pd.testing.assert_frame_equal(p1, p2, check_exact=False, rtol=1e-5, atol=1e-5)


@pytest.fixture(scope='module')
def single_process_runs(tmp_path_factory):
  """One process: one step and a 3-epoch run, on one device and on eight."""
  out = tmp_path_factory.mktemp('parallel')
  proc = subprocess.run(
    [sys.executable, '-c', CHILD, str(out)],
    cwd=ROOT,
    env=_child_env(8),
    capture_output=True,
    text=True,
    timeout=900,
  )
  assert proc.returncode == 0 and 'CHILD OK' in proc.stdout, (
    f'child failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-8000:]}'
  )
  return out


def test_eight_devices_match_one(single_process_runs):
  out = single_process_runs
  result = json.loads((out / 'result.json').read_text())
  _assert_same_history(result['history_1'], result['history_8'])
  _assert_same_predictions(out / 'run0', out / 'run8')


def test_two_processes_match_one_process(single_process_runs):
  """Multi-host on one machine: each process reads only its devices' bags, process 0 alone
  writes predictions, run.json and TensorBoard events, and training equals one process."""
  out = single_process_runs
  with socket.socket() as sock:
    sock.bind(('localhost', 0))
    port = str(sock.getsockname()[1])
  procs = [
    subprocess.Popen(
      [sys.executable, '-c', MULTI_PROCESS, str(i), port, str(out)],
      cwd=ROOT,
      env=_child_env(4),
      stdout=subprocess.PIPE,
      stderr=subprocess.PIPE,
      text=True,
    )
    for i in range(2)
  ]
  try:
    logs = [p.communicate(timeout=900) for p in procs]
  finally:
    for p in procs:
      p.kill()
  for p, (stdout, stderr) in zip(procs, logs):
    assert p.returncode == 0 and 'PROCESS OK' in stdout, (
      f'process failed:\n{stdout[-4000:]}\n{stderr[-8000:]}'
    )
  infos = [json.loads((out / f'process{i}.json').read_text()) for i in range(2)]
  assert [i['process_index'] for i in infos] == [0, 1]
  assert all(i['processes'] == 2 for i in infos)
  for info in infos:
    _assert_same_history(
      json.loads((out / 'result.json').read_text())['history_8'], info['history']
    )
  _assert_same_predictions(out / 'run8', out / 'run_2x4')

  from moemil_jax import store_reader

  counts = store_reader.load_store(out / 'store').patch_count
  halves = [i['patches_read'] for i in infos]
  assert sum(halves) == counts.sum() and max(halves) < 0.6 * counts.sum(), halves
  events = list((out / 'run_2x4' / 'tensorboard').glob('events.out.tfevents.*'))
  assert len(events) == 1, events  # process 0 only
  assert json.loads((out / 'run_2x4' / 'run.json').read_text())['processes'] == 2
