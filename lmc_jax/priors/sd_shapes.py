"""Stable Diffusion as shapes only: the architecture of a prior without its weights.

`shapes_prior(prior_cfg, arch)` builds the same `Prior` as `load_stable_diffusion` (the same
`make_sd_prior`, so the same encode/eps functions and dtypes), but its params are
`jax.ShapeDtypeStruct`s made by `jax.eval_shape` from the models' config files: nothing is read
but JSON, nothing is allocated. A train step built on it can be lowered and compiled ahead of
time for any device set (`lmc_jax.plan`); its `embed_text` returns zeros of the right shape.

The architecture comes from, in order: `arch` (a name of `ARCHS`), the diffusers folder at
`prior.path` (`unet/`, `vae/`, `text_encoder/` config.json and
`scheduler/scheduler_config.json`), a Hub id that names a known model, or SD 2.1-base (the
default presets' model). The built-in configs below are the released models' own config values.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from lmc_jax.errors import UserError
from lmc_jax.priors.base import Prior

_SCHEDULER = {"_class_name": "FlaxDDIMScheduler", "beta_schedule": "scaled_linear",
              "beta_start": 0.00085, "beta_end": 0.012, "num_train_timesteps": 1000,
              "prediction_type": "epsilon", "clip_sample": False, "trained_betas": None}
_DOWN = ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",)
_UP = ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3
_UNET = dict(in_channels=4, out_channels=4, down_block_types=_DOWN, up_block_types=_UP,
             block_out_channels=(320, 640, 1280, 1280), layers_per_block=2,
             flip_sin_to_cos=True, freq_shift=0)
_VAE = dict(in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2,
            down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4,
            block_out_channels=(128, 256, 512, 512), norm_num_groups=32, scaling_factor=0.18215)
_CLIP_L = dict(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
               num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu")
_OPENCLIP_H = dict(vocab_size=49408, hidden_size=1024, intermediate_size=4096,
                   num_hidden_layers=23, num_attention_heads=16, max_position_embeddings=77,
                   hidden_act="gelu")

# name -> (unet, vae, text_encoder, scheduler) configs.
ARCHS: dict[str, tuple[dict, dict, dict, dict]] = {
    "sd15": (dict(_UNET, sample_size=64, attention_head_dim=8, cross_attention_dim=768),
             dict(_VAE, sample_size=512), _CLIP_L, _SCHEDULER),
    "sd21-base": (dict(_UNET, sample_size=64, attention_head_dim=(5, 10, 20, 20),
                       cross_attention_dim=1024, use_linear_projection=True),
                  dict(_VAE, sample_size=512), _OPENCLIP_H, _SCHEDULER),
    "sd21": (dict(_UNET, sample_size=96, attention_head_dim=(5, 10, 20, 20),
                  cross_attention_dim=1024, use_linear_projection=True),
             dict(_VAE, sample_size=768), _OPENCLIP_H,
             dict(_SCHEDULER, prediction_type="v_prediction")),
}
DEFAULT_ARCH = "sd21-base"
# Hub ids of the released models -> their architecture.
HUB_ARCHS = {
    "runwayml/stable-diffusion-v1-5": "sd15",
    "stable-diffusion-v1-5/stable-diffusion-v1-5": "sd15",
    "CompVis/stable-diffusion-v1-4": "sd15",
    "stabilityai/stable-diffusion-2-1-base": "sd21-base",
    "stabilityai/stable-diffusion-2-base": "sd21-base",
    "stabilityai/stable-diffusion-2-1": "sd21",
    "stabilityai/stable-diffusion-2": "sd21",
}


def _json(file: Path) -> dict[str, Any]:
    if not file.is_file():
        raise UserError(f"{file} is missing: a diffusers folder has unet/, vae/, text_encoder/ "
                        "config.json and scheduler/scheduler_config.json")
    try:
        return json.loads(file.read_text(encoding="utf-8"))
    except ValueError as e:
        raise UserError(f"{file} is not a JSON file ({e}); the folder is damaged") from e


def folder_configs(folder: Path) -> tuple[dict, dict, dict, dict]:
    """The four config files of a diffusers folder (no weights are read)."""
    text = {k: v for k, v in _json(folder / "text_encoder" / "config.json").items()
            if k in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                     "num_attention_heads", "max_position_embeddings", "hidden_act",
                     "projection_dim", "layer_norm_eps")}
    return (_json(folder / "unet" / "config.json"), _json(folder / "vae" / "config.json"), text,
            _json(folder / "scheduler" / "scheduler_config.json"))


def resolve_arch(path: str, arch: str = "") -> tuple[tuple[dict, dict, dict, dict], str]:
    """`(configs, where they came from)` for a prior path and an optional arch name."""
    if arch:
        if arch not in ARCHS:
            raise UserError(f"unknown architecture {arch!r}; choose one of {sorted(ARCHS)} or "
                            "point --config.prior.path at a diffusers folder")
        return ARCHS[arch], f"built-in {arch}"
    local = Path(path).expanduser() if path else None
    if local is not None and local.is_dir():
        return folder_configs(local), f"config files of {local}"
    if path in HUB_ARCHS:
        return ARCHS[HUB_ARCHS[path]], f"built-in {HUB_ARCHS[path]} (Hub id {path})"
    if path:
        raise UserError(f"prior.path {path!r} is neither a local diffusers folder nor a known "
                        f"Hub id ({', '.join(sorted(HUB_ARCHS))}); pass --arch="
                        f"{'|'.join(sorted(ARCHS))} or a folder holding the config files")
    return ARCHS[DEFAULT_ARCH], f"built-in {DEFAULT_ARCH} (prior.path is empty)"


def shapes_prior(prior_cfg: Any, arch: str = "", **kwargs: Any) -> tuple[Prior, str]:
    """`(Prior with ShapeDtypeStruct params, where its architecture came from)`; `kwargs` go to
    `make_sd_prior` (e.g. `remat_encoder=False`)."""
    from lmc_jax.priors.sd import make_sd_prior
    from lmc_jax.priors.sd_tiny import pipeline_shapes

    (ucfg, vcfg, tcfg, scfg), source = resolve_arch(prior_cfg.path, arch)
    unet, vae, text_encoder, tokenizer, shapes = pipeline_shapes(ucfg, vcfg, tcfg)
    prior = make_sd_prior(unet, vae, text_encoder, tokenizer, shapes, scfg,
                          dtype=prior_cfg.dtype, attention=prior_cfg.attention,
                          name=f"{arch or Path(prior_cfg.path or DEFAULT_ARCH).name} (shapes)",
                          **kwargs)
    return prior, source
