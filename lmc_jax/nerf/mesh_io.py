"""Mesh files: binary glTF (GLB), Wavefront OBJ + MTL + PNG, and PLY.

All three carry the same closed mesh (`lmc_jax.nerf.export.write_assets`). The formats differ
in how they store a texture seam, where one surface point has two UVs:

- GLB: a glTF vertex is one (position, UV, normal) tuple, so the vertices on a seam are stored
  once per chart, at identical positions. The normals stored with them are the closed mesh's
  (area-weighted face normals at each position), so shading is smooth across seams; joining
  vertices by position (Blender: Merge by Distance; trimesh: `merge_vertices(merge_tex=True)`)
  gives back the closed mesh.
- OBJ: positions (`v`) and UVs (`vt`) have their own indices (`f p/t ...`), so the file holds
  the closed mesh itself, each position once, and the seams only in the UVs.
- PLY: the closed mesh with vertex colours, untextured.

GLB and OBJ are written in the y-up axes their importers expect (`z_up_to_y_up`, a rotation:
the winding, counter-clockwise seen from outside, is kept); the PLY stays in the field's z-up
axes (as Blender's PLY importer expects).
"""

from __future__ import annotations

import os

import numpy as np

from lmc_jax.nerf.texture import to_uint8


def z_up_to_y_up(points) -> np.ndarray:
    """Field (z up, as `lmc_jax.nerf.cameras`) to glTF/OBJ axes (y up): (x, y, z) -> (x, z, -y).
    """
    points = np.asarray(points)
    return np.stack([points[..., 0], points[..., 2], -points[..., 1]], axis=-1)


def vertex_normals(vertices, faces) -> np.ndarray:
    """[V, 3] unit normals of a mesh's vertices: the area-weighted mean of their faces'
    normals (`(b - a) x (c - a)`, outward for counter-clockwise faces)."""
    v = np.asarray(vertices, np.float64)
    f = np.asarray(faces, np.int64)
    cross = np.cross(v[f[:, 1]] - v[f[:, 0]], v[f[:, 2]] - v[f[:, 0]])  # 2 area * normal
    normals = np.zeros_like(v)
    for k in range(3):
        np.add.at(normals, f[:, k], cross)
    norm = np.linalg.norm(normals, axis=1, keepdims=True)
    return (normals / np.where(norm > 0, norm, 1.0)).astype(np.float32)


def _positions_of(textured) -> np.ndarray:
    """The closed mesh's vertices [V, 3] of a baked mesh (`positions`, or, without them,
    gathered from the copies and `vertex_map`)."""
    if "positions" in textured:
        return np.asarray(textured["positions"], np.float64)
    vmap = np.asarray(textured["vertex_map"], np.int64)
    out = np.zeros((int(vmap.max()) + 1, 3), np.float64)
    out[vmap] = np.asarray(textured["vertices"], np.float64)
    return out


def textured_trimesh(textured: dict, colors=None, normals=None):
    """A `trimesh.Trimesh` with the baked texture as a PBR base colour (metallic 0, rough 1),
    in glTF's y-up axes (`z_up_to_y_up`).

    `colors` [V', 3] (per output vertex) go in the custom vertex attribute `_ALBEDO`: glTF's
    COLOR_0 would multiply the texture in every viewer. `normals` [V', 3] (field axes): the
    vertex normals to store; default those of the closed mesh (`vertex_normals` of the
    positions behind `vertex_map`), the same for every copy of a seam vertex.
    """
    import trimesh
    from PIL import Image

    if normals is None:
        vmap = np.asarray(textured["vertex_map"], np.int64)
        normals = vertex_normals(_positions_of(textured), vmap[textured["faces"]])[vmap]
    material = trimesh.visual.material.PBRMaterial(
        name="albedo", baseColorTexture=Image.fromarray(textured["texture"]),
        metallicFactor=0.0, roughnessFactor=1.0)
    mesh = trimesh.Trimesh(vertices=z_up_to_y_up(textured["vertices"]), faces=textured["faces"],
                           vertex_normals=z_up_to_y_up(normals),
                           visual=trimesh.visual.TextureVisuals(uv=textured["uv"],
                                                                material=material),
                           process=False)
    if colors is not None:
        mesh.vertex_attributes["_ALBEDO"] = np.asarray(colors, np.float32)
    return mesh


def write_glb(path: str, textured: dict, colors=None) -> str:
    """Writes a binary glTF (GLB) with the baked albedo texture and the closed mesh's vertex
    normals (`textured_trimesh`)."""
    data = textured_trimesh(textured, colors).export(file_type="glb", include_normals=True)
    with open(path, "wb") as f:
        f.write(data)
    return path


def write_textured_obj(path: str, textured: dict, colors=None) -> str:
    """Writes OBJ + MTL + PNG: `path`, `path` with .mtl, and `<stem>_albedo.png` beside it.

    The OBJ has the closed mesh's positions once each (`v x y z [r g b]`), the UVs (`vt u v`)
    and faces `f p/t p/t p/t` (1-based) whose position index `p` and UV index `t` differ on the
    seams, in the y-up axes OBJ importers expect (`z_up_to_y_up`); the MTL's `map_Kd` names the
    PNG. `colors` [V', 3] are per baked vertex (copies of one position share a colour).
    """
    from PIL import Image

    stem = os.path.splitext(os.path.basename(path))[0]
    folder = os.path.dirname(os.path.abspath(path))
    mtl, png = f"{stem}.mtl", f"{stem}_albedo.png"
    Image.fromarray(textured["texture"]).save(os.path.join(folder, png))
    with open(os.path.join(folder, mtl), "w") as f:
        f.write(f"# lmc_jax material\nnewmtl albedo\nKa 1 1 1\nKd 1 1 1\nKs 0 0 0\nd 1\n"
                f"illum 1\nmap_Kd {png}\n")
    vmap = np.asarray(textured["vertex_map"], np.int64)
    v = z_up_to_y_up(_positions_of(textured))
    uv_faces = np.asarray(textured["faces"], np.int64)
    faces = np.stack([vmap[uv_faces], uv_faces], axis=-1).reshape(len(uv_faces), 6) + 1
    with open(path, "w") as f:
        f.write(f"# lmc_jax textured mesh\nmtllib {mtl}\n")
        if colors is None:
            np.savetxt(f, v, fmt="v %.6f %.6f %.6f")
        else:
            rgb = np.zeros((len(v), 3))
            rgb[vmap] = to_uint8(colors).astype(np.float64) / 255.0
            np.savetxt(f, np.concatenate([v, rgb], 1), fmt="v %.6f %.6f %.6f %.4f %.4f %.4f")
        np.savetxt(f, np.asarray(textured["uv"], np.float64), fmt="vt %.6f %.6f")
        f.write("usemtl albedo\n")
        np.savetxt(f, faces, fmt="f %d/%d %d/%d %d/%d")
    return path


def write_obj(path, vertices, faces, colors=None) -> None:
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
            rgb = to_uint8(colors).astype(np.float64) / 255.0
            np.savetxt(f, np.concatenate([vertices, rgb], axis=1),
                       fmt="v %.6f %.6f %.6f %.4f %.4f %.4f")
        np.savetxt(f, faces, fmt="f %d %d %d")


def write_ply(path, vertices, faces, colors=None, binary: bool = True) -> None:
    """Writes a PLY mesh (binary little-endian or ASCII) with optional uchar vertex colours."""
    vertices = np.asarray(vertices, np.float32)
    faces = np.asarray(faces, np.int32)
    fields = [("x", "<f4"), ("y", "<f4"), ("z", "<f4")]
    if colors is not None:
        fields += [("red", "u1"), ("green", "u1"), ("blue", "u1")]
    vdata = np.empty(len(vertices), dtype=fields)
    vdata["x"], vdata["y"], vdata["z"] = vertices.T
    if colors is not None:
        rgb = to_uint8(colors)
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
                                       to_uint8(colors).astype(np.float64)], axis=1)
                np.savetxt(f, cols, fmt="%.6f %.6f %.6f %d %d %d")
            np.savetxt(f, faces, fmt="3 %d %d %d")
