"""Orbit cameras, rays and view-dependent prompt suffixes."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lmc_jax.nerf import cameras

sample = jax.jit(cameras.sample_orbit_cameras, static_argnums=(1,))
orbit = jax.jit(cameras.orbit_camera_to_world)
look_at = jax.jit(cameras.look_at)
rays = jax.jit(cameras.generate_rays, static_argnums=(2, 3))
view_index = jax.jit(cameras.view_index)


@pytest.fixture(scope="module")
def cams():
    sampled = sample(jax.random.PRNGKey(0), 64)
    # Include the poles and the seam, where a naive look-at breaks.
    extra = orbit(jnp.asarray([90.0, -90.0, 0.0, 89.99]),
                  jnp.asarray([0.0, 123.0, 180.0, -180.0]), jnp.asarray([1.0, 2.0, 1.5, 1.2]))
    return np.concatenate([np.asarray(sampled["c2w"]), np.asarray(extra)]), sampled


def test_rotation_is_orthonormal(cams):
    c2w, _ = cams
    rot = c2w[:, :3, :3]
    eye = np.broadcast_to(np.eye(3), rot.shape)
    np.testing.assert_allclose(np.swapaxes(rot, -1, -2) @ rot, eye, atol=1e-5)
    np.testing.assert_allclose(np.linalg.det(rot), 1.0, atol=1e-5)


def test_camera_looks_at_origin(cams):
    c2w, sampled = cams
    forward = -c2w[:, :3, 2]  # OpenGL: the camera looks along -z
    position = c2w[:, :3, 3]
    to_origin = -position / np.linalg.norm(position, axis=-1, keepdims=True)
    np.testing.assert_allclose(np.sum(forward * to_origin, axis=-1), 1.0, atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(position[:64], axis=-1),
                               np.asarray(sampled["distance"]), rtol=1e-5)
    # Image "up" has a non-negative world-z component (z-up world, no roll).
    assert np.all(c2w[:, 2, 1] >= -1e-6)


def test_sample_ranges():
    s = sample(jax.random.PRNGKey(1), 256, (-10.0, 80.0), (0.0, 90.0), (1.0, 2.0), (30.0, 40.0))
    for name, (lo, hi) in {"elevation": (-10, 80), "azimuth": (0, 90), "distance": (1, 2),
                           "fovy": (30, 40)}.items():
        v = np.asarray(s[name])
        assert v.shape == (256,) and v.min() >= lo and v.max() <= hi
    pos = np.asarray(s["c2w"])[:, :3, 3]
    elev = np.degrees(np.arcsin(pos[:, 2] / np.linalg.norm(pos, axis=-1)))
    np.testing.assert_allclose(elev, np.asarray(s["elevation"]), atol=1e-2)


def test_look_at_matches_orbit():
    c2w = orbit(jnp.asarray([20.0, -5.0]), jnp.asarray([30.0, 200.0]), jnp.asarray([1.3, 2.0]))
    other = look_at(c2w[:, :3, 3])
    np.testing.assert_allclose(np.asarray(other), np.asarray(c2w), atol=1e-5)
    pole = np.asarray(look_at(jnp.asarray([0.0, 0.0, 2.0])))
    np.testing.assert_allclose(pole[:3, :3].T @ pole[:3, :3], np.eye(3), atol=1e-6)


def test_rays_and_radii():
    h, w, fovy = 5, 7, 60.0
    c2w = orbit(jnp.asarray([30.0]), jnp.asarray([-40.0]), jnp.asarray([1.5]))
    origins, dirs, radii = rays(c2w, jnp.asarray([fovy]), h, w)
    assert origins.shape == dirs.shape == (1, h, w, 3) and radii.shape == (1, h, w, 1)
    dirs = np.asarray(dirs)[0]
    rot = np.asarray(c2w)[0, :3, :3]
    np.testing.assert_allclose(np.linalg.norm(dirs, axis=-1), 1.0, atol=1e-6)
    np.testing.assert_allclose(dirs[h // 2, w // 2], -rot[:, 2], atol=1e-6)  # centre pixel
    assert dirs[0, w // 2] @ rot[:, 1] > 0  # top row looks up
    assert dirs[h // 2, -1] @ rot[:, 0] > 0  # last column looks right
    # Vertical field of view: top/bottom pixel centres span fovy * (h - 1) / h.
    angle = np.degrees(np.arccos(dirs[0, w // 2] @ dirs[-1, w // 2]))
    half = np.tan(np.radians(fovy / 2)) * (h - 1) / h
    np.testing.assert_allclose(angle, 2 * np.degrees(np.arctan(half)), rtol=1e-4)
    pixel = 2 * np.tan(np.radians(fovy / 2)) / h
    np.testing.assert_allclose(float(radii[0, h // 2, w // 2, 0]), pixel * 2 / np.sqrt(12),
                               rtol=2e-2)


@pytest.mark.parametrize(
    "elevation, azimuth, expected",
    [
        (0.0, 0.0, "front view"),
        (0.0, 44.9, "front view"),
        (0.0, -44.9, "front view"),
        (0.0, 45.1, "side view"),
        (0.0, -45.1, "side view"),
        (0.0, 134.9, "side view"),
        (0.0, 135.1, "back view"),
        (0.0, -135.1, "back view"),
        (0.0, 180.0, "back view"),
        (0.0, 359.0, "front view"),  # wraps to -1
        (0.0, 225.0 + 0.1, "side view"),  # wraps to -134.9
        (59.9, 0.0, "front view"),
        (60.1, 0.0, "overhead view"),
        (60.1, 180.0, "overhead view"),
        (-80.0, 90.0, "side view"),
    ],
)
def test_view_suffix_boundaries(elevation, azimuth, expected):
    assert cameras.view_suffix(elevation, azimuth) == expected
    idx = view_index(jnp.asarray([elevation]), jnp.asarray([azimuth]))
    assert cameras.VIEW_SUFFIXES[int(idx[0])] == expected


def test_view_index_vectorized_and_custom_thresholds():
    elev = jnp.asarray([0.0, 0.0, 0.0, 70.0, 41.0])
    azim = jnp.asarray([10.0, 100.0, -170.0, 0.0, 0.0])
    idx = view_index(elev, azim)
    assert idx.dtype == jnp.int32
    np.testing.assert_array_equal(np.asarray(idx), [0, 1, 2, 3, 0])
    custom = cameras.view_index(elev, azim, front_threshold=5.0, back_threshold=175.0,
                                overhead_threshold=40.0)
    np.testing.assert_array_equal(np.asarray(custom), [1, 1, 1, 3, 3])
    assert [cameras.VIEW_SUFFIXES[i] for i in np.asarray(idx)] == [
        cameras.view_suffix(e, a) for e, a in zip(np.asarray(elev), np.asarray(azim), strict=True)]
    assert cameras.prompt_with_view("a corgi", "side view") == "a corgi, side view"


def test_video_orbit():
    v = cameras.orbit_video_cameras(8, elevation=20.0, distance=2.0)
    assert v["c2w"].shape == (8, 3, 4)
    np.testing.assert_allclose(np.asarray(v["azimuth"])[1], 45.0)
    np.testing.assert_allclose(np.linalg.norm(np.asarray(v["c2w"])[:, :3, 3], axis=-1), 2.0,
                               rtol=1e-6)
