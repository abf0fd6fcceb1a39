"""Extraction pipeline: manifest -> feature store, once.

Units of work are slides (-> wsi/<slide_id>.parquet) and patients' MRI
(-> mri/<patient_id>.radiomics.parquet + mri/<patient_id>.deep.parquet). Each
unit is written atomically with the fingerprint of everything that shaped it
(encoder weights, um/px, patch size, tissue parameters, radiomics parameters);
a rerun skips units whose file carries the same fingerprint, and a store built
with another fingerprint is refused unless `overwrite`. Killing a run therefore
loses at most the units in flight.

A slide's own resolution (level-0 MPP and where it came from: the manifest's `mpp`
column, the slide, its objective power, or `--fallback_mpp`) is part of that slide's
fingerprint only, recorded in its file as `mpp` and `mpp_source`: giving or changing a
fallback re-extracts the slides that use it and no other.

Shards split units by position (slide k and patient k go to shard k % n); each
shard writes only its own unit files plus shards/<i>-of-<n>.json (its failures).
Whichever shard finds every unit accounted for assembles the store-level files:
clinical.parquet, mri_radiomics.parquet, mri_deep.parquet, failures.parquet and
STORE.json (identical from any shard, written atomically).
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import logging as std_logging
import time
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from absl import logging
from tqdm.auto import tqdm

from feature_store import encoders, mri, slides, stain, store
from feature_store import manifest as manifest_lib

MRI_DIR = 'mri'
SHARDS_DIR = 'shards'
_PART_KEY = b'moemil_part'
MRI_CROP_MARGIN = 0.25
MRI_PERCENTILES = (0.5, 99.5)
READ_BLOCK = 8  # grid cells per side read with one read_region
# One INFO line per slide (its patches and speed; an MPP not from the slide itself): the
# launchers show them only with --verbose (launch/cli.py); the progress bars and one summary
# line per shard always show.
ITEM_LOG = std_logging.getLogger('feature_store.extract.items')


class FingerprintMismatch(store.StoreError):
  """The store holds features made with other settings or weights, or unreadable unit files."""


@dataclasses.dataclass(frozen=True)
class ExtractConfig:
  device: str = 'cpu'
  batch_size: int = 64
  workers: int = 4
  target_mpp: float = 0.5
  patch_px: int = 256
  encoder_weights: str = 'imagenet'  # the MRI ResNet50, and the slide encoder unless set below
  wsi_encoder: str = 'resnet50_trunc'  # encoders.ENCODERS or timm:<model>
  wsi_encoder_weights: str | None = None  # 'hub' | 'random' | PATH; None: encoder_weights
  encoder_kwargs: Any = None  # dict for timm:<model> encoders (e.g. {'depth': 2})
  precision: str = 'auto'  # auto: the encoder's own on CUDA, fp32 on CPU
  radiomics_params: Any = None  # YAML path or dict; None = params/mr_default.yaml
  mri_slices: int = 5
  shard_index: int = 0
  shard_count: int = 1
  fallback_mpp: float | None = None  # um/px of slides with no other MPP (slides.slide_mpp)
  mpp_from_objective: bool = False  # MPP-less slides: 10 / objective power, before the fallback
  tissue: slides.TissueParams = slides.TissueParams()
  overwrite: bool = False
  outcomes_required: bool = True  # False: a manifest of new patients to score (no labels)
  prune: bool = False  # remove the files of patients no longer in the manifest
  # Stain normalisation of slide patches (feature_store/stain.py, docs/stain.md): the target
  # is stain_target (a fingerprint's 'stain' dict: launch.predict), else fitted on the image
  # stain_reference, else fitted on stain_fit_patches patches of the centers stain_fit_centers
  # (default: every center but the second by name, the one training holds out as external).
  stain_norm: str = 'none'  # none | macenko | reinhard | histogram
  stain_reference: str | None = None
  stain_target: Any = None
  stain_fit_centers: tuple[str, ...] = ()
  stain_fit_patches: int = 256
  # Whose stain is mapped (stain.Normaliser): each patch's own; one per slide, pooled over up
  # to stain_slide_patches of its patches; one per center, pooled as the target is.
  stain_scope: str = 'patch'
  stain_slide_patches: int = 64
  # Stain augmentation (docs/stain.md): stain_augment extra embeddings per patch from
  # HED-jittered copies (stain.AugmentParams: scale, shift), columns embedding_view1..K.
  stain_augment: int = 0
  stain_augment_scale: float = 0.05
  stain_augment_shift: float = 0.05


@dataclasses.dataclass
class Summary:
  patients: int = 0  # valid manifest rows (patients in clinical.parquet)
  rejected: int = 0  # manifest rows refused (each logged with its line and column)
  slides_done: int = 0
  slides_skipped: int = 0
  patches: int = 0
  mri_done: int = 0
  mri_skipped: int = 0
  failures: list[dict[str, str]] = dataclasses.field(default_factory=list)
  finalised: bool = False
  orphans: list[str] = dataclasses.field(default_factory=list)  # patients not in the manifest
  pruned: bool = False  # their files were removed (--prune)

  @property
  def failed(self) -> int:
    return len(self.failures)

  def counts(self, verb: str = 'extracted') -> str:
    """`extracted N slides (P patches), skipped S; MRI M patients, skipped K; F failed`."""
    return (
      f'{verb} {self.slides_done} slides ({self.patches} patches), skipped '
      f'{self.slides_skipped}; MRI {self.mri_done} patients, skipped {self.mri_skipped}; '
      f'{self.failed} failed'
    )

  def line(self, store_dir: str | Path, verb: str = 'extracted') -> str:
    """`N patients extracted, K rejected, F failed: see STORE/failures.parquet`."""
    line = f'{self.patients} patients {verb}, {self.rejected} rejected, {self.failed} failed'
    if self.orphans:
      line += f'; {len(self.orphans)} in the store but no longer in the manifest: ' + (
        'pruned' if self.pruned else 'kept, --prune removes them'
      )
    if not self.finalised:
      return line + ' in this shard; store not assembled yet (other shards are still running)'
    if self.rejected or self.failed:
      line += f': see {Path(store_dir) / store.FAILURES}'
    return line


def fingerprint_sha(fp: dict) -> str:
  return hashlib.sha256(json.dumps(fp, sort_keys=True).encode()).hexdigest()


def _failure(item: str, stage: str, reason: str) -> dict[str, str]:
  logging.warning('FAILED %s [%s]: %s', item, stage, reason)
  return {'item': item, 'stage': stage, 'reason': reason}


# --------------------------------------------------------------------------- part files


def _write_part(table: pa.Table, path: Path, meta: dict) -> None:
  table = table.replace_schema_metadata({_PART_KEY: json.dumps(meta, sort_keys=True).encode()})
  store.atomic_write_table(table, path)


def _part_meta(path: Path) -> dict | None:
  """A unit file's metadata, or None when absent; store-written (wsi) or part-written (mri)."""
  if not path.exists():
    return None
  try:
    md = pq.read_schema(path).metadata or {}
  except (OSError, pa.ArrowInvalid) as e:
    raise store.StoreError(f'{path}: unreadable Parquet file, corrupt or truncated ({e})') from e
  if _PART_KEY in md:
    return json.loads(md[_PART_KEY])
  return store.table_metadata(path)


def _log_mpp_choice(slide, slide_id: str, mpp: float, source: str) -> None:
  """One log line for a slide whose MPP is not its own: where it came from and, for the
  manifest's, whether it disagrees with the slide's."""
  own = None
  if source == 'manifest':
    try:
      own, _ = slides.slide_mpp(slide)
    except slides.SlideError:
      pass
  if own is not None and abs(own - mpp) > 0.05 * own:
    logging.warning(
      '%s: the manifest gives %.4g um/px, the slide records %.4g: using the manifest',
      slide_id,
      mpp,
      own,
    )
  else:
    ITEM_LOG.info('%s: %.4g um/px from the %s', slide_id, mpp, source)


def _slide_is_current(
  path: Path, slide: manifest_lib.Slide, cfg: ExtractConfig, wsi_sha: str
) -> bool:
  """Whether wsi/<slide_id>.parquet holds this slide's features as this run would make them:
  the store's fingerprint, and the same MPP from the same source (the slide is opened only
  when its MPP did not come from the slide itself or the manifest now gives one)."""
  meta = _part_meta(path)
  if not meta or meta.get('fingerprint_sha256') != wsi_sha:
    return False
  was = (meta.get('mpp'), meta.get('mpp_source'))
  if slide.mpp is None and was[1] == 'slide':
    return True
  if slide.mpp is not None and was[1] == 'manifest':
    return bool(np.isclose(slide.mpp, was[0] or 0.0))
  try:
    handle = slides.open_slide(slide.path)
  except slides.SlideError as e:
    logging.warning('%s: keeping its features; the slide no longer opens: %s', slide.slide_id, e)
    return True
  try:
    now = slides.slide_mpp(
      handle, cfg.fallback_mpp, manifest_mpp=slide.mpp, from_objective=cfg.mpp_from_objective
    )
  except slides.SlideError:
    logging.warning(
      '%s: keeping its features made at %s um/px (%s): this run gives the slide no MPP',
      slide.slide_id,
      was[0],
      was[1],
    )
    return True
  finally:
    handle.close()
  if now[1] == was[1] and bool(np.isclose(now[0], was[0] or 0.0)):
    return True
  ITEM_LOG.info(
    '%s: MPP now %.4g (%s), its features were made at %s (%s): extracting it again',
    slide.slide_id,
    now[0],
    now[1],
    was[0],
    was[1],
  )
  return False


def _mri_paths(store_dir: Path, patient_id: str) -> tuple[Path, Path]:
  pid = store.validate_id(patient_id, what='patient_id')
  d = Path(store_dir) / MRI_DIR
  return d / f'{pid}.radiomics.parquet', d / f'{pid}.deep.parquet'


# --------------------------------------------------------------------------- units


def plan_patches(slide, cfg: ExtractConfig, mpp: float | None) -> slides.PatchPlan:
  """The slide's patch grid with the extraction settings (mpp: the manifest's um/px)."""
  return slides.plan_patches(
    slide,
    target_mpp=cfg.target_mpp,
    patch_px=cfg.patch_px,
    tissue=cfg.tissue,
    fallback_mpp=cfg.fallback_mpp,
    manifest_mpp=mpp,
    mpp_from_objective=cfg.mpp_from_objective,
  )


def extract_slide(
  slide_path: Path,
  slide_id: str,
  patient_id: str,
  store_dir: Path,
  encoder: encoders.Encoder,
  cfg: ExtractConfig,
  fp: dict,
  fp_sha: str,
  mpp: float | None = None,
  normaliser: stain.Normaliser | None = None,
  augmenter: stain.Augmenter | None = None,
  center_stain: stain.StainTarget | None = None,
) -> int:
  """Writes wsi/<slide_id>.parquet; returns its patch count. Raises slides.SlideError on failure.

  mpp: the manifest's um/px for this slide, which wins over what the slide records.
  normaliser: stain-normalises each batch on the encoder's device; the patches where the
  stain could not be estimated (kept as they are) are counted in the slide's `stain` record.
  With its scope 'slide' the slide's own stain is estimated first; with 'center' the patches
  are mapped from `center_stain`, the slide's hospital's.
  augmenter: also encodes its HED-jittered views of every (normalised) patch, written as the
  slide file's embedding_view1..K columns."""
  slide = slides.open_slide(slide_path)
  try:
    plan = plan_patches(slide, cfg, mpp)
    if plan.mpp_source != 'slide':
      _log_mpp_choice(slide, slide_id, plan.mpp, plan.mpp_source)
    if len(plan.xy) == 0:
      raise slides.SlideError(
        f'no tissue: no patch has >= {cfg.tissue.min_patch_tissue:.0%} tissue '
        f'(tissue covers {plan.tissue_fraction:.1%} of the slide)'
      )
    source_stain = None
    if normaliser is not None and normaliser.scope == 'slide':
      stats = stain_sample(
        slide, plan, cfg.stain_slide_patches, cfg, normaliser.target.method, normaliser.params
      )
      source_stain = normaliser.start_slide(stats)
    elif normaliser is not None and normaliser.scope == 'center':
      source_stain = normaliser.use_stain(center_stain)
    xys, embs = [], []
    transform = normaliser
    if augmenter is not None:
      augmenter.start(slide_id, len(plan.xy))
      transform = augmenter if normaliser is None else _compose(normaliser, augmenter)
    start = time.perf_counter()
    with tqdm(total=len(plan.xy), desc=slide_id, unit='patch', leave=False) as bar:
      batches = slides.iter_patch_batches(
        slide, plan, batch_size=cfg.batch_size, workers=cfg.workers, block=READ_BLOCK
      )
      if normaliser is not None:
        normaliser.pop_fallbacks()
      for xy, emb in encoder.encode_batches(batches, transform=transform):
        if augmenter is not None:  # (1 + K) B rows: the batch, then view by view
          emb = emb.reshape(-1, len(xy), emb.shape[-1])
        embs.append(emb)
        xys.append(xy)
        bar.update(len(xy))
    emb = np.concatenate(embs, axis=-2)
    views = None
    if augmenter is not None:
      emb, views = emb[0], emb[1:]
    if not np.isfinite(emb.astype(np.float16)).all() or (
      views is not None and not np.isfinite(views.astype(np.float16)).all()
    ):
      raise slides.SlideError('embeddings overflow float16')
    ITEM_LOG.info(
      '%s: %d patches in %.1fs (%.1f patches/s)',
      slide_id,
      len(emb),
      time.perf_counter() - start,
      len(emb) / max(time.perf_counter() - start, 1e-9),
    )
    meta = {
      'slide_id': slide_id,
      'patient_id': patient_id,
      'source': Path(slide_path).name,
      **plan.metadata(),
      'vendor': slide.properties.get(slides.openslide.PROPERTY_NAME_VENDOR),
      'target_mpp': cfg.target_mpp,
      'tissue': cfg.tissue.as_dict(),
      'encoder': encoder.fingerprint,
      'fingerprint_sha256': fp_sha,
    }
    if normaliser is not None:
      fallbacks = normaliser.pop_fallbacks()
      meta['stain'] = {**fp.get('stain', {}), 'fallback_patches': fallbacks}
      if normaliser.scope != 'patch':  # what this slide was mapped from (None: kept as is)
        meta['stain']['source_stain'] = source_stain
      if fallbacks:
        logging.info(
          '%s: %d of %d patches kept their own stain (too little tissue or one colour)',
          slide_id,
          fallbacks,
          len(emb),
        )
    if augmenter is not None:
      meta['stain_augment'] = fp['stain_augment']
    store.write_slide(store_dir, slide_id, patient_id, np.concatenate(xys), emb, meta, views)
    return len(emb)
  finally:
    slide.close()


def _compose(normaliser: stain.Normaliser, augmenter: stain.Augmenter):
  """Normalise, then jitter the normalised patches (the views vary around the target stain)."""

  def transform(images):
    return augmenter(normaliser(images))

  return transform


def augmenter_and_fingerprint(cfg: ExtractConfig) -> tuple[stain.Augmenter | None, dict | None]:
  """The stain augmenter of cfg.stain_augment views and its fingerprint (None, None: off)."""
  if cfg.stain_augment < 0 or cfg.stain_augment != int(cfg.stain_augment):
    raise stain.StainError(f'--stain_augment={cfg.stain_augment}: give 0 (off) or a count of views')
  if not 0 <= cfg.stain_augment_scale < 1 or cfg.stain_augment_shift < 0:
    raise stain.StainError(
      f'--stain_augment_scale={cfg.stain_augment_scale} must be in [0, 1) and '
      f'--stain_augment_shift={cfg.stain_augment_shift} at least 0'
    )
  if not cfg.stain_augment:
    return None, None
  params = stain.AugmentParams(
    int(cfg.stain_augment), float(cfg.stain_augment_scale), float(cfg.stain_augment_shift)
  )
  return stain.Augmenter(params, cfg.device), params.fingerprint()


def extract_mri(
  patient: manifest_lib.Patient,
  store_dir: Path,
  encoder: encoders.Encoder,
  cfg: ExtractConfig,
  fp_sha: str,
) -> list[dict[str, str]]:
  """Writes the patient's MRI part files when anything succeeded; returns failures."""
  pid = patient.patient_id
  failures = []
  radiomics_rows, deep_rows = [], []
  try:
    mask = mri.read_image(patient.mri_mask)
  except ValueError as e:
    return [_failure(f'{pid}/mask', 'mri_read', str(e))]
  params = cfg.radiomics_params if cfg.radiomics_params is not None else mri.DEFAULT_PARAMS
  for seq, path in patient.mri.items():
    item = f'{pid}/{seq}'
    try:
      image = mri.read_image(path)
    except ValueError as e:
      failures.append(_failure(item, 'mri_read', str(e)))
      continue
    try:
      feats = mri.radiomics_features(image, mask, params)
      radiomics_rows.append({'patient_id': pid, 'sequence': seq, **feats})
    except (mri.MaskError, ValueError) as e:
      failures.append(_failure(item, 'radiomics', str(e)))
    try:
      roi = mri.roi_slices(
        image, mask, cfg.mri_slices, margin=MRI_CROP_MARGIN, percentiles=MRI_PERCENTILES
      )
      emb = encoder(roi.images)
      deep_rows += [(seq, int(z), e) for z, e in zip(roi.slice_index, emb)]
    except (mri.MaskError, ValueError) as e:
      failures.append(_failure(item, 'mri_deep', str(e)))
  if not radiomics_rows and not deep_rows:
    return failures
  rad_path, deep_path = _mri_paths(store_dir, pid)
  features = sorted({k for r in radiomics_rows for k in r} - {'patient_id', 'sequence'})
  rad = pa.table(
    {
      'patient_id': pa.array([r['patient_id'] for r in radiomics_rows], pa.string()),
      'sequence': pa.array([r['sequence'] for r in radiomics_rows], pa.string()),
      **{f: pa.array([r.get(f, np.nan) for r in radiomics_rows], pa.float64()) for f in features},
    }
  )
  emb = (
    np.stack([e for _, _, e in deep_rows]) if deep_rows else np.zeros((0, encoder.dim), np.float32)
  )
  deep = pa.table(
    {
      'patient_id': pa.array([pid] * len(deep_rows), pa.string()),
      'sequence': pa.array([s for s, _, _ in deep_rows], pa.string()),
      'slice_index': pa.array(np.asarray([z for _, z, _ in deep_rows], np.int32), pa.int32()),
      'embedding': store.embeddings_array(emb, pa.float32()),
    }
  )
  meta = {'patient_id': pid, 'fingerprint_sha256': fp_sha, 'failures': failures}
  _write_part(rad, rad_path, meta)
  _write_part(deep, deep_path, meta)  # written last: its presence marks the patient complete
  return failures


# --------------------------------------------------------------------------- pipeline


def _check_existing(store_dir: Path, wsi_sha: str, mri_sha: str, overwrite: bool) -> None:
  """Refuses a store made with other fingerprints or holding unreadable (corrupt, truncated)
  unit files; with overwrite, deletes those so that they are extracted again."""
  stale, corrupt = [], []
  info_path = store_dir / store.STORE_JSON
  if info_path.exists():
    info = store.read_store_json(store_dir)
    if (
      info.get('wsi', {}).get('fingerprint_sha256') != wsi_sha
      or info.get('mri', {}).get('fingerprint_sha256') != mri_sha
    ):
      stale.append(info_path)
  units = [(p, wsi_sha) for p in store.slide_files(store_dir)]
  units += [(p, mri_sha) for p in sorted((store_dir / MRI_DIR).glob('*.parquet'))]
  for path, sha in units:
    try:
      if (_part_meta(path) or {}).get('fingerprint_sha256') != sha:
        stale.append(path)
    except store.StoreError as e:
      logging.error('%s', e)
      corrupt.append(path)
  if not stale and not corrupt:
    return
  if not overwrite:
    problems = []
    if stale:
      problems.append(
        f'{len(stale)} file(s) were made with another fingerprint (first: {stale[0]})'
      )
    if corrupt:
      problems.append(
        f'{len(corrupt)} file(s) are unreadable, corrupt or truncated: '
        + ', '.join(map(str, corrupt[:5]))
      )
    raise FingerprintMismatch(
      f'{store_dir}: ' + '; '.join(problems) + '; refusing to mix features; use another store '
      'or overwrite (--overwrite) to extract them again'
    )
  logging.warning(
    'overwrite: removing %d file(s) made with another fingerprint and %d unreadable '
    'file(s); they are extracted again',
    len(stale),
    len(corrupt),
  )
  for path in stale + corrupt:
    path.unlink(missing_ok=True)


def orphan_files(store_dir: Path, keep: set[str]) -> dict[str, list[Path]]:
  """The unit files (slides, MRI parts) of patients not in `keep`, by patient id."""
  out: dict[str, list[Path]] = {}
  for path in store.slide_files(store_dir):
    pid, _ = store.slide_patient_and_rows(path)
    pid = pid or str(store.table_metadata(path).get('patient_id', ''))
    if pid and pid not in keep:
      out.setdefault(pid, []).append(path)
  for suffix in ('.radiomics.parquet', '.deep.parquet'):
    for path in sorted((Path(store_dir) / MRI_DIR).glob(f'*{suffix}')):
      pid = path.name[: -len(suffix)]
      if pid not in keep:
        out.setdefault(pid, []).append(path)
  return out


def _handle_orphans(store_dir: Path, man: manifest_lib.Manifest, prune: bool) -> list[str]:
  """Warns about (or, with prune, removes) the files of patients no longer in the manifest.
  A rejected row still names its patient: its files are kept for when the row is fixed."""
  keep = {p.patient_id for p in man.patients} | {e.patient_id for e in man.errors}
  orphans = orphan_files(store_dir, keep)
  if not orphans:
    return []
  if not prune:
    names = sorted(orphans)
    logging.warning(
      '%s holds the files of %d patient(s) no longer in the manifest (%s): training ignores '
      'them; --prune removes them',
      store_dir,
      len(names),
      ', '.join(names[:5]) + (', ...' if len(names) > 5 else ''),
    )
    return names
  for pid, paths in sorted(orphans.items()):
    # One unlink per file (each atomic); the deep MRI part marks a patient complete, so it
    # goes first. A kill halfway leaves files the next --prune removes.
    for path in sorted(paths, key=lambda p: not p.name.endswith('.deep.parquet')):
      path.unlink(missing_ok=True)
    logging.info('pruned %s: %d file(s), no longer in the manifest', pid, len(paths))
  return sorted(orphans)


def mri_encoder_and_fingerprint(cfg: ExtractConfig) -> tuple[encoders.Encoder, dict]:
  """The MRI encoder and the fingerprint of everything that shapes MRI features."""
  encoder = encoders.Encoder('mri', cfg.encoder_weights, cfg.device, precision=cfg.precision)
  return encoder, {
    'encoder': encoder.fingerprint,
    'slices': cfg.mri_slices,
    'crop_margin': MRI_CROP_MARGIN,
    'percentiles': list(MRI_PERCENTILES),
    'radiomics': mri.radiomics_fingerprint(cfg.radiomics_params),
  }


def run_mri(
  patients: list[manifest_lib.Patient],
  store_dir: Path,
  encoder: encoders.Encoder,
  cfg: ExtractConfig,
  mri_sha: str,
  summary: Summary,
) -> None:
  """Extracts each patient's MRI unless its part files carry this fingerprint."""
  for patient in tqdm(
    patients, desc=f'MRI (shard {cfg.shard_index + 1}/{cfg.shard_count})', unit='patient'
  ):
    rad_path, deep_path = _mri_paths(store_dir, patient.patient_id)
    meta = _part_meta(deep_path)
    if meta and meta.get('fingerprint_sha256') == mri_sha and rad_path.exists():
      summary.mri_skipped += 1
      summary.failures += meta.get('failures', [])
      continue
    summary.failures += extract_mri(patient, store_dir, encoder, cfg, mri_sha)
    summary.mri_done += 1


def extract(
  manifest_path: Path | str, store_dir: Path | str, cfg: ExtractConfig = ExtractConfig()
) -> Summary:
  """Runs this shard's share of the extraction and, if every shard is done, assembles the store."""
  store_dir = Path(store_dir)
  if not 0 <= cfg.shard_index < cfg.shard_count:
    raise ValueError(f'shard_index {cfg.shard_index} not in [0, shard_count={cfg.shard_count})')
  man = manifest_lib.read_manifest(manifest_path, outcomes_required=cfg.outcomes_required)
  for err in man.errors:
    logging.error('%s: %s', manifest_path, err)
  logging.info('manifest: %d valid patients, %d problems', len(man.patients), len(man.errors))
  if not man.patients:
    raise manifest_lib.ManifestError(
      f'{manifest_path}: no valid patient row ({len(man.errors)} problems, each logged above '
      'with its line and column); fix them and rerun: nothing was extracted'
    )

  wsi_encoder = encoders.Encoder(
    'wsi',
    cfg.wsi_encoder_weights or cfg.encoder_weights,
    cfg.device,
    name=cfg.wsi_encoder,
    kwargs=cfg.encoder_kwargs,
    precision=cfg.precision,
  )
  mri_encoder, mri_fp = mri_encoder_and_fingerprint(cfg)
  wsi_fp = {
    'encoder': wsi_encoder.fingerprint,
    'target_mpp': cfg.target_mpp,
    'patch_px': cfg.patch_px,
    'tissue': cfg.tissue.as_dict(),
    # Always None: each slide's MPP is in its own file (mpp, mpp_source), so that a fallback
    # re-extracts only the slides that use it. The key stays so that stores made before
    # keep their fingerprint.
    'fallback_mpp': None,
    'read_block': READ_BLOCK,
  }
  target = stain_target(man, store_dir, cfg)
  normaliser, center_stain = None, None
  if target is not None:  # only then: stores made without it keep their fingerprint
    wsi_fp['stain'] = target.fingerprint()
    if cfg.stain_scope == 'slide':  # only then: patch-scope stores keep their fingerprint
      wsi_fp['stain'] |= {'scope': 'slide', 'slide_patches': cfg.stain_slide_patches}
    elif cfg.stain_scope == 'center':
      wsi_fp['stain'] |= {'scope': 'center', 'center_patches': cfg.stain_fit_patches}
      # Fitted when a slide of that center is first extracted: a rerun that skips every
      # slide reads no patch for it.
      center_stain = functools.cache(functools.partial(fit_center_stain, man, cfg))
    normaliser = stain.Normaliser(target, cfg.device, cfg.stain_scope)
  augmenter, augment_fp = augmenter_and_fingerprint(cfg)
  if augment_fp is not None:  # only then, as for stain: stores made without keep theirs
    wsi_fp['stain_augment'] = augment_fp
  wsi_sha, mri_sha = fingerprint_sha(wsi_fp), fingerprint_sha(mri_fp)
  _check_existing(store_dir, wsi_sha, mri_sha, cfg.overwrite)
  store_dir.mkdir(parents=True, exist_ok=True)

  summary = Summary(patients=len(man.patients), rejected=len({e.line for e in man.errors}))
  summary.orphans = _handle_orphans(store_dir, man, cfg.prune)
  summary.pruned = bool(summary.orphans) and cfg.prune
  all_slides = [(p, s) for p in man.patients for s in p.slides]
  my_slides = all_slides[cfg.shard_index :: cfg.shard_count]
  mri_patients = [p for p in man.patients if p.mri]
  my_patients = mri_patients[cfg.shard_index :: cfg.shard_count]

  bar = tqdm(
    my_slides, desc=f'slides (shard {cfg.shard_index + 1}/{cfg.shard_count})', unit='slide'
  )
  start = time.perf_counter()
  for patient, slide in bar:
    if _slide_is_current(store.wsi_path(store_dir, slide.slide_id), slide, cfg, wsi_sha):
      summary.slides_skipped += 1
      continue
    try:
      summary.patches += extract_slide(
        slide.path,
        slide.slide_id,
        patient.patient_id,
        store_dir,
        wsi_encoder,
        cfg,
        wsi_fp,
        wsi_sha,
        mpp=slide.mpp,
        normaliser=normaliser,
        augmenter=augmenter,
        center_stain=center_stain and center_stain(str(patient.clinical.get('center'))),
      )
      summary.slides_done += 1
    except slides.SlideError as e:
      summary.failures.append(_failure(slide.slide_id, 'wsi', str(e)))
    bar.set_postfix(patches_per_s=f'{summary.patches / max(time.perf_counter() - start, 1e-9):.1f}')
  bar.close()

  run_mri(my_patients, store_dir, mri_encoder, cfg, mri_sha, summary)

  shard_file = store_dir / SHARDS_DIR / f'{cfg.shard_index}-of-{cfg.shard_count}.json'
  store.atomic_write_bytes(
    shard_file,
    json.dumps(
      {'wsi_sha256': wsi_sha, 'mri_sha256': mri_sha, 'failures': summary.failures}, indent=1
    ).encode(),
  )
  summary.finalised = _finalise(
    store_dir, man, cfg, wsi_fp, mri_fp, wsi_encoder.pretrained, provenance='extracted'
  )
  logging.info(
    'shard %d/%d: %d slides extracted (%d patches), %d skipped; %d MRI patients extracted, '
    '%d skipped; %d failures%s',
    cfg.shard_index + 1,
    cfg.shard_count,
    summary.slides_done,
    summary.patches,
    summary.slides_skipped,
    summary.mri_done,
    summary.mri_skipped,
    summary.failed,
    '; store assembled' if summary.finalised else '; waiting for other shards',
  )
  return summary


def fit_centers(man: manifest_lib.Manifest, cfg: ExtractConfig) -> list[str]:
  """The centers a fitted stain target is drawn from: cfg.stain_fit_centers, else every
  center but the second by name (the external test center training picks by default)."""
  names = sorted({str(p.clinical.get('center')) for p in man.patients})
  if cfg.stain_fit_centers:
    unknown = sorted(set(cfg.stain_fit_centers) - set(names))
    if unknown:
      raise stain.StainError(
        f'--stain_fit_centers: {", ".join(unknown)} not a center of the manifest (centers: '
        f'{", ".join(names)})'
      )
    return sorted(cfg.stain_fit_centers)
  return [c for i, c in enumerate(names) if i != 1 or len(names) == 1]


def stain_target(
  man: manifest_lib.Manifest, store_dir: Path, cfg: ExtractConfig
) -> stain.StainTarget | None:
  """The stain target of this run (None without normalisation): given (a bundle's), from a
  reference image, reused from STORE.json when fitted the same way, else fitted here."""
  method = cfg.stain_norm
  if method not in stain.METHODS:
    raise stain.StainError(f'--stain_norm={method}: choose {", ".join(stain.METHODS)}')
  if cfg.stain_scope not in stain.SCOPES or cfg.stain_slide_patches < 1:
    raise stain.StainError(
      f'--stain_scope={cfg.stain_scope} --stain_slide_patches={cfg.stain_slide_patches}: '
      f'choose a scope of {", ".join(stain.SCOPES)} and at least 1 patch'
    )
  if method == 'none':
    if cfg.stain_reference:
      raise stain.StainError('--stain_reference needs --stain_norm=macenko, reinhard or histogram')
    return None
  if cfg.stain_target:
    target = stain.StainTarget.from_fingerprint(cfg.stain_target)
    if target.method != method:
      raise stain.StainError(f'stain target is {target.method}, --stain_norm={method}')
    return target
  if cfg.stain_reference:
    path = Path(cfg.stain_reference)
    if not path.is_file():
      raise stain.StainError(f'--stain_reference={path}: no such file')
    target = stain.reference_target(str(path), method, sha256=encoders.sha256_file(path))
    logging.info('stain target (%s): %s', method, target.source)
    return target
  centers = fit_centers(man, cfg)
  prefix = f'fitted on center(s) {",".join(centers)}:'
  if (store_dir / store.STORE_JSON).exists():
    old = store.read_store_json(store_dir).get('wsi', {}).get('fingerprint', {}).get('stain')
    if (
      old
      and old.get('method') == method
      and str(old.get('source', '')).startswith(prefix)
      and old.get('params') == stain.StainParams().as_dict()
    ):
      logging.info('stain target (%s): reused from %s: %s', method, store.STORE_JSON, old['source'])
      return stain.StainTarget.from_fingerprint(old)
  target = fit_stain_target(man, cfg, centers, prefix)
  logging.info('stain target (%s): %s', method, target.source)
  return target


FIT_SLIDES = 16  # slides a fitted target samples at most


def fit_center_stain(
  man: manifest_lib.Manifest, cfg: ExtractConfig, center: str
) -> stain.StainTarget | None:
  """Scope 'center': the center's own stain, pooled as a target is (stain_fit_patches
  patches over up to FIT_SLIDES of its slides); None when it cannot be estimated (its slides
  keep their own stain, counted)."""
  try:
    own = fit_stain_target(man, cfg, [center], f'center {center}:')
  except stain.StainError as e:
    logging.warning('center %s keeps its own stain: %s', center, e)
    return None
  logging.info('stain of center %s (%s): %s', center, cfg.stain_norm, own.source)
  return own


def stain_sample(
  handle,
  plan: slides.PatchPlan,
  n: int,
  cfg: ExtractConfig,
  method: str,
  params: stain.StainParams = stain.StainParams(),
) -> list[dict]:
  """`stain.estimate` of up to n of the plan's patches, evenly spaced in its order, read
  exactly as extraction reads them."""
  idx = np.unique(np.linspace(0, len(plan.xy) - 1, min(n, len(plan.xy))).round()).astype(int)
  sub = dataclasses.replace(plan, cells=plan.cells[idx], xy=plan.xy[idx])
  return [
    stain.estimate(torch.from_numpy(batch).to(cfg.device), method, params)
    for _, batch in slides.iter_patch_batches(handle, sub, batch_size=cfg.batch_size, workers=0)
  ]


def fit_stain_target(
  man: manifest_lib.Manifest, cfg: ExtractConfig, centers: list[str], prefix: str
) -> stain.StainTarget:
  """A pooled target from up to cfg.stain_fit_patches tissue patches, evenly spread over up
  to FIT_SLIDES slides of `centers` (evenly spaced in slide-id order): deterministic, so
  every shard and every rerun fits the same target."""
  chosen = sorted(
    (s.slide_id, s)
    for p in man.patients
    if str(p.clinical.get('center')) in centers
    for s in p.slides
  )
  if len(chosen) > FIT_SLIDES:
    chosen = [chosen[i] for i in np.linspace(0, len(chosen) - 1, FIT_SLIDES).round().astype(int)]
  per_slide = max(1, -(-cfg.stain_fit_patches // max(1, len(chosen))))
  stats, patches, used = [], 0, 0
  for slide_id, s in chosen:
    try:
      handle = slides.open_slide(s.path)
    except slides.SlideError as e:
      logging.warning('stain fit: skipping %s: %s', slide_id, e)
      continue
    try:
      plan = plan_patches(handle, cfg, s.mpp)
      if not len(plan.xy):
        continue
      stats += stain_sample(handle, plan, per_slide, cfg, cfg.stain_norm)
      patches += min(per_slide, len(plan.xy))
      used += 1
    except slides.SlideError as e:
      logging.warning('stain fit: skipping %s: %s', slide_id, e)
    finally:
      handle.close()
  try:
    return stain.pooled_target(
      stats, cfg.stain_norm, f'{prefix} {patches} patches from {used} slides'
    )
  except stain.StainError:
    raise stain.StainError(
      f'cannot fit a stain target: no tissue patch with an estimable stain among {patches} '
      f'patches of {used} slides of center(s) {", ".join(centers)}; pass '
      '--stain_reference=IMAGE (an H&E tile in the stain to map to)'
    ) from None


def _finalise(
  store_dir: Path,
  man: manifest_lib.Manifest,
  cfg: ExtractConfig,
  wsi_fp: dict,
  mri_fp: dict,
  pretrained: bool,
  *,
  provenance: str,
) -> bool:
  """Assembles the store-level files once every shard has reported; returns whether it did."""
  wsi_sha, mri_sha = fingerprint_sha(wsi_fp), fingerprint_sha(mri_fp)
  shard_failures: list[dict[str, str]] = []
  for i in range(cfg.shard_count):
    path = store_dir / SHARDS_DIR / f'{i}-of-{cfg.shard_count}.json'
    if not path.exists():
      return False
    report = json.loads(path.read_text())
    if report.get('wsi_sha256') != wsi_sha or report.get('mri_sha256') != mri_sha:
      return False
    shard_failures += report['failures']

  failures = [
    {'item': f'{Path(man.path).name}:{e.line}', 'stage': 'manifest', 'reason': str(e)}
    for e in man.errors
  ]
  has_wsi, has_mri = {}, {}
  rad_tables, deep_tables = [], []
  slides_ok = patches = 0
  done_items = set()
  mpp_sources: dict[str, int] = {}
  not_from_slide: dict[str, dict] = {}  # slide_id -> its mpp and mpp_source
  for p in man.patients:
    has_wsi[p.patient_id] = False
    for s in p.slides:
      path = store.wsi_path(store_dir, s.slide_id)
      if path.exists():
        has_wsi[p.patient_id] = True
        slides_ok += 1
        patches += pq.read_metadata(path).num_rows
        done_items.add(s.slide_id)
        meta = store.table_metadata(path)
        source = str(meta.get('mpp_source'))
        mpp_sources[source] = mpp_sources.get(source, 0) + 1
        if source != 'slide':
          not_from_slide[s.slide_id] = {'mpp': meta.get('mpp'), 'mpp_source': source}
    rad_path, deep_path = _mri_paths(store_dir, p.patient_id)
    has_mri[p.patient_id] = bool(p.mri) and deep_path.exists() and rad_path.exists()
    if has_mri[p.patient_id]:
      rad_tables.append(pq.read_table(rad_path))
      deep_tables.append(pq.read_table(deep_path))
  failures += [f for f in shard_failures if f['item'] not in done_items]

  store.write_clinical(
    store_dir, manifest_lib.clinical_table(man.patients, has_wsi=has_wsi, has_mri=has_mri)
  )
  rad_rows = [r for t in rad_tables for r in t.to_pylist()]
  store.write_radiomics(
    store_dir,
    rad_rows,
    {
      'pyradiomics': mri_fp['radiomics']['pyradiomics'],
      'params': mri_fp['radiomics']['params'],
      'fingerprint_sha256': mri_sha,
    },
  )
  deep = (
    pa.concat_tables([t.replace_schema_metadata(None) for t in deep_tables])
    if deep_tables
    else None
  )
  store.write_mri_deep(
    store_dir,
    deep.column('patient_id').to_pylist() if deep else [],
    deep.column('sequence').to_pylist() if deep else [],
    deep.column('slice_index').to_pylist() if deep else [],
    store.embeddings_from_column(deep.column('embedding'))
    if deep
    else np.zeros((0, store.MRI_DEEP_DIM)),
    {'encoder': mri_fp['encoder'], 'slices': cfg.mri_slices, 'fingerprint_sha256': mri_sha},
  )
  store.write_failures(store_dir, failures)
  mpp_info = {}
  if provenance == 'extracted':  # level-0 MPP of the slides, also in each file (mpp, mpp_source)
    mpp_info['mpp'] = {
      'fallback_mpp': cfg.fallback_mpp,
      'mpp_from_objective': cfg.mpp_from_objective,
      'slides_by_source': dict(sorted(mpp_sources.items())),
      'not_from_slide': not_from_slide,
    }
  warnings = (
    []
    if pretrained
    else ['encoder weights are random: features are NOT pretrained (use only to test the pipeline)']
  )
  store.write_store_json(
    store_dir,
    {
      'encoder': wsi_fp['encoder'],  # the slide encoder: its width sizes the model's input
      'provenance': provenance,
      'wsi': {'fingerprint': wsi_fp, 'fingerprint_sha256': wsi_sha, **mpp_info},
      'mri': {'fingerprint': mri_fp, 'fingerprint_sha256': mri_sha},
      'counts': {
        'patients': len(man.patients),
        'manifest_rows_rejected': len({e.line for e in man.errors}),
        'slides': sum(len(p.slides) for p in man.patients),
        'slides_extracted': slides_ok,
        'patches': patches,
        'patients_with_wsi': sum(has_wsi.values()),
        'patients_with_mri': sum(has_mri.values()),
        'radiomics_rows': len(rad_rows),
        'mri_deep_rows': deep.num_rows if deep else 0,
        'failures': len(failures),
      },
      'failures': len(failures),
      'pretrained': pretrained,
      'warnings': warnings,
      'shards': cfg.shard_count,
    },
  )
  return True
