"""Mesh extraction and the file writers (OBJ, PLY, video, PNG grid)."""

import imageio.v2 as iio
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lmc_jax import io
from lmc_jax.errors import UserError
from lmc_jax.nerf import export
from lmc_jax.nerf import field as field_lib


def _sphere_density(x, radius=0.6):
    """10 inside a ball, falling linearly through 5 at |x| = radius."""
    return 5.0 + 10.0 * (radius - jnp.linalg.norm(x, axis=-1))


def test_marching_cubes_on_analytic_sphere():
    res, bound, radius = 40, 1.0, 0.6
    grid = export.density_grid(_sphere_density, res, bound, chunk_size=5000)  # 13 chunks
    assert grid.shape == (res, res, res)
    verts, faces = export.marching_cubes(grid, 5.0, bound)
    voxel = 2 * bound / (res - 1)
    r = np.linalg.norm(verts, axis=-1)
    assert np.abs(r - radius).max() < voxel
    assert np.abs(verts.mean(0)).max() < voxel
    # Outward (counter-clockwise) winding: positive signed volume close to the ball's.
    a, b, c = verts[faces[:, 0]], verts[faces[:, 1]], verts[faces[:, 2]]
    volume = np.sum(np.einsum("ij,ij->i", a, np.cross(b, c))) / 6.0
    np.testing.assert_allclose(volume, 4.0 / 3.0 * np.pi * radius**3, rtol=0.03)
    with pytest.raises(UserError, match="threshold"):
        export.marching_cubes(grid, 1e3, bound)


def test_extract_mesh_from_field():
    field = field_lib.MLPField(width=8, depth=1, max_deg=2, blob_density=10.0, blob_radius=0.4)
    x = jnp.zeros((1, 3))
    shapes = jax.eval_shape(field.init, jax.random.PRNGKey(0), x, x)
    params = jax.tree_util.tree_map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)
    # Zero MLP: density = softplus(blob), albedo = 0.5; the blob's level set is a sphere.
    mesh = export.extract_mesh(field, params, resolution=24, bound=1.0, threshold=5.0)
    v, f, c = mesh["vertices"], mesh["faces"], mesh["colors"]
    assert v.shape[1] == 3 and f.shape[1] == 3 and c.shape == v.shape and len(f) > 100
    level = np.log(np.expm1(5.0))  # softplus^-1(5)
    expected_r = 0.4 * np.sqrt(2.0 * np.log(10.0 / level))
    np.testing.assert_allclose(np.linalg.norm(v, axis=-1), expected_r, atol=2.0 / 23)
    np.testing.assert_allclose(c, 0.5, atol=1e-6)


def _mesh():
    verts = np.asarray([[0, 0, 0], [1, 0, 0], [0, 1, 0], [0, 0, 1.5]], np.float32)
    faces = np.asarray([[0, 2, 1], [0, 1, 3], [0, 3, 2], [1, 2, 3]], np.int32)
    colors = np.asarray([[1, 0, 0], [0, 1, 0], [0, 0, 1], [0.5, 0.5, 0.5]], np.float32)
    return verts, faces, colors


def test_write_obj(tmp_path):
    verts, faces, colors = _mesh()
    path = tmp_path / "m.obj"
    export.write_obj(path, verts, faces, colors)
    lines = path.read_text().splitlines()
    v = np.asarray([[float(x) for x in ln.split()[1:]] for ln in lines if ln.startswith("v ")])
    f = np.asarray([[int(x) for x in ln.split()[1:]] for ln in lines if ln.startswith("f ")])
    np.testing.assert_allclose(v[:, :3], verts, atol=1e-6)
    np.testing.assert_allclose(v[:, 3:], np.round(colors * 255) / 255, atol=1e-4)
    np.testing.assert_array_equal(f, faces + 1)


def _read_ply(path):
    data = path.read_bytes()
    end = data.index(b"end_header\n") + len(b"end_header\n")
    header = data[:end].decode().splitlines()
    nv = int(next(ln for ln in header if ln.startswith("element vertex")).split()[-1])
    nf = int(next(ln for ln in header if ln.startswith("element face")).split()[-1])
    if "format binary_little_endian 1.0" in header:
        vt = np.dtype([("xyz", "<f4", (3,)), ("rgb", "u1", (3,))])
        ft = np.dtype([("n", "u1"), ("idx", "<i4", (3,))])
        v = np.frombuffer(data[end:end + nv * vt.itemsize], vt)
        f = np.frombuffer(data[end + nv * vt.itemsize:], ft)
        assert len(f) == nf and np.all(f["n"] == 3)
        return v["xyz"], v["rgb"], f["idx"]
    rows = data[end:].decode().split("\n")
    v = np.asarray([[float(x) for x in r.split()] for r in rows[:nv]])
    f = np.asarray([[int(x) for x in r.split()] for r in rows[nv:nv + nf]])
    assert np.all(f[:, 0] == 3)
    return v[:, :3], v[:, 3:].astype(np.uint8), f[:, 1:]


@pytest.mark.parametrize("binary", [True, False])
def test_write_ply(tmp_path, binary):
    verts, faces, colors = _mesh()
    path = tmp_path / "m.ply"
    export.write_ply(path, verts, faces, colors, binary=binary)
    v, rgb, f = _read_ply(path)
    np.testing.assert_allclose(v, verts, atol=1e-6)
    np.testing.assert_array_equal(rgb, np.round(colors * 255).astype(np.uint8))
    np.testing.assert_array_equal(f, faces)


@pytest.mark.filterwarnings("ignore:os.fork:RuntimeWarning")  # ffmpeg reader: fork+exec
def test_write_video_mp4(tmp_path):
    rng = np.random.default_rng(0)
    frames = rng.random((7, 32, 48, 3)).astype(np.float32)
    path = export.write_video(str(tmp_path / "orbit.mp4"), frames, fps=10)
    assert path.endswith(".mp4")
    with iio.get_reader(path) as reader:
        assert reader.count_frames() == 7
        assert reader.get_data(0).shape == (32, 48, 3)


def test_write_video_falls_back_to_gif(tmp_path):
    # yuv420p H.264 cannot encode odd sizes: the writer falls back to a GIF.
    frames = np.random.default_rng(1).integers(0, 255, (5, 33, 47, 3), dtype=np.uint8)
    path = export.write_video(str(tmp_path / "orbit.mp4"), frames, fps=10)
    assert path.endswith(".gif")
    assert not (tmp_path / "orbit.mp4").exists()
    gif = iio.mimread(path)
    assert len(gif) == 5 and gif[0].shape[:2] == (33, 47)


def test_io_grid_replaces_tile_images():
    images = np.stack([np.full((8, 10, 3), 10 * k, np.uint8) for k in range(5)])
    grid = io.grid([images[:3], images[3:]], pad=2)
    assert grid.shape == (2 * (8 + 2) + 2, 3 * (10 + 2) + 2, 3)
    np.testing.assert_array_equal(grid[2:10, 14:24], 10)  # row 0, image 1
    np.testing.assert_array_equal(grid[12:20, 14:24], 40)  # row 1, image 4
    np.testing.assert_array_equal(grid[12:20, 26:36], 255)  # empty cell
    assert not hasattr(export, "tile_images")


# A ball whose density falls linearly from PEAK at the centre to 0 at RADIUS: its peak is
# below the old fixed threshold of 10, as for the 'a purple box' runs of issue 20.
PEAK, RADIUS = 8.0, 0.5


def _faint_ball(x):
    return PEAK * jnp.maximum(1.0 - jnp.linalg.norm(x, axis=-1) / RADIUS, 0.0)


def _albedo(x):
    """Colour varying over the surface: red with x, blue against z, green constant."""
    return jnp.stack([0.5 + 0.8 * x[:, 0], jnp.full_like(x[:, 0], 0.25),
                      0.6 - 0.8 * x[:, 2]], axis=-1)


def _albedo_np(x):
    return np.clip(np.asarray(_albedo(jnp.asarray(x, jnp.float32))), 0.0, 1.0)


def _opaque_radius():
    """Impact parameter b at which the optical depth through the ball falls to ln 2."""
    from scipy import integrate, optimize

    def depth(b):
        half = np.sqrt(RADIUS**2 - b**2)
        return 2.0 * integrate.quad(lambda s: PEAK * (1.0 - np.hypot(b, s) / RADIUS), 0, half)[0]

    return optimize.brentq(lambda b: depth(b) - np.log(2.0), 0.0, RADIUS - 1e-9)


def test_auto_threshold_meshes_a_faint_ball_at_its_opaque_radius():
    res = 48
    voxel = 2.0 / (res - 1)
    mesh = export.extract_surface(_faint_ball, _albedo, res, 1.0)  # threshold 'auto'
    r = np.linalg.norm(mesh["vertices"], axis=-1)
    b = _opaque_radius()  # 0.392: where the rendered ball stops being opaque
    assert abs(r.mean() - b) < 0.25 * voxel and r.max() - r.min() < 0.25 * voxel
    np.testing.assert_allclose(mesh["threshold"], PEAK * (1.0 - b / RADIUS), rtol=0.1)
    np.testing.assert_allclose(mesh["colors"], _albedo_np(mesh["vertices"]), atol=1e-5)
    # A fixed level is still available: the ball's level set at 4 is the sphere |x| = 0.25.
    fixed = export.extract_surface(_faint_ball, _albedo, res, 1.0, threshold="4")
    np.testing.assert_allclose(np.linalg.norm(fixed["vertices"], axis=-1), 0.25, atol=voxel / 4)
    with pytest.raises(export.NoSurfaceError, match="peak density is 7"):
        export.extract_surface(_faint_ball, _albedo, res, 1.0, threshold=10.0)
    with pytest.raises(UserError, match="'auto' or a positive number"):
        export.extract_surface(_faint_ball, _albedo, res, 1.0, threshold="high")
    assert export.check_threshold(" Auto") == "auto" and export.check_threshold("2.5") == 2.5
    with pytest.raises(UserError, match="positive"):
        export.check_threshold(-1.0)


def test_opaque_threshold_counts_rays_and_breaks_ties_below_the_peak():
    res, bound = 9, 1.0
    spacing = 2 * bound / (res - 1)  # 0.25
    grid = np.zeros((res, res, res))
    d = 2.0  # a 3x3 plate one voxel thick: depth d * 0.25 = 0.5 < ln 2 across it, 1.5 along it
    grid[3:6, 3:6, 4] = d
    # Opaque: the 3 + 3 in-plane rays; their maxima tie with the 9 rays across the plate, so
    # the level must sit below d (between d and the next smaller maximum, 0), not at the peak.
    assert export.opaque_threshold(grid, bound) == d / 2
    grid[3:6, 3:6, 4] = 4.0  # now every ray through the plate is opaque (depth 1.0 across)
    grid[4, 4, 4] = 6.0
    assert export.opaque_threshold(grid, bound) == 2.0  # 15 opaque rays, all maxima >= 4
    assert export.opaque_threshold(0.1 * np.ones((res, res, res)), bound) is None  # 0.2 < ln 2
    assert spacing * 3 * 2.0 > np.log(2) > spacing * 2.0


def test_auto_threshold_touching_the_cube_still_closes_the_mesh():
    # A box filling the grid: the one-voxel zero padding closes its surface.
    mesh = export.extract_surface(lambda x: jnp.full_like(x[:, 0], 50.0), _albedo, 12, 1.0)
    v, f = mesh["vertices"], mesh["faces"]
    a, b, c = v[f[:, 0]], v[f[:, 1]], v[f[:, 2]]
    volume = np.sum(np.einsum("ij,ij->i", a, np.cross(b, c))) / 6.0
    assert 8.0 < volume < (2.0 + 2.0 / 11) ** 3


@pytest.mark.parametrize("level", [0.0, 0.1])
def test_empty_field_has_no_surface(tmp_path, level):
    # No density, and a faint fog whose optical depth across the cube (0.2) stays under ln 2.
    fog = lambda x: jnp.full_like(x[:, 0], level)
    with pytest.raises(export.NoSurfaceError, match="the field is empty"):
        export.extract_surface(fog, _albedo, 16, 1.0)
    out = export.write_assets(str(tmp_path), fog, _albedo, 16, 1.0, texture_size=32)
    assert out["no_surface"] and out["mesh_faces"] == 0 and "empty" in out["no_surface_reason"]
    assert list(tmp_path.iterdir()) == []


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("assets")
    out = export.write_assets(str(workdir), _faint_ball, _albedo, 32, 1.0, texture_size=128)
    return workdir, out


def _texture_at(mesh):
    """The texture's colour at each vertex's UV, looked up by trimesh (independent reader)."""
    import trimesh

    image = mesh.visual.material.baseColorTexture if hasattr(
        mesh.visual.material, "baseColorTexture") else mesh.visual.material.image
    assert image is not None and image.size == (128, 128)
    pixels = np.asarray(image.convert("RGB"))
    assert pixels.reshape(-1, 3).std(0).max() > 10  # not flat
    rgba = trimesh.visual.color.uv_to_color(mesh.visual.uv, image)
    return pixels, np.asarray(rgba)[:, :3] / 255.0


def test_glb_loads_back_with_a_texture_of_the_albedo(assets):
    import trimesh

    workdir, out = assets
    assert not out["no_surface"] and out["mesh_faces"] > 0 and out["texture_size"] == 128
    scene = trimesh.load(workdir / "mesh.glb")
    (mesh,) = scene.geometry.values()
    assert len(mesh.faces) == out["mesh_faces"] and len(mesh.vertices) >= out["mesh_vertices"]
    _, colours = _texture_at(mesh)
    field_xyz = np.stack([mesh.vertices[:, 0], -mesh.vertices[:, 2], mesh.vertices[:, 1]], -1)
    truth = _albedo_np(field_xyz)  # glTF is y up, the field z up
    # Nearest-texel lookup: about one texel off; every vertex has its UV (no unwrapped sliver).
    assert np.mean(np.abs(colours - truth)) < 0.02 and np.abs(colours - truth).max() < 0.05
    np.testing.assert_allclose(mesh.vertex_attributes["_ALBEDO"], truth, atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(mesh.vertices, axis=-1), _opaque_radius(),
                               atol=2.0 / 31)


def test_obj_mtl_png_load_back_with_the_texture(assets):
    import trimesh

    workdir, out = assets
    assert (workdir / "mesh.mtl").exists() and (workdir / "mesh_albedo.png").exists()
    mesh = trimesh.load(workdir / "mesh.obj", process=False)
    assert len(mesh.faces) == out["mesh_faces"]
    _, colours = _texture_at(mesh)
    field_xyz = np.stack([mesh.vertices[:, 0], -mesh.vertices[:, 2], mesh.vertices[:, 1]], -1)
    assert np.mean(np.abs(colours - _albedo_np(field_xyz))) < 0.02


def test_ply_has_the_vertex_colours(assets):
    workdir, out = assets
    v, rgb, f = _read_ply(workdir / "mesh.ply")
    assert len(v) == out["mesh_vertices"] and len(f) == out["mesh_faces"]
    np.testing.assert_allclose(rgb / 255.0, _albedo_np(v), atol=1.0 / 255 + 1e-6)
