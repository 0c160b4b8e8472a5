"""Score Distillation Sampling and the two baselines that reuse its terms (CSD, NFSD).

SDS (DreamFusion): `grad_x = W(t) (e_w - eps)` with `e_w = e_c + w (e_c - e_u)`, no gradient
through the denoiser. The paper's decomposition splits it into

- `L_cond`: `W(t) w (e_c - e_u)`, the conditioning term (pushes toward the prompt), and
- `L_proj`: `W(t) (e_c - eps) = W(t) (a_t / s_t)(x - x_hat)`, the "projection" term, which
  pulls `x` toward the blurry one-step estimate `x_hat` and removes detail.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from lmc_jax.guidance.common import (
    Conditioning,
    GuidanceOutput,
    GuidanceParams,
    denoise,
    finish,
    weight,
)
from lmc_jax.priors.base import Prior


def sds(prior: Prior, x: jax.Array, t: jax.Array, eps: jax.Array, cond: Conditioning,
        hp: GuidanceParams) -> GuidanceOutput:
    """SDS: `grad = W(t) (e_w - eps) = L_cond + L_proj` (one cond+uncond denoiser call)."""
    _, (e_c, e_u) = denoise(prior, x, t, eps, [cond.c, cond.u])
    wt = weight(prior, t, hp, x)
    return finish({"L_cond": wt * hp.w * (e_c - e_u), "L_proj": wt * (e_c - eps)})


def csd(prior: Prior, x: jax.Array, t: jax.Array, eps: jax.Array, cond: Conditioning,
        hp: GuidanceParams) -> GuidanceOutput:
    """Classifier Score Distillation: the conditioning term alone, `W(t) w (e_c - e_u)`."""
    _, (e_c, e_u) = denoise(prior, x, t, eps, [cond.c, cond.u])
    return finish({"L_cond": weight(prior, t, hp, x) * hp.w * (e_c - e_u)})


def nfsd(prior: Prior, x: jax.Array, t: jax.Array, eps: jax.Array, cond: Conditioning,
         hp: GuidanceParams) -> GuidanceOutput:
    """Noise-Free Score Distillation: `grad = W(t) (delta_D + w delta_C)`.

    `delta_C = e_c - e_u`; the denoising term `delta_D = e_u` for `t < nfsd_threshold` (200 of
    1000) and `e_u - e_neg` (negative prompt) above it. `delta_D` is reported as `L_proj`.
    """
    neg = cond.u if cond.neg is None else cond.neg
    _, (e_c, e_u, e_n) = denoise(prior, x, t, eps, [cond.c, cond.u, neg])
    small_t = jnp.reshape(t < hp.nfsd_threshold, (-1,) + (1,) * (x.ndim - 1))
    delta_d = jnp.where(small_t, e_u, e_u - e_n)
    wt = weight(prior, t, hp, x)
    return finish({"L_cond": wt * hp.w * (e_c - e_u), "L_proj": wt * delta_d})
