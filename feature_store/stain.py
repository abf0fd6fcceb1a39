"""Stain normalisation of H&E patches, batched in torch on the extraction device.

Macenko (Macenko et al., ISBI 2009) and Reinhard (Reinhard et al., IEEE CG&A 2001) as
torchstain 1.4.1 implements them for one image (its torch backends: optical density
with Io = 240, tissue pixels with OD >= 0.15 in every channel, the 1st / 99th percentile
angles in the plane of the two largest eigenvectors, nearest-rank percentiles, the 99th
percentile concentrations; Reinhard in torchstain's OpenCV-scaled LAB), rewritten here to
take a whole batch (B, H, W, 3) of uint8 patches at once, on whatever device the encoder
runs, and never to fail: a patch whose stain cannot be estimated (mostly background, a
single colour such as marker ink, too few tissue pixels, coincident or degenerate stain
vectors, a stain far from the target's) keeps its own pixels and is counted.
tests/test_stain.py checks the batched code against torchstain patch by patch.

Histogram matching (scikit-image's match_histograms, each channel of the tissue pixels) is
the third method, and every method maps from one of three scopes (`SCOPES`): each patch's
own stain, its slide's, or its hospital's (docs/stain.md, "Scope").

The target is a `StainTarget`: fitted on one reference image (`--stain_reference`) or,
by default, a robust pooled estimate over a sample of the development center's tissue
patches: the median of the per-patch stain vectors (each then scaled to unit length) and
of the per-patch 99th percentile concentrations (Macenko), or of the per-patch LAB means
and standard deviations (Reinhard). Its method, values, source and the parameters below
form `StainTarget.fingerprint()`, which extraction puts into the slide fingerprint.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Iterable

import numpy as np
import torch

METHODS = ('none', 'macenko', 'reinhard', 'histogram')
STAIN_METHODS = METHODS[1:]


class StainError(ValueError):
  """No stain could be estimated where one is required (a reference image, a fit sample)."""


@dataclasses.dataclass(frozen=True)
class StainParams:
  """Estimation settings (torchstain's defaults for the first three) and fallback rules."""

  io: float = 240.0  # transmitted light intensity
  alpha: float = 1.0  # Macenko: percentile of the stain angles (alpha and 100 - alpha)
  beta: float = 0.075  # tissue pixel: OD at least this in every channel (torchstain: 0.15)
  min_tissue: float = 0.05  # fraction of tissue pixels below which a patch falls back
  min_angle_deg: float = 3.0  # Macenko: H and E vectors closer than this fall back
  max_target_angle_deg: float = 45.0  # Macenko: a vector this far from the target's falls back
  min_std: float = 1e-3  # Reinhard: a LAB channel with less spread falls back
  fit_stride: int = 2  # statistics from every fit_stride-th row and column (1: all, torchstain)

  def as_dict(self) -> dict[str, float]:
    return dataclasses.asdict(self)


# --------------------------------------------------------------------------- colour spaces

# torchstain.torch.utils.rgb2lab: sRGB -> XYZ (D65) -> LAB, scaled as OpenCV's 8-bit LAB.
_RGB2XYZ = np.array(
  [[0.412453, 0.357580, 0.180423], [0.212671, 0.715160, 0.072169], [0.019334, 0.119193, 0.950227]]
)
_WHITE = np.array([0.95047, 1.0, 1.08883])


def _srgb_table(device) -> torch.Tensor:
  v = torch.arange(256, dtype=torch.float64) / 255.0
  lin = torch.where(v > 0.04045, ((v + 0.055) / 1.055) ** 2.4, v / 12.92)
  return lin.float().to(device)


def rgb2lab(rgb: torch.Tensor) -> torch.Tensor:
  """(..., 3) RGB, uint8 or float in [0, 1] -> (..., 3) CIELAB (L in 0-100), torchstain's
  conversion."""
  dtype = torch.float32 if rgb.dtype == torch.uint8 else rgb.dtype
  m = torch.as_tensor(_RGB2XYZ, dtype=dtype, device=rgb.device)
  w = torch.as_tensor(_WHITE, dtype=dtype, device=rgb.device)
  if rgb.dtype == torch.uint8:  # a table of the 256 values instead of a power per pixel
    lin = torch.take(_srgb_table(rgb.device), rgb.long())
  else:
    lin = torch.where(rgb > 0.04045, ((rgb.clamp(min=0) + 0.055) / 1.055) ** 2.4, rgb / 12.92)
  xyz = lin @ (m.T / w)
  f = torch.where(xyz > 0.008856, xyz.clamp(min=0.008856) ** (1 / 3), 7.787 * xyz + 16 / 116)
  x, y, z = f.unbind(-1)
  return torch.stack([116.0 * y - 16.0, 500.0 * (x - y), 200.0 * (y - z)], -1)


def lab2rgb(lab: torch.Tensor) -> torch.Tensor:
  """The inverse of `rgb2lab`, clipped to [0, 1] (torchstain.torch.utils.lab2rgb)."""
  m = torch.as_tensor(np.linalg.inv(_RGB2XYZ), dtype=lab.dtype, device=lab.device)
  w = torch.as_tensor(_WHITE, dtype=lab.dtype, device=lab.device)
  L, a, b = lab.unbind(-1)
  y = (L + 16.0) / 116.0
  f = torch.stack([a / 500.0 + y, y, y - b / 200.0], -1)
  xyz = torch.where(f > 0.2068966, f**3, (f - 16 / 116) / 7.787) * w
  lin = xyz @ m.T
  rgb = torch.where(
    lin > 0.0031308, 1.055 * lin.clamp(min=0.0031308) ** (1 / 2.4) - 0.055, lin * 12.92
  )
  return rgb.clamp(0, 1)


# CIELAB from f = (f(X/Xn), f(Y/Yn), f(Z/Zn)): lab = _F2LAB @ f + _LAB0.
_F2LAB = np.array([[0.0, 116.0, 0.0], [500.0, -500.0, 0.0], [0.0, 200.0, -200.0]])
_LAB0 = np.array([-16.0, 0.0, 0.0])


def _reinhard_apply(x: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
  """lab2rgb(rgb2lab(x) * scale + shift) for uint8 x (B, N, 3), scale and shift (B, 3), with
  the linear steps folded into one 3 x 3 matrix per patch (half the work per pixel)."""
  dev = x.device
  to_lab = torch.as_tensor(_F2LAB, dtype=torch.float32, device=dev)
  lab0 = torch.as_tensor(_LAB0, dtype=torch.float32, device=dev)
  w = torch.as_tensor(_WHITE, dtype=torch.float32, device=dev)
  m = torch.as_tensor(_RGB2XYZ, dtype=torch.float32, device=dev)
  lin = torch.take(_srgb_table(dev), x.long())
  xyz = lin @ (m.T / w)
  f = torch.where(xyz > 0.008856, xyz.clamp(min=0.008856) ** (1 / 3), 7.787 * xyz + 16 / 116)
  # f' = inv(to_lab) ((to_lab f + lab0) * scale + shift - lab0) = a f + b
  inv = torch.linalg.inv(to_lab)
  a = inv @ (scale[:, :, None] * to_lab)  # (B, 3, 3)
  b = ((lab0 * scale + shift - lab0) @ inv.T)[:, None]  # (B, 1, 3)
  f = torch.baddbmm(b, f, a.transpose(1, 2))
  xyz = torch.where(f > 0.2068966, f**3, (f - 16 / 116) / 7.787)
  lin = xyz @ (w[:, None] * torch.linalg.inv(m).T)
  rgb = torch.where(
    lin > 0.0031308, 1.055 * lin.clamp(min=0.0031308) ** (1 / 2.4) - 0.055, lin * 12.92
  )
  return rgb.clamp(0, 1)


def optical_density(rgb: torch.Tensor, io: float) -> torch.Tensor:
  return -torch.log((rgb.float() + 1.0) / io)


# --------------------------------------------------------------------------- estimation


def _nearest_rank(n: torch.Tensor, q: float) -> torch.Tensor:
  """0-based index of torchstain's nearest-rank q-th percentile among n values (int64)."""
  return torch.round((0.01 * float(q)) * (n.double() - 1)).long().clamp(min=0)


def _angle_deg(u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
  cos = (u * v).sum(-1) / (u.norm(dim=-1) * v.norm(dim=-1)).clamp(min=1e-12)
  return torch.rad2deg(torch.arccos(cos.clamp(-1.0, 1.0)))


def _tissue(od: torch.Tensor, p: StainParams) -> tuple[torch.Tensor, torch.Tensor]:
  """(mask (B, N) of tissue pixels, whether enough of each patch is tissue (B,))."""
  mask = (od >= p.beta).all(-1)
  n = mask.sum(1)
  enough = n >= max(3, math.ceil(p.min_tissue * od.shape[1]))
  return mask, enough


def macenko_stains(od: torch.Tensor, p: StainParams) -> dict[str, torch.Tensor]:
  """Per-patch Macenko stain matrix of OD pixels (B, N, 3): {'he': (B, 3, 2) columns H, E,
  'ok': (B,) whether the estimate can be trusted}."""
  b, n_px, _ = od.shape
  mask, ok = _tissue(od, p)
  n = mask.sum(1)
  m = mask.unsqueeze(-1).to(od.dtype)
  nf = n.clamp(min=2).to(od.dtype)
  mean = (od * m).sum(1) / nf[:, None]
  centred = (od - mean[:, None]) * m
  cov = centred.transpose(1, 2) @ centred / (nf - 1)[:, None, None]
  cov = torch.where(torch.isfinite(cov), cov, torch.zeros_like(cov))
  evals, evecs = torch.linalg.eigh(cov)
  plane = evecs[..., 1:3]  # (B, 3, 2): the second largest, then the largest
  ok &= evals[:, 2] > 1e-8
  proj = od @ plane
  phi = torch.atan2(proj[..., 1], proj[..., 0])
  lo_idx, hi_idx = _nearest_rank(n, p.alpha), _nearest_rank(n, 100 - p.alpha)
  # The alpha-th smallest and largest angles of the tissue pixels, from two partial sorts.
  k_lo = int(min(n_px, max(1, int(lo_idx.max()) + 1)))
  k_hi = int(min(n_px, max(1, int((n - 1 - hi_idx).clamp(min=0).max()) + 1)))
  inf = torch.tensor(float('inf'), device=od.device)
  small = torch.topk(torch.where(mask, phi, inf), k_lo, dim=1, largest=False).values
  large = torch.topk(torch.where(mask, phi, -inf), k_hi, dim=1, largest=True).values
  min_phi = small.gather(1, lo_idx.clamp(max=k_lo - 1)[:, None])[:, 0]
  max_phi = large.gather(1, (n - 1 - hi_idx).clamp(0, k_hi - 1)[:, None])[:, 0]
  v_min = (plane @ torch.stack([torch.cos(min_phi), torch.sin(min_phi)], -1)[..., None])[..., 0]
  v_max = (plane @ torch.stack([torch.cos(max_phi), torch.sin(max_phi)], -1)[..., None])[..., 0]
  h_first = (v_min[:, 0] > v_max[:, 0])[:, None]
  he = torch.stack([torch.where(h_first, v_min, v_max), torch.where(h_first, v_max, v_min)], -1)
  ok &= torch.isfinite(he).all(-1).all(-1)
  ok &= _angle_deg(he[..., 0], he[..., 1]) >= p.min_angle_deg
  return {'he': he, 'ok': ok}


def _pinv(he: torch.Tensor) -> torch.Tensor:
  """(B, 2, 3) least-squares inverse of a (B, 3, 2) stain matrix, from the 2 x 2 normal
  equations (torch.linalg.lstsq's solution for a full-rank matrix; never raises)."""
  g = he.transpose(1, 2) @ he
  det = g[:, 0, 0] * g[:, 1, 1] - g[:, 0, 1] * g[:, 1, 0]
  det = torch.where(det.abs() > 1e-12, det, torch.ones_like(det))
  row0 = torch.stack([g[:, 1, 1], -g[:, 0, 1]], -1)
  row1 = torch.stack([-g[:, 1, 0], g[:, 0, 0]], -1)
  return (torch.stack([row0, row1], 1) / det[:, None, None]) @ he.transpose(1, 2)


def _max_conc(c: torch.Tensor) -> torch.Tensor:
  """torchstain's 99th percentile (nearest rank) of each stain's concentrations (B, 2)."""
  n = c.shape[-1]
  k = 1 + round(0.01 * 99.0 * (n - 1))
  return c.kthvalue(k, dim=-1).values


def _subsample(images: torch.Tensor, stride: int) -> torch.Tensor:
  """uint8 (B, H, W, 3) -> (B, N, 3) pixels of every stride-th row and column."""
  if stride > 1:
    images = images[:, ::stride, ::stride]
  return images.reshape(images.shape[0], -1, 3)


def estimate(images: torch.Tensor, method: str, params: StainParams = StainParams()) -> dict:
  """Per-patch stain statistics of uint8 (B, H, W, 3) images, with 'ok' (B,) saying which
  can be trusted. Macenko: 'he' (B, 3, 2), 'max_conc' (B, 2); Reinhard: 'mean', 'std' (B, 3)
  in CIELAB. From every `params.fit_stride`-th row and column."""
  x = _subsample(images, max(1, int(params.fit_stride)))
  od = optical_density(x, params.io)
  if method == 'macenko':
    out = macenko_stains(od, params)
    he = torch.where(out['ok'][:, None, None], out['he'], _DEFAULT_HE.to(od))
    max_conc = _max_conc(_pinv(he) @ od.transpose(1, 2))
    out['ok'] &= torch.isfinite(max_conc).all(-1) & (max_conc > 1e-6).all(-1)
    out['he'], out['max_conc'] = he, max_conc
    return out
  if method == 'reinhard':
    _, ok = _tissue(od, params)
    lab = rgb2lab(x)
    mean, std = lab.mean(1), lab.std(1)
    ok &= (std > params.min_std).all(-1) & torch.isfinite(std).all(-1)
    ok &= torch.isfinite(mean).all(-1)
    return {'mean': mean, 'std': std, 'ok': ok}
  if method == 'histogram':
    # Tissue here is any pixel not glass (OD >= beta in some channel): the pale eosin of
    # stroma has almost no red OD, and its colour is most of what this method matches.
    tissue = (od >= params.beta).any(-1)
    counts = _channel_counts(x, tissue)
    n = tissue.sum(1)
    ok = n >= max(3, math.ceil(params.min_tissue * x.shape[1]))
    # One colour (ink, a flat region): a channel with nearly all its pixels at one value.
    ok &= (counts.amax(-1) <= 0.95 * n[:, None]).all(-1)
    return {'cdf': counts.cumsum(-1) / n.clamp(min=1)[:, None, None], 'ok': ok}
  raise ValueError(f'stain method {method!r}: choose {", ".join(STAIN_METHODS)}')


def _channel_counts(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
  """(B, 3, 256) counts of each channel's values over the masked pixels of uint8 (B, N, 3)."""
  b = x.shape[0]
  idx = (x.long() + torch.arange(3, device=x.device) * 256).reshape(b, -1)
  weight = mask[..., None].expand(-1, -1, 3).reshape(b, -1).to(torch.float32)
  counts = torch.zeros(b, 3 * 256, device=x.device).scatter_add_(1, idx, weight)
  return counts.reshape(b, 3, 256)


def _interp(x: torch.Tensor, xp: torch.Tensor, fp: torch.Tensor) -> torch.Tensor:
  """np.interp for a batch x (..., n) on one increasing xp (k,): fp at the ends outside."""
  if len(xp) == 1:
    return fp.expand_as(x).clone()
  i = torch.searchsorted(xp, x.contiguous()).clamp(1, len(xp) - 1)
  x0, x1, f0, f1 = xp[i - 1], xp[i], fp[i - 1], fp[i]
  out = f0 + (x - x0) * (f1 - f0) / (x1 - x0).clamp(min=1e-12)
  return torch.where(x <= xp[0], fp[0], torch.where(x >= xp[-1], fp[-1], out))


def histogram_lut(source_cdf: torch.Tensor, target_cdf: torch.Tensor) -> torch.Tensor:
  """(B, 3, 256) lookup tables that give each channel of a source (cumulative distribution
  (B, 3, 256)) the target's distribution (3, 256): scikit-image's match_histograms, whose
  template is the values the target has (its distribution rises there)."""
  out = []
  for c in range(3):
    cdf = target_cdf[c]
    rises = torch.diff(cdf, prepend=cdf.new_zeros(1)) > 0
    values = torch.nonzero(rises)[:, 0].to(cdf.dtype)
    out.append(_interp(source_cdf[:, c], cdf[rises], values))
  return torch.stack(out, 1)


# torchstain's default target (Macenko's own reference), used only to keep a batch's
# algebra finite where a patch falls back.
_DEFAULT_HE = torch.tensor([[0.5626, 0.2159], [0.7201, 0.8012], [0.4062, 0.5581]])


# --------------------------------------------------------------------------- target


@dataclasses.dataclass(frozen=True)
class StainTarget:
  """What patches are normalised to. values: Macenko {'stain_vectors': [H rgb, E rgb] (unit
  OD vectors), 'max_concentrations': [H, E]}; Reinhard {'lab_mean': [L, a, b], 'lab_std': ...}."""

  method: str
  values: dict[str, Any]
  source: str
  params: StainParams = StainParams()

  def fingerprint(self) -> dict[str, Any]:
    return {
      'method': self.method,
      'target': self.values,
      'source': self.source,
      'params': self.params.as_dict(),
    }

  @classmethod
  def from_fingerprint(cls, fp: dict[str, Any]) -> StainTarget:
    return cls(fp['method'], fp['target'], fp['source'], StainParams(**fp.get('params', {})))


def _round(values: torch.Tensor) -> list:
  return np.round(values.detach().double().cpu().numpy(), 6).tolist()


def pooled_target(
  stats: Iterable[dict], method: str, source: str, params: StainParams = StainParams()
) -> StainTarget:
  """The median over the trustworthy patches of per-patch `estimate` outputs."""
  stats = list(stats)
  ok = torch.cat([s['ok'].cpu() for s in stats]) if stats else torch.zeros(0, dtype=torch.bool)
  if not bool(ok.any()):
    raise StainError(f'{source}: no patch with enough tissue to estimate the stain')
  used = int(ok.sum())
  if method == 'macenko':
    he = torch.cat([s['he'].cpu().double() for s in stats])[ok]
    he = he / he.norm(dim=1, keepdim=True)
    he = he.median(0).values
    he = he / he.norm(dim=0, keepdim=True)
    conc = torch.cat([s['max_conc'].cpu().double() for s in stats])[ok].median(0).values
    values = {'stain_vectors': _round(he.T), 'max_concentrations': _round(conc)}
  elif method == 'reinhard':
    mean = torch.cat([s['mean'].cpu().double() for s in stats])[ok].median(0).values
    std = torch.cat([s['std'].cpu().double() for s in stats])[ok].median(0).values
    values = {'lab_mean': _round(mean), 'lab_std': _round(std)}
  elif method == 'histogram':  # the patches' distributions pooled (each patch weighs alike)
    cdf = torch.cat([s['cdf'].cpu().double() for s in stats])[ok].mean(0)
    values = {'cdf': _round(cdf)}
  else:
    raise ValueError(f'stain method {method!r}: choose {", ".join(STAIN_METHODS)}')
  if used > 1:
    source = f'{source} ({"mean" if method == "histogram" else "median"} of {used} patches)'
  return StainTarget(method, values, source, params)


def fit_target(
  images: np.ndarray | torch.Tensor,
  method: str,
  source: str,
  params: StainParams = StainParams(),
  *,
  device: str | torch.device = 'cpu',
  batch_size: int = 64,
) -> StainTarget:
  """A pooled target from uint8 (B, H, W, 3) patches (or one image as a batch of one)."""
  stats = []
  for i in range(0, len(images), batch_size):
    batch = torch.as_tensor(np.ascontiguousarray(images[i : i + batch_size])).to(device)
    stats.append(estimate(batch, method, params))
  return pooled_target(stats, method, source, params)


def read_image(path: str) -> np.ndarray:
  """An RGB uint8 image from a PNG / JPEG / TIFF file (alpha dropped, transparent = white)."""
  import cv2

  image = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
  if image is None:
    raise StainError(f'--stain_reference={path}: not a readable image file')
  if image.ndim == 2:
    image = np.repeat(image[..., None], 3, -1)
  if image.dtype != np.uint8:
    image = (image / (np.iinfo(image.dtype).max / 255.0)).astype(np.uint8)
  rgb = np.ascontiguousarray(image[..., 2::-1])
  if image.shape[-1] == 4:
    rgb = np.where(image[..., 3:4] == 0, np.uint8(255), rgb)
  return rgb


def reference_target(
  path: str, method: str, params: StainParams = StainParams(), sha256: str | None = None
) -> StainTarget:
  """The target fitted on one reference image (the whole image, as torchstain's fit)."""
  from pathlib import Path

  image = read_image(path)
  try:
    target = fit_target(image[None], method, f'reference image {Path(path).name}', params)
  except StainError:
    raise StainError(
      f'--stain_reference={path}: too little tissue (or a single colour) to estimate a '
      'stain from; give an H&E image with tissue'
    ) from None
  if sha256:
    target = dataclasses.replace(target, source=f'{target.source}, sha256 {sha256[:16]}')
  return target


# --------------------------------------------------------------------------- normaliser


SCOPES = ('patch', 'slide', 'center')


class Normaliser:
  """uint8 (B, H, W, 3) patches on a device -> the same patches in the target's stain.

  scope 'patch' estimates each patch's own stain (torchstain's way). Scopes 'slide' and
  'center' map every patch of a slide with one stain, its slide's or its hospital's, pooled
  over a sample of patches as a target is (`start_slide`, `use_stain`): the differences
  between patches (darker, denser nuclei in some) survive, and with 'center' the differences
  between one hospital's patients too; only what the slide or the hospital shares is mapped.

  Patches that fall back keep their pixels; `pop_fallbacks` returns (and resets) how many
  did since the last call, counted on the device (no synchronisation per batch). With one
  stain per slide or center, a patch falls back only when that stain could not be estimated.
  """

  def __init__(self, target: StainTarget, device: str | torch.device = 'cpu', scope: str = 'patch'):
    if target.method not in STAIN_METHODS:
      raise ValueError(f'stain method {target.method!r}: choose {", ".join(STAIN_METHODS)}')
    if scope not in SCOPES:
      raise ValueError(f'stain scope {scope!r}: choose {", ".join(SCOPES)}')
    self.target = target
    self.params = target.params
    self.scope = scope
    self.device = torch.device(device)
    self._source: dict[str, torch.Tensor] | None = None
    self._table_key, self._table = None, None  # Reinhard per center: the center's colour table
    v = target.values
    if target.method == 'macenko':
      self._he = torch.tensor(v['stain_vectors'], dtype=torch.float32, device=self.device).T
      self._conc = torch.tensor(v['max_concentrations'], dtype=torch.float32, device=self.device)
    elif target.method == 'reinhard':
      self._mean = torch.tensor(v['lab_mean'], dtype=torch.float32, device=self.device)
      self._std = torch.tensor(v['lab_std'], dtype=torch.float32, device=self.device)
    else:
      self._cdf = torch.tensor(v['cdf'], dtype=torch.float32, device=self.device)
    self._fallbacks = torch.zeros((), dtype=torch.int64, device=self.device)
    self.patches = 0

  def pop_fallbacks(self) -> int:
    n = int(self._fallbacks)
    self._fallbacks.zero_()
    return n

  def start_slide(self, stats: Iterable[dict]) -> dict[str, Any] | None:
    """Scope 'slide': the next patches are one slide's, whose stain is pooled from `estimate`
    outputs of a sample of its patches; returns it as `use_stain` does."""
    try:
      own = pooled_target(stats, self.target.method, 'slide', self.params)
    except StainError:
      own = None
    return self.use_stain(own)

  def use_stain(self, own: StainTarget | None) -> dict[str, Any] | None:
    """Scopes 'slide' and 'center': map the next patches from the stain `own` (a slide's or
    a center's, pooled like a target). Returns its values (for the slide's record), or None
    when there is none or, Macenko, a vector lies farther than `max_target_angle_deg` from
    the target's: then every patch falls back."""
    to = functools.partial(torch.tensor, dtype=torch.float32, device=self.device)
    self._source = {}
    if own is None:
      return None
    if self.target.method == 'macenko':
      he = to(own.values['stain_vectors']).T
      if bool((_angle_deg(he.T, self._he.T) > self.params.max_target_angle_deg).any()):
        return None
      self._source = {'he': he, 'max_conc': to(own.values['max_concentrations'])}
    elif self.target.method == 'reinhard':
      self._source = {'mean': to(own.values['lab_mean']), 'std': to(own.values['lab_std'])}
      if self.scope == 'center':
        self._source = self._center_table(own) or self._source
    else:  # the table is the same for every patch: made once
      self._source = {'lut': histogram_lut(to(own.values['cdf'])[None], self._cdf)[0]}
    return own.values

  @torch.inference_mode()
  def _center_table(self, own: StainTarget) -> dict[str, torch.Tensor] | None:
    """Reinhard per center: one fixed map of the pixel's colour for all the center's slides,
    so it is tabulated once for the 2**24 colours (packed 0xRRGGBB, int32: 64 MiB) by this
    normaliser's own path, and each pixel then costs one lookup instead of two colour
    conversions. Kept for the next slide of the same center; None if any colour fell back."""
    key = repr(sorted(own.values.items()))
    if self._table_key != key:
      rgb = _unpack_rgb(torch.arange(1 << 24, dtype=torch.int32, device=self.device))
      mapped = [self._map(c) for c in rgb.reshape(256, 256, 256, 3).split(16)]
      table = torch.cat([_pack_rgb(out).reshape(-1) for out, _ in mapped])
      all_mapped = all(bool(ok.all()) for _, ok in mapped)
      self._table_key, self._table = key, table if all_mapped else None
    return None if self._table is None else {'table': self._table}

  @torch.inference_mode()
  def __call__(self, images: torch.Tensor) -> torch.Tensor:
    if images.shape[0] == 0:
      return images
    out, ok = self._map(images)
    self._fallbacks += (~ok).sum()
    self.patches += int(images.shape[0])
    return out

  def _map(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(the patches in the target's stain, (B,) True where mapped; False: kept as they were)."""
    shape = images.shape
    p = self.params
    if self._source is not None and 'table' in self._source:
      out = _unpack_rgb(torch.take(self._source['table'], _pack_rgb(images).long()))
      return out, torch.ones(shape[0], dtype=torch.bool, device=images.device)
    if self.scope == 'patch':
      est = estimate(images, self.target.method, p)
    elif self._source is None:
      raise RuntimeError(
        f"scope '{self.scope}': call start_slide or use_stain before normalising patches"
      )
    elif not self._source:  # no slide or center stain to map from: every patch keeps its own
      return images, torch.zeros(shape[0], dtype=torch.bool, device=images.device)
    else:  # the slide's or center's stain for every patch of the batch
      b = shape[0]
      est = {k: v.expand(b, *v.shape) for k, v in self._source.items()}
      est['ok'] = torch.ones(b, dtype=torch.bool, device=images.device)
    ok = est['ok']
    x = images.reshape(shape[0], -1, 3)
    if self.target.method == 'macenko':
      ok &= _angle_deg(est['he'][..., 0], self._he[:, 0]) <= p.max_target_angle_deg
      ok &= _angle_deg(est['he'][..., 1], self._he[:, 1]) <= p.max_target_angle_deg
      max_c = torch.where(ok[:, None], est['max_conc'], torch.ones_like(est['max_conc']))
      # Concentrations under the patch's stains, rescaled, recoloured with the target's:
      # one 3 x 3 matrix per patch on the optical densities.
      m = self._he @ ((self._conc / max_c)[..., None] * _pinv(est['he']))
      ok &= torch.isfinite(m).all(-1).all(-1)  # then the output is finite: OD always is
      m = torch.where(ok[:, None, None], m, torch.zeros_like(m))
      out = (optical_density(x, p.io) @ m.transpose(1, 2)).neg_().exp_().mul_(p.io)
    elif self.target.method == 'histogram':
      lut = est['lut'] if 'lut' in est else histogram_lut(est['cdf'], self._cdf)
      idx = (x.long() + torch.arange(3, device=x.device) * 256).reshape(shape[0], -1)
      out = torch.gather(lut.reshape(shape[0], -1), 1, idx).reshape(x.shape)
    else:
      std = torch.where(ok[:, None], est['std'], torch.ones_like(est['std']))
      scale = (self._std / std)[:, None]
      shift = self._mean - est['mean'][:, None] * scale
      ok &= torch.isfinite(scale).all(-1).all(-1) & torch.isfinite(shift).all(-1).all(-1)
      scale = torch.where(ok[:, None, None], scale, torch.ones_like(scale))
      shift = torch.where(ok[:, None, None], shift, torch.zeros_like(shift))
      out = _reinhard_apply(x, scale[:, 0], shift[:, 0]) * 255.0
    out = out.clamp_(0, 255).round_().to(torch.uint8)
    if not bool(ok.all()):  # one host sync per batch; the fallbacks keep their pixels
      out[~ok] = x[~ok]
    return out.reshape(shape), ok


def _pack_rgb(images: torch.Tensor) -> torch.Tensor:
  """uint8 (..., 3) -> int32 (...) 0xRRGGBB."""
  x = images.to(torch.int32)
  return (x[..., 0] << 16) | (x[..., 1] << 8) | x[..., 2]


def _unpack_rgb(packed: torch.Tensor) -> torch.Tensor:
  """int32 (...) 0xRRGGBB -> uint8 (..., 3)."""
  return torch.stack([packed >> 16, (packed >> 8) & 255, packed & 255], -1).to(torch.uint8)


def normalise_numpy(images: np.ndarray, target: StainTarget, device: str = 'cpu') -> tuple:
  """(normalised uint8 (B, H, W, 3) numpy, fallbacks): a convenience for scripts and tests."""
  norm = Normaliser(target, device)
  out = norm(torch.as_tensor(np.ascontiguousarray(images)).to(device))
  return out.cpu().numpy(), norm.pop_fallbacks()


# --------------------------------------------------------------------------- augmentation

# scikit-image's HED stain matrix (skimage.color.rgb_from_hed, Ruifrok & Johnston 2001): the
# RGB optical densities of hematoxylin, eosin and DAB, one per row; and its inverse.
RGB_FROM_HED = np.array([[0.65, 0.70, 0.29], [0.07, 0.99, 0.11], [0.27, 0.57, 0.78]])
HED_FROM_RGB = np.linalg.inv(RGB_FROM_HED)
# scikit-image's rgb2hed divides the natural-log optical density by this (-ln 1e-6).
SKIMAGE_OD_SCALE = -math.log(1e-6)


@dataclasses.dataclass(frozen=True)
class AugmentParams:
  """HED stain jitter (Tellez et al. 2018): per patch, view and stain channel, the HED
  concentrations are scaled by alpha ~ U(1 - scale, 1 + scale) and shifted by
  beta ~ U(-shift, shift); beta is in optical density (natural log) units, i.e.
  scikit-image's `rgb2hed` values times SKIMAGE_OD_SCALE (docs/stain.md)."""

  views: int = 0  # extra embeddings per patch (0: off)
  scale: float = 0.05
  shift: float = 0.05

  def fingerprint(self) -> dict[str, Any]:
    return {
      'method': 'hed_jitter',
      'views': int(self.views),
      'scale': float(self.scale),
      'shift': float(self.shift),
      'shift_units': 'natural-log optical density',
      'matrix': 'skimage.color.rgb_from_hed',
      'seed': 'sha256(slide_id), view',
    }


def _log_table(device) -> torch.Tensor:
  """ln(max(v / 255, 1e-6)) of the 256 grey levels (scikit-image's floor)."""
  v = torch.arange(256, dtype=torch.float64) / 255.0
  return torch.log(v.clamp(min=1e-6)).float().to(device)


def hed_jitter(images: torch.Tensor, alpha: torch.Tensor, beta: torch.Tensor) -> torch.Tensor:
  """uint8 (B, H, W, 3) patches -> their HED-jittered copies (uint8, same shape).

  Per patch b: HED = ln(rgb) / ln(1e-6) @ HED_FROM_RGB (scikit-image's rgb2hed without its
  clipping of negative concentrations at 0, which alone moves real H&E pixels by up to 117
  grey levels), HED' = alpha[b] * HED + beta[b] / SKIMAGE_OD_SCALE, back with hed2rgb; alpha
  and beta (B, 3) per H, E, D channel. All linear in ln(rgb): one 3 x 3 matrix and one
  offset per patch, alpha = 1 and beta = 0 give the patch back (to rounding)."""
  if images.shape[0] == 0:
    return images
  shape, dev = images.shape, images.device
  m = torch.as_tensor(HED_FROM_RGB, dtype=torch.float32, device=dev)
  r = torch.as_tensor(RGB_FROM_HED, dtype=torch.float32, device=dev)
  alpha = alpha.to(device=dev, dtype=torch.float32)
  beta = beta.to(device=dev, dtype=torch.float32)
  a = (m[None] * alpha[:, None, :]) @ r  # (B, 3, 3): ln(rgb') = ln(rgb) @ a + c
  c = -(beta @ r)[:, None]  # (B, 1, 3)
  lg = torch.take(_log_table(dev), images.reshape(shape[0], -1, 3).long())
  out = torch.baddbmm(c, lg, a).exp_().clamp_(0, 1).mul_(255.0).round_()
  return out.to(torch.uint8).reshape(shape)


def slide_seed(slide_id: str) -> int:
  """A 64-bit seed from the slide id: the jitter of a slide's views never depends on the
  run, the shard, the batch size or the device."""
  import hashlib

  return int.from_bytes(hashlib.sha256(slide_id.encode()).digest()[:8], 'little')


def jitter_parameters(slide_id: str, patches: int, params: AugmentParams) -> tuple:
  """(alpha, beta), each float64 (views, patches, 3): view v (1-based) of patch i, drawn by
  numpy from (slide_seed(slide_id), v) in the slide's stored patch order."""
  alphas, betas = [], []
  for v in range(1, params.views + 1):
    rng = np.random.default_rng([slide_seed(slide_id), v])
    alphas.append(rng.uniform(1.0 - params.scale, 1.0 + params.scale, (patches, 3)))
    betas.append(rng.uniform(-params.shift, params.shift, (patches, 3)))
  return np.stack(alphas), np.stack(betas)


class Augmenter:
  """uint8 (B, H, W, 3) batch on a device -> ((1 + views) B, H, W, 3): the batch, then its
  HED-jittered copies view by view, for `Encoder.encode_batches(transform=...)`.

  `start(slide_id, patches)` before each slide: the batches that follow are that slide's
  patches in stored order (as extraction sends them), so patch i of the slide always
  gets the parameters `jitter_parameters` gives it."""

  def __init__(self, params: AugmentParams, device: str | torch.device = 'cpu'):
    if params.views < 1:
      raise ValueError(f'stain augmentation with {params.views} views: give at least 1')
    self.params = params
    self.device = torch.device(device)
    self._alpha = self._beta = None
    self._cursor = 0

  def start(self, slide_id: str, patches: int) -> None:
    alpha, beta = jitter_parameters(slide_id, patches, self.params)
    self._alpha = torch.as_tensor(alpha, dtype=torch.float32, device=self.device)
    self._beta = torch.as_tensor(beta, dtype=torch.float32, device=self.device)
    self._cursor = 0

  @torch.inference_mode()
  def __call__(self, images: torch.Tensor) -> torch.Tensor:
    if self._alpha is None:
      raise RuntimeError('Augmenter.start(slide_id, patches) must be called before each slide')
    b = images.shape[0]
    rows = slice(self._cursor, self._cursor + b)
    if self._cursor + b > self._alpha.shape[1]:
      raise RuntimeError(f'augmenter started for {self._alpha.shape[1]} patches, got more')
    self._cursor += b
    views = [
      hed_jitter(images, self._alpha[v, rows], self._beta[v, rows]) for v in range(len(self._alpha))
    ]
    return torch.cat([images, *views])
