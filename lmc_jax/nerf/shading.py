"""Normals, lighting and backgrounds (DreamFusion, Poole et al. 2022, Section 3.1).

Normals are the negative normalized gradient of density with respect to position,

    n = -grad_x sigma / |grad_x sigma|,

so they point out of the object (density decreases outwards). Shading of a sample with albedo
rho, normal n and unit direction l towards a point light:

    albedo       c = rho
    lambertian   c = rho (ambient + diffuse max(0, n . l))
    textureless  c = ambient + diffuse max(0, n . l)          (white albedo)

The mode is drawn per view (`sample_shading_mode`) and applied with `jnp.where`, so one jitted
step handles all three. Backgrounds: a random solid colour per view, or a small learned MLP of
the view direction (`BackgroundMLP`).
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from lmc_jax.nerf import _random, ipe

_EPS = jnp.finfo(jnp.float32).eps

SHADING_MODES = ("albedo", "lambertian", "textureless")
"""Index -> shading mode name (0 albedo, 1 lambertian, 2 textureless)."""


def _normalize(x):
    """`x / max(|x|, eps)` along the last axis, written so that its gradient is finite at x = 0.

    (`x / max(eps, norm(x))` is not: the VJP of `norm` at 0 is 0/0 even where `max` picks eps,
    and a normal from an exactly flat density turned a whole text-to-3D step into NaN.)
    """
    sq = jnp.sum(x * x, axis=-1, keepdims=True)
    return x * jax.lax.rsqrt(jnp.maximum(sq, _EPS * _EPS))


def value_and_position_gradient(fn, x):
    """`fn(x)` and, per point, the gradient of its first output with respect to x.

    `fn` must be pointwise: output `[...]` at index k depends only on `x[k]` (true for a field
    evaluated per sample). Then the gradient of `sum(fn(x))` is the per-point gradient, found
    with one `jax.vjp` (one backward pass, not one per sample). The result stays
    differentiable with respect to anything `fn` closes over (e.g. field parameters).

    Args:
      fn: maps x [..., 3] to `(value [...], aux)`; aux (any pytree) is passed through.
      x: [..., 3] positions.

    Returns:
      value [...], gradient [..., 3], aux.
    """
    value, vjp_fn, aux = jax.vjp(fn, x, has_aux=True)
    (grad,) = vjp_fn(jnp.ones_like(value))
    return value, grad, aux


def normals_from_density_gradient(grad):
    """`n = -grad / |grad|`: [..., 3] -> [..., 3] unit normals (zero gradient -> zero)."""
    return -_normalize(grad)


def field_with_normals(field, params, means, covs):
    """Density, albedo and density-gradient normals of a `MLPField` at frustum Gaussians.

    The gradient is taken with respect to the Gaussian means at fixed covariances.

    Args:
      field: an `MLPField` module.
      params: its variables (`{'params': ...}`).
      means, covs: [..., 3].

    Returns:
      density [...], albedo [..., 3], normals [..., 3].
    """

    def fn(m):
        return field.apply(params, m, covs)

    density, grad, albedo = value_and_position_gradient(fn, means)
    return density, albedo, normals_from_density_gradient(grad)


def sample_light_position(key, camera_position, distance_range=(0.8, 1.5), perturb_std=1.0):
    """Random point light near the camera (threestudio's DreamFusion recipe).

    `dir = normalize(camera_position + N(0, perturb_std^2 I))`, `dist ~ U(distance_range)`,
    light at `dist * |camera_position| * dir`.

    Args:
      key: PRNG key.
      camera_position: [..., 3].

    Returns:
      [..., 3] light positions.
    """
    k1, k2 = jax.random.split(key)
    noise = perturb_std * _random.normal(k1, camera_position.shape, camera_position.dtype)
    direction = _normalize(camera_position + noise)
    dist = _random.uniform(k2, camera_position.shape[:-1] + (1,), camera_position.dtype,
                           minval=distance_range[0], maxval=distance_range[1])
    return direction * dist * jnp.linalg.norm(camera_position, axis=-1, keepdims=True)


def point_light_directions(light_position, points):
    """Unit directions from points towards a point light: broadcastable [..., 3] -> [..., 3]."""
    return _normalize(light_position - points)


def lambertian(normals, light_dirs, ambient=0.1, diffuse=0.9):
    """`ambient + diffuse max(0, n . l)`: [..., 3], [..., 3] -> [..., 1]."""
    n_dot_l = jnp.sum(normals * light_dirs, axis=-1, keepdims=True)
    return ambient + diffuse * jnp.maximum(0.0, n_dot_l)


def shade(albedo, normals, light_dirs, mode, ambient=0.1, diffuse=0.9):
    """Shaded colour for a mode index (0 albedo, 1 lambertian, 2 textureless), jittable.

    Args:
      albedo: [..., 3]; normals: [..., 3]; light_dirs: [..., 3] (unit, towards the light).
      mode: int or int array broadcastable to [..., 1] (e.g. [B, 1, 1, 1, 1] per view).
      ambient, diffuse: light intensities.

    Returns:
      [..., 3] colours.
    """
    light = lambertian(normals, light_dirs, ambient, diffuse)
    mode = jnp.asarray(mode)
    lit = jnp.where(mode == 2, jnp.broadcast_to(light, albedo.shape), albedo * light)
    return jnp.where(mode == 0, albedo, lit)


def sample_shading_mode(key, probs=(0.2, 0.4, 0.4), shape=()):
    """Random shading mode indices with probabilities (albedo, lambertian, textureless).

    The default split is a *(choice)*: DreamFusion uses albedo-only, lit and textureless
    renders; threestudio renders textureless with probability 0.5.

    Args:
      key: PRNG key.
      probs: three non-negative numbers (normalized here).
      shape: output shape (e.g. (batch,) for one mode per view).

    Returns:
      int32 array of `shape` with values in {0, 1, 2}.
    """
    p = jnp.asarray(probs, jnp.float32)
    cdf = jnp.cumsum(p) / jnp.sum(p)
    u = _random.uniform(key, shape)
    # Inverse CDF: the number of cumulative thresholds that u has passed (zero-probability
    # modes are skipped because their threshold equals the previous one).
    return jnp.sum(u[..., None] >= cdf[:-1], axis=-1).astype(jnp.int32)


def random_solid_background(key, shape=()):
    """Uniform random RGB colour per entry of `shape`: returns `shape + (3,)` in [0, 1)."""
    return _random.uniform(key, tuple(shape) + (3,))


class BackgroundMLP(nn.Module):
    """Learned background: colour as a function of the unit view direction.

    `bg(d) = sigmoid(MLP(PE(d)))`, PE with levels 0 .. num_levels - 1.
    """

    width: int = 32
    depth: int = 2
    num_levels: int = 4

    @nn.compact
    def __call__(self, directions):
        """directions: [..., 3] -> colours [..., 3] in (0, 1)."""
        h = ipe.pos_enc(_normalize(directions), 0, self.num_levels)
        for i in range(self.depth):
            h = nn.relu(nn.Dense(self.width, name=f"hidden_{i}")(h))
        return nn.sigmoid(nn.Dense(3, name="rgb")(h))
