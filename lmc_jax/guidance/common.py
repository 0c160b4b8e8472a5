"""What every guidance loss shares: inputs, outputs, noise and timestep sampling.

A guidance function has the signature

    fn(prior, x, t, eps, cond, hp) -> GuidanceOutput

and returns the *gradient* with respect to `x` (never through the denoiser), which an
application pulls back to its parameters with `jax.vjp` (or `surrogate_loss`). The parts of
the gradient are returned by the paper's names (`L_cond`, `L_proj`, `L_lmc`) so that the
decomposition is visible in logs and tests.

Guidance convention (the paper's): `e_w = e_c + w (e_c - e_u)`. diffusers' `guidance_scale` g
is `w = g - 1`; DreamFusion's and threestudio's SD guidance_scale already are `w`
(docs/baselines.md).
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
from flax import struct

from lmc_jax import schedule
from lmc_jax.parallel import deinterleave, interleave
from lmc_jax.priors.base import Prior, x_hat_from_eps

BiasFn = Callable[[jax.Array, jax.Array, jax.Array], jax.Array]


@struct.dataclass
class Conditioning:
    """Text embeddings (and a source image for DDS), batched like `x` ([B, ...]).

    c: the target prompt; u: the null prompt ""; src: DDS's source prompt; neg: NFSD's
    negative prompt; x_src: DDS's source image in the prior's `x` space.
    """

    c: jax.Array
    u: jax.Array
    src: jax.Array | None = None
    neg: jax.Array | None = None
    x_src: jax.Array | None = None


@struct.dataclass
class GuidanceParams:
    """Static hyper-parameters of a guidance loss (hashable; part of the jitted step).

    w: guidance weight in the paper's convention (diffusers' guidance_scale minus 1).
    weighting: name of `W(t)` in `lmc_jax.schedule.WEIGHTINGS`.
    b_psi: LMC-SDS's frozen deficiency model `b_psi(x, t, emb)` (a trained `BiasNet`, or any
      fixed stand-in such as the Gaussian prior's linear model), or None.
    exact_deficiency: LMC-SDS uses the prior's closed-form deficiency `prior.exact_bias` (the
      exact Gaussian priors) instead of `b_psi`, read from the prior the loss is called with, so
      a step whose prior params are traced arguments never bakes them in as constants.
    nfsd_threshold: NFSD uses `e_u` below this timestep and `e_u - e_neg` above.
    lmc_xhat: LMC-SDS's `x_hat` (and `b`'s embedding): 'cond' (from `e_c`) or 'uncond' (`e_u`).
    """

    w: float = struct.field(pytree_node=False, default=7.5)
    weighting: str = struct.field(pytree_node=False, default="sigma2")
    b_psi: BiasFn | None = struct.field(pytree_node=False, default=None)
    exact_deficiency: bool = struct.field(pytree_node=False, default=False)
    nfsd_threshold: int = struct.field(pytree_node=False, default=200)
    lmc_xhat: str = struct.field(pytree_node=False, default="uncond")

    @property
    def has_deficiency(self) -> bool:
        """Whether LMC-SDS has a `b` to call (closed form or `b_psi`)."""
        return self.exact_deficiency or self.b_psi is not None

    def deficiency(self, prior: Prior, x: jax.Array, t: jax.Array, emb: jax.Array) -> jax.Array:
        """`b(x, t) ~ E_eps[x_hat]`: the prior's closed form or the frozen `b_psi`."""
        if self.exact_deficiency:
            return prior.exact_bias(x, t, emb)
        return self.b_psi(x, t, emb)


@struct.dataclass
class GuidanceOutput:
    """grad: d loss / d x, [B, H, W, C]. parts: named gradient parts that sum to `grad`.
    scalars: per-batch diagnostics (mean squared norms of the parts, loss values)."""

    grad: jax.Array
    parts: dict[str, jax.Array]
    scalars: dict[str, jax.Array]


def denoise(prior: Prior, x: jax.Array, t: jax.Array, eps: jax.Array,
            embs: list[jax.Array]) -> tuple[jax.Array, list[jax.Array]]:
    """Noises `x` once (`x_t = a_t x + s_t eps`) and runs the denoiser for each embedding in
    ONE batched call (e.g. cond + uncond). Returns `x_t` and the list of `stop_gradient` eps
    predictions, one per embedding."""
    prior.check_x(x)
    a, s = schedule.alpha_sigma(prior.alphas_cumprod, t)
    x_t = schedule.add_noise(x, eps, a, s)
    k = len(embs)
    out = prior.eps(interleave([x_t] * k), interleave([t] * k), interleave(embs))
    out = jax.lax.stop_gradient(out.astype(jnp.float32))
    return x_t, deinterleave(out, k)


def finish(parts: dict[str, jax.Array], extra: dict[str, jax.Array] | None = None
           ) -> GuidanceOutput:
    """Sums the named parts into the gradient and records their mean squared norms."""
    grad = sum(parts.values())
    scalars = {f"{name}_grad_norm": jnp.mean(jnp.sqrt(jnp.sum(
        jnp.reshape(g, (g.shape[0], -1)) ** 2, axis=-1))) for name, g in parts.items()}
    scalars.update(extra or {})
    return GuidanceOutput(grad=grad, parts=parts, scalars=scalars)


def weight(prior: Prior, t: jax.Array, hp: GuidanceParams, like: jax.Array) -> jax.Array:
    """`W(t)` broadcast against `like` [B, ...]."""
    a, s = schedule.alpha_sigma(prior.alphas_cumprod, t)
    return schedule.bcast(schedule.weighting(hp.weighting, a, s), like)


def x_hat(prior: Prior, x_t: jax.Array, t: jax.Array, e: jax.Array) -> jax.Array:
    """One-step denoised estimate `x_hat = (x_t - s_t e) / a_t`."""
    a, s = schedule.alpha_sigma(prior.alphas_cumprod, t)
    return x_hat_from_eps(x_t, e, a, s)


def surrogate_loss(x: jax.Array, grad: jax.Array) -> jax.Array:
    """A scalar whose gradient w.r.t. `x` is `grad`: `sum(sg(grad) * x)`.

    Lets an application use `jax.value_and_grad` through its renderer or generator; the value
    itself is meaningless (use GuidanceOutput.scalars for logging).
    """
    return jnp.sum(jax.lax.stop_gradient(grad) * x)


def sample_noise(key: jax.Array, step: jax.Array, batch: int, x_shape: tuple[int, ...], *,
                 fixed_noise: bool, t_min: int, t_max: int, t_max_final: int | None = None,
                 anneal: str = "none", total_steps: int = 1) -> tuple[jax.Array, jax.Array]:
    """Draws the timesteps [B] and noise [B, *x_shape] for optimisation step `step`.

    `key` is the run's guidance key. Normally both are drawn from `fold_in(key, step)` (so a
    resumed run draws the same values). With `fixed_noise`, `eps` is drawn once per run from
    `key` and reused at every step, and the timesteps are a stratified schedule whose random
    offset is also drawn once per run (the paper's fixed-noise option: different seeds give
    different, sharper results).
    """
    hi = schedule.t_max_at(step, total_steps, t_max,
                           t_max if t_max_final is None else t_max_final, anneal)
    step_key = jax.random.fold_in(key, step)
    if fixed_noise:
        k_eps, k_t = jax.random.split(key)
        eps = jax.random.normal(k_eps, (batch, *x_shape))
        # Stratified in [0, 1) with a per-run random offset and per-step golden-ratio stride.
        u0 = jax.random.uniform(k_t, (batch,))
        u = jnp.mod(u0 + step * 0.6180339887 + jnp.arange(batch) / batch, 1.0)
        t = jnp.floor(t_min + u * (hi - t_min))
        t = jnp.clip(t, t_min, schedule.NUM_TRAIN_TIMESTEPS - 1).astype(jnp.int32)
    else:
        k_eps, k_t = jax.random.split(step_key)
        eps = jax.random.normal(k_eps, (batch, *x_shape))
        t = schedule.sample_timesteps(k_t, batch, t_min, hi)
    return t, eps
