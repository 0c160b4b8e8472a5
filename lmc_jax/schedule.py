"""The variance-preserving diffusion schedule, loss weightings W(t) and timestep sampling.

Forward process (DDPM, VP): `x_t = a_t x + s_t eps`, with `a_t = sqrt(alphas_cumprod[t])` and
`s_t = sqrt(1 - alphas_cumprod[t])`, `t` an integer in [0, num_train_timesteps).
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

NUM_TRAIN_TIMESTEPS = 1000


def scaled_linear_alphas_cumprod(
    beta_start: float = 0.00085, beta_end: float = 0.012, num_steps: int = NUM_TRAIN_TIMESTEPS
) -> np.ndarray:
    """Stable Diffusion's 'scaled_linear' schedule: `beta_i = linspace(sqrt(b0), sqrt(b1))^2`.

    Returns `alphas_cumprod[t] = prod_{i<=t} (1 - beta_i)` as float32, shape [num_steps].
    """
    betas = np.linspace(beta_start**0.5, beta_end**0.5, num_steps, dtype=np.float64) ** 2
    return np.cumprod(1.0 - betas).astype(np.float32)


def linear_alphas_cumprod(
    beta_start: float = 0.0001, beta_end: float = 0.02, num_steps: int = NUM_TRAIN_TIMESTEPS
) -> np.ndarray:
    """DDPM's 'linear' schedule: `beta_i = linspace(b0, b1)`; returns alphas_cumprod."""
    betas = np.linspace(beta_start, beta_end, num_steps, dtype=np.float64)
    return np.cumprod(1.0 - betas).astype(np.float32)


def alpha_sigma(alphas_cumprod: jax.Array, t: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Returns `(a_t, s_t) = (sqrt(abar_t), sqrt(1 - abar_t))` for integer timesteps `t` [B]."""
    abar = jnp.asarray(alphas_cumprod)[t]
    return jnp.sqrt(abar), jnp.sqrt(1.0 - abar)


def add_noise(x: jax.Array, eps: jax.Array, a: jax.Array, s: jax.Array) -> jax.Array:
    """Forward process `x_t = a_t x + s_t eps`; `a`, `s` have shape [B], `x` [B, ...]."""
    return bcast(a, x) * x + bcast(s, x) * eps


def bcast(v: jax.Array, like: jax.Array) -> jax.Array:
    """Reshapes a per-sample vector [B] to broadcast against `like` [B, ...]."""
    return jnp.reshape(v, v.shape + (1,) * (like.ndim - v.ndim))


# W(t): the weighting of the score-distillation gradient. Names are what configs use.
WEIGHTINGS: dict[str, Callable[[jax.Array, jax.Array], jax.Array]] = {
    "one": lambda a, s: jnp.ones_like(a),  # W(t) = 1
    "sigma2": lambda a, s: s**2,  # W(t) = s_t^2 = 1 - abar_t (DreamFusion's default)
    "sigma_over_alpha": lambda a, s: s / a,  # W(t) = s_t / a_t (1/sqrt(SNR))
    "sigma": lambda a, s: s,  # W(t) = s_t
}


def weighting(name: str, a: jax.Array, s: jax.Array) -> jax.Array:
    """Evaluates the weighting `W(t)` named `name` (one of WEIGHTINGS) at `(a_t, s_t)`."""
    if name not in WEIGHTINGS:
        raise ValueError(f"unknown weighting {name!r}; choose one of {sorted(WEIGHTINGS)}")
    return WEIGHTINGS[name](a, s)


def t_max_at(step: jax.Array, total_steps: int, t_max: int, t_max_final: int,
             anneal: str) -> jax.Array:
    """Upper end of the timestep range at `step`.

    anneal='none' keeps `t_max`; 'linear' moves it linearly from `t_max` to `t_max_final` over
    training; 'sqrt' follows `t_max - (t_max - t_max_final) sqrt(step / total)` (fast early
    decrease, as in HiFA-style schedules).
    """
    frac = jnp.clip(jnp.asarray(step, jnp.float32) / max(total_steps, 1), 0.0, 1.0)
    if anneal == "none":
        return jnp.asarray(t_max, jnp.float32)
    if anneal == "linear":
        return t_max + (t_max_final - t_max) * frac
    if anneal == "sqrt":
        return t_max + (t_max_final - t_max) * jnp.sqrt(frac)
    raise ValueError(f"unknown timestep annealing {anneal!r}; choose 'none', 'linear' or 'sqrt'")


def sample_timesteps(key: jax.Array, batch: int, t_min: int, t_max: jax.Array) -> jax.Array:
    """Integer timesteps uniform in [t_min, t_max) (t_max may be a traced float), shape [B]."""
    u = jax.random.uniform(key, (batch,))
    t = jnp.floor(t_min + u * (t_max - t_min))
    return jnp.clip(t, t_min, NUM_TRAIN_TIMESTEPS - 1).astype(jnp.int32)
