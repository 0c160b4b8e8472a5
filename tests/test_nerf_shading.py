"""Density-gradient normals, shading modes, backgrounds, and the regularizers."""

import jax
import jax.numpy as jnp
import numpy as np

from lmc_jax.nerf import field as field_lib
from lmc_jax.nerf import regularizers, shading


def _params(module, *args):
    """Random parameters without compiling `module.init` (shapes from eval_shape)."""
    rng = np.random.default_rng(1)
    shapes = jax.eval_shape(module.init, jax.random.PRNGKey(0), *args)

    def draw(s):
        scale = 1.0 / np.sqrt(s.shape[0]) if len(s.shape) == 2 else 0.1
        return jnp.asarray((scale * rng.normal(size=s.shape)).astype(np.float32))

    return jax.tree_util.tree_map(draw, shapes)


def test_normals_of_analytic_density_point_outwards():
    x = np.random.default_rng(0).normal(size=(4, 6, 3)).astype(np.float32)

    @jax.jit
    def go(x):
        def fn(p):
            return jnp.exp(-jnp.sum(p**2, axis=-1)), None

        value, grad, _ = shading.value_and_position_gradient(fn, x)
        return value, grad, shading.normals_from_density_gradient(grad)

    value, grad, n = jax.tree_util.tree_map(np.asarray, go(x))
    np.testing.assert_allclose(grad, -2 * x * value[..., None], rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(n, x / np.linalg.norm(x, axis=-1, keepdims=True), atol=1e-5)


def test_field_normals_match_per_point_gradient():
    field = field_lib.MLPField(width=16, depth=2, max_deg=4)
    means = np.random.default_rng(1).uniform(-1.0, 1.0, (3, 5, 3)).astype(np.float32)
    covs = np.full_like(means, 1e-3)
    params = _params(field, means, covs)

    @jax.jit
    def go(params, means, covs):
        density, albedo, normals = shading.field_with_normals(field, params, means, covs)
        ref_density, ref_albedo = field.apply(params, means, covs)

        def point_density(m, c):
            return field.apply(params, m, c, method=field_lib.MLPField.density)

        grads = jax.vmap(jax.grad(point_density))(means.reshape(-1, 3), covs.reshape(-1, 3))
        ref = -grads / jnp.linalg.norm(grads, axis=-1, keepdims=True)
        return density, albedo, normals, ref_density, ref_albedo, ref.reshape(normals.shape)

    density, albedo, normals, ref_density, ref_albedo, ref = go(params, means, covs)
    np.testing.assert_allclose(np.asarray(density), np.asarray(ref_density), rtol=1e-6)
    np.testing.assert_allclose(np.asarray(albedo), np.asarray(ref_albedo), rtol=1e-6)
    np.testing.assert_allclose(np.asarray(normals), np.asarray(ref), atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(np.asarray(normals), axis=-1), 1.0, atol=1e-5)


def test_normals_have_finite_gradients_where_the_density_is_flat():
    """A zero density gradient (a saturated softplus) gives a zero normal and finite gradients
    (the norm's VJP at 0 is 0/0; it once turned a whole text-to-3D step into NaN)."""
    grads = jnp.array([[0.0, 0.0, 0.0], [3.0, 0.0, 4.0], [1e-30, 0.0, 0.0]])
    n = shading.normals_from_density_gradient(grads)
    np.testing.assert_allclose(n[0], 0.0)
    np.testing.assert_allclose(n[1], [-0.6, 0.0, -0.8], rtol=1e-6)
    w = jnp.array([0.3, -0.2, 0.5])
    jac = jax.grad(lambda g: jnp.sum(shading.normals_from_density_gradient(g) * w))(grads)
    assert np.all(np.isfinite(np.asarray(jac)))
    # Away from 0: d(-g/|g|)/dg . w = -(w - n_hat (n_hat . w)) / |g|, n_hat = g / |g|.
    u = grads[1] / 5.0
    np.testing.assert_allclose(jac[1], -(w - u * jnp.dot(u, w)) / 5.0, rtol=1e-5)


def test_shade_modes():
    albedo = jnp.asarray([[0.2, 0.5, 0.8], [0.2, 0.5, 0.8]])
    normals = jnp.asarray([[0.0, 0.0, 1.0], [0.0, 0.0, -1.0]])
    light = jnp.asarray([[0.0, 0.6, 0.8], [0.0, 0.6, 0.8]])
    shade = jax.jit(shading.shade)
    np.testing.assert_allclose(np.asarray(shade(albedo, normals, light, 0)), np.asarray(albedo))
    lit = np.asarray(shade(albedo, normals, light, 1))
    np.testing.assert_allclose(lit[0], np.asarray(albedo[0]) * (0.1 + 0.9 * 0.8), rtol=1e-6)
    np.testing.assert_allclose(lit[1], np.asarray(albedo[1]) * 0.1, rtol=1e-6)  # facing away
    plain = np.asarray(shade(albedo, normals, light, 2))
    np.testing.assert_allclose(plain, [[0.82] * 3, [0.1] * 3], rtol=1e-6)
    # Per-view modes broadcast: two views, one sample each.
    modes = jnp.asarray([0, 2])[:, None]
    mixed = np.asarray(shade(albedo, normals, light, modes))
    np.testing.assert_allclose(mixed, [np.asarray(albedo[0]), [0.1] * 3], rtol=1e-6)


def test_shading_mode_frequencies():
    probs = (0.2, 0.3, 0.5)
    modes = np.asarray(jax.jit(lambda k: shading.sample_shading_mode(k, probs, (20000,)))(
        jax.random.PRNGKey(0)))
    assert modes.dtype == np.int32
    freq = np.bincount(modes, minlength=3) / modes.size
    np.testing.assert_allclose(freq, probs, atol=0.02)
    only = shading.sample_shading_mode(jax.random.PRNGKey(1), (0.0, 1.0, 0.0), (50,))
    np.testing.assert_array_equal(np.asarray(only), 1)


def test_light_and_backgrounds():
    cam = jnp.asarray([[0.0, 0.0, 2.0], [1.0, 1.0, 0.0]])
    light = shading.sample_light_position(jax.random.PRNGKey(0), cam, (0.8, 1.5), 0.1)
    dist = np.linalg.norm(np.asarray(light), axis=-1) / np.linalg.norm(np.asarray(cam), axis=-1)
    assert np.all((dist >= 0.8) & (dist <= 1.5))
    assert np.all(np.sum(np.asarray(light) * np.asarray(cam), axis=-1) > 0)  # same side
    bg = shading.random_solid_background(jax.random.PRNGKey(1), (4,))
    assert bg.shape == (4, 3) and np.all((np.asarray(bg) >= 0) & (np.asarray(bg) <= 1))
    mlp = shading.BackgroundMLP(width=8)
    dirs = np.random.default_rng(2).normal(size=(2, 3, 4, 3)).astype(np.float32)
    params = _params(mlp, dirs)
    apply = jax.jit(mlp.apply)
    out = np.asarray(apply(params, dirs))
    assert out.shape == (2, 3, 4, 3)
    # A function of the direction only: scaling the direction changes nothing.
    np.testing.assert_allclose(np.asarray(apply(params, 3.0 * dirs)), out, atol=1e-6)
    assert np.std(out.reshape(-1, 3), axis=0).max() > 1e-3  # and it does vary with direction


def test_orientation_loss():
    d = jnp.asarray([[0.0, 0.0, -2.0]])  # not unit: normalized inside
    w = jnp.asarray([[0.25, 0.5]])
    facing = jnp.asarray([[[0.0, 0.0, 1.0], [0.0, 0.0, 1.0]]])
    np.testing.assert_allclose(float(regularizers.orientation_loss(w, facing, d)), 0.0)
    away = jnp.asarray([[[0.0, 0.0, -1.0], [0.0, 0.6, -0.8]]])
    np.testing.assert_allclose(float(regularizers.orientation_loss(w, away, d)),
                               0.25 + 0.5 * 0.64, rtol=1e-6)
    g = jax.grad(regularizers.orientation_loss)(w, away, d)
    np.testing.assert_array_equal(np.asarray(g), 0.0)
    g = jax.grad(regularizers.orientation_loss)(w, away, d, stop_weight_gradient=False)
    np.testing.assert_allclose(np.asarray(g), [[1.0, 0.64]], rtol=1e-6)


def test_opacity_losses():
    acc = jnp.asarray([0.0, 1.0, 0.5, 0.25])
    np.testing.assert_allclose(float(regularizers.opacity_loss(acc)), 0.4375)
    ent = regularizers.opacity_entropy_loss(acc)
    h = -0.25 * np.log(0.25) - 0.75 * np.log(0.75)
    np.testing.assert_allclose(float(ent), (np.log(2.0) + h) / 4, rtol=1e-4)
    assert np.isfinite(np.asarray(jax.grad(regularizers.opacity_entropy_loss)(acc))).all()
