"""Builds the guidance record from a config's `guidance` section (lmc_jax.config.guidance_config).

`guidance_record(prior, gcfg, total_steps, config)` checks the section once and returns the
immutable `Guidance` every app step reads (lmc_jax.guidance.record); nothing downstream reads
the ConfigDict.
"""

from __future__ import annotations

from collections.abc import Callable

import ml_collections

from lmc_jax.errors import UserError
from lmc_jax.guidance import METHODS, GuidanceParams
from lmc_jax.guidance.record import Guidance, NoiseSpec
from lmc_jax.priors.base import Prior


def guidance_record(prior: Prior, gcfg: ml_collections.ConfigDict, total_steps: int = 1,
                    config: ml_collections.ConfigDict | None = None) -> Guidance:
    """The `Guidance` of `gcfg` for `prior`, its timestep annealing over `total_steps`.

    For LMC-SDS, `guidance.bias` picks the deficiency: 'exact' (the Gaussian prior's closed
    form, `GuidanceParams.exact_deficiency`) or 'learned' (a trained `b_psi`, see
    `learned_b_psi`). `config`: the whole run's config, for `lmc_jax.bias.auto`.
    """
    if gcfg.method not in METHODS:
        raise UserError(f"unknown guidance.method {gcfg.method!r}; choose one of {sorted(METHODS)}")
    if not 0 <= gcfg.t_min < gcfg.t_max <= prior.num_timesteps:
        raise UserError(f"guidance.t_min/t_max must satisfy 0 <= t_min < t_max <= "
                        f"{prior.num_timesteps}, got {gcfg.t_min}, {gcfg.t_max}")
    b_psi, exact = None, False
    if gcfg.method == "lmc":
        if gcfg.bias == "exact":
            if not prior.has_exact_bias:
                raise UserError(f"guidance.bias='exact' needs the Gaussian prior; for prior "
                                f"{prior.name!r} train a b_psi (configs/bias.py) and pass "
                                "--config.guidance.bias=learned --config.guidance.bias_path=DIR")
            exact = True
        elif gcfg.bias == "learned":
            b_psi = learned_b_psi(prior, gcfg, config)
        else:
            raise UserError(f"guidance.bias must be 'exact' or 'learned', got {gcfg.bias!r}")
    if gcfg.lmc_xhat not in ("cond", "uncond"):
        raise UserError(f"guidance.lmc_xhat must be 'cond' or 'uncond', got {gcfg.lmc_xhat!r}")
    hp = GuidanceParams(w=float(gcfg.w), weighting=gcfg.weighting, b_psi=b_psi,
                        exact_deficiency=exact, nfsd_threshold=int(gcfg.nfsd_threshold),
                        lmc_xhat=gcfg.lmc_xhat)
    return Guidance(method=gcfg.method, params=hp, noise=noise_spec(gcfg, total_steps),
                    negative_prompt=negative_prompt(gcfg))


def learned_b_psi(prior: Prior, gcfg: ml_collections.ConfigDict,
                  config: ml_collections.ConfigDict | None = None) -> Callable:
    """The frozen `b_psi(x, t, emb)` of `guidance.bias_path` (checked against the prior;
    'embedded' names the b_psi shipped with the embedded prior; empty: `lmc_jax.bias.auto`,
    which reads the run's `config` for the prompt and data.path when given)."""
    from lmc_jax.bias.store import load_bias

    path = gcfg.bias_path
    if not path:  # a cached b_psi for these weights, or one trained now
        from lmc_jax.bias.auto import resolve_bias

        path = resolve_bias(prior, gcfg, config)
    if path == "embedded":  # the b_psi shipped with the (plain or patterned) embedded prior
        from lmc_jax.priors.embedded import SHIPPED, embedded_path
        from lmc_jax.priors.factory import config_of

        built = config_of(prior)
        name = built.name if built is not None and built.name in SHIPPED else "embedded"
        path = str(embedded_path(name) / "bias")
    return load_bias(path, prior)[2]


def build_guidance(prior: Prior, gcfg: ml_collections.ConfigDict,
                   config: ml_collections.ConfigDict | None = None
                   ) -> tuple[Callable, GuidanceParams]:
    """`(fn, hp)` of `guidance_record`: the method's function and its hyper-parameters, for
    code that calls a guidance function directly with its own `(t, eps)`."""
    guide = guidance_record(prior, gcfg, config=config)
    return guide.fn, guide.params


def noise_spec(gcfg: ml_collections.ConfigDict, total_steps: int = 1) -> NoiseSpec:
    """The section's timestep range, annealing and fixed-noise option."""
    return NoiseSpec(t_min=int(gcfg.t_min), t_max=int(gcfg.t_max),
                     t_max_final=None if gcfg.t_max_final is None else int(gcfg.t_max_final),
                     anneal=gcfg.t_anneal, fixed_noise=bool(gcfg.fixed_noise),
                     total_steps=int(total_steps))


def negative_prompt(gcfg: ml_collections.ConfigDict) -> str | None:
    """NFSD's negative prompt (`guidance.negative_prompt`); None for the methods that never read
    it (so a prior need not know its words)."""
    return gcfg.negative_prompt if gcfg.method == "nfsd" else None
