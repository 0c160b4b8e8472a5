"""Image metrics that papers report: CLIP score / R-precision, LPIPS, colour saturation.

Each metric is one small module with its formula in the docstring:
- `clip`: CLIP score `100 max(cos, 0)` and CLIP R-precision (transformers' FlaxCLIPModel);
- `lpips`: LPIPS-VGG in Flax, weights converted once with `python -m
  lmc_jax.metrics.convert_lpips` (that script is never imported here);
- `color`: the testbed's saturation ratio and Hasler & Suesstrunk's colourfulness.

Loaders return the model or an `Unavailable(name, reason)` and never raise, so an app can write
`{"clip_score": "unavailable: <reason>"}` (`str(u)`) into metrics.json and go on.

Note: `lmc_jax.metrics.lpips` is the re-exported function, not the module; reach the module's
other names with `from lmc_jax.metrics.lpips import make_lpips` (resolved through sys.modules).
"""

from lmc_jax.metrics.clip import (
    ClipModel,
    clip_score,
    image_features,
    load_clip,
    r_precision,
    text_features,
)
from lmc_jax.metrics.color import colorfulness, saturation, saturation_per_image
from lmc_jax.metrics.common import Unavailable
from lmc_jax.metrics.lpips import Lpips, load_lpips, lpips

__all__ = [
    "ClipModel",
    "Lpips",
    "Unavailable",
    "clip_score",
    "colorfulness",
    "image_features",
    "load_clip",
    "load_lpips",
    "lpips",
    "r_precision",
    "saturation",
    "saturation_per_image",
    "text_features",
]
