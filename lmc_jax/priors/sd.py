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
- The VAE encoder is rematerialized (`jax.checkpoint`) with a policy that keeps only the
  convolutions' outputs: a gradient through `encode` (text-to-3D, i2i, edits at 512 px) saves the
  bf16 convolution outputs and recomputes the GroupNorm/SiLU/add chains between them in the
  backward pass, instead of saving their float32 intermediates. Same values and gradients; the
  recompute is elementwise (<0.1% more FLOPs) and cuts the bytes the 512 px encoder backward
  moves (docs/design.md 2.6). No effect when nothing is differentiated.
- `Prior.params = {'unet', 'vae', 'text_encoder'}`; the Prior is a pytree and can be passed to
  `jax.jit` as an argument (the weights are then inputs, not compiled-in constants).

Backends built here, all through `make_sd_prior`:
- `load_stable_diffusion(path)`: a local diffusers-layout folder or a Hugging Face Hub id.
- `tiny_sd_prior()`: a random-init SD-architecture pipeline (4x32x32 latents) for CPU tests.
- `save_tiny_pipeline(dir)` writes that tiny pipeline in the diffusers layout, so the loader can be
  tested on a folder exactly like downloaded weights.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from lmc_jax import schedule
from lmc_jax.errors import UserError
from lmc_jax.priors.attention import fast_attention
from lmc_jax.priors.base import Prior

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
COMPONENTS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")
DEFAULT_VAE_SCALING = 0.18215
PREDICTION_TYPES = ("epsilon", "v_prediction")
ATTENTION_IMPLS = ("late_norm", "diffusers")

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
        want = dtype if jnp.issubdtype(x.dtype, jnp.floating) else x.dtype
        if isinstance(x, jax.ShapeDtypeStruct):  # shapes only (lmc_jax.priors.sd_shapes)
            return jax.ShapeDtypeStruct(x.shape, want)
        if isinstance(x, jax.Array) and not x.committed and x.dtype == want:
            return x  # already what is wanted: no second copy of multi-GB weights
        return jnp.asarray(np.asarray(x), want)

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


def save_convolutions(prim: Any, *_: Any, **__: Any) -> bool:
    """`jax.checkpoint` policy: keep the outputs of convolutions, recompute everything else."""
    return prim is lax.conv_general_dilated_p


def make_sd_prior(unet: Any, vae: Any | None, text_encoder: Any, tokenizer: Any,
                  params: dict[str, Any], scheduler_config: dict[str, Any], *,
                  dtype: str = "float32", name: str = "sd",
                  attention: str = "late_norm", remat_encoder: bool = True) -> Prior:
    """Builds the `Prior` from loaded (or random) components; the one place both paths meet.

    Args:
      unet: a `FlaxUNet2DConditionModel` (only its config is used; dtype is set here).
      vae: a `FlaxAutoencoderKL`, or None for a pixel-space model (the UNet diffuses RGB images
        in [-1, 1] directly, like the embedded prior of `lmc_jax.priors.embedded`).
      text_encoder: a `FlaxCLIPTextModel`.
      tokenizer: a `CLIPTokenizer`.
      params: {'unet', 'vae', 'text_encoder'} weights ('vae' only with a VAE), any float dtype,
        host or device; or `jax.ShapeDtypeStruct`s (a shapes-only prior for planning, whose
        `embed_text` gives zeros of the right shape).
      scheduler_config: the scheduler_config.json dict (betas, prediction_type).
      dtype: 'float32' or 'bfloat16' (weights and compute); outputs are always float32.
      name: for logs.
      attention: 'late_norm' (`lmc_jax.priors.attention`: the same function, one pass fewer
        over the score matrix) or 'diffusers' (diffusers' own FlaxAttention).
      remat_encoder: rematerialize the VAE encoder keeping only convolution outputs (see the
        module docstring); False keeps what XLA saves by default (for comparisons).
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
    text_m = (text_encoder if getattr(text_encoder, "dtype", None) == cdtype  # no re-trace
              else type(text_encoder)(tcfg, dtype=cdtype, _do_init=False))
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

    def vae_mean(vae_params, nchw):  # latent_dist is already NHWC
        return vae_m.apply({"params": vae_params}, nchw, method=vae_m.encode).latent_dist.mean

    encode_mean = (jax.checkpoint(vae_mean, policy=save_convolutions) if remat_encoder
                   else vae_mean)

    def encode_fn(p, images):
        if images.ndim != 4 or images.shape[-1] != vcfg.in_channels:
            raise UserError(f"images have shape {tuple(images.shape)}; {name} encodes "
                            f"[batch, height, width, {vcfg.in_channels}] in [-1, 1] (NHWC)")
        nchw = jnp.transpose(images, (0, 3, 1, 2)).astype(cdtype)
        return (encode_mean(p["vae"], nchw) * scaling).astype(jnp.float32)

    def decode_fn(p, x):
        if x.ndim != 4 or x.shape[-1] != latent_c:
            raise UserError(f"latents have shape {tuple(x.shape)}; {name} decodes "
                            f"[batch, height, width, {latent_c}] (NHWC)")
        z = (x / scaling).astype(cdtype)  # NHWC, as FlaxAutoencoderKL.decode accepts
        images = vae_m.apply({"params": p["vae"]}, z, method=vae_m.decode).sample  # NCHW
        return jnp.transpose(images, (0, 2, 3, 1)).astype(jnp.float32)

    keys = ("unet", "text_encoder") if pixel else ("unet", "vae", "text_encoder")
    params = _place({k: params[k] for k in keys}, cdtype)
    shapes_only = any(isinstance(x, jax.ShapeDtypeStruct)
                      for x in jax.tree_util.tree_leaves(params))

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
        if shapes_only:  # weights are shapes (planning): zeros of the embeddings' shape
            out = jax.eval_shape(encode_text, params["text_encoder"], ids)
            return jnp.zeros(out.shape, out.dtype)
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


# Names that moved to sd_load / sd_tiny stay importable from here (loaded on first use: those
# modules import this one).
_MOVED = {
    "sd_load": ("WEIGHTS_HINT", "load_stable_diffusion", "resolve_folder", "pytorch_weight_files",
                "single_file_command", "_hub_reachable", "_read_json", "_first_line"),
    "sd_tiny": ("TINY_UNET", "TINY_VAE", "TINY_TEXT", "TINY_SCHEDULER", "PNDM_SCHEDULER",
                "_random_params", "random_pipeline", "tiny_sd_prior", "save_pipeline",
                "save_tiny_pipeline", "save_pytorch_pipeline", "save_tiny_pytorch_pipeline",
                "pytorch_state_dict"),
}


def __getattr__(name: str) -> Any:
    import importlib

    for module, names in _MOVED.items():
        if name in names:
            return getattr(importlib.import_module(f"lmc_jax.priors.{module}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["alphas_cumprod_from_config", "closed_vocabulary_check", "make_sd_prior"]
