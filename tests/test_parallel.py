"""Data-parallel training on 8 (virtual CPU) devices equals training on one device.

XLA_FLAGS must be set before JAX starts, and the rest of the test session has already
started it with one device, so the comparisons run in a fresh subprocess.
"""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]

CHILD = textwrap.dedent(r"""
    import json, sys
    import jax, jax.numpy as jnp, numpy as np, ml_collections
    from flax import nnx
    from feature_store import synthetic_store
    from moemil_jax import data as data_lib, losses, parallel, train
    from moemil_jax.configs import test as test_config

    out_dir = sys.argv[1]
    assert jax.device_count() == 8, jax.devices()
    store = synthetic_store.make_store(out_dir + "/store", patients=40, seed=1,
                                       median_patches=40, max_patches=120)

    def config(devices):
        c = test_config.get_config()
        c.store = str(store)
        c.train.epochs = 3
        c.data.bag_buckets = (128,)
        c.mesh = parallel.mesh_config()
        c.mesh.data = devices
        return c

    # ---------------------------------------------------------------- one step
    base = config(0)
    cohort = data_lib.load_store(store)
    cohort.split = data_lib.assign_splits(cohort, seed=0)
    train_ids = np.flatnonzero(cohort.split == "train")
    pad_row = int(cohort.patches.shape[0])
    batch = data_lib.train_batches(train_ids, cohort.patch_count, cohort.patch_offset, pad_row,
                                   batch_size=8, buckets=(128,), max_patches=128,
                                   rng=np.random.default_rng(0))[0]
    key = jax.random.key(7)
    results = {}
    for devices in (0, 8):
        c = config(devices)
        mesh = parallel.mesh_from_config(c)
        host_data = data_lib.prepare(cohort, c.data, seed=0)
        data = parallel.replicate(host_data.tree(), mesh)
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

        weights = {k: float(c.loss[k]) for k in ("response", "survival", "instance",
                                                  "gate_balance")}
        def loss_fn(p):  # the training loss, as train.compiled_steps builds it
            model = nnx.merge(graphdef, p, rest)
            inputs, targets = data_lib.gather_inputs(data, b, jnp.float32)
            out = model(inputs, rngs=nnx.Rngs(dropout=key))
            out, targets = parallel.gather_for_loss(out, targets, mesh)
            return losses.total_loss(out, targets, weights, ties=c.loss.ties,
                                     k=c.loss.instance_k)[0]
        loss, grads = jax.jit(jax.value_and_grad(loss_fn))(params)
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
        info = train.train_and_evaluate(config(devices), f"{out_dir}/run{devices}")
        runs[devices] = info
    json.dump({"one_step_loss": l1, "history_1": runs[0]["history"],
               "history_8": runs[8]["history"]}, open(out_dir + "/result.json", "w"))
    print("CHILD OK")
""")


def test_eight_devices_match_one(tmp_path):
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8",
             JAX_PLATFORMS="cpu")
  proc = subprocess.run([sys.executable, "-c", CHILD, str(tmp_path)], cwd=ROOT, env=env,
                        capture_output=True, text=True, timeout=900)
  assert proc.returncode == 0 and "CHILD OK" in proc.stdout, \
      f"child failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-8000:]}"
  result = json.loads((tmp_path / "result.json").read_text())
  h1, h8 = result["history_1"], result["history_8"]
  assert len(h1) == len(h8) == 3
  for a, b in zip(h1, h8):
    for k in ("train_loss", "val_auc", "val_cindex", "val_metric"):
      assert (a[k] is None) == (b[k] is None), k
      if a[k] is not None:
        assert b[k] == pytest.approx(a[k], rel=1e-5, abs=1e-5), (k, a, b)
  import pandas as pd
  p1 = pd.read_parquet(tmp_path / "run0" / "predictions.parquet")
  p8 = pd.read_parquet(tmp_path / "run8" / "predictions.parquet")
  # The Cox likelihood is invariant to a shift of log-risk, so log-risk is compared up to one
  # constant (the survival pathway has no biases, so the constant should be round-off).
  shift = (p8.log_risk - p1.log_risk).to_numpy()
  np.testing.assert_allclose(shift, shift.mean(), atol=1e-5)
  p8 = p8.assign(log_risk=p8.log_risk - shift.mean())
  pd.testing.assert_frame_equal(p1, p8, check_exact=False, rtol=1e-5, atol=1e-5)
