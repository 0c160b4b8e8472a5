"""lmc_jax.priors.attention: the late-normalized attention is softmax attention, in the UNet too."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lmc_jax import _compat
from lmc_jax.errors import UserError
from lmc_jax.priors import attention
from lmc_jax.priors.sd import TINY_UNET, tiny_sd_prior


def _reference(q, k, v, scale):
    """Softmax attention in float64 numpy, one (batch, query) row at a time."""
    q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))
    out = np.zeros(q.shape[:2] + v.shape[-1:])
    for b in range(q.shape[0]):
        for i in range(q.shape[1]):
            s = scale * k[b] @ q[b, i]
            p = np.exp(s - s.max())
            out[b, i] = (p / p.sum()) @ v[b]
    return out


@pytest.mark.parametrize("magnitude", [1.0, 300.0])
def test_matches_softmax_attention(magnitude):
    rs = np.random.RandomState(0)
    q = magnitude * rs.randn(3, 5, 4).astype(np.float32)
    k, v = rs.randn(3, 7, 4).astype(np.float32), rs.randn(3, 7, 6).astype(np.float32)
    got = attention.late_normalized_attention(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), 0.5)
    assert np.all(np.isfinite(got))  # scores of ~1000 would overflow exp without the row max
    np.testing.assert_allclose(got, _reference(q, k, v, 0.5), rtol=2e-4, atol=2e-5)


def test_unet_unchanged_and_attention_replaced(monkeypatch):
    d = _compat.diffusers()
    unet = d.FlaxUNet2DConditionModel(sample_size=8, **TINY_UNET)
    # Random weights of the right shapes (running the initializers costs ~25 s).
    shapes = jax.eval_shape(unet.init_weights, jax.random.PRNGKey(0))
    rw = np.random.RandomState(0)
    params = jax.tree_util.tree_map(
        lambda s: jnp.asarray(rw.randn(*s.shape).astype(np.float32)
                              / np.sqrt(max(np.prod(s.shape[:-1]), 1))), shapes)
    rs = np.random.RandomState(1)
    x = jnp.asarray(rs.randn(2, 4, 8, 8).astype(np.float32))
    emb = jnp.asarray(rs.randn(2, 5, TINY_UNET["cross_attention_dim"]).astype(np.float32))
    t = jnp.asarray([10, 700])

    calls = []
    original = attention.late_normalized_attention

    def counting(*args):
        calls.append(args[0].shape)
        return original(*args)

    monkeypatch.setattr(attention, "late_normalized_attention", counting)

    def eps(fast):  # eager: compiling the UNet twice would cost ~50 s
        with attention.fast_attention(fast):
            return unet.apply({"params": params}, x, t, emb).sample

    ref, fast = eps(False), eps(True)
    # A self- and a cross-attention in each transformer block: 1 down, 1 in the middle, 2 up.
    assert len(calls) == 8
    np.testing.assert_allclose(fast, ref, rtol=1e-4, atol=1e-5 * float(jnp.abs(ref).max()))


def test_gradients_match_softmax_attention():
    """The row max is a stop-gradient constant: gradients are those of plain softmax attention."""
    rs = np.random.RandomState(2)
    q, k, v = (jnp.asarray(rs.randn(2, n, 3).astype(np.float32)) for n in (4, 6, 6))

    def plain(q, k, v):
        return jax.nn.softmax(0.7 * jnp.einsum("bid,bjd->bij", q, k), axis=-1) @ v

    def loss(f):
        return lambda q, k, v: jnp.sum(jnp.sin(3.0 * f(q, k, v)))

    late = lambda q, k, v: attention.late_normalized_attention(q, k, v, 0.7)  # noqa: E731
    for g_late, g_plain in zip(jax.grad(loss(late), (0, 1, 2))(q, k, v),
                               jax.grad(loss(plain), (0, 1, 2))(q, k, v), strict=True):
        np.testing.assert_allclose(g_late, g_plain, rtol=1e-4, atol=1e-6)


def test_unknown_attention_is_refused():
    with pytest.raises(UserError, match="late_norm"):
        tiny_sd_prior(image_size=16, attention="flash")
