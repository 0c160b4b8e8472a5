"""benchmarks/ablation.py's metrics against closed forms: high-frequency energy of sinusoids,
the exact Gaussian prior's denoising loss, the Frechet distance, the evaluator's features."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
from _bench import load_benchmark

from lmc_jax.priors import gaussian


@pytest.fixture(scope="module")
def bench():
    return load_benchmark("ablation")


def _wave(n: int, ky: int, kx: int, amplitude: float) -> np.ndarray:
    y, x = np.meshgrid(np.arange(n), np.arange(n), indexing="ij")
    return amplitude * np.cos(2 * np.pi * (ky * y + kx * x) / n + 0.3)


@pytest.mark.parametrize("ky, kx, above", [(6, 0, True), (0, 3, False), (3, 3, True),
                                           (2, 2, False), (0, 15, True)])
def test_hf_energy_of_a_sinusoid_is_half_its_squared_amplitude_above_the_cutoff(
        bench, ky, kx, above):
    n, amp = 32, 0.7
    image = np.full((1, n, n, 3), 0.2)  # a constant offset: removed with the mean
    image[0, :, :, 1] += _wave(n, ky, kx, amp)
    expected = amp**2 / 2 if above else 0.0  # |f| = hypot(ky, kx) against 4 cycles per image
    np.testing.assert_allclose(bench.hf_energy(image, cutoff=4.0), [expected], atol=1e-9)


def test_hf_energy_of_white_noise_is_its_variance_times_the_share_above_the_cutoff(bench):
    rng = np.random.default_rng(0)
    images = rng.normal(0.0, 0.5, (64, 32, 32, 3))
    share = np.mean(gaussian.radial_frequency(32, 32) > 4.0)
    np.testing.assert_allclose(bench.hf_energy(images).mean(), 3 * 0.25 * share, rtol=0.02)


def _alpha_sigma(prior, t: int) -> tuple[float, float]:
    abar = float(np.asarray(prior.alphas_cumprod)[t])
    return abar**0.5, (1.0 - abar) ** 0.5


def _samples(prior, rng: np.random.Generator, n: int) -> np.ndarray:
    """Draws of the zero-mean Gaussian prior, `F^H sqrt(lam) F z` (gaussian.sample in numpy)."""
    lam = np.asarray(prior.params["lam"], np.float64)
    z = np.fft.fft2(rng.normal(size=(n, *prior.x_shape)), axes=(1, 2), norm="ortho")
    return np.fft.ifft2(z * np.sqrt(lam)[None, :, :, None], axes=(1, 2), norm="ortho").real


def _closed_form_loss(prior, x: np.ndarray, t: int) -> np.ndarray:
    """Exact `E_eps mean_pix (eps_hat - eps)^2` for a fixed x under the zero-mean Gaussian
    prior: with h = s^2 / (a^2 lam + s^2), `eps_hat - eps = (h a / s) X + (h - 1) Eps` per DFT
    coefficient, so the loss is `mean_{f, c} (h a / s)^2 |X_f|^2 + (1 - h)^2`."""
    a, s = _alpha_sigma(prior, t)
    lam = np.asarray(prior.params["lam"], np.float64)
    h = s**2 / (a**2 * lam + s**2)
    xf = np.fft.fft2(x, axes=(1, 2), norm="ortho")
    per = (h * a / s)[None, :, :, None] ** 2 * np.abs(xf) ** 2 + (1 - h)[None, :, :, None] ** 2
    return per.mean(axis=(1, 2, 3))


def test_denoising_loss_of_the_exact_gaussian_prior_matches_its_closed_form(bench):
    prior = gaussian.gaussian_prior(resolution=16, variance=0.25)
    rng = np.random.default_rng(0)
    n, k, ts = 4, 48, (100, 500, 900)
    samples = _samples(prior, rng, n)
    noise = rng.normal(0.0, 0.5, samples.shape)  # white, the prior's pixel variance
    emb = prior.embed_text([""] * n)
    eps = rng.normal(size=(len(ts), k, *samples.shape))
    got_s = bench.denoising_loss(prior, samples, emb, ts, eps)
    got_n = bench.denoising_loss(prior, noise, emb, ts, eps)
    for i, t in enumerate(ts):
        np.testing.assert_allclose(got_s[i], _closed_form_loss(prior, samples, t), rtol=0.03)
        np.testing.assert_allclose(got_n[i], _closed_form_loss(prior, noise, t), rtol=0.03)
    # Same pixel variance, but white noise puts its energy where the prior has little: off the
    # manifold, the loss (over the t grid, as the benchmark reports it) is higher.
    assert got_s.mean() < 0.8 * got_n.mean()
    # Averaged over the prior's samples the loss is mean_f a^2 lam / (a^2 lam + s^2).
    a, s = _alpha_sigma(prior, 500)
    lam = np.asarray(prior.params["lam"], np.float64)
    expected = np.mean(a**2 * lam / (a**2 * lam + s**2))
    many = _samples(prior, rng, 256)
    np.testing.assert_allclose(_closed_form_loss(prior, many, 500).mean(), expected, rtol=0.03)


def test_frechet_distance_closed_forms(bench):
    rng = np.random.default_rng(0)
    a = rng.normal(size=(200, 6)) @ rng.normal(size=(6, 6))
    shift = rng.normal(size=6)
    assert abs(bench.frechet_distance(a, a)) < 1e-6
    # Same covariance: the squared distance of the means.
    np.testing.assert_allclose(bench.frechet_distance(a, a + shift), np.sum(shift**2), rtol=1e-6)
    # b = 2 (a - mean): sqrt(C 4C) = 2C, so FD = |mean|^2 + tr(C + 4C - 4C) = |mean|^2 + tr(C).
    c = a - a.mean(0)
    expected = np.sum(a.mean(0) ** 2) + np.trace(np.cov(a, rowvar=False))
    np.testing.assert_allclose(bench.frechet_distance(a, 2 * c), expected, rtol=1e-6)


def test_evaluator_features_are_the_heads_input(bench):
    from lmc_jax.metrics import shapes_eval

    ev = shapes_eval.load_shipped_evaluator()
    images = np.random.default_rng(0).uniform(-1.0, 1.0, (3, 32, 32, 3)).astype(np.float32)
    feats = bench.evaluator_features(ev, images)
    shape_logits, colour_logits = bench._features(ev.module, ev.params,
                                                  jnp.asarray(images))[1][:2]
    for head, logits in (("shape_head", shape_logits), ("colour_head", colour_logits)):
        p = ev.params[head]
        np.testing.assert_allclose(feats @ np.asarray(p["kernel"]) + np.asarray(p["bias"]),
                                   np.asarray(logits), atol=1e-4)


def test_the_prompts_are_the_25_classes_in_order(bench):
    from lmc_jax.data import shapes
    from lmc_jax.metrics import shapes_eval

    prompts = bench.prompts_of_the_world()
    assert len(set(prompts)) == shapes.NUM_CLASSES == 25
    for k, p in enumerate(prompts):
        s, c = shapes_eval.parse_prompt(p)
        assert shapes.class_id(s, c) == k


def test_the_patterned_prompts_cover_every_shape_colour_and_pattern(bench):
    from lmc_jax.data import shapes
    from lmc_jax.metrics import shapes_eval

    prompts = bench.prompts_of_the_world(patterned=True)
    classes = bench.world_classes(True)
    patterns = classes // shapes.NUM_CLASSES
    for k, p in enumerate(prompts):
        s, c = shapes_eval.parse_prompt(p)
        assert shapes.class_id(s, c) == k == classes[k] % shapes.NUM_CLASSES
        assert shapes.PATTERNS[patterns[k]] in p.split() and patterns[k] > 0
        assert p in {t for t, *_ in shapes.world_captions(True)}
    s, c = shapes.class_of(np.arange(25))
    for attr in (s, c):  # a Latin square: every shape and every colour meets every pattern
        assert {(a, q) for a, q in zip(attr, patterns, strict=True)} == {
            (a, q) for a in range(5) for q in (1, 2, 3)}
