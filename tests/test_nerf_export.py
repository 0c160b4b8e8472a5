"""Mesh extraction and the file writers (OBJ, PLY, video, PNG grid)."""

import imageio.v2 as iio
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

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


def test_image_grid(tmp_path):
    images = np.stack([np.full((8, 10, 3), k / 5.0, np.float32) for k in range(5)])
    grid = export.save_image_grid(tmp_path / "g.png", images, ncols=3, padding=2)
    assert grid.shape == (2 * (8 + 2) + 2, 3 * (10 + 2) + 2, 3)
    back = np.asarray(Image.open(tmp_path / "g.png"))
    np.testing.assert_array_equal(back, grid)
    np.testing.assert_array_equal(grid[2:10, 14:24], 51)  # image 1 = round(0.2 * 255)
    np.testing.assert_array_equal(grid[12:20, 26:36], 255)  # empty cell
