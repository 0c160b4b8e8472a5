"""Tests of the deficiency model `b_psi` (lmc_jax.bias.model)."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lmc_jax.bias import BiasNet, bias_fn_from, param_count, receptive_field, timestep_embedding

T2 = jnp.array([50, 800])


@functools.cache
def _jitted(module: BiasNet, method: str = "apply"):
    """One jitted `module.init` / `module.apply` per module config (compiles are the cost)."""
    return jax.jit(getattr(module, method))


def _init(module: BiasNet, c: int, emb_shape: tuple[int, ...] | None = None, hw: int = 32):
    x = jnp.zeros((2, hw, hw, c), jnp.float32)
    emb = None if emb_shape is None else jnp.zeros((2, *emb_shape), jnp.float32)
    return _jitted(module, "init")(jax.random.PRNGKey(0), x, T2, emb)["params"]


def _perturb(params, seed: int = 1, scale: float = 0.1):
    """params + scale * N(0, 1) on every leaf, so that conv_out and FiLM are non-zero."""
    leaves, treedef = jax.tree_util.tree_flatten(params)
    keys = jax.random.split(jax.random.PRNGKey(seed), len(leaves))
    noisy = [p + scale * jax.random.normal(k, p.shape, p.dtype)
             for p, k in zip(leaves, keys, strict=True)]
    return jax.tree_util.tree_unflatten(treedef, noisy)


def _b(module: BiasNet, params):
    """`b(x, t, emb=None)` through the cached jitted apply."""
    return lambda x, t, emb=None: _jitted(module)({"params": params}, x, t, emb)


def _x(c: int, b: int = 2, hw: int = 32, seed: int = 2) -> jax.Array:
    return jax.random.normal(jax.random.PRNGKey(seed), (b, hw, hw, c), jnp.float32)


@pytest.fixture(scope="module")
def net3():
    module = BiasNet()
    return module, _perturb(_init(module, 3))


def test_timestep_embedding_formula():
    t = jnp.array([0, 7, 999])
    e = np.asarray(timestep_embedding(t, 6))
    w = 10000.0 ** (-np.arange(3) / 3)
    ref = np.concatenate([np.cos(np.outer([0, 7, 999], w)), np.sin(np.outer([0, 7, 999], w))], 1)
    np.testing.assert_allclose(e, ref, rtol=1e-5, atol=1e-5)
    assert timestep_embedding(t, 7).shape == (3, 7)


@pytest.mark.parametrize("c", [3, 4])
def test_shapes_dtypes_and_identity_at_init(c):
    module = BiasNet(padding="REFLECT")
    params = _init(module, c)
    x = _x(c)
    b = _b(module, params)(x, T2)
    assert b.shape == (2, 32, 32, c) and b.dtype == jnp.float32
    # conv_out starts at zero: b = x exactly at initialization.
    np.testing.assert_array_equal(np.asarray(b), np.asarray(x))


@pytest.mark.parametrize("padding,c", [("CIRCULAR", 3), ("REFLECT", 4), ("SAME", 4)])
def test_affine_equivariance(padding, c):
    module = BiasNet(padding=padding)
    params = _perturb(_init(module, c))
    b = _b(module, params)
    x = _x(c)
    gain = jnp.array([0.3, 1.0, 2.5, 7.0])[:c]  # per-channel gain > 0
    offset = jnp.array([-3.0, 0.0, 0.7, 4.0])[:c]  # per-channel offset
    lhs, rhs = np.asarray(b(gain * x + offset, T2)), np.asarray(gain * b(x, T2) + offset)
    assert np.abs(lhs - rhs).max() < 1e-4 * np.abs(rhs).max()
    # the residual branch is non-trivial (else equivariance would be vacuous)
    assert np.abs(np.asarray(b(x, T2) - x)).max() > 1e-2


def test_affine_equivariance_fails_without_normalization():
    module = BiasNet(normalize=False)
    b = _b(module, _perturb(_init(module, 3)))
    x = _x(3)
    lhs, rhs = np.asarray(b(2.0 * x + 1.0, T2)), np.asarray(2.0 * b(x, T2) + 1.0)
    assert np.abs(lhs - rhs).max() > 1e-2 * np.abs(rhs).max()


def test_uncentred_normalization_is_scale_equivariant_with_a_dc_map():
    module = BiasNet(center=False)
    params0 = _init(module, 3)
    b = _b(module, _perturb(params0))
    x = _x(3)
    c = jnp.array([0.5, 1.0, 3.0])
    ref = np.asarray(c * b(x, T2))
    np.testing.assert_allclose(np.asarray(b(c * x, T2)), ref, rtol=0,
                               atol=1e-4 * np.abs(ref).max())
    shifted, ref = np.asarray(b(x + 1.0, T2)), np.asarray(b(x, T2) + 1.0)
    assert np.abs(shifted - ref).max() > 1e-2  # the mean is seen: no shift equivariance
    # the DC map represents a DC gain g exactly: K = (g - 1) I gives mean(b) = g mean(x)
    g = 0.25
    params0["dc_map"]["bias"] = jnp.asarray((g - 1.0) * np.eye(3).ravel(), jnp.float32)
    xm = np.asarray(x + 0.5)
    y = np.asarray(_b(module, params0)(x + 0.5, T2))
    np.testing.assert_allclose(y.mean(axis=(1, 2)), g * xm.mean(axis=(1, 2)), atol=1e-5)
    np.testing.assert_allclose(y - y.mean(axis=(1, 2), keepdims=True),
                               xm - xm.mean(axis=(1, 2), keepdims=True), atol=1e-5)


def test_constant_image_is_finite(net3):
    module, params = net3
    x = jnp.full((2, 32, 32, 3), 0.37, jnp.float32)

    @jax.jit
    def value_and_vjp(xx):
        out, vjp = jax.vjp(lambda z: module.apply({"params": params}, z, T2), xx)
        return out, vjp(jnp.ones_like(out))[0]

    out, g = value_and_vjp(x)
    np.testing.assert_allclose(np.asarray(out), 0.37, atol=1e-3)
    assert np.all(np.isfinite(np.asarray(g)))


def test_receptive_field_at_least_17(net3):
    module, params = net3
    rh, rw = receptive_field(module, params, (64, 64, 3))
    assert rh >= 17 and rw >= 17, (rh, rw)
    assert rh < 64 and rw < 64  # the local path is local: statistics really are frozen
    # the local-path field of the init (identity) map is a single pixel: the measure can fail
    assert receptive_field(module, _init(module, 3), (64, 64, 3)) == (1, 1)


def test_freeze_stats_keeps_values(net3):
    module, params = net3
    x = _x(3)
    full = _b(module, params)(x, T2)
    frozen = _b(module.clone(freeze_stats=True), params)(x, T2)
    np.testing.assert_allclose(np.asarray(full), np.asarray(frozen), rtol=1e-6, atol=1e-6)


def test_output_depends_on_t(net3):
    module, params = net3
    b = _b(module, params)
    x1 = _x(3, b=1)
    x = jnp.concatenate([x1, x1])
    lo, hi = np.asarray(b(x, jnp.array([10, 10]))), np.asarray(b(x, jnp.array([900, 900])))
    assert np.abs(lo - hi).max() > 1e-2 * np.abs(lo).max()
    # a batch holds independent timesteps: row i of a mixed batch = the single-t result
    both = np.asarray(b(x, jnp.array([10, 900])))
    np.testing.assert_allclose(both[0], lo[0], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(both[1], hi[1], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("emb_shape", [(16,), (5, 16)])
def test_conditional_depends_on_emb(emb_shape):
    module = BiasNet(conditional=True)
    params = _perturb(_init(module, 4, emb_shape))
    b = _b(module, params)
    x, t = _x(4), jnp.array([300, 300])
    e1 = jax.random.normal(jax.random.PRNGKey(5), (2, *emb_shape))
    e2 = jax.random.normal(jax.random.PRNGKey(6), (2, *emb_shape))
    y1, y2 = np.asarray(b(x, t, e1)), np.asarray(b(x, t, e2))
    assert y1.shape == (2, 32, 32, 4)
    assert np.abs(y1 - y2).max() > 1e-2 * np.abs(y1).max()
    with pytest.raises(ValueError, match="needs `emb`"):
        module.apply({"params": params}, x, t)


def test_bias_fn_from_casts_to_float32_and_ignores_emb_when_unconditional(net3):
    module, params = net3
    b = jax.jit(bias_fn_from(module, params))  # the interface guidance code consumes
    x = _x(3).astype(jnp.bfloat16)
    y = b(x, T2)
    assert y.shape == (2, 32, 32, 3) and y.dtype == jnp.float32
    np.testing.assert_array_equal(np.asarray(y), np.asarray(b(x, T2, jnp.ones((2, 7)))))


@pytest.mark.parametrize("c", [3, 4])
def test_parameter_count(c):
    n = param_count(_init(BiasNet(), c))
    assert 5_000 <= n <= 200_000, n


def test_bad_inputs():
    with pytest.raises(ValueError, match="unknown padding"):
        _init(BiasNet(padding="ZEROS"), 3)
    with pytest.raises(ValueError, match="divisible by 4"):
        _init(BiasNet(), 3, hw=30)


def test_jitted_vjp_matches_float64_finite_differences(net3):
    module, params = net3
    x, t = _x(3, b=1, hw=16), jnp.array([400])
    v = jax.random.normal(jax.random.PRNGKey(7), x.shape)  # direction of the derivative
    w = jax.random.normal(jax.random.PRNGKey(8), x.shape)  # cotangent = output projection
    b = bias_fn_from(module, params)

    @jax.jit
    def value_and_vjp32(xx):
        y, vjp = jax.vjp(lambda z: b(z, t), xx)
        return y, vjp(w)[0]

    y32, g32 = (np.asarray(a) for a in value_and_vjp32(x))
    assert y32.dtype == np.float32 and g32.dtype == np.float32

    with jax.enable_x64(True):
        p64 = jax.tree_util.tree_map(lambda a: jnp.asarray(a, jnp.float64), params)
        x64, v64, w64 = (jnp.asarray(a, jnp.float64) for a in (x, v, w))

        @jax.jit
        def phi(xx):  # scalar projection <w, b(x)>, and b(x)
            y = module.apply({"params": p64}, xx, t)
            return jnp.vdot(w64, y), y

        (_, y64), g64 = jax.jit(jax.value_and_grad(phi, has_aux=True))(x64)  # VJP, cotangent w
        assert g64.dtype == jnp.float64
        h = 1e-5
        fd = (phi(x64 + h * v64)[0] - phi(x64 - h * v64)[0]) / (2 * h)
        np.testing.assert_allclose(float(jnp.vdot(g64, v64)), float(fd), rtol=1e-7)
        # the jitted float32 value and VJP agree with float64 to float32 accuracy
        np.testing.assert_allclose(y32, np.asarray(y64), rtol=0, atol=1e-5 * np.abs(y64).max())
        np.testing.assert_allclose(g32, np.asarray(g64), rtol=0, atol=1e-4 * np.abs(g64).max())


def _vjp_all(f, args, ct):
    out, vjp = jax.vjp(f, *args)
    return out, vjp(ct)


@pytest.mark.parametrize("freeze", [False, True])
def test_norm_film_silu_matches_autodiff_of_the_plain_formula(freeze):
    """The hand-written VJP of `silu(GroupNorm(h)(1 + gamma) + beta)` (all five inputs) against
    autodiff of the textbook formula with reduction-based statistics, in float64."""
    from lmc_jax.bias.model import norm_film_silu

    def plain(h, scale, bias, gamma, beta):
        hg = h.reshape(2, 8, 8, 4, 3)  # 12 channels in 4 groups
        sg = jax.lax.stop_gradient if freeze else (lambda v: v)
        mean = sg(hg.mean(axis=(1, 2, 4), keepdims=True))
        var = sg(hg.var(axis=(1, 2, 4), keepdims=True))
        y = ((hg - mean) / jnp.sqrt(var + 1e-5)).reshape(h.shape) * scale + bias
        return jax.nn.silu(y * (1.0 + gamma) + beta)

    with jax.enable_x64(True):
        ks = jax.random.split(jax.random.PRNGKey(0), 6)
        h = 2.0 * jax.random.normal(ks[0], (2, 8, 8, 12), jnp.float64) + 0.7
        scale, bias = 1.0 + jax.random.normal(ks[1], (12,)), jax.random.normal(ks[2], (12,))
        gamma = 0.5 * jax.random.normal(ks[3], (2, 1, 1, 12))
        beta = jax.random.normal(ks[4], (2, 1, 1, 12))
        ct = jax.random.normal(ks[5], h.shape, jnp.float64)
        args = (h, scale, bias, gamma, beta)
        out, grads = _vjp_all(lambda *a: norm_film_silu(*a, 4, 1e-5, freeze), args, ct)
        ref_out, ref_grads = _vjp_all(plain, args, ct)
        np.testing.assert_allclose(np.asarray(out), np.asarray(ref_out), rtol=1e-12, atol=1e-12)
        for g, r in zip(grads, ref_grads, strict=True):
            assert g.shape == r.shape
            np.testing.assert_allclose(np.asarray(g), np.asarray(r), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("padding,r", [("REFLECT", 1), ("REFLECT", 2), ("CIRCULAR", 1),
                                       ("CIRCULAR", 3)])
def test_padding_vjp_matches_autodiff_of_jnp_pad(padding, r):
    from lmc_jax.bias.model import _pad

    h = jax.random.normal(jax.random.PRNGKey(0), (2, 7, 9, 3))
    ct = jax.random.normal(jax.random.PRNGKey(1), (2, 7 + 2 * r, 9 + 2 * r, 3))
    mode = {"REFLECT": "reflect", "CIRCULAR": "wrap"}[padding]
    out, (g,) = _vjp_all(lambda z: _pad(z, r, padding), (h,), ct)
    ref, (g_ref,) = _vjp_all(lambda z: jnp.pad(z, ((0, 0), (r, r), (r, r), (0, 0)), mode=mode),
                             (h,), ct)
    np.testing.assert_array_equal(np.asarray(out), np.asarray(ref))
    np.testing.assert_allclose(np.asarray(g), np.asarray(g_ref), rtol=1e-6, atol=1e-6)


def test_pooling_upsampling_and_means_match_their_reduction_forms():
    from lmc_jax.bias.model import _avg_pool2, _upsample2, group_mean, spatial_mean

    h = jax.random.normal(jax.random.PRNGKey(0), (2, 6, 4, 8))
    ct = jax.random.normal(jax.random.PRNGKey(1), (2, 12, 8, 8))
    np.testing.assert_allclose(np.asarray(_avg_pool2(h)),
                               np.asarray(h.reshape(2, 3, 2, 2, 2, 8).mean(axis=(2, 4))),
                               rtol=1e-6, atol=1e-6)
    up = lambda z: jnp.repeat(jnp.repeat(z, 2, axis=1), 2, axis=2)
    out, (g,) = _vjp_all(_upsample2, (h,), ct)
    ref, (g_ref,) = _vjp_all(up, (h,), ct)
    np.testing.assert_array_equal(np.asarray(out), np.asarray(ref))
    np.testing.assert_allclose(np.asarray(g), np.asarray(g_ref), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(np.asarray(spatial_mean(h)), np.asarray(h.mean(axis=(1, 2))),
                               rtol=1e-6, atol=1e-6)
    ref = np.asarray(h).reshape(2, 24, 2, 4).mean(axis=(1, 3))  # 2 groups of 4 channels
    np.testing.assert_allclose(np.asarray(group_mean(h, 2))[:, 0, 0],
                               np.repeat(ref, 4, axis=-1), rtol=1e-6, atol=1e-6)
