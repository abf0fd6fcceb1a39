r"""The before / after figure of stain normalisation on the three real H&E images.

  python -m launch.stain_figure [--data=../shared/data] [--out=docs/stain_before_after.png]

Rows: he_tile_strong.png, he_tile_pale.png and cmu-1-small-region.svs (read at a quarter of
its size). Columns: the image as scanned, then Macenko-normalised (feature_store/stain.py,
default settings) to the stain of each tile, each target fitted on the whole tile. Each
panel's title gives the Macenko stain vectors' angles to the target's and the 99th
percentile concentrations, as torchstain's numpy estimate measures them (independent of the
normaliser).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from absl import app, flags

ROOT = Path(__file__).resolve().parents[1]
_DATA = flags.DEFINE_string('data', str(ROOT.parent / 'shared' / 'data'), 'Real test data.')
_OUT = flags.DEFINE_string('out', str(ROOT / 'docs' / 'stain_before_after.png'), 'PNG to write.')


def _torchstain(image: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  import torchstain

  n = torchstain.normalizers.MacenkoNormalizer(backend='numpy')
  n.fit(image)
  return n.HERef, n.maxCRef


def _angles(a: np.ndarray, b: np.ndarray) -> np.ndarray:
  cos = (a * b).sum(0) / np.linalg.norm(a, axis=0) / np.linalg.norm(b, axis=0)
  return np.degrees(np.arccos(np.clip(cos, -1, 1)))


def images(data: Path) -> dict[str, np.ndarray]:
  from feature_store import slides, stain

  out = {
    'he_tile_strong': stain.read_image(data / 'he_tile_strong.png'),
    'he_tile_pale': stain.read_image(data / 'he_tile_pale.png'),
  }
  slide = slides.open_slide(data / 'cmu-1-small-region.svs')
  try:
    out['cmu-1-small-region'] = slides.read_rgb(slide, (0, 0), 0, slide.dimensions)[::4, ::4]
  finally:
    slide.close()
  return {k: np.ascontiguousarray(v) for k, v in out.items()}


def figure(data: Path, out: Path) -> list[dict]:
  """Writes the figure; returns one row per panel (image, target, angles, concentrations)."""
  import matplotlib

  matplotlib.use('Agg')
  import matplotlib.pyplot as plt

  from feature_store import stain

  imgs = images(Path(data))
  targets = {
    name: stain.fit_target(imgs[name][None], 'macenko', name)
    for name in ('he_tile_pale', 'he_tile_strong')
  }
  measured = {name: _torchstain(imgs[name]) for name in targets}
  fig, axes = plt.subplots(3, 3, figsize=(12, 11))
  rows = []
  for r, (name, image) in enumerate(imgs.items()):
    panels = [('as scanned', image, None)]
    for tname, target in targets.items():
      normed, fallbacks = stain.normalise_numpy(image[None], target)
      panels.append((f'Macenko to {tname}', normed[0], tname))
    for c, (title, picture, tname) in enumerate(panels):
      he, conc = _torchstain(picture)
      ax = axes[r, c]
      ax.imshow(picture)
      ax.set_xticks([])
      ax.set_yticks([])
      label = f'{name}\n{title}'
      if tname:
        ang = _angles(he, measured[tname][0])
        label += (
          f'\nH {ang[0]:.1f}°, E {ang[1]:.1f}° from target; maxC {conc[0]:.2f}, {conc[1]:.2f}'
        )
        label += f' (target {measured[tname][1][0]:.2f}, {measured[tname][1][1]:.2f})'
        rows.append(
          {
            'image': name,
            'target': tname,
            'h_deg': float(ang[0]),
            'e_deg': float(ang[1]),
            'max_conc': [float(x) for x in conc],
            'target_max_conc': [float(x) for x in measured[tname][1]],
          }
        )
      else:
        label += f'\nmaxC {conc[0]:.2f}, {conc[1]:.2f}'
      ax.set_title(label, fontsize=8)
  fig.suptitle(
    'Stain normalisation (feature_store/stain.py, Macenko, default settings); angles and '
    "concentrations measured with torchstain's numpy Macenko",
    fontsize=10,
  )
  fig.tight_layout()
  out.parent.mkdir(parents=True, exist_ok=True)
  fig.savefig(out, dpi=72)
  plt.close(fig)
  from PIL import Image

  with Image.open(out) as im:  # 256 colours: a third of the bytes, no visible change
    im.convert('RGB').quantize(256, dither=Image.Dither.NONE).save(out, optimize=True)
  return rows


def main(argv):
  del argv
  for row in figure(Path(_DATA.value), Path(_OUT.value)):
    print(
      f'{row["image"]:>20} -> {row["target"]:<15} H {row["h_deg"]:5.2f} deg, E '
      f'{row["e_deg"]:5.2f} deg; maxC {row["max_conc"][0]:.3f}, {row["max_conc"][1]:.3f} '
      f'(target {row["target_max_conc"][0]:.3f}, {row["target_max_conc"][1]:.3f})'
    )
  print(f'-> {_OUT.value}')


if __name__ == '__main__':
  app.run(main)
