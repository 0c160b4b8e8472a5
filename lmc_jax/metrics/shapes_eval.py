"""Shape-and-colour evaluator: a small CNN that names the primitive and colour of an image.

It scores images from the embedded prior (`lmc_jax.data.shapes`: 5 shapes x 5 colours) and
views of text-to-3D results, where CLIP knows too little about 32x32 renders. `ShapeColourNet`
maps an image in [-1, 1] (NHWC, any square size, resized to 32x32) to two softmax heads,
`p(shape | x)` over `SHAPES` and `p(colour | x)` over `COLOURS`, and (`object_head=True`, the
shipped evaluator) a sigmoid `p(object | x)`: whether the image shows an object at all, trained
against `lmc_jax.data.shapes.render_no_object` (the bare background, fog, soft bands and glows:
how a text-to-3D field fails), so that an empty or foggy scene cannot score as its prompt. It
is trained on the 'eval_train' split (`python -m lmc_jax.main --config=configs/evaluator.py
--workdir=DIR`), renders the prior never saw, and a trained copy ships in
`lmc_jax/assets/embedded_prior/evaluator`.

A prompt names one shape and one colour (`parse_prompt`, shape synonyms from `SHAPE_WORDS`).
Metrics for images `x_n` generated from prompts `y_n = (s_n, c_n)`:

- accuracy = mean_n [argmax_s p(s | x_n) = s_n and argmax_c p(c | x_n) = c_n
                     and p(object | x_n) >= NO_OBJECT_BELOW];
- R-precision = mean_n [(s, c)(argmax_m score(x_n, y'_m)) = (s_n, c_n)
                        and p(object | x_n) >= NO_OBJECT_BELOW]
  over candidate prompts `y'_m = (s'_m, c'_m)` (default: all 25 "a {colour} {shape}"), with
  score(x, y') = log p(s' | x) + log p(c' | x).

(Without an object head, p(object | x) = 1.) The patterned world's evaluator
(`pattern_head=True`, configs/evaluator.py:patterned, shipped in
`lmc_jax/assets/patterned_prior/evaluator`) also gives `p(pattern | x)` over `PATTERNS` (plain,
striped, checkered, dotted): `pattern_accuracy`. A view counts as "no object" only when the head is
confident, p(object) < NO_OBJECT_BELOW = 0.1: at 1/2, 3% of the views of SDS w = 100's grainy,
over-saturated text-to-3D objects (benchmarks/ablation_t23d.py, seed 0) were called empty, at
0.1 one view in 200, while the recall on held-out no-object scenes barely moves (1000 scenes of
`render_no_object`: 0.998 at 1/2, 0.993 at 0.1). The threshold was chosen after seeing those
views.

Weights are stored as float16 Flax msgpack (`params.msgpack`) next to `evaluator.json`
(architecture, class names, training metadata); never pickle.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import re
import string
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import serialization

from lmc_jax.data.shapes import COLOURS, PATTERNS, SHAPE_WORDS, SHAPES
from lmc_jax.errors import UserError

INPUT_SIZE = 32
NO_OBJECT_BELOW = 0.1  # p(object | x) under this: the image shows no object (module docstring)
PARAMS_FILE = "params.msgpack"
META_FILE = "evaluator.json"
TRAIN_COMMAND = ("python -m lmc_jax.main --config=configs/evaluator.py --workdir=runs/evaluator "
                 "and copy runs/evaluator/evaluator to {path}")


class ShapeColourNet(nn.Module):
    """Strided 3x3 convs (ReLU), global average pool, a hidden dense layer, two logit heads
    (and optional object and pattern heads)."""

    features: Sequence[int] = (32, 32, 64, 64)
    hidden: int = 64
    object_head: bool = False
    pattern_head: bool = False

    @nn.compact
    def __call__(self, x: jax.Array) -> tuple[jax.Array, ...]:
        """x: [N, 32, 32, 3] in [-1, 1] -> (shape logits [N, 5], colour logits [N, 5]), then,
        with `object_head`, the object logit [N] and, with `pattern_head`, the pattern logits
        [N, 4] (always last)."""
        for i, f in enumerate(self.features):
            x = nn.relu(nn.Conv(f, (3, 3), strides=1 if i == 0 else 2)(x))
        x = nn.relu(nn.Dense(self.hidden)(x.mean(axis=(1, 2))))
        out = (nn.Dense(len(SHAPES), name="shape_head")(x),
               nn.Dense(len(COLOURS), name="colour_head")(x))
        if self.object_head:
            out += (nn.Dense(1, name="object_head")(x)[:, 0],)
        if self.pattern_head:
            out += (nn.Dense(len(PATTERNS), name="pattern_head")(x),)
        return out


def param_count(params: Any) -> int:
    """Number of scalars in a params pytree."""
    return int(sum(np.size(p) for p in jax.tree_util.tree_leaves(params)))


def _to_input(images: jax.Array) -> jax.Array:
    """[N, H, H, 3] in [-1, 1] -> float32 [N, 32, 32, 3] (linear, antialiased resize)."""
    images = images.astype(jnp.float32)
    if images.shape[1:3] != (INPUT_SIZE, INPUT_SIZE):
        images = jax.image.resize(images, (images.shape[0], INPUT_SIZE, INPUT_SIZE, 3),
                                  "linear", antialias=True)
    return images


def classify(module: ShapeColourNet, params: Any, images: jax.Array) -> tuple[jax.Array, ...]:
    """(shape logits, colour logits[, object logit]) of NHWC images in [-1, 1], any square size."""
    return module.apply({"params": params}, _to_input(images))


@functools.partial(jax.jit, static_argnums=0)
def _probs(module: ShapeColourNet, params: Any, images: jax.Array
           ) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    logits = classify(module, params, images)
    n = images.shape[0]
    p_object = (jax.nn.sigmoid(logits[2]) if module.object_head
                else jnp.ones(n, jnp.float32))
    p_pattern = (jax.nn.softmax(logits[-1]) if module.pattern_head
                 else jnp.full((n, len(PATTERNS)), 1.0 / len(PATTERNS)))
    return jax.nn.softmax(logits[0]), jax.nn.softmax(logits[1]), p_object, p_pattern


def _check_images(images: Any) -> np.ndarray | jax.Array:
    """NHWC RGB square images; uint8 in [0, 255] is converted to [-1, 1]."""
    if getattr(images, "ndim", None) != 4 or images.shape[-1] != 3 \
            or images.shape[1] != images.shape[2]:
        raise UserError(f"the evaluator needs square RGB images [N, H, H, 3], got shape "
                        f"{getattr(images, 'shape', type(images).__name__)}")
    if images.dtype == np.uint8:
        images = np.asarray(images, np.float32) / 127.5 - 1.0
    return images


@dataclasses.dataclass(frozen=True)
class Evaluator:
    """A trained `ShapeColourNet` with its params (float32) and metadata."""

    module: ShapeColourNet
    params: Any
    metadata: dict = dataclasses.field(default_factory=dict)

    def probs(self, images: Any) -> tuple[np.ndarray, np.ndarray]:
        """(p(shape) [N, 5], p(colour) [N, 5]) of NHWC images in [-1, 1] (uint8 also taken)."""
        return self.predict(images)[:2]

    def predict(self, images: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(p(shape) [N, 5], p(colour) [N, 5], p(object) [N]); p(object) = 1 without an
        object head."""
        return self._all(images)[:3]

    def require_pattern_head(self) -> None:
        """A UserError, naming the evaluator that has one, when this one has no pattern head."""
        if not self.module.pattern_head:
            raise UserError("this evaluator has no pattern head; use the patterned world's "
                            "(lmc_jax/assets/patterned_prior/evaluator, configs/evaluator.py:"
                            "patterned)")

    def pattern_probs(self, images: Any) -> np.ndarray:
        """p(pattern) [N, 4] over `PATTERNS`; a UserError for an evaluator without the head."""
        self.require_pattern_head()
        return self._all(images)[3]

    def _all(self, images: Any) -> tuple[np.ndarray, ...]:
        images = _check_images(images)
        n, size = images.shape[0], images.shape[1]
        if n == 0:
            return (np.zeros((0, len(SHAPES)), np.float32),
                    np.zeros((0, len(COLOURS)), np.float32), np.zeros((0,), np.float32),
                    np.zeros((0, len(PATTERNS)), np.float32))
        # Fixed power-of-two chunks bound the compiled shapes; big images get smaller chunks.
        chunk = max(1, min(256, (1 << 22) // (size * size)))
        chunk = min(chunk, 1 << (n - 1).bit_length())
        outs = []
        for i in range(0, n, chunk):
            x = jnp.asarray(images[i:i + chunk], jnp.float32)
            m = x.shape[0]
            if m < chunk:
                x = jnp.concatenate([x, jnp.zeros((chunk - m, *x.shape[1:]), x.dtype)])
            outs.append([np.asarray(p[:m]) for p in _probs(self.module, self.params, x)])
        return tuple(np.concatenate(parts) for parts in zip(*outs, strict=True))


# ----------------------------------------------------------------------------------------------
# Training.


def _augment(key: jax.Array, x: jax.Array, max_shift: int = 2) -> jax.Array:
    """Random horizontal flip, brightness x U(0.9, 1.1), shift by up to `max_shift` pixels.

    x: float32 [N, H, W, 3] in [0, 1]. Shifts pad with edge pixels (the plain background)."""
    n, h, w, _ = x.shape
    k_flip, k_bright, k_shift = jax.random.split(key, 3)
    flip = jax.random.bernoulli(k_flip, 0.5, (n, 1, 1, 1))
    x = jnp.where(flip, x[:, :, ::-1], x)
    x = x * jax.random.uniform(k_bright, (n, 1, 1, 1), minval=0.9, maxval=1.1)
    padded = jnp.pad(x, ((0, 0), (max_shift, max_shift), (max_shift, max_shift), (0, 0)),
                     mode="edge")
    offsets = jax.random.randint(k_shift, (n, 2), 0, 2 * max_shift + 1)
    crop = jax.vmap(lambda im, o: jax.lax.dynamic_slice(im, (o[0], o[1], 0), (h, w, 3)))
    return jnp.clip(crop(padded, offsets), 0.0, 1.0)


def _resize_u8(images_u8: np.ndarray) -> np.ndarray:
    """uint8 images of any square size -> uint8 [N, 32, 32, 3] (identity at 32x32)."""
    if images_u8.shape[1:3] == (INPUT_SIZE, INPUT_SIZE):
        return images_u8
    out = [np.asarray(_to_input(jnp.asarray(images_u8[i:i + 256], jnp.float32)))
           for i in range(0, len(images_u8), 256)]
    return np.clip(np.round(np.concatenate(out)), 0, 255).astype(np.uint8)


def train_evaluator(images_u8: np.ndarray, shapes: np.ndarray, colours: np.ndarray,
                    steps: int, batch: int, lr: float, seed: int,
                    module: ShapeColourNet | None = None, progress: Any = None,
                    objects: np.ndarray | None = None,
                    patterns: np.ndarray | None = None) -> Any:
    """Trains `ShapeColourNet` (Adam, cosine-decayed `lr`) on uint8 images [N, H, H, 3] with
    labels; returns float32 params.

    The loss is the cross-entropy of the shape and colour heads over the batch's images that
    show an object, plus, with `module.object_head`, the binary cross-entropy of the object head
    over all of them. `objects` [N]: 1 where image n shows an object, 0 for a no-object scene
    (its shape and colour labels are then ignored); default all 1. `patterns` [N] (with
    `module.pattern_head`): the pattern id of each image, or -1 where it has none to learn
    (no-object scenes, blurred copies); the pattern head's cross-entropy over the others is
    added.

    Each step draws `batch` examples with replacement and augments them (`_augment`) with keys
    folded from `seed` and the step number: the same inputs give the same params. `progress`
    optionally wraps the step range (e.g. `lmc_jax.io.progress`).
    """
    images_u8 = np.asarray(images_u8)
    if images_u8.dtype != np.uint8 or images_u8.ndim != 4 or images_u8.shape[-1] != 3:
        raise UserError(f"train_evaluator needs uint8 images [N, H, W, 3], got "
                        f"{images_u8.dtype} {images_u8.shape}")
    n = len(images_u8)
    if not (len(shapes) == len(colours) == n) or n == 0:
        raise UserError(f"train_evaluator needs one shape and colour label per image; got "
                        f"{n} images, {len(shapes)} shapes, {len(colours)} colours")
    if steps < 1 or batch < 1:
        raise UserError(f"train_evaluator needs steps >= 1 and batch >= 1, got {steps}, {batch}")
    module = module or ShapeColourNet()
    objects = np.ones(n, np.float32) if objects is None else np.asarray(objects, np.float32)
    if objects.shape != (n,) or not np.all((objects == 0) | (objects == 1)):
        raise UserError(f"train_evaluator's objects must be n = {n} values in {{0, 1}}")
    if not module.object_head and not np.all(objects == 1):
        raise UserError("no-object examples need ShapeColourNet(object_head=True)")
    if module.pattern_head != (patterns is not None):
        raise UserError("train_evaluator takes pattern labels exactly when the module has a "
                        "pattern head (ShapeColourNet(pattern_head=True))")
    patterns = np.full(n, -1) if patterns is None else np.asarray(patterns)
    if patterns.shape != (n,) or not np.all((patterns >= -1) & (patterns < len(PATTERNS))):
        raise UserError(f"train_evaluator's patterns must be n = {n} values in "
                        f"[-1, {len(PATTERNS)})")
    labels_p = jnp.asarray(patterns, jnp.int32)
    data = jnp.asarray(_resize_u8(images_u8))
    labels_s = jnp.asarray(shapes, jnp.int32)
    labels_c = jnp.asarray(colours, jnp.int32)
    labels_o = jnp.asarray(objects)
    k_init, key = jax.random.split(jax.random.PRNGKey(seed))
    params = module.init(k_init, jnp.zeros((1, INPUT_SIZE, INPUT_SIZE, 3)))["params"]
    opt = optax.adam(optax.cosine_decay_schedule(lr, steps, alpha=0.01))
    opt_state = opt.init(params)

    @jax.jit
    def step(params, opt_state, i):
        k_idx, k_aug = jax.random.split(jax.random.fold_in(key, i))
        idx = jax.random.randint(k_idx, (batch,), 0, n)
        x = _augment(k_aug, data[idx].astype(jnp.float32) / 255.0) * 2.0 - 1.0

        def loss_fn(p):
            out = module.apply({"params": p}, x)
            obj = labels_o[idx]
            ce_s = optax.softmax_cross_entropy_with_integer_labels(out[0], labels_s[idx])
            ce_c = optax.softmax_cross_entropy_with_integer_labels(out[1], labels_c[idx])
            loss = jnp.sum((ce_s + ce_c) * obj) / jnp.maximum(jnp.sum(obj), 1.0)
            if module.object_head:
                loss = loss + optax.sigmoid_binary_cross_entropy(out[2], obj).mean()
            if module.pattern_head:
                lp = labels_p[idx]
                has = (lp >= 0).astype(jnp.float32)
                ce_p = optax.softmax_cross_entropy_with_integer_labels(out[-1],
                                                                       jnp.maximum(lp, 0))
                loss = loss + jnp.sum(ce_p * has) / jnp.maximum(jnp.sum(has), 1.0)
            return loss

        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, opt_state = opt.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    steps_iter = progress(range(steps)) if progress is not None else range(steps)
    for i in steps_iter:
        params, opt_state, loss = step(params, opt_state, jnp.int32(i))
        if hasattr(steps_iter, "set_postfix") and ((i + 1) % 100 == 0 or i + 1 == steps):
            steps_iter.set_postfix(loss=f"{float(loss):.4g}")
    if not np.isfinite(float(loss)):
        raise UserError(f"evaluator training diverged (loss {float(loss)}); lower train.lr")
    return params


# ----------------------------------------------------------------------------------------------
# Saving and loading.


def save_evaluator(path: str | os.PathLike, params: Any, metadata: dict | None = None,
                   module: ShapeColourNet | None = None) -> Path:
    """Writes `params.msgpack` (float16) and `evaluator.json` to folder `path`."""
    module = module or ShapeColourNet()
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    half = jax.tree_util.tree_map(lambda p: np.asarray(p, np.float16), params)
    (path / PARAMS_FILE).write_bytes(serialization.to_bytes(half))
    meta = {
        "module": {"features": list(module.features), "hidden": int(module.hidden),
                   "object_head": bool(module.object_head),
                   "pattern_head": bool(module.pattern_head)},
        "input_size": INPUT_SIZE,
        "shapes": list(SHAPES),
        "colours": list(COLOURS),
        **({"patterns": list(PATTERNS)} if module.pattern_head else {}),
        "param_count": param_count(params),
        "metadata": metadata or {},
    }
    (path / META_FILE).write_text(json.dumps(meta, indent=2, default=float) + "\n")
    return path


def load_evaluator(path: str | os.PathLike) -> Evaluator:
    """Loads a folder written by `save_evaluator`; refuses other class names or missing files."""
    path = Path(path)
    missing = [f for f in (PARAMS_FILE, META_FILE) if not (path / f).is_file()]
    if missing:
        raise UserError(f"evaluator folder {str(path)!r} lacks {', '.join(missing)}; train one "
                        f"with python -m lmc_jax.main --config=configs/evaluator.py "
                        f"--workdir=DIR (it writes DIR/evaluator)")
    try:
        meta = json.loads((path / META_FILE).read_text())
        module = ShapeColourNet(features=tuple(int(f) for f in meta["module"]["features"]),
                                hidden=int(meta["module"]["hidden"]),
                                object_head=bool(meta["module"].get("object_head", False)),
                                pattern_head=bool(meta["module"].get("pattern_head", False)))
    except (ValueError, KeyError, TypeError) as e:
        raise UserError(f"{path / META_FILE} is not a valid evaluator description ({e!r}); "
                        f"retrain with configs/evaluator.py") from None
    checks = (("shapes", SHAPES), ("colours", COLOURS)) + (
        (("patterns", PATTERNS),) if module.pattern_head else ())
    for what, names in checks:
        if meta.get(what) != list(names):
            raise UserError(f"evaluator {str(path)!r} was trained for {what} {meta.get(what)}, "
                            f"but lmc_jax.data.shapes has {list(names)}; retrain it with "
                            f"configs/evaluator.py")
    template = jax.eval_shape(module.init, jax.random.PRNGKey(0),
                              jnp.zeros((1, INPUT_SIZE, INPUT_SIZE, 3)))["params"]
    template = jax.tree_util.tree_map(lambda p: np.zeros(p.shape, np.float16), template)
    try:
        params = serialization.from_bytes(template, (path / PARAMS_FILE).read_bytes())
    except Exception as e:  # noqa: BLE001 - any decoding failure is a bad file
        raise UserError(f"could not read {path / PARAMS_FILE} ({e}); retrain with "
                        f"configs/evaluator.py") from None
    params = jax.tree_util.tree_map(lambda p: jnp.asarray(p, jnp.float32), params)
    return Evaluator(module, params, meta.get("metadata", {}))


def shipped_evaluator_path(world: str = "embedded") -> Path:
    """The evaluator shipped with lmc_jax: `lmc_jax/assets/embedded_prior/evaluator`, or with
    `world='embedded_patterned'` the patterned world's (with a pattern head)."""
    from lmc_jax.priors.embedded import embedded_path

    return embedded_path(world) / "evaluator"


def load_shipped_evaluator(world: str = "embedded") -> Evaluator:
    """The shipped evaluator (of `world`, a prior name); a UserError saying how to train it if
    it is absent."""
    path = shipped_evaluator_path(world)
    if not (path / PARAMS_FILE).is_file() or not (path / META_FILE).is_file():
        raise UserError(f"no shipped shape-and-colour evaluator at {path}; train it with "
                        + TRAIN_COMMAND.format(path=path))
    return load_evaluator(path)


# ----------------------------------------------------------------------------------------------
# Prompts and metrics.

_SHAPE_OF_WORD = {w: SHAPES.index(s) for s, words in SHAPE_WORDS.items() for w in words}
_COLOUR_OF_WORD = {c: i for i, c in enumerate(COLOURS)}
_PUNCTUATION = re.compile(f"[{re.escape(string.punctuation)}]")


def parse_prompt(prompt: str) -> tuple[int, int]:
    """(shape id, colour id) named by `prompt` ("a red ball", "a cube, blue", ...)."""
    if not isinstance(prompt, str):
        raise UserError(f"prompt must be a string, got {type(prompt).__name__}")
    words = _PUNCTUATION.sub(" ", prompt.lower()).split()
    found = {}
    for what, table in (("shape", _SHAPE_OF_WORD), ("colour", _COLOUR_OF_WORD)):
        ids = sorted({table[w] for w in words if w in table})
        if len(ids) != 1:
            problem = "names no" if not ids else "names more than one"
            raise UserError(f"prompt {prompt!r} {problem} {what}; the evaluator knows the "
                            f"{what} words {sorted(table)}")
        found[what] = ids[0]
    return found["shape"], found["colour"]


def default_candidates() -> list[str]:
    """All 25 prompts "a {colour} {shape}"."""
    return [f"a {c} {s}" for s in SHAPES for c in COLOURS]


def _prompt_labels(prompts: str | Sequence[str], n: int) -> np.ndarray:
    """[n, 2] (shape, colour) of one prompt per image (a single string applies to all)."""
    if isinstance(prompts, str):
        prompts = [prompts] * n
    if len(prompts) != n:
        raise UserError(f"need one prompt per image: {n} images, {len(prompts)} prompts")
    return np.asarray([parse_prompt(p) for p in prompts], np.int64).reshape(n, 2)


def has_object_head(evaluator: Evaluator) -> bool:
    """Whether `evaluator` can say "no object" (`p(object | x)`)."""
    return bool(evaluator.module.object_head)


def object_probability(evaluator: Evaluator, images: Any) -> np.ndarray:
    """p(object | x) [N] (all 1 for an evaluator without the object head)."""
    return evaluator.predict(images)[2]


def no_object(evaluator: Evaluator, images: Any) -> np.ndarray:
    """bool [N]: the evaluator is confident the image shows no object (p < NO_OBJECT_BELOW)."""
    return object_probability(evaluator, images) < NO_OBJECT_BELOW


def accuracy(evaluator: Evaluator, images: Any, prompts: str | Sequence[str]) -> float:
    """Fraction of images that show an object (p(object) >= NO_OBJECT_BELOW) whose argmax
    shape and argmax colour both match their prompt."""
    labels = _prompt_labels(prompts, len(images))
    ps, pc, po = evaluator.predict(images)
    hit = ((ps.argmax(-1) == labels[:, 0]) & (pc.argmax(-1) == labels[:, 1])
           & (po >= NO_OBJECT_BELOW))
    return float(np.mean(hit)) if len(hit) else float("nan")


def parse_pattern(prompt: str) -> int:
    """The pattern a prompt names (`PATTERNS`; a prompt with no pattern word is 'plain', 0)."""
    words = set(_PUNCTUATION.sub(" ", prompt.lower()).split())
    named = [k for k, p in enumerate(PATTERNS) if k and p in words]
    if len(named) > 1:
        raise UserError(f"prompt {prompt!r} names several patterns: "
                        f"{[PATTERNS[k] for k in named]}")
    return named[0] if named else 0


def pattern_accuracy(evaluator: Evaluator, images: Any, prompts: str | Sequence[str]) -> float:
    """Fraction of images that show an object whose argmax pattern (`Evaluator.pattern_probs`)
    is their prompt's (`parse_pattern`); needs an evaluator with a pattern head."""
    prompts = [prompts] * len(images) if isinstance(prompts, str) else list(prompts)
    want = np.asarray([parse_pattern(p) for p in prompts])
    evaluator.require_pattern_head()
    _, _, p_object, p_pattern = evaluator._all(images)  # one pass for both heads
    hit = (p_pattern.argmax(-1) == want) & (p_object >= NO_OBJECT_BELOW)
    return float(np.mean(hit)) if len(hit) else float("nan")


def r_precision(evaluator: Evaluator, images: Any, prompts: str | Sequence[str],
                candidates: Sequence[str] | None = None) -> float:
    """Fraction of images that show an object (p(object) >= NO_OBJECT_BELOW) whose best
    candidate prompt,
    by log p(shape) + log p(colour), names the same (shape, colour) as the image's own prompt
    (module docstring)."""
    hit = r_precision_per_image(evaluator, images, prompts, candidates)
    return float(np.mean(hit)) if len(hit) else float("nan")


def r_precision_per_image(evaluator: Evaluator, images: Any, prompts: str | Sequence[str],
                          candidates: Sequence[str] | None = None) -> np.ndarray:
    """`r_precision`'s hits, bool [N]."""
    labels = _prompt_labels(prompts, len(images))
    cand = np.asarray([parse_prompt(p) for p in (candidates or default_candidates())],
                      np.int64).reshape(-1, 2)
    if len(cand) == 0:
        raise UserError("r_precision needs at least one candidate prompt")
    ps, pc, po = evaluator.predict(images)
    log_s = np.log(np.maximum(ps.astype(np.float64), 1e-30))
    log_c = np.log(np.maximum(pc.astype(np.float64), 1e-30))
    scores = log_s[:, cand[:, 0]] + log_c[:, cand[:, 1]]  # [N, M]
    best = cand[scores.argmax(-1)]
    return np.all(best == labels, axis=-1) & (po >= NO_OBJECT_BELOW)
