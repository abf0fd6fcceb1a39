"""Grad-CAM on MRI through the whole model: JAX for the MoEMIL part, PyTorch for the CNN.

The deep MRI features are made once by a PyTorch ResNet50 and the fused model is JAX, so the
chain rule is split at the embedding: JAX gives d(task output)/d(raw 2048-d embedding of
every slice) through the trained model (including the store normalisation), and
`torch.autograd.backward(embedding, grad)` carries that gradient on through avgpool into
layer4, the last convolutional block. Grad-CAM (Selvaraju et al. 2017) then weights each
layer4 channel by its spatially averaged gradient: cam = ReLU(sum_k mean(dy/dA_k) A_k).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
import torchvision

from feature_store import encoders

TASK_OUTPUTS = {'response': 'response_logit', 'survival': 'log_risk'}


def preprocess(
  images: np.ndarray, device: torch.device | str = 'cpu', *, input_px: int = encoders.INPUT_PX
) -> torch.Tensor:
  """What encoders.Encoder does before the trunk: [0,1], resize to input_px, ImageNet norm."""
  x = torch.from_numpy(np.ascontiguousarray(images)).to(device).permute(0, 3, 1, 2).float()
  if images.dtype == np.uint8:
    x = x / 255.0
  if x.shape[-2:] != (input_px, input_px):
    x = F.interpolate(
      x, size=(input_px, input_px), mode='bilinear', antialias=True, align_corners=False
    )
  mean = torch.tensor(encoders.IMAGENET_MEAN, device=x.device).view(1, 3, 1, 1)
  std = torch.tensor(encoders.IMAGENET_STD, device=x.device).view(1, 3, 1, 1)
  return (x - mean) / std


def convolutional_body(net) -> torch.nn.Module:
  """ResNet50 up to layer4 from a torchvision ResNet, an MRI `encoders.Encoder` or its trunk."""
  if isinstance(net, encoders.Encoder):
    if net.kind != 'mri':
      raise ValueError(f'Grad-CAM needs the MRI trunk (to layer4), got a {net.kind!r} encoder')
    net = net.net
  if isinstance(net, torchvision.models.ResNet):
    return torch.nn.Sequential(
      net.conv1, net.bn1, net.relu, net.maxpool, net.layer1, net.layer2, net.layer3, net.layer4
    ).eval()
  if isinstance(net, torch.nn.Sequential) and len(net) == 10:  # encoders.trunk(model, "mri")
    return net[:8].eval()
  if isinstance(net, torch.nn.Sequential) and len(net) == 8:  # already a body
    return net
  raise TypeError(
    f'expected a torchvision ResNet50 or an MRI encoder trunk, got {type(net).__name__}'
  )


def embed_with_layer4(net, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
  """(2048-d embeddings, layer4 activations) of the MRI trunk, both in the autograd graph."""
  act = convolutional_body(net)(x)
  if act.requires_grad:
    act.retain_grad()
  return torch.flatten(F.adaptive_avg_pool2d(act, 1), 1), act


def embedding_gradient(output_fn: Callable, embeddings: np.ndarray) -> tuple[float, np.ndarray]:
  """(output, d output / d embeddings) in JAX; output_fn maps (S, 2048) float32 to a scalar."""
  import jax

  value, grad = jax.value_and_grad(output_fn)(np.asarray(embeddings, np.float32))
  return float(value), np.asarray(grad, np.float32)


@dataclasses.dataclass
class GradCAMResult:
  output: float  # the task output the gradient is of
  embeddings: np.ndarray  # (S, 2048) recomputed from the images
  embedding_grad: np.ndarray  # (S, 2048) from JAX
  layer4_grad: np.ndarray  # (S, 2048, h, w) from PyTorch
  cams: np.ndarray  # (S, H, W) in [0, 1] at the input image size
  cam_max: np.ndarray  # (S,) peak of each un-normalised CAM (compare slices)


def gradcam(
  net, images: np.ndarray, output_fn: Callable, *, input_px: int = encoders.INPUT_PX
) -> GradCAMResult:
  """Two-step Grad-CAM of `output_fn(embeddings)` for images (S, H, W, 3) of one patient.

  net: the MRI ResNet50 that made the stored embeddings (ResNet, Encoder or its trunk).
  """
  body = convolutional_body(net)
  device = next(body.parameters()).device
  with torch.enable_grad():
    x = preprocess(images, device, input_px=input_px)
    emb, act = embed_with_layer4(body, x)
    value, grad = embedding_gradient(output_fn, emb.detach().cpu().numpy())
    torch.autograd.backward(emb, torch.from_numpy(grad.copy()).to(device))
  a_grad = act.grad.detach()
  weights = a_grad.mean((2, 3), keepdim=True)
  cam = F.relu((weights * act.detach()).sum(1, keepdim=True))
  cam = F.interpolate(cam, size=images.shape[1:3], mode='bilinear', align_corners=False)[:, 0]
  peak = cam.flatten(1).max(1).values
  norm = cam / torch.clamp(peak, min=1e-12)[:, None, None]
  return GradCAMResult(
    value,
    emb.detach().cpu().numpy(),
    grad,
    a_grad.cpu().numpy(),
    norm.cpu().numpy(),
    peak.cpu().numpy(),
  )


# --------------------------------------------------------------------------- the trained model


def model_output_fn(run, patient_id: str, task: str) -> Callable:
  """(S, 2048) raw MRI embeddings -> the trained model's task output for this patient.

  The patient's other inputs (WSI bag, radiomics) are the stored ones; the deep MRI input is
  replaced by the given slices, normalised with the training statistics as in `prepare`.
  """
  import jax.numpy as jnp

  if task not in TASK_OUTPUTS:
    raise ValueError(f'task {task!r}: use one of {sorted(TASK_OUTPUTS)}')
  if run.model.mri_deep is None:
    raise ValueError(f'model {run.config.name!r} has no deep MRI branch')
  base = run.patient_inputs(patient_id)
  mean, std = jnp.asarray(run.mri_mean), jnp.asarray(run.mri_std)
  dtype = jnp.dtype(run.config.model.compute_dtype)
  key = TASK_OUTPUTS[task]

  def output(emb):
    z = ((emb - mean) / std).astype(dtype)[None]
    inputs = dict(
      base,
      mri_deep=z,
      mri_deep_valid=jnp.ones(z.shape[:2], bool),
      has_mri_deep=jnp.ones((1,), bool),
    )
    return run.model(inputs, rngs=None)[key][0]

  return output


# --------------------------------------------------------------------------- figures


def overlay_figure(
  slices_2d: Sequence[np.ndarray],
  masks: Sequence[np.ndarray],
  cams: Sequence[np.ndarray],
  titles: Sequence[str],
  path: Path,
  *,
  suptitle: str = '',
  ncols: int = 5,
  alpha: float = 0.45,
) -> Path:
  """A grid of MRI slices with the Grad-CAM map (jet) and the tumour contour (white)."""
  import matplotlib

  matplotlib.use('Agg')
  import io

  import matplotlib.pyplot as plt

  from feature_store.store import atomic_write_bytes

  n = len(slices_2d)
  ncols = max(1, min(ncols, n))
  nrows = -(-n // ncols)
  fig, axes = plt.subplots(nrows, ncols, figsize=(2.6 * ncols, 2.8 * nrows), squeeze=False)
  for ax in axes.ravel():
    ax.axis('off')
  for ax, img, mask, cam, title in zip(axes.ravel(), slices_2d, masks, cams, titles):
    ax.imshow(img, cmap='gray', vmin=0, vmax=1)
    ax.imshow(np.ma.masked_where(cam <= 0.05, cam), cmap='jet', alpha=alpha, vmin=0, vmax=1)
    if mask.any():
      ax.contour(mask.astype(float), levels=[0.5], colors='white', linewidths=0.9)
    ax.set_title(title, fontsize=8)
  if suptitle:
    fig.suptitle(suptitle, fontsize=9)
  buf = io.BytesIO()
  fig.savefig(buf, format='png', dpi=100, bbox_inches='tight')
  plt.close(fig)
  atomic_write_bytes(Path(path), buf.getvalue())
  return Path(path)


def crop_square(plane: np.ndarray, crop: tuple[int, int, int]) -> np.ndarray:
  """The square (row0, col0, side) of a 2-D array, zero outside it (as mri.roi_slices crops)."""
  top, left, side = crop
  padded = np.pad(plane, side)
  return padded[top + side : top + 2 * side, left + side : left + 2 * side]


def explain_mri(
  run,
  net,
  patient_id: str,
  images: dict,
  mask_path,
  task: str,
  out_png: Path,
  *,
  slices: int = 5,
  margin: float = 0.25,
  percentiles: tuple[float, float] = (0.5, 99.5),
) -> dict:
  """Grad-CAM of every deep-feature slice of a patient (sequences in store order) -> one PNG.

  images: sequence name -> volume path. The K tumour slices are cut exactly as extraction
  cuts them (`mri.roi_slices` with the store's K, margin and percentiles).
  """
  import SimpleITK as sitk

  from feature_store import mri, store

  mask = mri.read_image(mask_path)
  tumour = sitk.GetArrayFromImage(sitk.DICOMOrient(mask, 'LPS')) > 0
  order = [s for s in store.MRI_SEQUENCES if s in images] + sorted(
    set(images) - set(store.MRI_SEQUENCES)
  )
  rois = {
    seq: mri.roi_slices(
      mri.read_image(images[seq]), mask, slices, margin=margin, percentiles=percentiles
    )
    for seq in order
  }
  stack = np.concatenate([rois[s].images for s in order])
  result = gradcam(net, stack, model_output_fn(run, patient_id, task))
  planes, masks, titles, i = [], [], [], 0
  for seq in order:
    roi = rois[seq]
    for j, z in enumerate(roi.slice_index):
      planes.append(roi.images[j, ..., 1])
      masks.append(crop_square(tumour[int(z)], roi.crop))
      titles.append(f'{seq} z={int(z)} (peak {result.cam_max[i]:.2g})')
      i += 1
  label = 'response logit' if task == 'response' else 'log-risk'
  overlay_figure(
    planes,
    masks,
    list(result.cams),
    titles,
    out_png,
    suptitle=f'{patient_id}: Grad-CAM of the {label} ({result.output:+.3f}) on ResNet50 layer4',
    ncols=max(len(r.slice_index) for r in rois.values()),
  )
  return {'png': Path(out_png), 'output': result.output, 'slices': len(planes), 'sequences': order}
