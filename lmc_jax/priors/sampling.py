"""Plain DDIM sampling from any `Prior` with classifier-free guidance.

DDIM (Song et al. 2021, eta = 0) on the timesteps `tau_N > ... > tau_1` (evenly spaced in
[0, T-1]); at each step, with `a = sqrt(alpha_bar_tau)`, `s = sqrt(1 - alpha_bar_tau)`:

    eps_hat = e_c + w (e_c - e_u)                 (the paper's w; diffusers' g = w + 1)
    x0_hat  = (x_tau - s eps_hat) / a             (clipped to [-1, 1] for pixel priors)
    x_prev  = a_prev x0_hat + s_prev eps_hat      (a_prev = 1, s_prev = 0 after the last step)

The result is `x0_hat` of the last step, in the prior's x space.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from lmc_jax.parallel import deinterleave, interleave
from lmc_jax.priors.base import Prior


def ddim_timesteps(num_timesteps: int, num_steps: int) -> np.ndarray:
    """Descending int32 timesteps, from T-1 down to 0, `num_steps` of them."""
    return np.round(np.linspace(num_timesteps - 1, 0, num_steps)).astype(np.int32)


@functools.partial(jax.jit, static_argnames=("num_steps", "clip"))
def ddim_sample(prior: Prior, emb_c: jax.Array, emb_u: jax.Array, key: jax.Array,
                w: float = 2.0, num_steps: int = 50, clip: bool = True) -> jax.Array:
    """Samples `x` [B, *x_shape] for the conditioning `emb_c` [B, ...] (`emb_u`: [1 or B, ...]).

    `clip` clips `x0_hat` to [-1, 1] (only for pixel priors; latents are never clipped).
    """
    b = emb_c.shape[0]
    emb_u = jnp.broadcast_to(emb_u, emb_c.shape)
    ts = jnp.asarray(ddim_timesteps(prior.num_timesteps, num_steps))
    abar = prior.alphas_cumprod
    prev_abar = jnp.concatenate([abar[ts[1:]], jnp.ones((1,), abar.dtype)])
    x = jax.random.normal(key, (b, *prior.x_shape), jnp.float32)
    do_clip = clip and prior.kind == "pixel"

    def step(x, inputs):
        t, ab_prev = inputs
        tt = jnp.full((b,), t, jnp.int32)
        e = prior.eps(interleave([x, x]), interleave([tt, tt]), interleave([emb_c, emb_u]))
        e_c, e_u = deinterleave(e, 2)
        eps = e_c + w * (e_c - e_u)
        a, s = jnp.sqrt(abar[t]), jnp.sqrt(1.0 - abar[t])
        x0 = (x - s * eps) / a
        if do_clip:
            x0 = jnp.clip(x0, -1.0, 1.0)
            eps = (x - a * x0) / s  # keep the pair consistent after clipping
        x_prev = jnp.sqrt(ab_prev) * x0 + jnp.sqrt(1.0 - ab_prev) * eps
        return x_prev, x0

    _, x0s = jax.lax.scan(step, x, (ts, prev_abar))
    return x0s[-1]
