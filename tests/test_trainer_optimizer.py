"""trainer.make_optimizer: `train.slide_lr_multiplier` scales the slide branch's updates only."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from moemil_jax import trainer
from moemil_jax.configs import test as test_config

STEPS_PER_EPOCH = 4
SLIDE = {'wsi', 'wsi_vector', 'slide_wide_response', 'slide_wide_survival'}


@pytest.fixture(scope='module')
def params():
  """The test model's parameters ('both' slide pathways and the wide slide terms), stacked
  over a member axis of 2 as the trainer holds them."""
  c = test_config.get_config()
  assert c.model.wsi_pathway == 'both' and c.model.wide_slide
  _, p, _ = nnx.split(trainer.build_model(c, radiomics_dim=6, patch_dim=16), nnx.Param, ...)
  assert SLIDE <= set(nnx.to_pure_dict(p))  # the names the optimiser labels exist
  return jax.tree.map(lambda x: jnp.stack([x, x + 0.01]), p)


def _tc(multiplier, warmup_epochs=1):
  tc = test_config.get_config().train
  tc.slide_lr_multiplier = multiplier
  tc.warmup_epochs = warmup_epochs
  return tc


def _grads(params, t):
  leaves, treedef = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.key(t), len(leaves))
  return jax.tree.unflatten(
    treedef, [jax.random.normal(k, x.shape, x.dtype) for k, x in zip(keys, leaves)]
  )


def _run(tx, params, steps):
  state = jax.vmap(tx.init)(params)
  update = jax.jit(jax.vmap(tx.update))
  for t in range(steps):
    updates, state = update(_grads(params, t), state, params)
    params = optax.apply_updates(params, updates)
  return params


def _by_module(tree):
  return {k: jax.tree.leaves(v) for k, v in nnx.to_pure_dict(tree).items()}


def test_default_multiplier_is_the_plain_chain(params):
  assert 'slide_lr_multiplier' in test_config.get_config().train  # from configs/moemil.py
  tc = _tc(1.0)
  total = tc.epochs * STEPS_PER_EPOCH
  schedule = optax.warmup_cosine_decay_schedule(
    0.0,
    tc.learning_rate,
    warmup_steps=tc.warmup_epochs * STEPS_PER_EPOCH,
    decay_steps=total,
    end_value=tc.learning_rate * 0.01,
  )
  plain = optax.chain(
    optax.clip_by_global_norm(tc.grad_clip), optax.adamw(schedule, weight_decay=tc.weight_decay)
  )
  got = _run(trainer.make_optimizer(tc, STEPS_PER_EPOCH), params, 6)
  want = _run(plain, params, 6)
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  assert any(
    not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(params))
  )


def test_multiplier_scales_slide_updates_only(params):
  # No warmup, so the first step moves by the peak rate (a warmup starts at 0).
  one = _run(trainer.make_optimizer(_tc(1.0, 0), STEPS_PER_EPOCH), params, 1)
  three = _run(trainer.make_optimizer(_tc(3.0, 0), STEPS_PER_EPOCH), params, 1)
  start, moved1, moved3 = _by_module(params), _by_module(one), _by_module(three)
  for name in start:
    for p0, p1, p3 in zip(start[name], moved1[name], moved3[name], strict=True):
      d1, d3 = np.asarray(p1 - p0, np.float64), np.asarray(p3 - p0, np.float64)
      assert np.abs(d1).max() > 0, name
      if name in SLIDE:
        np.testing.assert_allclose(d3, 3.0 * d1, rtol=1e-3, atol=1e-7, err_msg=name)
      else:
        np.testing.assert_array_equal(d3, d1, err_msg=name)
