"""Closed meshes of analytic density fields: pieces, watertightness, Euler number, volume,
outward normals, floaters, and the same closed mesh in GLB, OBJ and PLY."""

import jax.numpy as jnp
import numpy as np
import pytest

from lmc_jax.errors import UserError
from lmc_jax.nerf import cleanup, export, surface

RES, BOUND, LEVEL = 40, 1.0, 5.0
VOXEL = 2 * BOUND / (RES - 1)
SPHERE_R = 0.6
CUBE_H = 0.5  # half side
TORUS_R, TORUS_A = 0.5, 0.2  # ring radius, tube radius (axis z)


def _solid(inside):
    """Density 5 + 10 d for the signed distance d inside a shape: the level 5 is its
    boundary."""
    return lambda x: LEVEL + 10.0 * inside(x)


sphere = _solid(lambda x: SPHERE_R - jnp.linalg.norm(x, axis=-1))
cube = _solid(lambda x: CUBE_H - jnp.max(jnp.abs(x), axis=-1))
torus = _solid(lambda x: TORUS_A - jnp.hypot(jnp.hypot(x[:, 0], x[:, 1]) - TORUS_R, x[:, 2]))

# name: (field, Euler number, closed-form volume)
SHAPES = {
    "sphere": (sphere, 2, 4.0 / 3.0 * np.pi * SPHERE_R**3),
    "cube": (cube, 2, (2 * CUBE_H) ** 3),
    "torus": (torus, 0, 2 * np.pi**2 * TORUS_R * TORUS_A**2),
}


def _grey(x):
    return jnp.full_like(x, 0.5)


def _mesh(density, res=RES, **kw):
    return export.extract_surface(density, _grey, res, BOUND, threshold=LEVEL, **kw)


@pytest.mark.parametrize("name", list(SHAPES))
def test_analytic_shape_is_one_closed_piece_with_its_euler_number_and_volume(name):
    density, euler, volume = SHAPES[name]
    mesh = _mesh(density)
    fig = mesh["figures"]
    assert fig["pieces"] == 1 and fig["watertight"], fig
    assert fig["euler"] == euler and fig["genus"] == (2 - euler) // 2, fig
    assert fig["winding_consistent"] and fig["outward"], fig
    np.testing.assert_allclose(fig["volume"], volume, rtol=0.03)
    # Every face's normal points to lower density (outward), also inside a torus's hole.
    v, f = mesh["vertices"].astype(np.float64), mesh["faces"]
    a, b, c = v[f[:, 0]], v[f[:, 1]], v[f[:, 2]]
    n = np.cross(b - a, c - a)
    n /= np.linalg.norm(n, axis=1, keepdims=True)
    centre = (a + b + c) / 3
    step = 0.25 * VOXEL
    out_in = np.asarray(density(jnp.asarray(np.concatenate([centre + step * n,
                                                              centre - step * n]),
                                            jnp.float32)))
    assert np.all(out_in[:len(f)] < out_in[len(f):])


def test_torus_hole_is_empty_in_the_mesh():
    v = _mesh(torus)["vertices"]
    ring = np.hypot(v[:, 0], v[:, 1])
    assert ring.min() > TORUS_R - TORUS_A - VOXEL  # no surface inside the hole
    np.testing.assert_allclose(ring.min(), TORUS_R - TORUS_A, atol=VOXEL / 2)


def test_level_on_grid_points_still_gives_a_closed_mesh_without_slivers():
    # 41 points: the cube's faces |x_i| = 0.5 lie on grid planes, so grid values equal the
    # level there (coincident vertices and zero-area faces, unless moved off it).
    res = 41
    mesh = _mesh(cube, res=res)
    fig = mesh["figures"]
    assert fig["pieces"] == 1 and fig["watertight"] and fig["euler"] == 2, fig
    v, f = mesh["vertices"].astype(np.float64), mesh["faces"]
    area = 0.5 * np.linalg.norm(np.cross(v[f[:, 1]] - v[f[:, 0]], v[f[:, 2]] - v[f[:, 0]]), axis=1)
    voxel = 2 * BOUND / (res - 1)
    assert area.min() > 1e-3 * voxel**2
    baked = export.bake_texture(v, f, _grey, texture_size=128)
    assert len(baked["faces"]) == len(f)
    assert set(np.unique(baked["vertex_map"])) == set(range(len(v)))  # every vertex has a UV


def test_solid_cut_by_the_grid_bounds_is_closed():
    # A slab through the whole cube: the padding closes it where the cube cuts it.
    slab = _solid(lambda x: 0.3 - jnp.abs(x[:, 2]))
    fig = _mesh(slab)["figures"]
    assert fig["pieces"] == 1 and fig["watertight"] and fig["euler"] == 2, fig
    np.testing.assert_allclose(fig["volume"], (2 * BOUND) ** 2 * 0.6, rtol=0.03)


def _with_floaters(x):
    """The sphere and four specks of one voxel's radius near the cube's corners."""
    d = SPHERE_R - jnp.linalg.norm(x, axis=-1)
    for corner in ((0.8, 0.8, 0.8), (-0.8, 0.8, -0.8), (0.8, -0.8, 0.0), (-0.85, -0.85, 0.85)):
        speck = VOXEL - jnp.linalg.norm(x - jnp.asarray(corner), axis=-1)
        d = jnp.maximum(d, speck)
    return LEVEL + 10.0 * d


def test_floaters_are_removed_and_kept_with_fraction_zero():
    mesh = _mesh(_with_floaters)
    assert mesh["raw"]["pieces"] == 5 and mesh["figures"]["pieces"] == 1
    assert mesh["figures"]["watertight"] and mesh["figures"]["euler"] == 2
    np.testing.assert_allclose(mesh["figures"]["volume"], SHAPES["sphere"][2], rtol=0.03)
    assert np.linalg.norm(mesh["vertices"], axis=1).max() < SPHERE_R + VOXEL
    everything = _mesh(_with_floaters, outlier_fraction=0)
    fig = everything["figures"]
    assert fig["pieces"] == 5 and fig["watertight"] and fig["euler"] == 10, fig
    assert len(everything["faces"]) == everything["raw"]["faces"] > len(mesh["faces"])


def test_pieces_above_the_fraction_stay():
    off = jnp.asarray([0.5, 0.0, 0.0])
    two = _solid(lambda x: 0.3 - jnp.minimum(jnp.linalg.norm(x - off, axis=-1),
                                             jnp.linalg.norm(x + off, axis=-1)))
    fig = _mesh(two, outlier_fraction=0.4)["figures"]
    assert fig["pieces"] == 2 and fig["euler"] == 4 and fig["genus"] == 0
    # A fraction above every piece's share keeps the largest piece.
    assert _mesh(two, outlier_fraction=0.9)["figures"]["pieces"] == 1


@pytest.mark.parametrize("bad", [-0.1, 1.0, "some", True, None])
def test_outlier_fraction_is_validated(bad):
    with pytest.raises(UserError, match=r"mesh_outlier_fraction.*\[0, 1\)"):
        cleanup.check_outlier_fraction(bad)
    with pytest.raises(UserError, match="fraction"):
        _mesh(sphere, outlier_fraction=bad)


def test_surface_module_keeps_vertices_inside_their_grid_edges():
    grid = surface.density_grid(torus, 20, BOUND)
    padded, bound = surface.closed_grid(grid, LEVEL, BOUND)
    assert padded.shape == (22, 22, 22) and bound == pytest.approx(BOUND + 2 * BOUND / 19)
    v, _ = surface.marching_cubes(padded, LEVEL, bound)
    idx = (v.astype(np.float64) + bound) / (2 * bound / 21)
    frac = idx - np.round(idx)
    along = np.abs(frac) > 1e-3
    assert np.all(along.sum(1) == 1)  # on exactly one grid edge
    t = idx[along] - np.floor(idx[along])
    assert t.min() >= surface.EDGE_MARGIN - 1e-4 and t.max() <= 1 - surface.EDGE_MARGIN + 1e-4


def test_smoothing_closes_a_voxel_wide_tunnel():
    # A ball drilled through along z by a tunnel of one voxel's radius, which holds the grid's
    # four central columns: a handle (Euler number 0).
    def drilled(x):
        ball = SPHERE_R - jnp.linalg.norm(x, axis=-1)
        return LEVEL + 10.0 * jnp.minimum(ball, jnp.hypot(x[:, 0], x[:, 1]) - VOXEL)

    raw = _mesh(drilled)["figures"]
    assert raw["watertight"] and raw["pieces"] == 1 and raw["euler"] == 0, raw
    fig = _mesh(drilled, smooth=1.0)["figures"]
    assert fig["watertight"] and fig["pieces"] == 1 and fig["euler"] == 2, fig
    np.testing.assert_allclose(fig["volume"], SHAPES["sphere"][2], rtol=0.03)
    with pytest.raises(UserError, match="mesh_smooth=-1"):
        export.check_smooth(-1)
    with pytest.raises(export.NoSurfaceError, match="lower output.mesh_smooth"):
        _mesh(_solid(lambda x: VOXEL - jnp.linalg.norm(x, axis=-1)), smooth=3.0)


@pytest.mark.parametrize("seed", [0, 1])
def test_noise_with_ambiguous_cubes_gives_closed_consistent_pieces(seed):
    # Uniform noise: many cubes of Lewiner's ambiguous cases, some with a vertex inside the
    # cube (not on a grid edge), which stays where it is.
    grid = np.random.default_rng(seed).random((10, 10, 10)).astype(np.float32)
    padded, bound = surface.closed_grid(grid, 0.5, BOUND)
    v, f = surface.marching_cubes(padded, 0.5, bound)
    idx = (v.astype(np.float64) + bound) / (2 * bound / 11)
    off = np.abs(idx - np.round(idx)) > 1e-3
    assert (off.sum(1) > 1).any()  # cube-interior vertices are there
    t = (idx - np.floor(idx))[off.sum(1) == 1]
    t = t[(t > 1e-3) & (t < 1 - 1e-3)]
    assert t.min() >= surface.EDGE_MARGIN - 1e-4 and t.max() <= 1 - surface.EDGE_MARGIN + 1e-4
    fig = cleanup.mesh_figures(v, f)
    assert fig["watertight"] and fig["winding_consistent"] and fig["outward"], fig
    assert fig["pieces"] > 1


@pytest.fixture(scope="module")
def torus_files(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("torus")
    out = export.write_assets(str(workdir), torus, _grey, 32, BOUND, threshold=LEVEL,
                              texture_size=128)
    return workdir, out


def test_torus_assets_report_their_figures(torus_files):
    _, out = torus_files
    assert out["mesh_pieces"] == out["mesh_pieces_raw"] == 1
    assert out["mesh_watertight"] and out["mesh_euler"] == 0 and out["mesh_genus"] == 1
    assert out["mesh_outlier_fraction"] == 0.01


@pytest.mark.parametrize("name", ["mesh.glb", "mesh.obj", "mesh.ply"])
def test_written_files_reload_as_the_same_closed_torus(torus_files, name):
    import trimesh

    workdir, out = torus_files
    mesh = trimesh.load(workdir / name, force="mesh")
    if name == "mesh.ply":  # the closed mesh as written, indices and all
        assert len(mesh.vertices) == out["mesh_vertices"]
    # GLB and OBJ readers give a seam vertex one copy per UV; joined by position, they are
    # the closed mesh again (mesh_io's docstring).
    mesh.merge_vertices(merge_tex=True, merge_norm=True)
    fig = cleanup.mesh_figures(mesh.vertices, mesh.faces)
    assert len(mesh.faces) == out["mesh_faces"] and len(mesh.vertices) == out["mesh_vertices"]
    assert fig["pieces"] == 1 and fig["watertight"] and fig["euler"] == 0 and fig["outward"]
    np.testing.assert_allclose(fig["volume"], out["mesh_volume"], rtol=1e-4)


def test_obj_stores_each_position_once(torus_files):
    workdir, out = torus_files
    lines = (workdir / "mesh.obj").read_text().splitlines()
    assert sum(ln.startswith("v ") for ln in lines) == out["mesh_vertices"]
    assert sum(ln.startswith("vt ") for ln in lines) > out["mesh_vertices"]  # seams in UV only


def test_glb_normals_are_the_closed_meshs_and_point_outward(torus_files):
    import trimesh

    workdir, _ = torus_files
    (mesh,) = trimesh.load(workdir / "mesh.glb").geometry.values()
    stored = np.asarray(mesh.vertex_normals)
    field = np.stack([mesh.vertices[:, 0], -mesh.vertices[:, 2], mesh.vertices[:, 1]], -1)
    n_field = np.stack([stored[:, 0], -stored[:, 2], stored[:, 1]], -1)
    # Outward on a torus: along the tube's radius, from the ring's centre line.
    ring = np.hypot(field[:, 0], field[:, 1])
    centre = np.stack([field[:, 0] * TORUS_R / ring, field[:, 1] * TORUS_R / ring,
                       np.zeros_like(ring)], -1)
    radial = field - centre
    radial /= np.linalg.norm(radial, axis=1, keepdims=True)
    assert np.einsum("ij,ij->i", n_field, radial).min() > 0.9
