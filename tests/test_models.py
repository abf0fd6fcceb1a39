"""MoEMIL model: masking, missing modalities, baselines, low-precision compute."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from moemil_jax import batching, device_data, models
from moemil_jax.configs import dlr, pathomics
from moemil_jax.configs import test as test_config

F = 12  # radiomics features
W = device_data.slide_vector_width(test_config.get_config().data)  # prototype slide vector


def _inputs(b=3, s=6, seed=0, empty_slots=3):
  """Three patients packed in one group: bags of 16, 5 and 0 patches, then empty slots."""
  rng = np.random.default_rng(seed)
  counts = np.array([16, 5, 0])[:b]
  bags = [rng.random((c, 1024)).astype(np.float32) for c in counts]
  packed = batching.pack_bags(bags, capacity=int(counts.sum()) + empty_slots)
  return {
    **packed,
    'radiomics': rng.normal(size=(b, F)).astype(np.float32),
    'wsi_summary': rng.normal(size=(b, W)).astype(np.float32),
    'mri_deep': rng.random((b, s, 2048)).astype(np.float32),
    'mri_deep_valid': np.arange(s)[None] < np.array([6, 3, 6])[:b, None],
    'has_wsi': counts > 0,
    'has_radiomics': np.array([True, False, True])[:b],
    'has_mri_deep': np.array([True, False, True])[:b],
  }


def _model(config_module=test_config, **overrides):
  c = config_module.get_config().model
  c.update(overrides)
  return models.MoEMIL(c, radiomics_dim=F, slide_vector_dim=W, rngs=nnx.Rngs(0))


def test_forward_shapes_and_attention_over_real_patches_only():
  model = _model()
  x = _inputs()
  out = model(x)
  assert out['response_logit'].shape == (3,) and out['log_risk'].shape == (3,)
  assert out['gates'].shape == (3, 2, 4)
  np.testing.assert_allclose(np.asarray(out['gates']).sum(-1), 1.0, rtol=1e-5)
  att = np.asarray(out['attention'])[0]
  segment = x['wsi_segment'][0]
  np.testing.assert_allclose(
    [att[segment == r].sum() for r in range(3)], [1.0, 1.0, 0.0], atol=1e-6
  )
  assert np.all(att[segment == 3] == 0.0)  # empty slots
  assert np.all(np.isfinite(np.asarray(out['response_logit'])))  # incl. patient without WSI


def test_padding_content_and_extra_padding_do_not_change_outputs():
  model = _model()
  x = _inputs()
  base = model(x)
  y = dict(x)
  empty = x['wsi_segment'] == 3
  y['wsi'] = np.where(empty[..., None], 1e3, x['wsi']).astype(np.float32)
  y['wsi'] = np.concatenate([y['wsi'], np.full((1, 16, 1024), 7.0, np.float32)], 1)
  y['wsi_segment'] = np.concatenate([x['wsi_segment'], np.full((1, 16), 3, np.int32)], 1)
  y['mri_deep'] = np.where(x['mri_deep_valid'][..., None], x['mri_deep'], -5.0).astype(np.float32)
  other = model(y)
  for key in ('response_logit', 'log_risk'):
    np.testing.assert_allclose(np.asarray(other[key]), np.asarray(base[key]), rtol=1e-5, atol=1e-6)


def test_missing_modality_is_masked_out():
  model = _model()
  x = _inputs()
  y = dict(x, radiomics=x['radiomics'] + np.array([[0.0], [100.0], [0.0]], np.float32))
  a, b = model(x), model(y)
  # Patient 1 has no MRI: its radiomics values must not matter.
  np.testing.assert_allclose(np.asarray(a['log_risk']), np.asarray(b['log_risk']), rtol=1e-6)


@pytest.mark.parametrize(
  'term, output, other',
  [
    ('wide_survival', 'log_risk', 'response_logit'),
    ('wide_response', 'response_logit', 'log_risk'),
  ],
)
def test_wide_term_adds_a_linear_radiomics_term_to_its_output_that_trains(term, output, other):
  model = _model(**{term: True})
  x = _inputs()
  # Zero at initialisation, so the model starts as the deep network alone.
  assert not np.asarray(getattr(model, term).kernel[...]).any()
  base = model(x)
  w = np.random.default_rng(1).normal(size=(F, 1)).astype(np.float32)
  getattr(model, term).kernel[...] = jnp.asarray(w)
  out = model(x)
  linear = (x['radiomics'] @ w)[:, 0] * x['has_radiomics']  # none for the patient without MRI
  np.testing.assert_allclose(np.asarray(out[output] - base[output]), linear, rtol=1e-5, atol=1e-5)
  np.testing.assert_array_equal(np.asarray(out[other]), np.asarray(base[other]))
  grad = nnx.grad(lambda m: m(x)[output].sum())(model)
  np.testing.assert_allclose(
    np.asarray(getattr(grad, term).kernel[...])[:, 0],
    (x['radiomics'] * x['has_radiomics'][:, None]).sum(0),
    rtol=1e-5,
  )
  assert getattr(_model(**{term: False}), term) is None


def test_baselines_build_only_their_modality():
  path_model = _model(pathomics)
  dlr_model = _model(dlr)
  assert path_model.radiomics is None and path_model.mri_deep is None
  assert path_model.wsi_vector is not None  # the default slide pathway: prototypes
  assert dlr_model.wsi is None and dlr_model.wsi_vector is None
  assert dlr_model.radiomics and dlr_model.mri_deep
  x = _inputs()
  out = dlr_model(x)
  assert 'attention_scores' not in out
  # DLR ignores the slides entirely.
  other = dlr_model(dict(x, wsi=x['wsi'] * 3.0))
  np.testing.assert_array_equal(np.asarray(out['log_risk']), np.asarray(other['log_risk']))


@pytest.mark.parametrize(
  'term, output, other',
  [
    ('slide_wide_survival', 'log_risk', 'response_logit'),
    ('slide_wide_response', 'response_logit', 'log_risk'),
  ],
)
def test_slide_wide_terms_add_a_linear_term_in_the_slide_vector(term, output, other):
  model = _model(wsi_pathway='prototypes')
  x = _inputs()
  assert model.wsi is None and not np.asarray(getattr(model, term).kernel[...]).any()
  base = model(x)
  w = np.random.default_rng(2).normal(size=(W, 1)).astype(np.float32)
  getattr(model, term).kernel[...] = jnp.asarray(w)
  out = model(x)
  linear = (x['wsi_summary'] @ w)[:, 0] * x['has_wsi']  # none for the patient without slides
  np.testing.assert_allclose(np.asarray(out[output] - base[output]), linear, rtol=1e-5, atol=1e-5)
  np.testing.assert_array_equal(np.asarray(out[other]), np.asarray(base[other]))
  assert getattr(_model(wsi_pathway='prototypes', wide_slide=False), term) is None


def test_prototype_pathway_reads_the_slide_vector_not_the_patches():
  model = _model(wsi_pathway='prototypes')
  x = _inputs()
  base = model(x)
  assert 'attention_scores' not in base
  same = model(dict(x, wsi=x['wsi'] * 3.0))  # patches reach it only through the vector
  np.testing.assert_array_equal(np.asarray(same['log_risk']), np.asarray(base['log_risk']))
  moved = model(dict(x, wsi_summary=x['wsi_summary'] + np.array([[1.0], [1.0], [50.0]])))
  changed = np.abs(np.asarray(moved['response_logit'] - base['response_logit'])) > 1e-6
  # Patients 0 and 1 have slides; patient 2 has none, so its vector must not matter.
  np.testing.assert_array_equal(changed, [True, True, False])


def test_prototype_pathway_needs_the_slide_vector():
  c = test_config.get_config().model
  c.wsi_pathway = 'prototypes'
  with pytest.raises(ValueError, match='data.slide_prototypes'):
    models.MoEMIL(c, radiomics_dim=F, slide_vector_dim=0, rngs=nnx.Rngs(0))
  c.wsi_pathway = 'pooling'
  with pytest.raises(ValueError, match='wsi_pathway'):
    models.MoEMIL(c, radiomics_dim=F, slide_vector_dim=W, rngs=nnx.Rngs(0))


def test_dropout_uses_explicit_rngs_and_is_deterministic_per_key():
  model = _model(dropout=0.5, modality_dropout=0.5)
  x = _inputs()
  a = model(x, rngs=nnx.Rngs(dropout=1))['log_risk']
  b = model(x, rngs=nnx.Rngs(dropout=1))['log_risk']
  c = model(x, rngs=nnx.Rngs(dropout=2))['log_risk']
  np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  assert not np.allclose(np.asarray(a), np.asarray(c))
  # A patient with a single modality keeps it under modality dropout.
  pres = np.asarray(model(x, rngs=nnx.Rngs(dropout=3))['modality_present'])
  assert pres.any(-1).all()


def test_bfloat16_compute_keeps_float32_params():
  model = _model(compute_dtype='bfloat16')
  params = nnx.state(model, nnx.Param)
  assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(params))
  ref = _model()
  out, out32 = model(_inputs()), ref(_inputs())
  for key in ('log_risk', 'response_logit'):
    low, full = np.asarray(out[key]), np.asarray(out32[key])
    # bf16 keeps ~3 significant digits: measured 2% of the spread between patients; a
    # tolerance of 10% of that spread (not of the values) still fails if bf16 reorders them.
    assert np.abs(low - full).max() < 0.1 * np.ptp(full), key
    assert (np.argsort(low) == np.argsort(full)).all(), key


def test_bad_modality_rejected():
  with pytest.raises(ValueError, match='modalities'):
    _model(modalities=('ct',))
