"""Encoders: real torchvision ResNet50 trunks (random weights here: no downloads in tests)."""

import hashlib

import numpy as np
import pytest
import torch
import torchvision

from feature_store import encoders, store


@pytest.fixture(scope='module')
def wsi_encoder():
  return encoders.Encoder('wsi', 'random')


@pytest.fixture(scope='module')
def patches():
  return np.random.default_rng(0).integers(0, 256, (3, 64, 64, 3), dtype=np.uint8)


def test_trunks_have_clam_and_full_widths(wsi_encoder, patches):
  emb = wsi_encoder(patches)
  assert emb.shape == (3, 1024) and emb.dtype == np.float32
  assert np.isfinite(emb).all() and (emb >= 0).all()  # avg-pooled ReLU outputs
  assert not np.allclose(emb[0], emb[1])
  mri = encoders.Encoder('mri', 'random')
  out = mri(np.random.default_rng(1).random((2, 40, 40, 3), dtype=np.float32))
  assert out.shape == (2, 2048)
  assert wsi_encoder(patches[:0]).shape == (0, 1024)


def test_wsi_trunk_is_resnet50_up_to_layer3(wsi_encoder):
  """Same numbers as torchvision's own pipeline: the IMAGENET1K_V1 transform's normalisation
  and crop size, and layer3 taken by torchvision's feature extractor, then mean-pooled."""
  from torchvision.models import ResNet50_Weights
  from torchvision.models.feature_extraction import create_feature_extractor

  reference = ResNet50_Weights.IMAGENET1K_V1.transforms()
  assert reference.crop_size == [encoders.INPUT_PX]  # patches are resized to the crop size
  images = np.random.default_rng(2).integers(0, 256, (2, 224, 224, 3), dtype=np.uint8)
  model, _, _ = encoders.load_resnet50('random')
  layer3 = create_feature_extractor(model.eval(), {'layer3': 'out'})
  x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255
  x = torchvision.transforms.functional.normalize(x, reference.mean, reference.std)
  with torch.inference_mode():
    ref = layer3(x)['out'].mean((2, 3)).numpy()
  np.testing.assert_allclose(wsi_encoder(images), ref, rtol=1e-4, atol=1e-5)


def test_float16_storage_changes_embeddings_little(wsi_encoder, patches, tmp_path):
  emb = wsi_encoder(patches)
  xy = np.array([[0, 0], [256, 0], [512, 0]], np.int32)
  store.write_slide(tmp_path, 's1', 'P1', xy, emb, {'note': 'test'})
  back = store.read_slide(store.wsi_path(tmp_path, 's1'), expected_dim=1024)
  assert back.embeddings.dtype == np.float16
  err = np.abs(back.embeddings.astype(np.float32) - emb)
  # float16 keeps 11 significant bits: relative error at most 2^-11 (plus subnormal spacing).
  assert (err <= 2.0**-11 * np.abs(emb) + 2.0**-24).all()
  assert err.max() < 0.05
  cos = (back.embeddings.astype(np.float32) * emb).sum(1) / (
    np.linalg.norm(emb, axis=1) * np.linalg.norm(back.embeddings.astype(np.float32), axis=1)
  )
  assert (cos > 0.99999).all()


def test_random_weights_are_reproducible_and_fingerprinted(wsi_encoder):
  again = encoders.Encoder('wsi', 'random')
  assert again.fingerprint == wsi_encoder.fingerprint
  assert wsi_encoder.fingerprint['pretrained'] is False
  assert len(wsi_encoder.fingerprint['weights_sha256']) == 64


def test_state_dict_file_loads_with_weights_only(tmp_path, patches, wsi_encoder):
  model, _, _ = encoders.load_resnet50('random')
  path = tmp_path / 'resnet50.pt'
  torch.save(model.state_dict(), path)
  enc = encoders.Encoder('wsi', str(path))
  assert enc.fingerprint['weights_sha256'] == hashlib.sha256(path.read_bytes()).hexdigest()
  assert enc.fingerprint['pretrained'] is True and enc.fingerprint['weights'] == 'resnet50.pt'
  np.testing.assert_allclose(enc(patches), wsi_encoder(patches), rtol=1e-5, atol=1e-6)

  # A layer3-only checkpoint is enough for the WSI trunk, not for the MRI one.
  trunk_only = {k: v for k, v in model.state_dict().items() if not k.startswith(('layer4.', 'fc.'))}
  torch.save(trunk_only, tmp_path / 'trunk.pt')
  encoders.Encoder('wsi', str(tmp_path / 'trunk.pt'))
  with pytest.raises(encoders.EncoderError, match='missing'):
    encoders.Encoder('mri', str(tmp_path / 'trunk.pt'))


def test_bad_weights_are_refused(tmp_path):
  with pytest.raises(encoders.EncoderError, match="expected 'imagenet', 'random'"):
    encoders.Encoder('wsi', str(tmp_path / 'nope.pt'))
  bad = tmp_path / 'other.pt'
  torch.save({'conv.weight': torch.zeros(1)}, bad)
  with pytest.raises(encoders.EncoderError, match='does not match torchvision resnet50'):
    encoders.Encoder('wsi', str(bad))
  pickled = tmp_path / 'pickled.pt'
  torch.save({'model': torchvision.models.resnet18(weights=None)}, pickled)  # a pickled module
  with pytest.raises(encoders.EncoderError, match='weights_only'):
    encoders.Encoder('wsi', str(pickled))
