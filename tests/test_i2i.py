"""Zero-shot image-to-image training on the exact mixture prior (red -> blue)."""

import os

import pytest

from lmc_jax.apps import i2i
from lmc_jax.checkpoint import Checkpointer
from lmc_jax.config import load_config
from lmc_jax.errors import UserError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _config():
    c = load_config(os.path.join(ROOT, "configs", "i2i.py"), "mixture")
    c.steps = 60
    c.net.features = 16
    c.net.blocks = 1
    c.eval_every = 30
    c.log_every = 30
    c.checkpoint_every = 30
    c.heldout = 4
    return c


def test_i2i_trains_on_heldout_and_round_trips_a_checkpoint(tmp_path):
    c = _config()
    m = i2i.run(c, str(tmp_path))
    assert m["heldout_L_cond"] < 0.1 * m["heldout_L_cond_before"], m
    assert m["heldout_target_acc_before"] == 0.0 and m["heldout_target_acc"] == 1.0, m
    assert (tmp_path / "heldout_000060.png").exists()
    ckpt = Checkpointer(str(tmp_path))
    assert ckpt.steps()[-1] == 60
    # Re-running the finished run restores the trained parameters from the checkpoint: the
    # held-out figures are identical (an untrained network would give the "before" ones).
    m2 = i2i.run(c, str(tmp_path))
    assert m2["heldout_L_cond"] == m["heldout_L_cond"]
    assert m2["heldout_target_acc"] == m["heldout_target_acc"]
    # A resume that changes f_theta's shapes is refused, naming the key, before any training.
    c.net.features = 32
    with pytest.raises(UserError, match=r"net.features: 16 -> 32"):
        i2i.run(c, str(tmp_path))
    assert ckpt.steps()[-1] == 60
    ckpt.close()


def test_nfsd_conditioning_carries_the_negative_prompt():
    """i2i's conditioning under NFSD holds the negative prompt, so at t >= 200 NFSD's `L_proj`
    is `W(t) (e_u - e_neg)` (computed here from the prior's `eps` directly), not 0."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from lmc_jax import schedule
    from lmc_jax.guidance.from_config import build_guidance, negative_prompt
    from lmc_jax.priors import gaussian
    from lmc_jax.priors.factory import build_prior

    c = _config()
    c.guidance.method, c.guidance.negative_prompt = "nfsd", "red"
    prior = build_prior(c.prior)
    fn, hp = build_guidance(prior, c.guidance)
    cond = i2i.conditioning(prior, c.prompt, 3, negative_prompt(c.guidance))
    np.testing.assert_array_equal(np.asarray(cond.neg), np.asarray(prior.embed_text(["red"] * 3)))
    key = jax.random.PRNGKey(0)
    x = gaussian.sample(prior.params, key, 3)
    t = jnp.array([250, 500, 900])
    eps = jax.random.normal(jax.random.fold_in(key, 1), x.shape)
    out = fn(prior, x, t, eps, cond, hp)
    a, s = schedule.alpha_sigma(prior.alphas_cumprod, t)
    assert c.guidance.weighting == "sigma2"  # W(t) = s_t^2
    x_t = schedule.add_noise(x, eps, a, s)
    want = schedule.bcast(s**2, x) * (prior.eps(x_t, t, prior.embed_text([""] * 3))
                                      - prior.eps(x_t, t, prior.embed_text(["red"] * 3)))
    assert float(jnp.abs(want).max()) > 1e-3
    np.testing.assert_allclose(out.parts["L_proj"], want, rtol=1e-4, atol=1e-5)


def test_evaluation_takes_the_prior_weights_as_an_argument():
    """i2i's held-out evaluation compiles with the prior's weights as an argument. It used to
    close over them: at SD 2.1-base's size the compiled program held a second 3.5 GB copy of the
    UNet and the run was killed for memory on a 24 GiB host (benchmarks/real_path.py, i2i). JAX
    warns about captured constants above `jax_captured_constants_warn_bytes`; set below the
    weights' size, the warning must not come."""
    import warnings

    import jax
    import jax.numpy as jnp
    import numpy as np

    from lmc_jax.config import guidance_config
    from lmc_jax.guidance.from_config import guidance_record
    from lmc_jax.priors.sd import tiny_sd_prior

    prior = tiny_sd_prior(image_size=16)
    weights = sum(a.nbytes for a in jax.tree.leaves(prior.params))
    guide = guidance_record(prior, guidance_config("sds", w=7.5))
    net = i2i.Translator(8, 1)
    params = i2i.init_params(net, prior.x_shape, 0)
    x = jax.random.normal(jax.random.PRNGKey(1), (2, *prior.x_shape))
    cond = i2i.conditioning(prior, "a photo", 2)
    evaluate = i2i.make_evaluate(net, prior, guide, jax.random.PRNGKey(2), draws=1)
    old = jax.config.jax_captured_constants_warn_bytes
    jax.config.update("jax_captured_constants_warn_bytes", weights // 2)
    try:
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            evaluate.lower(params, prior.params, x, cond)
            # the same check sees a closure over the weights (the old evaluation)
            jax.jit(lambda p, y: evaluate(p, prior.params, y, cond)).lower(params, x)
    finally:
        jax.config.update("jax_captured_constants_warn_bytes", old)
    captured = [str(w.message) for w in seen if "captured during lowering" in str(w.message)]
    assert len(captured) == 1, (weights, captured)
    # and it computes: the untrained network is the identity, a finite conditioning norm
    y, norm = evaluate(params, prior.params, x, cond)
    np.testing.assert_allclose(y, x, atol=1e-6)
    assert bool(jnp.isfinite(norm)) and float(norm) > 0
