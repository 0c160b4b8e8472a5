"""Random orbit cameras looking at the origin, their rays, and view-dependent prompt suffixes.

Conventions (fixed throughout `lmc_jax.nerf`):
- World: z is up. A camera at elevation `e` and azimuth `a` (degrees) and distance `r` sits at
  `r (cos e cos a, cos e sin a, sin e)`: azimuth 0 is on the +x axis ("front"), elevation 90
  is straight overhead.
- Camera: OpenGL convention. The camera-to-world matrix `[R | p]` ([..., 3, 4]) has columns
  `R = [right, up, back]`: the camera looks along its -z axis, x points right and y up in the
  image. Pixel (row i, column j) looks through `((j + 0.5 - W/2)/f, -(i + 0.5 - H/2)/f, -1)` in
  camera space, with focal length `f = H / (2 tan(fovy / 2))` (fovy: vertical field of view).
- Rays have unit directions, so t is a distance and the cone radius at distance t is `r t`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

_EPS = jnp.finfo(jnp.float32).eps

VIEW_SUFFIXES = ("front view", "side view", "back view", "overhead view")
"""Index -> prompt suffix, as returned by `view_index` (0 front, 1 side, 2 back, 3 overhead)."""


def _normalize(x):
    return x / jnp.maximum(_EPS, jnp.linalg.norm(x, axis=-1, keepdims=True))


def spherical_to_position(elevation, azimuth, distance):
    """Camera centre `r (cos e cos a, cos e sin a, sin e)`; angles in degrees.

    Args:
      elevation, azimuth, distance: [...] arrays (broadcastable).

    Returns:
      [..., 3] positions.
    """
    e = jnp.deg2rad(elevation)
    a = jnp.deg2rad(azimuth)
    return distance[..., None] * jnp.stack(
        [jnp.cos(e) * jnp.cos(a), jnp.cos(e) * jnp.sin(a), jnp.sin(e)], axis=-1)


def look_at(position, target=None, up=None):
    """Camera-to-world matrix (OpenGL) of a camera at `position` looking at `target`.

    `back = normalize(position - target)`, `right = normalize(up x back)`,
    `up' = back x right`. When `back` is parallel to `up` the world y axis is used as the up
    hint instead (a jnp.where, so it stays jittable).

    Args:
      position: [..., 3] camera centres.
      target: [3] or [..., 3] point looked at (default: the origin).
      up: [3] world up hint (default: +z).

    Returns:
      [..., 3, 4] matrices `[right, up', back, position]` (columns); the rotation is orthonormal
      with determinant +1.
    """
    target = jnp.zeros(3, position.dtype) if target is None else jnp.asarray(target)
    up = jnp.array([0.0, 0.0, 1.0], position.dtype) if up is None else jnp.asarray(up)
    back = _normalize(position - target)
    up = jnp.broadcast_to(up, back.shape)
    alt = jnp.broadcast_to(jnp.array([0.0, 1.0, 0.0], position.dtype), back.shape)
    right = jnp.cross(up, back)
    degenerate = jnp.linalg.norm(right, axis=-1, keepdims=True) < 1e-6
    right = _normalize(jnp.where(degenerate, jnp.cross(alt, back), right))
    cam_up = jnp.cross(back, right)
    return jnp.stack([right, cam_up, back, position], axis=-1)


def orbit_camera_to_world(elevation, azimuth, distance):
    """Camera-to-world matrices of orbit cameras looking at the origin (OpenGL, z-up world).

    Built from the angles directly, so it is well defined at elevation +-90 degrees:
    `right = (-sin a, cos a, 0)`, `back = position / r`, `up = back x right`.

    Args:
      elevation, azimuth: [...] degrees. distance: [...] (> 0).

    Returns:
      [..., 3, 4] camera-to-world matrices.
    """
    elevation, azimuth, distance = jnp.broadcast_arrays(
        jnp.asarray(elevation, jnp.float32), jnp.asarray(azimuth, jnp.float32),
        jnp.asarray(distance, jnp.float32))
    position = spherical_to_position(elevation, azimuth, distance)
    a = jnp.deg2rad(azimuth)
    e = jnp.deg2rad(elevation)
    back = jnp.stack([jnp.cos(e) * jnp.cos(a), jnp.cos(e) * jnp.sin(a), jnp.sin(e)], axis=-1)
    right = jnp.stack([-jnp.sin(a), jnp.cos(a), jnp.zeros_like(a)], axis=-1)
    cam_up = jnp.cross(back, right)
    return jnp.stack([right, cam_up, back, position], axis=-1)


def sample_orbit_cameras(key, batch_size, elevation_range=(-10.0, 90.0),
                         azimuth_range=(-180.0, 180.0), distance_range=(1.0, 1.5),
                         fovy_range=(40.0, 70.0)):
    """Random orbit cameras (DreamFusion-style ranges; each quantity uniform in its range).

    Elevation is uniform in degrees (not uniform on the sphere), as in DreamFusion.

    Args:
      key: PRNG key.
      batch_size: number of cameras (static).
      elevation_range, azimuth_range, distance_range, fovy_range: (low, high), degrees for
        angles.

    Returns:
      dict with `c2w` [B, 3, 4], `elevation` [B], `azimuth` [B], `distance` [B], `fovy` [B].
    """
    keys = jax.random.split(key, 4)

    def uniform(k, r):
        return jax.random.uniform(k, (batch_size,), minval=r[0], maxval=r[1])

    elevation = uniform(keys[0], elevation_range)
    azimuth = uniform(keys[1], azimuth_range)
    distance = uniform(keys[2], distance_range)
    fovy = uniform(keys[3], fovy_range)
    return {
        "c2w": orbit_camera_to_world(elevation, azimuth, distance),
        "elevation": elevation,
        "azimuth": azimuth,
        "distance": distance,
        "fovy": fovy,
    }


def orbit_video_cameras(num_frames, elevation=15.0, distance=1.25, fovy=50.0):
    """Evenly spaced cameras on a 360-degree orbit (for videos).

    Returns:
      dict with `c2w` [N, 3, 4], `elevation`, `azimuth` (0, 360/N, ...), `distance`, `fovy`
      (each [N]).
    """
    azimuth = jnp.arange(num_frames, dtype=jnp.float32) * (360.0 / num_frames)
    elevation = jnp.full((num_frames,), elevation, jnp.float32)
    distance = jnp.full((num_frames,), distance, jnp.float32)
    return {
        "c2w": orbit_camera_to_world(elevation, azimuth, distance),
        "elevation": elevation,
        "azimuth": azimuth,
        "distance": distance,
        "fovy": jnp.full((num_frames,), fovy, jnp.float32),
    }


def generate_rays(c2w, fovy, height, width):
    """Per-pixel rays of pinhole cameras, with mip-NeRF cone radii.

    The base radius of pixel (i, j) is `2/sqrt(12)` times the distance between its unit
    direction and that of its right neighbour (the last column repeats its left neighbour's
    value), as in multinerf: a disc of that radius has the variance of the pixel's square
    footprint at unit distance.

    Args:
      c2w: [..., 3, 4] camera-to-world matrices (OpenGL).
      fovy: [...] vertical field of view in degrees.
      height, width: image size (static).

    Returns:
      origins: [..., H, W, 3]; directions: [..., H, W, 3] unit; radii: [..., H, W, 1].
    """
    fovy = jnp.asarray(fovy, c2w.dtype)
    focal = 0.5 * height / jnp.tan(0.5 * jnp.deg2rad(fovy))
    focal = focal[..., None, None]
    j, i = jnp.meshgrid(jnp.arange(width, dtype=c2w.dtype) + 0.5,
                        jnp.arange(height, dtype=c2w.dtype) + 0.5, indexing="xy")
    x = (j - 0.5 * width) / focal
    y = -(i - 0.5 * height) / focal
    cam_dirs = _normalize(jnp.stack([x, y, -jnp.ones_like(x)], axis=-1))  # [..., H, W, 3]
    dx = jnp.linalg.norm(cam_dirs[..., 1:, :] - cam_dirs[..., :-1, :], axis=-1)
    dx = jnp.concatenate([dx, dx[..., -1:]], axis=-1) if width > 1 else jnp.ones_like(x) / focal
    radii = (dx * 2.0 / np.sqrt(12.0))[..., None]
    rot = c2w[..., None, None, :3, :3]
    directions = jnp.sum(rot * cam_dirs[..., None, :], axis=-1)
    origins = jnp.broadcast_to(c2w[..., None, None, :3, 3], directions.shape)
    return origins, directions, radii


def wrap_azimuth(azimuth):
    """Maps degrees to [-180, 180)."""
    return jnp.mod(jnp.asarray(azimuth) + 180.0, 360.0) - 180.0


def view_index(elevation, azimuth, front_threshold=45.0, back_threshold=135.0,
               overhead_threshold=60.0):
    """Vectorized view class (jittable): 0 front, 1 side, 2 back, 3 overhead.

    With `a` the azimuth wrapped to [-180, 180) (degrees):
    overhead if `elevation > overhead_threshold`; else front if `|a| < front_threshold`;
    else back if `|a| > back_threshold`; else side. All comparisons are strict, so a value
    exactly on a threshold goes to the next class in that list (side, or not overhead).

    Args:
      elevation, azimuth: [...] degrees.

    Returns:
      [...] int32 indices into `VIEW_SUFFIXES`.
    """
    a = jnp.abs(wrap_azimuth(azimuth))
    idx = jnp.where(a < front_threshold, 0, jnp.where(a > back_threshold, 2, 1))
    idx = jnp.where(jnp.asarray(elevation) > overhead_threshold, 3, idx)
    return idx.astype(jnp.int32)


def view_suffix(elevation, azimuth, front_threshold=45.0, back_threshold=135.0,
                overhead_threshold=60.0):
    """Prompt suffix ('front view', 'side view', 'back view', 'overhead view') of one camera.

    Same rule as `view_index`, on Python/NumPy scalars (not for use under jit).
    """
    idx = int(view_index(float(elevation), float(azimuth), front_threshold, back_threshold,
                         overhead_threshold))
    return VIEW_SUFFIXES[idx]


def prompt_with_view(prompt, suffix):
    """DreamFusion's view-dependent prompt: `'<prompt>, <suffix>'`."""
    return f"{prompt}, {suffix}"
