"""The exact Gaussian prior against dense, independent computations."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lmc_jax import schedule
from lmc_jax.errors import UserError
from lmc_jax.priors import gaussian


def dense_covariance(lam: np.ndarray) -> np.ndarray:
    """Pixel-space covariance of a stationary field, summed term by term (no FFT):
    `S[p, q] = (1/N) sum_k lam_k cos(2 pi k . (p - q) / n)`."""
    h, w = lam.shape
    ky, kx = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
    py, px = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
    py, px = py.ravel(), px.ravel()
    dy = py[:, None] - py[None, :]
    dx = px[:, None] - px[None, :]
    s = np.zeros((h * w, h * w))
    for k_y, k_x, l_k in zip(ky.ravel(), kx.ravel(), lam.ravel(), strict=True):
        s += l_k * np.cos(2 * np.pi * (k_y * dy / h + k_x * dx / w))
    return s / (h * w)


def dense_posterior_mean(x_t, a, s, mus, log_pi, cov):
    """E[x | x_t] for a Gaussian mixture with shared covariance, by dense linear algebra."""
    n = cov.shape[0]
    c_t = a**2 * cov + s**2 * np.eye(n)
    c_inv = np.linalg.inv(c_t)
    logliks, means = [], []
    for mu in mus:
        d = x_t - a * mu
        logliks.append(-0.5 * d @ c_inv @ d)
        means.append(mu + a * cov @ c_inv @ d)
    logits = np.array(logliks) + log_pi
    r = np.exp(logits - logits.max())
    r /= r.sum()
    return sum(ri * m for ri, m in zip(r, means, strict=True))


@pytest.mark.parametrize("classes", [None, {"dark": (-0.3,), "light": (0.5,)}])
def test_eps_matches_dense_posterior(classes):
    res = 6
    prior = gaussian.gaussian_prior(resolution=res, channels=1, classes=classes)
    lam = np.asarray(prior.params["lam"], np.float64)
    cov = dense_covariance(lam)
    np.testing.assert_allclose(np.diag(cov).mean(), 0.25, rtol=1e-6)
    rng = np.random.default_rng(0)
    emb = prior.embed_text([""])
    mus = np.asarray(prior.params["mu"], np.float64)[:, 0]
    log_pi = np.asarray(prior.params["log_pi"], np.float64)
    for t in [30, 400, 900]:
        a, s = (float(v[0]) for v in schedule.alpha_sigma(prior.alphas_cumprod, jnp.array([t])))
        x_t = rng.normal(size=(res * res,)) * 0.8 + 0.2
        want_x0 = dense_posterior_mean(x_t, a, s, [np.full(res * res, m) for m in mus], log_pi,
                                       cov)
        want_eps = (x_t - a * want_x0) / s
        got = prior.eps(jnp.asarray(x_t.reshape(1, res, res, 1), jnp.float32),
                        jnp.array([t]), emb)
        np.testing.assert_allclose(np.asarray(got).ravel(), want_eps, atol=2e-4, rtol=1e-3)


def test_conditional_prompt_selects_component():
    prior = gaussian.gaussian_prior(resolution=8, classes=gaussian.DEFAULT_CLASSES)
    emb = prior.embed_text(["a red thing", "blue", ""])
    np.testing.assert_array_equal(np.asarray(emb), [[1, 0, 0, 0], [0, 0, 1, 0], [1, 1, 1, 1]])
    with pytest.raises(UserError, match="classes"):
        prior.embed_text(["purple"])
    # At large t with a one-hot prompt, E[x|x_t] is close to that class mean.
    x_t = jnp.zeros((1, 8, 8, 3))
    x0 = gaussian.posterior_mean(prior.params, x_t, jnp.array([999]), emb[1:2],
                                 prior.alphas_cumprod)
    np.testing.assert_allclose(np.asarray(x0).mean(axis=(0, 1, 2)),
                               gaussian.DEFAULT_CLASSES["blue"], atol=1e-2)


def test_deficiency_is_monte_carlo_mean_of_x_hat():
    prior = gaussian.gaussian_prior(resolution=8, channels=3)
    key = jax.random.PRNGKey(0)
    x = gaussian.sample(prior.params, key, 1)
    emb = prior.embed_text([""])
    n = 4096
    for t in [100, 600]:
        tt = jnp.full((n,), t)
        a, s = schedule.alpha_sigma(prior.alphas_cumprod, tt)
        eps = jax.random.normal(jax.random.fold_in(key, t), (n, 8, 8, 3))
        x_t = schedule.add_noise(jnp.broadcast_to(x, (n, 8, 8, 3)), eps, a, s)
        e = prior.eps(x_t, tt, jnp.broadcast_to(emb, (n, 1)))
        xh = (x_t - schedule.bcast(s, x_t) * e) / schedule.bcast(a, x_t)
        mc_mean = np.asarray(xh.mean(0))
        mc_err = np.asarray(xh.std(0)) / np.sqrt(n)
        b = np.asarray(prior.exact_bias(x, jnp.array([t]), emb)[0])
        z = np.abs(mc_mean - b) / mc_err
        assert np.max(z) < 5.0, f"t={t}: max z-score {np.max(z)}"
        # b is not the identity: the deficiency is real (a low-pass filter).
        assert np.abs(b - np.asarray(x[0])).max() > 10 * mc_err.max()


def test_samples_have_configured_variance_and_spectrum():
    prior = gaussian.gaussian_prior(resolution=16, channels=3, variance=0.25)
    x = np.asarray(gaussian.sample(prior.params, jax.random.PRNGKey(1), 2000))
    np.testing.assert_allclose(x.var(), 0.25, rtol=0.05)
    power = (np.abs(np.fft.fft2(x, axes=(1, 2), norm="ortho")) ** 2).mean(axis=(0, 3))
    np.testing.assert_allclose(power, np.asarray(prior.params["lam"]), rtol=0.15)


def test_prior_is_a_jit_argument():
    prior = gaussian.gaussian_prior(resolution=8)
    f = jax.jit(lambda p, x, t, e: p.eps(x, t, e))
    x = jnp.ones((2, 8, 8, 3))
    out = f(prior, x, jnp.array([5, 500]), prior.embed_text(["", ""]))
    np.testing.assert_allclose(out, prior.eps(x, jnp.array([5, 500]), prior.embed_text(["", ""])),
                               rtol=1e-5, atol=1e-6)


def test_wrong_shape_is_a_clear_error():
    prior = gaussian.gaussian_prior(resolution=8)
    with pytest.raises(UserError, match=r"\[batch, 8, 8, 3\]"):
        prior.check_x(jnp.zeros((1, 16, 16, 3)))


def _random_pattern_prior(res: int = 6, k: int = 3, variance: float = 0.05):
    rng = np.random.default_rng(11)
    classes = {f"c{i}": rng.uniform(-0.8, 0.8, size=(res, res, 1)).astype(np.float32)
               for i in range(k)}
    return gaussian.gaussian_prior(resolution=res, channels=1, variance=variance,
                                   classes=classes), classes


def test_pattern_mixture_posterior_matches_dense():
    res = 6
    prior, classes = _random_pattern_prior(res)
    cov = dense_covariance(np.asarray(prior.params["lam"], np.float64))
    mus = [np.asarray(m, np.float64).ravel() for m in classes.values()]
    log_pi = np.asarray(prior.params["log_pi"], np.float64)
    rng = np.random.default_rng(1)
    for t in [30, 400, 900]:
        a, s = (float(v[0]) for v in schedule.alpha_sigma(prior.alphas_cumprod, jnp.array([t])))
        # Near a blend of two components, where responsibilities are far from one-hot.
        x_t = a * (0.5 * mus[0] + 0.5 * mus[1]) + s * rng.normal(size=res * res)
        want = dense_posterior_mean(x_t, a, s, mus, log_pi, cov)
        got = gaussian.posterior_mean(prior.params, jnp.asarray(x_t.reshape(1, res, res, 1),
                                                                jnp.float32),
                                      jnp.array([t]), prior.embed_text([""]),
                                      prior.alphas_cumprod)
        np.testing.assert_allclose(np.asarray(got).ravel(), want, atol=2e-4)


def test_linear_bias_is_wiener_filter_of_moment_matched_gaussian():
    res = 6
    prior, classes = _random_pattern_prior(res)
    cov_s = dense_covariance(np.asarray(prior.params["lam"], np.float64))
    mus = np.stack([np.asarray(m, np.float64).ravel() for m in classes.values()])
    m = mus.mean(0)
    cov = cov_s + (mus - m).T @ (mus - m) / len(mus)  # mixture covariance (uniform weights)
    x = np.random.default_rng(2).normal(size=res * res) * 0.5
    for t in [50, 500, 950]:
        a, s = (float(v[0]) for v in schedule.alpha_sigma(prior.alphas_cumprod, jnp.array([t])))
        want = m + a**2 * cov @ np.linalg.solve(a**2 * cov + s**2 * np.eye(res * res), x - m)
        got = gaussian.linear_bias_fn(prior.params, jnp.asarray(x.reshape(1, res, res, 1),
                                                                jnp.float32),
                                      jnp.array([t]), prior.embed_text([""]),
                                      prior.alphas_cumprod)
        np.testing.assert_allclose(np.asarray(got).ravel(), want, atol=2e-4)
    # A one-hot prompt leaves one component: b_lin is that component's exact deficiency.
    emb = prior.embed_text(["c1"])
    xj = jnp.asarray(x.reshape(1, res, res, 1), jnp.float32)
    np.testing.assert_allclose(
        gaussian.linear_bias_fn(prior.params, xj, jnp.array([500]), emb, prior.alphas_cumprod),
        prior.exact_bias(xj, jnp.array([500]), emb), atol=1e-5)


def test_log_density_matches_dense_gaussian_mixture():
    res = 6
    prior, classes = _random_pattern_prior(res)
    cov = dense_covariance(np.asarray(prior.params["lam"], np.float64))
    mus = [np.asarray(m, np.float64).ravel() for m in classes.values()]
    x = mus[0] + np.random.default_rng(3).normal(size=res * res) * 0.1
    _, logdet = np.linalg.slogdet(2 * np.pi * cov)
    inv = np.linalg.inv(cov)
    comps = [-0.5 * (x - mu) @ inv @ (x - mu) - 0.5 * logdet - np.log(len(mus)) for mu in mus]
    want = np.logaddexp.reduce(comps)
    got = gaussian.log_density(prior.params, jnp.asarray(x.reshape(1, res, res, 1), jnp.float32))
    np.testing.assert_allclose(float(got[0]), want, rtol=1e-4)


def test_posterior_bias_is_the_mean_of_x_hat():
    """b_post (a fixed-key Monte Carlo mean) against an independent, larger Monte Carlo mean of
    the exact x_hat; and it is not the linear model (the mixture is not Gaussian)."""
    res = 6
    prior, classes = _random_pattern_prior(res)
    mus = list(classes.values())
    x = jnp.asarray(0.5 * mus[0] + 0.5 * mus[2])[None]
    emb = prior.embed_text([""])
    t = jnp.array([600])
    pairs = 256
    b = gaussian.posterior_bias_fn(prior.params, x, t, emb, prior.alphas_cumprod,
                                   num_pairs=pairs)
    n = 4096
    a, s = schedule.alpha_sigma(prior.alphas_cumprod, jnp.full((n,), 600))
    eps = jax.random.normal(jax.random.PRNGKey(99), (n, res, res, 1))
    xh = gaussian.posterior_mean(prior.params, schedule.add_noise(
        jnp.broadcast_to(x, eps.shape), eps, a, s), jnp.full((n,), 600),
        jnp.broadcast_to(emb, (n, emb.shape[1])), prior.alphas_cumprod)
    # Both means carry Monte Carlo error (b's antithetic pairs have no more than 2 * pairs'
    # independent draws' variance).
    err = np.asarray(xh.std(0)) * np.sqrt(1 / n + 1 / (2 * pairs))
    assert np.max(np.abs(np.asarray(b[0]) - np.asarray(xh.mean(0))) / err) < 5.0
    # At a component's mean and a small t the mixture's b keeps the pattern; the linear model
    # (moment-matched single Gaussian) shrinks it toward the mixture mean.
    x0, t0 = jnp.asarray(mus[0])[None], jnp.array([200])
    post = gaussian.posterior_bias_fn(prior.params, x0, t0, emb, prior.alphas_cumprod)
    lin = gaussian.linear_bias_fn(prior.params, x0, t0, emb, prior.alphas_cumprod)
    assert float(jnp.abs(lin - post).max()) > 0.05
    assert float(jnp.sum((post - x0) ** 2)) < float(jnp.sum((lin - x0) ** 2))
