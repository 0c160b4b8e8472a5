"""The exact Gaussian prior (DESIGN.md section 4): closed-form denoiser and deficiency.

Data: a mixture of K stationary Gaussians that share one covariance,
`x ~ sum_k pi_k N(mu_k, S)`, where each `mu_k` is a constant colour and `S` is circulant over
(H, W), independent across channels, with eigenvalues `lam(f)` on the 2-D DFT grid
(`f` = radial frequency in cycles per image). With the orthonormal DFT `F`,
`S = F^H diag(lam) F`, so every filter below is a pointwise product in Fourier space.

With one component (K = 1) this is the plain Gaussian of the analytic testbed. The equations
(a = a_t, s = s_t):

- Posterior mean of one component (Wiener filter), DESIGN.md section 4:
  `E_k[x | x_t] = mu_k + F^H [a lam / (a^2 lam + s^2)] F (x_t - a mu_k)`.
- Mixture responsibilities: `r_k ∝ pi_k N(x_t; a mu_k, a^2 S + s^2 I)`; the components share
  `S`, so only the DC coefficient of `x_t - a mu_k` differs between them.
- Posterior mean: `E[x | x_t] = sum_k r_k E_k[x | x_t]`; noise prediction
  `eps(x_t) = (x_t - a E[x | x_t]) / s` (exact).
- Deficiency: `b(x, t) = E_eps[x_hat] = mu + F^H [a^2 lam / (a^2 lam + s^2)] F (x - mu)`,
  exact for K = 1 and for a conditional (one-hot) prompt; the mixture's unconditional
  `E_eps[x_hat]` has no closed form (we then use the prompt-weighted mean colour).

Prompts select classes: a prompt naming a class (e.g. "red") gives the one-hot embedding, the
empty prompt gives all ones (unconditional). `emb` is a [B, K] mask of allowed classes.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from lmc_jax import schedule
from lmc_jax.errors import UserError
from lmc_jax.priors.base import Prior

# Constant-colour class means of the default conditional mixture (RGB in [-1, 1]).
DEFAULT_CLASSES: dict[str, tuple[float, float, float]] = {
    "red": (0.6, -0.4, -0.4),
    "green": (-0.4, 0.6, -0.4),
    "blue": (-0.4, -0.4, 0.6),
    "yellow": (0.5, 0.5, -0.5),
}


def radial_frequency(height: int, width: int) -> np.ndarray:
    """|f| in cycles per image on the 2-D DFT grid, [H, W] (numpy.fft ordering)."""
    fy = np.fft.fftfreq(height) * height
    fx = np.fft.fftfreq(width) * width
    return np.sqrt(fy[:, None] ** 2 + fx[None, :] ** 2)


def power_spectrum(height: int, width: int, variance: float = 0.25,
                   spectrum: Callable[[np.ndarray], np.ndarray] | None = None) -> np.ndarray:
    """Eigenvalues `lam(f)` of S, default `1 / (f^2 + 1)`, scaled so that pixel variance
    `trace(S) / (H W) = mean(lam)` equals `variance`. Returns [H, W] float32."""
    f = radial_frequency(height, width)
    lam = 1.0 / (f**2 + 1.0) if spectrum is None else spectrum(f)
    return (lam * (variance / lam.mean())).astype(np.float32)


def fourier_filter(x: jax.Array, gain: jax.Array) -> jax.Array:
    """`F^H diag(gain) F x` over the spatial axes of NHWC `x`; `gain` is [B?, H, W] real and
    symmetric (gain(f) = gain(-f)), so the result is real."""
    xf = jnp.fft.fft2(x, axes=(-3, -2), norm="ortho")
    return jnp.real(jnp.fft.ifft2(xf * gain[..., None], axes=(-3, -2), norm="ortho"))


def _gains(lam: jax.Array, a: jax.Array, s: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Per-sample Wiener gains: posterior `a lam / (a^2 lam + s^2)` and deficiency
    `a^2 lam / (a^2 lam + s^2)`, each [B, H, W]."""
    a = a[:, None, None]
    s = s[:, None, None]
    den = a**2 * lam + s**2
    return a * lam / den, a**2 * lam / den


def responsibilities(params: dict, x_t: jax.Array, a: jax.Array, s: jax.Array,
                     emb: jax.Array) -> jax.Array:
    """Posterior class probabilities `r_k ∝ emb_k pi_k N(x_t; a mu_k, a^2 S + s^2 I)`, [B, K].

    The shared covariance cancels except at DC: with `X_0` the orthonormal-DFT DC coefficient
    (`sum(x) / sqrt(HW)` per channel), the log-likelihood differs between components by
    `-|X_0 - a sqrt(HW) mu_k|^2 / (2 (a^2 lam_0 + s^2))`.
    """
    h, w = params["lam"].shape
    n = h * w
    dc = jnp.sum(x_t, axis=(1, 2)) / jnp.sqrt(n)  # [B, C]
    var0 = a**2 * params["lam"][0, 0] + s**2  # [B]
    diff = dc[:, None, :] - (a[:, None, None] * jnp.sqrt(n)) * params["mu"][None]  # [B, K, C]
    loglik = -0.5 * jnp.sum(diff**2, axis=-1) / var0[:, None]
    logits = loglik + params["log_pi"][None] + jnp.log(jnp.maximum(emb, 1e-30))
    return jax.nn.softmax(logits, axis=-1)


def posterior_mean(params: dict, x_t: jax.Array, t: jax.Array, emb: jax.Array,
                   alphas_cumprod: jax.Array) -> jax.Array:
    """Exact `E[x | x_t, y] = mu_bar + F^H [a lam / (a^2 lam + s^2)] F (x_t - a mu_bar)` with
    `mu_bar = sum_k r_k mu_k` (the filter is linear, so the mixture mean collapses)."""
    a, s = schedule.alpha_sigma(alphas_cumprod, t)
    r = responsibilities(params, x_t, a, s, emb)
    mu_bar = (r @ params["mu"])[:, None, None, :]  # [B, 1, 1, C]
    g_post, _ = _gains(params["lam"], a, s)
    return mu_bar + fourier_filter(x_t - schedule.bcast(a, x_t) * mu_bar, g_post)


def eps_fn(params: dict, x_t: jax.Array, t: jax.Array, emb: jax.Array,
           alphas_cumprod: jax.Array) -> jax.Array:
    """Exact noise prediction `eps(x_t) = (x_t - a_t E[x | x_t]) / s_t`."""
    a, s = schedule.alpha_sigma(alphas_cumprod, t)
    x0 = posterior_mean(params, x_t, t, emb, alphas_cumprod)
    return (x_t - schedule.bcast(a, x_t) * x0) / schedule.bcast(s, x_t)


def bias_fn(params: dict, x: jax.Array, t: jax.Array, emb: jax.Array,
            alphas_cumprod: jax.Array) -> jax.Array:
    """Exact deficiency `b(x, t) = E_eps[x_hat] = mu + F^H [a^2 lam/(a^2 lam + s^2)] F (x - mu)`.

    `mu` is the prompt's class mean (exact for one component or a one-hot prompt; for an
    unconditional mixture the prior-weighted mean colour, an approximation).
    """
    a, s = schedule.alpha_sigma(alphas_cumprod, t)
    wts = jnp.maximum(emb, 0.0) * jnp.exp(params["log_pi"])[None]
    mu = ((wts / jnp.sum(wts, axis=-1, keepdims=True)) @ params["mu"])[:, None, None, :]
    _, g_def = _gains(params["lam"], a, s)
    return mu + fourier_filter(x - mu, g_def)


def sample(params: dict, key: jax.Array, n: int, labels: jax.Array | None = None) -> jax.Array:
    """Draws `n` images from the prior: `x = mu_k + F^H sqrt(lam) F z`, z ~ N(0, I).

    `labels` [n] picks the component of each sample; None draws them from `pi`.
    """
    h, w = params["lam"].shape
    c = params["mu"].shape[-1]
    k_lab, k_z = jax.random.split(key)
    if labels is None:
        labels = jax.random.categorical(k_lab, params["log_pi"], shape=(n,))
    z = jax.random.normal(k_z, (n, h, w, c))
    return params["mu"][labels][:, None, None, :] + fourier_filter(z, jnp.sqrt(params["lam"]))


def gaussian_prior(
    resolution: int = 32,
    channels: int = 3,
    variance: float = 0.25,
    classes: dict[str, Sequence[float]] | None = None,
    alphas_cumprod: np.ndarray | None = None,
) -> Prior:
    """Builds the exact prior. `classes=None` gives one zero-mean Gaussian (any prompt is
    accepted and ignored); otherwise a mixture with one constant-colour mean per named class
    and uniform weights."""
    if alphas_cumprod is None:
        alphas_cumprod = schedule.scaled_linear_alphas_cumprod()
    ac = jnp.asarray(alphas_cumprod, jnp.float32)
    names = list(classes) if classes else []
    mu = np.array([classes[k] for k in names], np.float32) if classes else np.zeros((1, channels),
                                                                                   np.float32)
    if mu.shape[-1] != channels:
        raise UserError(f"class means have {mu.shape[-1]} channels but channels={channels}")
    k = mu.shape[0]
    params = {
        "mu": jnp.asarray(mu),
        "log_pi": jnp.full((k,), -np.log(k), jnp.float32),
        "lam": jnp.asarray(power_spectrum(resolution, resolution, variance)),
    }

    def embed(prompts: Sequence[str]) -> jax.Array:
        return jnp.asarray(np.stack([_prompt_mask(p, names) for p in prompts]))

    return Prior(
        params=params,
        alphas_cumprod=ac,
        eps_fn=_with_schedule(eps_fn, ac),
        embed_fn=embed,
        bias_fn=_with_schedule(bias_fn, ac),
        x_shape=(resolution, resolution, channels),
        image_shape=(resolution, resolution, channels),
        kind="pixel",
        name=f"gaussian{'-mixture' if names else ''}-{resolution}",
    )


def _with_schedule(fn: Callable, alphas_cumprod: jax.Array) -> Callable:
    """Adapts `fn(params, x, t, emb, alphas_cumprod)` to the Prior signature.

    The schedule is a module-level constant for the exact prior; it is passed again in the
    Prior's `alphas_cumprod` leaf, which is what guidance code reads.
    """
    ac = np.asarray(alphas_cumprod)

    def wrapped(params, x, t, emb):
        return fn(params, x, t, emb, jnp.asarray(ac))

    wrapped.__name__ = fn.__name__
    return wrapped


def _prompt_mask(prompt: str, names: list[str]) -> np.ndarray:
    """[K] mask: all ones for "" (unconditional) or a single Gaussian; one-hot for a class."""
    if not names:
        return np.ones((1,), np.float32)
    words = prompt.lower().replace(",", " ").split()
    if not words:
        return np.ones((len(names),), np.float32)
    hits = [i for i, n in enumerate(names) if n in words]
    if len(hits) != 1:
        raise UserError(
            f"prompt {prompt!r} must name exactly one class of the Gaussian mixture prior; "
            f"its classes are {names}"
        )
    mask = np.zeros((len(names),), np.float32)
    mask[hits[0]] = 1.0
    return mask
