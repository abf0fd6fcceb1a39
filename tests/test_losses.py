"""Losses against lifelines / statsmodels on real data (Rossi) and O(n^2) references."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.optimize
from jax.test_util import check_grads

from moemil_jax import losses

lifelines = pytest.importorskip('lifelines')
from lifelines.datasets import load_rossi  # noqa: E402

COVARIATES = ['fin', 'age', 'race', 'wexp', 'mar', 'paro', 'prio']


@pytest.fixture(scope='module')
def rossi():
  df = load_rossi()
  return (
    df[COVARIATES].to_numpy(np.float64),
    df['week'].to_numpy(np.float64),
    df['arrest'].to_numpy(np.int32),
  )


def cox_nll_quadratic(log_risk, time, event, ties, mask=None):
  """O(n^2) textbook partial likelihood, one tie group at a time."""
  log_risk, time, event = map(np.asarray, (log_risk, time, event))
  mask = np.ones(len(time), bool) if mask is None else np.asarray(mask, bool)
  total = 0.0
  for t in np.unique(time[mask & (event > 0)]):
    at_risk = mask & (time >= t)
    tied = mask & (time == t) & (event > 0)
    d = tied.sum()
    r = np.exp(log_risk[at_risk]).sum()
    dsum = np.exp(log_risk[tied]).sum()
    total += log_risk[tied].sum()
    for j in range(d):
      total -= np.log(r - (j / d) * dsum) if ties == 'efron' else np.log(r)
  return -total


@pytest.mark.parametrize('ties,expected', [('efron', 675.3806), ('breslow', 675.6834)])
def test_rossi_null_loglik_published(rossi, ties, expected):
  _, time, event = rossi
  nll = losses.cox_nll(jnp.zeros(len(time)), time, event, ties=ties, reduction='sum')
  assert float(nll) == pytest.approx(expected, abs=1e-3)


@pytest.mark.parametrize('ties', ['efron', 'breslow'])
def test_rossi_matches_statsmodels_at_fitted_coefficients(rossi, ties):
  from statsmodels.duration.hazard_regression import PHReg

  x, time, event = rossi
  model = PHReg(time, x, status=event, ties=ties)
  beta = model.fit().params
  with jax.enable_x64(True):
    nll = losses.cox_nll(
      jnp.asarray(x @ beta), jnp.asarray(time), jnp.asarray(event), ties=ties, reduction='sum'
    )
    assert float(nll) == pytest.approx(-model.loglike(beta), rel=1e-10)


def test_rossi_lifelines_efron_loglik_and_refit(rossi):
  x, time, event = rossi
  df = load_rossi()
  cph = lifelines.CoxPHFitter().fit(df, duration_col='week', event_col='arrest')
  beta_ll = cph.params_[COVARIATES].to_numpy()
  with jax.enable_x64(True):
    xj, tj, ej = jnp.asarray(x), jnp.asarray(time), jnp.asarray(event)
    f = jax.jit(lambda b: losses.cox_nll(xj @ b, tj, ej, ties='efron', reduction='sum'))
    assert float(f(jnp.asarray(beta_ll))) == pytest.approx(-cph.log_likelihood_, rel=1e-8)
    g = jax.jit(jax.grad(lambda b: losses.cox_nll(xj @ b, tj, ej, ties='efron', reduction='sum')))
    res = scipy.optimize.minimize(
      lambda b: float(f(b)),
      np.zeros(x.shape[1]),
      jac=lambda b: np.asarray(g(b)),
      method='BFGS',
      options={'gtol': 1e-9},
    )
  np.testing.assert_allclose(res.x, beta_ll, atol=1e-4)


@pytest.mark.parametrize('ties', ['efron', 'breslow'])
def test_matches_quadratic_reference_with_ties_and_mask(ties):
  rng = np.random.default_rng(0)
  n = 60
  time = rng.integers(1, 12, n).astype(np.float64)  # many ties
  event = rng.random(n) < 0.6
  log_risk = rng.normal(size=n) * 2
  mask = rng.random(n) < 0.8
  with jax.enable_x64(True):
    fn = jax.jit(losses.cox_nll, static_argnames=('ties', 'reduction'))
    got = fn(log_risk, time, event, ties=ties, mask=mask, reduction='sum')
    mean = fn(log_risk, time, event, ties=ties, mask=mask, reduction='mean')
  want = cox_nll_quadratic(log_risk, time, event, ties, mask)
  assert float(got) == pytest.approx(want, rel=1e-10)
  assert float(mean) == pytest.approx(want / (event & mask).sum(), rel=1e-10)


def test_censored_at_event_time_is_at_risk():
  eta = np.array([0.3, -0.7, 1.1])
  time = np.array([1.0, 1.0, 2.0])
  event = np.array([1, 0, 1])
  want = -((eta[0] - np.log(np.exp(eta).sum())) + (eta[2] - eta[2]))
  for ties in ('breslow', 'efron'):
    got = losses.cox_nll(eta, time, event, ties=ties, reduction='sum')
    assert float(got) == pytest.approx(want, rel=1e-6)


@pytest.mark.parametrize('ties', ['efron', 'breslow'])
def test_gradient_matches_finite_differences(ties):
  rng = np.random.default_rng(1)
  time = rng.integers(1, 6, 20).astype(np.float64)
  event = (rng.random(20) < 0.5).astype(np.int32)
  with jax.enable_x64(True):
    fn = jax.jit(lambda e: losses.cox_nll(e, jnp.asarray(time), jnp.asarray(event), ties=ties))
    check_grads(fn, (jnp.asarray(rng.normal(size=20)),), order=1, modes=['rev'])


@pytest.mark.parametrize('ties', ['efron', 'breslow'])
def test_no_events_gives_zero_and_zero_gradient(ties):
  eta = jnp.array([0.5, -2.0, 3.0])
  time = jnp.array([1.0, 2.0, 3.0])
  event = jnp.zeros(3)
  loss, grad = jax.jit(jax.value_and_grad(lambda e: losses.cox_nll(e, time, event, ties=ties)))(eta)
  assert float(loss) == 0.0
  np.testing.assert_array_equal(np.asarray(grad), 0.0)
  # Everything masked out: also zero, never NaN.
  loss, grad = jax.jit(
    jax.value_and_grad(
      lambda e: losses.cox_nll(e, time, jnp.ones(3), ties=ties, mask=jnp.zeros(3, bool))
    )
  )(eta)
  assert float(loss) == 0.0 and np.all(np.asarray(grad) == 0.0)


@pytest.mark.parametrize('ties', ['efron', 'breslow'])
def test_shift_invariant_and_finite_at_large_log_risk(rossi, ties):
  x, time, event = rossi
  eta = jnp.asarray((x - x.mean(0)) @ np.linspace(-0.3, 0.3, x.shape[1]), jnp.float32)
  fn = jax.jit(
    jax.value_and_grad(lambda e: losses.cox_nll(e, time, event, ties=ties, reduction='sum'))
  )
  base, _ = fn(eta)
  shifted, grad = fn(eta + 1000.0)
  assert float(shifted) == pytest.approx(float(base), rel=1e-4)
  assert np.all(np.isfinite(np.asarray(grad)))
  _, grad_big = fn(eta * 1e4)
  assert np.all(np.isfinite(np.asarray(grad_big)))


def test_masked_bce_ignores_unlabelled():
  logits = jnp.array([2.0, -1.0, 50.0])
  labels = jnp.array([1.0, 0.0, 0.0])
  mask = jnp.array([True, True, False])
  want = np.mean([np.log1p(np.exp(-2.0)), np.log1p(np.exp(-1.0))])
  assert float(losses.masked_bce(logits, labels, mask)) == pytest.approx(want, rel=1e-6)
  loss, grad = jax.value_and_grad(losses.masked_bce)(logits, labels, jnp.zeros(3, bool))
  assert float(loss) == 0.0 and np.all(np.asarray(grad) == 0.0)


def _instance_reference(scores, valid, inst_logits, label, k):
  """Per-bag loop, as CLAM does it, with k clipped to n//2."""
  total, count = 0.0, 0
  for b in range(scores.shape[0]):
    idx = np.flatnonzero(valid[b])
    kb = min(k, len(idx) // 2)
    if kb == 0:
      continue
    order = idx[np.argsort(-scores[b, idx], kind='stable')]
    for i, target in [(j, 1) for j in order[:kb]] + [(j, 0) for j in order[::-1][:kb]]:
      lg = inst_logits[b, i, label[b]]
      total += -(lg[target] - np.log(np.exp(lg).sum()))
      count += 1
  return total / max(count, 1)


def test_instance_clustering_small_and_packed_bags():
  rng = np.random.default_rng(2)
  b, n, k = 4, 20, 8
  scores = rng.normal(size=(b, n)).astype(np.float32)
  valid = np.zeros((b, n), bool)
  for i, cnt in enumerate([20, 11, 3, 1]):  # full, < 2k, tiny, single patch
    valid[i, :cnt] = True
  inst = rng.normal(size=(b, n, 2, 2)).astype(np.float32)
  label = np.array([1, 0, 1, 0])
  want = _instance_reference(scores, valid, inst, label, k)
  # Packed: the bags back to back in shuffled slots, then 9 empty slots that score highest
  # (an empty slot must never be picked).
  rows, cols = np.nonzero(valid)
  slots = rng.permutation(len(rows))
  c = len(rows) + 9
  packed_scores = np.full((1, c), 100.0, np.float32)
  segment = np.full((1, c), b, np.int32)
  packed_inst = rng.normal(size=(1, c, 2, 2)).astype(np.float32)
  packed_scores[0, slots] = scores[rows, cols]
  segment[0, slots] = rows
  packed_inst[0, slots] = inst[rows, cols]
  fn = jax.jit(losses.instance_clustering, static_argnames=('k',))
  got = fn(packed_scores, segment, packed_inst, label, np.ones(b, bool), k=k)
  assert float(got) == pytest.approx(want, rel=1e-5)
  # Two groups of two patient rows give the same loss as one group of four.
  g2 = np.full((2, c), 2, np.int32)
  g2[0][segment[0] < 2] = segment[0][segment[0] < 2]
  g2[1][(segment[0] >= 2) & (segment[0] < b)] = segment[0][(segment[0] >= 2) & (segment[0] < b)] - 2
  got2 = fn(
    np.tile(packed_scores, (2, 1)),
    g2,
    np.tile(packed_inst, (2, 1, 1, 1)),
    label,
    np.ones(b, bool),
    k=k,
  )
  assert float(got2) == pytest.approx(want, rel=1e-5)
  # Unlabelled bags contribute nothing.
  none = fn(packed_scores, segment, packed_inst, label, np.zeros(b, bool), k=k)
  assert float(none) == 0.0


def test_gate_balance_zero_when_uniform():
  uniform = jnp.full((5, 2, 4), 0.25)
  assert float(losses.gate_balance(uniform)) == pytest.approx(0.0, abs=1e-7)
  collapsed = jnp.zeros((5, 2, 4)).at[:, :, 0].set(1.0)
  assert float(losses.gate_balance(collapsed)) == pytest.approx(3.0)
