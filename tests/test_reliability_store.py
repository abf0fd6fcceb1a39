"""Reliability, store: corrupt or truncated Parquet, files from another extraction, wrong widths.

A corrupt unit file is named by the reader (training) and by extraction, which refuses to
reuse it and extracts it again with overwrite (`launch.extract --overwrite`). Whole-store
fingerprint refusal is in test_extract.py::test_other_fingerprint_is_refused.
"""

import json

import numpy as np
import pytest

from feature_store import extract, slides, store, synthetic_store
from feature_store.synthetic_cohort import render_slide, write_pyramidal_tiff
from moemil_jax import store_reader


@pytest.fixture
def tiny_store(tmp_path):
  return synthetic_store.make_store(
    tmp_path / 'store', patients=8, seed=1, median_patches=6, max_patches=8, mri_slices=1
  )


@pytest.mark.parametrize('damage', ['truncate', 'flip'])
def test_reader_names_a_corrupt_slide_file(tiny_store, damage):
  path = store.slide_files(tiny_store)[0]
  data = bytearray(path.read_bytes())
  if damage == 'truncate':
    path.write_bytes(bytes(data[: len(data) // 2]))
  else:
    data[len(data) // 2 : len(data) // 2 + 64] = bytes(64)  # zero bytes inside a column chunk
    data[-12:-8] = b'\xff\xff\xff\x7f'  # and a bogus footer length
    path.write_bytes(bytes(data))
  with pytest.raises(store.StoreError, match=f'{path.name}: unreadable Parquet'):
    store_reader.load_store(tiny_store)


def test_reader_refuses_a_wrong_embedding_width(tiny_store):
  path = store.slide_files(tiny_store)[0]
  bag = store.read_slide(path)
  store.write_slide(
    tiny_store,
    bag.slide_id,
    bag.patient_id,
    bag.xy,
    np.zeros((len(bag.xy), 512), np.float16),
    bag.metadata,
  )
  with pytest.raises(
    store.StoreError, match=f'{path.name}: embedding width 512, store expects 1024'
  ):
    store_reader.load_store(tiny_store)


def test_reader_refuses_a_slide_from_another_extraction(tiny_store):
  info = store.read_store_json(tiny_store)
  store.write_store_json(
    tiny_store,
    {
      **{k: v for k, v in info.items() if k != 'schema_version'},
      'wsi': {'fingerprint_sha256': 'a' * 64},
    },
  )
  for path in store.slide_files(tiny_store):
    bag = store.read_slide(path)
    store.write_slide(
      tiny_store,
      bag.slide_id,
      bag.patient_id,
      bag.xy,
      bag.embeddings,
      {**bag.metadata, 'fingerprint_sha256': 'a' * 64},
    )
  store_reader.load_store(tiny_store)  # all consistent: loads
  path = store.slide_files(tiny_store)[1]
  bag = store.read_slide(path)
  store.write_slide(
    tiny_store,
    bag.slide_id,
    bag.patient_id,
    bag.xy,
    bag.embeddings,
    {**bag.metadata, 'fingerprint_sha256': 'b' * 64},
  )
  with pytest.raises(store.StoreError, match=f'{path.name}: made with encoder fingerprint b+'):
    store_reader.load_store(tiny_store)


def test_extraction_names_a_corrupt_unit_and_repairs_it_with_overwrite(tmp_path):
  """A truncated wsi/<id>.parquet: refused by name, then re-extracted byte-identical."""
  rgb = render_slide(np.random.default_rng(0), 0.0, 'A', 256)
  write_pyramidal_tiff(tmp_path / 's1.tiff', rgb, mpp=0.5, tile=128)
  header = (
    'patient_id,center,age,sex,ebv_dna,t_stage,n_stage,overall_stage,ic_response,os_months,'
    'os_event,slides,mri_t1,mri_t2,mri_t1c,mri_mask'
  )
  (tmp_path / 'manifest.csv').write_text(header + '\nP1,A,50,M,100,2,1,III,1,40,0,s1.tiff,,,,\n')
  cfg = extract.ExtractConfig(
    encoder_weights='random',
    target_mpp=4.0,
    patch_px=32,
    batch_size=8,
    workers=1,
    tissue=slides.TissueParams(min_tissue_area=0.1, min_patch_tissue=0.25),
  )
  out = tmp_path / 'store'
  assert extract.extract(tmp_path / 'manifest.csv', out, cfg).slides_done == 1
  path = store.wsi_path(out, 's1')
  good = store.read_slide(path)
  path.write_bytes(path.read_bytes()[:100])
  with pytest.raises(
    extract.FingerprintMismatch, match=r'unreadable, corrupt or truncated: .*s1\.parquet'
  ):
    extract.extract(tmp_path / 'manifest.csv', out, cfg)
  import dataclasses

  summary = extract.extract(
    tmp_path / 'manifest.csv', out, dataclasses.replace(cfg, overwrite=True)
  )
  assert summary.slides_done == 1 and summary.finalised
  again = store.read_slide(path)
  assert again.embeddings.tobytes() == good.embeddings.tobytes()
  assert json.loads((out / store.STORE_JSON).read_text())['counts']['slides_extracted'] == 1
