"""Slide resolution (MPP): where it comes from, what a slide without one does, and the
per-slide fingerprint (a fallback re-extracts the slides that use it, no other).

The slides are the real H&E region (../shared/data/cmu-1-small-region.svs, Aperio, 0.499 um/px,
20x) and byte-for-byte copies of it whose description no longer holds `MPP =` (and, for some,
says `AppMag = 40` or no magnification at all): the same tiles, an MPP-less scan.
"""

import csv
import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import pytest

from feature_store import extract, manifest, slides, store

ROOT = Path(__file__).resolve().parents[1]
# 16 um/px patches of 32 px: 9 patches at the region's 0.5 um/px, 38 at 1 um/px, 1 at 0.25.
CFG = extract.ExtractConfig(
  encoder_weights='random',
  target_mpp=8.0,
  patch_px=32,
  batch_size=16,
  workers=2,
  tissue=slides.TissueParams(min_tissue_area=0.1, min_patch_tissue=0.25),
)
FAST_FLAGS = (
  '--device=cpu',
  '--encoder_weights=random',
  '--target_mpp=8',
  '--patch_px=32',
  '--batch_size=16',
  '--workers=2',
  '--tissue_min_area=0.1',
  '--tissue_fraction=0.25',
)


def _svs(shared_data: Path, path: Path, *, mpp: bool = False, power: str | None = '20') -> Path:
  """The real region, with its MPP removed unless `mpp`, and its objective power set to
  `power` (two characters) or removed (None)."""
  data = (shared_data / 'cmu-1-small-region.svs').read_bytes()
  if not mpp:
    data = data.replace(b'|MPP = 0.4990|', b'|XPP = 0.4990|')  # same length: offsets hold
  if power is None:
    data = data.replace(b'AppMag = 20', b'AppXag = 20')
  else:
    data = data.replace(b'AppMag = 20', b'AppMag = ' + power.encode())
  path.write_bytes(data)
  return path


def _row(pid, **kw):
  row = dict.fromkeys(manifest.MANIFEST_COLUMNS, '')
  row.update(
    patient_id=pid,
    center='Guangzhou',
    age='51',
    sex='M',
    ebv_dna='1200',
    t_stage='3',
    n_stage='1',
    overall_stage='III',
    ic_response='1',
    os_months='40',
    os_event='0',
  )
  row.update(kw)
  return row


def _manifest(path: Path, rows) -> Path:
  with open(path, 'w', newline='') as f:
    w = csv.DictWriter(f, list(manifest.MANIFEST_COLUMNS) + ['mpp'])
    w.writeheader()
    w.writerows([{'mpp': '', **r} for r in rows])
  return path


def _meta(store_dir: Path, slide_id: str) -> dict:
  return store.table_metadata(store.wsi_path(store_dir, slide_id))


def _mtime(store_dir: Path, slide_id: str) -> int:
  return store.wsi_path(store_dir, slide_id).stat().st_mtime_ns


# --------------------------------------------------------------------------- where the MPP comes from


def test_mpp_comes_from_the_manifest_the_slide_its_objective_or_the_fallback(shared_data, tmp_path):
  real = slides.open_slide(shared_data / 'cmu-1-small-region.svs')
  assert slides.slide_mpp(real) == (pytest.approx(0.499), 'slide')
  assert slides.slide_mpp(real, 0.3, from_objective=True) == (pytest.approx(0.499), 'slide')
  assert slides.slide_mpp(real, manifest_mpp=0.25) == (0.25, 'manifest')  # the manifest wins

  at20 = slides.open_slide(_svs(shared_data, tmp_path / 'at20.svs'))
  with pytest.raises(slides.SlideError) as refused:
    slides.slide_mpp(at20)
  message = str(refused.value)
  assert "manifest's mpp column" in message and '--fallback_mpp=UM_PER_PX' in message
  assert '--mpp_from_objective (it says 20x: 0.5 um/px)' in message
  assert '\n' not in message
  assert slides.slide_mpp(at20, from_objective=True) == (0.5, 'objective')
  assert slides.slide_mpp(at20, 0.3, from_objective=True) == (0.5, 'objective')
  assert slides.slide_mpp(at20, 0.3) == (0.3, 'fallback')
  assert slides.slide_mpp(at20, 0.3, manifest_mpp=0.26) == (0.26, 'manifest')

  at40 = slides.open_slide(_svs(shared_data, tmp_path / 'at40.svs', power='40'))
  assert slides.slide_mpp(at40, from_objective=True) == (0.25, 'objective')

  bare = slides.open_slide(_svs(shared_data, tmp_path / 'bare.svs', power=None))
  with pytest.raises(slides.SlideError, match='records no objective power'):
    slides.slide_mpp(bare, from_objective=True)
  assert slides.slide_mpp(bare, 0.5, from_objective=True) == (0.5, 'fallback')
  plan = slides.plan_patches(bare, target_mpp=8.0, patch_px=32, fallback_mpp=0.5)
  assert plan.metadata()['mpp_source'] == 'fallback' and plan.mpp == 0.5


def test_manifest_mpp_column_one_value_per_row_or_per_slide(shared_data, tmp_path):
  for name in 'abcdef':
    _svs(shared_data, tmp_path / f'{name}.svs', mpp=True)
  path = _manifest(
    tmp_path / 'manifest.csv',
    [
      _row('P1', slides='a.svs;b.svs', mpp='0.25'),  # every slide of the row
      _row('P2', slides='c.svs'),  # none: the slide's own
      _row('P3', slides='d.svs', mpp='40'),  # a magnification typed in
      _row('P4', slides='e.svs', mpp='0.25;0.5'),  # two values, one slide
      _row('P5', slides='f.svs', mpp='-1'),
    ],
  )
  man = manifest.read_manifest(path)
  got = {p.patient_id: [(s.slide_id, s.mpp) for s in p.slides] for p in man.patients}
  assert got == {'P1': [('a', 0.25), ('b', 0.25)], 'P2': [('c', None)]}
  errors = {e.patient_id: str(e) for e in man.errors}
  assert len(man.errors) == 3
  assert errors['P3'].startswith("line 4, column 'mpp': '40' um/px is no slide scan")
  assert 'not a magnification' in errors['P3']
  assert errors['P4'].startswith("line 5, column 'mpp': 2 values for 1 slide(s)")
  assert errors['P5'] == "line 6, column 'mpp': '-1' must be > 0"

  # One per slide, in the order of the slides column; an empty entry keeps the slide's own.
  path = _manifest(
    tmp_path / 'per_slide.csv', [_row('P1', slides='a.svs;b.svs;c.svs', mpp='0.25;;1')]
  )
  (patient,) = manifest.read_manifest(path).patients
  assert [s.mpp for s in patient.slides] == [0.25, None, 1.0]
  # The column is optional: a manifest without it reads as before.
  with open(tmp_path / 'plain.csv', 'w', newline='') as f:
    w = csv.DictWriter(f, list(manifest.MANIFEST_COLUMNS))
    w.writeheader()
    w.writerow(_row('P1', slides='a.svs'))
  (patient,) = manifest.read_manifest(tmp_path / 'plain.csv').patients
  assert patient.slides[0].mpp is None


# --------------------------------------------------------------------------- per-slide fingerprint


def test_setting_the_fallback_extracts_only_the_slide_without_mpp(shared_data, tmp_path):
  _svs(shared_data, tmp_path / 'scanned.svs', mpp=True)
  _svs(shared_data, tmp_path / 'nompp.svs')
  path = _manifest(
    tmp_path / 'manifest.csv',
    [_row('P1', slides='scanned.svs'), _row('P2', slides='nompp.svs')],
  )
  out = tmp_path / 'store'
  first = extract.extract(path, out, CFG)
  assert (first.slides_done, first.failed) == (1, 1)
  scanned = _mtime(out, 'scanned')
  second = extract.extract(path, out, dataclasses.replace(CFG, fallback_mpp=0.5))
  assert (second.slides_done, second.slides_skipped, second.failed) == (1, 1, 0)
  assert _mtime(out, 'scanned') == scanned  # not rewritten
  assert _meta(out, 'nompp')['mpp_source'] == 'fallback'


@pytest.mark.slow  # eight small extractions (about 55 s on a shared 2-core CPU)
def test_a_fallback_re_extracts_only_the_slides_that_use_it(shared_data, tmp_path):
  _svs(shared_data, tmp_path / 'scanned.svs', mpp=True)
  _svs(shared_data, tmp_path / 'nompp.svs')
  rows = [_row('P1', slides='scanned.svs'), _row('P2', slides='nompp.svs')]
  path = _manifest(tmp_path / 'manifest.csv', rows)
  out = tmp_path / 'store'

  first = extract.extract(path, out, CFG)
  assert (first.slides_done, first.failed) == (1, 1)
  assert first.failures[0]['item'] == 'nompp' and '--fallback_mpp' in first.failures[0]['reason']
  sha = store.read_store_json(out)['wsi']['fingerprint_sha256']
  scanned = _mtime(out, 'scanned')

  # Setting the fallback extracts the slide that needs it, and nothing else.
  fell_back = extract.extract(path, out, dataclasses.replace(CFG, fallback_mpp=0.5))
  assert (fell_back.slides_done, fell_back.slides_skipped, fell_back.failed) == (1, 1, 0)
  assert _mtime(out, 'scanned') == scanned
  assert _meta(out, 'nompp')['mpp'] == 0.5 and _meta(out, 'nompp')['mpp_source'] == 'fallback'
  info = store.read_store_json(out)
  assert info['wsi']['fingerprint_sha256'] == sha  # the store's fingerprint did not move
  assert info['wsi']['mpp']['slides_by_source'] == {'fallback': 1, 'slide': 1}
  assert info['wsi']['mpp']['not_from_slide'] == {'nompp': {'mpp': 0.5, 'mpp_source': 'fallback'}}
  # Same command again: nothing to do.
  again = extract.extract(path, out, dataclasses.replace(CFG, fallback_mpp=0.5))
  assert (again.slides_done, again.slides_skipped) == (0, 2)

  # Changing it re-extracts that slide only (1 um/px: four times the patches).
  nompp = _mtime(out, 'nompp')
  changed = extract.extract(path, out, dataclasses.replace(CFG, fallback_mpp=1.0))
  assert (changed.slides_done, changed.slides_skipped) == (1, 1)
  assert _mtime(out, 'scanned') == scanned and _mtime(out, 'nompp') != nompp
  assert _meta(out, 'nompp')['mpp'] == 1.0 and _meta(out, 'nompp')['num_patches'] == 38

  # The objective power comes before the fallback: 20x -> 0.5 um/px.
  objective = dataclasses.replace(CFG, fallback_mpp=1.0, mpp_from_objective=True)
  assert extract.extract(path, out, objective).slides_done == 1
  assert _meta(out, 'nompp')['mpp'] == 0.5 and _meta(out, 'nompp')['mpp_source'] == 'objective'
  assert extract.extract(path, out, objective).slides_done == 0

  # A rerun that gives the slide no MPP keeps its features (and says so).
  kept = extract.extract(path, out, CFG)
  assert (kept.slides_done, kept.slides_skipped, kept.failed) == (0, 2, 0)
  assert _meta(out, 'nompp')['mpp_source'] == 'objective'

  # The manifest's value wins over the slide's own: that slide alone is extracted again.
  nompp = _mtime(out, 'nompp')
  rows[0]['mpp'] = '1'
  _manifest(path, rows)
  overridden = extract.extract(path, out, objective)
  assert (overridden.slides_done, overridden.slides_skipped) == (1, 1)
  assert _meta(out, 'scanned')['mpp'] == 1.0 and _meta(out, 'scanned')['mpp_source'] == 'manifest'
  assert _mtime(out, 'nompp') == nompp
  assert store.read_store_json(out)['wsi']['fingerprint_sha256'] == sha

  # Training reads the store as one: every slide carries the store's fingerprint.
  from moemil_jax import store_reader

  cohort = store_reader.load_store(out)
  assert sorted(cohort.patch_count.tolist()) == [9, 38]


# --------------------------------------------------------------------------- the command


def _launch(manifest_path: Path, store_dir: Path, *extra: str) -> subprocess.CompletedProcess:
  return subprocess.run(
    [
      sys.executable,
      '-m',
      'launch.extract',
      f'--manifest={manifest_path}',
      f'--store={store_dir}',
      *FAST_FLAGS,
      *extra,
    ],
    cwd=ROOT,
    capture_output=True,
    encoding='utf-8',
    errors='replace',
    timeout=300,
  )


def _last_line(done: subprocess.CompletedProcess) -> str:
  return done.stdout.strip().splitlines()[-1]


@pytest.mark.slow  # two runs of the command (about 30 s under load)
def test_command_refuses_a_slide_without_mpp_naming_the_fallback(shared_data, tmp_path):
  _svs(shared_data, tmp_path / 'nompp.svs')
  path = _manifest(tmp_path / 'manifest.csv', [_row('P1', slides='nompp.svs')])
  out = tmp_path / 'store'

  refused = _launch(path, out)
  assert refused.returncode == 1, refused.stderr[-3000:]
  (line,) = [x for x in refused.stderr.splitlines() if 'FAILED nompp [wsi]' in x]
  assert line.endswith(
    "FAILED nompp [wsi]: slide has no MPP (openslide.mpp-x/y): give it in the manifest's mpp "
    'column, or pass --fallback_mpp=UM_PER_PX (about 0.25 for a 40x scan, 0.5 for 20x); or '
    '--mpp_from_objective (it says 20x: 0.5 um/px)'
  )
  assert _last_line(refused) == (
    f'1 patients extracted, 0 rejected, 1 failed: see {out / "failures.parquet"}'
  )
  assert 'Traceback' not in refused.stderr

  wrong = _launch(path, out, '--fallback_mpp=40')
  assert wrong.returncode == 2 and 'Traceback' not in wrong.stderr
  assert wrong.stderr.rstrip().splitlines()[-1] == (
    'launch.extract: error: --fallback_mpp=40: give micrometres per pixel (about 0.25 for a 40x '
    'scan, 0.5 for 20x), not a magnification'
  )


@pytest.mark.slow  # one run of the command after two in-process extractions (about 28 s)
def test_command_takes_the_objective_power_and_extracts_only_that_slide(shared_data, tmp_path):
  _svs(shared_data, tmp_path / 'nompp.svs')
  _svs(shared_data, tmp_path / 'scanned.svs', mpp=True)
  rows = [_row('P1', slides='scanned.svs'), _row('P2', slides='nompp.svs')]
  path = _manifest(tmp_path / 'manifest.csv', rows)
  out = tmp_path / 'store'
  assert extract.extract(path, out, CFG).failed == 1  # nompp
  scanned = _mtime(out, 'scanned')

  done = _launch(path, out, '--mpp_from_objective', '--verbose')  # the line per slide
  assert done.returncode == 0, done.stderr[-3000:]
  assert 'extracted 1 slides (9 patches), skipped 1;' in done.stdout
  assert _last_line(done) == '2 patients extracted, 0 rejected, 0 failed'
  (line,) = [x for x in done.stderr.splitlines() if 'um/px from the' in x]
  assert line.endswith('nompp: 0.5 um/px from the objective')
  assert _mtime(out, 'scanned') == scanned
  assert _meta(out, 'nompp')['mpp_source'] == 'objective'
  info = json.loads((out / store.STORE_JSON).read_text())
  assert info['wsi']['mpp']['not_from_slide'] == {'nompp': {'mpp': 0.5, 'mpp_source': 'objective'}}


@pytest.mark.slow  # one run of the command (about 18 s under load)
def test_command_takes_the_manifest_mpp_and_rejects_a_magnification_in_it(shared_data, tmp_path):
  _svs(shared_data, tmp_path / 'nompp.svs', power=None)
  _svs(shared_data, tmp_path / 'scanned.svs', mpp=True)
  path = _manifest(
    tmp_path / 'manifest.csv',
    [_row('P1', slides='nompp.svs', mpp='0.5'), _row('P2', slides='scanned.svs', mpp='40')],
  )
  out = tmp_path / 'store'
  done = _launch(path, out)
  assert done.returncode == 1, done.stderr[-3000:]  # P2's row was rejected
  (line,) = [x for x in done.stderr.splitlines() if "column 'mpp'" in x]
  assert line.endswith(
    "line 3, column 'mpp': '40' um/px is no slide scan: the mpp column is micrometres per pixel "
    '(about 0.25 for a 40x scan, 0.5 for 20x), not a magnification'
  )
  assert _last_line(done) == (
    f'1 patients extracted, 1 rejected, 0 failed: see {out / "failures.parquet"}'
  )
  assert _meta(out, 'nompp')['mpp'] == 0.5 and _meta(out, 'nompp')['mpp_source'] == 'manifest'
  assert not store.wsi_path(out, 'scanned').exists()
  # The lines per slide (its MPP source, its patches) only with --verbose.
  assert 'um/px from the manifest' not in done.stderr and 'patches in' not in done.stderr
