"""The field's initial density blob against its closed forms."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lmc_jax.nerf import field as field_lib


def _points():
    rng = np.random.default_rng(0)
    return jnp.asarray(rng.uniform(-1.0, 1.0, (64, 3)).astype(np.float32))


def test_linear_blob_is_magic3d_and_gaussian_is_dreamfusion():
    x = _points()
    r = np.linalg.norm(np.asarray(x), axis=-1)
    np.testing.assert_allclose(field_lib.density_blob(x, 10.0, 0.5, "linear"),
                               10.0 * (1.0 - r / 0.5), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(field_lib.density_blob(x, 10.0, 0.5, "gaussian"),
                               10.0 * np.exp(-r**2 / (2 * 0.25)), rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(field_lib.density_blob(x, 10.0, 0.5),
                                  field_lib.density_blob(x, 10.0, 0.5, "gaussian"))
    with pytest.raises(ValueError, match="blob shape"):
        field_lib.density_blob(x, 10.0, 0.5, "cubic")


def test_linear_blob_gradient_is_radial_and_finite_at_the_origin():
    """`d/dx A (1 - |x|/R) = -(A/R) x/|x|` away from 0; 0 (not NaN) at the origin, where the
    renderer's normals may ask for it."""
    grad = jax.vmap(jax.grad(lambda p: field_lib.density_blob(p, 10.0, 0.5, "linear")))
    x = _points()
    want = -(10.0 / 0.5) * np.asarray(x) / np.linalg.norm(np.asarray(x), axis=-1, keepdims=True)
    np.testing.assert_allclose(grad(x), want, rtol=1e-4, atol=1e-4)
    assert np.all(np.isfinite(np.asarray(grad(jnp.zeros((1, 3))))))


def test_field_adds_the_chosen_blob_before_softplus():
    """With the density head's weights at 0 and its bias b: `sigma = softplus(b + blob(x))`."""
    x = _points()
    f = field_lib.MLPField(width=8, depth=1, max_deg=2, blob_density=10.0, blob_radius=0.5,
                           blob_shape="linear")
    p = f.init(jax.random.PRNGKey(0), x, jnp.zeros_like(x))
    head = p["params"]["density_head"]
    p = {"params": {**p["params"], "density_head": {"kernel": jnp.zeros_like(head["kernel"]),
                                                    "bias": jnp.full_like(head["bias"], 0.3)}}}
    sigma = f.apply(p, x, jnp.zeros_like(x), method=field_lib.MLPField.density)
    r = np.linalg.norm(np.asarray(x), axis=-1)
    np.testing.assert_allclose(sigma, np.logaddexp(0.0, 0.3 + 10.0 * (1.0 - r / 0.5)),
                               rtol=1e-5, atol=1e-6)
