"""The Flax model against the CLAM-style PyTorch reference with the same weights."""

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from moemil_jax import batching, losses, models
from moemil_jax.bench import torch_reference
from moemil_jax.configs import moemil
from moemil_jax.configs import test as test_config

F = 12  # radiomics features
WEIGHTS = {'response': 1.0, 'survival': 1.0, 'instance': 0.3, 'gate_balance': 0.01}


def _cohort(b=5, n=48, s=6, seed=0):
  """Padded JAX inputs; patient 3 has no WSI, patient 1 no MRI, patient 4 a 3-patch bag."""
  rng = np.random.default_rng(seed)
  counts = np.array([48, 17, 30, 0, 3])[:b]
  slices = np.array([6, 0, 2, 4, 6])[:b]
  has_mri = slices > 0
  # Padded content is garbage on purpose: it must not leak into the outputs.
  wsi = rng.normal(size=(b, n, 1024)).astype(np.float32)
  wsi_valid = np.arange(n)[None] < counts[:, None]
  wsi[~wsi_valid] = 1e3
  inputs = {
    'wsi': wsi,
    'wsi_valid': wsi_valid,
    'radiomics': rng.normal(size=(b, F)).astype(np.float32),
    'mri_deep': rng.random((b, s, 2048)).astype(np.float32),
    'mri_deep_valid': np.arange(s)[None] < slices[:, None],
    'has_wsi': counts > 0,
    'has_radiomics': has_mri,
    'has_mri_deep': has_mri,
  }
  targets = {
    'patient_mask': np.ones(b, bool),
    'response': np.array([1, 0, 1, 0, 1], np.float32)[:b],
    'has_response': np.array([True, True, False, True, True])[:b],
    'os_months': np.array([10.0, 25.0, 10.0, 40.0, 10.0], np.float32)[:b],  # a 3-way tie
    'os_event': np.array([1, 0, 1, 1, 1], np.int32)[:b],
    'has_survival': np.ones(b, bool),
  }
  return inputs, targets


def _packed(inputs):
  """The JAX model's inputs: the same bags packed into one group, garbage in 5 empty slots."""
  bags = [inputs['wsi'][i][inputs['wsi_valid'][i]] for i in range(len(inputs['wsi']))]
  packed = batching.pack_bags(bags, capacity=sum(len(b) for b in bags) + 5)
  packed['wsi'][packed['wsi_segment'] == len(bags)] = 1e3
  rest = {k: v for k, v in inputs.items() if k not in ('wsi', 'wsi_valid')}
  return {**rest, **packed}


def _torch_patient(inputs, i):
  """Real patches and slices of patient i only, as a CLAM data loader yields them."""
  v, sv = inputs['wsi_valid'][i], inputs['mri_deep_valid'][i]
  return {
    'wsi': torch.from_numpy(inputs['wsi'][i][v]),
    'radiomics': torch.from_numpy(inputs['radiomics'][i]),
    'mri_deep': torch.from_numpy(inputs['mri_deep'][i][sv]),
    **{f'has_{m}': bool(inputs[f'has_{m}'][i]) for m in models.MODALITIES},
  }


def _models(config):
  # The reference mirrors the CLAM attention pathway; the prototype pathway is an MLP and
  # linear terms on a precomputed vector (tests/test_models.py, tests/test_prototypes.py).
  config.model.wsi_pathway = 'attention'
  flax_model = models.MoEMIL(config.model, radiomics_dim=F, rngs=nnx.Rngs(params=1))
  for seed, wide in enumerate((flax_model.wide_survival, flax_model.wide_response), start=2):
    if wide is not None:  # zero at initialisation: give it weights to compare
      weights = np.random.default_rng(seed).normal(0.0, 0.5, (F, 1)).astype(np.float32)
      wide.kernel[...] = jnp.asarray(weights)
  ref = torch_reference.TorchMoEMIL(config.model, radiomics_dim=F)
  torch_reference.copy_flax_params(ref, flax_model)
  return flax_model, ref.eval()


@pytest.mark.parametrize('config_module', [test_config, moemil], ids=['test', 'moemil'])
def test_forward_matches_torch_reference(config_module):
  flax_model, ref = _models(config_module.get_config())
  inputs, _ = _cohort()
  packed = _packed(inputs)
  out = flax_model(packed)  # eval: rngs=None, no dropout
  with torch.no_grad():
    ref_out = [ref(_torch_patient(inputs, i)) for i in range(len(inputs['wsi']))]
  for key in ('response_logit', 'log_risk'):
    np.testing.assert_allclose(
      np.asarray(out[key]), np.array([o[key].item() for o in ref_out]), rtol=1e-5, atol=1e-5
    )
  np.testing.assert_allclose(
    np.asarray(out['gates']), np.stack([o['gates'].numpy() for o in ref_out]), rtol=1e-5, atol=1e-5
  )
  segment = packed['wsi_segment'][0]
  for i, o in enumerate(ref_out):
    n = int(inputs['wsi_valid'][i].sum())
    if n:
      np.testing.assert_allclose(
        np.asarray(out['attention_scores'])[0, segment == i],
        o['attention_scores'].numpy(),
        rtol=1e-5,
        atol=1e-5,
      )
      np.testing.assert_allclose(
        np.asarray(out['instance_logits'])[0, segment == i],
        o['instance_logits'].numpy(),
        rtol=1e-5,
        atol=1e-5,
      )


@pytest.mark.parametrize('ties', ['efron', 'breslow'])
def test_training_loss_matches_torch_reference(ties):
  """The reference's loss is the same function of the same outputs, so P2 times equal work."""
  flax_model, ref = _models(test_config.get_config())
  inputs, targets = _cohort()
  jax_loss, _ = losses.total_loss(flax_model(_packed(inputs)), targets, WEIGHTS, ties=ties, k=8)
  ref_out = [ref(_torch_patient(inputs, i)) for i in range(len(inputs['wsi']))]
  ref_loss = torch_reference.total_loss(ref_out, targets, WEIGHTS, ties=ties, k=8)
  np.testing.assert_allclose(float(jax_loss), ref_loss.item(), rtol=1e-5, atol=1e-5)
  ref_loss.backward()  # and the eager graph is trainable
  assert all(p.grad is not None for p in ref.wsi.parameters())


def test_copy_rejects_a_mismatched_architecture():
  small, large = test_config.get_config().model, moemil.get_config().model
  small.wsi_pathway = large.wsi_pathway = 'attention'
  flax_model = models.MoEMIL(small, radiomics_dim=F, rngs=nnx.Rngs(0))
  other = torch_reference.TorchMoEMIL(large, radiomics_dim=F)
  with pytest.raises(ValueError, match='shape'):
    torch_reference.copy_flax_params(other, flax_model)
