"""The volume-rendering equation (NeRF, Mildenhall et al. 2020, Equation 3).

For samples i = 0..N-1 on a ray with density sigma_i over the interval [t_i, t_{i+1}]:

    delta_i = (t_{i+1} - t_i) |d|
    alpha_i = 1 - exp(-sigma_i delta_i)
    T_i     = prod_{j<i} (1 - alpha_j) = exp(-sum_{j<i} sigma_j delta_j)
    w_i     = alpha_i T_i

and the composites

    acc   = sum_i w_i                         (accumulated opacity, = 1 - T_N <= 1)
    C     = sum_i w_i c_i + (1 - acc) bg      (colour over a background)
    depth = sum_i w_i t_mid_i / acc           (expected termination distance)

T_i is computed from the cumulative sum of sigma delta (the stable form; the product of
(1 - alpha_j) loses precision when many alphas are near 1).
"""

from __future__ import annotations

import jax.numpy as jnp

_EPS = jnp.finfo(jnp.float32).eps


def compute_alpha_weights(density, t_edges, directions):
    """Per-sample opacity, transmittance and rendering weight.

    Args:
      density: [..., N] non-negative densities sigma_i.
      t_edges: [..., N + 1] sorted interval edges.
      directions: [..., 3] ray directions; t is measured in units of |d|.

    Returns:
      weights: [..., N] `w_i = alpha_i T_i`.
      alpha: [..., N] `1 - exp(-sigma_i delta_i)`.
      trans: [..., N] `T_i = exp(-sum_{j<i} sigma_j delta_j)`.
    """
    delta = (t_edges[..., 1:] - t_edges[..., :-1]) * jnp.linalg.norm(
        directions[..., None, :], axis=-1)
    density_delta = density * delta
    alpha = 1.0 - jnp.exp(-density_delta)
    trans = jnp.exp(-jnp.concatenate(
        [jnp.zeros_like(density_delta[..., :1]),
         jnp.cumsum(density_delta[..., :-1], axis=-1)], axis=-1))
    return alpha * trans, alpha, trans


def composite(weights, rgb, t_edges, background=None):
    """Composites per-sample colours along rays.

    Args:
      weights: [..., N] rendering weights.
      rgb: [..., N, C] per-sample colours (C is usually 3).
      t_edges: [..., N + 1] interval edges (for depth).
      background: optional [..., C] (or broadcastable, e.g. [C]) background colour; when given,
        `C = sum_i w_i c_i + (1 - acc) bg`.

    Returns:
      dict with `rgb` [..., C], `acc` [...], `depth` [...] (expected distance of the visible
      surface, clipped to [t_0, t_N]; t_N where nothing is hit).
    """
    acc = jnp.sum(weights, axis=-1)
    color = jnp.sum(weights[..., None] * rgb, axis=-2)
    if background is not None:
        color = color + (1.0 - acc)[..., None] * background
    t_mid = 0.5 * (t_edges[..., 1:] + t_edges[..., :-1])
    depth = jnp.sum(weights * t_mid, axis=-1) / jnp.maximum(acc, _EPS)
    depth = jnp.where(acc > _EPS, depth, t_edges[..., -1])
    depth = jnp.clip(depth, t_edges[..., 0], t_edges[..., -1])
    return {"rgb": color, "acc": acc, "depth": depth}


def volume_render(density, rgb, t_edges, directions, background=None):
    """`compute_alpha_weights` then `composite`; returns the composite dict plus `weights`.

    Args:
      density: [..., N], rgb: [..., N, C], t_edges: [..., N + 1], directions: [..., 3],
      background: optional [..., C].

    Returns:
      dict with `rgb`, `acc`, `depth`, `weights` [..., N].
    """
    weights, _, _ = compute_alpha_weights(density, t_edges, directions)
    out = composite(weights, rgb, t_edges, background)
    out["weights"] = weights
    return out
