"""Grad-CAM split between JAX (head) and PyTorch (ResNet50) equals PyTorch autograd end to end."""

import numpy as np
import pytest
import torch
import torchvision
from flax import nnx

from feature_store import encoders
from moemil_jax import gradcam


@pytest.fixture(scope='module')
def resnet():
  torch.manual_seed(0)
  return torchvision.models.resnet50(weights=None).eval()


@pytest.fixture(scope='module')
def images():
  rng = np.random.default_rng(0)
  return rng.random((2, 48, 48, 3), dtype=np.float32)  # two small "slices" in [0, 1]


def test_two_step_gradient_equals_torch_autograd_for_linear_head(resnet, images):
  rng = np.random.default_rng(1)
  mean = rng.random(2048).astype(np.float32)
  std = (0.5 + rng.random(2048)).astype(np.float32)
  head = nnx.Linear(2048, 1, rngs=nnx.Rngs(0))
  w = torch.from_numpy(np.asarray(head.kernel[...])[:, 0].copy())
  b = float(np.asarray(head.bias[...])[0])

  # PyTorch end to end: a linear head on normalised, mean-pooled slice embeddings.
  x = gradcam.preprocess(images, input_px=64).requires_grad_(True)
  emb, act = gradcam.embed_with_layer4(resnet, x)
  out = (((emb - torch.from_numpy(mean)) / torch.from_numpy(std)).mean(0) @ w) + b
  out.backward()
  ref = act.grad.numpy()
  signed = (torch.from_numpy(ref).mean((2, 3), keepdim=True) * act.detach()).sum(1, keepdim=True)
  sign = 1.0 if signed.max() > 0 else -1.0  # pick the head's sign whose CAM is not all zero

  # The same head in JAX, then torch.autograd.backward(embedding, grad).
  def fn(e):
    return sign * head(((e - mean) / std).mean(0, keepdims=True))[0, 0]

  two_step = gradcam.gradcam(resnet, images, fn, input_px=64)

  assert two_step.output == pytest.approx(sign * out.item(), rel=1e-4, abs=1e-5)
  # JAX's gradient is the analytic one, w / (S * std) on every slice.
  np.testing.assert_allclose(
    two_step.embedding_grad, np.broadcast_to(sign * w.numpy() / (2 * std), (2, 2048)), rtol=1e-5
  )
  assert np.abs(ref).max() > 0
  np.testing.assert_allclose(
    two_step.layer4_grad, sign * ref, rtol=1e-4, atol=1e-6 * np.abs(ref).max()
  )
  cam = torch.relu(sign * signed)
  cam = torch.nn.functional.interpolate(
    cam, size=images.shape[1:3], mode='bilinear', align_corners=False
  )[:, 0]
  cam = (cam / cam.flatten(1).max(1).values.clamp(min=1e-12)[:, None, None]).numpy()
  assert cam.max() == pytest.approx(1.0)
  np.testing.assert_allclose(two_step.cams, cam, atol=1e-4)
  assert two_step.cams.shape == (2, 48, 48)


def test_recomputed_embeddings_match_the_store_encoder(images):
  enc = encoders.Encoder('mri', 'random')
  with torch.no_grad():
    emb, _ = gradcam.embed_with_layer4(enc, gradcam.preprocess(images))
  np.testing.assert_allclose(emb.numpy(), enc(images), rtol=1e-4, atol=1e-5)


def test_crop_square_matches_roi_crop():
  plane = np.arange(36.0).reshape(6, 6)
  np.testing.assert_array_equal(gradcam.crop_square(plane, (1, 2, 3)), plane[1:4, 2:5])
  edge = gradcam.crop_square(plane, (-1, 4, 3))
  assert edge.shape == (3, 3) and edge[0].sum() == 0 and edge[1, 2] == 0
  np.testing.assert_array_equal(edge[1:, :2], plane[0:2, 4:6])
