"""Stable Diffusion as a `Prior`: diffusers' Flax UNet and VAE, transformers' Flax CLIP text model.

Conventions (the same as `lmc_jax.priors.base`):
- NHWC everywhere. diffusers' UNet takes and returns NCHW; `eps_fn` transposes on the way in and
  out (XLA cancels the pair against the UNet's own internal NHWC transposes).
- `x` is the *scaled* VAE latent: `x = vae.encode(image).latent_dist.mean * scaling_factor`
  (0.18215 for SD 1.x/2.x, read from the VAE config); `decode` divides by it again. Images are
  [B, H, W, 3] in [-1, 1]. Latents are `2**(len(vae.block_out_channels) - 1)` times smaller (8x).
- `eps_fn` always returns the noise prediction eps. A `v_prediction` model (SD 2.x 768) is
  converted with `eps = a_t v + s_t x_t` (from `x_t = a_t x + s_t eps`, `v = a_t eps - s_t x`).
- Guidance: diffusers' `guidance_scale` g computes `e_u + g (e_c - e_u) = e_c + (g - 1)(e_c - e_u)`,
  so it is the paper's `w = g - 1` (configs use the paper's `w`).
- `dtype='bfloat16'` stores the weights in bf16 and runs the modules in bf16; every output is
  float32. The schedule (`alphas_cumprod`) comes from `scheduler/scheduler_config.json`.
- `Prior.params = {'unet', 'vae', 'text_encoder'}`; the Prior is a pytree and can be passed to
  `jax.jit` as an argument (the weights are then inputs, not compiled-in constants).

Backends built here, all through `make_sd_prior`:
- `load_stable_diffusion(path)`: a local diffusers-layout folder or a Hugging Face Hub id.
- `tiny_sd_prior()`: a random-init SD-architecture pipeline (4x32x32 latents) for CPU tests.
- `save_tiny_pipeline(dir)` writes that tiny pipeline in the diffusers layout, so the loader can be
  tested on a folder exactly like downloaded weights.
"""

from __future__ import annotations

import functools
import json
import os
import re
import socket
from collections.abc import Sequence
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import jax
import jax.numpy as jnp
import numpy as np
from flax.traverse_util import flatten_dict, unflatten_dict

from lmc_jax import _compat, schedule
from lmc_jax.errors import UserError
from lmc_jax.priors.attention import fast_attention
from lmc_jax.priors.base import Prior
from lmc_jax.priors.tokenizer import byte_tokenizer_path

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
COMPONENTS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")
DEFAULT_VAE_SCALING = 0.18215
PREDICTION_TYPES = ("epsilon", "v_prediction")
ATTENTION_IMPLS = ("late_norm", "diffusers")

WEIGHTS_HINT = (
    "on a connected machine run `huggingface-cli download stabilityai/stable-diffusion-2-1-base "
    "--local-dir /path/sd21`, copy the folder here and pass --config.prior.path=/path/sd21 "
    "(the ':tiny' config presets need no weights)"
)
_PT_HINT = ("; if the model ships only PyTorch weights (*.safetensors), pass from_pt=True "
            "(--config.prior.from_pt=True)")
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")

# The tiny SD-architecture pipeline (random weights; same classes as the real model).
TINY_UNET = dict(
    in_channels=4,
    out_channels=4,
    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    block_out_channels=(32, 64),
    layers_per_block=1,
    cross_attention_dim=32,
    attention_head_dim=8,
)
TINY_VAE = dict(
    in_channels=3,
    out_channels=3,
    down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
    up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
    block_out_channels=(32, 64),
    layers_per_block=1,
    latent_channels=4,
    norm_num_groups=32,
    scaling_factor=DEFAULT_VAE_SCALING,
)
TINY_TEXT = dict(
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    max_position_embeddings=77,
)
TINY_SCHEDULER = {
    "_class_name": "FlaxDDPMScheduler",
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "num_train_timesteps": 1000,
    "prediction_type": "epsilon",
    "clip_sample": False,
    "trained_betas": None,
}


def _jnp_dtype(dtype: str) -> Any:
    if dtype not in DTYPES:
        raise UserError(f"prior dtype {dtype!r} is not supported; choose one of {list(DTYPES)}")
    return DTYPES[dtype]


def alphas_cumprod_from_config(cfg: dict[str, Any]) -> np.ndarray:
    """`alphas_cumprod` [T] float32 from a diffusers scheduler config (DDPM defaults if absent)."""
    n = int(cfg.get("num_train_timesteps", 1000))
    if cfg.get("trained_betas") is not None:
        betas = np.asarray(cfg["trained_betas"], np.float64)
        return np.cumprod(1.0 - betas).astype(np.float32)
    kind = cfg.get("beta_schedule", "linear")
    start, end = float(cfg.get("beta_start", 0.0001)), float(cfg.get("beta_end", 0.02))
    if kind == "scaled_linear":
        return schedule.scaled_linear_alphas_cumprod(start, end, n)
    if kind == "linear":
        return schedule.linear_alphas_cumprod(start, end, n)
    raise UserError(
        f"scheduler beta_schedule {kind!r} is not supported; lmc_jax reads 'scaled_linear' or "
        "'linear' (Stable Diffusion 1.x/2.x)"
    )


def _place(params: Any, dtype: Any) -> Any:
    """Host or committed arrays -> uncommitted device arrays; floating leaves cast to `dtype`.

    Uncommitted, so that a later `jax.device_put` / sharded `jit` may place them anywhere (diffusers
    commits loaded weights to the CPU device).
    """

    def leaf(x):
        x = np.asarray(x)
        return jnp.asarray(x, dtype if jnp.issubdtype(x.dtype, jnp.floating) else x.dtype)

    return jax.tree_util.tree_map(leaf, params)


def closed_vocabulary_check(tokenizer: Any, name: str) -> Any:
    """`check(prompt)`: raises a UserError naming unknown words, for closed-vocabulary tokenizers.

    A real CLIP tokenizer holds all 256 byte characters, so any text tokenizes and nothing is
    checked. A word-level tokenizer (the embedded prior's: one token per known word, see
    `lmc_jax.priors.embedded.write_word_tokenizer`) lacks them; a word it does not turn into
    exactly one known token was never seen in training, and the error lists the vocabulary.
    """
    vocab = tokenizer.get_vocab()
    if all(c in vocab for c in "abcdefghijklmnopqrstuvwxyz"):
        return lambda prompt: None
    specials = set(tokenizer.all_special_tokens)
    known = sorted(t[:-4] for t in vocab if t.endswith("</w>") and t not in specials)

    def check(prompt: str) -> None:
        unknown, word = [], []
        for piece in tokenizer.tokenize(prompt):
            word.append(piece)
            if piece.endswith("</w>"):
                if len(word) > 1 or piece not in vocab:
                    unknown.append("".join(word)[:-4])
                word = []
        if word:
            unknown.append("".join(word))
        if unknown:
            raise UserError(
                f"{name} was trained on a closed vocabulary and does not know "
                f"{', '.join(repr(w) for w in dict.fromkeys(unknown))} in the prompt {prompt!r}; "
                f"use only these words: {' '.join(known)}")

    return check


def make_sd_prior(unet: Any, vae: Any | None, text_encoder: Any, tokenizer: Any,
                  params: dict[str, Any], scheduler_config: dict[str, Any], *,
                  dtype: str = "float32", name: str = "sd",
                  attention: str = "late_norm") -> Prior:
    """Builds the `Prior` from loaded (or random) components; the one place both paths meet.

    Args:
      unet: a `FlaxUNet2DConditionModel` (only its config is used; dtype is set here).
      vae: a `FlaxAutoencoderKL`, or None for a pixel-space model (the UNet diffuses RGB images
        in [-1, 1] directly, like the embedded prior of `lmc_jax.priors.embedded`).
      text_encoder: a `FlaxCLIPTextModel`.
      tokenizer: a `CLIPTokenizer`.
      params: {'unet', 'vae', 'text_encoder'} weights ('vae' only with a VAE), any float dtype,
        host or device.
      scheduler_config: the scheduler_config.json dict (betas, prediction_type).
      dtype: 'float32' or 'bfloat16' (weights and compute); outputs are always float32.
      name: for logs.
      attention: 'late_norm' (`lmc_jax.priors.attention`: the same function, one pass fewer
        over the score matrix) or 'diffusers' (diffusers' own FlaxAttention).
    """
    cdtype = _jnp_dtype(dtype)
    if attention not in ATTENTION_IMPLS:
        raise UserError(f"attention must be one of {list(ATTENTION_IMPLS)}, got {attention!r}")
    ucfg, tcfg = unet.config, text_encoder.config
    pixel = vae is None

    prediction = scheduler_config.get("prediction_type", "epsilon")
    if prediction not in PREDICTION_TYPES:
        raise UserError(f"{name}: prediction_type {prediction!r} is not supported; lmc_jax reads "
                        f"{list(PREDICTION_TYPES)}")
    if ucfg.get("addition_embed_type") is not None:
        raise UserError(f"{name}: UNets with addition_embed_type (SDXL) are not supported")
    latent_c = 3 if pixel else int(vae.config.latent_channels)
    if ucfg.in_channels != latent_c or ucfg.out_channels != latent_c:
        made = "RGB images have 3" if pixel else f"the VAE makes {latent_c}"
        raise UserError(f"{name}: the UNet takes {ucfg.in_channels} channels but {made}; "
                        "inpainting/depth checkpoints are not supported")
    if ucfg.cross_attention_dim != tcfg.hidden_size:
        raise UserError(f"{name}: the UNet's cross_attention_dim {ucfg.cross_attention_dim} does "
                        f"not match the text encoder's hidden_size {tcfg.hidden_size}")
    if len(tokenizer) > tcfg.vocab_size:
        raise UserError(f"{name}: the tokenizer has {len(tokenizer)} tokens but the text encoder "
                        f"only {tcfg.vocab_size}; tokenizer/ does not belong to text_encoder/")

    size = ucfg.sample_size
    lh, lw = (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))
    max_length = int(min(tokenizer.model_max_length, tcfg.max_position_embeddings))
    alphas_cumprod = alphas_cumprod_from_config(scheduler_config)
    check_words = closed_vocabulary_check(tokenizer, name)

    unet_m = type(unet).from_config(dict(ucfg), dtype=cdtype)
    text_m = type(text_encoder)(tcfg, dtype=cdtype, _do_init=False)
    if pixel:
        factor, scaling, vae_m, vcfg = 1, 1.0, None, None
    else:
        vcfg = vae.config
        factor = 2 ** (len(vcfg.block_out_channels) - 1)
        scaling = float(vcfg.get("scaling_factor") or DEFAULT_VAE_SCALING)
        vae_m = type(vae).from_config(dict(vcfg), dtype=cdtype)

    def eps_fn(p, x_t, t, emb):
        b = x_t.shape[0]
        if emb.shape[-1] != ucfg.cross_attention_dim:
            raise UserError(f"text embedding has width {emb.shape[-1]} but {name} takes "
                            f"{ucfg.cross_attention_dim}; make it with this prior's embed_text")
        t = jnp.broadcast_to(jnp.asarray(t, jnp.int32), (b,))
        if emb.shape[0] == 1 and b > 1:
            emb = jnp.broadcast_to(emb, (b,) + emb.shape[1:])
        sample = jnp.transpose(x_t, (0, 3, 1, 2)).astype(cdtype)
        with fast_attention(attention == "late_norm"):
            out = unet_m.apply({"params": p["unet"]}, sample, t, emb.astype(cdtype)).sample
        out = jnp.transpose(out, (0, 2, 3, 1)).astype(jnp.float32)
        if prediction == "v_prediction":  # eps = a_t v + s_t x_t
            a, s = schedule.alpha_sigma(alphas_cumprod, t)
            out = schedule.bcast(a, out) * out + schedule.bcast(s, out) * x_t.astype(jnp.float32)
        return out

    def encode_fn(p, images):
        if images.ndim != 4 or images.shape[-1] != vcfg.in_channels:
            raise UserError(f"images have shape {tuple(images.shape)}; {name} encodes "
                            f"[batch, height, width, {vcfg.in_channels}] in [-1, 1] (NHWC)")
        nchw = jnp.transpose(images, (0, 3, 1, 2)).astype(cdtype)
        dist = vae_m.apply({"params": p["vae"]}, nchw, method=vae_m.encode).latent_dist
        return (dist.mean * scaling).astype(jnp.float32)  # latent_dist is already NHWC

    def decode_fn(p, x):
        if x.ndim != 4 or x.shape[-1] != latent_c:
            raise UserError(f"latents have shape {tuple(x.shape)}; {name} decodes "
                            f"[batch, height, width, {latent_c}] (NHWC)")
        z = (x / scaling).astype(cdtype)  # NHWC, as FlaxAutoencoderKL.decode accepts
        images = vae_m.apply({"params": p["vae"]}, z, method=vae_m.decode).sample  # NCHW
        return jnp.transpose(images, (0, 2, 3, 1)).astype(jnp.float32)

    keys = ("unet", "text_encoder") if pixel else ("unet", "vae", "text_encoder")
    params = _place({k: params[k] for k in keys}, cdtype)

    @jax.jit
    def encode_text(p, ids):
        return text_m(ids, params=p).last_hidden_state.astype(jnp.float32)

    def embed_fn(prompts: Sequence[str]) -> jax.Array:
        prompts = list(prompts)
        if not prompts or not all(isinstance(s, str) for s in prompts):
            raise UserError(f"embed_text takes a non-empty list of strings, got {prompts!r}")
        for prompt in prompts:
            check_words(prompt)
        ids = tokenizer(prompts, padding="max_length", max_length=max_length, truncation=True,
                        return_tensors="np").input_ids
        return encode_text(params["text_encoder"], ids)

    return Prior(
        params=params,
        alphas_cumprod=jnp.asarray(alphas_cumprod),
        eps_fn=jax.jit(eps_fn),
        embed_fn=embed_fn,
        encode_fn=None if pixel else jax.jit(encode_fn),
        decode_fn=None if pixel else jax.jit(decode_fn),
        x_shape=(lh, lw, latent_c),
        image_shape=(lh * factor, lw * factor, 3 if pixel else int(vcfg.out_channels)),
        kind="pixel" if pixel else "latent",
        name=name,
    )


# ----------------------------------------------------------------------------------------------
# Loading a diffusers folder or hub id.


def load_stable_diffusion(path: str, *, dtype: str = "float32", from_pt: bool = False,
                          attention: str = "late_norm",
                          revision: str | None = None, cache_dir: str | None = None) -> Prior:
    """Loads a diffusers-layout Stable Diffusion (1.x/2.x) pipeline as a latent `Prior`.

    A pipeline whose model_index.json sets `"vae": [null, null]` has no VAE: its UNet works on
    RGB pixels and the result is a pixel `Prior` (the embedded prior, `lmc_jax.priors.embedded`).

    Args:
      path: a local folder with unet/, vae/, text_encoder/, tokenizer/, scheduler/, or a Hub id
        such as 'stabilityai/stable-diffusion-2-1-base' (needs network or the local HF cache).
      dtype: 'float32' or 'bfloat16'.
      from_pt: read PyTorch weights (`*.safetensors`, or `*.bin` with torch installed) instead of
        Flax `*.msgpack`; for checkpoints that ship no Flax weights (from the Hub: safetensors).
      attention: see `make_sd_prior`.
      revision: Hub branch/tag/commit (ignored for local folders).
    """
    _jnp_dtype(dtype)
    folder = _resolve_folder(str(path), revision=revision, from_pt=from_pt)
    pixel = _declares_no_vae(folder)
    needed = [c for c in COMPONENTS if not (pixel and c == "vae")]
    missing = [c + "/" for c in needed if not (folder / c).is_dir()]
    if missing:
        raise UserError(
            f"{path!r} is not a complete diffusers Stable Diffusion folder: it has no "
            f"{', '.join(missing)} (needs {', '.join(c + '/' for c in needed)}); {WEIGHTS_HINT}"
        )
    d, tr = _compat.diffusers(), _compat.transformers()
    unet, unet_params = _load_diffusers_model(d.FlaxUNet2DConditionModel, folder / "unet", from_pt)
    vae, vae_params = (None, None) if pixel else _load_diffusers_model(
        d.FlaxAutoencoderKL, folder / "vae", from_pt)
    text_encoder, text_params = _load_text_encoder(folder / "text_encoder", from_pt)
    try:
        tokenizer = tr.CLIPTokenizer.from_pretrained(str(folder / "tokenizer"))
    except (OSError, ValueError, TypeError) as e:
        raise UserError(f"cannot read the tokenizer in {folder / 'tokenizer'} "
                        f"(CLIPTokenizer needs vocab.json and merges.txt): {_first_line(e)}") from e
    scheduler_config = _read_json(folder / "scheduler" / "scheduler_config.json")
    params = {"unet": unet_params, "vae": vae_params, "text_encoder": text_params}
    return make_sd_prior(unet, vae, text_encoder, tokenizer, params, scheduler_config,
                         dtype=dtype, name=f"sd:{path}:{dtype}", attention=attention)


def _declares_no_vae(folder: Path) -> bool:
    """True when model_index.json exists and names no VAE (a pixel-space pipeline)."""
    index = folder / "model_index.json"
    if not index.is_file():
        return False
    entry = _read_json(index).get("vae", "absent")
    return entry is None or (isinstance(entry, list) and all(v is None for v in entry))


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return f"{type(e).__name__}: {text.splitlines()[0] if text else ''}"


def _read_json(file: Path) -> dict[str, Any]:
    if not file.is_file():
        raise UserError(f"{file} is missing; a diffusers folder has it (re-download the model)")
    try:
        return json.loads(file.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise UserError(f"{file} is not valid JSON: {e}") from e


def resolve_folder(path: str, *, revision: str | None = None) -> Path:
    """The local folder of a prior path: the folder itself, or a Hub id's cached snapshot."""
    return _resolve_folder(str(path), revision=revision, from_pt=True)


def _resolve_folder(path: str, *, revision: str | None, from_pt: bool) -> Path:
    """A local folder as is; a Hub id -> its local snapshot (downloaded if the Hub is reachable)."""
    local = Path(path).expanduser()
    if local.is_dir():
        return local
    if local.exists():
        raise UserError(f"prior path {path!r} is a file; pass the diffusers folder that holds "
                        f"{', '.join(c + '/' for c in COMPONENTS)}")
    if not _HUB_ID.fullmatch(path):
        raise UserError(f"Stable Diffusion weights not found: {path!r} does not exist; "
                        f"{WEIGHTS_HINT}")
    try:
        return Path(_snapshot(path, revision=revision, from_pt=from_pt))
    except Exception as e:  # offline, unknown repo, bad revision, auth: all end the same way
        raise UserError(
            f"Stable Diffusion weights not found: {path!r} is not a local folder and could not be "
            f"fetched from the Hugging Face Hub ({type(e).__name__}); {WEIGHTS_HINT}"
        ) from e


def _snapshot(repo_id: str, *, revision: str | None, from_pt: bool) -> str:
    """Downloads only what the loader reads; from the local HF cache alone when offline."""
    import huggingface_hub

    patterns = ["model_index.json", "*/config.json", "scheduler/*.json", "tokenizer/*"]
    if from_pt:
        patterns += ["unet/diffusion_pytorch_model.safetensors",
                     "vae/diffusion_pytorch_model.safetensors", "text_encoder/model.safetensors"]
    else:
        patterns += ["unet/diffusion_flax_model.msgpack", "vae/diffusion_flax_model.msgpack",
                     "text_encoder/flax_model.msgpack"]
    return huggingface_hub.snapshot_download(
        repo_id, revision=revision, allow_patterns=patterns,
        local_files_only=not _hub_reachable(huggingface_hub.constants.ENDPOINT))


def _hub_reachable(endpoint: str) -> bool:
    """False when the Hub's host does not even resolve (offline): avoids ~25 s of HTTP retries."""
    if any(os.environ.get(k) for k in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return True
    host = urlparse(endpoint).hostname
    try:
        socket.getaddrinfo(host, 443)
    except (OSError, UnicodeError):
        return False
    return True


class _ShapeOnly:
    """Stands in for a model in the PyTorch->Flax converters, which only read parameter shapes.

    diffusers' converter would otherwise initialize the full model eagerly (minutes for the SD
    UNet on CPU), and transformers' needs `_do_init=True`.
    """

    def __init__(self, shapes: Any, base_model_prefix: str = ""):
        self.params = shapes
        self.base_model_prefix = base_model_prefix

    def init_weights(self, rng: Any) -> Any:
        del rng
        return self.params


def _read_pt_state(folder: Path, stem: str) -> dict[str, np.ndarray]:
    """PyTorch weights `<stem>.safetensors` (no torch needed) or `<stem>.bin` (torch)."""
    st, pt = folder / f"{stem}.safetensors", folder / f"{stem}.bin"
    if st.is_file():
        from safetensors import safe_open

        with safe_open(str(st), framework="np") as f:
            return {k: np.asarray(f.get_tensor(k), np.float32) for k in f.keys()}
    if pt.is_file():
        try:
            import torch
        except ImportError as e:
            raise UserError(f"{pt} is a PyTorch pickle and torch is not installed; install torch "
                            f"or use the {stem}.safetensors file of the same model") from e
        state = torch.load(str(pt), map_location="cpu", weights_only=True)
        return {k: v.float().numpy() for k, v in state.items()}
    raise UserError(f"from_pt=True but {folder} has neither {st.name} nor {pt.name}")


def _check_params(expected: Any, params: Any, folder: Path) -> dict[str, Any]:
    """Keeps the expected weights; a missing one or a wrong shape is a UserError."""
    want = flatten_dict(dict(expected))
    got = flatten_dict(dict(params))
    missing = [k for k in want if k not in got]
    if missing:
        raise UserError(f"{folder}: the checkpoint lacks {len(missing)} of {len(want)} weights "
                        f"(e.g. {'/'.join(missing[0])}); it does not match {folder}/config.json")
    for k, spec in want.items():
        if tuple(got[k].shape) != tuple(spec.shape):
            raise UserError(f"{folder}: weight {'/'.join(k)} has shape {tuple(got[k].shape)} but "
                            f"config.json implies {tuple(spec.shape)}")
    return unflatten_dict({k: got[k] for k in want})


def _load_diffusers_model(cls: Any, folder: Path, from_pt: bool) -> tuple[Any, Any]:
    """(module, params) for a diffusers Flax model folder (config.json + weights)."""
    if not (folder / "config.json").is_file():
        raise UserError(f"{folder} has no config.json; is it a diffusers model folder?")
    flax_file = folder / "diffusion_flax_model.msgpack"
    try:
        if from_pt:
            model = cls.from_config(cls.load_config(str(folder)))
            shapes = jax.eval_shape(model.init_weights, jax.random.PRNGKey(0))
            from diffusers.models.modeling_flax_pytorch_utils import (
                convert_pytorch_state_dict_to_flax,
            )

            state = _read_pt_state(folder, "diffusion_pytorch_model")
            params = convert_pytorch_state_dict_to_flax(
                {k: _AsNumpy(v) for k, v in state.items()}, _ShapeOnly(shapes))
            return model, _check_params(shapes, params, folder)
        if not flax_file.is_file():
            has_pt = any((folder / f"diffusion_pytorch_model.{e}").is_file()
                         for e in ("safetensors", "bin"))
            raise UserError(f"{folder} has no {flax_file.name}" + (
                "; it has PyTorch weights: pass from_pt=True (--config.prior.from_pt=True)"
                if has_pt else _PT_HINT))
        model, params = cls.from_pretrained(str(folder), dtype=jnp.float32)
        shapes = jax.eval_shape(model.init_weights, jax.random.PRNGKey(0))
        return model, _check_params(shapes, params, folder)
    except UserError:
        raise
    except (OSError, ValueError, KeyError) as e:
        raise UserError(f"cannot load {folder}: {_first_line(e)}") from e


class _AsNumpy:
    """Wraps an array so that diffusers' converter can call `.numpy()` on it like on a tensor."""

    def __init__(self, array: np.ndarray):
        self.array = array

    def numpy(self) -> np.ndarray:
        return self.array


def _load_text_encoder(folder: Path, from_pt: bool) -> tuple[Any, Any]:
    """(FlaxCLIPTextModel, params) from flax_model.msgpack or PyTorch weights."""
    tr = _compat.transformers()
    if not (folder / "config.json").is_file():
        raise UserError(f"{folder} has no config.json; is it a transformers model folder?")
    try:
        if from_pt or not (folder / "flax_model.msgpack").is_file():
            if not from_pt and not (folder / "model.safetensors").is_file():
                raise UserError(f"{folder} has no flax_model.msgpack" + (
                    "; it has PyTorch weights: pass from_pt=True (--config.prior.from_pt=True)"
                    if (folder / "pytorch_model.bin").is_file() else _PT_HINT))
            from transformers.modeling_flax_pytorch_utils import (
                convert_pytorch_state_dict_to_flax,
            )

            config = tr.CLIPTextConfig.from_pretrained(str(folder))
            model = tr.FlaxCLIPTextModel(config, _do_init=False)
            shapes = model.params_shape_tree
            state = _read_pt_state(folder, "model" if (folder / "model.safetensors").is_file()
                                   else "pytorch_model")
            params = convert_pytorch_state_dict_to_flax(
                state, _ShapeOnly(shapes, model.base_model_prefix))
            return model, _check_params(shapes, params, folder)
        model, params = tr.FlaxCLIPTextModel.from_pretrained(str(folder), _do_init=False)
        return model, _check_params(model.params_shape_tree, params, folder)
    except UserError:
        raise
    except (OSError, ValueError, KeyError) as e:
        raise UserError(f"cannot load {folder}: {_first_line(e)}") from e


# ----------------------------------------------------------------------------------------------
# The tiny random-init pipeline.


def _random_params(shapes: Any, seed: int, stream: int) -> Any:
    """Host float32 weights for a shape tree, like Flax's defaults, from numpy's PCG64.

    kernels ~ N(0, 1/fan_in) (LeCun normal), embeddings ~ N(0, 1), biases 0, norm scales 1.
    Deterministic on every platform, and ~50x faster than compiling the modules' `init`
    (jitted threefry init of the tiny UNet takes 20-30 s on 2 CPU cores).
    """
    rng = np.random.default_rng([seed, stream])

    def leaf(path, spec):
        kind, shape = path[-1].key, tuple(spec.shape)
        if kind == "bias":
            return np.zeros(shape, np.float32)
        if kind == "scale":
            return np.ones(shape, np.float32)
        if kind == "embedding":
            return rng.standard_normal(shape, np.float32)
        if kind == "kernel":
            fan_in = int(np.prod(shape[:-1]))
            return rng.standard_normal(shape, np.float32) / np.float32(np.sqrt(fan_in))
        raise ValueError(f"no initializer for parameter {jax.tree_util.keystr(path)}")

    return jax.tree_util.tree_map_with_path(leaf, dict(shapes))


def random_pipeline(unet_config: dict[str, Any], vae_config: dict[str, Any],
                    text_config: dict[str, Any], seed: int = 0) -> tuple[Any, ...]:
    """(unet, vae, text_encoder, tokenizer, host float32 params) of an SD architecture given by
    the three models' config keys, with random weights (`_random_params`) and the byte
    tokenizer (`text_config`'s vocab_size defaults to the tokenizer's length).

    The tiny prior below uses it, and benchmarks/t23d_step.py builds SD 2.1-base's real-size
    architecture with it (no download: the cost of a step does not depend on the weights).
    """
    d, tr = _compat.diffusers(), _compat.transformers()
    tokenizer = tr.CLIPTokenizer.from_pretrained(str(byte_tokenizer_path()))
    unet = d.FlaxUNet2DConditionModel(**unet_config)
    vae = d.FlaxAutoencoderKL(**vae_config)
    text_encoder = tr.FlaxCLIPTextModel(tr.CLIPTextConfig(**{
        "vocab_size": len(tokenizer), "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id, "pad_token_id": tokenizer.pad_token_id,
        **text_config}), _do_init=False)
    key = jax.random.PRNGKey(0)  # only shapes are read
    params = {
        "unet": _random_params(jax.eval_shape(unet.init_weights, key), seed, 0),
        "vae": _random_params(jax.eval_shape(vae.init_weights, key), seed, 1),
        "text_encoder": _random_params(text_encoder.params_shape_tree, seed, 2),
    }
    return unet, vae, text_encoder, tokenizer, params


@functools.cache
def _tiny_pipeline(seed: int, image_size: int) -> tuple[Any, ...]:
    """(unet, vae, text_encoder, tokenizer, host params, scheduler config), float32."""
    if image_size < 8 or image_size % 4:
        raise UserError(f"tiny SD image_size {image_size} must be a multiple of 4 and >= 8 "
                        "(latents are image_size/2 and the UNet halves them once)")
    parts = random_pipeline(dict(TINY_UNET, sample_size=image_size // 2),
                            dict(TINY_VAE, sample_size=image_size), TINY_TEXT, seed)
    return (*parts, dict(TINY_SCHEDULER))


def tiny_sd_prior(seed: int = 0, image_size: int = 64, dtype: str = "float32",
                  attention: str = "late_norm") -> Prior:
    """A random-init SD-architecture prior: 4 x image_size/2 x image_size/2 latents (4x32x32).

    Same classes and code path as real Stable Diffusion (UNet with cross-attention, KL VAE with
    one downsampling, CLIP text encoder on the byte tokenizer, so prompts are cut after about 75
    UTF-8 bytes), about 1.5M weights. Cached: the same arguments return the same `Prior` (and
    its compiled functions) in one process.
    """
    return _tiny_sd_prior(int(seed), int(image_size), str(dtype), str(attention))


@functools.cache
def _tiny_sd_prior(seed: int, image_size: int, dtype: str, attention: str) -> Prior:
    *modules, params, scheduler_config = _tiny_pipeline(seed, image_size)
    return make_sd_prior(*modules, params, scheduler_config, dtype=dtype,
                         name=f"tiny_sd(seed={seed},{image_size}px,{dtype})", attention=attention)


def save_pipeline(directory: str | os.PathLike, unet: Any, vae: Any | None, text_encoder: Any,
                  tokenizer: Any, params: dict[str, Any], scheduler_config: dict[str, Any]
                  ) -> Path:
    """Writes a diffusers folder that `load_stable_diffusion` reads; `vae=None` writes a
    pixel-space pipeline (model_index.json: `"vae": [null, null]`)."""
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    d = _compat.diffusers()
    unet.save_pretrained(out / "unet", params=params["unet"])
    if vae is not None:
        vae.save_pretrained(out / "vae", params=params["vae"])
    text_encoder.save_pretrained(out / "text_encoder", params=params["text_encoder"])
    tokenizer.save_pretrained(out / "tokenizer")
    (out / "scheduler").mkdir(exist_ok=True)
    scheduler = {**scheduler_config, "_diffusers_version": d.__version__}
    (out / "scheduler" / "scheduler_config.json").write_text(json.dumps(scheduler, indent=2))
    index = {
        "_class_name": "FlaxStableDiffusionPipeline",
        "_diffusers_version": d.__version__,
        "unet": ["diffusers", "FlaxUNet2DConditionModel"],
        "vae": [None, None] if vae is None else ["diffusers", "FlaxAutoencoderKL"],
        "text_encoder": ["transformers", "FlaxCLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "scheduler": ["diffusers", "FlaxDDPMScheduler"],
        "safety_checker": [None, None],
        "feature_extractor": [None, None],
    }
    (out / "model_index.json").write_text(json.dumps(index, indent=2))
    return out


def save_tiny_pipeline(directory: str | os.PathLike, seed: int = 0, image_size: int = 64) -> Path:
    """Writes the tiny pipeline as a diffusers folder that `load_stable_diffusion` reads."""
    unet, vae, text_encoder, tokenizer, params, scheduler_config = _tiny_pipeline(
        int(seed), int(image_size))
    return save_pipeline(directory, unet, vae, text_encoder, tokenizer, params, scheduler_config)


__all__ = [
    "alphas_cumprod_from_config",
    "load_stable_diffusion",
    "make_sd_prior",
    "save_pipeline",
    "save_tiny_pipeline",
    "tiny_sd_prior",
]
