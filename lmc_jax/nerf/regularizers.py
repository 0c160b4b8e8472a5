"""NeRF regularizers for text-to-3D; callers multiply each by its weight.

Orientation loss (Ref-NeRF, Verbin et al. 2022, Equation 10; DreamFusion Equation 5): visible
normals should not face away from the camera,

    R_orient = sum_i stop_grad(w_i) max(0, n_i . d)^2       (d: unit ray direction)

averaged over rays. DreamFusion stops the gradient through w_i so the loss moves normals
(i.e. density gradients), not the opacity.

Opacity losses on the accumulated opacity acc in [0, 1] (averaged over rays):

    sparsity:  mean(acc)                                     (fewer occupied pixels)
    entropy:   mean(-acc log acc - (1 - acc) log(1 - acc))   (push acc to 0 or 1)
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

_EPS = 1e-6


def orientation_loss(weights, normals, directions, stop_weight_gradient=True):
    """Orientation loss `mean_rays sum_i w_i max(0, n_i . d)^2`.

    Args:
      weights: [..., N] rendering weights.
      normals: [..., N, 3] unit normals.
      directions: [..., 3] ray directions (normalized here).
      stop_weight_gradient: DreamFusion's `stop_grad(w_i)`.

    Returns:
      scalar loss.
    """
    if stop_weight_gradient:
        weights = jax.lax.stop_gradient(weights)
    d = directions / jnp.maximum(_EPS, jnp.linalg.norm(directions, axis=-1, keepdims=True))
    n_dot_d = jnp.sum(normals * d[..., None, :], axis=-1)
    return jnp.mean(jnp.sum(weights * jnp.maximum(0.0, n_dot_d) ** 2, axis=-1))


def opacity_loss(acc):
    """Sparsity loss `mean(acc)`: acc [...] -> scalar."""
    return jnp.mean(acc)


def opacity_entropy_loss(acc, eps=_EPS):
    """Binary entropy of the opacity `mean(-a log a - (1 - a) log(1 - a))`, a clipped to
    [eps, 1 - eps]: acc [...] -> scalar in [0, log 2]."""
    a = jnp.clip(acc, eps, 1.0 - eps)
    return jnp.mean(-a * jnp.log(a) - (1.0 - a) * jnp.log(1.0 - a))
