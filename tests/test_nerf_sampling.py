"""Ray-sphere intervals, stratified samples, and importance resampling."""

import functools

import jax
import jax.numpy as jnp
import numpy as np

from lmc_jax.nerf import sampling, volume

intersect = jax.jit(sampling.intersect_sphere)
stratified = jax.jit(sampling.sample_stratified, static_argnums=(3, 4))
resample = jax.jit(sampling.resample_along_rays, static_argnums=(3, 4, 5))


def test_rays_through_centre():
    rng = np.random.default_rng(0)
    dirs = rng.normal(size=(16, 3))
    dirs /= np.linalg.norm(dirs, axis=-1, keepdims=True)
    dist = np.linspace(1.5, 4.0, 16)
    radius = 0.8
    origins = -dirs * dist[:, None]
    near, far, hit = intersect(origins, dirs, radius)
    np.testing.assert_allclose(np.asarray(near), dist - radius, rtol=1e-5)
    np.testing.assert_allclose(np.asarray(far), dist + radius, rtol=1e-5)
    assert np.all(np.asarray(hit))
    # Non-unit directions: t is in units of |d|.
    near2, far2, _ = intersect(origins, 2.0 * dirs, radius)
    np.testing.assert_allclose(np.asarray(near2), (dist - radius) / 2, rtol=1e-5)
    np.testing.assert_allclose(np.asarray(far2), (dist + radius) / 2, rtol=1e-5)


def test_offset_tangent_and_missing_rays():
    radius = 1.0
    offsets = np.asarray([0.0, 0.6, 1.0 - 1e-3, 1.0 + 1e-3, 3.0], np.float32)
    origins = np.stack([offsets, np.full(5, -5.0), np.zeros(5)], axis=-1)
    dirs = np.tile(np.asarray([0.0, 1.0, 0.0]), (5, 1))

    @jax.jit
    def go(origins, dirs):
        near, far, hit = sampling.intersect_sphere(origins, dirs, radius)
        t = sampling.sample_stratified(jax.random.PRNGKey(0), near, far, 8)
        out = volume.volume_render(jnp.full((5, 8), 50.0), jnp.ones((5, 8, 3)), t, dirs)
        return near, far, hit, out

    near, far, hit, out = jax.tree_util.tree_map(np.asarray, go(origins, dirs))
    half = np.sqrt(np.maximum(0.0, radius**2 - offsets**2))
    np.testing.assert_array_equal(hit, [True, True, True, False, False])
    np.testing.assert_allclose(near[:3], 5.0 - half[:3], atol=1e-4)
    np.testing.assert_allclose(far[:3], 5.0 + half[:3], atol=1e-4)
    # Misses: empty interval at the closest approach, rendering to pure background.
    np.testing.assert_array_equal(near[3:], far[3:])
    np.testing.assert_allclose(near[3:], 5.0, atol=1e-5)
    assert np.all(np.isfinite(out["rgb"]))
    np.testing.assert_array_equal(out["acc"][3:], 0.0)
    assert np.all(out["acc"][:2] > 0.99)


def test_origin_inside_and_sphere_behind():
    origins = np.asarray([[0.0, 0.0, 0.0], [0.0, 0.0, 5.0]])
    dirs = np.asarray([[1.0, 0.0, 0.0], [0.0, 0.0, 1.0]])
    near, far, hit = intersect(origins, dirs, 1.0, 0.1)
    np.testing.assert_allclose(np.asarray(near), [0.1, 0.1], atol=1e-6)
    np.testing.assert_allclose(np.asarray(far), [1.0, 0.1], atol=1e-6)
    np.testing.assert_array_equal(np.asarray(hit), [True, False])


def test_stratified_sorted_and_in_bins():
    near = np.asarray([1.0, 2.0, 0.5], np.float32)
    far = np.asarray([3.0, 2.5, 0.5], np.float32)
    n = 16
    t = np.asarray(stratified(jax.random.PRNGKey(3), near, far, n, True))
    assert t.shape == (3, n + 1)
    assert np.all(np.diff(t, axis=-1) >= 0)
    np.testing.assert_allclose(t[:, 0], near)
    np.testing.assert_allclose(t[:, -1], far)
    # Each interior edge stays within half a bin of its grid position, and does move.
    grid = np.asarray(stratified(jax.random.PRNGKey(3), near, far, n, False))
    bin_width = (far - near) / n
    assert np.all(np.abs(t - grid) <= 0.5 * bin_width[:, None] + 1e-6)
    assert np.abs(t - grid)[0].max() > 0.1 * bin_width[0]


def test_resampling_concentrates_on_a_spike():
    n, m = 32, 64
    near, far = 2.0, 6.0
    t = jnp.broadcast_to(jnp.linspace(near, far, n + 1), (4, n + 1))
    spike = 11
    weights = jnp.zeros((4, n)).at[:, spike].set(1.0)
    key = jax.random.PRNGKey(0)
    exact = np.asarray(resample(key, t, weights, m, True, False, 0.0))
    assert exact.shape == (4, m + 1)
    lo, hi = float(t[0, spike]), float(t[0, spike + 1])
    assert np.all((exact >= lo - 1e-5) & (exact <= hi + 1e-5))
    blurred = np.asarray(resample(key, t, weights, m, True, True, 0.01))
    assert np.all(np.diff(blurred, axis=-1) >= 0)
    assert np.all((blurred >= near) & (blurred <= far))
    # Blur spreads mass to the two neighbouring bins; padding puts a little everywhere.
    near_spike = (blurred >= float(t[0, spike - 1])) & (blurred <= float(t[0, spike + 2]))
    assert near_spike.mean() > 0.8
    assert near_spike.mean() < 1.0


def test_sample_pdf_matches_piecewise_constant_density():
    bins = np.asarray([0.0, 1.0, 1.5, 4.0, 5.0], np.float32)
    weights = np.asarray([0.1, 0.0, 0.6, 0.3], np.float32)
    pdf = jax.jit(sampling.sample_pdf, static_argnums=(3, 4))
    samples = np.asarray(pdf(jax.random.PRNGKey(0), np.broadcast_to(bins, (500, 5)),
                             np.broadcast_to(weights, (500, 4)), 40, True)).ravel()
    counts = np.histogram(samples, bins=bins)[0] / samples.size
    np.testing.assert_allclose(counts, weights, atol=0.01)
    # Inside bin 2 the density is uniform: its mean is the midpoint.
    inside = samples[(samples > 1.5) & (samples < 4.0)]
    np.testing.assert_allclose(inside.mean(), 2.75, atol=0.02)
    # All-zero weights fall back to equal mass per bin and stay finite.
    flat = np.asarray(pdf(None, bins, np.zeros(4, np.float32), 9, False))
    expected = np.interp(np.linspace(0.0, 1.0, 9), np.linspace(0.0, 1.0, 5), bins)
    np.testing.assert_allclose(flat, expected, atol=1e-5)


def test_resampled_edges_carry_no_gradient():
    t = jnp.linspace(0.0, 1.0, 9)

    @jax.jit
    @functools.partial(jax.grad, argnums=(0, 1))
    def g(t, w):
        return jnp.sum(sampling.resample_along_rays(jax.random.PRNGKey(0), t, w, 8) ** 2)

    gt, gw = g(t, jnp.linspace(0.1, 1.0, 8))
    np.testing.assert_array_equal(np.asarray(gw), 0.0)
    np.testing.assert_array_equal(np.asarray(gt), 0.0)
