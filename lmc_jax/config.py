"""Shared pieces of the experiment configs (configs/*.py) and their validation.

Every config is an `ml_collections.ConfigDict` with an `app` key (the module in
`lmc_jax.apps` that runs it). Config files build their sections from the helpers here so that
the same key means the same thing in every app.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable

import ml_collections

from lmc_jax.errors import UserError

# NFSD's negative prompt for the embedded prior, which knows only its captions' words: the
# empty scene is that world's failure ("a plain background"), the default list's words are
# unknown to it.
EMBEDDED_NEGATIVE_PROMPT = "a plain background"


def prior_config(name: str = "gaussian", **overrides) -> ml_collections.ConfigDict:
    """The `prior` section.

    name: 'gaussian' (exact, one component), 'gaussian_mixture' (exact, coloured classes
      selected by the prompt), 'gaussian_patterns' (exact, six textured classes: stripes,
      bars, checker, dots, rings, diagonal; lmc_jax.priors.gaussian.pattern_classes),
      'tiny_sd' (random SD-architecture, offline), 'embedded' (the
      shipped 32x32 text-to-image prior of coloured shapes, offline; `path` may point at
      another folder made by configs/train_prior.py), 'embedded_patterned' (the same shapes
      with surface patterns, "a red striped ball": configs/train_prior.py:patterned) or 'sd'
      (Stable Diffusion from `path`: a local diffusers folder or a hub id).
    """
    cfg = ml_collections.ConfigDict({
        "name": name,
        "resolution": 32,  # gaussian*: image size; tiny_sd: image size (latents are /2)
        "variance": 0.25,  # gaussian*: pixel variance of the data
        # sd: a local diffusers folder or a hub id (stabilityai/stable-diffusion-2-1-base);
        # embedded: empty for the shipped prior, or a folder from configs/train_prior.py
        "path": "",
        "dtype": "float32",  # sd / tiny_sd / embedded: 'float32' or 'bfloat16'
        # sd: force reading PyTorch weights (a folder with only PyTorch weights is detected
        # and converted without it; converted weights are cached under cache_dir)
        "from_pt": False,
        "revision": "",  # sd with a Hub id: branch, tag or commit ("" = main)
        # converted weights and automatic b_psi; "" = $LMC_JAX_CACHE or ~/.cache/lmc_jax
        "cache_dir": "",
        # sd / tiny_sd / embedded: 'late_norm' (lmc_jax.priors.attention, faster, same result)
        # or 'diffusers' (diffusers' FlaxAttention as is)
        "attention": "late_norm",
        "seed": 0,  # tiny_sd: init seed
    })
    cfg.update(overrides)
    return cfg


def guidance_config(method: str = "lmc", **overrides) -> ml_collections.ConfigDict:
    """The `guidance` section.

    w is the paper's guidance weight: `e_w = e_c + w (e_c - e_u)`. diffusers' `guidance_scale`
    g equals w + 1; DreamFusion's and threestudio's SD guidance_scale already are w
    (docs/baselines.md).
    """
    cfg = ml_collections.ConfigDict({
        "method": method,  # sds | lmc | dds | nfsd | csd
        "w": 7.5,
        "weighting": "sigma2",  # W(t): one | sigma2 | sigma | sigma_over_alpha
        "t_min": 20,
        "t_max": 980,
        "t_anneal": "none",  # none | linear | sqrt: t_max moves to t_max_final over training
        "t_max_final": 500,
        "fixed_noise": False,  # draw eps (and the t-schedule's offset) once per run
        "bias": "exact",  # lmc: 'exact' (Gaussian prior's closed form) or 'learned'
        # lmc with bias='learned': a trained b_psi folder ('embedded': the embedded prior's)
        "bias_path": "",
        # lmc with bias='learned' and no bias_path: reuse the b_psi cached for this prior's
        # weights or train one from the prior's own samples (lmc_jax.bias.auto); False = error
        "bias_auto": True,
        "bias_auto_steps": 0,  # automatic b_psi: training steps (0 = the recipe's default)
        "bias_auto_samples": 0,  # automatic b_psi: DDIM samples drawn (0 = the recipe's)
        "bias_auto_ddim_steps": 0,  # automatic b_psi: DDIM steps per sample (0 = the recipe's)
        "nfsd_threshold": 200,
        # lmc: x_hat from e_u with b(x, t, "") ('uncond', the pairing for an unconditional
        # b_psi) or from e_c with b(x, t, prompt) ('cond', for a conditional b_psi); see
        # lmc_jax.guidance.lmc
        "lmc_xhat": "uncond",
        "negative_prompt": ("unrealistic, blurry, low quality, out of focus, ugly, low contrast,"
                            " dull, dark, low-resolution, gloomy"),
    })
    cfg.update(overrides)
    return cfg


def parse_preset(arg: str | None, presets: Iterable[str], config_name: str) -> str:
    """Returns the preset name given after ':' in `--config=configs/X.py:PRESET` ('' = default)."""
    arg = (arg or "").strip()
    valid = sorted(presets)
    if arg and arg not in valid:
        raise UserError(f"unknown preset {arg!r} for configs/{config_name}.py; "
                        f"choose one of {valid} (or none for the default){_suggest(arg, valid)}")
    return arg


def _suggest(word: str, options: Iterable[str]) -> str:
    close = difflib.get_close_matches(word, list(options), n=1)
    return f"; did you mean {close[0]!r}?" if close else ""


def all_keys(cfg: ml_collections.ConfigDict, prefix: str = "") -> list[str]:
    """Dotted paths of every leaf key in `cfg`."""
    keys = []
    for k, v in cfg.items():
        path = f"{prefix}{k}"
        if isinstance(v, ml_collections.ConfigDict):
            keys.extend(all_keys(v, path + "."))
        else:
            keys.append(path)
    return keys


def unknown_key_message(key: str, cfg: ml_collections.ConfigDict | None) -> str:
    """One line naming an unknown `--config.KEY` and the nearest valid key."""
    hint = ""
    if cfg is not None:
        keys = all_keys(cfg)
        close = difflib.get_close_matches(key, keys, n=1, cutoff=0.5)
        if not close:
            leaf = key.rsplit(".", 1)[-1]
            close = [k for k in keys if k.rsplit(".", 1)[-1] in
                     difflib.get_close_matches(leaf, [q.rsplit(".", 1)[-1] for q in keys], n=1)]
        hint = f"; did you mean --config.{close[0]}?" if close else ""
    return f"unknown config key {key!r} (from --config.{key}=...){hint}"


def require_prompt(prompt: str, what: str = "prompt") -> str:
    """Rejects an empty or blank prompt with a clear message."""
    if not isinstance(prompt, str) or not prompt.strip():
        raise UserError(f"{what} is empty; pass one with --config.{what}=\"a photo of ...\"")
    return prompt.strip()


def require_positive(value: int | float, key: str) -> None:
    if value <= 0:
        raise UserError(f"{key} must be > 0, got {value}; set --config.{key}=N")


def load_config(path: str, preset: str = "") -> ml_collections.ConfigDict:
    """Loads `get_config(preset)` from a config file, as `--config=PATH[:PRESET]` does.

    For use from Python (notebooks, tests): `load_config("configs/t23d.py", "tiny")`.
    """
    import importlib.util
    import os

    if not os.path.exists(path):
        raise UserError(f"config file {path!r} not found")
    name = "lmc_config_" + os.path.splitext(os.path.basename(path))[0]
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(preset) if preset else module.get_config()
