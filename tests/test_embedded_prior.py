"""The embedded prior: word tokenizer, VAE-less loading, the shipped weights, DDIM sampling."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lmc_jax.data import shapes
from lmc_jax.errors import UserError
from lmc_jax.priors import embedded, gaussian, sd
from lmc_jax.priors.sampling import ddim_sample, ddim_timesteps


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    return embedded.write_word_tokenizer(tmp_path_factory.mktemp("tok"), shapes.vocabulary())


@pytest.fixture(scope="module")
def shipped():
    return embedded.embedded_prior()


def test_every_caption_word_is_one_token(tokenizer_dir):
    tok = embedded.new_modules(tokenizer_dir)[2]
    for word in shapes.vocabulary():
        assert tok.tokenize(word) == [f"{word}</w>"], word
    text, _, _ = shapes.all_captions()[-1]
    ids = tok([text]).input_ids[0]
    assert ids[0] == tok.bos_token_id and ids[-1] == tok.eos_token_id
    assert len(ids) == len(text.replace(",", " ,").split()) + 2


def test_pixel_pipeline_round_trip(tokenizer_dir, tmp_path):
    unet, text, tok = embedded.new_modules(tokenizer_dir)
    params = embedded.init_params(unet, text, seed=3)
    direct = sd.make_sd_prior(unet, None, text, tok, params, embedded.SCHEDULER)
    folder = embedded.save_pipeline(tmp_path / "p", unet, text, tok, params, dtype="float32")
    loaded = embedded.embedded_prior(path=folder)
    assert loaded.kind == "pixel" and loaded.x_shape == (32, 32, 3)
    assert loaded.encode_fn is None and set(loaded.params) == {"unet", "text_encoder"}
    x = jax.random.normal(jax.random.PRNGKey(0), (2, 32, 32, 3))
    t = jnp.array([10, 900])
    for p in (["a red cube", ""], ["a ball, blue", "a render of a green torus"]):
        np.testing.assert_allclose(loaded.eps(x, t, loaded.embed_text(p)),
                                   direct.eps(x, t, direct.embed_text(p)), atol=1e-5)
    # Linear DDPM betas 1e-4 .. 0.02.
    betas = np.linspace(1e-4, 0.02, 1000)
    np.testing.assert_allclose(loaded.alphas_cumprod, np.cumprod(1 - betas), rtol=1e-5)


def test_unknown_word_lists_the_vocabulary(shipped):
    with pytest.raises(UserError) as e:
        shipped.embed_text(["a red fox"])
    msg = str(e.value)
    assert "'fox'" in msg and "torus" in msg and "purple" in msg
    with pytest.raises(UserError, match="'dodecahedron'"):
        shipped.embed_text(["a green dodecahedron, blue"])
    shipped.embed_text(["A Torus, GREEN", ""])  # case and punctuation are fine


def test_byte_tokenizer_priors_accept_any_text():
    tiny = sd.tiny_sd_prior(image_size=16)
    assert tiny.embed_text(["a zebra in a snowstorm"]).shape[0] == 1


@functools.cache
def _jit_eps(eps_fn):
    """One compiled UNet call for every t and caption (eager calls cost ~5 s each)."""
    return jax.jit(eps_fn)


def _denoise_errors(prior, images, t, prompts, key):
    """Mean squared error of the one-step estimate x_hat against the clean images."""
    a = jnp.sqrt(prior.alphas_cumprod[t])
    s = jnp.sqrt(1.0 - prior.alphas_cumprod[t])
    eps = jax.random.normal(key, images.shape)
    x_t = a * images + s * eps
    e = _jit_eps(prior.eps_fn)(prior.params, x_t, jnp.full((len(images),), t),
                               prior.embed_text(prompts))
    x_hat = (x_t - s * e) / a
    return float(jnp.mean((x_hat - images) ** 2))


@pytest.mark.parametrize("t", [100, 300, 600])
def test_shipped_prior_denoises_held_out_renders(shipped, t):
    idx = np.arange(50)  # every class twice, from renders the prior never saw
    images = jnp.asarray(shapes.render(7, "eval_test", idx).astype(np.float32) / 127.5 - 1.0)
    s, c = shapes.class_of(idx)
    right = [shapes.caption(int(a), int(b)) for a, b in zip(s, c, strict=True)]
    wrong = [shapes.caption(int(a), (int(b) + 2) % 5) for a, b in zip(s, c, strict=True)]
    key = jax.random.PRNGKey(t)
    err_right = _denoise_errors(shipped, images, t, right, key)
    err_wrong = _denoise_errors(shipped, images, t, wrong, key)
    # Chance: the best constant guess, the per-pixel mean of the images. (Measured for the
    # shipped weights: err_right / chance = 0.03, 0.10, 0.34 at t = 100, 300, 600; 0.54 at 900.)
    chance = float(jnp.mean((images - images.mean(0)) ** 2))
    assert err_right < 0.5 * chance, (err_right, chance)
    # The caption matters: the right colour denoises better than a wrong one.
    assert err_right < 0.85 * err_wrong, (err_right, err_wrong)


def test_ddim_timesteps():
    ts = ddim_timesteps(1000, 50)
    assert ts[0] == 999 and ts[-1] == 0 and len(ts) == 50 and np.all(np.diff(ts) < 0)


def test_ddim_samples_the_exact_gaussian():
    # With the exact eps of a Gaussian, DDIM's ODE maps N(0, I) to the data distribution: the
    # samples' per-frequency power matches the prior's spectrum.
    prior = gaussian.gaussian_prior(resolution=16, variance=0.25)
    emb = prior.embed_text([""] * 256)
    x = ddim_sample(prior, emb, emb[:1], jax.random.PRNGKey(0), w=0.0, num_steps=100,
                    clip=False)
    power = np.mean(np.abs(np.fft.fft2(np.asarray(x), axes=(1, 2), norm="ortho")) ** 2, (0, 3))
    lam = np.asarray(prior.params["lam"]).reshape(16, 16)
    ratio = power / lam
    assert 0.8 < np.median(ratio) < 1.2, np.median(ratio)
    assert np.all((ratio > 0.5) & (ratio < 1.6)), (ratio.min(), ratio.max())


def test_fine_tune_to_the_patterned_world_keeps_word_embeddings(tmp_path, shipped):
    import json

    import ml_collections

    from lmc_jax.apps.train_prior import initial_params

    tok_dir = embedded.write_word_tokenizer(tmp_path, shapes.vocabulary(patterned=True))
    unet, text_encoder, tok = embedded.new_modules(tok_dir)
    config = ml_collections.ConfigDict({"seed": 3, "init_from": "embedded"})
    params = initial_params(config, unet, text_encoder, tok)
    fresh = embedded.init_params(unet, text_encoder, 3)
    path = ("text_model", "embeddings", "token_embedding", "embedding")
    got, old, new = (functools.reduce(lambda d, k: d[k], path, p["text_encoder"])
                     for p in (params, shipped.params, fresh))
    old_vocab = json.loads((embedded.embedded_path() / "tokenizer" / "vocab.json").read_text())
    new_vocab = tok.get_vocab()
    assert old_vocab["red</w>"] != new_vocab["red</w>"]  # the ids shift: a copy would be wrong
    for token, i in new_vocab.items():
        want = old[old_vocab[token]] if token in old_vocab else new[i]
        np.testing.assert_allclose(np.asarray(got[i]), np.asarray(want, np.float32),
                                   err_msg=token)
    np.testing.assert_array_equal(np.asarray(params["unet"]["conv_in"]["kernel"]),
                                  np.asarray(shipped.params["unet"]["conv_in"]["kernel"],
                                             np.float32))
