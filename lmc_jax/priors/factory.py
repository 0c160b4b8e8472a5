"""Builds the prior named in a config's `prior` section."""

from __future__ import annotations

import ml_collections

from lmc_jax.errors import UserError
from lmc_jax.priors.base import Prior

PRIOR_NAMES = ("gaussian", "gaussian_mixture", "gaussian_patterns", "tiny_sd", "embedded", "sd")


def build_prior(cfg: ml_collections.ConfigDict) -> Prior:
    """`cfg.name` picks the backend; see `lmc_jax.config.prior_config` for the keys."""
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
        from lmc_jax.priors.sd import tiny_sd_prior

        return tiny_sd_prior(seed=cfg.seed, image_size=cfg.resolution, dtype=cfg.dtype,
                             attention=cfg.attention)
    if cfg.name == "embedded":
        from lmc_jax.priors.embedded import embedded_prior

        return embedded_prior(dtype=cfg.dtype, path=cfg.path or None, attention=cfg.attention)
    if cfg.name == "sd":
        from lmc_jax.priors.sd import load_stable_diffusion

        return load_stable_diffusion(cfg.path, dtype=cfg.dtype, from_pt=cfg.from_pt,
                                     attention=cfg.attention)
    raise UserError(f"unknown prior.name {cfg.name!r}; choose one of {list(PRIOR_NAMES)}")
