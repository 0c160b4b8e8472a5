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


def _tiny_config(**data):
    """configs/i2i.py:tiny at test size: 2 steps, 2 training and 2 held-out renders."""
    c = load_config(os.path.join(ROOT, "configs", "i2i.py"), "tiny")
    c.steps, c.batch, c.heldout = 2, 2, 2
    c.data.num_images = 2
    c.data.update(data)
    c.eval_every = c.log_every = c.checkpoint_every = 2
    c.net.features, c.net.blocks = 8, 1
    return c


def test_tiny_preset_trains_two_steps_and_scores_held_out_renders(tmp_path):
    """configs/i2i.py:tiny runs (LMC-SDS on the embedded prior, red renders -> "a blue
    {shape}") and writes its outputs; its held-out renders are other scenes than the training
    renders, and its figures are the shipped evaluator's on exactly those renders."""
    import json

    import numpy as np

    from lmc_jax.apps import i2i_shapes
    from lmc_jax.priors.factory import build_prior

    c = _tiny_config()
    m = i2i.run(c, str(tmp_path))
    for name in ("metrics.json", "heldout.npz", "heldout_000002.png"):
        assert (tmp_path / name).exists(), name
    assert Checkpointer(str(tmp_path)).steps()[-1] == 2
    saved = json.loads((tmp_path / "metrics.json").read_text())
    assert saved["settings"] == {"method": "lmc", "w": 7.5, "weighting": "sigma2",
                                 "t_min": 20, "t_max": 980}
    # The untrained f_theta is the identity: red objects of the right shape, no change.
    assert m["heldout_target_colour_before"] == 0.0 and m["heldout_shape_kept_before"] == 1.0
    assert m["heldout_rms_to_input_before"] == 0.0
    assert m["heldout_lpips_to_input"].startswith("unavailable")  # no weights given
    assert m["reference_recoloured_target_colour"] == 1.0  # the evaluator reads blue renders
    for k in ("target_colour", "shape_kept", "both", "rms_to_input", "rms_to_recoloured"):
        assert np.isfinite(m[f"heldout_{k}"]), k

    # Held out: another split than training (so other scenes), and not one training image.
    splits = i2i_shapes.split_indices(c)
    assert splits["train"][0] == "train" and splits["heldout"][0] == "eval_test"
    prior = build_prior(c.prior)
    train_x, train_shapes = i2i_shapes.training_set(c, prior)
    with np.load(tmp_path / "heldout.npz") as f:
        held = {k: f[k] for k in f.files}
    assert not any(np.array_equal(h, t) for h in held["inputs"] for t in train_x)
    np.testing.assert_array_equal(held["inputs"], i2i_shapes.heldout_set(c, prior)["pixels"])
    np.testing.assert_array_equal(held["shape"], train_shapes)  # shapes in turn: 0, 1
    # The reference is the same scene in blue: same background, another object colour.
    np.testing.assert_array_equal(held["recoloured"][:, 0, 0], held["inputs"][:, 0, 0])
    assert not np.array_equal(held["recoloured"], held["inputs"])


def test_heldout_renders_skip_the_training_examples_in_one_split():
    """With training and held-out renders from the same split, the held-out examples start past
    every training example (no index in both)."""
    from lmc_jax.apps import i2i_shapes
    from lmc_jax.data import shapes

    c = load_config(os.path.join(ROOT, "configs", "i2i.py"), "tiny")
    c.data.heldout_split = c.data.split
    s = i2i_shapes.split_indices(c)
    train, held = set(s["train"][1].tolist()), set(s["heldout"][1].tolist())
    assert len(train) == c.data.num_images and len(held) == c.heldout and not train & held
    for idx in (s["train"][1], s["heldout"][1]):  # every one red, shapes in turn
        assert set(shapes.class_of(idx)[1].tolist()) == {0}
        assert list(shapes.class_of(idx)[0][:5]) == [0, 1, 2, 3, 4]


def test_shape_prompts_and_dds_source_per_image():
    """`{shape}` prompts give each image its own primitive's embedding, for the target, (DDS)
    the source and (NFSD) the negative prompt; a fixed-prompt source refuses them."""
    import numpy as np

    from lmc_jax.config import guidance_config
    from lmc_jax.guidance.from_config import guidance_record
    from lmc_jax.priors.factory import build_prior

    c = load_config(os.path.join(ROOT, "configs", "i2i.py"), "tiny")
    prior = build_prior(c.prior)
    guide = guidance_record(prior, guidance_config("dds", w=6.5))
    cond = i2i.conditioning_of(prior, c.prompt, guide, c.source_prompt)(3, np.array([1, 4, 1]))
    np.testing.assert_array_equal(cond.c, prior.embed_text(["a blue cube", "a blue cylinder",
                                                            "a blue cube"]))
    np.testing.assert_array_equal(cond.src, prior.embed_text(["a red cube", "a red cylinder",
                                                              "a red cube"]))
    with pytest.raises(UserError, match="renders"):
        i2i.conditioning_of(prior, c.prompt, guide, c.source_prompt)(3)
    nfsd = guidance_record(prior, guidance_config("nfsd",
                                                  negative_prompt=c.guidance.negative_prompt))
    cond = i2i.conditioning_of(prior, c.prompt, nfsd)(2, np.array([0, 2]))
    np.testing.assert_array_equal(cond.neg, prior.embed_text(["a red sphere", "a red torus"]))
    assert cond.src is None
    with pytest.raises(UserError, match="source prompt"):
        i2i.conditioning_of(prior, c.prompt, guide, "")


def test_dds_takes_each_input_as_its_source(tmp_path):
    """DDS in i2i: the source image is the batch's own input. With the source prompt as the
    target prompt, the untrained f_theta (the identity) gets a zero gradient (same image, same
    noise, same prompt on both branches) and stays the identity; toward "blue" it learns."""
    c = _config()
    c.steps, c.eval_every, c.log_every, c.checkpoint_every = 30, 30, 10, 30
    c.guidance.method = "dds"
    c.prompt = c.source_prompt = "red"
    same = i2i.run(c, str(tmp_path / "same"))
    # zero up to rounding (the two branches are different rows of one batched call)
    assert same["heldout_L_cond"] < 1e-5 and same["L_proj_grad_norm"] < 1e-5, same
    assert same["identity"] < 1e-10, same
    c.prompt = "blue"
    m = i2i.run(c, str(tmp_path / "blue"))
    assert m["settings"]["method"] == "dds"
    assert m["heldout_target_acc_before"] == 0.0 and m["heldout_target_acc"] == 1.0, m
