"""The surface of a density field: grid, iso level, and a closed marching-cubes mesh.

The density `sigma` is sampled on a regular grid over the cube `[-bound, bound]^3` and the
mesh is the iso-surface `{x : sigma(x) = level}`, the boundary of the solid `{sigma > level}`:

- level: 'auto' by default (`opaque_threshold`: the density whose iso-surface has the
  silhouette of the rays that are at least half opaque, `1 - exp(-integral sigma ds) >= 1/2`),
  or a fixed density. A field with no opaque ray has no surface (`NoSurfaceError`).
- closed: the grid is padded with one layer below the level (`closed_grid`), so the solid never
  touches the grid's boundary and every piece of its boundary is a closed surface, also where
  the object fills the cube.
- manifold: marching cubes (scikit-image, Lewiner's topologically consistent tables) puts one
  vertex on each grid edge whose ends straddle the level, at `t = (level - g0) / (g1 - g0)`
  along it, and adjacent cubes share those vertices, so the result is a closed 2-manifold
  whose topology depends only on the signs `g - level`. Two details would break that or the
  texture baking downstream, and `marching_cubes` removes both without touching the topology:
  a grid value equal to the level puts vertices of several edges on one grid point (coincident
  vertices, zero-area faces), so values within `1e-3 (max - min)` of the level are moved off
  it (`t` in [1e-3, 1 - 1e-3]); and a level close to a grid value leaves triangles with edges
  of ~1% of a voxel, which a UV unwrapper drops, so `t` is clamped to `[0.05, 0.95]` (a
  vertex moves at most 1/20 voxel along its own edge; distinct vertices stay apart; the vertex
  Lewiner's tables put inside a cube for some ambiguous cases stays where it is). The former
  way, collapsing every edge under 1/20 voxel into one vertex, broke the manifold where a
  collapse joined vertices with more than two common neighbours: 7 of the 25 :tiny LMC-SDS
  fields (seed 0) then gave a mesh with an edge of four faces, not watertight, whose marching
  cubes alone were closed.
  Faces are wound counter-clockwise seen from outside (normals point to lower density).

The field is evaluated with point Gaussians whose variance is that of a uniform voxel,
`voxel^2 / 12` per axis, so the IPE is band-limited to the grid resolution
(`field_density_fn`). Pieces, floaters and the mesh's figures are `lmc_jax.nerf.cleanup`'s.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from lmc_jax.errors import UserError

PointFn = Callable[[jax.Array], jax.Array]

AUTO_THRESHOLD = "auto"
OPAQUE_DEPTH = float(np.log(2.0))  # optical depth at which a ray's opacity 1 - e^-tau is 1/2
# Grid values closer than this fraction of the grid's range to the level are moved off it.
LEVEL_GAP = 1e-3
# A vertex stays at least this fraction of a voxel away from both ends of its grid edge.
EDGE_MARGIN = 0.05


class NoSurfaceError(UserError):
    """The density grid has no surface to mesh: an empty field, or a fixed threshold above it."""


def grid_points(resolution: int, bound: float) -> np.ndarray:
    """Grid vertices `linspace(-bound, bound, resolution)` per axis: [R, R, R, 3] (ij order)."""
    x = np.linspace(-bound, bound, resolution, dtype=np.float32)
    return np.stack(np.meshgrid(x, x, x, indexing="ij"), axis=-1)


def evaluate_in_chunks(fn: PointFn, points, chunk_size: int = 65536) -> np.ndarray:
    """Evaluates a batched function on many points, `chunk_size` at a time.

    `fn` is jitted once for a fixed chunk shape (the last chunk is padded), so memory stays at
    one chunk and there is a single compilation.

    Args:
      fn: maps [chunk, 3] -> [chunk, ...] (any trailing shape).
      points: [..., 3] array (NumPy or JAX).
      chunk_size: points per call.

    Returns:
      NumPy array [..., ...] (leading shape of `points`, trailing shape of `fn`'s output).
    """
    points = np.asarray(points, np.float32)
    lead = points.shape[:-1]
    flat = points.reshape(-1, 3)
    n = flat.shape[0]
    chunk = max(1, min(chunk_size, n))
    num_chunks = -(-n // chunk)
    flat = np.concatenate([flat, np.zeros((num_chunks * chunk - n, 3), np.float32)], axis=0)
    jfn = jax.jit(fn)
    outs = [np.asarray(jfn(flat[i * chunk:(i + 1) * chunk])) for i in range(num_chunks)]
    out = np.concatenate(outs, axis=0)[:n]
    return out.reshape(lead + out.shape[1:])


def field_density_fn(field, params, variance: float = 0.0) -> PointFn:
    """Point density of an `MLPField`: [M, 3] -> [M], with isotropic IPE variance `variance`."""

    def fn(x):
        return field.apply(params, x, jnp.full_like(x, variance), method=type(field).density)

    return fn


def field_albedo_fn(field, params, variance: float = 0.0) -> PointFn:
    """Point albedo of an `MLPField`: [M, 3] -> [M, 3]."""

    def fn(x):
        return field.apply(params, x, jnp.full_like(x, variance), method=type(field).albedo)

    return fn


def voxel_variance(resolution: int, bound: float) -> float:
    """`voxel^2 / 12`: the per-axis variance of a point uniform in one grid voxel."""
    return (2.0 * bound / (resolution - 1)) ** 2 / 12.0


def density_grid(density_fn: PointFn, resolution: int, bound: float,
                 chunk_size: int = 65536) -> np.ndarray:
    """Density on the grid `grid_points(resolution, bound)`: returns NumPy [R, R, R]."""
    return evaluate_in_chunks(density_fn, grid_points(resolution, bound), chunk_size)


def closed_grid(grid: np.ndarray, level: float, bound: float) -> tuple[np.ndarray, float]:
    """The grid with one more layer on every side, below `level`: (padded grid, its bound).

    The padding value is `min(grid.min(), 0, level - 1)`, outside the solid whatever the
    level, so the solid `{sigma > level}` ends inside the padded cube and its boundary is
    closed; the spacing stays `2 bound / (R - 1)`.
    """
    grid = np.asarray(grid, np.float32)
    spacing = 2.0 * bound / (grid.shape[0] - 1)
    outside = min(float(np.min(grid)), 0.0, float(level) - 1.0)
    return np.pad(grid, 1, constant_values=outside), bound + spacing


def _off_level(grid: np.ndarray, level: float) -> np.ndarray:
    """Moves grid values within `LEVEL_GAP (max - min)` of the level to that distance from
    it, on their own side (a value on the level counts as outside): no vertex lands on a grid
    point, where the vertices of several edges would coincide."""
    gap = LEVEL_GAP * max(float(np.max(grid)) - float(np.min(grid)), 1e-12)
    near = np.abs(grid - level) < gap
    if not near.any():
        return grid
    grid = grid.copy()
    grid[near] = np.where(grid[near] > level, level + gap, level - gap)
    return grid


def _keep_off_corners(verts: np.ndarray, margin: float = EDGE_MARGIN) -> np.ndarray:
    """Clamps each edge vertex's position along its grid edge to `[margin, 1 - margin]`.

    `verts` are in grid-index units. Two coordinates of an edge vertex are integers (the
    edge's line), the third is `i + t` with `0 < t < 1` (`_off_level` keeps `t` >= 1e-3).
    Lewiner's tables also add a vertex inside a cube for some ambiguous cases (more than one
    coordinate off the grid); it is the mean of that cube's edge vertices and stays as it is.
    """
    verts = np.asarray(verts, np.float64)
    base = np.floor(verts)
    frac = verts - base
    along = (frac > 1e-4) & (frac < 1.0 - 1e-4)
    edge = along.sum(1) == 1
    clamped = base + np.clip(frac, margin, 1.0 - margin)
    return np.where(edge[:, None] & along, clamped, verts)


def marching_cubes(grid, threshold: float, bound: float) -> tuple[np.ndarray, np.ndarray]:
    """Iso-surface `density = threshold` of a grid over [-bound, bound]^3 (module docstring).

    The surface is closed wherever the solid `{density > threshold}` does not reach the grid's
    boundary; `extract_surface` pads the grid (`closed_grid`) so that it never does.

    Args:
      grid: [R, R, R] densities, axis k sampled at `linspace(-bound, bound, R)` (ij order).
      threshold: iso level.
      bound: half-size of the cube.

    Returns:
      vertices [V, 3] float32 world coordinates, faces [F, 3] int32 (outward CCW winding).

    Raises:
      UserError: if the threshold is not crossed inside the grid (empty or full volume).
    """
    from skimage import measure

    grid = np.asarray(grid, np.float32)
    lo, hi = float(np.min(grid)), float(np.max(grid))
    if not lo < threshold < hi:
        raise UserError(
            f"marching cubes: threshold {threshold} is outside the density range [{lo:.4g}, "
            f"{hi:.4g}] of the grid; pick a threshold inside it (the field is empty or full).")
    res = grid.shape[0]
    spacing = 2.0 * bound / (res - 1)
    verts, faces, _, _ = measure.marching_cubes(_off_level(grid, threshold), level=threshold)
    verts = (_keep_off_corners(verts) * spacing - bound).astype(np.float32)
    # scikit-image winds faces clockwise seen from the low-value side for a field that is high
    # inside; flip to counter-clockwise seen from outside (outward normals).
    faces = faces[:, ::-1].astype(np.int32)
    return verts, np.ascontiguousarray(faces)


def opaque_threshold(grid, bound: float) -> float | None:
    """The density whose iso-surface has the silhouette of the field's opaque rays.

    Rays run along the grid's three axes (parallel projections). A ray is opaque when its
    accumulated opacity `1 - exp(-tau)` reaches 1/2, `tau = integral sigma ds >= ln 2`
    (trapezoid rule over the grid spacing; the same test `lmc_jax.apps.t23d.occupancy` applies
    to rendered pixels). The set `{sigma > t}` is hit by a ray exactly when the ray's maximum
    density exceeds `t`, so its silhouettes' area falls as `t` rises; the returned `t` makes
    that area equal the opaque rays' count `N` over the three axes: the midpoint between the
    N-th largest ray maximum and the next smaller one. For a ball whose density falls off
    smoothly this is the density at the radius where rays stop being opaque, whatever the
    ball's peak.

    Args:
      grid: [R, R, R] densities sampled at `linspace(-bound, bound, R)` per axis.
      bound: half-size of the cube.

    Returns:
      the threshold (> the grid's minimum), or None when no ray is opaque (an empty field).
    """
    grid = np.asarray(grid, np.float64)
    spacing = 2.0 * bound / (grid.shape[0] - 1)
    opaque, maxima = 0, []
    for axis in range(3):
        depth = spacing * (np.sum(grid, axis=axis)
                           - 0.5 * (np.take(grid, 0, axis) + np.take(grid, -1, axis)))
        opaque += int(np.sum(depth >= OPAQUE_DEPTH))
        maxima.append(np.max(grid, axis=axis).ravel())
    if opaque == 0:
        return None
    maxima = np.sort(np.concatenate(maxima))[::-1]
    top = maxima[opaque - 1]
    lower = maxima[opaque:][maxima[opaque:] < top]  # ties with `top` stay above the level
    below = lower[0] if len(lower) else min(float(np.min(grid)), 0.0)
    return float(0.5 * (top + below))


def check_threshold(threshold) -> str | float:
    """'auto', or the density `float(threshold)` (> 0); anything else is a `UserError`."""
    if isinstance(threshold, str) and threshold.strip().lower() == AUTO_THRESHOLD:
        return AUTO_THRESHOLD
    try:
        level = float(threshold)
    except (TypeError, ValueError):
        level = float("nan")
    if not level > 0:
        raise UserError(f"mesh threshold {threshold!r} is not 'auto' or a positive number; set "
                        "output.mesh_threshold to 'auto' or a density such as 10")
    return level


def surface_threshold(grid, bound: float, threshold=AUTO_THRESHOLD) -> float:
    """The iso level to mesh: `opaque_threshold` for 'auto', else `float(threshold)`.

    Raises:
      NoSurfaceError: 'auto' on a field with no opaque ray, or a fixed level the density never
        exceeds.
      UserError: a threshold that is neither 'auto' nor a number.
    """
    peak = float(np.max(grid))
    level = check_threshold(threshold)
    if level == AUTO_THRESHOLD:
        level = opaque_threshold(grid, bound)
        if level is None:
            raise NoSurfaceError(
                f"no surface: no ray through the field reaches opacity 1/2 (peak density "
                f"{peak:.4g}); the field is empty")
        return level
    if not peak > level:
        raise NoSurfaceError(
            f"no surface at density {level:.4g}: the field's peak density is {peak:.4g}; set "
            "output.mesh_threshold=auto (the level of the opaque rays) or a lower value")
    return level


def check_smooth(value, name: str = "output.mesh_smooth") -> float:
    """`float(value)` >= 0 (voxels); anything else is a `UserError` naming the config key."""
    try:
        sigma = float(value)
    except (TypeError, ValueError):
        sigma = float("nan")
    if isinstance(value, bool) or not 0.0 <= sigma < float("inf"):
        raise UserError(f"{name}={value!r} is not a width in voxels >= 0: the density grid is "
                        "blurred with a Gaussian of this standard deviation before meshing "
                        "(0 meshes the field as it is; 1 closes tunnels a voxel wide)")
    return sigma


def smooth_grid(grid, sigma: float) -> np.ndarray:
    """The grid blurred by a Gaussian of standard deviation `sigma` voxels (0: unchanged).

    A learned density has specks and tunnels about a voxel wide near the level; each tunnel
    through the solid is a handle of the mesh (its Euler number falls by 2). A blur of one
    voxel closes them and moves a flat surface of a linear density profile not at all (a
    Gaussian of a linear function is that function; curved surfaces move by ~`sigma^2 k / 2`
    voxels at curvature `k`, edges round off).
    """
    grid = np.asarray(grid, np.float32)
    if sigma <= 0:
        return grid
    from scipy import ndimage

    return ndimage.gaussian_filter(grid, sigma, mode="nearest")


def surface_of_grid(grid, bound: float, threshold=AUTO_THRESHOLD, smooth: float = 0.0
                    ) -> tuple[np.ndarray, np.ndarray, float]:
    """Closed marching-cubes mesh of a density grid: (vertices, faces, level used).

    The level is that of the grid as it is (`surface_threshold`: for 'auto', the field's
    opaque rays); with `smooth` > 0 the surface is that level's on `smooth_grid`.
    """
    level = surface_threshold(grid, bound, threshold)
    smoothed = smooth_grid(grid, check_smooth(smooth, "smooth"))
    if not float(np.max(smoothed)) > level:
        raise NoSurfaceError(
            f"no surface: blurred by {smooth:g} voxels the density peaks at "
            f"{float(np.max(smoothed)):.4g}, under the level {level:.4g}; lower "
            "output.mesh_smooth")
    padded, padded_bound = closed_grid(smoothed, level, bound)
    vertices, faces = marching_cubes(padded, level, padded_bound)
    return vertices, faces, level
