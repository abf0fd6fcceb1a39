"""Manifest validation: every problem names its CSV line and column; good rows survive."""

import csv

import pyarrow as pa
import pytest

from feature_store import manifest, store

HEADER = list(manifest.MANIFEST_COLUMNS)


def _row(pid, **kw):
  row = dict(
    patient_id=pid,
    center='A',
    age='51',
    sex='M',
    ebv_dna='1200.5',
    t_stage='3',
    n_stage='1',
    overall_stage='III',
    ic_response='1',
    os_months='40.5',
    os_event='0',
    slides='',
    mri_t1='',
    mri_t2='',
    mri_t1c='',
    mri_mask='',
  )
  row.update(kw)
  return row


def _write(tmp_path, rows):
  path = tmp_path / 'manifest.csv'
  with open(path, 'w', newline='') as f:
    w = csv.DictWriter(f, HEADER)
    w.writeheader()
    w.writerows(rows)
  return path


@pytest.fixture
def files(tmp_path):
  for name in ('s1.tiff', 's2.svs', 't1.nii.gz', 't2.nii.gz', 'mask.nii.gz'):
    (tmp_path / name).write_bytes(b'x')
  return tmp_path


def test_valid_rows_are_typed_and_paths_resolved(files):
  path = _write(
    files,
    [
      _row(
        'P1',
        slides='s1.tiff;s2.svs',
        mri_t1='t1.nii.gz',
        mri_t2='t2.nii.gz',
        mri_mask='mask.nii.gz',
      ),
      _row('P2', center='B', sex='F', ic_response='', ebv_dna='', os_event='1', t_stage='4.0'),
    ],
  )
  m = manifest.read_manifest(path)
  assert m.errors == ()
  p1, p2 = m.patients
  assert [s.slide_id for s in p1.slides] == ['s1', 's2']
  assert p1.slides[0].path == (files / 's1.tiff').resolve()
  assert set(p1.mri) == {'t1', 't2'} and p1.mri_mask == (files / 'mask.nii.gz').resolve()
  assert p2.clinical['ic_response'] is None and p2.clinical['ebv_dna'] is None
  assert p2.clinical['t_stage'] == 4 and p2.slides == () and p2.mri == {}

  table = manifest.clinical_table(m.patients)
  assert table.column_names == list(store.CLINICAL_COLUMNS) + ['has_wsi', 'has_mri']
  assert table.schema.field('ic_response').type == pa.int8()
  assert table.schema.field('os_event').type == pa.int8()
  assert table.schema.field('t_stage').type == pa.int8()
  assert table.schema.field('overall_stage').type == pa.string()
  assert table.column('ic_response').to_pylist() == [1, None]
  assert table.column('has_wsi').to_pylist() == [True, False]
  assert table.column('has_mri').to_pylist() == [True, False]
  df = table.to_pandas()
  assert df['os_months'].tolist() == [40.5, 40.5]


@pytest.mark.parametrize(
  'field,value,message',
  [
    ('center', 'Sun Yat-sen', 'not a safe identifier'),
    ('center', '', 'not a safe identifier'),
    ('os_months', '0', 'must be > 0'),
    ('os_months', '-3', 'must be > 0'),
    ('os_event', '2', 'is not 0 or 1'),
    ('os_event', '', 'is not 0 or 1'),
    ('ic_response', 'yes', '0, 1 or empty'),
    ('t_stage', '5', 'not one of'),
    ('sex', 'X', 'not one of'),
    ('slides', 'missing.tiff', 'file not found'),
    ('mri_t1', 'nope.nii.gz', 'file not found'),
    ('patient_id', '../evil', 'not a safe identifier'),
  ],
)
def test_bad_value_names_line_and_column(files, field, value, message):
  path = _write(files, [_row('P1'), _row('P2', **{field: value}), _row('P3')])
  m = manifest.read_manifest(path)
  assert [p.patient_id for p in m.patients] == ['P1', 'P3']
  assert len(m.errors) == 1
  err = m.errors[0]
  assert (err.line, err.column) == (3, field)
  assert message in err.message
  assert str(err).startswith(f"line 3, column '{field}'")


def test_duplicates_and_mask_rules(files):
  path = _write(
    files,
    [
      _row('P1', slides='s1.tiff'),
      _row('P1'),  # duplicate patient
      _row('P3', slides='s1.tiff'),  # duplicate slide id
      _row('P4', mri_t1='t1.nii.gz'),  # MRI without a mask
    ],
  )
  m = manifest.read_manifest(path)
  assert [p.patient_id for p in m.patients] == ['P1']
  got = {(e.line, e.column) for e in m.errors}
  assert got == {(3, 'patient_id'), (4, 'slides'), (5, 'mri_mask')}
  assert 'first on line 2' in next(e.message for e in m.errors if e.line == 3)


def test_missing_header_column_is_fatal(tmp_path):
  path = tmp_path / 'manifest.csv'
  path.write_text('patient_id,center\nP1,A\n')
  with pytest.raises(manifest.ManifestError, match='header lacks columns'):
    manifest.read_manifest(path)


def test_synthetic_cohort_manifest_validates(tiny_cohort):
  m = manifest.read_manifest(tiny_cohort)
  assert m.errors == ()
  assert len(m.patients) == 6
  assert any(p.slides for p in m.patients) and any(p.mri for p in m.patients)


def test_excel_byte_order_mark_and_hospital_names_as_centers(tmp_path):
  path = tmp_path / 'manifest.csv'
  with open(path, 'w', newline='', encoding='utf-8-sig') as f:  # Excel's "CSV UTF-8"
    w = csv.DictWriter(f, HEADER)
    w.writeheader()
    w.writerows([_row('P1', center='Sun_Yat-sen.Guangzhou'), _row('P2', center='Foshan')])
  assert path.read_bytes().startswith(b'\xef\xbb\xbfpatient_id,')
  m = manifest.read_manifest(path)
  assert not m.errors
  assert [p.clinical['center'] for p in m.patients] == ['Sun_Yat-sen.Guangzhou', 'Foshan']


def test_non_utf8_manifest_is_one_clear_error(tmp_path):
  path = tmp_path / 'manifest.csv'
  path.write_bytes(','.join(HEADER).encode() + '\nP\xe9,A\n'.encode('latin-1'))
  with pytest.raises(manifest.ManifestError, match='not UTF-8 text.*CSV UTF-8'):
    manifest.read_manifest(path)
