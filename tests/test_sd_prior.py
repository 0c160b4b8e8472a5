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


@pytest.fixture(scope="module", autouse=True)
def _cache(tmp_path_factory):
    """Converted weights go to a temporary cache, never the user's ~/.cache/lmc_jax."""
    with pytest.MonkeyPatch.context() as mp:
        cache = tmp_path_factory.mktemp("lmc_cache")
        mp.setenv("LMC_JAX_CACHE", str(cache))
        yield cache


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


def test_encoder_gradient_is_rematerialized_and_exact(saved, tiny):
    """The encoder keeps only convolution outputs for its backward pass (the rest is recomputed),
    and its gradient is the plain (not rematerialized) diffusers encoder's."""
    from jax._src.ad_checkpoint import saved_residuals

    img = jnp.tanh(jax.random.normal(jax.random.PRNGKey(2), (1, 32, 32, 3)))
    cot = jax.random.normal(jax.random.PRNGKey(3), (1, 16, 16, 4))
    g = jax.grad(lambda a: jnp.sum(tiny.encode(a) * cot))(img)
    vae, vparams = _compat.diffusers().FlaxAutoencoderKL.from_pretrained(str(saved / "vae"))
    scale = json.loads((saved / "vae" / "config.json").read_text())["scaling_factor"]

    def ref(a):
        nchw = jnp.transpose(a, (0, 3, 1, 2))
        return vae.apply({"params": vparams}, nchw, method=vae.encode).latent_dist.mean * scale

    g_ref = jax.grad(lambda a: jnp.sum(ref(a) * cot))(img)
    np.testing.assert_allclose(g, g_ref, atol=1e-5, rtol=1e-4)

    def activations(f):  # residuals computed in f (not weights, literals or the input)
        return [d for _, d in saved_residuals(f, img)
                if d.startswith("output of")]

    mine = activations(lambda a: tiny.encode_fn.__wrapped__(tiny.params, a))
    plain = activations(ref)
    assert mine and all("conv_general_dilated" in d for d in mine), mine
    assert any("conv_general_dilated" not in d for d in plain)  # what remat takes away


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


@pytest.fixture(scope="module")
def pt_folder(tmp_path_factory):
    """The tiny pipeline as a PyTorch-format folder in the official layout (no Flax files)."""
    return sd.save_tiny_pytorch_pipeline(tmp_path_factory.mktemp("pt") / "sd")


def _assert_same_params(a, b, cast=None):
    flat_a, flat_b = flatten_dict(a), flatten_dict(b)
    assert flat_a.keys() == flat_b.keys()
    for k in flat_a:
        want = np.asarray(flat_a[k])
        if cast is not None:
            want = want.astype(cast).astype(np.float32)
        np.testing.assert_array_equal(np.asarray(flat_b[k], np.float32), want, err_msg=str(k))


def test_pytorch_folder_has_the_official_layout(pt_folder):
    from safetensors import safe_open

    names = {p.relative_to(pt_folder).as_posix() for p in pt_folder.rglob("*") if p.is_file()}
    assert {"model_index.json", "unet/config.json", "unet/diffusion_pytorch_model.safetensors",
            "vae/diffusion_pytorch_model.safetensors", "text_encoder/model.safetensors",
            "scheduler/scheduler_config.json", "tokenizer/vocab.json"} <= names
    assert not any(n.endswith(".msgpack") for n in names)
    index = json.loads((pt_folder / "model_index.json").read_text())
    assert index["unet"] == ["diffusers", "UNet2DConditionModel"]
    with safe_open(str(pt_folder / "unet" / "diffusion_pytorch_model.safetensors"), "np") as f:
        keys = set(f.keys())
        w = f.get_tensor("down_blocks.0.attentions.0.transformer_blocks.0.ff.net.0.proj.weight")
    assert {"conv_in.weight", "down_blocks.0.resnets.0.conv1.weight",
            "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_out.0.weight",
            "down_blocks.0.downsamplers.0.conv.weight", "up_blocks.1.attentions.0.proj_in.weight",
            "mid_block.resnets.1.time_emb_proj.weight", "conv_norm_out.weight"} <= keys
    assert w.shape == (2 * 4 * 32, 32)  # torch Linear: [out, in] (GEGLU: 2 x 4 x dim)
    with safe_open(str(pt_folder / "vae" / "diffusion_pytorch_model.safetensors"), "np") as f:
        assert {"encoder.mid_block.attentions.0.to_q.weight", "decoder.conv_out.weight",
                "quant_conv.weight"} <= set(f.keys())
    with safe_open(str(pt_folder / "text_encoder" / "model.safetensors"), "np") as f:
        assert {"text_model.encoder.layers.0.self_attn.q_proj.weight",
                "text_model.embeddings.token_embedding.weight"} <= set(f.keys())


def test_pytorch_folder_loads_without_a_flag_and_the_second_load_is_cached(
        pt_folder, tiny, _cache, monkeypatch):
    pt = sd.load_stable_diffusion(str(pt_folder))
    _assert_same_params(tiny.params, pt.params)
    entries = sorted((_cache / "flax").iterdir())
    assert len(entries) == 3  # unet, vae, text encoder
    # the second load reads the cache: the converters are never called
    import diffusers.models.modeling_flax_pytorch_utils as dconv
    import transformers.modeling_flax_pytorch_utils as tconv

    def boom(*a, **k):
        raise AssertionError("converted again")

    monkeypatch.setattr(dconv, "convert_pytorch_state_dict_to_flax", boom)
    monkeypatch.setattr(tconv, "convert_pytorch_state_dict_to_flax", boom)
    again = sd.load_stable_diffusion(str(pt_folder), from_pt=True)
    _assert_same_params(tiny.params, again.params)
    # changed weights: a new key, converted again
    changed = _copy(pt_folder, pt_folder.parent / "changed")
    vae_file = changed / "vae" / "diffusion_pytorch_model.safetensors"
    from safetensors.numpy import load_file, save_file

    state = load_file(str(vae_file))
    state["decoder.conv_out.bias"] = state["decoder.conv_out.bias"] + 1.0
    save_file(state, str(vae_file), metadata={"format": "pt"})
    with pytest.raises(AssertionError, match="converted again"):
        sd.load_stable_diffusion(str(changed))


# --- a damaged converted-weights cache entry: set aside, converted again -----------------------


def _unet_entry(cache: Path) -> Path:
    """The converted-weights entry of the UNet in `cache` (by the folder its source.json names)."""
    for entry in (cache / "flax").iterdir():
        if json.loads((entry / "source.json").read_text())["folder"].endswith("unet"):
            return entry
    raise AssertionError("no unet entry")


def _half(f: Path) -> None:
    with open(f, "r+b") as fh:
        fh.truncate(f.stat().st_size // 2)


SD_DAMAGES = {
    "truncated weights": lambda e: _half(e / "flax.safetensors"),
    "source.json removed, folder left": lambda e: (e / "source.json").unlink(),
    "garbage source.json": lambda e: (e / "source.json").write_bytes(b"\x00garbage"),
    "no checksums, truncated weights": lambda e: ((e / "checksums.json").unlink(),
                                                  _half(e / "flax.safetensors")),
    "no checksums, garbage source.json": lambda e: ((e / "checksums.json").unlink(),
                                                    (e / "source.json").write_text("[]")),
}


@pytest.mark.parametrize("damage", list(SD_DAMAGES))
def test_damaged_converted_weights_are_set_aside_and_converted_again(pt_folder, tiny, tmp_path,
                                                                     capsys, damage):
    from lmc_jax.cache import entry_problem

    cache = tmp_path / "cache"
    sd.load_stable_diffusion(str(pt_folder), cache_dir=str(cache))
    entry = _unet_entry(cache)
    assert entry_problem(entry, cache) is None
    SD_DAMAGES[damage](entry)
    before = sorted(p.name for p in entry.iterdir())
    capsys.readouterr()
    again = sd.load_stable_diffusion(str(pt_folder), cache_dir=str(cache))
    _assert_same_params(tiny.params, again.params)
    warnings = [ln for ln in capsys.readouterr().err.splitlines() if "WARNING" in ln]
    assert len(warnings) == 1 and str(entry) in warnings[0], warnings
    aside = [p for p in (cache / "flax").iterdir() if ".damaged-" in p.name]
    assert len(aside) == 1 and aside[0].name.startswith(entry.name + ".damaged-")
    assert aside[0].name in warnings[0]
    assert sorted(p.name for p in aside[0].iterdir()) == before  # kept, not deleted
    assert entry_problem(entry, cache) is None  # stored again
    sd.load_stable_diffusion(str(pt_folder), cache_dir=str(cache))
    assert "WARNING" not in capsys.readouterr().err


def test_damaged_converted_weights_that_cannot_be_moved(pt_folder, tiny, tmp_path, capsys,
                                                        monkeypatch):
    from lmc_jax.priors import sd_load

    cache = tmp_path / "cache"
    sd.load_stable_diffusion(str(pt_folder), cache_dir=str(cache))
    entry = _unet_entry(cache)
    _half(entry / "flax.safetensors")

    def refuse(folder):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(sd_load, "set_aside", refuse)
    capsys.readouterr()
    again = sd.load_stable_diffusion(str(pt_folder), cache_dir=str(cache))  # converted anyway
    _assert_same_params(tiny.params, again.params)
    warnings = [ln for ln in capsys.readouterr().err.splitlines() if "WARNING" in ln]
    assert len(warnings) == 1 and f"delete the folder {entry}" in warnings[0], warnings


def test_conversion_moves_in_over_a_half_present_entry(pt_folder, tiny, tmp_path, capsys,
                                                       monkeypatch):
    """A folder that appears at the destination during the conversion (another writer, half
    done) is set aside; the new conversion takes its place."""
    from lmc_jax.priors import sd_load

    cache = tmp_path / "cache"
    real = sd_load._check_params
    intruded = []

    def intrude(expected, params, folder):
        if folder.name == "unet" and not intruded:
            entry = sd_load._cache_entry(folder, sd_load.pytorch_weight_files(
                folder, "diffusion_pytorch_model"), cache)
            entry.mkdir(parents=True)
            (entry / "flax.safetensors").write_bytes(b"\x08\x00")
            intruded.append(entry)
        return real(expected, params, folder)

    monkeypatch.setattr(sd_load, "_check_params", intrude)
    prior = sd.load_stable_diffusion(str(pt_folder), cache_dir=str(cache))
    _assert_same_params(tiny.params, prior.params)
    from lmc_jax.cache import entry_problem

    assert intruded and entry_problem(intruded[0], cache) is None
    assert capsys.readouterr().err.count("WARNING") == 1
    assert not [p for p in (cache / "flax").iterdir() if ".tmp" in p.name]


def test_single_file_conversion_cache_heals(tmp_path, saved, capsys, monkeypatch):
    """The single-file cache (a diffusers folder made by diffusers' converter, faked here: no
    torch in the test environment) is checked and set aside the same way."""
    import sys
    import types

    import diffusers

    from lmc_jax.priors import sd_load

    ckpt = tmp_path / "model.safetensors"
    ckpt.write_bytes(b"a single-file checkpoint")
    made = []

    class FakePipeline:
        @staticmethod
        def from_single_file(path, local_files_only):
            made.append(path)
            return FakePipeline()

        def save_pretrained(self, out, safe_serialization):
            shutil.copytree(saved, out)

    monkeypatch.setitem(sys.modules, "torch", types.ModuleType("torch"))
    monkeypatch.setattr(diffusers, "StableDiffusionPipeline", FakePipeline, raising=False)
    cache = tmp_path / "cache"
    first = sd_load._single_file_folder(ckpt, cache)
    assert (first / "checksums.json").is_file() and len(made) == 1
    assert sd_load._single_file_folder(ckpt, cache) == first and len(made) == 1
    (first / "model_index.json").unlink()
    capsys.readouterr()
    assert sd_load._single_file_folder(ckpt, cache) == first and len(made) == 2
    err = capsys.readouterr().err
    assert err.count("WARNING") == 1 and "model_index.json is missing" in err
    assert [p for p in first.parent.iterdir() if ".damaged-" in p.name]


def test_fp16_variant_folder(tiny, tmp_path):
    folder = sd.save_tiny_pytorch_pipeline(tmp_path / "fp16", variant="fp16")
    assert (folder / "unet" / "diffusion_pytorch_model.fp16.safetensors").is_file()
    assert not (folder / "unet" / "diffusion_pytorch_model.safetensors").exists()
    prior = sd.load_stable_diffusion(str(folder))
    _assert_same_params(tiny.params, prior.params, cast=np.float16)


def _fake_hub_cache(root: Path, repo: str, revisions: dict[str, Path]) -> Path:
    """A Hugging Face cache holding `repo` at the given revisions (ref -> folder)."""
    base = root / f"models--{repo.replace('/', '--')}"
    for i, (ref, src) in enumerate(revisions.items()):
        commit = f"{i + 1:040x}"
        shutil.copytree(src, base / "snapshots" / commit)
        (base / "refs").mkdir(parents=True, exist_ok=True)
        (base / "refs" / ref).write_text(commit)
    return root


def test_revision_reaches_the_loader(pt_folder, tmp_path, monkeypatch):
    import huggingface_hub

    from lmc_jax.config import prior_config
    from lmc_jax.priors import sd_load
    from lmc_jax.priors.factory import build_prior

    linear = _copy(pt_folder, tmp_path / "linear")
    cfg_file = linear / "scheduler" / "scheduler_config.json"
    cfg_file.write_text(json.dumps({**json.loads(cfg_file.read_text()),
                                    "beta_schedule": "linear", "beta_start": 1e-4,
                                    "beta_end": 0.02}))
    hub = _fake_hub_cache(tmp_path / "hub", "lmc-jax-test/tiny",
                          {"main": pt_folder, "v2": linear})
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(hub))
    monkeypatch.setattr(sd_load, "_hub_reachable", lambda endpoint: False)
    main = build_prior(prior_config("sd", path="lmc-jax-test/tiny"))
    np.testing.assert_allclose(main.alphas_cumprod, _scaled_linear(), rtol=1e-6)
    v2 = build_prior(prior_config("sd", path="lmc-jax-test/tiny", revision="v2"))
    np.testing.assert_allclose(v2.alphas_cumprod, np.cumprod(1 - np.linspace(1e-4, 0.02, 1000)),
                               rtol=1e-6)
    with pytest.raises(UserError, match="at revision 'v3'"):
        build_prior(prior_config("sd", path="lmc-jax-test/tiny", revision="v3"))


def test_single_file_checkpoint_error_says_how_to_convert(tmp_path):
    ckpt = tmp_path / "v2-1_512-ema-pruned.safetensors"
    from safetensors.numpy import save_file

    save_file({"model.diffusion_model.input_blocks.0.0.weight": np.zeros((4, 4, 3, 3),
                                                                          np.float32)}, str(ckpt))
    with pytest.raises(UserError) as err:
        sd.load_stable_diffusion(str(ckpt))
    msg = str(err.value)
    assert "\n" not in msg and "single-file checkpoint" in msg
    assert f"P.from_single_file('{ckpt}').save_pretrained('{tmp_path / 'v2-1_512-ema-pruned'}')" \
        in msg
    assert f"--config.prior.path={tmp_path / 'v2-1_512-ema-pruned'}" in msg


def test_random_bytes_folder_is_one_error_line(saved, tmp_path):
    rng = np.random.default_rng(0)
    folder = _copy(saved, tmp_path / "garbage")
    (folder / "model_index.json").write_bytes(rng.bytes(300))
    with pytest.raises(UserError, match="model_index.json is not a JSON file"):
        sd.load_stable_diffusion(str(folder))
    folder = _copy(saved, tmp_path / "garbage2")
    for f in folder.rglob("*"):
        if f.is_file():
            f.write_bytes(rng.bytes(200))
    with pytest.raises(UserError) as err:
        sd.load_stable_diffusion(str(folder))
    assert "\n" not in str(err.value)


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
