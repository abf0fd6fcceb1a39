"""ResNet50 trunks that turn image patches into feature vectors.

WSI: torchvision ResNet50 cut after layer3 + global average pooling -> 1024-d
(the CLAM / TRIDENT convention: layer3 features transfer better to histology than
the ImageNet-specific layer4). MRI: the full trunk, average pooled -> 2048-d.

Weights are `imagenet` (torchvision IMAGENET1K_V1, from the torch cache or
downloaded), `random` (seeded, so still reproducible; features are not
pretrained and the fingerprint says so) or a path to a state_dict loaded with
`torch.load(weights_only=True)`. The SHA-256 of the weights goes into the
fingerprint that decides whether a store can be extended.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import torchvision
from absl import logging

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
INPUT_PX = 224
RANDOM_SEED = 0
DIMS = {'wsi': 1024, 'mri': 2048}


class EncoderError(ValueError):
  pass


def _sha256_file(path: Path) -> str:
  h = hashlib.sha256()
  with open(path, 'rb') as f:
    for chunk in iter(lambda: f.read(1 << 20), b''):
      h.update(chunk)
  return h.hexdigest()


def _sha256_state(state: dict[str, torch.Tensor]) -> str:
  h = hashlib.sha256()
  for k in sorted(state):
    h.update(k.encode())
    h.update(state[k].detach().cpu().contiguous().numpy().tobytes())
  return h.hexdigest()


def imagenet_cached() -> bool:
  """Whether the ImageNet ResNet50 weights are in the torch cache (usable offline)."""
  url = torchvision.models.ResNet50_Weights.IMAGENET1K_V1.url
  return (Path(torch.hub.get_dir()) / 'checkpoints' / Path(url).name).is_file()


def load_resnet50(weights: str, kind: str = 'mri') -> tuple[torchvision.models.ResNet, str, bool]:
  """(full ResNet50 in eval mode, weights SHA-256, pretrained?) for 'imagenet' | 'random' | PATH.

  A state_dict without layer4 is accepted only for the layer3 ('wsi') trunk.
  """
  if weights == 'random':
    with torch.random.fork_rng(devices=[]):
      torch.manual_seed(RANDOM_SEED)
      model = torchvision.models.resnet50(weights=None)
    logging.log_first_n(  # once per process, not once per encoder
      logging.WARNING,
      'encoder weights are RANDOM (seed %d): features are NOT pretrained, fine for a demo or '
      'a test, not for a study (--encoder_weights=imagenet downloads the ImageNet weights once)',
      1,
      RANDOM_SEED,
    )
    return model.eval(), _sha256_state(model.state_dict()), False
  model = torchvision.models.resnet50(weights=None)
  if weights == 'imagenet':
    spec = torchvision.models.ResNet50_Weights.IMAGENET1K_V1
    try:
      state = spec.get_state_dict(progress=False, check_hash=True)
    except Exception as e:  # offline without a cached copy
      raise EncoderError(
        f'ImageNet ResNet50 weights unavailable ({e}); they are downloaded to '
        f'{torch.hub.get_dir()}/checkpoints; offline, use --encoder_weights=random or a local file'
      ) from e
    model.load_state_dict(state)
    cached = Path(torch.hub.get_dir()) / 'checkpoints' / Path(spec.url).name
    sha = _sha256_file(cached) if cached.exists() else _sha256_state(state)
    return model.eval(), sha, True
  path = Path(weights)
  if not path.is_file():
    raise EncoderError(
      f"encoder weights {weights!r}: expected 'imagenet', 'random' or an existing file"
    )
  try:
    state = torch.load(path, map_location='cpu', weights_only=True)
  except Exception as e:
    raise EncoderError(
      f'{path}: not a torch state_dict loadable with weights_only=True ({e})'
    ) from e
  if isinstance(state, dict) and 'state_dict' in state and isinstance(state['state_dict'], dict):
    state = state['state_dict']
  state = {k.removeprefix('module.'): v for k, v in state.items()}
  missing, unexpected = model.load_state_dict(state, strict=False)
  optional = ('layer4.', 'fc.') if kind == 'wsi' else ('fc.',)
  if unexpected or any(not k.startswith(optional) for k in missing):
    raise EncoderError(
      f'{path}: does not match torchvision resnet50 '
      f'(missing {missing[:5]}, unexpected {unexpected[:5]})'
    )
  if missing:
    logging.info(
      '%s: no weights for %d %s tensors (unused by the %s trunk)',
      path,
      len(missing),
      '/'.join(o.rstrip('.') for o in optional),
      kind,
    )
  return model.eval(), _sha256_file(path), True


def trunk(model: torchvision.models.ResNet, kind: str) -> torch.nn.Module:
  """'wsi': up to layer3 + global average pool (1024-d); 'mri': up to layer4 + pool (2048-d)."""
  layers = [
    model.conv1,
    model.bn1,
    model.relu,
    model.maxpool,
    model.layer1,
    model.layer2,
    model.layer3,
  ]
  if kind == 'mri':
    layers.append(model.layer4)
  elif kind != 'wsi':
    raise ValueError(f"encoder kind must be 'wsi' or 'mri', got {kind!r}")
  return torch.nn.Sequential(*layers, torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(1)).eval()


class Encoder:
  """A frozen trunk on a device: images in, float32 features out."""

  def __init__(self, kind: str, weights: str = 'imagenet', device: str = 'cpu'):
    model, sha, pretrained = load_resnet50(weights, kind)
    self.kind = kind
    self.dim = DIMS[kind]
    self.device = torch.device(device)
    self.net = trunk(model, kind).to(self.device)
    self.cuda = self.device.type == 'cuda'
    if self.cuda:
      self.net = self.net.to(memory_format=torch.channels_last)
    self.pretrained = pretrained
    self.fingerprint = {
      'name': 'resnet50-layer3-avgpool' if kind == 'wsi' else 'resnet50-avgpool',
      'dim': self.dim,
      'weights': weights if weights in ('imagenet', 'random') else Path(weights).name,
      'weights_sha256': sha,
      'pretrained': pretrained,
      'input_px': INPUT_PX,
      'normalisation': {'mean': list(IMAGENET_MEAN), 'std': list(IMAGENET_STD)},
      'torch': torch.__version__.split('+')[0],
      'torchvision': torchvision.__version__.split('+')[0],
    }
    self._mean = torch.tensor(IMAGENET_MEAN, device=self.device).view(1, 3, 1, 1)
    self._std = torch.tensor(IMAGENET_STD, device=self.device).view(1, 3, 1, 1)

  @torch.inference_mode()
  def __call__(self, images: np.ndarray) -> np.ndarray:
    """images: (n, h, w, 3) uint8 (0-255) or float (0-1); resized to 224 px; -> (n, dim) float32."""
    if len(images) == 0:
      return np.zeros((0, self.dim), np.float32)
    x = torch.from_numpy(np.ascontiguousarray(images)).to(self.device, non_blocking=True)
    x = x.permute(0, 3, 1, 2).float()
    if images.dtype == np.uint8:
      x = x / 255.0
    if x.shape[-2:] != (INPUT_PX, INPUT_PX):
      x = F.interpolate(
        x, size=(INPUT_PX, INPUT_PX), mode='bilinear', antialias=True, align_corners=False
      )
    x = (x - self._mean) / self._std
    if self.cuda:
      x = x.contiguous(memory_format=torch.channels_last)
      with torch.autocast('cuda', dtype=torch.float16):
        out = self.net(x)
    else:
      out = self.net(x)
    return out.float().cpu().numpy()
