"""Slide prototypes: what they see, what they recover, and that their patch shares add up."""

import numpy as np
import pytest

from moemil_jax import prototypes

DIM = 64


def _bags(patients=80, seed=0):
  """Three common tissue types, a rare key type (4%) whose mean moves with a latent along one
  direction, and a look-alike decoy type (8%) that moves along it at random: the shape of
  the realistic synthetic store, where the bag mean fails."""
  rng = np.random.default_rng(seed)
  types = np.abs(rng.normal(0, 1.0, (5, DIM)))
  signal = rng.normal(size=DIM)
  signal /= np.linalg.norm(signal)
  latent = rng.standard_normal(patients)
  bags = []
  for i in range(patients):
    n = int(rng.integers(150, 300))
    kind = rng.choice(5, n, p=[0.3, 0.3, 0.28, 0.04, 0.08])
    x = types[kind] + 0.3 * rng.standard_normal((n, DIM))
    x[kind == 3] += 1.5 * latent[i] * signal
    x[kind == 4] += 1.5 * rng.standard_normal() * signal
    bags.append(x.astype(np.float16))
  return bags, latent


@pytest.fixture(scope='module')
def cohort():
  bags, latent = _bags()
  train = np.arange(len(bags)) < 60
  return bags, latent, train, prototypes.fit(bags, train, types=8, components=2)


def test_slide_vector_recovers_a_rare_tissue_type_that_the_bag_mean_dilutes(cohort):
  bags, latent, train, protos = cohort
  x = protos.transform(bags)
  assert x.shape == (len(bags), protos.width) == (len(bags), 8 * 3)
  np.testing.assert_allclose(x[train].mean(0), 0.0, atol=1e-4)  # standardised on training
  test = ~train

  def held_out_r(features):
    """|r| of the latent with a least-squares fit on training rows, on held-out rows."""
    a = np.c_[features, np.ones(len(features))]
    coef = np.linalg.lstsq(a[train], latent[train], rcond=None)[0]
    return abs(np.corrcoef(a[test] @ coef, latent[test])[0, 1])

  means = np.stack([b.astype(np.float32).mean(0) for b in bags])
  assert held_out_r(x) > 0.9
  assert held_out_r(means) < 0.6  # 64 inputs, 60 patients: the mean's signal is lost


def test_prototypes_see_training_patients_only(cohort):
  bags, _, train, protos = cohort
  changed = [b if t else (b * 3 + 1) for b, t in zip(bags, train)]
  other = prototypes.fit(changed, train, types=8, components=2)
  for name, value in protos.arrays().items():  # float32 k-means round-off only
    np.testing.assert_allclose(other.arrays()[name], value, rtol=1e-4, atol=1e-5, err_msg=name)


def test_patch_contributions_add_up_to_the_linear_score(cohort):
  bags, _, _, protos = cohort
  w = np.random.default_rng(3).normal(size=protos.width)
  for bag in bags[:5]:
    score = float(protos.transform([bag])[0] @ w)
    shares = protos.patch_contributions(bag, w)
    assert shares.shape == (len(bag),)
    np.testing.assert_allclose(shares.sum(), score, rtol=1e-3, atol=1e-3)
    np.testing.assert_allclose(protos.patch_contributions(bag, w, reference=bag), shares)


def test_empty_bags_sit_at_the_training_mean_and_arrays_round_trip(cohort):
  bags, _, train, protos = cohort
  x = protos.transform([bags[0], bags[0][:0]])
  assert not x[1].any() and x[0].any()
  again = prototypes.SlidePrototypes.from_arrays(protos.arrays())
  np.testing.assert_array_equal(again.transform(bags[:3]), protos.transform(bags[:3]))
  assert prototypes.fit(bags, np.arange(len(bags)) < 3) is None  # too few training patients
