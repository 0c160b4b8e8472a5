"""IPE (Mip-NeRF Equations 7, 8, 14) against Monte Carlo over a uniformly sampled frustum."""

import jax.numpy as jnp
import numpy as np
import pytest

from lmc_jax.nerf import ipe

N_MC = 200_000
ORIGIN = np.array([0.3, -0.2, 0.1])
DIRECTION = np.array([0.6, -1.1, 0.4])  # deliberately not unit length
T0, T1, RADIUS = 1.0, 1.4, 0.08


def _sample_frustum(rng, n):
    """Uniform points in {o + t d + rho e : t0 <= t <= t1, rho <= r t} (density of t ~ t^2)."""
    t = (T0**3 + rng.random(n) * (T1**3 - T0**3)) ** (1.0 / 3.0)
    rho = RADIUS * t * np.sqrt(rng.random(n))
    phi = 2.0 * np.pi * rng.random(n)
    d_unit = DIRECTION / np.linalg.norm(DIRECTION)
    e1 = np.cross(d_unit, [0.0, 0.0, 1.0])
    e1 /= np.linalg.norm(e1)
    e2 = np.cross(d_unit, e1)
    radial = np.cos(phi)[:, None] * e1 + np.sin(phi)[:, None] * e2
    return ORIGIN + t[:, None] * DIRECTION + rho[:, None] * radial


@pytest.fixture(scope="module")
def frustum():
    points = _sample_frustum(np.random.default_rng(0), N_MC)
    means, covs = ipe.conical_frustum_to_gaussian(
        jnp.asarray(ORIGIN, jnp.float32), jnp.asarray(DIRECTION, jnp.float32),
        jnp.asarray([T0, T1], jnp.float32), jnp.asarray([RADIUS], jnp.float32))
    return points, np.asarray(means)[0], np.asarray(covs)[0]


def test_gaussian_moments_match_monte_carlo(frustum):
    points, mean, cov = frustum
    mc_mean = points.mean(0)
    se_mean = points.std(0) / np.sqrt(N_MC)
    np.testing.assert_array_less(np.abs(mean - mc_mean), 5 * se_mean + 1e-5)
    mc_var = points.var(0)
    # Standard error of a variance estimate: sqrt((m4 - var^2) / n).
    m4 = np.mean((points - mc_mean) ** 4, axis=0)
    se_var = np.sqrt((m4 - mc_var**2) / N_MC)
    np.testing.assert_array_less(np.abs(cov - mc_var), 5 * se_var + 1e-6)


def test_ipe_matches_monte_carlo_encoding(frustum):
    points, mean, cov = frustum
    num_levels = 6
    feats = np.asarray(ipe.integrated_pos_enc(jnp.asarray(mean), jnp.asarray(cov), 0, num_levels))
    pe = np.asarray(ipe.pos_enc(jnp.asarray(points, jnp.float32), 0, num_levels))
    mc, se = pe.mean(0), pe.std(0) / np.sqrt(N_MC)
    err = np.abs(feats - mc).reshape(2, num_levels, 3)
    # Low levels: the Gaussian is exact to within MC error.
    low = slice(0, 3)
    np.testing.assert_array_less(err[:, low], 5 * se.reshape(2, num_levels, 3)[:, low] + 1e-3)
    # High levels: the frustum is not Gaussian, but IPE is far closer than PE at the mean,
    # whose features are not attenuated at all.
    pe_at_mean = np.asarray(ipe.pos_enc(jnp.asarray(mean), 0, num_levels))
    err_pe = np.abs(pe_at_mean - mc).reshape(2, num_levels, 3)
    high = slice(3, num_levels)
    assert np.all(err[:, high].max(-1).max(0) < 0.3 * err_pe[:, high].max(-1).max(0))


def test_ipe_layout_and_zero_variance():
    x = jnp.asarray([[0.1, -0.7, 2.0]])
    feats = np.asarray(ipe.integrated_pos_enc(x, jnp.zeros_like(x), 1, 3))
    assert feats.shape == (1, 12)
    xs = np.asarray(x)[0]
    expected = np.concatenate([np.sin(2 * xs), np.sin(4 * xs), np.cos(2 * xs), np.cos(4 * xs)])
    np.testing.assert_allclose(feats[0], expected, atol=1e-5)


def test_zero_length_frustum_is_finite():
    t_mean, t_var, r_var = ipe.frustum_moments(jnp.asarray([0.0, 1.0]), jnp.asarray([0.0, 1.0]),
                                               jnp.asarray(0.01))
    assert np.all(np.isfinite(np.asarray([t_mean, t_var, r_var])))
    np.testing.assert_allclose(np.asarray(t_var), 0.0, atol=1e-7)


def test_stable_moments_match_exact_integrals():
    """Equation 7's stable form against the moments integrated directly.

    With the density of t proportional to t^2 on [t0, t1],
    E[t^k] = 3 (t1^(k+3) - t0^(k+3)) / ((k + 3) (t1^3 - t0^3)), and the radial variance per
    axis is r^2 E[t^2] / 4 (a uniform disc of radius r t has E[x^2] = (r t)^2 / 4).
    """
    rng = np.random.default_rng(3)
    t0 = np.concatenate([[0.0, 0.0], rng.uniform(0.0, 3.0, 50)])
    t1 = t0 + np.concatenate([[1.0, 2.0], rng.uniform(0.01, 2.0, 50)])
    r = rng.uniform(0.001, 0.5, t0.shape)

    def moment(k):
        return 3.0 * (t1 ** (k + 3) - t0 ** (k + 3)) / ((k + 3) * (t1**3 - t0**3))

    t_mean, t_var, r_var = (np.asarray(x) for x in ipe.frustum_moments(
        jnp.asarray(t0, jnp.float32), jnp.asarray(t1, jnp.float32), jnp.asarray(r, jnp.float32)))
    np.testing.assert_allclose(t_mean, moment(1), rtol=1e-5)
    np.testing.assert_allclose(t_var, moment(2) - moment(1) ** 2, rtol=1e-4)
    np.testing.assert_allclose(r_var, r**2 * moment(2) / 4.0, rtol=1e-5)
    # The full cone [0, 1]: mean 3/4, variance 3/80, radial variance 3 r^2 / 20.
    np.testing.assert_allclose([t_mean[0], t_var[0], r_var[0] / r[0] ** 2],
                               [0.75, 3.0 / 80.0, 3.0 / 20.0], rtol=1e-5)
