"""Outputs of a trained field: meshes (textured GLB, OBJ+MTL+PNG, PLY) and videos.

Mesh extraction: evaluate the density on a regular grid over the cube [-bound, bound]^3, run
marching cubes (scikit-image) at a density threshold, colour each vertex with the field's
albedo at that vertex. The threshold is 'auto' by default (`opaque_threshold`: the density whose
iso-surface has the silhouette of the rays that are at least half opaque), or a fixed density;
only a field with no opaque ray has no surface (`NoSurfaceError`). Faces are wound
counter-clockwise seen from outside (outward normals, where density is below the threshold).
The grid is evaluated with point Gaussians whose variance is that of a uniform voxel,
`voxel^2 / 12` per axis, so the IPE is band-limited to the grid resolution.

Textures: xatlas unwraps the mesh, each texel inside a UV triangle takes the albedo at its 3D
point (`bake_texture`), and trimesh writes the GLB (PBR base-colour texture). OBJ (with
`v x y z r g b` vertex colours, `vt`, MTL and PNG) and PLY (binary or ASCII, uchar vertex
colours) are plain NumPy/PIL writers; MP4 via imageio-ffmpeg with a GIF fallback.
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


class NoSurfaceError(UserError):
    """The density grid has no surface to mesh: an empty field, or a fixed threshold above it."""


AUTO_THRESHOLD = "auto"
OPAQUE_DEPTH = float(np.log(2.0))  # optical depth at which a ray's opacity 1 - e^-tau is 1/2


def opaque_threshold(grid, bound):
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


def check_threshold(threshold):
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


def surface_threshold(grid, bound, threshold=AUTO_THRESHOLD):
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


def extract_surface(density_fn, albedo_fn, resolution=128, bound=1.0,
                    threshold=AUTO_THRESHOLD, chunk_size=65536):
    """Coloured mesh of the iso-surface of `density_fn` at `surface_threshold`.

    The grid is padded with one layer of zero density, so an object that touches the cube
    still gives a closed mesh.

    Args:
      density_fn: [M, 3] -> [M] densities; albedo_fn: [M, 3] -> [M, 3] colours in [0, 1].
      resolution: grid points per axis over [-bound, bound].
      threshold: 'auto' (`opaque_threshold`) or a density.

    Returns:
      dict with `vertices` [V, 3] float32, `faces` [F, 3] int32, `colors` [V, 3] float32 and
      `threshold` (the level used).

    Raises:
      NoSurfaceError: see `surface_threshold`.
    """
    grid = density_grid(density_fn, resolution, bound, chunk_size)
    level = surface_threshold(grid, bound, threshold)
    spacing = 2.0 * bound / (resolution - 1)
    padded = np.pad(grid, 1, constant_values=min(float(np.min(grid)), 0.0))
    vertices, faces = weld(*marching_cubes(padded, level, bound + spacing), 0.05 * spacing)
    colors = evaluate_in_chunks(albedo_fn, vertices, chunk_size)
    return {"vertices": vertices, "faces": faces,
            "colors": np.clip(colors, 0.0, 1.0).astype(np.float32), "threshold": level}


def weld(vertices, faces, tol):
    """Collapses every edge shorter than `tol` and drops the faces that vanish with it.

    Marching cubes leaves tiny triangles (edges of ~1% of a voxel) where the level passes
    close to a grid point; a UV unwrapper skips them, and their vertices would get no UV.
    Vertices joined by short edges become one, at their mean position.

    Returns:
      (vertices [V', 3] float32, faces [F', 3] int32), every vertex used by a face.
    """
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    vertices = np.asarray(vertices, np.float64)
    faces = np.asarray(faces, np.int64)
    edges = faces[:, [0, 1, 1, 2, 2, 0]].reshape(-1, 2)
    short = edges[np.linalg.norm(vertices[edges[:, 0]] - vertices[edges[:, 1]], axis=1) < tol]
    n = len(vertices)
    graph = coo_matrix((np.ones(len(short)), (short[:, 0], short[:, 1])), shape=(n, n))
    num, label = connected_components(graph, directed=False)
    faces = label[faces]
    keep = ((faces[:, 0] != faces[:, 1]) & (faces[:, 1] != faces[:, 2])
            & (faces[:, 0] != faces[:, 2]))
    faces = faces[keep]
    merged = np.zeros((num, 3))
    np.add.at(merged, label, vertices)
    merged /= np.bincount(label, minlength=num)[:, None]
    used = np.unique(faces)
    remap = np.full(num, -1, np.int64)
    remap[used] = np.arange(len(used))
    return merged[used].astype(np.float32), remap[faces].astype(np.int32)


def extract_mesh(field, params, resolution=128, bound=1.0, threshold=AUTO_THRESHOLD,
                 chunk_size=65536):
    """Coloured mesh of an `MLPField` (`extract_surface` of its density and albedo).

    The field is evaluated with point Gaussians of a uniform voxel's variance `voxel^2 / 12`.
    """
    voxel = 2.0 * bound / (resolution - 1)
    variance = voxel**2 / 12.0
    return extract_surface(field_density_fn(field, params, variance),
                           field_albedo_fn(field, params, variance), resolution, bound,
                           threshold, chunk_size)


def _rasterize_uv(tri_px, texture_size, max_candidates=1 << 20):
    """Texels whose centres lie in UV triangles: (texel index, face, barycentrics [K, 3]).

    `tri_px` [F, 3, 2] holds pixel coordinates (x right, y down); texel (row r, column c) has
    its centre at (c + 0.5, r + 0.5). A texel on a shared edge goes to the first face.
    """
    t = texture_size
    lo = np.clip(np.ceil(tri_px.min(1) - 0.5), 0, t - 1).astype(np.int64)
    hi = np.clip(np.floor(tri_px.max(1) - 0.5), 0, t - 1).astype(np.int64)
    w, h = np.maximum(hi[:, 0] - lo[:, 0] + 1, 0), np.maximum(hi[:, 1] - lo[:, 1] + 1, 0)
    count = w * h
    out_tex, out_face, out_bary = [], [], []
    ends = np.cumsum(count)
    start = 0
    while start < len(tri_px):
        base = ends[start - 1] if start else 0
        stop = max(int(np.searchsorted(ends, base + max_candidates, side="right")), start + 1)
        faces = np.arange(start, stop)
        face = np.repeat(faces, count[start:stop])
        k = np.arange(len(face)) - np.repeat(np.cumsum(count[start:stop]) - count[start:stop],
                                             count[start:stop])
        cx = lo[face, 0] + k % w[face]
        cy = lo[face, 1] + k // w[face]
        a, b, c = tri_px[face, 0], tri_px[face, 1], tri_px[face, 2]
        e1, e2 = b - a, c - a
        q = np.stack([cx + 0.5, cy + 0.5], -1) - a
        den = e1[:, 0] * e2[:, 1] - e2[:, 0] * e1[:, 1]
        ok = np.abs(den) > 1e-12
        den = np.where(ok, den, 1.0)
        l1 = (q[:, 0] * e2[:, 1] - e2[:, 0] * q[:, 1]) / den
        l2 = (e1[:, 0] * q[:, 1] - q[:, 0] * e1[:, 1]) / den
        l0 = 1.0 - l1 - l2
        tol = -1e-9
        inside = ok & (l0 >= tol) & (l1 >= tol) & (l2 >= tol)
        out_tex.append((cy * t + cx)[inside])
        out_face.append(face[inside])
        out_bary.append(np.stack([l0, l1, l2], -1)[inside])
        start = stop
    tex, face, bary = (np.concatenate(out_tex), np.concatenate(out_face),
                       np.concatenate(out_bary))
    tex, first = np.unique(tex, return_index=True)
    return tex, face[first], bary[first]


def _dilate(image, filled, steps):
    """Spreads colours into unfilled texels (mean of filled 4-neighbours), `steps` times; the
    rest takes the mean colour, so bilinear and mip-mapped lookups near seams stay on-colour."""
    image, filled = image.copy(), filled.copy()
    for _ in range(steps):
        if filled.all():
            break
        acc = np.zeros_like(image)
        num = np.zeros(filled.shape, np.float32)
        pad_img = np.pad(image * filled[..., None], ((1, 1), (1, 1), (0, 0)))
        pad_f = np.pad(filled.astype(np.float32), 1)
        for dy, dx in ((0, 1), (2, 1), (1, 0), (1, 2)):
            acc += pad_img[dy:dy + image.shape[0], dx:dx + image.shape[1]]
            num += pad_f[dy:dy + image.shape[0], dx:dx + image.shape[1]]
        grow = ~filled & (num > 0)
        image[grow] = acc[grow] / num[grow, None]
        filled = filled | grow
    if filled.any() and not filled.all():
        image[~filled] = image[filled].mean(0)
    return image


def bake_texture(vertices, faces, albedo_fn, texture_size=1024, chunk_size=65536,
                 padding=4):
    """UV-unwraps a mesh with xatlas and bakes `albedo_fn` into a texture.

    Each texel inside a UV triangle gets the albedo at the 3D point with the same barycentric
    coordinates; charts are `padding` texels apart and the colours are spread that far past
    their edges (`_dilate`).

    Returns:
      dict with `vertices` [V', 3] float32 (split along UV seams), `faces` [F, 3] int32, `uv`
      [V', 2] float32 (OpenGL convention: v up, image row 0 at v = 1), `vertex_map` [V'] (index
      into the input vertices) and `texture` [T, T, 3] uint8.
    """
    import xatlas

    vertices = np.asarray(vertices, np.float32)
    atlas = xatlas.Atlas()
    atlas.add_mesh(vertices, np.asarray(faces, np.uint32))
    pack = xatlas.PackOptions()
    pack.resolution = texture_size
    pack.padding = padding
    pack.bilinear = True
    atlas.generate(pack_options=pack)
    vmap, new_faces, uv = atlas[0]
    uv = np.asarray(uv, np.float64)
    t = texture_size
    px = np.stack([uv[:, 0] * t, (1.0 - uv[:, 1]) * t], -1)
    tex, face, bary = _rasterize_uv(px[new_faces], t)
    corners = vertices[vmap][new_faces[face]].astype(np.float64)  # [K, 3, 3]
    points = np.einsum("kj,kjd->kd", bary, corners).astype(np.float32)
    colors = evaluate_in_chunks(albedo_fn, points, chunk_size) if len(points) else points
    image = np.zeros((t * t, 3), np.float32)
    image[tex] = np.clip(colors, 0.0, 1.0)
    filled = np.zeros(t * t, bool)
    filled[tex] = True
    image = _dilate(image.reshape(t, t, 3), filled.reshape(t, t), padding + 1)
    return {"vertices": vertices[vmap], "faces": np.asarray(new_faces, np.int32),
            "uv": uv.astype(np.float32), "vertex_map": np.asarray(vmap, np.int64),
            "texture": to_uint8(image)}


def z_up_to_y_up(points):
    """Field (z up, as `lmc_jax.nerf.cameras`) to glTF/OBJ axes (y up): (x, y, z) -> (x, z, -y).
    """
    points = np.asarray(points)
    return np.stack([points[..., 0], points[..., 2], -points[..., 1]], axis=-1)


def textured_trimesh(textured, colors=None):
    """A `trimesh.Trimesh` with the baked texture as a PBR base colour (metallic 0, rough 1),
    in glTF's y-up axes (`z_up_to_y_up`).

    `colors` [V', 3] (per output vertex) go in the custom vertex attribute `_ALBEDO`: glTF's
    COLOR_0 would multiply the texture in every viewer.
    """
    import trimesh
    from PIL import Image

    material = trimesh.visual.material.PBRMaterial(
        name="albedo", baseColorTexture=Image.fromarray(textured["texture"]),
        metallicFactor=0.0, roughnessFactor=1.0)
    mesh = trimesh.Trimesh(vertices=z_up_to_y_up(textured["vertices"]), faces=textured["faces"],
                           visual=trimesh.visual.TextureVisuals(uv=textured["uv"],
                                                                material=material),
                           process=False)
    if colors is not None:
        mesh.vertex_attributes["_ALBEDO"] = np.asarray(colors, np.float32)
    return mesh


def write_glb(path, textured, colors=None):
    """Writes a binary glTF (GLB) with the baked albedo texture (`textured_trimesh`)."""
    data = textured_trimesh(textured, colors).export(file_type="glb")
    with open(path, "wb") as f:
        f.write(data)
    return path


def write_textured_obj(path, textured, colors=None):
    """Writes OBJ + MTL + PNG: `path`, `path` with .mtl, and `<stem>_albedo.png` beside it.

    The OBJ has `v x y z [r g b]`, `vt u v` and `f a/a b/b c/c` (1-based; position and UV
    share the index), in the y-up axes OBJ importers expect (`z_up_to_y_up`); the MTL's
    `map_Kd` names the PNG.
    """
    from PIL import Image

    stem = os.path.splitext(os.path.basename(path))[0]
    folder = os.path.dirname(os.path.abspath(path))
    mtl, png = f"{stem}.mtl", f"{stem}_albedo.png"
    Image.fromarray(textured["texture"]).save(os.path.join(folder, png))
    with open(os.path.join(folder, mtl), "w") as f:
        f.write(f"# lmc_jax material\nnewmtl albedo\nKa 1 1 1\nKd 1 1 1\nKs 0 0 0\nd 1\n"
                f"illum 1\nmap_Kd {png}\n")
    v = z_up_to_y_up(np.asarray(textured["vertices"], np.float64))
    faces = np.asarray(textured["faces"], np.int64) + 1
    with open(path, "w") as f:
        f.write(f"# lmc_jax textured mesh\nmtllib {mtl}\n")
        if colors is None:
            np.savetxt(f, v, fmt="v %.6f %.6f %.6f")
        else:
            rgb = _colors_uint8(colors).astype(np.float64) / 255.0
            np.savetxt(f, np.concatenate([v, rgb], 1), fmt="v %.6f %.6f %.6f %.4f %.4f %.4f")
        np.savetxt(f, np.asarray(textured["uv"], np.float64), fmt="vt %.6f %.6f")
        f.write("usemtl albedo\n")
        np.savetxt(f, np.repeat(faces, 2, axis=1), fmt="f %d/%d %d/%d %d/%d")
    return path


def write_assets(workdir, density_fn, albedo_fn, resolution=128, bound=1.0,
                 threshold=AUTO_THRESHOLD, texture_size=1024, chunk_size=65536):
    """Meshes a field and writes mesh.glb, mesh.obj (+ mesh.mtl, mesh_albedo.png), mesh.ply.

    The GLB and OBJ carry the baked albedo texture (`bake_texture`) and vertex colours, y up
    as their importers expect; the PLY has vertex colours on the welded mesh, in the field's
    z-up axes (as Blender's PLY importer expects).

    Returns:
      `{"mesh_vertices", "mesh_faces", "mesh_threshold", "texture_size", "no_surface"}`, or,
      when there is no surface (`NoSurfaceError`), `mesh_vertices = mesh_faces = 0`,
      `no_surface: True` and `no_surface_reason`.
    """
    try:
        mesh = extract_surface(density_fn, albedo_fn, resolution, bound, threshold, chunk_size)
    except NoSurfaceError as err:
        _LOG.warning("%s: no mesh written", err)
        return {"mesh_vertices": 0, "mesh_faces": 0, "no_surface": True,
                "no_surface_reason": str(err)}
    os.makedirs(workdir, exist_ok=True)
    v, f, c = mesh["vertices"], mesh["faces"], mesh["colors"]
    textured = bake_texture(v, f, albedo_fn, texture_size, chunk_size)
    tc = c[textured["vertex_map"]]
    files = {"glb": write_glb(os.path.join(workdir, "mesh.glb"), textured, tc),
             "obj": write_textured_obj(os.path.join(workdir, "mesh.obj"), textured, tc),
             "ply": os.path.join(workdir, "mesh.ply")}
    write_ply(files["ply"], v, f, c)
    return {"mesh_vertices": len(v), "mesh_faces": len(f), "mesh_threshold": mesh["threshold"],
            "texture_size": texture_size, "no_surface": False}


def write_field_assets(workdir, field, params, resolution=128, bound=1.0,
                       threshold=AUTO_THRESHOLD, texture_size=1024, chunk_size=65536):
    """`write_assets` for an `MLPField` (point Gaussians of a voxel's variance)."""
    variance = (2.0 * bound / (resolution - 1)) ** 2 / 12.0
    return write_assets(workdir, field_density_fn(field, params, variance),
                        field_albedo_fn(field, params, variance), resolution, bound, threshold,
                        texture_size, chunk_size)


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
