"""Shared fixtures: the real test data beside the checkout, and small synthetic data."""

from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / 'shared' / 'data'


@pytest.fixture(scope='session')
def shared_data() -> Path:
  if not (SHARED_DATA / 'small.svs').exists():
    pytest.skip(f'real test data not found at {SHARED_DATA} (checkout outside the project setup)')
  return SHARED_DATA


@pytest.fixture(scope='session')
def tiny_cohort(tmp_path_factory) -> Path:
  """Six patients with small slides and MRI; returns the manifest path."""
  from feature_store import synthetic_cohort

  out = tmp_path_factory.mktemp('cohort')
  return synthetic_cohort.make_cohort(
    out, patients=6, seed=3, slide_px=768, mri_px=64, mri_slices=8, progress=False
  )


@pytest.fixture(scope='session')
def small_store(tmp_path_factory) -> Path:
  """A 60-patient synthetic feature store with small bags, shared by model and data tests."""
  from feature_store import synthetic_store

  return synthetic_store.make_store(
    tmp_path_factory.mktemp('store'), patients=60, seed=0, median_patches=48, max_patches=400
  )
