"""Procedural renders of coloured 3D primitives with captions: the embedded prior's dataset.

Every example is one primitive (`SHAPES`) in one colour (`COLOURS`), centred at the origin,
rendered by sphere tracing its analytic signed distance function (SDF) from a random orbit
camera, lit by one random directional light plus ambient light (Lambertian with a weak
specular lobe), on a plain grey background, supersampled 2x2 and box-filtered. Its caption is
one of `TEMPLATES` ("a green torus", "a torus, green", ...), with shape synonyms
(`SHAPE_WORDS`: "ball" for sphere, ...).

Determinism: example `i` of split `s` is a pure function of `(seed, s, i)` (its random draws come
from `jax.random.fold_in(key(seed, s), i)`), and its class is `i mod 25` (balanced classes), so
the same seed gives the same images on every machine and in every chunking.

Splits (`SPLITS`): 'train' for the prior, 'eval_train' / 'eval_test' for the shape-and-colour
evaluator (`lmc_jax.metrics.shapes_eval`): renders the prior never saw.

`ShapesDataset` is a tensorflow-datasets builder writing array_record; `load_split` builds it
(once, under `cache_dir`) and returns it as a tfds data source, which grain reads.

Camera conventions match `lmc_jax.nerf.cameras` (y up, the camera looks at the origin), so the
text-to-3D preset's orbit sees objects of the same size as the training renders.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import grain
import jax
import jax.numpy as jnp
import numpy as np
import tensorflow_datasets as tfds
from PIL import Image

from lmc_jax.errors import UserError

SHAPES = ("sphere", "cube", "torus", "cone", "cylinder")
SHAPE_WORDS = {
    "sphere": ("sphere", "ball"),
    "cube": ("cube", "box"),
    "torus": ("torus", "ring"),
    "cone": ("cone",),
    "cylinder": ("cylinder",),
}
COLOURS = {  # linear albedo
    "red": (0.80, 0.08, 0.06),
    "green": (0.10, 0.62, 0.12),
    "blue": (0.08, 0.20, 0.85),
    "yellow": (0.90, 0.78, 0.08),
    "purple": (0.50, 0.12, 0.70),
}
TEMPLATES = (
    "a {colour} {shape}",
    "a {shape}, {colour}",
    "a {colour} {shape} on a plain background",
    "a render of a {colour} {shape}",
)
SPLITS = {"train": 0, "eval_train": 1, "eval_test": 2}
NUM_CLASSES = len(SHAPES) * len(COLOURS)
# The patterned world (`patterned=True`): every object also has a surface pattern, named in its
# caption before the shape word ("a red striped ball"); 'plain' has no word, so the plain world
# is the patterned world's pattern-0 part, caption for caption and pixel for pixel.
PATTERNS = ("plain", "striped", "checkered", "dotted")
PATTERN_PERIOD = 0.30  # world units: stripe period, checker cell twice 0.15, dot lattice 0.25

# Scene and camera ranges (world units; the object fits in a sphere of radius ~0.6).
CAMERA_DISTANCE = (2.0, 2.6)
CAMERA_ELEVATION_DEG = (0.0, 50.0)
FOVY_DEG = 45.0
BACKGROUND = (0.55, 0.85)  # grey level range
SUPERSAMPLE = 2
MARCH_STEPS = 64


def class_of(index: np.ndarray | int) -> tuple[Any, Any]:
    """(shape id, colour id) of example `index`: class `index mod 25`, shape fastest."""
    c = np.asarray(index) % NUM_CLASSES
    return c % len(SHAPES), c // len(SHAPES)


def class_id(shape: Any, colour: Any) -> Any:
    """The class `colour * 5 + shape` of (shape, colour): the inverse of `class_of`."""
    return colour * len(SHAPES) + shape


def indices_of_colour(colour: int, n: int, start: int = 0) -> np.ndarray:
    """The first `n` example indices at or after block `start` (of 25) whose colour is `colour`,
    shapes in turn (`class_of`): `25 k + 5 colour + shape` for k = start, start + 1, ..."""
    k = np.arange(n) // len(SHAPES) + start
    return k * NUM_CLASSES + colour * len(SHAPES) + np.arange(n) % len(SHAPES)


def pattern_of(index: np.ndarray | int, patterned: bool) -> Any:
    """The pattern id of example `index`: `(index // 25) mod 4` in the patterned world (each
    block of 25 examples has one pattern, so (shape, colour, pattern) is balanced over every
    100), 0 ('plain') in the plain world."""
    index = np.asarray(index)
    if not patterned:
        return np.zeros_like(index)
    return index // NUM_CLASSES % len(PATTERNS)


def world_class(shape: Any, colour: Any, pattern: Any = 0) -> Any:
    """Class index in the patterned world, `pattern * 25 + class_id(shape, colour)` (equal to
    `class_id` for 'plain')."""
    return pattern * NUM_CLASSES + class_id(shape, colour)


def caption(shape: int, colour: int, template: int = 0, synonym: int = 0,
            pattern: int = 0) -> str:
    """The caption of (shape, colour, pattern): `TEMPLATES[template]` with
    `SHAPE_WORDS[...][synonym]`, the pattern's word (none for 'plain') before the shape's."""
    words = SHAPE_WORDS[SHAPES[shape]]
    word = words[synonym % len(words)]
    if pattern:
        word = f"{PATTERNS[pattern]} {word}"
    return TEMPLATES[template].format(colour=list(COLOURS)[colour], shape=word)


def world_captions(patterned: bool = False) -> list[tuple[str, int, int, int]]:
    """Every (caption, shape, colour, pattern) of a world, in a fixed order."""
    out = []
    for p in range(len(PATTERNS) if patterned else 1):
        for s, name in enumerate(SHAPES):
            for c in range(len(COLOURS)):
                for tpl in range(len(TEMPLATES)):
                    for syn in range(len(SHAPE_WORDS[name])):
                        out.append((caption(s, c, tpl, syn, p), s, c, p))
    return out


def all_captions() -> list[tuple[str, int, int]]:
    """Every (caption, shape, colour) the embedded prior is trained on, in a fixed order."""
    return [(text, s, c) for text, s, c, _ in world_captions(False)]


def vocabulary(patterned: bool = False) -> list[str]:
    """The words (CLIP-tokenizer pieces) of all captions of a world, sorted."""
    words = set()
    for text, *_ in world_captions(patterned):
        words.update(text.replace(",", " , ").split())
    return sorted(words)


# ----------------------------------------------------------------------------------------------
# Signed distance functions, each for a primitive at the origin with y up.


def sdf_sphere(p: jax.Array) -> jax.Array:
    """|p| - r."""
    return jnp.linalg.norm(p, axis=-1) - 0.55


def sdf_cube(p: jax.Array) -> jax.Array:
    """Rounded box: |max(|p| - h, 0)| + min(max_i(|p_i| - h), 0) - rounding."""
    q = jnp.abs(p) - (0.40 - 0.03)
    outside = jnp.linalg.norm(jnp.maximum(q, 0.0), axis=-1)
    inside = jnp.minimum(jnp.max(q, axis=-1), 0.0)
    return outside + inside - 0.03


def sdf_torus(p: jax.Array) -> jax.Array:
    """Torus around the y axis: |(|p_xz| - R, p_y)| - r."""
    ring = jnp.linalg.norm(p[..., [0, 2]], axis=-1) - 0.40
    return jnp.sqrt(ring**2 + p[..., 1] ** 2) - 0.17


def sdf_cylinder(p: jax.Array) -> jax.Array:
    """Capped cylinder (radius 0.42, half-height 0.45) in 2D (radial, axial) distance form."""
    d = jnp.stack([jnp.linalg.norm(p[..., [0, 2]], axis=-1) - 0.42,
                   jnp.abs(p[..., 1]) - 0.45], axis=-1)
    return (jnp.minimum(jnp.max(d, axis=-1), 0.0)
            + jnp.linalg.norm(jnp.maximum(d, 0.0), axis=-1))


def sdf_cone(p: jax.Array) -> jax.Array:
    """Solid cone, base radius 0.5 at y = -0.45, apex at y = 0.45: exact distance in the
    (radial r, height y) half-plane to the triangle (0, -h), (R, -h), (0, h)."""
    radius, h = 0.5, 0.45
    r = jnp.linalg.norm(p[..., [0, 2]], axis=-1)
    y = p[..., 1]
    # Distance to the base disc segment {(s, -h): 0 <= s <= R}.
    base = jnp.stack([r - jnp.clip(r, 0.0, radius), y + h], axis=-1)
    # Distance to the slanted side from (R, -h) to (0, h).
    a = jnp.array([radius, -h])
    e = jnp.array([-radius, 2 * h])
    q = jnp.stack([r, y], axis=-1)
    u = jnp.clip(jnp.sum((q - a) * e, axis=-1) / jnp.sum(e * e), 0.0, 1.0)
    side = q - (a + u[..., None] * e)
    dist = jnp.sqrt(jnp.minimum(jnp.sum(base**2, -1), jnp.sum(side**2, -1)))
    # Inside: above the base and on the axis side of the slanted edge.
    cross = e[0] * (y - a[1]) - e[1] * (r - a[0])  # > 0 on the axis side
    inside = (y > -h) & (cross > 0)
    return jnp.where(inside, -dist, dist)


SDFS = (sdf_sphere, sdf_cube, sdf_torus, sdf_cone, sdf_cylinder)


# ----------------------------------------------------------------------------------------------
# Rendering.


def _rotation_y(angle: jax.Array) -> jax.Array:
    c, s = jnp.cos(angle), jnp.sin(angle)
    return jnp.array([[c, 0.0, s], [0.0, 1.0, 0.0], [-s, 0.0, c]])


def _rotation_x(angle: jax.Array) -> jax.Array:
    c, s = jnp.cos(angle), jnp.sin(angle)
    return jnp.array([[1.0, 0.0, 0.0], [0.0, c, -s], [0.0, s, c]])


def _orbit_camera(azimuth: jax.Array, elevation: jax.Array, distance: jax.Array,
                  size: int, fovy_deg: float) -> tuple[jax.Array, jax.Array]:
    """Ray origins and unit directions [size*size, 3] of a pinhole camera looking at 0, y up."""
    eye = distance * jnp.array([jnp.cos(elevation) * jnp.sin(azimuth), jnp.sin(elevation),
                                jnp.cos(elevation) * jnp.cos(azimuth)])
    forward = -eye / jnp.linalg.norm(eye)
    right = jnp.cross(forward, jnp.array([0.0, 1.0, 0.0]))
    right = right / jnp.linalg.norm(right)
    up = jnp.cross(right, forward)
    focal = 0.5 * size / np.tan(0.5 * np.deg2rad(fovy_deg))
    coords = (jnp.arange(size) + 0.5 - 0.5 * size) / focal
    u, v = jnp.meshgrid(coords, -coords)  # v: image rows go down, world up goes up
    dirs = (u[..., None] * right + v[..., None] * up + forward).reshape(-1, 3)
    dirs = dirs / jnp.linalg.norm(dirs, axis=-1, keepdims=True)
    return jnp.broadcast_to(eye, dirs.shape), dirs


def pattern_mask(q: jax.Array, pattern: jax.Array) -> jax.Array:
    """[N] 1 where object-space points `q` [N, 3] take the second colour of `pattern`, else 0:

    - striped: bands across d = (1, 1, 0)/sqrt 2, `frac(q.d / P) >= 1/2` (P = PATTERN_PERIOD;
      a diagonal so that every primitive, the flat torus too, shows several bands);
    - checkered: a 3-D checkerboard of cells P/2, `(floor(qx/c) + floor(qy/c) + floor(qz/c))
      mod 2`;
    - dotted: dots of radius 0.35 L around the points of a cubic lattice of spacing L = 0.25.
    'plain' (0) is 0 everywhere. Sizes in object units (the objects span about 1 unit, so at
    32x32 a band is 2-3 pixels wide: detail that a blur of a pixel or two erases)."""
    d = jnp.array([1.0, 1.0, 0.0]) / np.sqrt(2.0)
    stripes = jnp.mod(q @ d / PATTERN_PERIOD, 1.0) >= 0.5
    cells = jnp.floor(q / (0.5 * PATTERN_PERIOD)).sum(-1)
    checks = jnp.mod(cells, 2.0) >= 0.5
    lattice = 0.25
    dots = jnp.linalg.norm(q - lattice * jnp.round(q / lattice), axis=-1) < 0.35 * lattice
    masks = jnp.stack([jnp.zeros_like(stripes), stripes, checks, dots]).astype(jnp.float32)
    return masks[pattern]


def second_colour(albedo: jax.Array) -> jax.Array:
    """A pattern's other colour: near white on a dark albedo (luminance < 0.4: red, blue,
    purple), near black on a light one (green, yellow), so every pattern has contrast."""
    luminance = albedo @ jnp.array([0.2126, 0.7152, 0.0722])
    return jnp.where(luminance < 0.4, jnp.full(3, 0.92), jnp.full(3, 0.04))


def render_example(key: jax.Array, shape: int, colour: jax.Array,
                   resolution: int, pattern: jax.Array | int = 0) -> jax.Array:
    """One render of primitive `shape` (a Python int: only its SDF is traced), float32
    [resolution, resolution, 3] in [0, 1], its surface in `pattern` (`pattern_mask`; the
    random draws do not depend on it, so pattern 0 gives the plain world's render)."""
    ks = jax.random.split(key, 9)
    u = lambda k, lo, hi: jax.random.uniform(k, (), minval=lo, maxval=hi)  # noqa: E731
    azimuth = u(ks[0], 0.0, 2 * np.pi)
    elevation = jnp.deg2rad(u(ks[1], *CAMERA_ELEVATION_DEG))
    distance = u(ks[2], *CAMERA_DISTANCE)
    yaw = u(ks[3], 0.0, 2 * np.pi)
    tilt = u(ks[4], np.pi / 9, np.pi / 3) if shape == SHAPES.index("torus") else 0.0
    scale = u(ks[5], 0.85, 1.1)
    rot = _rotation_y(yaw) @ _rotation_x(tilt)  # object -> world
    albedo = jnp.asarray(list(COLOURS.values()))[colour]
    albedo = jnp.clip(albedo * (1.0 + 0.08 * jax.random.normal(ks[6], (3,))), 0.0, 1.0)
    light_az = azimuth + u(ks[7], -1.2, 1.2)
    light_el = u(ks[8], 0.3, 1.2)
    light = jnp.array([jnp.cos(light_el) * jnp.sin(light_az), jnp.sin(light_el),
                       jnp.cos(light_el) * jnp.cos(light_az)])
    k_amb, k_bg = jax.random.split(jax.random.fold_in(key, 1))
    ambient = u(k_amb, 0.25, 0.45)
    background = u(k_bg, *BACKGROUND)

    size = resolution * SUPERSAMPLE
    origins, dirs = _orbit_camera(azimuth, elevation, distance, size, FOVY_DEG)

    def field(p):  # world points -> SDF of the scaled, rotated object
        return SDFS[shape]((p @ rot) / scale) * scale

    def march(_, t):
        return t + field(origins + t[:, None] * dirs)

    t = jax.lax.fori_loop(0, MARCH_STEPS, march, jnp.full(dirs.shape[0], distance - 1.0))
    p = origins + t[:, None] * dirs
    hit = (jnp.abs(field(p)) < 2e-3) & (t < distance + 1.0)
    eps = 1e-3
    offsets = jnp.eye(3) * eps
    grad = jnp.stack([field(p + o) - field(p - o) for o in offsets], axis=-1)
    normal = grad / (jnp.linalg.norm(grad, axis=-1, keepdims=True) + 1e-9)
    diffuse = jnp.maximum(normal @ light, 0.0)
    reflect = 2.0 * diffuse[:, None] * normal - light
    specular = jnp.maximum(jnp.sum(reflect * -dirs, -1), 0.0) ** 16 * (diffuse > 0)
    second = pattern_mask((p @ rot) / scale, pattern)[:, None]
    albedo = albedo * (1.0 - second) + second_colour(albedo) * second
    colour_rgb = albedo * (ambient + (1.0 - ambient) * diffuse[:, None]) + 0.15 * specular[:, None]
    image = jnp.where(hit[:, None], colour_rgb, background)
    image = image.reshape(resolution, SUPERSAMPLE, resolution, SUPERSAMPLE, 3).mean((1, 3))
    return jnp.clip(image, 0.0, 1.0)


@functools.partial(jax.jit, static_argnames=("resolution", "shape", "patterned"))
def _render_chunk(key: jax.Array, indices: jax.Array, resolution: int, shape: int,
                  patterned: bool = False, colour: jax.Array | int = -1) -> jax.Array:
    """Renders examples `indices` that all have primitive `shape` (static: one SDF is traced),
    in their own colours, or all in colour `colour` when it is >= 0."""
    own = indices % NUM_CLASSES // len(SHAPES)
    colour = jnp.where(jnp.asarray(colour) >= 0, colour, own)
    pattern = indices // NUM_CLASSES % len(PATTERNS) if patterned else jnp.zeros_like(indices)
    keys = jax.vmap(lambda i: jax.random.fold_in(key, i))(indices)
    return jax.vmap(render_example, in_axes=(0, None, 0, None, 0))(keys, shape, colour,
                                                                   resolution, pattern)


def render(seed: int, split: str, indices: Sequence[int] | np.ndarray,
           resolution: int = 32, chunk: int = 128, patterned: bool = False,
           colour: int | None = None) -> np.ndarray:
    """uint8 renders [len(indices), resolution, resolution, 3] of examples `indices` of `split`
    (of the patterned world: `pattern_of(indices, True)`). With `colour` (an index into
    `COLOURS`), each example's scene (camera, light, pose, background, albedo jitter) is
    rendered with that colour's albedo instead of its own: the same object recoloured."""
    if split not in SPLITS:
        raise UserError(f"unknown split {split!r}; choose one of {list(SPLITS)}")
    key = jax.random.fold_in(jax.random.PRNGKey(seed), SPLITS[split])
    indices = np.asarray(indices, np.int64)
    out = np.empty((len(indices), resolution, resolution, 3), np.uint8)
    shape_of = class_of(indices)[0]
    for s in range(len(SHAPES)):
        where = np.flatnonzero(shape_of == s)
        for i in range(0, len(where), chunk):
            pos = where[i:i + chunk]
            idx = indices[pos]
            padded = np.concatenate([idx, np.repeat(idx[-1:], chunk - len(idx))])
            images = np.asarray(_render_chunk(key, jnp.asarray(padded, jnp.int32), resolution, s,
                                              patterned, -1 if colour is None else int(colour)))
            out[pos] = np.round(images[:len(idx)] * 255.0).astype(np.uint8)
    return out


# ----------------------------------------------------------------------------------------------
# Scenes without an object, and degraded renders (the evaluator's "no object" head).

NO_OBJECT_KINDS = ("background", "fog", "band", "glow")


def _smooth_field(rng: np.random.Generator, size: int, cells: int) -> np.ndarray:
    """A smooth random field in [0, 1], [size, size]: uniform noise on a (cells+1)^2 grid,
    bilinearly interpolated (features about size/cells pixels wide)."""
    from scipy.ndimage import map_coordinates

    grid = rng.uniform(0.0, 1.0, (cells + 1, cells + 1))
    coords = (np.arange(size) + 0.5) / size * cells
    yy, xx = np.meshgrid(coords, coords, indexing="ij")
    return map_coordinates(grid, [yy, xx], order=1, mode="nearest")


def render_no_object(seed: int, split: str, n: int, resolution: int = 32) -> np.ndarray:
    """uint8 [n, resolution, resolution, 3] scenes that show no object, the ways a text-to-3D
    field fails: example i is kind `NO_OBJECT_KINDS[i % 4]` on a plain grey background (the
    renders' `BACKGROUND` range):

    - 'background': the background alone (a collapsed field);
    - 'fog': a translucent smooth cloud of one colour (a palette colour, shaded, or a grey) with
      opacity `a0 + (a1 - a0) f`, f a smooth random field (`_smooth_field`, 2-5 cells);
    - 'band': a soft straight band of a palette colour (Gaussian profile, sigma 10-20% of the
      image, peak opacity 0.4-0.9), optionally under a faint grey fog;
    - 'glow': a soft round glow (Gaussian, sigma 15-30% of the image, peak opacity 0.3-0.7).

    None has the hard silhouette and shading of a render. Deterministic in (seed, split, i)."""
    if split not in SPLITS:
        raise UserError(f"unknown split {split!r}; choose one of {list(SPLITS)}")
    palette = np.asarray(list(COLOURS.values()), np.float64)
    size = int(resolution)
    centres = (np.arange(size) + 0.5) / size - 0.5
    yy, xx = np.meshgrid(centres, centres, indexing="ij")
    out = np.empty((n, size, size, 3), np.uint8)
    for i in range(n):
        rng = np.random.default_rng([seed, SPLITS[split], 1_000_003, i])
        image = np.full((size, size, 3), rng.uniform(*BACKGROUND))
        kind = NO_OBJECT_KINDS[i % len(NO_OBJECT_KINDS)]
        colour = palette[rng.integers(len(palette))] * rng.uniform(0.4, 1.0)
        if kind == "fog":
            if rng.random() < 0.3:
                colour = np.full(3, rng.uniform(0.2, 1.0))
            a0, a1 = sorted(rng.uniform(0.0, 0.9, 2))
            alpha = a0 + (a1 - a0) * _smooth_field(rng, size, int(rng.integers(2, 6)))
        elif kind == "band":
            angle, offset = rng.uniform(0.0, np.pi), rng.uniform(-0.3, 0.3)
            dist = xx * np.cos(angle) + yy * np.sin(angle) - offset
            alpha = rng.uniform(0.4, 0.9) * np.exp(-0.5 * (dist / rng.uniform(0.1, 0.2)) ** 2)
        elif kind == "glow":
            cy, cx = rng.uniform(-0.25, 0.25, 2)
            r2 = (yy - cy) ** 2 + (xx - cx) ** 2
            alpha = rng.uniform(0.3, 0.7) * np.exp(-0.5 * r2 / rng.uniform(0.15, 0.3) ** 2)
        else:
            alpha = np.zeros((size, size))
        image = image * (1.0 - alpha[..., None]) + colour * alpha[..., None]
        if kind == "band" and rng.random() < 0.5:
            image = image * 0.8 + 0.2 * rng.uniform(*BACKGROUND) * rng.uniform(0.0, 1.0)
        image = image + rng.normal(0.0, 0.01, image.shape)
        out[i] = np.round(np.clip(image, 0.0, 1.0) * 255.0).astype(np.uint8)
    return out


def degrade(images_u8: np.ndarray, seed: int, max_sigma: float = 1.2,
            max_fog: float = 0.35) -> np.ndarray:
    """Renders as a text-to-3D result may show them: each image blurred by a Gaussian of
    sigma ~ U(0, max_sigma) pixels and veiled by a uniform fog of opacity U(0, max_fog) in a
    random grey. uint8 in, uint8 out; deterministic in `seed`."""
    from scipy.ndimage import gaussian_filter

    rng = np.random.default_rng([seed, 2_000_003])
    out = np.empty_like(images_u8)
    for i, im in enumerate(np.asarray(images_u8, np.float64) / 255.0):
        sigma = rng.uniform(0.0, max_sigma)
        im = gaussian_filter(im, (sigma, sigma, 0), mode="nearest")
        fog = rng.uniform(0.0, max_fog)
        im = im * (1.0 - fog) + fog * rng.uniform(0.3, 0.9)
        out[i] = np.round(np.clip(im, 0.0, 1.0) * 255.0).astype(np.uint8)
    return out


# ----------------------------------------------------------------------------------------------
# The tfds builder.


class ShapesDataset(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """Rendered primitives with captions, one tfds split per entry of `SPLITS`."""

    name = "lmc_shapes"
    VERSION = tfds.core.Version("1.1.0")
    RELEASE_NOTES = {"1.0.0": "5 shapes x 5 colours, sphere-traced SDFs, 2x2 supersampled.",
                     "1.1.0": "A 'pattern' feature; the patterned world (`patterned=True`)."}

    @tfds.core.utils.classproperty
    @classmethod
    def code_path(cls) -> None:
        """No code folder, hence no checksums file (see `lmc_jax.data.folder.ImageFolder`)."""
        return None

    def __init__(self, *, sizes: dict[str, int], resolution: int = 32, seed: int = 0,
                 data_dir: str, patterned: bool = False):
        unknown = set(sizes) - set(SPLITS)
        if unknown:
            raise UserError(f"unknown shapes split(s) {sorted(unknown)}; use {list(SPLITS)}")
        self._sizes = {k: int(v) for k, v in sizes.items()}
        self._resolution = int(resolution)
        self._seed = int(seed)
        self._patterned = bool(patterned)
        tag = "_".join(f"{k}{v}" for k, v in sorted(self._sizes.items()))
        world = "_patterned" if patterned else ""
        config = tfds.core.BuilderConfig(
            name=f"res{resolution}_seed{seed}_{tag}{world}",
            description=f"{resolution}x{resolution} renders, seed {seed}, sizes {self._sizes}"
                        f"{', patterned' if patterned else ''}",
        )
        super().__init__(config=config, data_dir=data_dir, file_format="array_record")

    def _info(self) -> tfds.core.DatasetInfo:
        r = self._resolution
        return tfds.core.DatasetInfo(
            builder=self,
            description="Sphere-traced coloured primitives with captions (lmc_jax.data.shapes).",
            features=tfds.features.FeaturesDict({
                "image": tfds.features.Image(shape=(r, r, 3), encoding_format="png"),
                "shape": tfds.features.ClassLabel(names=list(SHAPES)),
                "colour": tfds.features.ClassLabel(names=list(COLOURS)),
                "pattern": tfds.features.ClassLabel(names=list(PATTERNS)),
                "caption": tfds.features.Text(),
            }),
            metadata=tfds.core.MetadataDict(),
            disable_shuffling=True,  # example i stays at index i
        )

    def _split_generators(self, dl_manager: Any) -> dict[str, Iterator]:
        return {split: self._generate_examples(split, n) for split, n in self._sizes.items()}

    def _generate_examples(self, split: str, n: int) -> Iterator[tuple[int, dict[str, Any]]]:
        block = 1024
        for start in range(0, n, block):
            idx = np.arange(start, min(start + block, n))
            images = render(self._seed, split, idx, self._resolution,
                            patterned=self._patterned)
            shapes, colours = class_of(idx)
            patterns = pattern_of(idx, self._patterned)
            for i, image, s, c, p in zip(idx, images, shapes, colours, patterns, strict=True):
                yield int(i), {"image": Image.fromarray(image), "shape": int(s), "colour": int(c),
                               "pattern": int(p),
                               "caption": caption(int(s), int(c), pattern=int(p))}


def load_split(split: str, size: int, cache_dir: str, resolution: int = 32,
               seed: int = 0, patterned: bool = False) -> Any:
    """The tfds data source of `split` (built under `cache_dir` on first use)."""
    if size < 1:
        raise UserError(f"the shapes split {split!r} needs at least one example, got {size}")
    builder = ShapesDataset(sizes={split: size}, resolution=resolution, seed=seed,
                            data_dir=os.path.expanduser(cache_dir), patterned=patterned)
    builder.download_and_prepare()
    return builder.as_data_source()[split]


def load_arrays(split: str, size: int, cache_dir: str, resolution: int = 32,
                seed: int = 0, patterned: bool = False) -> dict[str, np.ndarray]:
    """All of a split in memory: {'image' uint8 [N, r, r, 3], 'shape', 'colour', 'pattern'
    [N]} (of the patterned world with `patterned`)."""
    source = load_split(split, size, cache_dir, resolution, seed, patterned)
    examples = source.__getitems__(list(range(len(source))))
    return {
        "image": np.stack([ex["image"] for ex in examples]),
        **{k: np.asarray([ex[k] for ex in examples], np.int32)
           for k in ("shape", "colour", "pattern")},
    }


def epoch_indices(n: int, batch: int, seed: int) -> Callable[[int], np.ndarray]:
    """`indices(step)` [batch]: grain's shuffle of range(n) for each epoch, batches never
    straddling two epochs, so a step's batch depends only on `(n, batch, seed, step)`."""
    if n < batch:
        raise UserError(f"{n} examples are fewer than the batch size {batch}")
    order = grain.MapDataset.range(n).shuffle(
        seed=int(np.random.SeedSequence(int(seed) % 2**32).generate_state(1)[0]))
    per_epoch = n // batch

    def indices(step: int) -> np.ndarray:
        epoch, k = divmod(int(step), per_epoch)
        start = epoch * n + k * batch  # grain's shuffle: index e*n + i is epoch e's i-th sample
        return np.asarray([order[start + j] for j in range(batch)])

    return indices


def shapes_source(cfg: Any, prior: Any, batch: int, seed: int, conditional: bool,
                  workdir: str) -> Callable[[int], tuple[jax.Array, jax.Array]]:
    """`batch(step) -> (x, emb)`: training renders (data.num_images of the 'train' split, of the
    patterned world with data.patterned, in the prior's x space) and the embedding of their
    canonical caption (`conditional`) or of ""."""
    h, w, c = prior.image_shape
    if h != w or c != 3:
        raise UserError(f"data.source='shapes' needs square RGB images; {prior.name!r} takes "
                        f"{h}x{w}x{c}")
    cache_dir = os.path.expanduser(cfg.get("cache_dir", "") or os.path.join(workdir, "data"))
    patterned = bool(cfg.get("patterned", False))
    data = load_arrays("train", int(cfg.get("num_images", 4096)), cache_dir, h,
                       patterned=patterned)
    images = data["image"].astype(np.float32) / 127.5 - 1.0
    if prior.kind == "latent":
        images = np.concatenate([np.asarray(prior.encode(jnp.asarray(images[i:i + 16])))
                                 for i in range(0, len(images), 16)])
    labels = world_class(data["shape"], data["colour"], data["pattern"])
    classes = NUM_CLASSES * (len(PATTERNS) if patterned else 1)
    if conditional:
        table = prior.embed_text([caption(*map(int, class_of(k % NUM_CLASSES)),
                                          pattern=k // NUM_CLASSES) for k in range(classes)])
    else:
        null = prior.embed_text([""])
        table = jnp.broadcast_to(null, (classes,) + null.shape[1:])
    indices = epoch_indices(len(images), batch, seed)

    def get(step: int) -> tuple[jax.Array, jax.Array]:
        idx = indices(step)
        return jnp.asarray(images[idx]), table[jnp.asarray(labels[idx])]

    return get
