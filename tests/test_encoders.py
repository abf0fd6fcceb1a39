"""Encoders: real torchvision ResNet50 trunks (random weights here: no downloads in tests)."""

import hashlib
import os

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


# Each preset against its model card (huggingface.co/<repo>): embedding width, normalisation,
# registers / prefix tokens, and parameter count (millions, +-2%).
CARDS = {
  'uni': (1024, encoders.IMAGENET_MEAN, encoders.IMAGENET_STD, 1, 303),
  'uni2-h': (1536, encoders.IMAGENET_MEAN, encoders.IMAGENET_STD, 9, 681),
  'virchow2': (2560, encoders.IMAGENET_MEAN, encoders.IMAGENET_STD, 5, 631),
  'h-optimus-0': (1536, (0.707223, 0.578729, 0.703617), (0.211883, 0.230117, 0.177517), 5, 1135),
  'h-optimus-1': (1536, (0.707223, 0.578729, 0.703617), (0.211883, 0.230117, 0.177517), 5, 1135),
  'prov-gigapath': (1536, encoders.IMAGENET_MEAN, encoders.IMAGENET_STD, 1, 1135),
}


@pytest.mark.parametrize('name', sorted(CARDS))
def test_presets_build_with_the_model_cards_width_and_normalisation(name):
  """Built on the meta device (the architecture, no 1-4 GB of random weights on a shared
  CPU); the embedding recipe runs on meta tensors, so the width is the real output's."""
  import timm

  width, mean, std, prefix, params_m = CARDS[name]
  p = encoders.preset(name)
  assert (p.dim, p.mean, p.std, p.input_px) == (width, mean, std, 224)
  with torch.device('meta'):
    model = timm.create_model(p.arch, **encoders._timm_kwargs(p.kwargs))
    x = torch.empty(2, 3, p.input_px, p.input_px)
    if p.recipe == 'cls+mean':
      tokens = model.forward_features(x)
      out = torch.cat([tokens[:, 0], tokens[:, model.num_prefix_tokens :].mean(1)], -1)
    else:
      out = model(x)
  assert tuple(out.shape) == (2, width)
  assert model.num_prefix_tokens == prefix
  assert sum(q.numel() for q in model.parameters()) / 1e6 == pytest.approx(params_m, rel=0.02)


def test_every_registry_entry_is_checked_against_a_card():
  assert set(encoders.ENCODERS) == set(CARDS) | {'resnet50_trunc'}


def test_timm_encoder_random_weights_width_and_fingerprint():
  enc = encoders.Encoder('wsi', 'random', name='timm:vit_tiny_patch16_224', kwargs={'depth': 1})
  images = np.random.default_rng(3).integers(0, 256, (3, 32, 32, 3), dtype=np.uint8)
  emb = enc(images)
  assert emb.shape == (3, 192) and np.isfinite(emb).all()
  assert not np.allclose(emb[0], emb[1])
  again = encoders.Encoder('wsi', 'random', name='timm:vit_tiny_patch16_224', kwargs={'depth': 1})
  np.testing.assert_array_equal(again(images), emb)  # seeded random weights
  fp = enc.fingerprint
  assert (fp['dim'], fp['precision'], fp['device_type'], fp['pretrained']) == (
    192,
    'fp32',
    'cpu',
    False,
  )
  assert list(enc.encode_batches([('a', images)]))[0][1].shape == (3, 192)


def test_unknown_encoders_are_refused_in_one_line():
  with pytest.raises(encoders.EncoderError, match='unknown encoder'):
    encoders.preset('uni3')
  with pytest.raises(encoders.EncoderError, match='timm has no model'):
    encoders.preset('timm:not_a_model')


def test_offline_hub_weights_give_one_line_naming_the_flags(tmp_path):
  import subprocess
  import sys
  from pathlib import Path

  from feature_store.synthetic_cohort import make_cohort

  manifest = make_cohort(tmp_path / 'c', patients=4, slide_px=256, mri_px=16, progress=False)
  env = {**os.environ, 'HF_HUB_OFFLINE': '1', 'HF_HOME': str(tmp_path / 'hf')}
  done = subprocess.run(
    [
      sys.executable,
      '-m',
      'launch.extract',
      '--wsi_encoder=uni',
      '--wsi_encoder_weights=hub',
      f'--store={tmp_path / "store"}',
      f'--manifest={manifest}',
    ],
    capture_output=True,
    text=True,
    env=env,
    cwd=Path(__file__).resolve().parents[1],
    timeout=300,
  )
  assert done.returncode == 2, done.stderr[-3000:]
  lines = [ln for ln in done.stderr.strip().splitlines() if ln.strip()]
  last = lines[-1]
  assert '--wsi_encoder_weights=PATH' in last and '--wsi_encoder_weights=random' in last
  assert str(tmp_path / 'hf' / 'hub') in last
  assert 'Traceback' not in done.stderr
