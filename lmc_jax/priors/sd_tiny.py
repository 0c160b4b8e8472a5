"""Random-weight Stable Diffusion pipelines: the tiny one of the tests, any real-size one of the
benchmarks, and writing them as diffusers folders (Flax, or PyTorch in the official layout).

- `tiny_sd_prior()`: a random-init SD-architecture prior (4x32x32 latents) for CPU tests.
- `random_pipeline(unet, vae, text)`: modules + random host weights for any SD architecture.
- `save_pipeline(dir, ...)`: a Flax diffusers folder (`*.msgpack`) that the loader reads.
- `save_pytorch_pipeline(dir, ...)`: the same weights as a PyTorch-format folder laid out like
  the official Hub repositories (`diffusion_pytorch_model.safetensors`, `model.safetensors`,
  PyTorch parameter names and layouts, torch class names, a PNDM scheduler config;
  `variant='fp16'` writes only `*.fp16.safetensors` in float16). Written with safetensors'
  numpy API: torch is not needed.
"""

from __future__ import annotations

import functools
import json
import os
from pathlib import Path
from typing import Any

import jax
import numpy as np

from lmc_jax import _compat
from lmc_jax.errors import UserError
from lmc_jax.priors.base import Prior
from lmc_jax.priors.sd import DEFAULT_VAE_SCALING, make_sd_prior
from lmc_jax.priors.tokenizer import byte_tokenizer_path

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
    unet, vae, text_encoder, tokenizer, shapes = pipeline_shapes(unet_config, vae_config,
                                                                 text_config)
    params = {k: _random_params(shapes[k], seed, i)
              for i, k in enumerate(("unet", "vae", "text_encoder"))}
    return unet, vae, text_encoder, tokenizer, params


def pipeline_shapes(unet_config: dict[str, Any], vae_config: dict[str, Any],
                    text_config: dict[str, Any]) -> tuple[Any, ...]:
    """(unet, vae, text_encoder, tokenizer, params as `jax.ShapeDtypeStruct`s) of an SD
    architecture: nothing is allocated (`jax.eval_shape`). `random_pipeline` fills them;
    `lmc_jax.priors.sd_shapes` plans with them as they are."""
    d, tr = _compat.diffusers(), _compat.transformers()
    tokenizer = tr.CLIPTokenizer.from_pretrained(str(byte_tokenizer_path()))
    unet = d.FlaxUNet2DConditionModel.from_config(dict(unet_config))
    vae = d.FlaxAutoencoderKL.from_config(dict(vae_config))
    text_encoder = tr.FlaxCLIPTextModel(tr.CLIPTextConfig(**{
        "vocab_size": len(tokenizer), "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id, "pad_token_id": tokenizer.pad_token_id,
        **text_config}), _do_init=False)
    key = jax.random.PRNGKey(0)  # only shapes are read
    shapes = {"unet": jax.eval_shape(unet.init_weights, key),
              "vae": jax.eval_shape(vae.init_weights, key),
              "text_encoder": text_encoder.params_shape_tree}
    return unet, vae, text_encoder, tokenizer, shapes


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


# Flax module names whose trailing _N is PyTorch's ".N" (a ModuleList index).
_LIST_NAMES = ("down_blocks", "up_blocks", "resnets", "attentions", "transformer_blocks",
               "downsamplers", "upsamplers", "to_out", "net")
# The VAE's Flax attention block names its projections like diffusers' pre-0.14 torch code.
_VAE_ATTENTION = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}


def pytorch_state_dict(params: Any) -> dict[str, np.ndarray]:
    """Flax weights -> PyTorch names and layouts, as diffusers' and transformers' torch models
    name them (`down_blocks.0.attentions.0.to_out.0.weight`, OIHW convolutions, [out, in]
    linear weights); the inverse of their PyTorch-to-Flax converters."""
    from flax.traverse_util import flatten_dict

    out = {}
    for key, value in flatten_dict(dict(params)).items():
        v = np.asarray(value)
        names = []
        for part in key[:-1]:
            base, _, index = str(part).rpartition("_")
            if base in _LIST_NAMES and index.isdigit():
                names.append(f"{base}.{index}")
            else:
                names.append(_VAE_ATTENTION.get(str(part), str(part)) if key[0] in
                             ("encoder", "decoder") else str(part))
        leaf = key[-1]
        if leaf == "kernel":
            v, leaf = (v.transpose(3, 2, 0, 1) if v.ndim == 4 else v.T), "weight"
        elif leaf in ("scale", "embedding"):
            leaf = "weight"
        out[".".join((*names, leaf))] = v if v.flags.c_contiguous else np.array(v, order="C")
    return out


# Official SD 2.x scheduler config (PNDM); the loader reads only the beta schedule from it.
PNDM_SCHEDULER = {
    "_class_name": "PNDMScheduler",
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "clip_sample": False,
    "num_train_timesteps": 1000,
    "prediction_type": "epsilon",
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "trained_betas": None,
}
_FLAX_ONLY_KEYS = ("dtype", "use_memory_efficient_attention", "split_head_dim",
                   "_use_default_values")


def save_pytorch_pipeline(directory: str | os.PathLike, unet: Any, vae: Any, text_encoder: Any,
                          tokenizer: Any, params: dict[str, Any],
                          scheduler_config: dict[str, Any] | None = None,
                          variant: str | None = None) -> Path:
    """Writes `params` as a PyTorch-format diffusers folder in the official Hub layout.

    `variant='fp16'` writes `<stem>.fp16.safetensors` in float16 (and no plain files), as the
    fp16 variant files of the Hub; otherwise float32 `<stem>.safetensors`. A value of `params`
    may be a zero-argument callable that returns the component's weights: it is called when
    that component is written, so a caller can hold one component's weights at a time.
    """
    from safetensors.numpy import save_file

    d = _compat.diffusers()
    out = Path(directory)
    dtype = np.float16 if variant == "fp16" else np.float32
    suffix = f".{variant}.safetensors" if variant else ".safetensors"
    parts = [("unet", unet, "UNet2DConditionModel", "diffusion_pytorch_model"),
             ("vae", vae, "AutoencoderKL", "diffusion_pytorch_model")]
    for name, module, cls, stem in parts:
        (out / name).mkdir(parents=True, exist_ok=True)
        config = {k: v for k, v in dict(module.config).items() if k not in _FLAX_ONLY_KEYS}
        config.update({"_class_name": cls, "_diffusers_version": d.__version__})
        (out / name / "config.json").write_text(json.dumps(config, indent=2, default=list))
        weights = params[name]() if callable(params[name]) else params[name]
        state = {k: v.astype(dtype, copy=False) for k, v in pytorch_state_dict(weights).items()}
        del weights
        save_file(state, str(out / name / f"{stem}{suffix}"), metadata={"format": "pt"})
        del state
    (out / "text_encoder").mkdir(parents=True, exist_ok=True)
    tconfig = text_encoder.config.to_dict()
    tconfig.update({"architectures": ["CLIPTextModel"], "torch_dtype": np.dtype(dtype).name})
    (out / "text_encoder" / "config.json").write_text(json.dumps(tconfig, indent=2))
    weights = params["text_encoder"]
    weights = weights() if callable(weights) else weights
    state = {k: v.astype(dtype, copy=False) for k, v in pytorch_state_dict(weights).items()}
    del weights
    save_file(state, str(out / "text_encoder" / f"model{suffix}"), metadata={"format": "pt"})
    tokenizer.save_pretrained(out / "tokenizer")
    (out / "scheduler").mkdir(exist_ok=True)
    scheduler = {**PNDM_SCHEDULER, **(scheduler_config or {}), "_class_name": "PNDMScheduler",
                 "_diffusers_version": d.__version__}
    (out / "scheduler" / "scheduler_config.json").write_text(json.dumps(scheduler, indent=2))
    (out / "feature_extractor").mkdir(exist_ok=True)
    (out / "feature_extractor" / "preprocessor_config.json").write_text(json.dumps({
        "crop_size": 224, "do_center_crop": True, "do_normalize": True, "do_resize": True,
        "feature_extractor_type": "CLIPFeatureExtractor",
        "image_mean": [0.48145466, 0.4578275, 0.40821073],
        "image_std": [0.26862954, 0.26130258, 0.27577711], "resample": 3, "size": 224},
        indent=2))
    index = {
        "_class_name": "StableDiffusionPipeline",
        "_diffusers_version": d.__version__,
        "feature_extractor": ["transformers", "CLIPImageProcessor"],
        "requires_safety_checker": False,
        "safety_checker": [None, None],
        "scheduler": ["diffusers", "PNDMScheduler"],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
    }
    (out / "model_index.json").write_text(json.dumps(index, indent=2))
    return out


def save_tiny_pytorch_pipeline(directory: str | os.PathLike, seed: int = 0, image_size: int = 64,
                               variant: str | None = None) -> Path:
    """The tiny pipeline (`tiny_sd_prior`'s weights) as a PyTorch-format folder."""
    unet, vae, text_encoder, tokenizer, params, _ = _tiny_pipeline(int(seed), int(image_size))
    return save_pytorch_pipeline(directory, unet, vae, text_encoder, tokenizer, params,
                                 variant=variant)


__all__ = [
    "PNDM_SCHEDULER",
    "TINY_SCHEDULER",
    "TINY_TEXT",
    "TINY_UNET",
    "TINY_VAE",
    "pytorch_state_dict",
    "random_pipeline",
    "save_pipeline",
    "save_pytorch_pipeline",
    "save_tiny_pipeline",
    "save_tiny_pytorch_pipeline",
    "tiny_sd_prior",
]
