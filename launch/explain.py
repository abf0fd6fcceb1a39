r"""Where a trained model looks: slide attention heatmaps and MRI Grad-CAM for chosen patients.

  python -m launch.explain --workdir=runs/moemil --patients=P001,P017 --task=response \
      --manifest=cohort/manifest.csv [--overlap] [--blur=0.5] [--level=2]

Restores <workdir>/checkpoints/best with the config and store in run.json, reads the
patients' slides and MRI from the manifest, writes PNGs (plus top-k tiles and their CSV under
explain/tiles/) into <workdir>/explain/, and adds them to report.html (in the workdir or
its parent) when one exists.
"""

from __future__ import annotations

import json
from pathlib import Path

from absl import flags, logging

from launch import cli

EXAMPLE = '--workdir=runs/moemil --patients=P001,P017 --manifest=cohort/manifest.csv'

_WORKDIR = flags.DEFINE_string('workdir', None, 'Training workdir (run.json, checkpoints/best).')
_PATIENTS = flags.DEFINE_list('patients', None, 'Patient IDs to explain.')
_TASK = flags.DEFINE_enum(
  'task',
  'response',
  ['response', 'survival'],
  'Task output for Grad-CAM: response logit or log-risk.',
)
_MANIFEST = flags.DEFINE_string('manifest', None, 'Cohort manifest.csv locating slides and MRI.')
_LEVEL = flags.DEFINE_integer(
  'level',
  None,
  'Pyramid level of the heatmaps (default: finest level with both sides <= --max_side).',
)
_MAX_SIDE = flags.DEFINE_integer('max_side', 4096, 'Longest heatmap side when choosing a level.')
_BLUR = flags.DEFINE_float(
  'blur', 0.5, 'Gaussian smoothing sigma, in patch sides (0: one flat square per patch).'
)
_ALPHA = flags.DEFINE_float('alpha', 0.5, 'Heatmap opacity.')
_OVERLAP = flags.DEFINE_bool(
  'overlap',
  False,
  'Re-score patches half a patch apart (re-embeds them with the WSI encoder: slow on a CPU).',
)
_TOP_K = flags.DEFINE_integer('top_k', 8, 'Most attended patches saved as tiles per slide.')
_ENCODER_WEIGHTS = flags.DEFINE_string(
  'encoder_weights',
  None,
  "ResNet50 weights the store was extracted with ('imagenet', "
  "'random' or a file); default: what STORE.json names.",
)
_DEVICE = flags.DEFINE_string('device', 'cpu', 'Torch device for the ResNet50.')
_HEATMAPS = flags.DEFINE_bool('heatmaps', True, 'Draw slide attention heatmaps.')
_GRADCAM = flags.DEFINE_bool('gradcam', True, 'Draw MRI Grad-CAM.')


def _encoder(kind: str, store_info: dict, weights: str | None, device: str):
  """The store's encoder, refusing weights whose SHA-256 differs from the store fingerprint."""
  from feature_store import encoders

  fp = (
    store_info.get(kind if kind == 'wsi' else 'mri', {}).get('fingerprint', {}).get('encoder', {})
  )
  weights = weights or fp.get('weights')
  if not weights or weights not in ('imagenet', 'random') and not Path(weights).is_file():
    raise ValueError(
      f'STORE.json names {kind} encoder weights {fp.get("weights")!r}; pass '
      '--encoder_weights=PATH to that file'
    )
  enc = encoders.Encoder(kind, weights, device)
  want = fp.get('weights_sha256')
  if want and enc.fingerprint['weights_sha256'] != want:
    raise ValueError(
      f'{kind} encoder weights {weights!r} have SHA-256 '
      f'{enc.fingerprint["weights_sha256"][:12]}..., the store was made with '
      f'{want[:12]}...: explanations would not match the features'
    )
  return enc


def explain(
  workdir: str | Path,
  patients: list[str],
  *,
  manifest: str | Path,
  task: str = 'response',
  level: int | None = None,
  max_side: int = 4096,
  blur: float = 0.5,
  alpha: float = 0.5,
  overlap: bool = False,
  top_k: int = 8,
  encoder_weights: str | None = None,
  device: str = 'cpu',
  heatmaps: bool = True,
  gradcam: bool = True,
  store_dir: str | Path | None = None,
  out_dir: str | Path | None = None,
) -> list[Path]:
  """Writes the PNGs for `patients` into <workdir>/explain/ (or `out_dir`) and returns their
  paths. `store_dir`: the patients' feature store, when not the one the model was trained
  on (it must be made with the same encoder and settings)."""
  from feature_store import extract, store
  from feature_store import manifest as manifest_lib
  from moemil_jax import gradcam as gradcam_lib
  from moemil_jax import heatmaps as heatmaps_lib
  from moemil_jax import report

  workdir = Path(workdir)
  out_dir = Path(out_dir) if out_dir else workdir / report.EXPLAIN
  run = heatmaps_lib.load_run(workdir, store_dir)
  info = store.read_store_json(run.store_dir)
  man = manifest_lib.read_manifest(manifest, outcomes_required=False)  # images only
  by_id = {p.patient_id: p for p in man.patients}
  missing = [p for p in patients if p not in by_id]
  if missing:
    raise manifest_lib.ManifestError(
      f'{manifest}: no valid row for patient(s) {missing}; check --patients and the manifest'
    )
  for pid in patients:
    store.validate_id(pid, what='patient_id')
    run.patient_index(pid)  # clear error if the store does not know the patient

  params = heatmaps_lib.HeatmapParams(level=level, max_side=max_side, blur=blur, alpha=alpha)
  written: list[Path] = []
  wsi_enc = mri_enc = None
  for pid in patients:
    patient = by_id[pid]
    if heatmaps and run.scores_patches:
      paths = {s.slide_id: s.path for s in patient.slides}
      for att in run.slide_attention(pid, task):
        if att.slide_id not in paths:
          logging.warning(
            '%s: slide %s is in the store but not in %s; skipped', pid, att.slide_id, manifest
          )
          continue
        patch_l0 = heatmaps_lib.patch_level0_px(att.metadata)
        patch_px = int(
          att.metadata.get('patch_px') or (att.metadata.get('encoder') or {}).get('patch_px') or 256
        )
        rescore = None
        if overlap:
          wsi_enc = wsi_enc or _encoder('wsi', info, encoder_weights, device)
          rescore = {'encoder': wsi_enc, 'score_fn': run.patch_scorer(pid, task)}
        res = heatmaps_lib.slide_heatmap(
          paths[att.slide_id],
          att.slide_id,
          att.xy,
          att.raw_scores,
          patch_l0,
          out_dir / f'{pid}_{att.slide_id}_attention.png',
          params=params,
          rescore=rescore,
          tiles_dir=out_dir / 'tiles' / att.slide_id,
          top_k=top_k,
          patch_px=patch_px,
        )
        logging.info(
          '%s: heatmap of %s at level %d (%d x %d px)',
          pid,
          att.slide_id,
          res['level'],
          *res['size'],
        )
        written.append(res['png'])
    if gradcam and run.model.mri_deep is not None:
      if not patient.mri or patient.mri_mask is None:
        logging.warning('%s: no MRI in %s; no Grad-CAM', pid, manifest)
        continue
      mri_enc = mri_enc or _encoder('mri', info, encoder_weights, device)
      mri_fp = info.get('mri', {}).get('fingerprint', {})
      res = gradcam_lib.explain_mri(
        run,
        mri_enc,
        pid,
        dict(patient.mri),
        patient.mri_mask,
        task,
        out_dir / f'{pid}_gradcam_{task}.png',
        slices=int(mri_fp.get('slices', 5)),
        margin=float(mri_fp.get('crop_margin', extract.MRI_CROP_MARGIN)),
        percentiles=tuple(mri_fp.get('percentiles', extract.MRI_PERCENTILES)),
      )
      logging.info(
        '%s: Grad-CAM of %s (%+.3f) on %d slices', pid, task, res['output'], res['slices']
      )
      written.append(res['png'])
  for candidate in () if store_dir else (workdir / 'report.html', workdir.parent / 'report.html'):
    if candidate.exists():
      report.add_interpretation(candidate)
      logging.info('interpretation added to %s', candidate)
  return written


def main(argv):
  if len(argv) > 1:
    raise cli.UserError(f'unexpected arguments {argv[1:]}: flags take the form --name=value')
  if not _MANIFEST.value:
    raise cli.UserError(
      "--manifest is needed to find the patients' slides and MRI: pass the cohort's manifest.csv"
    )
  workdir = Path(_WORKDIR.value)
  if not (workdir / 'run.json').exists():
    above = [p.parent.name for p in workdir.glob('*/run.json')]
    raise cli.UserError(
      f'--workdir={workdir}: no run.json, not a finished training run'
      + (
        f"; pass one model's folder, e.g. --workdir={workdir / above[0]}"
        if above
        else '; train one first with launch.train'
      )
    )
  paths = explain(
    _WORKDIR.value,
    _PATIENTS.value,
    manifest=_MANIFEST.value,
    task=_TASK.value,
    level=_LEVEL.value,
    max_side=_MAX_SIDE.value,
    blur=_BLUR.value,
    alpha=_ALPHA.value,
    overlap=_OVERLAP.value,
    top_k=_TOP_K.value,
    encoder_weights=_ENCODER_WEIGHTS.value,
    device=_DEVICE.value,
    heatmaps=_HEATMAPS.value,
    gradcam=_GRADCAM.value,
  )
  print(json.dumps([str(p) for p in paths], indent=1))


def run():
  flags.mark_flags_as_required(['workdir', 'patients'])
  cli.run(
    main,
    example=EXAMPLE,
    interrupted='interrupted: the trained model is untouched; run the same command again',
  )


if __name__ == '__main__':
  run()
