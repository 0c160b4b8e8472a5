"""The volume-rendering equation against closed forms."""

import jax
import jax.numpy as jnp
import numpy as np

from lmc_jax.nerf import volume

weights_fn = jax.jit(volume.compute_alpha_weights)
volume_render = jax.jit(volume.volume_render)


def test_constant_density_weights_match_closed_form():
    sigma, near, far, n = 1.7, 0.5, 2.5, 32
    rng = np.random.default_rng(0)
    t = np.concatenate([[near], np.sort(rng.uniform(near, far, n - 1)), [far]])
    t = t.astype(np.float32)
    for scale in (1.0, 2.0):  # |d| = 2 doubles every optical depth
        d = np.asarray([0.0, 0.0, -scale], np.float32)
        w, _, trans = weights_fn(np.full(n, sigma, np.float32), t, d)
        s = sigma * scale
        expected = np.exp(-s * (t[:-1] - near)) - np.exp(-s * (t[1:] - near))
        np.testing.assert_allclose(np.asarray(w), expected, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(np.asarray(trans), np.exp(-s * (t[:-1] - near)), rtol=1e-5)
        acc = float(volume_render(np.full(n, sigma, np.float32), np.ones((n, 3), np.float32),
                                  t, d)["acc"])
        np.testing.assert_allclose(acc, 1.0 - np.exp(-s * (far - near)), rtol=1e-5)


def test_weights_sum_at_most_one_and_finite():
    rng = np.random.default_rng(1)
    density = np.exp(rng.uniform(-8.0, 8.0, (64, 48))).astype(np.float32)
    t = np.sort(rng.uniform(0.0, 3.0, (64, 49)), axis=-1).astype(np.float32)
    w, alpha, _ = jax.tree_util.tree_map(np.asarray, weights_fn(density, t, np.ones((64, 3))))
    assert np.all(np.isfinite(w))
    assert np.all(w >= 0.0)
    assert np.all(w.sum(-1) <= 1.0 + 1e-6)
    assert np.all((alpha >= 0) & (alpha <= 1))


def test_background_composite():
    t = jnp.linspace(1.0, 2.0, 9)
    rgb = jnp.tile(jnp.asarray([0.2, 0.4, 0.6]), (8, 1))
    bg = jnp.asarray([1.0, 0.0, 0.5])
    d = jnp.asarray([1.0, 0.0, 0.0])
    empty = volume_render(jnp.zeros(8), rgb, t, d, bg)
    np.testing.assert_allclose(np.asarray(empty["rgb"]), np.asarray(bg), atol=1e-7)
    assert float(empty["acc"]) == 0.0
    assert float(empty["depth"]) == 2.0  # nothing hit: far
    solid = volume_render(jnp.full(8, 1e4), rgb, t, d, bg)
    np.testing.assert_allclose(np.asarray(solid["rgb"]), [0.2, 0.4, 0.6], atol=1e-5)
    np.testing.assert_allclose(float(solid["depth"]), 1.0625, atol=1e-5)  # first midpoint
    # Half-opaque: C = sum w c + (1 - acc) bg.
    sigma = jnp.zeros(8).at[3].set(np.log(2.0) / 0.125)
    half = volume_render(sigma, rgb, t, d, bg)
    np.testing.assert_allclose(float(half["acc"]), 0.5, rtol=1e-5)
    np.testing.assert_allclose(np.asarray(half["rgb"]), 0.5 * np.asarray(rgb[0] + bg), rtol=1e-5)
    np.testing.assert_allclose(float(half["depth"]), 1.4375, rtol=1e-5)


def test_batched_shapes():
    out = jax.eval_shape(volume.volume_render, jnp.ones((2, 5, 7, 16)),
                         jnp.ones((2, 5, 7, 16, 3)), jnp.ones((2, 5, 7, 17)),
                         jnp.ones((2, 5, 7, 3)), jnp.zeros(3))
    assert out["rgb"].shape == (2, 5, 7, 3)
    assert out["acc"].shape == out["depth"].shape == (2, 5, 7)
    assert out["weights"].shape == (2, 5, 7, 16)
