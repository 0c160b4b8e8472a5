"""Builds a guidance loss from a config's `guidance` section (lmc_jax.config.guidance_config)."""

from __future__ import annotations

from collections.abc import Callable

import jax
import ml_collections

from lmc_jax.errors import UserError
from lmc_jax.guidance import METHODS, GuidanceParams, sample_noise
from lmc_jax.priors.base import Prior


def build_guidance(prior: Prior, gcfg: ml_collections.ConfigDict,
                   config: ml_collections.ConfigDict | None = None
                   ) -> tuple[Callable, GuidanceParams]:
    """Returns `(fn, hp)`: the method's function and its static hyper-parameters.

    For LMC-SDS, `guidance.bias` picks the deficiency model: 'exact' (the Gaussian prior's
    closed form) or 'learned' (a b_psi folder at `guidance.bias_path`, checked against the prior;
    'embedded' names the b_psi shipped with the embedded prior).
    """
    if gcfg.method not in METHODS:
        raise UserError(f"unknown guidance.method {gcfg.method!r}; choose one of {sorted(METHODS)}")
    if not 0 <= gcfg.t_min < gcfg.t_max <= prior.num_timesteps:
        raise UserError(f"guidance.t_min/t_max must satisfy 0 <= t_min < t_max <= "
                        f"{prior.num_timesteps}, got {gcfg.t_min}, {gcfg.t_max}")
    bias_fn = None
    if gcfg.method == "lmc":
        if gcfg.bias == "exact":
            if prior.bias_fn is None:
                raise UserError(f"guidance.bias='exact' needs the Gaussian prior; for prior "
                                f"{prior.name!r} train a b_psi (configs/bias.py) and pass "
                                "--config.guidance.bias=learned --config.guidance.bias_path=DIR")
            bias_fn = prior.exact_bias
        elif gcfg.bias == "learned":
            from lmc_jax.bias.store import load_bias

            path = gcfg.bias_path
            if not path:  # a cached b_psi for these weights, or one trained now
                from lmc_jax.bias.auto import resolve_bias

                path = resolve_bias(prior, gcfg, config)
            if path == "embedded":  # the b_psi shipped with the embedded prior
                from lmc_jax.priors.embedded import embedded_path

                path = str(embedded_path() / "bias")
            bias_fn = load_bias(path, prior)[2]
        else:
            raise UserError(f"guidance.bias must be 'exact' or 'learned', got {gcfg.bias!r}")
    if gcfg.lmc_xhat not in ("cond", "uncond"):
        raise UserError(f"guidance.lmc_xhat must be 'cond' or 'uncond', got {gcfg.lmc_xhat!r}")
    hp = GuidanceParams(w=float(gcfg.w), weighting=gcfg.weighting, bias_fn=bias_fn,
                        nfsd_threshold=int(gcfg.nfsd_threshold), lmc_xhat=gcfg.lmc_xhat)
    return METHODS[gcfg.method], hp


def negative_prompt(gcfg: ml_collections.ConfigDict) -> str | None:
    """NFSD's negative prompt (`guidance.negative_prompt`); None for the methods that never read
    it (so a prior need not know its words)."""
    return gcfg.negative_prompt if gcfg.method == "nfsd" else None


def noise_for_step(gcfg: ml_collections.ConfigDict, key: jax.Array, step: jax.Array, batch: int,
                   x_shape: tuple[int, ...], total_steps: int):
    """`sample_noise` with the config's timestep range, annealing and fixed-noise option."""
    return sample_noise(key, step, batch, x_shape, fixed_noise=gcfg.fixed_noise,
                        t_min=gcfg.t_min, t_max=gcfg.t_max, t_max_final=gcfg.t_max_final,
                        anneal=gcfg.t_anneal, total_steps=total_steps)
