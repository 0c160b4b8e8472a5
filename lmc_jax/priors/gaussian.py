"""The exact Gaussian (mixture) prior of the analytic testbed (docs/design.md section 4).

Data: a mixture of K stationary Gaussians that share one covariance,
`x ~ sum_k pi_k N(mu_k, S)`. Each mean `mu_k` is a constant colour ([K, C] in `params["mu"]`)
or an image ([K, H, W, C]: the textured "patterns" classes). `S` is circulant over (H, W),
independent across channels, with eigenvalues `lam(f)` on the 2-D DFT grid (`f` = radial
frequency in cycles per image). With the orthonormal DFT `F`, `S = F^H diag(lam) F`, so every
filter below is a pointwise product in Fourier space.

With one component (K = 1) this is the plain Gaussian of the analytic testbed. The equations
(a = a_t, s = s_t):

- Posterior mean of one component (Wiener filter):
  `E_k[x | x_t] = mu_k + F^H [a lam / (a^2 lam + s^2)] F (x_t - a mu_k)`.
- Mixture responsibilities: `r_k ∝ pi_k N(x_t; a mu_k, a^2 S + s^2 I)`.
- Posterior mean: `E[x | x_t] = sum_k r_k E_k[x | x_t]`; noise prediction
  `eps(x_t) = (x_t - a E[x | x_t]) / s` (exact). `x_hat` from the exact `eps` IS `E[x | x_t]`.
- Deficiency of one component: `b_k(x, t) = E_eps[x_hat] = mu_k + G_t (x - mu_k)` with the
  low-pass `G_t = F^H [a^2 lam / (a^2 lam + s^2)] F`; exact for K = 1 and a one-hot prompt.
- The mixture's own deficiency `b_post(x, t) = E_eps[E[x | a x + s eps]]` has no closed form:
  `posterior_bias_fn` estimates it by Monte Carlo (antithetic pairs, differentiable).
- The best *linear* deficiency model (`linear_bias_fn`): the Wiener filter of the single
  Gaussian with the mixture's mean `m` and covariance `C = S + sum_k pi_k (mu_k - m)(mu_k - m)^T`,
  `b_lin(x, t) = m + a^2 C (a^2 C + s^2 I)^-1 (x - m)` -- the role of an ideal *shallow* b_psi
  that has learned the content-independent blur but not the pull toward the components.

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


def class_means(params: dict) -> jax.Array:
    """The component means as images, [K, H, W, C] (or [K, 1, 1, C] for constant colours)."""
    mu = params["mu"]
    return mu[:, None, None, :] if mu.ndim == 2 else mu


def mean_images(params: dict) -> jax.Array:
    """The component means as full images, [K, H, W, C] (constant colours broadcast)."""
    mu = params["mu"]
    h, w = params["lam"].shape
    return jnp.broadcast_to(class_means(params), (mu.shape[0], h, w, mu.shape[-1]))


def _class_weights(params: dict, emb: jax.Array) -> jax.Array:
    """Prompt-restricted mixture weights `emb_k pi_k / sum_j emb_j pi_j`, [B, K]."""
    wts = jnp.maximum(emb, 0.0) * jnp.exp(params["log_pi"])[None]
    return wts / jnp.sum(wts, axis=-1, keepdims=True)


def _mix(weights: jax.Array, means: jax.Array) -> jax.Array:
    """`sum_k weights[b, k] means[k]`, [B, H|1, W|1, C]."""
    return jnp.einsum("bk,khwc->bhwc", weights, means)


def responsibilities(params: dict, x_t: jax.Array, a: jax.Array, s: jax.Array,
                     emb: jax.Array) -> jax.Array:
    """Posterior class probabilities `r_k ∝ emb_k pi_k N(x_t; a mu_k, a^2 S + s^2 I)`, [B, K].

    The components share `S`, so in the orthonormal DFT basis (`X = F x_t`, `M_k = F mu_k`,
    `v(f) = a^2 lam(f) + s^2`) the log-likelihoods differ only by
    `sum_f [a Re(X conj(M_k)) - a^2 |M_k|^2 / 2] / v(f)` (the `|X|^2` term is shared).
    For constant-colour means only the DC coefficient contributes.
    """
    mu = mean_images(params)
    xf = jnp.fft.fft2(x_t, axes=(1, 2), norm="ortho")  # [B, H, W, C]
    mf = jnp.fft.fft2(mu, axes=(1, 2), norm="ortho")  # [K, H, W, C]
    inv_v = 1.0 / (a[:, None, None] ** 2 * params["lam"] + s[:, None, None] ** 2)  # [B, H, W]
    cross = jnp.einsum("bhwc,khwc,bhw->bk", xf.real, mf.real, inv_v) + jnp.einsum(
        "bhwc,khwc,bhw->bk", xf.imag, mf.imag, inv_v)
    energy = jnp.einsum("khwc,bhw->bk", jnp.abs(mf) ** 2, inv_v)
    loglik = a[:, None] * cross - 0.5 * a[:, None] ** 2 * energy
    logits = loglik + params["log_pi"][None] + jnp.log(jnp.maximum(emb, 1e-30))
    return jax.nn.softmax(logits, axis=-1)


def posterior_mean(params: dict, x_t: jax.Array, t: jax.Array, emb: jax.Array,
                   alphas_cumprod: jax.Array) -> jax.Array:
    """Exact `E[x | x_t, y] = mu_bar + F^H [a lam / (a^2 lam + s^2)] F (x_t - a mu_bar)` with
    `mu_bar = sum_k r_k mu_k` (the filter is linear, so the mixture mean collapses)."""
    a, s = schedule.alpha_sigma(alphas_cumprod, t)
    r = responsibilities(params, x_t, a, s, emb)
    mu_bar = _mix(r, class_means(params))  # [B, H|1, W|1, C]
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
    mu = _mix(_class_weights(params, emb), class_means(params))
    _, g_def = _gains(params["lam"], a, s)
    return mu + fourier_filter(x - mu, g_def)


def linear_bias_fn(params: dict, x: jax.Array, t: jax.Array, emb: jax.Array,
                   alphas_cumprod: jax.Array) -> jax.Array:
    """The best linear deficiency `b_lin(x, t) = m + a^2 C (a^2 C + s^2 I)^-1 (x - m)`.

    `m` and `C` are the mean and covariance of the mixture restricted to the prompt's classes:
    with weights `w_k` (`_class_weights`) and `U = [sqrt(w_k) (mu_k - m)]`, `C = S + U U^T`.
    Since `a^2 C (a^2 C + s^2 I)^-1 = I - s^2 (a^2 C + s^2 I)^-1`, and `A = a^2 S + s^2 I` is
    diagonal in Fourier space, Woodbury gives
    `(A + a^2 U U^T)^-1 r = A^-1 r - A^-1 U (I / a^2 + U^T A^-1 U)^-1 U^T A^-1 r`
    (a K x K solve per sample). For one component (or a one-hot prompt) `U = 0` and this is
    `bias_fn`.
    """
    a, s = schedule.alpha_sigma(alphas_cumprod, t)
    wts = _class_weights(params, emb)  # [B, K]
    means = mean_images(params)
    m = _mix(wts, means)  # [B, H, W, C]
    u = jnp.sqrt(wts)[:, :, None, None, None] * (means[None] - m[:, None])  # [B, K, H, W, C]
    inv_a = 1.0 / (a[:, None, None] ** 2 * params["lam"] + s[:, None, None] ** 2)  # [B, H, W]
    ar = fourier_filter(x - m, inv_a)
    au = fourier_filter(u, inv_a[:, None])
    k = wts.shape[1]
    gram = (jnp.eye(k)[None] / a[:, None, None] ** 2
            + jnp.einsum("bkhwc,bjhwc->bkj", u, au))
    coef = jnp.linalg.solve(gram, jnp.einsum("bkhwc,bhwc->bk", u, ar)[..., None])[..., 0]
    y = ar - jnp.einsum("bk,bkhwc->bhwc", coef, au)
    return x - schedule.bcast(s**2, x) * y


def posterior_bias_fn(params: dict, x: jax.Array, t: jax.Array, emb: jax.Array,
                      alphas_cumprod: jax.Array, num_pairs: int = 16, seed: int = 0
                      ) -> jax.Array:
    """The mixture's own deficiency `b_post(x, t) = E_eps[E[x | a x + s eps, y]]`.

    A Monte Carlo mean over `num_pairs` antithetic pairs `(eps, -eps)` drawn from a fixed key
    (so `b_post` is a deterministic, differentiable function of `x`); the guidance noise is
    drawn independently of it. With this `b`, `E[grad L_lmc] = W (a/s) J^T (b_post - E[x_hat])`
    is zero up to the Monte Carlo error: LMC-SDS becomes CSD plus zero-mean noise.
    """
    a, s = schedule.alpha_sigma(alphas_cumprod, t)
    eps = jax.random.normal(jax.random.PRNGKey(seed), (num_pairs, *x.shape), x.dtype)
    eps = jnp.concatenate([eps, -eps])  # [2P, B, H, W, C]
    n = eps.shape[0]
    x_t = schedule.bcast(a, x)[None] * x[None] + schedule.bcast(s, x)[None] * eps
    x0 = posterior_mean(params, jnp.reshape(x_t, (-1, *x.shape[1:])), jnp.tile(t, n),
                        jnp.tile(emb, (n, 1)), alphas_cumprod)
    return jnp.mean(jnp.reshape(x0, eps.shape), axis=0)


def log_density(params: dict, x: jax.Array, emb: jax.Array | None = None) -> jax.Array:
    """Exact `log p(x) = log sum_k w_k N(x; mu_k, S)` per image, [B] (nats; `emb` restricts
    the classes, None = all). In Fourier space `N(x; mu, S)` has density
    `prod_f N(X_f - M_f; 0, lam_f)` over the real coefficients (the DFT is orthonormal)."""
    k = params["log_pi"].shape[0]
    emb = jnp.ones((x.shape[0], k)) if emb is None else emb
    lam = params["lam"]
    c = x.shape[-1]
    means = mean_images(params)
    diff = x[:, None] - means[None]  # [B, K, H, W, C]
    df = jnp.fft.fft2(diff, axes=(2, 3), norm="ortho")
    maha = jnp.sum(jnp.abs(df) ** 2 / lam[None, None, :, :, None], axis=(2, 3, 4))
    log_norm = -0.5 * c * jnp.sum(jnp.log(2 * jnp.pi * lam))
    logw = jnp.log(jnp.maximum(_class_weights(params, emb), 1e-30))
    return jax.nn.logsumexp(logw - 0.5 * maha + log_norm, axis=-1)


def pattern_classes(resolution: int = 32) -> dict[str, np.ndarray]:
    """Six textured class means, [H, W, 3] in [-1, 1]: sharp patterns with most of their energy
    above 4 cycles per image (what a blur destroys), each in its own colour pair.

    stripes (horizontal, period 4 px), bars (vertical, period 8), checker (4 px cells),
    dots (radius-2 dots on an 8 px grid), rings (concentric, period 6), diagonal (period 6).
    """
    n = resolution
    yy, xx = np.meshgrid(np.arange(n), np.arange(n), indexing="ij")
    r = np.hypot(yy - (n - 1) / 2, xx - (n - 1) / 2)
    masks = {
        "stripes": (yy // 2) % 2 == 0,
        "bars": (xx // 4) % 2 == 0,
        "checker": ((yy // 4) + (xx // 4)) % 2 == 0,
        "dots": np.hypot(yy % 8 - 3.5, xx % 8 - 3.5) < 2.0,
        "rings": (r // 3) % 2 == 0,
        "diagonal": ((yy + xx) // 3) % 2 == 0,
    }
    colours = {  # (foreground, background) RGB in [-1, 1]
        "stripes": ((0.7, -0.5, -0.5), (-0.3, -0.3, -0.3)),
        "bars": ((-0.5, 0.7, -0.5), (0.2, 0.2, 0.2)),
        "checker": ((-0.5, -0.5, 0.7), (0.5, 0.5, 0.5)),
        "dots": ((0.7, 0.7, -0.6), (-0.6, -0.6, 0.0)),
        "rings": ((0.6, -0.6, 0.6), (-0.2, 0.3, -0.2)),
        "diagonal": ((-0.6, 0.6, 0.6), (0.4, -0.4, -0.2)),
    }
    out = {}
    for name, mask in masks.items():
        fg, bg = (np.asarray(v, np.float32) for v in colours[name])
        out[name] = np.where(mask[..., None], fg, bg).astype(np.float32)
    return out


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
    return class_means(params)[labels] + fourier_filter(z, jnp.sqrt(params["lam"]))


def gaussian_prior(
    resolution: int = 32,
    channels: int = 3,
    variance: float = 0.25,
    classes: dict[str, Sequence[float] | np.ndarray] | None = None,
    alphas_cumprod: np.ndarray | None = None,
) -> Prior:
    """Builds the exact prior. `classes=None` gives one zero-mean Gaussian (any prompt is
    accepted and ignored); otherwise a mixture with uniform weights and one mean per named
    class: a constant colour ([C]) or an image ([H, W, C], e.g. `pattern_classes`)."""
    if alphas_cumprod is None:
        alphas_cumprod = schedule.scaled_linear_alphas_cumprod()
    ac = jnp.asarray(alphas_cumprod, jnp.float32)
    names = list(classes) if classes else []
    mu = np.array([classes[k] for k in names], np.float32) if classes else np.zeros((1, channels),
                                                                                   np.float32)
    if mu.shape[-1] != channels:
        raise UserError(f"class means have {mu.shape[-1]} channels but channels={channels}")
    if mu.ndim == 4 and mu.shape[1:3] != (resolution, resolution):
        raise UserError(f"class mean images are {mu.shape[1]}x{mu.shape[2]} but "
                        f"resolution={resolution}")
    k = mu.shape[0]
    kind = "patterns" if mu.ndim == 4 else "mixture"
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
        name=f"gaussian{'-' + kind if names else ''}-{resolution}",
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
