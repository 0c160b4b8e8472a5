"""benchmarks/bias_loss.py: its error estimates are zero for the right answer and measure
a known offset, with the Monte-Carlo estimate's own variance taken out."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _bench import load_benchmark

from lmc_jax.priors import gaussian


@pytest.fixture(scope="module")
def bench():
    return load_benchmark("bias_loss")


@pytest.fixture(scope="module")
def prior():
    return gaussian.gaussian_prior(resolution=8)


def test_gaussian_error_is_zero_for_the_closed_form_and_grows_with_an_offset(bench, prior):
    exact = bench.gaussian_error(prior.exact_bias, prior)
    assert set(exact) == set(bench.TS) and max(exact.values()) < 1e-5
    off = bench.gaussian_error(lambda x, t, e: prior.exact_bias(x, t, e) + 0.1, prior)
    assert min(off.values()) > 0.01


def test_monte_carlo_reference_is_exact_for_the_linear_denoiser(bench, prior):
    """x_hat is affine in eps for the Gaussian prior: every antithetic pair is the closed form,
    so the estimate is exact and its variance zero."""
    x = gaussian.sample(prior.params, jax.random.PRNGKey(3), 4)
    emb = prior.embed_text([""] * 4)
    ref = bench.mc_reference(prior, x, emb, pairs=2, centre=jnp.zeros(x.shape[1:]))
    for t in bench.TS:
        exact = prior.exact_bias(x, jnp.full((4,), t, jnp.int32), emb)
        np.testing.assert_allclose(ref[t]["mean"], exact, atol=2e-5)
        assert float(jnp.max(ref[t]["var_of_mean"])) < 1e-8
    err = bench.embedded_error(prior.exact_bias, ref)
    assert max(err.values()) < 1e-3


def test_embedded_error_takes_the_estimates_variance_out(bench):
    """||b - mean||^2 = 25 with var_of_mean 9 is an error of 4 (over ref 8: 0.5); a b that
    matches the noisy mean exactly reads 0, not negative."""
    n, shape = 2, (2, 2, 1)
    mean = jnp.zeros((n, *shape))
    reference = {"x": jnp.zeros((n, *shape)), "emb": jnp.zeros((n, 1))}
    for t in bench.TS:
        reference[t] = {"mean": mean, "var_of_mean": jnp.full((n,), 9.0),
                        "ref": jnp.full((n,), 8.0)}
    five = jnp.zeros((n, *shape)).at[:, 0, 0, 0].set(5.0)
    err = bench.embedded_error(lambda x, t, e: five, reference)
    assert all(abs(v - 0.5) < 1e-6 for v in err.values())
    assert all(v == 0.0 for v in bench.embedded_error(lambda x, t, e: mean, reference).values())
