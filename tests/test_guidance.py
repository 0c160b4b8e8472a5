"""Guidance losses against closed forms, autodiff of their defining losses, and each other."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lmc_jax import guidance, schedule
from lmc_jax.errors import UserError
from lmc_jax.guidance import Conditioning, GuidanceParams
from lmc_jax.priors import gaussian

RES = 8


@pytest.fixture(scope="module")
def prior():
    return gaussian.gaussian_prior(resolution=RES, classes=gaussian.DEFAULT_CLASSES)


@pytest.fixture(scope="module")
def single():
    return gaussian.gaussian_prior(resolution=RES)


def _inputs(prior, batch=3, seed=0, prompt="red"):
    key = jax.random.PRNGKey(seed)
    x = gaussian.sample(prior.params, key, batch)
    t = jnp.array([40, 400, 850][:batch])
    eps = jax.random.normal(jax.random.fold_in(key, 1), x.shape)
    cond = Conditioning(c=prior.embed_text([prompt] * batch), u=prior.embed_text([""] * batch))
    return x, t, eps, cond


def test_eps_identity_projection_is_residual_to_x_hat(prior):
    """`e_c - eps = (a/s)(x - x_hat)` with `x_hat = (x_t - s e_c)/a`."""
    x, t, eps, cond = _inputs(prior)
    a, s = schedule.alpha_sigma(prior.alphas_cumprod, t)
    x_t = schedule.add_noise(x, eps, a, s)
    e_c = prior.eps(x_t, t, cond.c)
    x_hat = (x_t - schedule.bcast(s, x) * e_c) / schedule.bcast(a, x)
    np.testing.assert_allclose(e_c - eps, schedule.bcast(a / s, x) * (x - x_hat), atol=2e-4)


def test_sds_is_weighted_guided_residual(prior):
    x, t, eps, cond = _inputs(prior)
    hp = GuidanceParams(w=3.0, weighting="sigma2")
    out = guidance.sds(prior, x, t, eps, cond, hp)
    a, s = schedule.alpha_sigma(prior.alphas_cumprod, t)
    x_t = a[:, None, None, None] * x + s[:, None, None, None] * eps
    e_c, e_u = prior.eps(x_t, t, cond.c), prior.eps(x_t, t, cond.u)
    e_w = e_c + 3.0 * (e_c - e_u)
    want = (s**2)[:, None, None, None] * (e_w - eps)
    np.testing.assert_allclose(out.grad, want, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(out.parts["L_cond"] + out.parts["L_proj"], out.grad, atol=1e-6)
    assert float(jnp.abs(out.parts["L_cond"]).max()) > 0  # the prompt matters in the mixture


def test_no_gradient_flows_through_the_denoiser(prior):
    x, t, eps, cond = _inputs(prior)
    for name in ["sds", "csd", "nfsd"]:
        fn = guidance.METHODS[name]
        g = jax.grad(lambda z, fn=fn: jnp.sum(fn(prior, z, t, eps, cond, GuidanceParams()).grad))(x)
        assert float(jnp.abs(g).max()) == 0.0, name


def _tanh_bias(x, t, emb):
    """A nonlinear stand-in for b_psi, to test the Jacobian-transpose product."""
    return jnp.tanh(1.3 * x) * (1.0 - t[:, None, None, None] / 2000.0) + 0.1 * x**2


@pytest.mark.parametrize("bias,xhat", [("exact", "cond"), ("tanh", "cond"),
                                       ("exact", "uncond")])
def test_lmc_gradient_is_grad_of_l_lmc(prior, bias, xhat):
    x, t, eps, cond = _inputs(prior)
    bias_fn = prior.exact_bias if bias == "exact" else _tanh_bias
    # The exact deficiency is named, not passed: the loss reads it from the prior it is given.
    hp = (GuidanceParams(w=2.0, exact_deficiency=True, lmc_xhat=xhat) if bias == "exact"
          else GuidanceParams(w=2.0, b_psi=bias_fn, lmc_xhat=xhat))
    out = guidance.lmc_sds(prior, x, t, eps, cond, hp)
    # x_hat is held fixed (stop-gradient) in L_lmc: compute it once, independently, from the
    # prompt's (cond) or the null (uncond) prediction; b sees the same embedding.
    emb = cond.c if xhat == "cond" else cond.u
    a, s = schedule.alpha_sigma(prior.alphas_cumprod, t)
    x_t = schedule.add_noise(x, eps, a, s)
    x_hat = (x_t - schedule.bcast(s, x) * prior.eps(x_t, t, emb)) / schedule.bcast(a, x)
    coef = schedule.bcast(s**2 * a / s, x)

    def l_lmc(z):
        return jnp.sum(0.5 * coef * (bias_fn(z, t, emb) - x_hat) ** 2)

    want = jax.grad(l_lmc)(x)
    np.testing.assert_allclose(out.parts["L_lmc"], want, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(out.scalars["L_lmc"] * x.shape[0], l_lmc(x), rtol=1e-4)
    # Finite differences along a random direction (central, float32).
    v = jax.random.normal(jax.random.PRNGKey(7), x.shape)
    h = 1e-2
    fd = (l_lmc(x + h * v) - l_lmc(x - h * v)) / (2 * h)
    np.testing.assert_allclose(jnp.sum(out.parts["L_lmc"] * v), fd, rtol=2e-3)
    np.testing.assert_allclose(out.parts["L_cond"], guidance.csd(prior, x, t, eps, cond, hp).grad,
                               rtol=1e-6)


def test_lmc_projection_averages_to_zero_sds_to_high_pass_residual(single):
    """On data with the exact b: E_eps[grad L_lmc] = 0; E_eps[L_proj] = W (a/s)(x - b(x))."""
    prior = single
    n = 4096
    x0 = gaussian.sample(prior.params, jax.random.PRNGKey(3), 1)
    x = jnp.broadcast_to(x0, (n, RES, RES, 3))
    t = jnp.full((n,), 300)
    eps = jax.random.normal(jax.random.PRNGKey(4), x.shape)
    cond = Conditioning(c=prior.embed_text([""] * n), u=prior.embed_text([""] * n))
    hp = GuidanceParams(w=0.0, exact_deficiency=True)
    g_lmc = guidance.lmc_sds(prior, x, t, eps, cond, hp).parts["L_lmc"]
    g_sds = guidance.sds(prior, x, t, eps, cond, hp).parts["L_proj"]
    a, s = (float(v[0]) for v in schedule.alpha_sigma(prior.alphas_cumprod, t[:1]))
    want_sds = s**2 * (a / s) * (x0[0] - prior.exact_bias(x0, t[:1], cond.c[:1])[0])
    se_lmc = g_lmc.std(0) / np.sqrt(n)
    se_sds = g_sds.std(0) / np.sqrt(n)
    assert float(jnp.max(jnp.abs(g_lmc.mean(0)) / se_lmc)) < 5.0
    assert float(jnp.max(jnp.abs(g_sds.mean(0) - want_sds) / se_sds)) < 5.0
    # ...and the SDS residual is far from zero: many standard errors on average.
    assert float(jnp.mean(jnp.abs(want_sds) / se_sds)) > 10.0


def test_dds_identical_source_and_target_is_zero(prior):
    x, t, eps, cond = _inputs(prior)
    cond = cond.replace(src=cond.c, x_src=x)
    out = guidance.dds(prior, x, t, eps, cond, GuidanceParams(w=7.5))
    assert float(jnp.abs(out.grad).max()) == 0.0
    # ...but not when the prompts differ.
    other = cond.replace(src=prior.embed_text(["blue"] * 3))
    assert float(jnp.abs(guidance.dds(prior, x, t, eps, other, GuidanceParams()).grad).max()) > 0


def test_dds_without_source_is_a_clear_error(prior):
    x, t, eps, cond = _inputs(prior)
    with pytest.raises(UserError, match="source"):
        guidance.dds(prior, x, t, eps, cond, GuidanceParams())


def test_csd_is_sds_conditioning_part(prior):
    x, t, eps, cond = _inputs(prior)
    hp = GuidanceParams(w=5.0)
    np.testing.assert_array_equal(guidance.csd(prior, x, t, eps, cond, hp).grad,
                                  guidance.sds(prior, x, t, eps, cond, hp).parts["L_cond"])


def test_nfsd_switches_unconditional_term_at_threshold(prior):
    x, _, eps, cond = _inputs(prior, batch=2)
    cond = cond.replace(neg=prior.embed_text(["green"] * 2))
    t = jnp.array([199, 200])
    hp = GuidanceParams(w=7.5, weighting="one", nfsd_threshold=200)
    out = guidance.nfsd(prior, x, t, eps, cond, hp)
    a, s = schedule.alpha_sigma(prior.alphas_cumprod, t)
    x_t = schedule.add_noise(x, eps, a, s)
    e_u, e_n = prior.eps(x_t, t, cond.u), prior.eps(x_t, t, cond.neg)
    np.testing.assert_allclose(out.parts["L_proj"][0], e_u[0], atol=1e-6)
    np.testing.assert_allclose(out.parts["L_proj"][1], (e_u - e_n)[1], atol=1e-6)
    assert float(jnp.abs(e_n[1]).max()) > 0


def test_lmc_without_bias_is_a_clear_error(prior):
    x, t, eps, cond = _inputs(prior)
    with pytest.raises(UserError, match="bias"):
        guidance.lmc_sds(prior, x, t, eps, cond, GuidanceParams())


def test_surrogate_loss_gradient_is_guidance(prior):
    x, t, eps, cond = _inputs(prior)
    out = guidance.sds(prior, x, t, eps, cond, GuidanceParams())
    np.testing.assert_array_equal(jax.grad(guidance.surrogate_loss)(x, out.grad), out.grad)


def test_sample_noise_fixed_and_fresh():
    key = jax.random.PRNGKey(0)
    kw = dict(t_min=20, t_max=980)
    t0, e0 = guidance.sample_noise(key, 0, 4, (8, 8, 3), fixed_noise=True, **kw)
    t1, e1 = guidance.sample_noise(key, 1, 4, (8, 8, 3), fixed_noise=True, **kw)
    np.testing.assert_array_equal(e0, e1)
    assert not np.array_equal(t0, t1)
    f0, g0 = guidance.sample_noise(key, 0, 4, (8, 8, 3), fixed_noise=False, **kw)
    f1, g1 = guidance.sample_noise(key, 1, 4, (8, 8, 3), fixed_noise=False, **kw)
    assert not np.array_equal(g0, g1)
    np.testing.assert_array_equal(g0, guidance.sample_noise(key, 0, 4, (8, 8, 3),
                                                            fixed_noise=False, **kw)[1])
    for tt in [t0, t1, f0, f1]:
        assert int(tt.min()) >= 20 and int(tt.max()) < 980
    # Annealing: by the end, t stays below the final upper bound.
    ta, _ = guidance.sample_noise(key, 100, 256, (1, 1, 1), fixed_noise=False, t_min=20,
                                  t_max=980, t_max_final=500, anneal="linear", total_steps=100)
    assert int(ta.max()) < 500 and int(ta.max()) > 400


def test_wrong_image_shape_is_a_clear_error(prior):
    x, t, eps, cond = _inputs(prior)
    bad = jax.numpy.zeros((3, 16, 16, 3))
    with pytest.raises(UserError, match="shape"):
        guidance.sds(prior, bad, t, jax.numpy.zeros_like(bad), cond, GuidanceParams())


def test_lmc_with_the_mixtures_own_b_is_csd_in_expectation_linear_b_is_not():
    """Off the data manifold (a blend of two textured components), on an exact mixture:
    E_eps[grad LMC] with b = b_post (the mixture's own E[x_hat | x]) equals CSD's; with the
    best linear b (moment-matched Gaussian) it does not (the manifold corrective)."""
    res, n, pairs = 4, 512, 64
    rng = np.random.default_rng(5)
    classes = {f"c{i}": rng.uniform(-0.8, 0.8, (res, res, 1)).astype(np.float32)
               for i in range(3)}
    prior = gaussian.gaussian_prior(resolution=res, channels=1, variance=0.02, classes=classes)
    mus = list(classes.values())
    x = jnp.broadcast_to(jnp.asarray(0.6 * mus[0] + 0.4 * mus[1]), (n, res, res, 1))
    t = jnp.full((n,), 100)
    half = jax.random.normal(jax.random.PRNGKey(8), (n // 2, res, res, 1))
    eps = jnp.concatenate([half, -half])  # antithetic pairs: less variance in the mean
    cond = Conditioning(c=prior.embed_text(["c0"] * n), u=prior.embed_text([""] * n))
    ac = prior.alphas_cumprod

    def post(z, tt, emb):
        return gaussian.posterior_bias_fn(prior.params, z, tt, emb, ac, num_pairs=pairs, seed=3)

    def lin(z, tt, emb):
        return gaussian.linear_bias_fn(prior.params, z, tt, emb, ac)

    csd = guidance.csd(prior, x, t, eps, cond, GuidanceParams(w=2.0)).grad.mean(0)
    for name, fn in [("post", post), ("lin", lin)]:
        g = guidance.lmc_sds(prior, x, t, eps, cond,
                             GuidanceParams(w=2.0, b_psi=fn, lmc_xhat="uncond")).grad
        g = 0.5 * (g[: n // 2] + g[n // 2:])  # pair means are independent
        # Standard error of the mean over the guidance noise, widened for b_post's own Monte
        # Carlo error (2 * pairs draws, independent of the guidance noise; b_lin has none).
        se = g.std(0) / np.sqrt(n // 2) * (np.sqrt(1 + n / (2 * pairs)) if name == "post" else 1)
        z = np.asarray(jnp.abs(g.mean(0) - csd) / se)
        if name == "post":
            assert z.max() < 5.0, z.max()
        else:
            assert z.mean() > 8.0, z.mean()


def test_the_record_is_built_once_from_the_config_and_carries_every_setting(prior):
    """`guidance_record`: method, w, the exact deficiency by name, the t range with its
    annealing over the run, fixed noise and NFSD's negative prompt, all static (no leaves)."""
    from lmc_jax.config import guidance_config
    from lmc_jax.guidance.from_config import guidance_record

    gcfg = guidance_config("lmc", w=3.0, bias="exact")
    gcfg.t_min, gcfg.t_max, gcfg.t_max_final, gcfg.t_anneal = 50, 900, 300, "linear"
    gcfg.fixed_noise = True
    guide = guidance_record(prior, gcfg, total_steps=40)
    assert jax.tree_util.tree_leaves(guide) == []
    assert guide.method == "lmc" and guide.params.w == 3.0 and guide.negative_prompt is None
    assert guide.params.exact_deficiency and guide.params.b_psi is None
    key = jax.random.PRNGKey(1)
    t0, e0 = guide.draw(key, 0, 64, prior.x_shape)
    t_end, e_end = guide.draw(key, 40, 64, prior.x_shape)
    np.testing.assert_array_equal(e0, e_end)  # fixed noise: one eps per run
    assert int(t0.min()) >= 50 and int(t0.max()) >= 300  # the full range at the start
    assert int(t_end.max()) < 300  # annealed to t_max_final by the last step
    nfsd = guidance_config("nfsd", w=7.5)
    nfsd.negative_prompt = "green"
    assert guidance_record(prior, nfsd).negative_prompt == "green"
    with pytest.raises(UserError, match="guidance.t_min/t_max"):
        guidance_record(prior, guidance_config("sds", t_min=900, t_max=100))


def test_exact_deficiency_reads_the_prior_a_jitted_step_is_given(prior):
    """With the prior's params a traced argument, the exact deficiency is computed from them
    (not baked in as constants): the jitted step follows new params, and none of its jaxpr's
    constants is one of the prior's arrays."""
    from lmc_jax.guidance.record import Guidance

    x, t, eps, cond = _inputs(prior)
    guide = Guidance(method="lmc", params=GuidanceParams(w=2.0, exact_deficiency=True))

    def step(params):
        return guide(prior.replace(params=params), x, t, eps, cond).grad

    other = jax.tree_util.tree_map(lambda a: a * 0.9, prior.params)
    np.testing.assert_allclose(jax.jit(step)(other), step(other), rtol=1e-5, atol=1e-6)
    assert not np.allclose(jax.jit(step)(other), step(prior.params), atol=1e-4)
    consts = jax.make_jaxpr(step)(prior.params).consts
    leaves = jax.tree_util.tree_leaves(prior.params)
    assert not any(np.shape(c) == np.shape(a) and np.array_equal(c, a)
                   for c in consts for a in leaves)
    # The old way, a bound method of the concrete prior, does bake them in: the check can fail.
    baked = GuidanceParams(w=2.0, b_psi=prior.exact_bias)
    consts = jax.make_jaxpr(lambda p: guidance.lmc_sds(prior.replace(params=p), x, t, eps, cond,
                                                       baked).grad)(prior.params).consts
    assert any(np.shape(c) == np.shape(a) and np.array_equal(c, a)
               for c in consts for a in leaves)
