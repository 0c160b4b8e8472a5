"""Rendering rays through an `MLPField`: the pieces of this package wired in order.

    near, far   = intersect_sphere(o, d, R)
    t_coarse    = sample_stratified(near, far, N_c)
    w_coarse    = weights of the field at the coarse frustums          (no gradient used)
    t_fine      = resample_along_rays(t_coarse, w_coarse, N_f)         (stop_gradient)
    sigma, rho, n = field_with_normals(IPE Gaussians of t_fine)
    c_i         = shade(rho_i, n_i, l_i, mode)
    C           = sum_i w_i c_i + (1 - acc) bg                           (volume.py)

One MLP serves both passes (as in mip-NeRF). Only the fine pass is differentiated: the coarse
pass only places the fine samples, which is all score distillation needs.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from lmc_jax.nerf import ipe, sampling, shading, volume


def render_rays(field, params, key, origins, directions, radii, *, scene_radius=1.0,
                min_near=0.0, num_coarse=64, num_fine=64, randomized=True, shading_mode=0,
                light_position=None, background=None, ambient=0.1, diffuse=0.9,
                compute_normals=True):
    """Renders a batch of rays.

    Args:
      field: an `MLPField`; params: its variables.
      key: PRNG key for the sample jitter (may be None when not randomized).
      origins, directions: [..., 3] rays (unit directions from `generate_rays`).
      radii: [..., 1] cone base radii.
      scene_radius: radius R of the bounding sphere.
      min_near: smallest near distance.
      num_coarse: coarse intervals (static). num_fine: fine intervals; 0 renders the coarse
        samples directly (static).
      randomized: jitter samples (training) or not (evaluation).
      shading_mode: int or int array broadcastable to the ray shape [...] (0 albedo,
        1 lambertian, 2 textureless); e.g. `modes[:, None, None]` for [B, H, W] rays.
      light_position: [..., 3] broadcastable to the rays; needed unless every mode is albedo
        (defaults to the ray origins, a headlight).
      background: [..., 3] broadcastable background colour, or None (black).
      ambient, diffuse: light intensities.
      compute_normals: False skips the density gradient (then shading is albedo only and no
        normals are returned) (static).

    Returns:
      dict with `rgb` [..., 3], `acc` [...], `depth` [...], `weights` [..., N],
      `t_edges` [..., N + 1], `albedo` [..., N, 3] and, with normals, `normals` [..., N, 3]
      and `normal_map` [..., 3] (weight-composited normals).
    """
    k_coarse, k_fine = (None, None) if key is None else jax.random.split(key)
    near, far, _ = sampling.intersect_sphere(origins, directions, scene_radius, min_near)
    t_edges = sampling.sample_stratified(k_coarse, near, far, num_coarse, randomized)

    if num_fine > 0:
        means, covs = ipe.conical_frustum_to_gaussian(origins, directions, t_edges, radii)
        density, _ = field.apply(jax.lax.stop_gradient(params), means, covs)
        w_coarse, _, _ = volume.compute_alpha_weights(density, t_edges, directions)
        t_edges = sampling.resample_along_rays(k_fine, t_edges, w_coarse, num_fine, randomized)

    means, covs = ipe.conical_frustum_to_gaussian(origins, directions, t_edges, radii)
    out = {"t_edges": t_edges}
    if compute_normals:
        density, albedo, normals = shading.field_with_normals(field, params, means, covs)
        if light_position is None:
            light_position = origins
        light_position = jnp.broadcast_to(light_position, origins.shape)
        light_dirs = shading.point_light_directions(light_position[..., None, :], means)
        mode = jnp.broadcast_to(jnp.asarray(shading_mode), origins.shape[:-1])
        rgb = shading.shade(albedo, normals, light_dirs, mode[..., None, None], ambient, diffuse)
    else:
        density, albedo = field.apply(params, means, covs)
        rgb = albedo
    result = volume.volume_render(density, rgb, t_edges, directions, background)
    out.update(result)
    out["albedo"] = albedo
    if compute_normals:
        out["normals"] = normals
        out["normal_map"] = jnp.sum(out["weights"][..., None] * normals, axis=-2)
    return out
