"""LPIPS (Zhang et al. 2018, "The Unreasonable Effectiveness of Deep Features"), VGG variant.

For images x0, x1 in [-1, 1] (Eq. 1 of the paper, version 0.1 of the reference code):

    z = (x - shift) / scale                     shift = (-.030, -.088, -.188),
                                                scale = (.458, .448, .450)   (ScalingLayer)
    y^l = VGG16 activation at tap l             relu1_2, relu2_2, relu3_3, relu4_3, relu5_3
    yhat^l_hw = y^l_hw / (||y^l_hw||_2 + 1e-10)     unit norm over channels at each pixel
    d(x0, x1) = sum_l 1/(H_l W_l) sum_hw sum_c w^l_c (yhat0^l_hwc - yhat1^l_hwc)^2

with learned non-negative w^l (a 1x1 convolution without bias, the `lin` layers). The result
is 0 for identical images, symmetric and non-negative. Images need H, W >= 16 (four 2x2 max
pools before relu5_3).

Weights: a `.npz` (or `.safetensors`) with `conv{b}_{i}/kernel` [3, 3, C_in, C_out] (HWIO),
`conv{b}_{i}/bias` [C_out] for the 13 VGG16 convolutions and `lin{l}` [C_l] for the 5 heads.
Make it from the official PyTorch checkpoints (torchvision's `vgg16-397923af.pth` and the LPIPS
`weights/v0.1/vgg.pth`) with

    python -m lmc_jax.metrics.convert_lpips --vgg vgg16-397923af.pth --lin vgg.pth \\
        --out lpips_vgg.npz

`load_lpips(path)` returns an `Lpips`, or an `Unavailable` naming the path; it never raises.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from lmc_jax.errors import UserError
from lmc_jax.metrics.common import Unavailable, first_line

SHIFT = (-0.030, -0.088, -0.188)
SCALE = (0.458, 0.448, 0.450)
NORM_EPS = 1e-10
# VGG16's convolutions, block by block (the configuration 'D' of Simonyan & Zisserman).
VGG16_BLOCKS = ((64, 64), (128, 128), (256, 256, 256), (512, 512, 512), (512, 512, 512))
TAPS = ("relu1_2", "relu2_2", "relu3_3", "relu4_3", "relu5_3")
LPIPS_HINT = ("convert the official weights with `python -m lmc_jax.metrics.convert_lpips "
              "--vgg vgg16-397923af.pth --lin vgg.pth --out lpips_vgg.npz` "
              "(see lmc_jax/metrics/lpips.py)")


def conv_names() -> list[str]:
    """'conv1_1', 'conv1_2', 'conv2_1', ... 'conv5_3': the 13 convolutions in order."""
    return [f"conv{b + 1}_{i + 1}" for b, block in enumerate(VGG16_BLOCKS)
            for i in range(len(block))]


def expected_shapes() -> dict[str, tuple[int, ...]]:
    """Every array of the weights file and its shape."""
    shapes, c_in = {}, 3
    for b, block in enumerate(VGG16_BLOCKS):
        for i, c_out in enumerate(block):
            shapes[f"conv{b + 1}_{i + 1}/kernel"] = (3, 3, c_in, c_out)
            shapes[f"conv{b + 1}_{i + 1}/bias"] = (c_out,)
            c_in = c_out
        shapes[f"lin{b}"] = (block[-1],)
    return shapes


class Vgg16Features(nn.Module):
    """VGG16 convolutions up to relu5_3: [N, H, W, 3] (already scaled) -> the 5 LPIPS taps.

    3x3 convolutions (padding 1) + ReLU; a 2x2 stride-2 max pool before blocks 2-5; the tap of
    each block is its last ReLU output ([N, H // 2^b, W // 2^b, C_b], b = 0..4; pools floor).
    """

    @nn.compact
    def __call__(self, x: jax.Array) -> list[jax.Array]:
        taps = []
        for b, block in enumerate(VGG16_BLOCKS):
            if b > 0:
                x = nn.max_pool(x, (2, 2), strides=(2, 2), padding="VALID")
            for i, c_out in enumerate(block):
                x = nn.relu(nn.Conv(c_out, (3, 3), padding=1, name=f"conv{b + 1}_{i + 1}")(x))
            taps.append(x)
        return taps


@dataclasses.dataclass(frozen=True, eq=False)
class Lpips:
    """Loaded LPIPS: `params = {'vgg': Flax params of Vgg16Features, 'lin': [5 arrays [C_l]]}`."""

    name: str
    params: Any = dataclasses.field(repr=False)


def scale_input(images: jax.Array) -> jax.Array:
    """LPIPS's ScalingLayer: `(x - shift) / scale` per RGB channel, x in [-1, 1]."""
    return (images - jnp.asarray(SHIFT, jnp.float32)) / jnp.asarray(SCALE, jnp.float32)


def unit_normalize(features: jax.Array) -> jax.Array:
    """`y / (||y||_2 + 1e-10)`, the norm over channels (the last axis) at each pixel."""
    norm = jnp.sqrt(jnp.sum(features**2, axis=-1, keepdims=True))
    return features / (norm + NORM_EPS)


def distance_from_normalized(n0: list[jax.Array], n1: list[jax.Array],
                             lin: list[jax.Array]) -> jax.Array:
    """`sum_l mean_hw sum_c w^l_c (n0^l - n1^l)^2`, unit-normalized taps [N, h, w, C_l] -> [N]."""
    total = 0.0
    for y0, y1, w in zip(n0, n1, lin, strict=True):
        total = total + jnp.mean(jnp.sum((y0 - y1) ** 2 * w, axis=-1), axis=(1, 2))
    return total


def distance_from_features(taps0: list[jax.Array], taps1: list[jax.Array],
                           lin: list[jax.Array]) -> jax.Array:
    """The LPIPS sum over taps (module docstring) from two lists of [N, h, w, C_l] taps -> [N]."""
    return distance_from_normalized([unit_normalize(t) for t in taps0],
                                    [unit_normalize(t) for t in taps1], lin)


def _check_images(name: str, images: Any) -> jax.Array:
    images = jnp.asarray(images, jnp.float32)
    if images.ndim != 4 or images.shape[-1] != 3 or min(images.shape[1:3]) < 16:
        raise UserError(f"lpips {name} has shape {tuple(images.shape)}; it takes [batch, height, "
                        "width, 3] in [-1, 1] (NHWC) with height and width >= 16")
    return images


@jax.jit
def _features(params: Any, images: jax.Array) -> list[jax.Array]:
    return Vgg16Features().apply({"params": params["vgg"]}, scale_input(images))


@jax.jit
def _distance(params: Any, a: jax.Array, b: jax.Array) -> jax.Array:
    # a and b go through one loop body (lax.map), so equal inputs give bitwise equal normalized
    # features and d(a, a) is exactly 0. Two separate passes, or two rows of one batched pass,
    # may be compiled with different rounding (seen: ~1e-16 from the channel-norm reduction).
    taps = jax.lax.map(lambda x: [unit_normalize(t) for t in _features(params, x)],
                       jnp.stack([a, b]))
    return distance_from_normalized([t[0] for t in taps], [t[1] for t in taps], params["lin"])


def features(model: Lpips, images: jax.Array) -> list[jax.Array]:
    """The 5 VGG16 taps of [N, H, W, 3] images in [-1, 1] (after the scaling layer)."""
    return _features(model.params, _check_images("images", images))


def lpips(model: Lpips, a: jax.Array, b: jax.Array) -> jax.Array:
    """[N, H, W, 3], [N, H, W, 3] in [-1, 1] -> [N] LPIPS distances (module docstring)."""
    a, b = _check_images("a", a), _check_images("b", b)
    if a.shape != b.shape:
        raise UserError(f"lpips compares images of one shape, got {a.shape} and {b.shape}")
    return _distance(model.params, a, b)


def make_lpips(weights: dict[str, np.ndarray], name: str = "lpips") -> Lpips:
    """An `Lpips` from the flat weights dict (the file's arrays); shapes are checked."""
    want = expected_shapes()
    missing = [k for k in want if k not in weights]
    if missing:
        raise UserError(f"{name}: the weights lack {len(missing)} of {len(want)} arrays "
                        f"(e.g. {missing[0]}); {LPIPS_HINT}")
    for key, shape in want.items():
        if tuple(np.shape(weights[key])) != shape:
            raise UserError(f"{name}: {key} has shape {tuple(np.shape(weights[key]))}, VGG16 "
                            f"LPIPS needs {shape}")
    lin = [np.asarray(weights[f"lin{i}"], np.float32) for i in range(len(TAPS))]
    if any(np.any(w < 0) for w in lin):
        raise UserError(f"{name}: LPIPS linear heads must be non-negative (the reference code "
                        "clamps them); these are not LPIPS weights")
    vgg = {c: {"kernel": jnp.asarray(weights[f"{c}/kernel"], jnp.float32),
               "bias": jnp.asarray(weights[f"{c}/bias"], jnp.float32)} for c in conv_names()}
    return Lpips(name=name, params={"vgg": vgg, "lin": [jnp.asarray(w) for w in lin]})


def read_weights(path: str | Path) -> dict[str, np.ndarray]:
    """The arrays of a `.npz` or `.safetensors` weights file, by name."""
    path = Path(path)
    if path.suffix == ".safetensors":
        from safetensors.numpy import load_file

        return dict(load_file(str(path)))
    with np.load(path, allow_pickle=False) as data:
        return {k: np.asarray(data[k]) for k in data.files}


def load_lpips(path: str | Path) -> Lpips | Unavailable:
    """`Lpips` from a converted weights file, or `Unavailable('lpips', reason)`; never raises."""
    file = Path(path).expanduser()
    if not file.is_file():
        what = "is a folder, not a file" if file.is_dir() else "does not exist"
        return Unavailable("lpips", f"LPIPS weights not found: {str(path)!r} {what}; {LPIPS_HINT}")
    try:
        return make_lpips(read_weights(file), name=f"lpips:{path}")
    except UserError as e:
        return Unavailable("lpips", str(e))
    except Exception as e:  # unreadable file: the metric is skipped, the run goes on
        return Unavailable("lpips", f"cannot read LPIPS weights {str(path)!r}: {first_line(e)}; "
                                    f"{LPIPS_HINT}")


__all__ = [
    "Lpips",
    "Vgg16Features",
    "distance_from_features",
    "distance_from_normalized",
    "expected_shapes",
    "features",
    "load_lpips",
    "lpips",
    "make_lpips",
    "read_weights",
    "scale_input",
    "unit_normalize",
]
