"""A mesh's pieces, floaters and topology figures (trimesh).

A piece is a set of faces joined through shared edges. Marching cubes of a learned field finds
every region above the level, and a field has small ones besides the object (specks of
density a few voxels wide): floaters. `remove_small_pieces` drops every piece with fewer than
`fraction * F` of the mesh's `F` faces (threestudio's `isosurface_outlier_n_faces_threshold`,
0.01 by default there and here; 0 keeps everything) and always keeps the largest piece.

The figures a 3D user needs (`mesh_figures`):

- pieces: connected components;
- watertight: every edge has exactly two faces (a closed surface: it can be printed, and a
  boolean or a volume is defined); with consistent winding, the normals agree across edges;
- Euler number `chi = V - E + F`; a closed orientable piece of genus `g` (through-holes) has
  `chi = 2 - 2g`: a sphere or cube 2, a torus 0. Over `P` closed pieces the holes total
  `g = (2P - chi) / 2` (`genus`, given only for a watertight mesh);
- outward: consistent winding and a positive signed volume `(1/6) sum_f a . (b x c)`, i.e.
  the normals point out of the solid.
"""

from __future__ import annotations

import numpy as np

from lmc_jax.errors import UserError

DEFAULT_OUTLIER_FRACTION = 0.01


def _trimesh(vertices, faces):
    import trimesh

    return trimesh.Trimesh(vertices=np.asarray(vertices, np.float64),
                           faces=np.asarray(faces, np.int64), process=False, validate=False)


def check_outlier_fraction(value, name: str = "output.mesh_outlier_fraction") -> float:
    """`float(value)` in [0, 1); anything else is a `UserError` naming the config key."""
    try:
        fraction = float(value)
    except (TypeError, ValueError):
        fraction = float("nan")
    if isinstance(value, bool) or not 0.0 <= fraction < 1.0:
        raise UserError(f"{name}={value!r} is not a fraction in [0, 1): pieces with fewer than "
                        "this fraction of the mesh's faces are removed (0.01 by default, 0 keeps "
                        "every piece)")
    return fraction


def piece_labels(vertices, faces) -> np.ndarray:
    """[F] int: the piece (edge-connected component) of each face, 0..P-1."""
    import trimesh

    faces = np.asarray(faces)
    if len(faces) == 0:
        return np.zeros(0, np.int64)
    mesh = _trimesh(vertices, faces)
    return np.asarray(trimesh.graph.connected_component_labels(
        mesh.face_adjacency, node_count=len(faces)), np.int64)


def keep_faces(vertices, faces, keep) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The faces `keep` ([F] bool) with the vertices they use: (vertices, faces, index of each
    kept vertex in the input)."""
    faces = np.asarray(faces)[np.asarray(keep, bool)]
    used = np.unique(faces)
    remap = np.full(len(vertices), -1, np.int64)
    remap[used] = np.arange(len(used))
    return (np.asarray(vertices)[used], remap[faces].astype(np.int32), used)


def remove_small_pieces(vertices, faces, fraction: float = DEFAULT_OUTLIER_FRACTION
                        ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Drops the pieces with fewer than `fraction * F` faces; the largest piece always stays.

    Returns:
      (vertices, faces, index of each kept vertex in the input).
    """
    fraction = check_outlier_fraction(fraction, "fraction")
    faces = np.asarray(faces)
    if fraction == 0.0 or len(faces) == 0:
        return np.asarray(vertices), faces.astype(np.int32), np.arange(len(vertices))
    labels = piece_labels(vertices, faces)
    sizes = np.bincount(labels)
    big = sizes >= fraction * len(faces)
    big[np.argmax(sizes)] = True
    return keep_faces(vertices, faces, big[labels])


def mesh_figures(vertices, faces) -> dict:
    """`{pieces, watertight, euler, genus, winding_consistent, outward, volume}` of a mesh
    (module docstring); `genus` and `volume` are None unless it is watertight."""
    faces = np.asarray(faces)
    if len(faces) == 0:
        return {"pieces": 0, "watertight": False, "euler": 0, "genus": None,
                "winding_consistent": False, "outward": False, "volume": None}
    mesh = _trimesh(vertices, faces)
    pieces = int(piece_labels(vertices, faces).max()) + 1
    watertight = bool(mesh.is_watertight)
    winding = bool(mesh.is_winding_consistent)
    euler = int(mesh.euler_number)
    volume = float(mesh.volume) if watertight else None
    genus = (2 * pieces - euler) // 2 if watertight else None
    return {"pieces": pieces, "watertight": watertight, "euler": euler, "genus": genus,
            "winding_consistent": winding, "outward": bool(winding and (volume or 0.0) > 0.0),
            "volume": volume}
