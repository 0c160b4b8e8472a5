"""End-to-end rendering of a field: shapes, jit, and gradients against finite differences."""

import functools

import jax
import jax.numpy as jnp
import numpy as np

from lmc_jax.nerf import cameras, renderer
from lmc_jax.nerf import field as field_lib


@functools.partial(jax.jit, static_argnums=(0, 1, 2))
def _rays(h, w, batch):
    cams = cameras.sample_orbit_cameras(jax.random.PRNGKey(0), batch, distance_range=(1.5, 2.0))
    o, d, r = cameras.generate_rays(cams["c2w"], cams["fovy"], h, w)
    return cams, o, d, r


def _params(field, points, dtype=np.float32):
    """Random field parameters without compiling `field.init` (shapes from eval_shape)."""
    rng = np.random.default_rng(1)
    shapes = jax.eval_shape(field.init, jax.random.PRNGKey(0), points, points)

    def draw(s):
        scale = 1.0 / np.sqrt(s.shape[0]) if len(s.shape) == 2 else 0.1
        return jnp.asarray((scale * rng.normal(size=s.shape)).astype(dtype))

    return jax.tree_util.tree_map(draw, shapes)


def test_render_rays_jit_shapes_modes_and_gradients():
    field = field_lib.MLPField(width=16, depth=2, max_deg=4)
    cams, o, d, r = _rays(4, 4, 2)
    params = _params(field, o[..., None, :])
    modes = jnp.asarray([0, 2])
    bg = jnp.asarray([[0.0, 1.0, 0.0], [1.0, 0.0, 1.0]])

    @jax.jit
    @functools.partial(jax.value_and_grad, has_aux=True)
    def go(params, key):
        out = renderer.render_rays(field, params, key, o, d, r, num_coarse=8, num_fine=8,
                                   shading_mode=modes[:, None, None],
                                   light_position=cams["c2w"][:, None, None, :3, 3],
                                   background=bg[:, None, None])
        return jnp.sum(out["rgb"]), out

    (_, out), grads = go(params, jax.random.PRNGKey(2))
    assert out["rgb"].shape == (2, 4, 4, 3) and out["acc"].shape == (2, 4, 4)
    assert out["weights"].shape == (2, 4, 4, 8) and out["t_edges"].shape == (2, 4, 4, 9)
    assert out["normals"].shape == (2, 4, 4, 8, 3) and out["normal_map"].shape == (2, 4, 4, 3)
    for v in jax.tree_util.tree_leaves((out, grads)):
        assert np.all(np.isfinite(np.asarray(v)))
    acc = np.asarray(out["acc"])[1]
    # View 1 is textureless: grey wherever the background does not show.
    grey = np.asarray(out["rgb"])[1] - (1 - acc)[..., None] * np.asarray(bg[1])
    np.testing.assert_allclose(grey[..., 0], grey[..., 1], atol=1e-5)
    np.testing.assert_allclose(grey[..., 0], grey[..., 2], atol=1e-5)
    # The blob makes the initial field opaque in the middle of the image.
    assert acc[1:3, 1:3].min() > 0.5
    # Fine edges are sorted and inside the scene sphere.
    t = np.asarray(out["t_edges"])
    assert np.all(np.diff(t, axis=-1) >= 0)
    assert np.all(t >= np.asarray(cams["distance"])[:, None, None, None] - 1.0 - 1e-4)
    assert any(np.abs(np.asarray(g)).max() > 0 for g in jax.tree_util.tree_leaves(grads))


def test_render_gradient_matches_finite_differences():
    with jax.enable_x64(True):
        field = field_lib.MLPField(width=6, depth=2, max_deg=3, blob_density=2.0)
        _, o, d, r = _rays(2, 2, 1)
        o, d, r = (jnp.asarray(x, jnp.float64) for x in (o, d, r))
        params = _params(field, o[..., None, :], np.float64)
        rng = np.random.default_rng(0)
        target = jnp.asarray(rng.random((1, 2, 2, 3)))
        light = jnp.asarray([1.0, 2.0, 2.0], jnp.float64)

        # num_fine=0: the sample positions do not depend on the parameters, so the analytic
        # gradient is the full derivative. Lambertian shading (albedo times light) also
        # differentiates through the density-gradient normals.
        @jax.jit
        @jax.value_and_grad
        def loss(p):
            out = renderer.render_rays(field, p, None, o, d, r, num_coarse=6,
                                       num_fine=0, randomized=False, shading_mode=1,
                                       light_position=light, background=jnp.full(3, 0.3))
            return jnp.sum((out["rgb"] - target) ** 2) + jnp.sum(out["depth"] ** 2)

        direction = jax.tree_util.tree_map(lambda x: jnp.asarray(rng.normal(size=x.shape)),
                                           params)
        _, grad = loss(params)
        analytic = sum(jnp.vdot(g, v) for g, v in zip(
            jax.tree_util.tree_leaves(grad), jax.tree_util.tree_leaves(direction), strict=True))
        step = 1e-6
        plus = jax.tree_util.tree_map(lambda x, v: x + step * v, params, direction)
        minus = jax.tree_util.tree_map(lambda x, v: x - step * v, params, direction)
        numeric = (loss(plus)[0] - loss(minus)[0]) / (2 * step)
        assert abs(float(analytic)) > 1e-3
        np.testing.assert_allclose(float(analytic), float(numeric), rtol=1e-6)
