"""Image-to-image on the embedded prior's world (configs/i2i.py:tiny): data, prompts, scores.

Data (`data.source='renders'`): renders of `lmc_jax.data.shapes` in one colour (`data.colour`),
every shape in turn. Training renders are the first `data.num_images` of that colour in split
`data.split`; held-out renders (`heldout` of them) come from `data.heldout_split`, another
split, so another random scene for every example (camera, light, pose, background, albedo
jitter): no held-out render is a training render (`heldout_set` also skips the training
examples when both splits are the same). f_theta never sees a target image: its only training
signal is the guidance loss on its own outputs.

Prompts may hold `{shape}` ("a blue {shape}"): each image's prompt names its own primitive
(`SHAPES`, read from the render's label, as a captioned data set would give it), so a red cube
is pulled toward "a blue cube" (and, for DDS, away from the source prompt "a red cube").

Held-out figures (`Scorer`), on outputs clipped to [-1, 1] as a saved image would be:

- `target_colour`: the shipped evaluator reads the prompt's colour (and sees an object);
- `shape_kept`: it reads the input's own shape (and sees an object); `both`: both at once;
- `rms_to_input`: RMS change from the input (pixels in [-1, 1]);
- `rms_to_recoloured`: RMS distance to the same scene rendered in the target colour
  (`shapes.render(..., colour=...)`): the paired answer, never used in training, a reference
  only;
- `lpips_to_input` (and `lpips_to_recoloured`): LPIPS-VGG (`lmc_jax.metrics.lpips`) with the
  weights of `lpips_path`; without them the figure is the string 'unavailable: <why>' (the
  VGG16 and LPIPS weights do not ship: `lmc_jax/metrics/lpips.py` says how to convert them).
"""

from __future__ import annotations

import math

import jax.numpy as jnp
import ml_collections
import numpy as np

from lmc_jax.errors import UserError
from lmc_jax.priors.base import Prior

SHAPE_SLOT = "{shape}"
# Guidance keys a method may set for itself under `per_method.<method>` (as configs/edit.py).
GUIDANCE_KEYS = ("w", "weighting", "t_min", "t_max")


def fill(prompt: str, shape: int) -> str:
    """`prompt` with `{shape}` replaced by the name of primitive `shape`."""
    from lmc_jax.data.shapes import SHAPES

    return prompt.replace(SHAPE_SLOT, SHAPES[int(shape)])


def colour_index(name: str) -> int:
    from lmc_jax.data.shapes import COLOURS

    if name not in COLOURS:
        raise UserError(f"data.colour must be one of {list(COLOURS)}, got {name!r}")
    return list(COLOURS).index(name)


def target_colour(prompt: str) -> int:
    """The colour named by the (filled) target prompt; a UserError if it names none."""
    from lmc_jax.metrics.shapes_eval import parse_prompt

    return parse_prompt(fill(prompt, 0) if SHAPE_SLOT in prompt else prompt)[1]


def _split_indices(data: ml_collections.ConfigDict, n_train: int, n_heldout: int
                   ) -> dict[str, tuple[str, np.ndarray]]:
    from lmc_jax.data.shapes import SHAPES, SPLITS, indices_of_colour

    for key in ("split", "heldout_split"):
        if data[key] not in SPLITS:
            raise UserError(f"data.{key} must be one of {list(SPLITS)}, got {data[key]!r}")
    colour = colour_index(data.colour)
    same = data.split == data.heldout_split
    start = math.ceil(n_train / len(SHAPES)) if same else 0  # past every training block
    return {"train": (data.split, indices_of_colour(colour, n_train)),
            "heldout": (data.heldout_split, indices_of_colour(colour, n_heldout, start))}


def split_indices(config: ml_collections.ConfigDict) -> dict[str, tuple[str, np.ndarray]]:
    """`{'train': (split, example indices), 'heldout': (split, indices)}` of a renders run."""
    return _split_indices(config.data, int(config.data.num_images), int(config.heldout))


def _render(prior: Prior, split: str, indices: np.ndarray, colour: int | None = None
            ) -> tuple[np.ndarray, np.ndarray]:
    """Pixels [N, H, W, 3] in [-1, 1] of examples `indices` and their shape ids."""
    from lmc_jax.data import shapes

    h, w, c = prior.image_shape
    if h != w or c != 3:
        raise UserError(f"data.source='renders' needs square RGB images; {prior.name!r} takes "
                        f"{h}x{w}x{c}")
    # One chunk size for every set (a multiple of 5 examples per shape): one compile per shape.
    u8 = shapes.render(0, split, indices, resolution=h, chunk=20, colour=colour)
    return u8.astype(np.float32) / 127.5 - 1.0, np.asarray(shapes.class_of(indices)[0])


def training_set(config: ml_collections.ConfigDict, prior: Prior
                 ) -> tuple[np.ndarray, np.ndarray]:
    """The training renders in the prior's x space and their shape ids."""
    split, idx = split_indices(config)["train"]
    pixels, labels = _render(prior, split, idx)
    return np.asarray(prior.encode(jnp.asarray(pixels))), labels


def heldout_set(config: ml_collections.ConfigDict, prior: Prior) -> dict[str, np.ndarray]:
    """Held-out renders: `pixels` and `x` (the inputs), `shape` ids, and `recoloured` (the same
    scenes in the target prompt's colour: the reference answer, for scoring only)."""
    split, idx = split_indices(config)["heldout"]
    pixels, labels = _render(prior, split, idx)
    recoloured, _ = _render(prior, split, idx, target_colour(config.prompt))
    return {"pixels": pixels, "x": np.asarray(prior.encode(jnp.asarray(pixels))),
            "shape": labels, "recoloured": recoloured, "indices": idx}


def method_guidance(config: ml_collections.ConfigDict
                    ) -> tuple[ml_collections.ConfigDict, dict]:
    """The guidance section `guidance.method` runs with: `guidance`, with the non-empty keys of
    `per_method.<method>` (if the config has that section) over it. Returns the section and
    `{key: (shared, own)}` for every key the method's own settings changed."""
    gcfg = config.guidance.copy_and_resolve_references()
    own = config.get("per_method", {}).get(gcfg.method, {})
    replaced = {}
    for key, value in own.items():
        if value is None:
            continue
        if key not in GUIDANCE_KEYS:
            raise UserError(f"per_method.{gcfg.method}.{key} is not a per-method setting; use "
                            f"one of {list(GUIDANCE_KEYS)}")
        if gcfg[key] != value:
            replaced[key] = (gcfg[key], value)
        gcfg[key] = value
    return gcfg, replaced


class Scorer:
    """Scores outputs for the held-out set `heldout` (see the module docstring)."""

    def __init__(self, heldout: dict[str, np.ndarray], target: int, lpips_path: str = ""):
        from lmc_jax.metrics.shapes_eval import load_shipped_evaluator

        self.heldout, self.target = heldout, target
        self.evaluator = load_shipped_evaluator("embedded")
        self._lpips = None
        self.lpips_path = lpips_path

    def hits(self, outputs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Per image (bool [N] each): the evaluator sees an object in the target colour; it
        sees an object of the input's shape."""
        from lmc_jax.metrics.shapes_eval import NO_OBJECT_BELOW

        y = np.clip(np.asarray(outputs, np.float32), -1.0, 1.0)
        p_shape, p_colour, p_object = self.evaluator.predict(y)
        seen = p_object >= NO_OBJECT_BELOW
        return (seen & (p_colour.argmax(-1) == self.target),
                seen & (p_shape.argmax(-1) == self.heldout["shape"][:len(y)]))

    def __call__(self, outputs: np.ndarray, lpips: bool = False) -> dict:
        y = np.clip(np.asarray(outputs, np.float32), -1.0, 1.0)
        colour_ok, shape_ok = self.hits(y)
        rms = lambda a, b: float(np.sqrt(np.mean((a - b) ** 2)))  # noqa: E731
        out = {"target_colour": float(colour_ok.mean()), "shape_kept": float(shape_ok.mean()),
               "both": float((colour_ok & shape_ok).mean()),
               "rms_to_input": rms(y, self.heldout["pixels"]),
               "rms_to_recoloured": rms(y, self.heldout["recoloured"])}
        if lpips:
            out.update(self.lpips(y))
        return out

    def lpips(self, y: np.ndarray) -> dict:
        """`lpips_to_input`, `lpips_to_recoloured`: means over the set, or 'unavailable: ...'."""
        from lmc_jax.metrics import Unavailable, load_lpips
        from lmc_jax.metrics import lpips as lpips_distance

        if self._lpips is None:
            self._lpips = (load_lpips(self.lpips_path) if self.lpips_path else Unavailable(
                "lpips", "no LPIPS weights given (set --config.lpips_path=FILE; "
                         "lmc_jax/metrics/lpips.py says how to convert them)"))
        if isinstance(self._lpips, Unavailable):
            return {"lpips_to_input": str(self._lpips), "lpips_to_recoloured": str(self._lpips)}
        return {f"lpips_to_{k}": float(np.mean(lpips_distance(self._lpips, jnp.asarray(y),
                                                              jnp.asarray(self.heldout[ref]))))
                for k, ref in (("input", "pixels"), ("recoloured", "recoloured"))}
