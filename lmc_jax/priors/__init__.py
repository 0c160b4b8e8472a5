"""Diffusion priors: exact Gaussian (mixture), Stable Diffusion, tiny SD-architecture."""

from lmc_jax.priors.base import Prior, x_hat_from_eps

__all__ = ["Prior", "x_hat_from_eps"]
