"""Safety: no pickle loading anywhere, slide label/macro images never read, pseudonymised reports.

Heatmaps never reading associated images: test_heatmaps.py::test_heatmap_of_small_svs_renders.
"""

import re
import subprocess
import sys
from pathlib import Path

import openslide
import pandas as pd
import pytest
from test_evaluation import write_workdir

from feature_store import encoders, extract, slides, store
from moemil_jax import evaluation, pseudonym

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ('feature_store', 'moemil_jax', 'launch')
# Anything that can unpickle: the modules themselves and the loaders built on them.
PICKLE = re.compile(
  r'\b(import\s+(c?pickle|dill|cloudpickle|shelve|marshal|joblib)|from\s+(c?pickle|dill|'
  r'cloudpickle|shelve|marshal|joblib)\s+import|pickle\.loads?\(|read_pickle\(|'
  r'joblib\.load\(|marshal\.loads?\(|allow_pickle\s*=\s*True)'
)


def _sources():
  files = [p for pkg in PACKAGES for p in sorted((ROOT / pkg).rglob('*.py'))]
  assert len(files) > 20
  return [(p, p.read_text()) for p in files]


def _calls(text: str, name: str):
  """The full text of every `name(...)` call, parentheses balanced."""
  for m in re.finditer(re.escape(name) + r'\(', text):
    depth, i = 1, m.end()
    while depth and i < len(text):
      depth += {'(': 1, ')': -1}.get(text[i], 0)
      i += 1
    yield text[m.start() : i]


def test_no_pickle_loading_in_package_sources():
  offences = []
  for path, text in _sources():
    code = '\n'.join(line for line in text.splitlines() if not line.lstrip().startswith('#'))
    offences += [f'{path.relative_to(ROOT)}: {m.group(0)}' for m in PICKLE.finditer(code)]
    offences += [
      f'{path.relative_to(ROOT)}: {c}'
      for c in _calls(code, 'torch.load')
      if 'weights_only=True' not in c
    ]
    offences += [
      f'{path.relative_to(ROOT)}: {c}' for c in _calls(code, 'np.load') if 'allow_pickle' in c
    ]
  assert not offences, offences
  # The scanner itself catches what it should.
  assert PICKLE.search('import pickle') and PICKLE.search('x = np.load(f, allow_pickle=True)')
  assert ['torch.load(f, map_location=dict(a=1))'] == list(
    _calls('w = torch.load(f, map_location=dict(a=1))', 'torch.load')
  )


def test_slide_associated_images_are_never_read(shared_data, tmp_path, monkeypatch):
  path = shared_data / 'small.svs'
  with openslide.OpenSlide(str(path)) as slide:
    assert slide.associated_images, 'small.svs should carry an associated image'
  touched = []
  monkeypatch.setattr(
    openslide.OpenSlide, 'associated_images', property(lambda self: touched.append(self) or {})
  )
  cfg = extract.ExtractConfig(
    encoder_weights='random',
    target_mpp=0.998,
    patch_px=4,
    batch_size=16,
    workers=1,
    tissue=slides.TissueParams(min_patch_tissue=0.0, mask_px_per_patch=4),
  )
  n = extract.extract_slide(
    path, 'small', 'P1', tmp_path, encoders.Encoder('wsi', 'random'), cfg, {}, 'sha'
  )
  assert n > 0 and not touched
  meta = store.read_slide(store.wsi_path(tmp_path, 'small')).metadata
  assert not {'thumbnail', 'label', 'macro'} & set(map(str.lower, map(str, meta)))


@pytest.mark.slow  # day-to-day subset stays under 3 minutes
def test_pseudonymise_flag_replaces_ids_in_every_output(tmp_path):
  workdir = write_workdir(tmp_path)
  ids = (
    pd.read_parquet(workdir / 'moemil' / 'predictions.parquet')['patient_id'].astype(str).tolist()
  )
  before = {p for p in workdir.rglob('*') if p.is_file()}
  done = subprocess.run(
    [
      sys.executable,
      '-m',
      'launch.evaluate',
      f'--workdir={workdir}',
      '--n_bootstrap=20',
      '--pseudonymise',
      '--pseudonym_salt=s3cret',
    ],
    cwd=ROOT,
    capture_output=True,
    encoding='utf-8',
    errors='replace',
    timeout=600,
  )
  assert done.returncode == 0, done.stderr[-3000:]
  written = sorted({p for p in workdir.rglob('*') if p.is_file()} - before)
  assert workdir / 'report.html' in written and workdir / pseudonym.PREDICTIONS_COPY in written
  assert not pseudonym.find_ids(written, ids)
  assert not [i for i in ids if i in done.stdout]
  copy = pd.read_csv(workdir / pseudonym.PREDICTIONS_COPY)
  moemil = copy[copy['model'] == 'moemil']
  assert moemil['patient_id'].tolist() == [pseudonym.pseudonym(i, 's3cret') for i in ids]  # stable
  assert copy['patient_id'].str.fullmatch(r'P-[0-9a-f]{16}').all()


def test_pseudonymise_reaches_ids_inside_result_text_and_the_guard_sees_leaks(tmp_path):
  frame = pd.DataFrame({'patient_id': ['P1', 'P12'], 'split': ['train', 'test']})
  ev = evaluation.Evaluation(
    predictions={'m': frame}, results={'notes': ['too few events for P12 and P1'], 'per_model': {}}
  )
  out = pseudonym.pseudonymise_evaluation(ev, 'salt')
  p1, p12 = pseudonym.pseudonym('P1', 'salt'), pseudonym.pseudonym('P12', 'salt')
  assert out.results['notes'] == [f'too few events for {p12} and {p1}']
  assert out.predictions['m']['patient_id'].tolist() == [p1, p12]
  assert ev.predictions['m']['patient_id'].tolist() == ['P1', 'P12']  # the input is untouched
  leaky = tmp_path / 'table.csv'
  leaky.write_text('patient,score\nP12,0.5\n')
  assert pseudonym.find_ids([leaky], ['P12']) == [(leaky, 'P12')]
  assert pseudonym.pseudonym('P1', 'other') != p1
