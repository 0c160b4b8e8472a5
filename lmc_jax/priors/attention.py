"""A faster exact attention for diffusers' Flax UNets, swapped in by `nn.intercept_methods`.

diffusers' `FlaxAttention` computes softmax attention in three full passes over the score
matrix `S = Q K^T / sqrt(d)` [heads, N, M]: the softmax (max, exp, sum), the division by the row
sums, then `P V`. At the tiny SD UNet's 32x32 level (N = M = 1024 tokens, head width 4), the
score matrix is far larger than Q, K, V, so these passes over memory dominate the UNet's time on
CPU. `late_normalized_attention` computes the same function,

    softmax(S) V = (exp(S - m) V) / (exp(S - m) 1),   m = max_j S_ij  (per row),

dividing the [N, d] result instead of the [N, M] matrix: one pass fewer over the largest array.
The row sums `exp(S - m) 1` come out of the same matrix product, as an extra column of ones
appended to V, so no separate reduction pass over the [N, M] matrix is needed either. The row
maximum is a stop-gradient constant (the softmax does not depend on it), so gradients are exact.
Measured on 2 CPU cores (64 heads x 1024 tokens, head width 4, forward): 97 ms, against 101 ms
with a separate row-sum pass and 125 ms for diffusers' softmax (benchmarks/step_time.py reports
the effect on whole guidance steps).

`fast_attention()` is a context manager; inside it, every `FlaxAttention.__call__` of a diffusers
model (self- and cross-attention of the UNet) runs `late_normalized_attention` with the module's
own projection weights. Parameters and their names are unchanged, so any checkpoint works.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp


def late_normalized_attention(q: jax.Array, k: jax.Array, v: jax.Array,
                              scale: float) -> jax.Array:
    """softmax(scale q k^T) v for q [B, N, d], k [B, M, d], v [B, M, e] (B: batch x heads).

    Exact (the row max is subtracted for stability); exp runs in float32, the row sums are the
    last column of `exp(S - m) [V | 1]` (accumulated in float32).
    """
    s = jnp.einsum("bid,bjd->bij", q * jnp.asarray(scale, q.dtype), k)
    m = jax.lax.stop_gradient(jnp.max(s, axis=-1, keepdims=True))
    e = jnp.exp((s - m).astype(jnp.float32)).astype(v.dtype)
    v1 = jnp.concatenate([v, jnp.ones((*v.shape[:-1], 1), v.dtype)], axis=-1)  # [V | 1]
    out = jnp.einsum("bij,bjd->bid", e, v1,  # [exp(S-m) V | exp(S-m) 1]
                     preferred_element_type=jnp.float32)
    return (out[..., :-1] / out[..., -1:]).astype(v.dtype)


def _heads_to_batch(x: jax.Array, heads: int) -> jax.Array:
    b, n, c = x.shape
    return x.reshape(b, n, heads, c // heads).transpose(0, 2, 1, 3).reshape(b * heads, n,
                                                                             c // heads)


def _batch_to_heads(x: jax.Array, heads: int) -> jax.Array:
    bh, n, d = x.shape
    return x.reshape(bh // heads, heads, n, d).transpose(0, 2, 1, 3).reshape(bh // heads, n,
                                                                             heads * d)


def _attention_call(module: Any, hidden_states: jax.Array, context: jax.Array | None = None,
                    deterministic: bool = True) -> jax.Array:
    """`FlaxAttention.__call__` with `late_normalized_attention` (same weights, same result)."""
    context = hidden_states if context is None else context
    h = module.heads
    q = _heads_to_batch(module.query(hidden_states), h)
    k = _heads_to_batch(module.key(context), h)
    v = _heads_to_batch(module.value(context), h)
    out = _batch_to_heads(late_normalized_attention(q, k, v, module.dim_head ** -0.5), h)
    return module.dropout_layer(module.proj_attn(out), deterministic=deterministic)


def _is_diffusers_attention(module: Any) -> bool:
    cls = type(module)
    return cls.__name__ == "FlaxAttention" and cls.__module__.startswith("diffusers.")


def _interceptor(next_fun, args, kwargs, context):
    if context.method_name == "__call__" and _is_diffusers_attention(context.module):
        return _attention_call(context.module, *args, **kwargs)
    return next_fun(*args, **kwargs)


@contextlib.contextmanager
def fast_attention(enabled: bool = True) -> Iterator[None]:
    """Inside (at trace time), diffusers' Flax attention runs `late_normalized_attention`."""
    if not enabled:
        yield
        return
    with nn.intercept_methods(_interceptor):
        yield
