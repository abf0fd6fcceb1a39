"""End-to-end extraction over a tiny synthetic cohort: store files, reruns, fingerprints, shards."""

import csv
import json
import shutil

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from feature_store import extract, slides, store
from feature_store.synthetic_cohort import make_cohort

# 512 px slides at 0.5 um/px, 32 px patches at 4 um/px: a 2x2 grid per slide (ResNet50 on a CPU
# shared by others runs at a few patches/s, so the cohort stays tiny).
CFG = extract.ExtractConfig(
  encoder_weights='random',
  target_mpp=4.0,
  patch_px=32,
  batch_size=8,
  workers=2,
  mri_slices=1,
  tissue=slides.TissueParams(min_tissue_area=0.1, min_patch_tissue=0.25),
)


@pytest.fixture(scope='module')
def cohort(tmp_path_factory, shared_data):
  out = tmp_path_factory.mktemp('mini_cohort')
  manifest = make_cohort(
    out, patients=4, seed=5, slide_px=512, mri_px=32, mri_slices=6, progress=False
  )
  # One more patient whose slide OpenSlide refuses, and one bad row.
  shutil.copy(shared_data / 'unopenable.tiff', out / 'slides' / 'broken.tiff')
  with open(manifest, newline='') as f:
    rows = list(csv.DictReader(f))
  good = dict(
    rows[0],
    patient_id='PX-broken',
    slides='slides/broken.tiff',
    mri_t1='',
    mri_t2='',
    mri_t1c='',
    mri_mask='',
  )
  bad = dict(
    rows[0],
    patient_id='PX-bad',
    os_months='-1',
    slides='',
    mri_t1='',
    mri_t2='',
    mri_t1c='',
    mri_mask='',
  )
  no_mri = dict(mri_t1='', mri_t2='', mri_t1c='', mri_mask='')
  with_mri = [i for i, r in enumerate(rows) if r['mri_mask']]
  rows = [r if i in with_mri[:2] else dict(r, **no_mri) for i, r in enumerate(rows)]  # MRI for two
  with open(manifest, 'w', newline='') as f:
    w = csv.DictWriter(f, list(rows[0]))
    w.writeheader()
    w.writerows(rows + [good, bad])
  return manifest


@pytest.fixture(scope='module')
def built(cohort, tmp_path_factory):
  store_dir = tmp_path_factory.mktemp('store')
  summary = extract.extract(cohort, store_dir, CFG)
  return store_dir, summary


def _slides_in(manifest):
  with open(manifest, newline='') as f:
    return {r['patient_id']: [s for s in r['slides'].split(';') if s] for r in csv.DictReader(f)}


def test_store_files_and_contents(cohort, built):
  store_dir, summary = built
  info = store.read_store_json(store_dir)
  assert summary.finalised
  slides_by_patient = _slides_in(cohort)
  n_rows = len(slides_by_patient)
  assert info['counts']['patients'] == n_rows - 1 and info['counts']['manifest_rows_rejected'] == 1
  assert info['pretrained'] is False and 'NOT pretrained' in info['warnings'][0]
  assert info['wsi']['fingerprint']['encoder']['name'] == 'resnet50-layer3-avgpool'
  assert info['mri']['fingerprint']['radiomics']['params']['imageType'].keys() >= {
    'Original',
    'LoG',
    'Wavelet',
  }

  failures = pq.read_table(store_dir / store.FAILURES).to_pylist()
  reasons = {(f['item'], f['stage']) for f in failures}
  assert ('broken', 'wsi') in reasons
  manifest_failures = [f for f in failures if f['stage'] == 'manifest']
  assert len(manifest_failures) == 1 and 'os_months' in manifest_failures[0]['reason']
  assert manifest_failures[0]['item'].endswith(f':{n_rows + 1}')
  assert info['failures'] == len(failures) == summary.failed + 1  # + the manifest row

  clinical = pq.read_table(store_dir / store.CLINICAL)
  assert clinical.schema.field('os_event').type == pa.int8()
  assert clinical.schema.field('ic_response').type == pa.int8()
  assert 'PX-bad' not in clinical.column('patient_id').to_pylist()
  flags = {r['patient_id']: (r['has_wsi'], r['has_mri']) for r in clinical.to_pylist()}
  assert flags['PX-broken'] == (False, False)

  # Every slide: a file with its patches, or a recorded failure.
  failed_items = {f['item'] for f in failures}
  n_patches = 0
  for pid, rel_paths in slides_by_patient.items():
    if pid == 'PX-bad':
      continue
    for rel in rel_paths:
      slide_id = rel.split('/')[-1].rsplit('.', 1)[0]
      path = store.wsi_path(store_dir, slide_id)
      assert path.exists() != (slide_id in failed_items), slide_id
      if path.exists():
        bag = store.read_slide(path, expected_dim=store.WSI_DIM)
        assert bag.patient_id == pid and bag.embeddings.dtype == np.float16
        assert 1 <= len(bag.xy) <= 4 and set(np.unique(bag.xy)) <= {0, 256}
        assert bag.metadata['mpp'] == pytest.approx(0.5, rel=1e-3)
        assert bag.metadata['read_level'] >= 1 and bag.metadata['encoder']['dim'] == 1024
        assert bag.metadata['tissue']['min_patch_tissue'] == 0.25
        n_patches += len(bag.xy)
        assert flags[pid][0]
  assert n_patches == info['counts']['patches'] > 0

  rad = pq.read_table(store_dir / store.RADIOMICS)
  mri_patients = [pid for pid, (_, has_mri) in flags.items() if has_mri]
  assert len(mri_patients) == 2 and rad.num_rows == 3 * len(mri_patients)
  assert set(rad.column('sequence').to_pylist()) == {'t1', 't2', 't1c'}
  assert (
    rad.num_columns > 1000 and rad.schema.field('original_firstorder_Mean').type == pa.float64()
  )
  assert (
    store.table_metadata(store_dir / store.RADIOMICS)['pyradiomics'].lstrip('v').startswith('3.')
  )
  deep = pq.read_table(store_dir / store.MRI_DEEP)
  assert deep.num_rows == 3 * len(mri_patients)
  emb = store.embeddings_from_column(deep.column('embedding'))
  assert emb.shape == (deep.num_rows, store.MRI_DEEP_DIM) and emb.dtype == np.float32
  # pandas reads the files as they are.
  assert len(pq.read_table(store_dir / store.CLINICAL).to_pandas()) == n_rows - 1


def test_rerun_skips_complete_items(cohort, built):
  store_dir, first = built
  mtimes = {p: p.stat().st_mtime_ns for p in store.slide_files(store_dir)}
  again = extract.extract(cohort, store_dir, CFG)
  assert again.slides_done == 0 and again.slides_skipped == first.slides_done
  assert again.mri_done == 0 and again.mri_skipped == first.mri_done
  assert {p: p.stat().st_mtime_ns for p in store.slide_files(store_dir)} == mtimes
  assert again.failed == first.failed  # the broken slide is retried and fails again


def test_other_fingerprint_is_refused(cohort, built):
  store_dir, _ = built
  before = json.loads((store_dir / store.STORE_JSON).read_text())
  import dataclasses

  with pytest.raises(extract.FingerprintMismatch, match='another fingerprint'):
    extract.extract(cohort, store_dir, dataclasses.replace(CFG, patch_px=48))
  with pytest.raises(extract.FingerprintMismatch):
    extract.extract(
      cohort,
      store_dir,
      dataclasses.replace(
        CFG, radiomics_params={'imageType': {'Original': {}}, 'featureClass': {'firstorder': None}}
      ),
    )
  assert json.loads((store_dir / store.STORE_JSON).read_text()) == before


def test_two_shards_equal_one_process(cohort, built, tmp_path):
  import dataclasses

  store_dir, _ = built
  shards = tmp_path / 'sharded'
  s0 = extract.extract(cohort, shards, dataclasses.replace(CFG, shard_index=0, shard_count=2))
  assert not s0.finalised and not (shards / store.STORE_JSON).exists()
  s1 = extract.extract(cohort, shards, dataclasses.replace(CFG, shard_index=1, shard_count=2))
  assert s1.finalised
  assert s0.slides_done > 0 and s1.slides_done > 0
  one = {p.name: store.read_slide(p) for p in store.slide_files(store_dir)}
  two = {p.name: store.read_slide(p) for p in store.slide_files(shards)}
  assert one.keys() == two.keys()
  for name in one:
    np.testing.assert_array_equal(one[name].xy, two[name].xy)
    assert one[name].embeddings.tobytes() == two[name].embeddings.tobytes()
  for table in (store.CLINICAL, store.RADIOMICS, store.MRI_DEEP):
    assert pq.read_table(store_dir / table).equals(pq.read_table(shards / table)), table
  assert store.read_store_json(store_dir)['counts'] == store.read_store_json(shards)['counts']


def _launch_args(manifest, store_dir, *extra):
  import sys

  return [
    sys.executable,
    '-m',
    'launch.extract',
    f'--manifest={manifest}',
    f'--store={store_dir}',
    '--device=cpu',
    '--encoder_weights=random',
    '--target_mpp=4',
    '--patch_px=32',
    '--batch_size=8',
    '--workers=2',
    '--mri_slices=1',
    '--tissue_min_area=0.1',
    '--tissue_fraction=0.25',
    *extra,
  ]


@pytest.mark.slow  # day-to-day subset stays under 3 minutes
def test_launcher_exit_status_and_summary(cohort, built):
  import subprocess
  from pathlib import Path

  store_dir, first = built
  root = Path(__file__).resolve().parents[1]
  # Explicit encoding: an earlier library may have switched the process locale to ASCII.
  done = subprocess.run(
    _launch_args(cohort, store_dir),
    cwd=root,
    capture_output=True,
    encoding='utf-8',
    errors='replace',
  )
  assert done.returncode == 1, done.stderr[-2000:]  # the broken slide failed
  assert f'skipped {first.slides_done}' in done.stdout and f'{first.failed} failed' in done.stdout
  assert done.stdout.strip().splitlines()[-1] == (
    f'{first.patients} patients extracted, {first.rejected} rejected, {first.failed} failed: '
    f'see {store_dir / "failures.parquet"}'
  )
  assert (first.patients, first.rejected) == (5, 1)  # PX-bad refused, PX-broken kept
  kept = subprocess.run(
    _launch_args(cohort, store_dir, '--keep_going'),
    cwd=root,
    capture_output=True,
    encoding='utf-8',
    errors='replace',
  )
  assert kept.returncode == 0, kept.stderr[-2000:]  # partial success, as asked
  refused = subprocess.run(
    _launch_args(cohort, store_dir, '--patch_px=48'),
    cwd=root,
    capture_output=True,
    encoding='utf-8',
    errors='replace',
  )
  assert refused.returncode == 2 and 'another fingerprint' in refused.stderr
  assert refused.stderr.rstrip().splitlines()[-1].startswith('launch.extract: error: ')
  assert 'Traceback' not in refused.stderr


def test_sigkill_then_rerun_equals_uninterrupted(cohort, built, tmp_path):
  """Kill -9 as soon as the first slide file lands; the rerun completes to the same store."""
  import signal
  import subprocess
  import time
  from pathlib import Path

  store_dir, _ = built
  killed = tmp_path / 'killed'
  proc = subprocess.Popen(
    _launch_args(cohort, killed),
    cwd=Path(__file__).resolve().parents[1],
    stdout=subprocess.DEVNULL,
    stderr=subprocess.DEVNULL,
  )
  deadline = time.monotonic() + 300
  while not store.slide_files(killed) and proc.poll() is None and time.monotonic() < deadline:
    time.sleep(0.05)
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  assert proc.returncode == -signal.SIGKILL, 'extraction finished before it could be killed'
  assert not (killed / store.STORE_JSON).exists()
  extract.extract(cohort, killed, CFG)
  one = {p.name: store.read_slide(p) for p in store.slide_files(store_dir)}
  two = {p.name: store.read_slide(p) for p in store.slide_files(killed)}
  assert one.keys() == two.keys()
  for name in one:
    np.testing.assert_array_equal(one[name].xy, two[name].xy)
    # The killed slide came from another process, whose torch thread pool may
    # split ResNet50's convolutions differently: CI once saw one float16 ulp
    # move in one value. Any corruption from the kill is far larger than that.
    np.testing.assert_array_max_ulp(one[name].embeddings, two[name].embeddings, maxulp=1)
  for table in (store.CLINICAL, store.RADIOMICS, store.MRI_DEEP, store.FAILURES):
    assert pq.read_table(store_dir / table).equals(pq.read_table(killed / table)), table


def test_blank_slide_is_a_recorded_no_tissue_failure(tmp_path):
  from feature_store import encoders
  from feature_store.synthetic_cohort import write_pyramidal_tiff

  path = tmp_path / 'blank.tiff'
  write_pyramidal_tiff(path, np.full((512, 512, 3), 243, np.uint8), mpp=0.5, tile=128)
  encoder = encoders.Encoder('wsi', 'random')
  with pytest.raises(slides.SlideError, match='no tissue'):
    extract.extract_slide(path, 'blank', 'P1', tmp_path / 'store', encoder, CFG, {}, 'sha')
  assert not store.wsi_path(tmp_path / 'store', 'blank').exists()
