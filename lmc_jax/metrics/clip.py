"""CLIP score and CLIP R-precision with transformers' `FlaxCLIPModel`.

CLIP score (Hessel et al. 2021, "CLIPScore", Eq. 1 with w = 100, as torchmetrics reports it):

    clip_score(I, c) = 100 * max(cos(E_I(I), E_T(c)), 0),   cos(u, v) = u.v / (||u|| ||v||)

for each image I and its own caption c, where E_I / E_T are CLIP's projected image / text
features (`get_image_features` / `get_text_features`).

CLIP R-precision (Park et al. 2021; DreamFusion Sec. 4): each image ranks all candidate prompts
by cosine similarity; it scores 1 when its true prompt is among the top k:

    r_precision = mean_i [ #{j : cos(I_i, c_j) > cos(I_i, c_true(i))} < k ]

(ties count in the image's favour).

Preprocessing follows `CLIPImageProcessor`, written in JAX: images [N, H, W, 3] in [-1, 1] ->
[0, 1]; resize the shorter side to the model's `vision_config.image_size` S (bicubic,
antialiased; the longer side to int(S * long / short)); center crop S x S; clip to [0, 1] (as the
uint8 round trip does); `(x - mean) / std` with CLIP's mean/std (or those of the folder's
preprocessor_config.json); NCHW. Prompts are tokenized with the folder's `CLIPTokenizer`, padded
to `min(model_max_length, max_position_embeddings)` and truncated.

`load_clip(path)` takes a local folder (config.json, Flax weights `flax_model.msgpack` or PyTorch
weights `model.safetensors` / `pytorch_model.bin`, which are converted once and cached like the
Stable Diffusion weights, see `lmc_jax.priors.sd_load`; the tokenizer files) or a Hub id such as
'openai/clip-vit-large-patch14', and returns a `ClipModel`, or an `Unavailable` whose reason
names the path and the fix; it never raises.

`clip_view_metrics(views, prompt, clip)` gives an application's CLIP figures for its renders
(text-to-3D orbit views, synthesized images): CLIP score against the prompt and CLIP R-precision
against a prompt set (`DEFAULT_PROMPT_SET` plus the prompt, as DreamFusion reports it); a figure
that cannot be computed is printed as a warning line and recorded as "unavailable: <reason>".
"""

from __future__ import annotations

import dataclasses
import json
import logging
import re
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax.traverse_util import flatten_dict

from lmc_jax import _compat
from lmc_jax.errors import UserError
from lmc_jax.metrics.common import Unavailable, first_line

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
CLIP_HINT = ("on a connected machine run `huggingface-cli download openai/clip-vit-large-patch14 "
             "--local-dir /path/clip`, copy the folder here and pass /path/clip")
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")
_TOKENIZER_FILES = ["vocab.json", "merges.txt", "tokenizer_config.json", "special_tokens_map.json"]


@dataclasses.dataclass(frozen=True, eq=False)
class ClipModel:
    """A loaded CLIP: weights, tokenizer, preprocessing constants and the jitted feature maps.

    `image_fn(params, pixels [N, 3, S, S]) -> [N, D]`, `text_fn(params, ids, mask) -> [M, D]`.
    """

    name: str
    params: Any = dataclasses.field(repr=False)
    tokenizer: Any = dataclasses.field(repr=False)
    image_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    max_length: int
    image_fn: Callable[..., jax.Array] = dataclasses.field(repr=False)
    text_fn: Callable[..., jax.Array] = dataclasses.field(repr=False)


# ----------------------------------------------------------------------------------------------
# Formulas on features (pure array functions).


def cosine_similarity(image_features: jax.Array, text_features: jax.Array) -> jax.Array:
    """[N, D], [M, D] -> [N, M] cosine similarities `u.v / (||u|| ||v||)` (eps-guarded)."""
    eps = jnp.finfo(jnp.float32).eps
    u = image_features / (jnp.linalg.norm(image_features, axis=-1, keepdims=True) + eps)
    v = text_features / (jnp.linalg.norm(text_features, axis=-1, keepdims=True) + eps)
    return u @ v.T


def clip_score_from_features(image_features: jax.Array, text_features: jax.Array) -> jax.Array:
    """[N, D], [N, D] (row i = image i and its caption) -> [N] `100 * max(cos, 0)`."""
    if image_features.shape != text_features.shape:
        raise UserError(f"clip_score pairs image i with prompt i: got {image_features.shape[0]} "
                        f"images and {text_features.shape[0]} prompts")
    cos = jnp.diagonal(cosine_similarity(image_features, text_features))
    return 100.0 * jnp.maximum(cos, 0.0)


def r_precision_from_features(image_features: jax.Array, text_features: jax.Array,
                              true_index: Any, k: int = 1) -> float:
    """Fraction of images whose true prompt ranks in the top k of the candidates.

    Args:
      image_features: [N, D].
      text_features: [M, D], the M candidate prompts.
      true_index: [N] ints in [0, M): the true prompt of each image.
      k: top-k; an image scores when fewer than k candidates are strictly more similar.
    """
    sims = np.asarray(cosine_similarity(image_features, text_features), np.float64)
    n, m = sims.shape
    idx = np.asarray(true_index)
    if idx.shape != (n,) or not np.issubdtype(idx.dtype, np.integer):
        raise UserError(f"r_precision needs one integer true prompt index per image ({n}), got "
                        f"{idx.tolist()!r}")
    if np.any(idx < 0) or np.any(idx >= m):
        raise UserError(f"true prompt indices {idx.tolist()} are outside the {m} candidates")
    if int(k) < 1:
        raise UserError(f"r_precision k must be >= 1, got {k}")
    true_sim = sims[np.arange(n), idx]
    rank = np.sum(sims > true_sim[:, None], axis=1)
    return float(np.mean(rank < int(k)))


# ----------------------------------------------------------------------------------------------
# Preprocessing and features.


def preprocess(images: jax.Array, image_size: int, mean: Sequence[float] = OPENAI_CLIP_MEAN,
               std: Sequence[float] = OPENAI_CLIP_STD) -> jax.Array:
    """[N, H, W, 3] in [-1, 1] -> [N, 3, S, S] CLIP pixel values (CLIPImageProcessor's steps)."""
    images = jnp.asarray(images, jnp.float32)
    if images.ndim != 4 or images.shape[-1] != 3:
        raise UserError(f"images have shape {tuple(images.shape)}; CLIP metrics take "
                        "[batch, height, width, 3] in [-1, 1] (NHWC)")
    x = (images + 1.0) / 2.0
    n, h, w, c = x.shape
    s = int(image_size)
    short, long = (h, w) if h <= w else (w, h)
    new_long = int(s * long / short)
    new_h, new_w = (s, new_long) if h <= w else (new_long, s)
    if (new_h, new_w) != (h, w):
        x = jax.image.resize(x, (n, new_h, new_w, c), method="bicubic", antialias=True)
    top, left = (new_h - s) // 2, (new_w - s) // 2
    x = jnp.clip(x[:, top:top + s, left:left + s, :], 0.0, 1.0)
    x = (x - jnp.asarray(mean, jnp.float32)) / jnp.asarray(std, jnp.float32)
    return jnp.transpose(x, (0, 3, 1, 2))


def image_features(model: ClipModel, images: jax.Array, batch_size: int = 32) -> jax.Array:
    """[N, H, W, 3] in [-1, 1] -> [N, D] projected CLIP image features (not normalized)."""
    pixels = preprocess(images, model.image_size, model.mean, model.std)
    chunks = [model.image_fn(model.params, pixels[i:i + batch_size])
              for i in range(0, pixels.shape[0], int(batch_size))]
    return jnp.concatenate(chunks, axis=0)


def text_features(model: ClipModel, prompts: Sequence[str]) -> jax.Array:
    """M prompts -> [M, D] projected CLIP text features (not normalized)."""
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    if not prompts or not all(isinstance(p, str) for p in prompts):
        raise UserError(f"CLIP metrics take a non-empty list of prompt strings, got {prompts!r}")
    tok = model.tokenizer(prompts, padding="max_length", max_length=model.max_length,
                          truncation=True, return_tensors="np")
    return model.text_fn(model.params, tok.input_ids, tok.attention_mask)


def clip_score(model: ClipModel, images: jax.Array, prompts: Sequence[str]) -> jax.Array:
    """[N, H, W, 3] in [-1, 1] and N prompts -> [N] `100 * max(cos(E_I(I_i), E_T(c_i)), 0)`."""
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    if np.ndim(images) != 4:
        raise UserError(f"images have shape {np.shape(images)}; CLIP metrics take "
                        "[batch, height, width, 3] in [-1, 1] (NHWC)")
    if len(prompts) != np.shape(images)[0]:
        raise UserError(f"clip_score pairs image i with prompt i: got {np.shape(images)[0]} "
                        f"images and {len(prompts)} prompts")
    return clip_score_from_features(image_features(model, images), text_features(model, prompts))


def r_precision(model: ClipModel, images: jax.Array, prompts_true_index: Any,
                candidate_prompts: Sequence[str], k: int = 1) -> float:
    """CLIP R-precision of [N, H, W, 3] images against M candidate prompts (module docstring)."""
    return r_precision_from_features(image_features(model, images),
                                     text_features(model, candidate_prompts),
                                     prompts_true_index, k)


# ----------------------------------------------------------------------------------------------
# Loading.


class _NotLoadable(Exception):
    """Internal: carries the reason that `load_clip` turns into an `Unavailable`."""


def load_clip(path: str, *, revision: str | None = None,
              cache_dir: str | None = None) -> ClipModel | Unavailable:
    """A CLIP model from a local folder or Hub id, or `Unavailable('clip', reason)`; never raises.

    Args:
      path: a folder with config.json, flax_model.msgpack (or model.safetensors; pytorch_model.bin
        needs torch) and the CLIPTokenizer files (vocab.json, merges.txt), optionally
        preprocessor_config.json; or a Hub id (needs network or the local HF cache).
      revision: Hub branch/tag/commit (ignored for local folders).
      cache_dir: where weights converted from PyTorch are cached (`lmc_jax.cache.cache_root`).
    """
    try:
        folder = _resolve_folder(str(path), revision)
        return _load_folder(folder, name=f"clip:{path}", cache_dir=cache_dir)
    except _NotLoadable as e:
        return Unavailable("clip", str(e))
    except Exception as e:  # a metric must not end the run: any load failure becomes a reason
        return Unavailable("clip", f"cannot load CLIP from {str(path)!r}: {first_line(e)}")


def _resolve_folder(path: str, revision: str | None) -> Path:
    local = Path(path).expanduser()
    if local.is_dir():
        return local
    if local.exists():
        raise _NotLoadable(f"CLIP path {path!r} is a file; pass the folder that holds config.json "
                           "and the weights")
    if not _HUB_ID.fullmatch(path):
        raise _NotLoadable(f"CLIP weights not found: {path!r} does not exist; {CLIP_HINT}")
    try:
        return _snapshot(path, revision)
    except Exception as e:  # offline, unknown repo, bad revision, auth: all end the same way
        raise _NotLoadable(f"CLIP weights not found: {path!r} is not a local folder and could not "
                           f"be fetched from the Hugging Face Hub ({type(e).__name__}); "
                           f"{CLIP_HINT}") from e


def _snapshot(repo_id: str, revision: str | None) -> Path:
    """Downloads only what the loader reads (Flax weights, else safetensors); cache-only offline."""
    import huggingface_hub

    from lmc_jax.priors.sd_load import _hub_reachable

    offline = not _hub_reachable(huggingface_hub.constants.ENDPOINT)
    common = ["config.json", "preprocessor_config.json", *_TOKENIZER_FILES]
    folder = Path(huggingface_hub.snapshot_download(
        repo_id, revision=revision, allow_patterns=common + ["flax_model.msgpack"],
        local_files_only=offline))
    if not (folder / "flax_model.msgpack").is_file():
        folder = Path(huggingface_hub.snapshot_download(
            repo_id, revision=revision, allow_patterns=common + ["model.safetensors"],
            local_files_only=offline))
    return folder


def _safetensors_format(file: Path) -> str:
    """The `format` metadata of a safetensors file ('pt', 'flax', ...; '' if absent/missing)."""
    if not file.is_file():
        return ""
    from safetensors import safe_open

    with safe_open(str(file), framework="np") as f:
        return str((f.metadata() or {}).get("format", "pt"))


def _from_pytorch(module: Any, folder: Path, cache_dir: str | None) -> Any:
    """Flax params of a PyTorch CLIP folder (model[.fp16].safetensors or pytorch_model.bin)."""
    from lmc_jax.cache import cache_root
    from lmc_jax.priors.sd_load import (
        _converted,
        _read_pt_files,
        _ShapeOnly,
        pytorch_weight_files,
    )

    files = pytorch_weight_files(folder, "model") or pytorch_weight_files(folder,
                                                                         "pytorch_model")
    if not files:
        raise _NotLoadable(f"{folder} has no CLIP weights (flax_model.msgpack, model.safetensors "
                           f"or pytorch_model.bin); {CLIP_HINT}")

    def convert():
        from transformers.modeling_flax_pytorch_utils import convert_pytorch_state_dict_to_flax

        return convert_pytorch_state_dict_to_flax(
            _read_pt_files(files), _ShapeOnly(module.params_shape_tree, module.base_model_prefix))

    return _converted(folder, files, cache_root(cache_dir), convert)


def _load_folder(folder: Path, name: str, cache_dir: str | None = None) -> ClipModel:
    tr = _compat.transformers()
    if not (folder / "config.json").is_file():
        raise _NotLoadable(f"{folder} has no config.json; is it a transformers CLIP folder? "
                           f"{CLIP_HINT}")
    has = {f: (folder / f).is_file()
           for f in ("flax_model.msgpack", "model.safetensors", "pytorch_model.bin",
                     "model.fp16.safetensors", "pytorch_model.bin.index.json",
                     "model.safetensors.index.json")}
    if not any(has.values()):
        raise _NotLoadable(f"{folder} has no CLIP weights (flax_model.msgpack, model.safetensors "
                           f"or pytorch_model.bin); {CLIP_HINT}")
    missing = [f for f in ("vocab.json", "merges.txt") if not (folder / f).is_file()]
    if missing:
        raise _NotLoadable(f"{folder} has no {', '.join(missing)} (the CLIPTokenizer files); "
                           f"{CLIP_HINT}")
    if has["flax_model.msgpack"] or _safetensors_format(folder / "model.safetensors") == "flax":
        module, params = tr.FlaxCLIPModel.from_pretrained(str(folder), _do_init=False)
    else:  # PyTorch weights: converted by transformers' own converter, cached by file content
        module = tr.FlaxCLIPModel(tr.CLIPConfig.from_pretrained(str(folder)), _do_init=False)
        params = _from_pytorch(module, folder, cache_dir)
    params = _checked(module.params_shape_tree, params, folder)
    tokenizer = tr.CLIPTokenizer.from_pretrained(str(folder))
    cfg = module.config
    if len(tokenizer) > cfg.text_config.vocab_size:
        raise _NotLoadable(f"{folder}: the tokenizer has {len(tokenizer)} tokens but the text "
                           f"model only {cfg.text_config.vocab_size}")
    mean, std = OPENAI_CLIP_MEAN, OPENAI_CLIP_STD
    pre = folder / "preprocessor_config.json"
    if pre.is_file():
        pcfg = json.loads(pre.read_text(encoding="utf-8"))
        mean = tuple(float(v) for v in pcfg.get("image_mean", mean))
        std = tuple(float(v) for v in pcfg.get("image_std", std))

    @jax.jit
    def image_fn(p, pixels):
        return module.get_image_features(pixels, params=p)

    @jax.jit
    def text_fn(p, ids, mask):
        return module.get_text_features(ids, attention_mask=mask, params=p)

    return ClipModel(
        name=name,
        params=params,
        tokenizer=tokenizer,
        image_size=int(cfg.vision_config.image_size),
        mean=mean,
        std=std,
        max_length=int(min(tokenizer.model_max_length, cfg.text_config.max_position_embeddings)),
        image_fn=image_fn,
        text_fn=text_fn,
    )


def _checked(expected: Any, params: Any, folder: Path) -> Any:
    """float32 device arrays; a missing weight or a wrong shape is a reason, not a warning."""
    want, got = flatten_dict(dict(expected)), flatten_dict(dict(params))
    for key, spec in want.items():
        if key not in got:
            raise _NotLoadable(f"{folder}: the checkpoint lacks {'/'.join(key)} (it does not "
                               "match config.json)")
        if tuple(got[key].shape) != tuple(spec.shape):
            raise _NotLoadable(f"{folder}: weight {'/'.join(key)} has shape "
                               f"{tuple(got[key].shape)}, config.json implies {tuple(spec.shape)}")

    def leaf(x):
        x = np.asarray(x)
        return jnp.asarray(x, jnp.float32 if np.issubdtype(x.dtype, np.floating) else x.dtype)

    return jax.tree_util.tree_map(leaf, params)


# Candidate captions for CLIP R-precision: object-centric, varied, in the style of the COCO
# captions DreamFusion ranks against (written for lmc_jax, not taken from a dataset).
DEFAULT_PROMPT_SET = (
    "a DSLR photo of a red fox", "a DSLR photo of a squirrel", "a DSLR photo of a teddy bear",
    "a DSLR photo of a hamburger", "a DSLR photo of a pineapple", "a DSLR photo of an owl",
    "a DSLR photo of a chair", "a DSLR photo of a motorcycle", "a DSLR photo of a frog",
    "a DSLR photo of a cup of coffee", "a DSLR photo of a corgi", "a DSLR photo of a robot",
    "a DSLR photo of a car", "a DSLR photo of a castle", "a DSLR photo of a tree",
    "a DSLR photo of a vase of flowers", "a DSLR photo of a banana", "a DSLR photo of a penguin",
    "a DSLR photo of a lamp", "a DSLR photo of an elephant", "a DSLR photo of a birthday cake",
    "a DSLR photo of a sneaker", "a DSLR photo of a guitar", "a DSLR photo of a rabbit",
    "a DSLR photo of a skull", "a DSLR photo of a sailboat", "a DSLR photo of an ice cream cone",
    "a DSLR photo of a dragon", "a DSLR photo of a house", "a DSLR photo of a lion",
)


def prompt_set_with(prompt: str, prompt_set: Sequence[str] | None = None
                    ) -> tuple[list[str], int]:
    """(candidates, index of `prompt`): the set (default `DEFAULT_PROMPT_SET`) with `prompt`
    added unless it is in it already."""
    cands = list(DEFAULT_PROMPT_SET if not prompt_set else prompt_set)
    if prompt not in cands:
        cands.append(prompt)
    return cands, cands.index(prompt)


def clip_view_metrics(views: Any, prompt: str, clip: ClipModel | Unavailable | str,
                      prompt_set: Sequence[str] | None = None, k: int = 1,
                      cache_dir: str | None = None) -> dict[str, Any]:
    """CLIP figures of an application's renders against its prompt.

    Args:
      views: [N, H, W, 3] in [-1, 1] (orbit views of a 3D scene, or N synthesized images).
      prompt: what the renders should show.
      clip: a loaded `ClipModel`, an `Unavailable`, or a path for `load_clip` ('' = not set).
      prompt_set: R-precision's candidates (`prompt_set_with`).
      k: R-precision's top-k.

    Returns `{"clip_score": mean over views of 100 max(cos, 0), "clip_r_precision": fraction of
    views whose prompt ranks in the top k, "clip_prompt_set_size": M}`; when CLIP cannot be
    loaded, both figures are "unavailable: <reason>" and a warning line says so.
    """
    if isinstance(clip, str):
        clip = load_clip(clip, cache_dir=cache_dir) if clip else Unavailable(
            "clip", "no CLIP weights given (set --config.clip_path=DIR)")
    if isinstance(clip, Unavailable):
        print(f"WARNING: CLIP metrics not computed: {clip.reason}", flush=True)
        logging.warning("CLIP metrics not computed: %s", clip.reason)
        return {"clip_score": str(clip), "clip_r_precision": str(clip)}
    cands, true = prompt_set_with(prompt, prompt_set)
    img = image_features(clip, views)
    txt = text_features(clip, cands)
    n = img.shape[0]
    score = clip_score_from_features(img, jnp.broadcast_to(txt[true], img.shape))
    return {"clip_score": float(jnp.mean(score)),
            "clip_r_precision": r_precision_from_features(img, txt, np.full(n, true), k),
            "clip_prompt_set_size": len(cands)}


__all__ = [
    "DEFAULT_PROMPT_SET",
    "ClipModel",
    "clip_view_metrics",
    "clip_score",
    "clip_score_from_features",
    "cosine_similarity",
    "image_features",
    "load_clip",
    "preprocess",
    "prompt_set_with",
    "r_precision",
    "r_precision_from_features",
    "text_features",
]
