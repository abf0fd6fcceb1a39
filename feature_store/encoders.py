"""Patch encoders: the frozen networks that turn image patches into feature vectors.

Slides: a registry (`ENCODERS`) of `resnet50_trunc` (torchvision ResNet50 cut after
layer3 + average pooling, 1024-d: the CLAM / TRIDENT convention), the pathology
foundation models timm can build (UNI, UNI2-h, Virchow2, H-optimus-0/1,
Prov-GigaPath), and `timm:<model>` for any timm model. Each preset carries the
architecture and the input size, normalisation, embedding recipe and precision of
its model card. MRI: the full ResNet50 trunk, average pooled -> 2048-d.

Weights are `hub` (the Hugging Face cache or hub; ImageNet from torchvision for
ResNet50, which `imagenet` also names), `random` (seeded, so still reproducible;
features are not pretrained and the fingerprint says so) or a local file
(safetensors or a torch state_dict loaded with weights_only=True). The SHA-256 of
the weights, the embedding width, precision and device type go into the
fingerprint that decides whether a store can be extended.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import re
from pathlib import Path
from typing import Any, Iterable, Iterator

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


def sha256_file(path: Path) -> str:
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
    sha = sha256_file(cached) if cached.exists() else _sha256_state(state)
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
  return model.eval(), sha256_file(path), True


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


# --------------------------------------------------------------------------- slide encoders

IMAGENET_NORM = {'mean': IMAGENET_MEAN, 'std': IMAGENET_STD}
PRECISIONS = {'fp32': torch.float32, 'fp16': torch.float16, 'bf16': torch.bfloat16}
CUDA_BATCH = 256


def _swiglu():
  import timm

  return timm.layers.SwiGLUPacked


@dataclasses.dataclass(frozen=True)
class Preset:
  """What a model card prescribes: architecture, weights, input, normalisation, embedding."""

  name: str
  arch: str  # timm model name ('resnet50_trunc': the torchvision trunk)
  dim: int
  kwargs: dict = dataclasses.field(default_factory=dict)
  hub: str | None = None  # Hugging Face repo holding the weights
  hub_files: tuple[str, ...] = ('model.safetensors', 'pytorch_model.bin')
  input_px: int = INPUT_PX
  resize_px: int | None = None  # resize to this, then centre-crop input_px (model card)
  mean: tuple[float, float, float] = IMAGENET_MEAN
  std: tuple[float, float, float] = IMAGENET_STD
  recipe: str = 'pooled'  # 'pooled': the model's output; 'cls+mean': class + mean patch token
  cuda_precision: str = 'fp16'  # default on a GPU (CPU: fp32)
  gated: bool = True
  card: str = ''


def _vit_kwargs(**kw) -> dict:
  return {'num_classes': 0, 'init_values': 1e-5, 'img_size': INPUT_PX, **kw}


# Kwargs as on each model card (huggingface.co/<hub>), built without downloading a config.
ENCODERS: dict[str, Preset] = {
  p.name: p
  for p in (
    Preset(
      'resnet50_trunc',
      'resnet50_trunc',
      1024,
      gated=False,
      card='torchvision ResNet50 IMAGENET1K_V1, layer3 + average pool (CLAM, TRIDENT)',
    ),
    Preset(
      'uni',
      'vit_large_patch16_224',
      1024,
      _vit_kwargs(dynamic_img_size=True),
      hub='MahmoodLab/UNI',
      hub_files=('pytorch_model.bin',),
      card='UNI, ViT-L/16, class token',
    ),
    Preset(
      'uni2-h',
      'vit_giant_patch14_224',
      1536,
      _vit_kwargs(
        patch_size=14,
        depth=24,
        num_heads=24,
        embed_dim=1536,
        mlp_ratio=2.66667 * 2,
        no_embed_class=True,
        reg_tokens=8,
        dynamic_img_size=True,
        mlp_layer='swiglu_packed',
        act_layer='silu',
      ),
      hub='MahmoodLab/UNI2-h',
      hub_files=('pytorch_model.bin',),
      cuda_precision='bf16',
      card='UNI2-h, ViT-H/14, 8 register tokens, class token',
    ),
    Preset(
      'virchow2',
      'vit_huge_patch14_224',
      2560,
      _vit_kwargs(
        mlp_ratio=5.3375,
        global_pool='',
        dynamic_img_size=True,
        reg_tokens=4,
        mlp_layer='swiglu_packed',
        act_layer='silu',
      ),
      hub='paige-ai/Virchow2',
      recipe='cls+mean',
      card='Virchow2, ViT-H/14, 4 register tokens, class token + mean patch token',
    ),
    Preset(
      'h-optimus-0',
      'vit_giant_patch14_reg4_dinov2',
      1536,
      _vit_kwargs(global_pool='token', dynamic_img_size=False),
      hub='bioptimus/H-optimus-0',
      mean=(0.707223, 0.578729, 0.703617),
      std=(0.211883, 0.230117, 0.177517),
      card='H-optimus-0, ViT-g/14, 4 register tokens, class token',
    ),
    Preset(
      'h-optimus-1',
      'vit_giant_patch14_reg4_dinov2',
      1536,
      _vit_kwargs(global_pool='token', dynamic_img_size=False),
      hub='bioptimus/H-optimus-1',
      mean=(0.707223, 0.578729, 0.703617),
      std=(0.211883, 0.230117, 0.177517),
      card='H-optimus-1, ViT-g/14, 4 register tokens, class token',
    ),
    Preset(
      'prov-gigapath',
      'vit_giant_patch14_dinov2',
      1536,
      _vit_kwargs(patch_size=16, embed_dim=1536, depth=40, num_heads=24, mlp_ratio=5.33334),
      hub='prov-gigapath/prov-gigapath',
      resize_px=256,
      card='Prov-GigaPath tile encoder, ViT-g/16, class token; resize 256, centre crop 224',
    ),
  )
}
TIMM_PREFIX = 'timm:'


def _timm_kwargs(kwargs: dict) -> dict:
  """JSON-able kwargs (as in the fingerprint) -> timm kwargs (layer names -> classes)."""
  out = dict(kwargs)
  if out.get('mlp_layer') == 'swiglu_packed':
    out['mlp_layer'] = _swiglu()
  if out.get('act_layer') == 'silu':
    out['act_layer'] = torch.nn.SiLU
  return out


def preset(name: str, kwargs: dict | None = None) -> Preset:
  """A registry preset, or one for `timm:<model>` (kwargs passed to timm.create_model)."""
  if name.startswith(TIMM_PREFIX):
    import timm

    arch = name[len(TIMM_PREFIX) :]
    if not timm.is_model(arch):
      raise EncoderError(
        f'--wsi_encoder={name}: timm has no model {arch!r} (timm.list_models() lists them)'
      )
    cfg = timm.models.get_pretrained_cfg(arch) or None
    px = int((cfg.input_size if cfg else (3, INPUT_PX, INPUT_PX))[-1])
    return Preset(
      name,
      arch,
      0,  # known once built: model.num_features
      {'num_classes': 0, **(kwargs or {})},
      input_px=int((kwargs or {}).get('img_size', px)),
      mean=tuple(cfg.mean) if cfg else IMAGENET_MEAN,
      std=tuple(cfg.std) if cfg else IMAGENET_STD,
      gated=False,
      card=f'timm {arch}',
    )
  if name not in ENCODERS:
    raise EncoderError(
      f'--wsi_encoder={name}: unknown encoder; choose one of {", ".join(ENCODERS)} '
      'or timm:<model name>'
    )
  if kwargs:
    raise EncoderError(f'--encoder_kwargs apply to timm:<model> encoders only, not {name}')
  return ENCODERS[name]


def _offline_error(p: Preset, why: str) -> EncoderError:
  from huggingface_hub import constants

  where = f'huggingface.co/{p.hub}' if p.hub else 'the timm hub'
  return EncoderError(
    f'{p.name}: weights not found in the Hugging Face cache ({constants.HF_HUB_CACHE}) and '
    f'the hub is unreachable or refused ({why}); download them once with network access '
    f'(gated models: accept the terms on {where} and set HF_TOKEN or run `hf auth login`), '
    'or pass --wsi_encoder_weights=PATH to a local weights file, or '
    '--wsi_encoder_weights=random to test the pipeline'
  )


def _hub_file(p: Preset) -> Path:
  """The preset's weights file from the HF cache, else the hub (fails fast offline)."""
  import huggingface_hub as hf

  last = ''
  for local_only in (True, False):
    if not local_only and hf.is_offline_mode():
      break
    for filename in p.hub_files:
      try:
        return Path(
          hf.hf_hub_download(p.hub, filename, local_files_only=local_only, etag_timeout=10)
        )
      except Exception as e:  # noqa: BLE001 -- any hub failure becomes the one message below
        last = f'{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ""}'[:200]
  raise _offline_error(p, last or 'HF_HUB_OFFLINE is set')


def _load_state(path: Path) -> dict[str, torch.Tensor]:
  try:
    if path.suffix == '.safetensors':
      from safetensors.torch import load_file

      state = load_file(str(path))
    else:
      state = torch.load(path, map_location='cpu', weights_only=True)
  except Exception as e:
    raise EncoderError(f'{path}: not loadable as safetensors or a torch state_dict ({e})') from e
  for key in ('state_dict', 'model'):
    if isinstance(state, dict) and isinstance(state.get(key), dict):
      state = state[key]
  return {k.removeprefix('module.'): v for k, v in state.items()}


def _blob_sha(path: Path) -> str:
  """The HF cache names large-file blobs by their SHA-256: no need to read 4 GB to hash."""
  name = Path(os.path.realpath(path)).name
  return name if re.fullmatch(r'[0-9a-f]{64}', name) else sha256_file(path)


def build_slide_model(p: Preset, weights: str) -> tuple[torch.nn.Module, int, str, bool, str]:
  """(model in eval mode, embedding width, weights sha256, pretrained?, weights label)."""
  if p.arch == 'resnet50_trunc':
    w = 'imagenet' if weights in ('hub', 'imagenet') else weights
    model, sha, pretrained = load_resnet50(w, 'wsi')
    label = w if w in ('imagenet', 'random') else Path(w).name
    return trunk(model, 'wsi'), 1024, sha, pretrained, label
  import timm

  kwargs = _timm_kwargs(p.kwargs)
  if weights == 'random':
    with torch.random.fork_rng(devices=[]):
      torch.manual_seed(RANDOM_SEED)
      model = timm.create_model(p.arch, pretrained=False, **kwargs)
    _warn_random()
    return model.eval(), _dim(model, p), _sha256_state(model.state_dict()), False, 'random'
  if weights in ('hub', 'imagenet') and p.hub is None:  # timm:<model>: timm's own weights
    try:
      model = timm.create_model(p.arch, pretrained=True, **kwargs)
    except Exception as e:  # noqa: BLE001
      raise _offline_error(p, f'{type(e).__name__}: {e}'[:200]) from e
    return model.eval(), _dim(model, p), _sha256_state(model.state_dict()), True, 'hub'
  path = _hub_file(p) if weights in ('hub', 'imagenet') else Path(weights)
  if not path.is_file():
    raise EncoderError(
      f"--wsi_encoder_weights={weights!r}: expected 'hub', 'random' or an existing file"
    )
  model = timm.create_model(p.arch, pretrained=False, **kwargs)
  try:
    model.load_state_dict(_load_state(path), strict=True)
  except RuntimeError as e:
    raise EncoderError(
      f'{path}: does not match {p.name} ({p.arch}): {str(e).splitlines()[0]}'
    ) from e
  label = 'hub' if weights in ('hub', 'imagenet') else path.name
  return model.eval(), _dim(model, p), _blob_sha(path), True, label


def _dim(model: torch.nn.Module, p: Preset) -> int:
  d = int(model.num_features) * (2 if p.recipe == 'cls+mean' else 1)
  if p.dim and d != p.dim:
    raise EncoderError(f'{p.name}: built a {d}-d encoder, its model card says {p.dim}')
  return d


def _warn_random() -> None:
  logging.log_first_n(
    logging.WARNING,
    'encoder weights are RANDOM (seed %d): features are NOT pretrained, fine for a demo or '
    'a test, not for a study',
    1,
    RANDOM_SEED,
  )


def resolve_precision(p: Preset, precision: str, device: torch.device) -> str:
  if precision == 'auto':
    return p.cuda_precision if device.type == 'cuda' else 'fp32'
  if precision not in PRECISIONS:
    raise EncoderError(f'--precision={precision}: choose auto, {", ".join(PRECISIONS)}')
  return precision


def _jsonable(x):
  if isinstance(x, dict):
    return {k: _jsonable(v) for k, v in x.items()}
  if isinstance(x, (list, tuple)):
    return [_jsonable(v) for v in x]
  return x if isinstance(x, (str, int, float, bool, type(None))) else repr(x)


class Encoder:
  """A frozen network on a device: uint8 patches in, float32 features out.

  kind 'mri': the ResNet50 trunk (weights 'imagenet' | 'random' | PATH). kind 'wsi': the
  slide encoder `name` (ENCODERS or timm:<model>) with `weights` 'hub' | 'random' | PATH.
  On CUDA: cudnn autotuning, channels-last, pinned staging buffers and autocast in the
  preset's precision; `encode_batches` double-buffers the device-to-host copies.
  """

  def __init__(
    self,
    kind: str,
    weights: str = 'imagenet',
    device: str = 'cpu',
    *,
    name: str = 'resnet50_trunc',
    kwargs: dict | None = None,
    precision: str = 'auto',
  ):
    self.kind = kind
    self.device = torch.device(device)
    self.cuda = self.device.type == 'cuda'
    if kind == 'mri':
      p = Preset('resnet50', 'resnet50', DIMS['mri'], gated=False)
      weights = 'imagenet' if weights == 'hub' else weights
      model, sha, pretrained = load_resnet50(weights, 'mri')
      net, dim = trunk(model, 'mri'), DIMS['mri']
      label = weights if weights in ('imagenet', 'random') else Path(weights).name
      fp_name = 'resnet50-avgpool'
    elif kind == 'wsi':
      p = preset(name, kwargs)
      net, dim, sha, pretrained, label = build_slide_model(p, weights)
      fp_name = 'resnet50-layer3-avgpool' if p.arch == 'resnet50_trunc' else p.name
    else:
      raise ValueError(f"encoder kind must be 'wsi' or 'mri', got {kind!r}")
    self.preset = p
    self.dim = dim
    self.precision = resolve_precision(p, precision, self.device)
    self._dtype = PRECISIONS[self.precision]
    self.net = net.to(self.device).eval()
    self._cnn = p.arch.startswith('resnet50')
    if self.cuda:
      torch.backends.cudnn.benchmark = True  # fixed patch shapes: autotune once
      if self._cnn:
        self.net = self.net.to(memory_format=torch.channels_last)
    self.pretrained = pretrained
    self.fingerprint = {
      'name': fp_name,
      'dim': self.dim,
      'weights': label,
      'weights_sha256': sha,
      'pretrained': pretrained,
      'input_px': p.input_px,
      'normalisation': {'mean': list(p.mean), 'std': list(p.std)},
      'precision': self.precision,
      'device_type': self.device.type,
      'torch': torch.__version__.split('+')[0],
      'torchvision': torchvision.__version__.split('+')[0],
    }
    if kind == 'wsi' and p.arch != 'resnet50_trunc':
      import timm

      self.fingerprint.update(
        arch=p.arch,
        kwargs=_jsonable(p.kwargs),
        recipe=p.recipe,
        resize_px=p.resize_px,
        hub=p.hub,
        timm=timm.__version__,
      )
    self._mean = torch.tensor(p.mean, device=self.device).view(1, 3, 1, 1)
    self._std = torch.tensor(p.std, device=self.device).view(1, 3, 1, 1)
    self._staging: dict[tuple, tuple[torch.Tensor, Any]] = {}

  def _stage(self, images: np.ndarray) -> torch.Tensor:
    """Host batch -> device tensor; on CUDA through a reused pinned buffer (async copy)."""
    src = torch.from_numpy(np.ascontiguousarray(images))
    if not self.cuda:
      return src
    key = (tuple(src.shape), src.dtype)
    if key not in self._staging:
      self._staging[key] = (torch.empty(src.shape, dtype=src.dtype, pin_memory=True), None)
    buf, copied = self._staging[key]
    if copied is not None:
      copied.synchronize()  # the previous batch's host-to-device copy has left the buffer
    buf.copy_(src)
    out = buf.to(self.device, non_blocking=True)
    event = torch.cuda.Event()
    event.record()
    self._staging[key] = (buf, event)
    return out

  def _preprocess(self, x: torch.Tensor, uint8: bool) -> torch.Tensor:
    x = x.permute(0, 3, 1, 2).float()
    if uint8:
      x = x / 255.0
    p = self.preset
    size = p.resize_px or p.input_px
    if x.shape[-2:] != (size, size):
      x = F.interpolate(x, size=(size, size), mode='bilinear', antialias=True, align_corners=False)
    if size != p.input_px:  # centre crop, as the model card's transform
      o = (size - p.input_px) // 2
      x = x[..., o : o + p.input_px, o : o + p.input_px]
    x = (x - self._mean) / self._std
    if self.cuda and self._cnn:
      x = x.contiguous(memory_format=torch.channels_last)
    return x

  def _forward(self, x: torch.Tensor) -> torch.Tensor:
    autocast = self._dtype != torch.float32
    with torch.autocast(self.device.type, dtype=self._dtype, enabled=autocast):
      if self.preset.recipe == 'cls+mean':
        tokens = self.net.forward_features(x)
        prefix = int(getattr(self.net, 'num_prefix_tokens', 1))
        return torch.cat([tokens[:, 0], tokens[:, prefix:].mean(1)], dim=-1)
      return self.net(x)

  def _staged(self, images: np.ndarray, transform) -> torch.Tensor:
    """The batch on the device, through `transform` (uint8 NHWC -> uint8 NHWC, e.g. a
    stain normaliser) when one is given."""
    x = self._stage(images)
    return x if transform is None else transform(x)

  @torch.inference_mode()
  def __call__(self, images: np.ndarray, transform=None) -> np.ndarray:
    """images: (n, h, w, 3) uint8 (0-255) or float (0-1) -> (n, dim) float32."""
    if len(images) == 0:
      return np.zeros((0, self.dim), np.float32)
    out = self._forward(self._preprocess(self._staged(images, transform), images.dtype == np.uint8))
    return out.float().cpu().numpy()

  @torch.inference_mode()
  def encode_batches(
    self, batches: Iterable[tuple[Any, np.ndarray]], transform=None
  ) -> Iterator[tuple]:
    """(key, images) -> (key, features), in order. On CUDA the features of batch k are
    copied to pinned host memory while batch k+1 runs (two buffers, one event each).
    transform: applied to each uint8 batch on the device before the model (stain.Normaliser)."""
    if not self.cuda:
      for key, images in batches:
        yield key, self(images, transform)
      return
    pending = None
    slot = 0
    hosts: list[torch.Tensor | None] = [None, None]
    for key, images in batches:
      x = self._staged(images, transform)
      out = self._forward(self._preprocess(x, images.dtype == np.uint8))
      out = out.float()
      host = hosts[slot]
      if host is None or host.shape != out.shape:
        host = hosts[slot] = torch.empty(out.shape, dtype=torch.float32, pin_memory=True)
      host.copy_(out, non_blocking=True)
      event = torch.cuda.Event()
      event.record()
      if pending is not None:
        pending[2].synchronize()
        yield pending[0], pending[1].numpy().copy()
      pending = (key, host, event)
      slot ^= 1
    if pending is not None:
      pending[2].synchronize()
      yield pending[0], pending[1].numpy().copy()


def encoder_table() -> list[dict[str, Any]]:
  """One row per preset, for the docs and `--wsi_encoder=list`."""
  return [
    {
      'name': p.name,
      'dim': p.dim,
      'arch': p.arch,
      'hub': p.hub or '',
      'input_px': p.input_px,
      'recipe': p.recipe,
      'cuda_precision': p.cuda_precision,
      'card': p.card,
    }
    for p in ENCODERS.values()
  ]


def weights_available(name: str) -> bool:
  """Whether `--wsi_encoder_weights=hub` works offline (the weights are cached)."""
  p = preset(name)
  if p.arch == 'resnet50_trunc':
    return imagenet_cached()
  import huggingface_hub as hf

  return any(isinstance(hf.try_to_load_from_cache(p.hub, f), str) for f in p.hub_files)
