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


def test_patterned_world_captions_and_classes():
    world = shapes.world_captions(True)
    assert len(world) == len(shapes.PATTERNS) * len(shapes.all_captions())
    # The plain world is the patterned world's pattern-0 part, caption for caption.
    assert [(t, s, c) for t, s, c, p in world if p == 0] == shapes.all_captions()
    assert shapes.caption(0, 0, pattern=1) == "a red striped sphere"
    assert shapes.caption(4, 3, synonym=0, pattern=3) == "a yellow dotted cylinder"
    assert set(shapes.vocabulary(True)) - set(shapes.vocabulary()) == {"striped", "checkered",
                                                                        "dotted"}
    i = np.arange(400)
    s, c = shapes.class_of(i)
    np.testing.assert_array_equal(shapes.world_class(s, c, shapes.pattern_of(i, True)), i % 100)
    np.testing.assert_array_equal(shapes.pattern_of(i, False), 0)


@pytest.mark.parametrize("pattern,point,expected", [
    (0, (0.3, 0.2, 0.1), 0.0),
    # striped: d = (1, 1, 0)/sqrt(2), P = 0.30; q.d / P = 0.25 (first half) and 0.75 (second).
    (1, (0.25 * 0.30 / np.sqrt(2), 0.25 * 0.30 / np.sqrt(2), 0.7), 0.0),
    (1, (0.75 * 0.30 / np.sqrt(2), 0.75 * 0.30 / np.sqrt(2), -0.7), 1.0),
    # checkered: cells of 0.15; (0, 0, 0) and (1, 0, 0) are neighbours, (1, 1, 0) is not.
    (2, (0.01, 0.01, 0.01), 0.0),
    (2, (0.20, 0.01, 0.01), 1.0),
    (2, (0.20, 0.20, 0.01), 0.0),
    (2, (-0.01, 0.01, 0.01), 1.0),  # floor(-0.07) = -1
    # dotted: a lattice point (spacing 0.25) is in a dot; the middle of a cell is not.
    (3, (0.25, 0.0, -0.5), 1.0),
    (3, (0.25 + 0.08, 0.0, 0.0), 1.0),  # 0.08 < 0.35 * 0.25
    (3, (0.125, 0.125, 0.0), 0.0),
])
def test_pattern_mask_hand_computed(pattern, point, expected):
    got = shapes.pattern_mask(jnp.array([point]), jnp.array(pattern))
    assert float(got[0]) == expected


def test_patterned_renders_differ_from_plain_only_in_the_pattern(tmp_path):
    plain = shapes.render(0, "eval_test", [0, 25, 50], resolution=16, chunk=3)
    data = shapes.load_arrays("eval_test", 51, str(tmp_path), resolution=16, patterned=True)
    np.testing.assert_array_equal(data["pattern"][[0, 25, 50]], [0, 1, 2])
    np.testing.assert_array_equal(data["image"][0], plain[0])  # plain: the same render
    for k in (1, 2):  # same camera, light and object: equal off the object, not on it
        diff = np.abs(data["image"][25 * k].astype(int) - plain[k]).sum(-1)
        corners = np.concatenate([diff[:2, :2].ravel(), diff[-2:, -2:].ravel()])
        assert diff.max() > 60 and not corners.any()
