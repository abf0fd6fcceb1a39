"""The default 5-member ensemble on 8 (virtual CPU) devices, with members sharded and with
each member's batch sharded, gives the predictions of a 1-device run; two processes of 4
devices each (jax.distributed over localhost) give those of one process of 8; bundles
trained on 8 devices predict on 1 and the reverse.

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
TOLERANCE = 1e-5

COMMON = textwrap.dedent(r"""
    import json, sys
    import jax
    from feature_store import synthetic_store
    from moemil_jax import parallel, train
    from moemil_jax.configs import test as test_config

    def config(store, member=0, data=0, groups=0):
        c = test_config.get_config()
        c.store = str(store)
        c.train.epochs = 3
        c.train.ensemble = 5  # the default recipe's ensemble
        c.data.bag_groups = groups
        c.mesh = parallel.mesh_config()
        c.mesh.update(member=member, data=data)
        return c

    def brief(info):
        return {k: info[k] for k in ("mesh", "devices", "compiled", "processes", "history")}
""")

CHILD = COMMON + textwrap.dedent(r"""
    out = sys.argv[1]
    assert jax.device_count() == 8, jax.devices()
    store = synthetic_store.make_store(out + "/store", patients=48, seed=1,
                                       median_patches=40, max_patches=120)
    runs = {
        "one": config(store, member=1, data=1),          # one device
        "members": config(store),                        # automatic: members over 8 devices
        "groups_one": config(store, member=1, data=1, groups=8),
        "groups": config(store, member=1, groups=8),     # each member's batch over 8 devices
    }
    infos = {name: brief(train.train_and_evaluate(c, f"{out}/{name}")) for name, c in runs.items()}
    # A bundle trained on one device, applied on this host of eight.
    from moemil_jax import predict
    scored = predict.load_bundle(f"{out}/one").predict(store)
    scored[["response_prob", "log_risk"]].to_csv(f"{out}/one_bundle_on_8.csv", index=False)
    json.dump(infos, open(out + "/infos.json", "w"))
    print("CHILD OK")
""")

MULTI_PROCESS = COMMON + textwrap.dedent(r"""
    process_id, port, out = int(sys.argv[1]), sys.argv[2], sys.argv[3]
    c = config(out + "/store")
    c.mesh.update(distributed=True, coordinator=f"localhost:{port}", num_processes=2,
                  process_id=process_id)
    info = train.train_and_evaluate(c, out + "/run_2x4")
    json.dump({**brief(info), "process_index": info["process_index"]},
              open(f"{out}/process{process_id}.json", "w"))
    print("PROCESS OK")
""")


def _child_env(devices: int) -> dict[str, str]:
  flags = f'{os.environ.get("XLA_FLAGS", "")} --xla_force_host_platform_device_count={devices}'
  return dict(os.environ, XLA_FLAGS=flags.strip(), JAX_PLATFORMS='cpu')


def _assert_same_predictions(one: Path, other: Path):
  p1 = pd.read_parquet(one / 'predictions.parquet')
  p2 = pd.read_parquet(other / 'predictions.parquet')
  pd.testing.assert_frame_equal(p1, p2, check_exact=False, rtol=TOLERANCE, atol=TOLERANCE)
  assert p1.oof_response_logit.notna().sum() > 20  # the out-of-fold columns are compared too


@pytest.fixture(scope='module')
def eight_devices(tmp_path_factory):
  """One process of 8 devices: the ensemble on 1 device, members sharded, batches sharded."""
  out = tmp_path_factory.mktemp('parallel')
  proc = subprocess.run(
    [sys.executable, '-c', CHILD, str(out)],
    cwd=ROOT,
    env=_child_env(8),
    capture_output=True,
    text=True,
    timeout=1200,
  )
  assert proc.returncode == 0 and 'CHILD OK' in proc.stdout, (
    f'child failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-8000:]}'
  )
  return out, json.loads((out / 'infos.json').read_text())


def test_members_sharded_match_one_device(eight_devices):
  out, infos = eight_devices
  assert infos['one']['mesh'] == {'member': 1, 'data': 1} and len(infos['one']['devices']) == 1
  # Five members on eight devices: the member axis spans all eight (three idle copies).
  assert infos['members']['mesh'] == {'member': 8, 'data': 1}
  assert len(infos['members']['devices']) == 8
  _assert_same_predictions(out / 'one', out / 'members')


def test_batches_sharded_match_one_device(eight_devices):
  """Eight bag groups per step: the same batches on one device and split over eight."""
  out, infos = eight_devices
  assert infos['groups']['mesh'] == {'member': 1, 'data': 8}
  _assert_same_predictions(out / 'groups_one', out / 'groups')


def test_one_compiled_step_on_every_mesh(eight_devices):
  _, infos = eight_devices
  for info in infos.values():
    assert info['compiled'] == {'train_step': 1, 'eval_step': 1}


def test_bundles_predict_on_any_device_count(eight_devices):
  """Trained on 1 device, predicted on a host of 8; trained on 8, predicted here on 1."""
  import jax

  from moemil_jax import predict

  assert jax.device_count() == 1
  out, _ = eight_devices
  for run, scored in (
    ('one', pd.read_csv(out / 'one_bundle_on_8.csv')),
    ('members', predict.load_bundle(out / 'members').predict(out / 'store')),
  ):
    frame = pd.read_parquet(out / run / 'predictions.parquet')
    np.testing.assert_allclose(scored.response_prob, frame.response_prob, atol=TOLERANCE)
    np.testing.assert_allclose(scored.log_risk, frame.log_risk, atol=TOLERANCE)


def test_two_processes_match_one_process(eight_devices):
  """Multi-host on one machine: 2 processes x 4 devices train as one process of 8, and
  process 0 alone writes predictions, run.json, the bundle and TensorBoard events."""
  out, infos = eight_devices
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
    logs = [p.communicate(timeout=1200) for p in procs]
  finally:
    for p in procs:
      p.kill()
  for p, (stdout, stderr) in zip(procs, logs):
    assert p.returncode == 0 and 'PROCESS OK' in stdout, (
      f'process failed:\n{stdout[-4000:]}\n{stderr[-8000:]}'
    )
  got = [json.loads((out / f'process{i}.json').read_text()) for i in range(2)]
  assert [g['process_index'] for g in got] == [0, 1]
  assert all(g['processes'] == 2 and g['mesh'] == {'member': 8, 'data': 1} for g in got)
  assert got[0]['history'] == got[1]['history']
  _assert_same_predictions(out / 'members', out / 'run_2x4')
  events = list((out / 'run_2x4' / 'tensorboard').glob('events.out.tfevents.*'))
  assert len(events) == 1, events  # process 0 only
  assert json.loads((out / 'run_2x4' / 'run.json').read_text())['processes'] == 2
