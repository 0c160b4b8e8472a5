"""Mip-NeRF integrated positional encoding (IPE) of conical frustums.

A pixel is a cone `{o + t d + rho e : rho <= r t}` (apex `o`, axis `d`, base radius `r` at
`t = 1`); the slice `t0 <= t <= t1` is a conical frustum. Mip-NeRF (Barron et al., ICCV 2021)
approximates the frustum by the Gaussian with the same first and second moments and encodes it
with the expected positional encoding under that Gaussian.

Equation 7 (moments along the axis and radially), with `t_mu = (t0 + t1) / 2` and
`t_delta = (t1 - t0) / 2` (the numerically stable form, also used by multinerf):

    mu_t      = t_mu + 2 t_mu t_delta^2 / (3 t_mu^2 + t_delta^2)
    sigma_t^2 = t_delta^2 / 3
                - 4/15 t_delta^4 (12 t_mu^2 - t_delta^2) / (3 t_mu^2 + t_delta^2)^2
    sigma_r^2 = r^2 (t_mu^2 / 4 + 5/12 t_delta^2 - 4/15 t_delta^4 / (3 t_mu^2 + t_delta^2))

Equation 8 (lift to world space, diagonal of the covariance only):

    mu    = o + mu_t d
    Sigma = sigma_t^2 (d o d) + sigma_r^2 (1 - (d o d) / |d|^2)        (o: elementwise)

Equation 14 (IPE), for levels l = min_deg .. max_deg - 1:

    gamma(mu, Sigma) = [sin(2^l mu) exp(-1/2 4^l Sigma), cos(2^l mu) exp(-1/2 4^l Sigma)]

`cos(x) = sin(x + pi/2)`, so both halves are computed with one `sin` call, as in multinerf.
`t` is measured in units of `|d|`: with unit directions it is the distance from the apex.
"""

from __future__ import annotations

import jax.numpy as jnp

_EPS = jnp.finfo(jnp.float32).eps


def frustum_moments(t0, t1, base_radius):
    """Axial mean and variance and radial variance of a conical frustum (Equation 7).

    Args:
      t0: [...] start of the frustum along the ray.
      t1: [...] end of the frustum (t1 >= t0 >= 0).
      base_radius: [...] cone radius at t = 1 (broadcastable against t0).

    Returns:
      t_mean: [...] mean of t over the frustum volume (density of t is proportional to t^2).
      t_var: [...] variance of t.
      r_var: [...] variance of the position along each of the two axes orthogonal to the ray.
    """
    t_mu = 0.5 * (t0 + t1)
    t_delta = 0.5 * (t1 - t0)
    denom = jnp.maximum(_EPS, 3.0 * t_mu**2 + t_delta**2)
    t_mean = t_mu + 2.0 * t_mu * t_delta**2 / denom
    t_var = t_delta**2 / 3.0 - (4.0 / 15.0) * t_delta**4 * (12.0 * t_mu**2 - t_delta**2) / denom**2
    r_var = base_radius**2 * (t_mu**2 / 4.0 + (5.0 / 12.0) * t_delta**2
                              - (4.0 / 15.0) * t_delta**4 / denom)
    return t_mean, t_var, r_var


def lift_gaussian(origins, directions, t_mean, t_var, r_var):
    """Lifts the 1D frustum moments to a 3D Gaussian with diagonal covariance (Equation 8).

    Args:
      origins: [..., 3] ray origins.
      directions: [..., 3] ray directions (need not be unit length).
      t_mean, t_var, r_var: [..., num_samples] moments from `frustum_moments`.

    Returns:
      means: [..., num_samples, 3] `o + mu_t d`.
      covs: [..., num_samples, 3] diagonal of `sigma_t^2 d d^T + sigma_r^2 (I - d d^T / |d|^2)`.
    """
    d = directions[..., None, :]
    means = origins[..., None, :] + t_mean[..., None] * d
    d_sq = d**2
    d_mag_sq = jnp.maximum(_EPS, jnp.sum(d_sq, axis=-1, keepdims=True))
    covs = t_var[..., None] * d_sq + r_var[..., None] * (1.0 - d_sq / d_mag_sq)
    return means, covs


def conical_frustum_to_gaussian(origins, directions, t_edges, radii):
    """Gaussians (mean, diagonal covariance) of the frustums between consecutive t-values.

    Args:
      origins: [..., 3] ray origins.
      directions: [..., 3] ray directions.
      t_edges: [..., num_samples + 1] sorted t-values; frustum i spans [t_i, t_{i+1}].
      radii: [..., 1] base radius of each ray's cone at t = 1.

    Returns:
      means: [..., num_samples, 3], covs: [..., num_samples, 3].
    """
    t_mean, t_var, r_var = frustum_moments(t_edges[..., :-1], t_edges[..., 1:], radii)
    return lift_gaussian(origins, directions, t_mean, t_var, r_var)


def integrated_pos_enc(means, covs, min_deg, max_deg):
    """Integrated positional encoding, Equation 14: E[PE(x)] for x ~ N(means, diag(covs)).

    Uses `E[sin(a x)] = sin(a mu) exp(-a^2 var / 2)` for scalar Gaussian x.

    Args:
      means: [..., 3] Gaussian means.
      covs: [..., 3] diagonal covariances.
      min_deg: lowest frequency level l (frequency 2^l).
      max_deg: one past the highest level.

    Returns:
      [..., 2 * 3 * (max_deg - min_deg)] features, sines first then cosines; within each half
      the layout is level-major (level l occupies entries 3 (l - min_deg) .. + 3).
    """
    scales = 2.0 ** jnp.arange(min_deg, max_deg, dtype=means.dtype)
    shape = means.shape[:-1] + (-1,)
    scaled_mean = jnp.reshape(means[..., None, :] * scales[:, None], shape)
    scaled_var = jnp.reshape(covs[..., None, :] * (scales[:, None] ** 2), shape)
    angles = jnp.concatenate([scaled_mean, scaled_mean + 0.5 * jnp.pi], axis=-1)
    damping = jnp.exp(-0.5 * jnp.concatenate([scaled_var, scaled_var], axis=-1))
    return damping * jnp.sin(angles)


def pos_enc(x, min_deg, max_deg):
    """Plain positional encoding with the same layout as `integrated_pos_enc` (zero variance).

    Args:
      x: [..., 3] points.

    Returns:
      [..., 2 * 3 * (max_deg - min_deg)] features `[sin(2^l x), cos(2^l x)]`.
    """
    return integrated_pos_enc(x, jnp.zeros_like(x), min_deg, max_deg)
