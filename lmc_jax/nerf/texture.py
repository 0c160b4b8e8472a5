"""Texture baking: a UV atlas for a mesh and its albedo painted into an image.

xatlas cuts the closed mesh into charts along seams and packs them into the unit square; a
vertex on a seam gets one copy per chart (`vertex_map` says which input vertex each copy is).
Each texel whose centre `p` lies in a UV triangle `(a, b, c)` takes the albedo at the 3D point
with the same barycentric coordinates,

    p = l0 a + l1 b + l2 c,  l0 + l1 + l2 = 1, l_i >= 0   ->   albedo(l0 A + l1 B + l2 C),

(`bake_texture`); texels outside every chart take the mean of their filled 4-neighbours,
`padding + 1` times, then the mean colour (`_dilate`), so bilinear and mip-mapped lookups near
a seam stay on the surface's colour.
"""

from __future__ import annotations

import numpy as np

from lmc_jax.nerf.surface import PointFn, evaluate_in_chunks


def to_uint8(images) -> np.ndarray:
    """Float images or colours in [0, 1] (or uint8) -> uint8, rounding and clipping."""
    images = np.asarray(images)
    if images.dtype == np.uint8:
        return images
    return np.clip(np.round(images * 255.0), 0, 255).astype(np.uint8)


def _rasterize_uv(tri_px: np.ndarray, texture_size: int, max_candidates: int = 1 << 20
                  ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
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


def _dilate(image: np.ndarray, filled: np.ndarray, steps: int) -> np.ndarray:
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


def bake_texture(vertices, faces, albedo_fn: PointFn, texture_size: int = 1024,
                 chunk_size: int = 65536, padding: int = 4) -> dict:
    """UV-unwraps a mesh with xatlas and bakes `albedo_fn` into a texture.

    Each texel inside a UV triangle gets the albedo at the 3D point with the same barycentric
    coordinates, and each texel under a UV vertex that no triangle covers the albedo at that
    vertex; charts are `padding` texels apart and the colours are spread that far past their
    edges (`_dilate`).

    Returns:
      dict with `positions` [V, 3] (the input vertices), `vertices` [V', 3] float32 (split
      along UV seams), `faces` [F, 3] int32, `uv`
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
    # The texel under each UV vertex that no triangle covers (a sliver's corner) takes that
    # vertex's albedo, so a lookup at any vertex reads its own chart's colour.
    corner_tex = (np.clip(np.floor(px[:, 1]), 0, t - 1).astype(np.int64) * t
                  + np.clip(np.floor(px[:, 0]), 0, t - 1).astype(np.int64))
    filled = np.zeros(t * t, bool)
    filled[tex] = True
    extra, first = np.unique(corner_tex, return_index=True)
    first = first[~filled[extra]]
    tex = np.concatenate([tex, corner_tex[first]])
    points = np.concatenate([points, vertices[vmap][first]])
    colors = evaluate_in_chunks(albedo_fn, points, chunk_size) if len(points) else points
    image = np.zeros((t * t, 3), np.float32)
    image[tex] = np.clip(colors, 0.0, 1.0)
    filled[tex] = True
    image = _dilate(image.reshape(t, t, 3), filled.reshape(t, t), padding + 1)
    return {"positions": vertices,
            "vertices": vertices[vmap], "faces": np.asarray(new_faces, np.int32),
            "uv": uv.astype(np.float32), "vertex_map": np.asarray(vmap, np.int64),
            "texture": to_uint8(image)}
