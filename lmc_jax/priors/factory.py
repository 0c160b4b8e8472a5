"""Builds the prior named in a config's `prior` section."""

from __future__ import annotations

import weakref

import ml_collections

from lmc_jax.errors import UserError
from lmc_jax.priors.base import Prior

PRIOR_NAMES = ("gaussian", "gaussian_mixture", "gaussian_patterns", "tiny_sd", "embedded",
               "embedded_patterned", "sd")


# id(prior) -> (weak reference, the config it was built from); read by `config_of`.
_BUILT: dict[int, tuple[weakref.ref, ml_collections.ConfigDict]] = {}


def config_of(prior: Prior) -> ml_collections.ConfigDict | None:
    """The `prior` config section `build_prior` built `prior` from, or None."""
    entry = _BUILT.get(id(prior))
    return entry[1] if entry is not None and entry[0]() is prior else None


def build_prior(cfg: ml_collections.ConfigDict) -> Prior:
    """`cfg.name` picks the backend; see `lmc_jax.config.prior_config` for the keys."""
    prior = _build(cfg)
    key = id(prior)
    _BUILT[key] = (weakref.ref(prior, lambda _: _BUILT.pop(key, None)),
                   cfg.copy_and_resolve_references())
    return prior


def _build(cfg: ml_collections.ConfigDict) -> Prior:
    if cfg.name == "gaussian":
        from lmc_jax.priors.gaussian import gaussian_prior

        return gaussian_prior(resolution=cfg.resolution, variance=cfg.variance)
    if cfg.name == "gaussian_mixture":
        from lmc_jax.priors.gaussian import DEFAULT_CLASSES, gaussian_prior

        return gaussian_prior(resolution=cfg.resolution, variance=cfg.variance,
                              classes=DEFAULT_CLASSES)
    if cfg.name == "gaussian_patterns":
        from lmc_jax.priors.gaussian import gaussian_prior, pattern_classes

        return gaussian_prior(resolution=cfg.resolution, variance=cfg.variance,
                              classes=pattern_classes(cfg.resolution))
    if cfg.name == "tiny_sd":
        from lmc_jax.priors.sd_tiny import tiny_sd_prior

        return tiny_sd_prior(seed=cfg.seed, image_size=cfg.resolution, dtype=cfg.dtype,
                             attention=cfg.attention)
    if cfg.name.startswith("embedded"):  # embedded_path names the shipped ones
        from lmc_jax.priors.embedded import embedded_path, embedded_prior

        return embedded_prior(dtype=cfg.dtype, path=cfg.path or embedded_path(cfg.name),
                              attention=cfg.attention)
    if cfg.name == "sd":
        from lmc_jax.priors.sd_load import load_stable_diffusion

        return load_stable_diffusion(cfg.path, dtype=cfg.dtype, from_pt=cfg.from_pt,
                                     attention=cfg.attention,
                                     revision=cfg.get("revision", "") or None,
                                     cache_dir=cfg.get("cache_dir", "") or None)
    raise UserError(f"unknown prior.name {cfg.name!r}; choose one of {list(PRIOR_NAMES)}")
