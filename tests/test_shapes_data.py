"""Determinism of the procedural shapes dataset and correctness of its SDFs."""

import jax.numpy as jnp
import numpy as np
import pytest

from lmc_jax.data import shapes

# Two shapes (render compiles one program per shape and chunk size), three examples of one.
IDX = [0, 5, 10, 3]


def test_render_is_deterministic_in_the_seed():
    a = shapes.render(0, "eval_test", IDX, resolution=16, chunk=3)
    b = shapes.render(0, "eval_test", IDX, resolution=16, chunk=3)
    c = shapes.render(1, "eval_test", IDX, resolution=16, chunk=3)
    assert a.dtype == np.uint8 and a.shape == (4, 16, 16, 3)
    np.testing.assert_array_equal(a, b)
    assert all(np.any(a[i] != c[i]) for i in range(len(IDX)))
    # Example i does not depend on which other examples share its chunk.
    np.testing.assert_array_equal(a[1:3], shapes.render(0, "eval_test", [5, 10], 16, chunk=3))


def test_tfds_build_is_identical_across_cache_dirs(tmp_path):
    one = shapes.load_arrays("eval_test", 30, str(tmp_path / "a"), resolution=16)
    two = shapes.load_arrays("eval_test", 30, str(tmp_path / "b"), resolution=16)
    assert one["image"].shape == (30, 16, 16, 3)
    for key in ("image", "shape", "colour"):
        np.testing.assert_array_equal(one[key], two[key])
    s, c = shapes.class_of(np.arange(30))
    np.testing.assert_array_equal(one["shape"], s)
    np.testing.assert_array_equal(one["colour"], c)
    np.testing.assert_array_equal(one["image"][IDX],
                                  shapes.render(0, "eval_test", IDX, 16, chunk=3))


@pytest.mark.parametrize("fn", shapes.SDFS, ids=lambda f: f.__name__)
def test_sdf_sign(fn):
    # Inside at the origin; the torus has a hole there, so take a point on its core circle.
    inside = (0.40, 0.0, 0.0) if fn is shapes.sdf_torus else (0.0, 0.0, 0.0)
    assert float(fn(jnp.array(inside))) < 0
    if fn is shapes.sdf_torus:
        assert float(fn(jnp.zeros(3))) > 0
    assert float(fn(jnp.array([3.0, 2.0, -1.0]))) > 0


@pytest.mark.parametrize("fn,point,expected", [
    (shapes.sdf_cube, (0.0, 1.0, 0.0), 1.0 - 0.40),  # above the top face
    (shapes.sdf_cube, (0.1, 0.6, -0.2), 0.6 - 0.40),
    (shapes.sdf_cube, (0.0, 0.0, 0.0), -0.40),  # centre: distance to every face
    (shapes.sdf_sphere, (0.0, 0.0, 1.0), 1.0 - 0.55),
    (shapes.sdf_torus, (0.40, 0.0, 0.0), -0.17),  # on the core circle
    (shapes.sdf_torus, (0.0, 0.5, 0.0), np.hypot(0.40, 0.5) - 0.17),  # above the hole
    (shapes.sdf_cylinder, (0.0, 1.0, 0.0), 1.0 - 0.45),  # above the top cap
    (shapes.sdf_cylinder, (1.0, 0.0, 0.0), 1.0 - 0.42),  # beside the side wall
    (shapes.sdf_cylinder, (0.0, 0.0, 0.0), -0.42),  # centre: nearest is the wall
    (shapes.sdf_cylinder, (0.0, 0.8, 0.72), np.hypot(0.72 - 0.42, 0.8 - 0.45)),  # rim corner
    (shapes.sdf_cone, (0.0, 1.0, 0.0), 1.0 - 0.45),  # above the apex
    (shapes.sdf_cone, (0.0, -1.0, 0.0), 1.0 - 0.45),  # below the base centre
    (shapes.sdf_cone, (0.0, -0.45, 1.0), 0.5),  # level with the base rim, outside
    # Outside the slanted side at mid height: the side line is r = 0.25 - y * 0.5 / 0.9;
    # its unit normal in (r, y) is (0.9, 0.5) / |(0.9, 0.5)|.
    (shapes.sdf_cone, (1.0, 0.0, 0.0), (1.0 - 0.25) * 0.9 / np.hypot(0.9, 0.5)),
    (shapes.sdf_cone, (0.0, -0.40, 0.0), -0.05),  # inside, just above the base
])
def test_sdf_hand_computed_distances(fn, point, expected):
    np.testing.assert_allclose(float(fn(jnp.array(point))), expected, atol=1e-5)
