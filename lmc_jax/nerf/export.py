"""Outputs of a trained field: one closed, cleaned mesh in GLB, OBJ and PLY; videos.

The public entry: `write_field_assets` / `write_assets` run the pipeline, one module per job,

    surface  density grid over [-bound, bound]^3 -> iso level ('auto': the opaque rays') ->
             optional blur (`smooth` voxels) -> marching cubes on the padded grid: a closed
             2-manifold mesh
    cleanup  floaters removed: pieces under `outlier_fraction` of the faces (default 0.01)
    texture  xatlas UV atlas, the albedo baked into a texture
    mesh_io  the same mesh as mesh.glb (textured), mesh.obj + .mtl + _albedo.png, mesh.ply
    video    MP4 (or GIF) of orbit views

and report the mesh's figures before and after the cleanup (pieces, watertight, Euler number;
`lmc_jax.nerf.cleanup.mesh_figures`). The names below stay importable from here for callers
of the former single module.
"""

from __future__ import annotations

import logging
import os

import numpy as np

from lmc_jax.nerf.cleanup import (
    DEFAULT_OUTLIER_FRACTION,
    check_outlier_fraction,
    mesh_figures,
    remove_small_pieces,
)
from lmc_jax.nerf.mesh_io import (
    textured_trimesh,
    vertex_normals,
    write_glb,
    write_obj,
    write_ply,
    write_textured_obj,
    z_up_to_y_up,
)
from lmc_jax.nerf.surface import (
    AUTO_THRESHOLD,
    OPAQUE_DEPTH,
    NoSurfaceError,
    PointFn,
    check_smooth,
    check_threshold,
    closed_grid,
    density_grid,
    evaluate_in_chunks,
    field_albedo_fn,
    field_density_fn,
    grid_points,
    marching_cubes,
    opaque_threshold,
    smooth_grid,
    surface_of_grid,
    surface_threshold,
    voxel_variance,
)
from lmc_jax.nerf.texture import bake_texture, to_uint8
from lmc_jax.nerf.video import write_video

__all__ = [
    "AUTO_THRESHOLD", "DEFAULT_OUTLIER_FRACTION", "NoSurfaceError", "OPAQUE_DEPTH", "bake_texture",
    "check_outlier_fraction", "check_smooth", "check_threshold", "closed_grid", "density_grid",
    "evaluate_in_chunks", "extract_mesh", "extract_surface", "field_albedo_fn", "field_density_fn",
    "grid_points", "marching_cubes", "mesh_figures", "opaque_threshold", "remove_small_pieces",
    "smooth_grid", "surface_of_grid", "surface_threshold", "textured_trimesh", "to_uint8",
    "vertex_normals", "write_assets", "write_field_assets", "write_glb", "write_obj", "write_ply",
    "write_textured_obj", "write_video", "z_up_to_y_up",
]

_LOG = logging.getLogger(__name__)

# metrics.json keys of the mesh's figures, after the cleanup and ('_raw') before it.
FIGURE_KEYS = ("pieces", "watertight", "euler", "genus", "outward", "volume")
RAW_FIGURE_KEYS = ("pieces", "watertight", "euler")


def extract_surface(density_fn: PointFn, albedo_fn: PointFn, resolution: int = 128,
                    bound: float = 1.0, threshold=AUTO_THRESHOLD, chunk_size: int = 65536,
                    outlier_fraction: float = DEFAULT_OUTLIER_FRACTION,
                    smooth: float = 0.0) -> dict:
    """Coloured, closed mesh of the iso-surface of `density_fn` at `surface_threshold`,
    without the pieces under `outlier_fraction` of its faces.

    Args:
      density_fn: [M, 3] -> [M] densities; albedo_fn: [M, 3] -> [M, 3] colours in [0, 1].
      resolution: grid points per axis over [-bound, bound] (one more layer pads each side).
      threshold: 'auto' (`opaque_threshold`) or a density.
      outlier_fraction: pieces with fewer faces than this fraction of all are removed (0 keeps
        every piece; `lmc_jax.nerf.cleanup.remove_small_pieces`).
      smooth: Gaussian blur of the grid before meshing, in voxels (`smooth_grid`; 0: none).

    Returns:
      dict with `vertices` [V, 3] float32, `faces` [F, 3] int32, `colors` [V, 3] float32,
      `threshold` (the level used), `figures` (`mesh_figures` of the mesh) and `raw`
      (`mesh_figures` before the cleanup, with its `faces` count).

    Raises:
      NoSurfaceError: see `surface_threshold`.
    """
    fraction = check_outlier_fraction(outlier_fraction)
    sigma = check_smooth(smooth)
    grid = density_grid(density_fn, resolution, bound, chunk_size)
    vertices, faces, level = surface_of_grid(grid, bound, threshold, sigma)
    raw = {**mesh_figures(vertices, faces), "faces": len(faces)}
    vertices, faces, _ = remove_small_pieces(vertices, faces, fraction)
    colors = evaluate_in_chunks(albedo_fn, vertices, chunk_size)
    return {"vertices": np.asarray(vertices, np.float32), "faces": faces,
            "colors": np.clip(colors, 0.0, 1.0).astype(np.float32), "threshold": level,
            "figures": mesh_figures(vertices, faces), "raw": raw}


def extract_mesh(field, params, resolution: int = 128, bound: float = 1.0,
                 threshold=AUTO_THRESHOLD, chunk_size: int = 65536,
                 outlier_fraction: float = DEFAULT_OUTLIER_FRACTION,
                 smooth: float = 0.0) -> dict:
    """Coloured mesh of an `MLPField` (`extract_surface` of its density and albedo).

    The field is evaluated with point Gaussians of a uniform voxel's variance `voxel^2 / 12`.
    """
    variance = voxel_variance(resolution, bound)
    return extract_surface(field_density_fn(field, params, variance),
                           field_albedo_fn(field, params, variance), resolution, bound,
                           threshold, chunk_size, outlier_fraction, smooth)


def figures_metrics(mesh: dict) -> dict:
    """metrics.json's mesh figures: `mesh_<key>` after the cleanup, `mesh_<key>_raw` before.
    """
    out = {f"mesh_{k}": mesh["figures"][k] for k in FIGURE_KEYS}
    out.update({f"mesh_{k}_raw": mesh["raw"][k] for k in (*RAW_FIGURE_KEYS, "faces")})
    return out


def write_assets(workdir: str, density_fn: PointFn, albedo_fn: PointFn, resolution: int = 128,
                 bound: float = 1.0, threshold=AUTO_THRESHOLD, texture_size: int = 1024,
                 chunk_size: int = 65536,
                 outlier_fraction: float = DEFAULT_OUTLIER_FRACTION,
                 smooth: float = 0.0) -> dict:
    """Meshes a field and writes mesh.glb, mesh.obj (+ mesh.mtl, mesh_albedo.png), mesh.ply.

    All three hold the same closed mesh (`extract_surface`: floaters removed). The GLB and OBJ
    carry the baked albedo texture (`bake_texture`) and vertex colours, y up as their importers
    expect; the PLY has vertex colours, in the field's z-up axes (as Blender's PLY importer
    expects). `lmc_jax.nerf.mesh_io` says how each format stores the texture seams.

    Returns:
      `{"mesh_vertices", "mesh_faces", "mesh_threshold", "texture_size", "no_surface",
      "mesh_outlier_fraction", "mesh_smooth", "mesh_<figure>", "mesh_<figure>_raw"}`
      (`figures_metrics`), or,
      when there is no surface (`NoSurfaceError`), `mesh_vertices = mesh_faces = 0`,
      `no_surface: True` and `no_surface_reason`.
    """
    fraction, sigma = check_outlier_fraction(outlier_fraction), check_smooth(smooth)
    try:
        mesh = extract_surface(density_fn, albedo_fn, resolution, bound, threshold, chunk_size,
                               fraction, sigma)
    except NoSurfaceError as err:
        _LOG.warning("%s: no mesh written", err)
        return {"mesh_vertices": 0, "mesh_faces": 0, "mesh_pieces": 0, "no_surface": True,
                "no_surface_reason": str(err)}
    os.makedirs(workdir, exist_ok=True)
    v, f, c = mesh["vertices"], mesh["faces"], mesh["colors"]
    textured = bake_texture(v, f, albedo_fn, texture_size, chunk_size)
    tc = c[textured["vertex_map"]]
    write_glb(os.path.join(workdir, "mesh.glb"), textured, tc)
    write_textured_obj(os.path.join(workdir, "mesh.obj"), textured, tc)
    write_ply(os.path.join(workdir, "mesh.ply"), v, f, c)
    return {"mesh_vertices": len(v), "mesh_faces": len(f), "mesh_threshold": mesh["threshold"],
            "texture_size": texture_size, "no_surface": False,
            "mesh_outlier_fraction": fraction, "mesh_smooth": sigma, **figures_metrics(mesh)}


def write_field_assets(workdir: str, field, params, resolution: int = 128, bound: float = 1.0,
                       threshold=AUTO_THRESHOLD, texture_size: int = 1024,
                       chunk_size: int = 65536,
                       outlier_fraction: float = DEFAULT_OUTLIER_FRACTION,
                       smooth: float = 0.0) -> dict:
    """`write_assets` for an `MLPField` (point Gaussians of a voxel's variance)."""
    variance = voxel_variance(resolution, bound)
    return write_assets(workdir, field_density_fn(field, params, variance),
                        field_albedo_fn(field, params, variance), resolution, bound, threshold,
                        texture_size, chunk_size, outlier_fraction, smooth)
