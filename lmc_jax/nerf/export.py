"""Outputs of a trained field: density grids, marching-cubes meshes, OBJ/PLY, videos, PNG grids.

Mesh extraction: evaluate the density on a regular grid over the cube [-bound, bound]^3, run
marching cubes (scikit-image) at a density threshold, colour each vertex with the field's
albedo at that vertex. Faces are wound counter-clockwise seen from outside (outward normals,
where density is below the threshold). The grid is evaluated with point Gaussians whose
variance is that of a uniform voxel, `voxel^2 / 12` per axis, so the IPE is band-limited to
the grid resolution.

File writers are plain NumPy/PIL/imageio: OBJ with `v x y z r g b` vertex colours (floats in
[0, 1]), PLY (ASCII or binary little-endian) with uchar vertex colours, MP4 via imageio-ffmpeg
with a GIF fallback, PNG grids via PIL.
"""

from __future__ import annotations

import contextlib
import logging
import os
import warnings

import jax
import jax.numpy as jnp
import numpy as np

from lmc_jax.errors import UserError

_LOG = logging.getLogger(__name__)


def grid_points(resolution, bound):
    """Grid vertices `linspace(-bound, bound, resolution)` per axis: [R, R, R, 3] (ij order)."""
    x = np.linspace(-bound, bound, resolution, dtype=np.float32)
    return np.stack(np.meshgrid(x, x, x, indexing="ij"), axis=-1)


def evaluate_in_chunks(fn, points, chunk_size=65536):
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


def field_density_fn(field, params, variance=0.0):
    """Point density of an `MLPField`: [M, 3] -> [M], with isotropic IPE variance `variance`."""

    def fn(x):
        return field.apply(params, x, jnp.full_like(x, variance), method=type(field).density)

    return fn


def field_albedo_fn(field, params, variance=0.0):
    """Point albedo of an `MLPField`: [M, 3] -> [M, 3]."""

    def fn(x):
        return field.apply(params, x, jnp.full_like(x, variance), method=type(field).albedo)

    return fn


def density_grid(density_fn, resolution, bound, chunk_size=65536):
    """Density on the grid `grid_points(resolution, bound)`: returns NumPy [R, R, R]."""
    return evaluate_in_chunks(density_fn, grid_points(resolution, bound), chunk_size)


def marching_cubes(grid, threshold, bound):
    """Iso-surface `density = threshold` of a grid over [-bound, bound]^3.

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
    verts, faces, _, _ = measure.marching_cubes(grid, level=threshold,
                                                spacing=(spacing, spacing, spacing))
    verts = (verts - bound).astype(np.float32)
    # scikit-image winds faces clockwise seen from the low-value side for a field that is high
    # inside; flip to counter-clockwise seen from outside (outward normals).
    faces = faces[:, ::-1].astype(np.int32)
    return verts, np.ascontiguousarray(faces)


def extract_mesh(field, params, resolution=128, bound=1.0, threshold=25.0, chunk_size=65536):
    """Coloured mesh of an `MLPField`: density grid -> marching cubes -> albedo per vertex.

    The default density threshold 25 is threestudio's; an untrained field (only the blob,
    peak density ~ blob_density) needs a lower one.

    Returns:
      dict with `vertices` [V, 3] float32, `faces` [F, 3] int32, `colors` [V, 3] float32 in
      [0, 1].
    """
    voxel = 2.0 * bound / (resolution - 1)
    variance = voxel**2 / 12.0
    grid = density_grid(field_density_fn(field, params, variance), resolution, bound, chunk_size)
    vertices, faces = marching_cubes(grid, threshold, bound)
    colors = evaluate_in_chunks(field_albedo_fn(field, params, variance), vertices, chunk_size)
    return {"vertices": vertices, "faces": faces, "colors": colors.astype(np.float32)}


def _colors_uint8(colors):
    colors = np.asarray(colors)
    if colors.dtype == np.uint8:
        return colors
    return np.clip(np.round(colors * 255.0), 0, 255).astype(np.uint8)


def write_obj(path, vertices, faces, colors=None):
    """Writes a Wavefront OBJ; colours (float [0, 1] or uint8) as `v x y z r g b`.

    Faces are written 1-based (`f a b c`).
    """
    vertices = np.asarray(vertices, np.float64)
    faces = np.asarray(faces, np.int64) + 1
    with open(path, "w") as f:
        f.write("# lmc_jax mesh\n")
        if colors is None:
            np.savetxt(f, vertices, fmt="v %.6f %.6f %.6f")
        else:
            rgb = _colors_uint8(colors).astype(np.float64) / 255.0
            np.savetxt(f, np.concatenate([vertices, rgb], axis=1),
                       fmt="v %.6f %.6f %.6f %.4f %.4f %.4f")
        np.savetxt(f, faces, fmt="f %d %d %d")


def write_ply(path, vertices, faces, colors=None, binary=True):
    """Writes a PLY mesh (binary little-endian or ASCII) with optional uchar vertex colours."""
    vertices = np.asarray(vertices, np.float32)
    faces = np.asarray(faces, np.int32)
    fields = [("x", "<f4"), ("y", "<f4"), ("z", "<f4")]
    if colors is not None:
        fields += [("red", "u1"), ("green", "u1"), ("blue", "u1")]
    vdata = np.empty(len(vertices), dtype=fields)
    vdata["x"], vdata["y"], vdata["z"] = vertices.T
    if colors is not None:
        rgb = _colors_uint8(colors)
        vdata["red"], vdata["green"], vdata["blue"] = rgb.T
    header = ["ply", f"format {'binary_little_endian' if binary else 'ascii'} 1.0",
              "comment lmc_jax mesh", f"element vertex {len(vertices)}",
              "property float x", "property float y", "property float z"]
    if colors is not None:
        header += ["property uchar red", "property uchar green", "property uchar blue"]
    header += [f"element face {len(faces)}", "property list uchar int vertex_indices",
               "end_header"]
    with open(path, "wb") as f:
        f.write(("\n".join(header) + "\n").encode("ascii"))
        if binary:
            f.write(vdata.tobytes())
            fdata = np.empty(len(faces), dtype=[("n", "u1"), ("idx", "<i4", (3,))])
            fdata["n"] = 3
            fdata["idx"] = faces
            f.write(fdata.tobytes())
        else:
            if colors is None:
                np.savetxt(f, vertices, fmt="%.6f %.6f %.6f")
            else:
                cols = np.concatenate([vertices.astype(np.float64),
                                       _colors_uint8(colors).astype(np.float64)], axis=1)
                np.savetxt(f, cols, fmt="%.6f %.6f %.6f %d %d %d")
            np.savetxt(f, faces, fmt="3 %d %d %d")


def to_uint8(images):
    """Float images in [0, 1] (or uint8) -> uint8, rounding and clipping."""
    images = np.asarray(images)
    if images.dtype == np.uint8:
        return images
    return np.clip(np.round(images * 255.0), 0, 255).astype(np.uint8)


@contextlib.contextmanager
def _quiet_fork():
    """imageio-ffmpeg starts ffmpeg with fork+exec, which is safe, but JAX warns on any fork."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"os\.fork\(\) was called",
                                category=RuntimeWarning)
        yield


def _mp4_ok(path, num_frames):
    if not os.path.exists(path) or os.path.getsize(path) == 0:
        return False
    import imageio.v2 as iio

    try:
        with _quiet_fork(), iio.get_reader(path) as reader:
            return reader.count_frames() == num_frames
    except Exception:  # noqa: BLE001 - any reader failure means the file is unusable
        return False


def write_video(path, frames, fps=30):
    """Writes frames [N, H, W, 3] (uint8, or float in [0, 1]) as an MP4 (H.264, yuv420p).

    If the MP4 cannot be written or read back (no ffmpeg, or odd H/W, which yuv420p rejects)
    a GIF is written instead, next to `path` with the suffix `.gif`.

    Returns:
      the path actually written.
    """
    import imageio.v2 as iio

    frames = to_uint8(frames)
    if frames.ndim != 4 or frames.shape[-1] != 3:
        raise UserError(f"write_video expects frames [N, H, W, 3], got {frames.shape}")
    try:
        with _quiet_fork(), iio.get_writer(path, fps=fps, codec="libx264", macro_block_size=1,
                                           pixelformat="yuv420p",
                                           ffmpeg_log_level="quiet") as writer:
            for frame in frames:
                writer.append_data(frame)
        if _mp4_ok(path, len(frames)):
            return path
    except Exception as err:  # noqa: BLE001 - fall back on any ffmpeg failure
        _LOG.warning("MP4 writing failed (%s); writing a GIF instead", err)
    if os.path.exists(path):
        os.remove(path)
    gif_path = os.path.splitext(path)[0] + ".gif"
    iio.mimsave(gif_path, list(frames), duration=1000.0 / fps, loop=0)
    return gif_path


def tile_images(images, ncols=None, padding=2, pad_value=255):
    """Tiles images [N, H, W, C] into one [rows H + pads, ncols W + pads, C] uint8 grid.

    Args:
      images: [N, H, W, C] uint8 or float in [0, 1].
      ncols: columns (default ceil(sqrt(N))).
      padding: pixels between and around tiles.
      pad_value: uint8 fill for padding and empty cells.
    """
    images = to_uint8(images)
    n, h, w, c = images.shape
    ncols = ncols or int(np.ceil(np.sqrt(n)))
    nrows = -(-n // ncols)
    grid = np.full((nrows * (h + padding) + padding, ncols * (w + padding) + padding, c),
                   pad_value, np.uint8)
    for k in range(n):
        r, q = divmod(k, ncols)
        y0 = padding + r * (h + padding)
        x0 = padding + q * (w + padding)
        grid[y0:y0 + h, x0:x0 + w] = images[k]
    return grid


def save_image_grid(path, images, ncols=None, padding=2):
    """Tiles images (see `tile_images`) and writes a PNG with PIL; returns the grid array."""
    from PIL import Image

    grid = tile_images(images, ncols, padding)
    Image.fromarray(grid[..., 0] if grid.shape[-1] == 1 else grid).save(path)
    return grid
