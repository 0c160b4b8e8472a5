"""Stable Diffusion prior: the diffusers loader on a saved tiny pipeline, conventions, errors.

The tiny random-init pipeline is built once per module; every check compares against an
independent computation (diffusers' own NCHW API, closed-form formulas, a fresh tokenizer).
"""

from __future__ import annotations

import json
import re
import shutil
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax.traverse_util import flatten_dict

from lmc_jax import _compat
from lmc_jax.errors import UserError
from lmc_jax.priors import sd
from lmc_jax.priors.tokenizer import (
    byte_to_unicode,
    byte_tokenizer_path,
    byte_vocab,
    write_byte_tokenizer,
)

BATCH = 2


def _scaled_linear(b0=0.00085, b1=0.012, n=1000):
    betas = np.linspace(b0**0.5, b1**0.5, n) ** 2
    return np.cumprod(1.0 - betas)


def _rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


@pytest.fixture(scope="module")
def tiny():
    return sd.tiny_sd_prior()


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    return sd.save_tiny_pipeline(tmp_path_factory.mktemp("tiny_sd"))


@pytest.fixture(scope="module")
def loaded(saved):
    return sd.load_stable_diffusion(str(saved))


@pytest.fixture(scope="module")
def inputs(tiny):
    x = jax.random.normal(jax.random.PRNGKey(0), (BATCH, *tiny.x_shape))
    t = jnp.array([37, 901], jnp.int32)
    emb = tiny.embed_text(["a photo of a cat", ""])
    return x, t, emb


def _eps_of(prior, x, t, emb):
    return prior.eps(x, t, emb)


# One jitted function that takes the Prior as an argument (see test_prior_as_jit_argument).
EPS_JIT = jax.jit(_eps_of)


@pytest.fixture(scope="module")
def eps_tiny(tiny, inputs):
    return np.asarray(EPS_JIT(tiny, *inputs))


def _copy(src: Path, dst: Path, skip=()) -> Path:
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns(*skip))
    return dst


# --- tokenizer ------------------------------------------------------------------------------


def test_byte_map_matches_clip():
    from transformers.models.clip.tokenization_clip import bytes_to_unicode

    assert list(byte_to_unicode().items()) == list(bytes_to_unicode().items())
    vocab = byte_vocab()
    assert len(vocab) == 514 and sorted(vocab.values()) == list(range(514))
    assert vocab["<|startoftext|>"] == 512 and vocab["<|endoftext|>"] == 513


def test_shipped_tokenizer_equals_fresh(tmp_path):
    fresh = write_byte_tokenizer(tmp_path / "tok")
    shipped = byte_tokenizer_path()
    names = sorted(p.name for p in fresh.iterdir())
    assert names == sorted(p.name for p in shipped.iterdir())
    for name in names:
        assert (shipped / name).read_bytes() == (fresh / name).read_bytes(), name


@pytest.mark.parametrize("text", ["a photo of a cat", "Ünïcödé çafé 🐱", "x\ty  z\n", "", "½ ∑ ß"])
def test_any_text_tokenizes(text):
    tok = _compat.transformers().CLIPTokenizer.from_pretrained(str(byte_tokenizer_path()))
    vocab, chars = byte_vocab(), byte_to_unicode()
    ids = tok(text).input_ids
    # Independent encoding: lowercase, split on whitespace and at letter/non-letter boundaries,
    # each UTF-8 byte is one token and a word's last byte carries '</w>'.
    expected = []
    for word in text.lower().split():
        for piece in _clip_pieces(word):
            b = [chars[c] for c in piece.encode("utf-8")]
            expected += [vocab[c] for c in b[:-1]] + [vocab[b[-1] + "</w>"]]
    assert ids == [512, *expected, 513]
    assert tok.decode(ids, skip_special_tokens=True) == " ".join(text.lower().split())


def _clip_pieces(word):
    """CLIP's pre-tokenizer on one whitespace-free word: runs of letters, digits one by one,
    runs of other symbols."""
    import regex

    return regex.findall(r"[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+", word)


# --- the Prior ------------------------------------------------------------------------------


def test_tiny_prior_shapes_and_cache(tiny):
    assert tiny.kind == "latent"
    assert tiny.x_shape == (32, 32, 4) and tiny.image_shape == (64, 64, 3)
    assert sd.tiny_sd_prior(seed=0, image_size=64) is tiny
    np.testing.assert_allclose(tiny.alphas_cumprod, _scaled_linear(), rtol=1e-6)


def test_save_load_roundtrip(tiny, loaded, inputs, eps_tiny):
    x, t, emb = inputs
    assert (loaded.x_shape, loaded.image_shape) == (tiny.x_shape, tiny.image_shape)
    np.testing.assert_array_equal(loaded.alphas_cumprod, tiny.alphas_cumprod)
    flat_a, flat_b = flatten_dict(tiny.params), flatten_dict(loaded.params)
    assert flat_a.keys() == flat_b.keys()
    for k in flat_a:
        np.testing.assert_array_equal(flat_a[k], flat_b[k], err_msg=str(k))
    prompts = ["a photo of a cat", ""]
    np.testing.assert_array_equal(loaded.embed_text(prompts), np.asarray(emb))
    eps = loaded.eps(x, t, emb)
    assert eps.dtype == jnp.float32 and eps.shape == x.shape
    np.testing.assert_allclose(eps, eps_tiny, atol=1e-5, rtol=0)  # in-memory vs loaded


def test_eps_matches_diffusers_nchw(saved, tiny, inputs, eps_tiny):
    """NHWC eps == diffusers' UNet called directly on NCHW, loaded by diffusers itself."""
    x, t, emb = inputs
    unet, params = _compat.diffusers().FlaxUNet2DConditionModel.from_pretrained(
        str(saved / "unet"))
    out = jax.jit(lambda p, s: unet.apply({"params": p}, s, t, emb).sample)(
        params, jnp.transpose(x, (0, 3, 1, 2)))
    np.testing.assert_allclose(eps_tiny, jnp.transpose(out, (0, 2, 3, 1)), atol=1e-5, rtol=0)
    assert np.std(eps_tiny) > 0.1  # a random net, not a zero output


def test_encode_decode_nhwc(saved, tiny):
    # Non-square images: a swapped H/W anywhere would show in the shapes.
    img = jnp.tanh(jax.random.normal(jax.random.PRNGKey(1), (2, 64, 32, 3)))
    z = tiny.encode(img)
    assert z.shape == (2, 32, 16, 4) and z.dtype == jnp.float32
    back = tiny.decode(z)
    assert back.shape == (2, 64, 32, 3) and back.dtype == jnp.float32
    vae, vparams = _compat.diffusers().FlaxAutoencoderKL.from_pretrained(str(saved / "vae"))
    scale = json.loads((saved / "vae" / "config.json").read_text())["scaling_factor"]
    ref = jax.jit(lambda p, a: vae.apply({"params": p}, a, method=vae.encode).latent_dist.mean)(
        vparams, jnp.transpose(img, (0, 3, 1, 2))) * scale
    np.testing.assert_allclose(z, ref, atol=1e-5, rtol=1e-5)
    ref_img = jax.jit(lambda p, a: vae.apply({"params": p}, a, method=vae.decode).sample)(
        vparams, jnp.transpose(z / scale, (0, 3, 1, 2)))
    np.testing.assert_allclose(back, jnp.transpose(ref_img, (0, 2, 3, 1)), atol=1e-5, rtol=1e-5)
    with pytest.raises(UserError, match="NHWC"):
        tiny.encode(jnp.zeros((1, 3, 64, 64)))
    with pytest.raises(UserError, match="NHWC"):
        tiny.decode(jnp.zeros((1, 4, 32, 32)))


def test_prior_as_jit_argument(tiny, inputs, eps_tiny):
    """eps_tiny came from EPS_JIT(tiny, ...) (direct calls agree: test_save_load_roundtrip)."""
    # New weights in the same Prior structure: no retrace, and the weights are used (not baked).
    scaled = tiny.replace(params=jax.tree_util.tree_map(lambda a: a * 1.5, tiny.params))
    out = EPS_JIT(scaled, *inputs)
    assert EPS_JIT._cache_size() == 1
    assert _rel(out, eps_tiny) > 1e-2


def test_bfloat16(saved, tiny, inputs, eps_tiny):
    bf = sd.load_stable_diffusion(str(saved), dtype="bfloat16")
    dtypes = {a.dtype for a in jax.tree_util.tree_leaves(bf.params["unet"])}
    assert dtypes == {jnp.dtype(jnp.bfloat16)}
    x, t, _ = inputs
    emb = bf.embed_text(["a photo of a cat", ""])
    assert emb.dtype == jnp.float32 and _rel(emb, inputs[2]) < 0.05
    eps = bf.eps(x, t, emb)
    assert eps.dtype == jnp.float32
    jaxpr = str(jax.make_jaxpr(bf.eps_fn)(bf.params, x, t, emb))
    assert re.search(r":bf16\[[^\]]*\] = conv_general_dilated", jaxpr)  # computes in bf16
    assert _rel(eps, eps_tiny) < 0.05


def test_v_prediction(saved, tmp_path, tiny, inputs, eps_tiny):
    """A v-model's raw output v becomes eps = a_t v + s_t x_t (here v := the tiny UNet output)."""
    folder = _copy(saved, tmp_path / "v")
    cfg_file = folder / "scheduler" / "scheduler_config.json"
    cfg = json.loads(cfg_file.read_text())
    cfg["prediction_type"] = "v_prediction"
    cfg_file.write_text(json.dumps(cfg))
    vprior = sd.load_stable_diffusion(str(folder))
    x, t, emb = inputs
    abar = _scaled_linear()[np.asarray(t)][:, None, None, None]
    expected = np.sqrt(abar) * eps_tiny + np.sqrt(1 - abar) * np.asarray(x)
    np.testing.assert_allclose(vprior.eps(x, t, emb), expected, atol=2e-5, rtol=0)

    cfg["prediction_type"] = "sample"
    cfg_file.write_text(json.dumps(cfg))
    with pytest.raises(UserError, match="prediction_type 'sample'"):
        sd.load_stable_diffusion(str(folder))


def _torch_layout(params):
    """Flax weights -> PyTorch names and layouts (the inverse of the PT->Flax converters)."""
    out = {}
    for key, v in flatten_dict(params).items():
        v, leaf = np.asarray(v, np.float32), key[-1]
        if leaf == "kernel":
            v, leaf = (v.transpose(3, 2, 0, 1) if v.ndim == 4 else v.T), "weight"
        elif leaf in ("scale", "embedding"):
            leaf = "weight"
        out[".".join((*key[:-1], leaf))] = np.ascontiguousarray(v)
    return out


def test_from_pt_safetensors(saved, tmp_path, tiny):
    from safetensors.numpy import save_file

    folder = _copy(saved, tmp_path / "pt", skip=("*.msgpack",))
    files = {"unet": "diffusion_pytorch_model", "vae": "diffusion_pytorch_model",
             "text_encoder": "model"}
    for part, stem in files.items():
        save_file(_torch_layout(tiny.params[part]), str(folder / part / f"{stem}.safetensors"),
                  metadata={"format": "pt"})
    with pytest.raises(UserError, match="from_pt=True"):
        sd.load_stable_diffusion(str(folder))
    pt = sd.load_stable_diffusion(str(folder), from_pt=True)
    flat_a, flat_b = flatten_dict(tiny.params), flatten_dict(pt.params)
    assert flat_a.keys() == flat_b.keys()
    for k in flat_a:
        np.testing.assert_array_equal(flat_a[k], flat_b[k], err_msg=str(k))


# --- errors ---------------------------------------------------------------------------------


def test_missing_path_error(tmp_path):
    path = str(tmp_path / "no_such_sd21")
    with pytest.raises(UserError) as err:
        sd.load_stable_diffusion(path)
    msg = str(err.value)
    assert path in msg and ":tiny" in msg and "huggingface-cli download" in msg
    assert "\n" not in msg


def test_unreachable_hub_id_error():
    start = time.monotonic()
    with pytest.raises(UserError) as err:
        sd.load_stable_diffusion("lmc-jax-test/no-such-model")
    msg = str(err.value)
    assert "lmc-jax-test/no-such-model" in msg and ":tiny" in msg and "\n" not in msg
    assert time.monotonic() - start < 20


def test_missing_component_error(saved, tmp_path):
    folder = _copy(saved, tmp_path / "no_unet", skip=("unet",))
    with pytest.raises(UserError, match="unet/"):
        sd.load_stable_diffusion(str(folder))
    shutil.copytree(saved / "unet", folder / "unet", ignore=shutil.ignore_patterns("*.msgpack"))
    with pytest.raises(UserError, match="diffusion_flax_model.msgpack"):
        sd.load_stable_diffusion(str(folder))


def test_checkpoint_missing_weight_error(saved, tmp_path, tiny):
    from flax.serialization import msgpack_serialize
    from flax.traverse_util import unflatten_dict

    folder = _copy(saved, tmp_path / "partial")
    flat = {k: np.asarray(v) for k, v in flatten_dict(tiny.params["unet"]).items()}
    del flat[("conv_out", "bias")]
    (folder / "unet" / "diffusion_flax_model.msgpack").write_bytes(
        msgpack_serialize(unflatten_dict(flat)))
    with pytest.raises(UserError, match="lacks 1 of .* conv_out/bias"):
        sd.load_stable_diffusion(str(folder))


def test_bad_arguments(tiny):
    with pytest.raises(UserError, match="dtype"):
        sd.tiny_sd_prior(dtype="float16")
    with pytest.raises(UserError, match="multiple of 4"):
        sd.tiny_sd_prior(image_size=30)
    with pytest.raises(UserError, match="non-empty"):
        tiny.embed_text([])
    with pytest.raises(UserError, match="width"):
        tiny.eps(jnp.zeros((1, *tiny.x_shape)), jnp.zeros((1,), jnp.int32), jnp.zeros((1, 77, 7)))


def test_alphas_cumprod_from_config():
    linear = np.cumprod(1 - np.linspace(1e-4, 0.02, 1000))
    np.testing.assert_allclose(sd.alphas_cumprod_from_config({"beta_schedule": "linear"}),
                               linear, rtol=1e-6)
    betas = [0.1, 0.2, 0.3]
    np.testing.assert_allclose(sd.alphas_cumprod_from_config({"trained_betas": betas}),
                               [0.9, 0.72, 0.504], rtol=1e-6)
    with pytest.raises(UserError, match="squaredcos_cap_v2"):
        sd.alphas_cumprod_from_config({"beta_schedule": "squaredcos_cap_v2"})
