"""Where to sample along rays: the scene sphere, stratified samples, importance resampling.

The scene is bounded by a sphere of radius R at the origin. Samples are interval *edges*
`t_0 <= ... <= t_N` (N + 1 values, N frustums), as in mip-NeRF, so the coarse-to-fine pass
resamples edges from the piecewise-constant PDF that the coarse weights define on the
intervals.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from lmc_jax.nerf import _random

_EPS = jnp.finfo(jnp.float32).eps


def intersect_sphere(origins, directions, radius, min_near=0.0):
    """Near and far distances of rays through the sphere |x| = radius.

    Solves `|o + t d|^2 = R^2`, i.e. `a t^2 + 2 b t + c = 0` with `a = d.d`, `b = o.d`,
    `c = o.o - R^2`: `t = (-b -+ sqrt(b^2 - a c)) / a`. `near` is clamped to `min_near` (an
    origin inside the sphere starts at `min_near`). A ray that misses the sphere, or whose
    chord lies entirely before `min_near`, gets the safe empty interval `near = far = t*`
    with `t* = max(min_near, -b / a)` (the point of closest approach): every frustum then has
    zero length, so rendering gives zero weights (pure background) and no NaNs.

    Args:
      origins: [..., 3] ray origins.
      directions: [..., 3] ray directions (need not be unit; t is in units of |d|).
      radius: sphere radius R.
      min_near: smallest allowed near distance.

    Returns:
      near: [...], far: [...] with near <= far, and hit: [...] bool.
    """
    a = jnp.maximum(_EPS, jnp.sum(directions**2, axis=-1))
    b = jnp.sum(origins * directions, axis=-1)
    c = jnp.sum(origins**2, axis=-1) - radius**2
    disc = b**2 - a * c
    root = jnp.sqrt(jnp.maximum(disc, 0.0))
    t_minus = (-b - root) / a
    t_plus = (-b + root) / a
    near = jnp.maximum(t_minus, min_near)
    far = t_plus
    hit = (disc >= 0.0) & (far > near)
    t_star = jnp.maximum(-b / a, min_near)
    near = jnp.where(hit, near, t_star)
    far = jnp.where(hit, far, t_star)
    return near, far, hit


def sample_stratified(key, near, far, num_samples, randomized=True):
    """Stratified t-edges between near and far (the coarse pass).

    The interval is split into `num_samples` equal bins; with `randomized` every interior
    edge is jittered uniformly between the midpoints of its two neighbouring bins, which keeps
    the edges sorted, and the end edges stay at `t_0 = near`, `t_N = far`.

    Args:
      key: PRNG key (unused when not randomized; may be None then).
      near, far: [...] interval per ray.
      num_samples: number of intervals N (static).
      randomized: jitter the edges.

    Returns:
      t_edges: [..., num_samples + 1] sorted, within [near, far].
    """
    s = jnp.linspace(0.0, 1.0, num_samples + 1, dtype=near.dtype)
    s = jnp.broadcast_to(s, near.shape + (num_samples + 1,))
    if randomized:
        mids = 0.5 * (s[..., 1:] + s[..., :-1])
        lower = jnp.concatenate([s[..., :1], mids[..., :-1], s[..., -1:]], axis=-1)
        upper = jnp.concatenate([s[..., :1], mids[..., 1:], s[..., -1:]], axis=-1)
        u = _random.uniform(key, s.shape, near.dtype)
        s = lower + (upper - lower) * u
    return near[..., None] + (far - near)[..., None] * s


def blur_weights(weights, padding=0.01):
    """Mip-NeRF's weight smoothing before resampling: 2-tap max, then 2-tap mean, plus padding.

    `w'_i = (max(w_{i-1}, w_i) + max(w_i, w_{i+1})) / 2 + padding` (edges replicated), which
    widens the PDF around surfaces and keeps every interval reachable.

    Args:
      weights: [..., N] non-negative.

    Returns:
      [..., N] smoothed weights.
    """
    pad = jnp.concatenate([weights[..., :1], weights, weights[..., -1:]], axis=-1)
    w_max = jnp.maximum(pad[..., :-1], pad[..., 1:])
    return 0.5 * (w_max[..., :-1] + w_max[..., 1:]) + padding


def _take(x, idx):
    return jnp.take_along_axis(x, idx, axis=-1)


def sample_pdf(key, bins, weights, num_samples, randomized=True, search_method="scan"):
    """Inverse-CDF samples of the piecewise-constant PDF with mass `weights_i` on bin i.

    `cdf_0 = 0`, `cdf_{i+1} = sum_{j<=i} w_j / sum_j w_j`; for `u` in [0, 1) find i with
    `cdf_i <= u < cdf_{i+1}` and return `t = bins_i + (u - cdf_i)/(cdf_{i+1} - cdf_i)
    (bins_{i+1} - bins_i)`. The u's are stratified (`u_k = (k + xi_k)/M`, `xi ~ U[0, 1)`, or
    evenly spaced over [0, 1] when not randomized), so the samples come out sorted. Zero-weight
    bins are never sampled; all-zero weights fall back to equal mass per bin.

    Args:
      key: PRNG key (unused when not randomized).
      bins: [..., N + 1] sorted bin edges (same leading shape as weights).
      weights: [..., N] non-negative bin masses.
      num_samples: M, number of samples (static).
      randomized: stratified jitter of the u's.
      search_method: `jnp.searchsorted` method. "scan" (binary search) was the fastest here
        on CPU (8192 rays, N = 32, M = 33: 23 ms vs 75 ms "compare_all", 126 ms "sort");
        "compare_all" needs O(N M) memory per ray but may be faster on accelerators.

    Returns:
      [..., M] sorted samples in [bins_0, bins_N].
    """
    n = weights.shape[-1]
    weights = jnp.maximum(weights, 0.0)
    w_sum = jnp.sum(weights, axis=-1, keepdims=True)
    weights = weights + jnp.maximum(0.0, _EPS - w_sum) / n
    cdf = jnp.cumsum(weights, axis=-1) / jnp.sum(weights, axis=-1, keepdims=True)
    zeros, ones = jnp.zeros_like(cdf[..., :1]), jnp.ones_like(cdf[..., :1])
    cdf = jnp.concatenate([zeros, jnp.minimum(1.0, cdf[..., :-1]), ones], axis=-1)
    batch_shape = weights.shape[:-1]
    if randomized:
        step = 1.0 / num_samples
        jitter = _random.uniform(key, batch_shape + (num_samples,), bins.dtype,
                                 maxval=step - _EPS)
        u = jnp.arange(num_samples, dtype=bins.dtype) * step + jitter
    else:
        u = jnp.linspace(0.0, 1.0 - _EPS, num_samples, dtype=bins.dtype)
        u = jnp.broadcast_to(u, batch_shape + (num_samples,))
    flat_cdf = jnp.reshape(cdf, (-1, n + 1))
    flat_u = jnp.reshape(u, (-1, num_samples))
    idx = jax.vmap(lambda c, v: jnp.searchsorted(c, v, side="right", method=search_method))(
        flat_cdf, flat_u)
    idx = jnp.reshape(jnp.clip(idx - 1, 0, n - 1), u.shape)
    c0, c1 = _take(cdf, idx), _take(cdf, idx + 1)
    b0, b1 = _take(bins, idx), _take(bins, idx + 1)
    frac = jnp.clip((u - c0) / jnp.maximum(_EPS, c1 - c0), 0.0, 1.0)
    return b0 + frac * (b1 - b0)


def resample_along_rays(key, t_edges, weights, num_samples, randomized=True, blur=True,
                        padding=0.01):
    """Coarse-to-fine importance resampling of t-edges (mip-NeRF's hierarchical sampling).

    Args:
      key: PRNG key.
      t_edges: [..., N + 1] coarse edges.
      weights: [..., N] coarse rendering weights.
      num_samples: number of fine intervals M (returns M + 1 edges).
      randomized: stratified jitter.
      blur: apply `blur_weights` (with `padding`) first; otherwise add `padding` only.
      padding: constant added to every weight.

    Returns:
      [..., M + 1] sorted fine edges, with `stop_gradient` (the resampled positions are not
      differentiated; gradients flow through the fine pass's densities instead).
    """
    weights = jax.lax.stop_gradient(weights)
    weights = blur_weights(weights, padding) if blur else weights + padding
    t_new = sample_pdf(key, jax.lax.stop_gradient(t_edges), weights, num_samples + 1, randomized)
    return jax.lax.stop_gradient(jnp.sort(t_new, axis=-1))
