"""Training b_psi on the exact Gaussian prior; storing and reloading it."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from lmc_jax.bias import train
from lmc_jax.bias.model import BiasNet, bias_fn_from
from lmc_jax.bias.store import load_bias, save_bias
from lmc_jax.config import load_config
from lmc_jax.errors import UserError
from lmc_jax.priors import gaussian

RES = 16
TS = [50, 250, 450, 650, 850]


@pytest.fixture(scope="module")
def prior():
    return gaussian.gaussian_prior(resolution=RES)


def test_antithetic_target_is_exact_deficiency_for_a_linear_denoiser(prior):
    """For the Gaussian prior x_hat is affine in eps, so (x_hat(eps) + x_hat(-eps)) / 2 = b."""
    x = gaussian.sample(prior.params, jax.random.PRNGKey(0), 4)
    t = jnp.array([10, 300, 600, 990])
    eps = jax.random.normal(jax.random.PRNGKey(1), x.shape)
    emb = prior.embed_text([""] * 4)
    tgt = train.deficiency_target(prior, x, t, eps, emb, antithetic=True)
    np.testing.assert_allclose(tgt, prior.exact_bias(x, t, emb), atol=2e-5)
    plain = train.deficiency_target(prior, x, t, eps, emb, antithetic=False)
    assert float(jnp.abs(plain - tgt).max()) > 1e-3  # one-sided x_hat is noisy


@pytest.fixture(scope="module")
def trained(prior):
    module = BiasNet(features=16, padding="CIRCULAR", center=False)
    opt = optax.adam(optax.warmup_cosine_decay_schedule(0.0, 3e-3, 20, 200, 3e-5))
    emb1 = prior.embed_text([""])
    state = train.init_state(module, prior, opt, 0, emb1)
    untrained = state.params
    step = train.make_train_step(module, prior, opt, antithetic=True)
    emb = jnp.broadcast_to(emb1, (16, 1))
    sample = jax.jit(lambda k: gaussian.sample(prior.params, k, 16))
    for i in range(200):
        state, metrics = step(state, sample(jax.random.PRNGKey(i)), emb)
    assert np.isfinite(float(metrics["loss"]))
    return module, untrained, state.params


def test_training_lowers_bias_error_far_below_identity_and_untrained(prior, trained):
    module, untrained, params = trained
    x = gaussian.sample(prior.params, jax.random.PRNGKey(123), 32)
    emb = prior.embed_text([""] * 32)
    # Perturb the untrained net so it is not the identity map (conv_out starts at zero).
    noisy = jax.tree_util.tree_map(lambda p: p + 0.05 * jnp.sign(p + 1e-3), untrained)

    def err(fn):
        return float(np.mean(list(train.relative_bias_error(fn, prior, x, emb, TS).values())))

    e_trained = err(bias_fn_from(module, params))
    e_identity = err(lambda z, t, e: z)
    e_untrained = err(bias_fn_from(module, noisy))
    assert e_trained < 0.25 * e_identity, (e_trained, e_identity)
    assert e_trained < 0.25 * e_untrained, (e_trained, e_untrained)


def test_saved_bias_reloads_to_identical_outputs(prior, trained, tmp_path):
    module, _, params = trained
    save_bias(str(tmp_path / "b"), module, params, prior, training={"steps": 200})
    module2, params2, fn2 = load_bias(str(tmp_path / "b"), prior)
    x = gaussian.sample(prior.params, jax.random.PRNGKey(5), 3)
    t = jnp.array([1, 500, 999])
    emb = prior.embed_text([""] * 3)
    np.testing.assert_array_equal(fn2(x, t, emb), bias_fn_from(module, params)(x, t, emb))
    assert module2 == module


def test_mismatched_bias_is_a_clear_error(prior, trained, tmp_path):
    module, _, params = trained
    save_bias(str(tmp_path / "b"), module, params, prior)
    other = gaussian.gaussian_prior(resolution=32)
    with pytest.raises(UserError, match=r"resolution \[16, 16\] vs the prior's \[32, 32\]"):
        load_bias(str(tmp_path / "b"), other)
    gray = gaussian.gaussian_prior(resolution=RES, channels=1)
    with pytest.raises(UserError, match="3 channels vs the prior's 1"):
        load_bias(str(tmp_path / "b"), gray)
    with pytest.raises(UserError, match="no trained b_psi"):
        load_bias(str(tmp_path / "missing"), prior)


def test_bias_app_trains_saves_and_resumes(tmp_path):
    """configs/bias.py:quick through the app: writes bias/, resumes from its checkpoint."""
    import os

    from lmc_jax.apps import bias as bias_app

    config: ml_collections.ConfigDict = load_config(
        os.path.join(os.path.dirname(__file__), "..", "configs", "bias.py"), "quick")
    config.prior.resolution = RES
    config.train.steps = 20
    config.checkpoint_every = 10
    config.log_every = 10
    metrics = bias_app.run(config, str(tmp_path))
    assert (tmp_path / "bias" / "bias.json").exists()
    assert metrics["bias_rel_err"] > 0
    # A longer run in the same workdir resumes at step 20, not 0.
    config.train.steps = 30
    module, params, prior2, _ = bias_app.train_bias(config, str(tmp_path), quiet=True)
    from lmc_jax.checkpoint import Checkpointer

    assert Checkpointer(str(tmp_path)).steps()[-1] == 30
    del module, params, prior2
