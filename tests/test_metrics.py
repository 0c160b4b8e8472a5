"""Image metrics: CLIP score / R-precision, LPIPS, colour figures.

Every figure is checked against an independent computation: CLIP against cosine similarities
of transformers' own `get_image_features` / `get_text_features` computed in numpy (and the
preprocessing against `CLIPImageProcessor`); LPIPS against the published formula written out in
numpy on the backbone's features (and the backbone against a numpy convolution); the colour
figures against hand-computed values.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import subprocess
import sys
import time

import _clip
import numpy as np
import pytest
from flax.traverse_util import flatten_dict

from lmc_jax import _compat
from lmc_jax.errors import UserError
from lmc_jax.metrics import Unavailable, clip, color
from lmc_jax.metrics.convert_lpips import convert, save, torchvision_conv_indices
from lmc_jax.metrics.convert_lpips import main as convert_main

# `lmc_jax.metrics.lpips` is the function (re-exported); the module is reached through sys.modules.
L = importlib.import_module("lmc_jax.metrics.lpips")

CLIP_SIZE = 32
# Non-default constants, so that a loader ignoring preprocessor_config.json fails.
CLIP_MEAN = (0.45, 0.5, 0.55)
CLIP_STD = (0.3, 0.25, 0.2)
PROMPTS = ["a red cube", "a photo of a dog", "an astronaut riding a horse", "", "zebra"]


def _smooth_images(rng, n, h, w):
    """Low-frequency images in (-1, 1): bicubic resizes of them agree across implementations."""
    yy, xx = np.meshgrid(np.linspace(0, 1, h), np.linspace(0, 1, w), indexing="ij")
    out = np.zeros((n, h, w, 3))
    for _ in range(4):
        f, g = rng.uniform(0.5, 2.5, (2, n, 1, 1, 3))
        phase = rng.uniform(0, 6, (n, 1, 1, 3))
        out += 0.2 * np.sin(2 * np.pi * (f * yy[None, ..., None] + g * xx[None, ..., None]) + phase)
    return np.clip(out, -0.95, 0.95).astype(np.float32)


# ----------------------------------------------------------------------------------------------
# CLIP


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory):
    """(folder, FlaxCLIPModel, its params, tokenizer): a random CLIP saved like a download."""
    model, params, tokenizer = _clip.random_clip(CLIP_SIZE)
    folder = _clip.save_clip(tmp_path_factory.mktemp("tiny_clip"), model, params, tokenizer,
                             CLIP_MEAN, CLIP_STD)
    return folder, model, params, tokenizer


@pytest.fixture(scope="module")
def loaded_clip(tiny_clip):
    model = clip.load_clip(str(tiny_clip[0]))
    assert isinstance(model, clip.ClipModel), model
    return model


@pytest.fixture(scope="module")
def clip_images():
    return _smooth_images(np.random.default_rng(1), 6, CLIP_SIZE, CLIP_SIZE)


@pytest.fixture(scope="module")
def numpy_cosines(tiny_clip, clip_images):
    """[6, 5] cosines of images x PROMPTS from the original (never saved) model, in numpy."""
    _, model, params, tokenizer = tiny_clip
    return _clip.numpy_cosines(model, params, tokenizer, clip_images, PROMPTS, CLIP_MEAN,
                               CLIP_STD)


def test_clip_score_matches_numpy_cosine(loaded_clip, clip_images, numpy_cosines):
    sims = numpy_cosines
    # Image i gets its most similar prompt (first half) or its least similar one (second half),
    # so that both branches of max(cos, 0) are exercised.
    pick = np.concatenate([sims[:3].argmax(1), sims[3:].argmin(1)])
    expected = 100 * np.maximum(sims[np.arange(6), pick], 0)
    assert np.sum(expected > 0) >= 2 and np.sum(expected == 0) >= 2, sims
    got = np.asarray(clip.clip_score(loaded_clip, clip_images, [PROMPTS[j] for j in pick]))
    assert got.shape == (6,)
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-3)
    feats = clip.cosine_similarity(clip.image_features(loaded_clip, clip_images),
                                   clip.text_features(loaded_clip, PROMPTS))
    np.testing.assert_allclose(np.asarray(feats), sims, rtol=0, atol=1e-5)


def test_clip_reload_is_exact(tiny_clip, loaded_clip, clip_images, tmp_path):
    _, _, params, _ = tiny_clip
    want, got = flatten_dict(params), flatten_dict(loaded_clip.params)
    assert set(want) == set(got)
    for key in want:
        np.testing.assert_array_equal(np.asarray(got[key]), want[key], err_msg=str(key))
    assert loaded_clip.image_size == CLIP_SIZE and loaded_clip.max_length == 77
    np.testing.assert_allclose(loaded_clip.mean, CLIP_MEAN)
    np.testing.assert_allclose(loaded_clip.std, CLIP_STD)
    # A folder with model.safetensors instead of flax_model.msgpack loads the same weights.
    st_folder = tmp_path / "safetensors_clip"
    tiny_clip[1].save_pretrained(st_folder, params=params, safe_serialization=True)
    for name in ("vocab.json", "merges.txt", "tokenizer_config.json", "special_tokens_map.json"):
        (st_folder / name).write_bytes((tiny_clip[0] / name).read_bytes())
    assert not (st_folder / "flax_model.msgpack").exists()
    from_st = clip.load_clip(str(st_folder))
    assert isinstance(from_st, clip.ClipModel), from_st
    for key, value in flatten_dict(from_st.params).items():
        np.testing.assert_array_equal(np.asarray(value), want[key], err_msg=str(key))
    # The same compiled functions on the original (never saved) weights: identical scores.
    original = dataclasses.replace(loaded_clip, params=params)
    prompts = PROMPTS + ["zebra"]
    np.testing.assert_array_equal(np.asarray(clip.clip_score(original, clip_images, prompts)),
                                  np.asarray(clip.clip_score(loaded_clip, clip_images, prompts)))


def test_clip_preprocess_matches_clip_image_processor():
    tr = _compat.transformers()
    assert tuple(tr.CLIPImageProcessor().image_mean) == pytest.approx(clip.OPENAI_CLIP_MEAN)
    assert tuple(tr.CLIPImageProcessor().image_std) == pytest.approx(clip.OPENAI_CLIP_STD)
    rng = np.random.default_rng(2)
    proc = tr.CLIPImageProcessor(size={"shortest_edge": CLIP_SIZE}, crop_size=CLIP_SIZE)
    for h, w in [(40, 48), (90, 70), (20, 24), (CLIP_SIZE, CLIP_SIZE)]:
        u8 = np.round((_smooth_images(rng, 2, h, w) + 1) * 127.5).astype(np.uint8)
        ref = proc(images=list(u8), return_tensors="np").pixel_values
        got = np.asarray(clip.preprocess(u8 / 127.5 - 1, CLIP_SIZE))
        assert got.shape == ref.shape == (2, 3, CLIP_SIZE, CLIP_SIZE)
        # The processor resizes in uint8: agreement to one 8-bit step (1/255/std = 0.0146).
        assert np.abs(got - ref).max() < 0.02, (h, w, np.abs(got - ref).max())


def test_r_precision_known_answer():
    cands = np.eye(3)  # candidate prompts along the axes
    images = np.array([
        [1.0, 0.1, 0.0],  # true 0: ranked 1st
        [0.2, 1.0, 0.5],  # true 2: ranked 2nd (after 1)
        [0.9, 0.5, 0.1],  # true 2: ranked 3rd
        [0.0, 0.0, 1.0],  # true 2: ranked 1st
    ])
    true = np.array([0, 2, 2, 2])
    assert clip.r_precision_from_features(images, cands, true, k=1) == 0.5
    assert clip.r_precision_from_features(images, cands, true, k=2) == 0.75
    assert clip.r_precision_from_features(images, cands, true, k=3) == 1.0
    # Cosine: positive rescaling of either side changes nothing.
    scaled = clip.r_precision_from_features(images * np.array([[3.0], [0.1], [7.0], [2.0]]),
                                            cands * np.array([[5.0], [0.5], [2.0]]), true, k=1)
    assert scaled == 0.5
    # Ties count in the image's favour.
    assert clip.r_precision_from_features(np.array([[1.0, 1.0, 0.0]]), cands, [1], k=1) == 1.0
    with pytest.raises(UserError, match="outside"):
        clip.r_precision_from_features(images, cands, [0, 1, 2, 3])
    with pytest.raises(UserError, match="k must be"):
        clip.r_precision_from_features(images, cands, true, k=0)


def test_r_precision_through_model(loaded_clip, clip_images, numpy_cosines):
    best, worst = numpy_cosines.argmax(1), numpy_cosines.argmin(1)
    m = len(PROMPTS)
    assert clip.r_precision(loaded_clip, clip_images, best, PROMPTS, k=1) == 1.0
    assert clip.r_precision(loaded_clip, clip_images, worst, PROMPTS, k=1) == 0.0
    assert clip.r_precision(loaded_clip, clip_images, worst, PROMPTS, k=m - 1) == 0.0
    assert clip.r_precision(loaded_clip, clip_images, worst, PROMPTS, k=m) == 1.0


def test_clip_bad_inputs(loaded_clip, clip_images):
    with pytest.raises(UserError, match="6 images and 2 prompts"):
        clip.clip_score(loaded_clip, clip_images, ["a", "b"])
    with pytest.raises(UserError, match="NHWC"):
        clip.clip_score(loaded_clip, clip_images[0], ["a"])


def test_clip_unavailable_never_raises(tiny_clip, tmp_path, monkeypatch):
    missing = tmp_path / "no_clip_here"
    u = clip.load_clip(str(missing))
    assert isinstance(u, Unavailable) and u.name == "clip"
    assert str(missing) in u.reason and "huggingface-cli download" in u.reason
    assert json.loads(json.dumps({"clip_score": str(u)}))["clip_score"].startswith("unavailable: ")

    no_weights = tmp_path / "no_weights"
    no_weights.mkdir()
    (no_weights / "config.json").write_text((tiny_clip[0] / "config.json").read_text())
    u = clip.load_clip(str(no_weights))
    assert isinstance(u, Unavailable) and "flax_model.msgpack" in u.reason

    corrupt = tmp_path / "corrupt"
    corrupt.mkdir()
    for f in tiny_clip[0].iterdir():
        (corrupt / f.name).write_bytes(f.read_bytes())
    (corrupt / "flax_model.msgpack").write_bytes(b"not msgpack")
    u = clip.load_clip(str(corrupt))
    assert isinstance(u, Unavailable) and str(corrupt) in u.reason and "\n" not in u.reason

    import huggingface_hub

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hf_cache"))
    start = time.monotonic()
    u = clip.load_clip("lmc-jax-test/no-such-clip")
    assert isinstance(u, Unavailable) and "lmc-jax-test/no-such-clip" in u.reason
    assert time.monotonic() - start < 20


# ----------------------------------------------------------------------------------------------
# LPIPS

# The constants of the reference implementation (lpips/pretrained_networks.py ScalingLayer).
REF_SHIFT = np.array([-0.030, -0.088, -0.188])
REF_SCALE = np.array([0.458, 0.448, 0.450])
VGG_CONVS = [(3, 64), (64, 64), (64, 128), (128, 128), (128, 256), (256, 256), (256, 256),
             (256, 512), (512, 512), (512, 512), (512, 512), (512, 512), (512, 512)]
TAP_CHANNELS = [64, 128, 256, 512, 512]


@pytest.fixture(scope="module")
def lpips_weights():
    """Random VGG16-LPIPS weights as the file stores them (HWIO kernels, He-scaled)."""
    rng = np.random.default_rng(3)
    names = [f"conv{b + 1}_{i + 1}" for b, n in enumerate([2, 2, 3, 3, 3]) for i in range(n)]
    w = {}
    for name, (c_in, c_out) in zip(names, VGG_CONVS, strict=True):
        w[f"{name}/kernel"] = (rng.standard_normal((3, 3, c_in, c_out))
                               * np.sqrt(2 / (9 * c_in))).astype(np.float32)
        w[f"{name}/bias"] = (0.05 * rng.standard_normal(c_out)).astype(np.float32)
    for tap, c in enumerate(TAP_CHANNELS):
        w[f"lin{tap}"] = rng.uniform(0, 1, c).astype(np.float32)
    return w


@pytest.fixture(scope="module")
def lpips_file(lpips_weights, tmp_path_factory):
    path = tmp_path_factory.mktemp("lpips") / "lpips_vgg.npz"
    np.savez(path, **lpips_weights)
    return path


@pytest.fixture(scope="module")
def lpips_model(lpips_file):
    model = L.load_lpips(lpips_file)
    assert isinstance(model, L.Lpips), model
    return model


@pytest.fixture(scope="module")
def image_pair():
    rng = np.random.default_rng(4)
    # 16 x 24: the taps are 16x24, 8x12, 4x6, 2x3 and 1x1 (the last pool floors 2x3).
    a = rng.uniform(-1, 1, (2, 16, 24, 3)).astype(np.float32)
    b = np.clip(a + 0.3 * rng.standard_normal(a.shape), -1, 1).astype(np.float32)
    return a, b


def _conv3x3_relu(x, kernel, bias):
    """Numpy 'same' 3x3 cross-correlation + ReLU, [N, H, W, Ci] x [3, 3, Ci, Co]."""
    n, h, w, _ = x.shape
    p = np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
    out = sum(np.einsum("nhwc,cd->nhwd", p[:, dy:dy + h, dx:dx + w], kernel[dy, dx])
              for dy in range(3) for dx in range(3))
    return np.maximum(out + bias, 0)


def test_lpips_backbone_matches_numpy_convolution(lpips_model, lpips_weights, image_pair):
    a = image_pair[0]
    w = {k: v.astype(np.float64) for k, v in lpips_weights.items()}
    x = (a.astype(np.float64) - REF_SHIFT) / REF_SCALE
    x = _conv3x3_relu(x, w["conv1_1/kernel"], w["conv1_1/bias"])
    relu1_2 = _conv3x3_relu(x, w["conv1_2/kernel"], w["conv1_2/bias"])
    n, h, wd, c = relu1_2.shape
    x = relu1_2.reshape(n, h // 2, 2, wd // 2, 2, c).max(axis=(2, 4))
    x = _conv3x3_relu(x, w["conv2_1/kernel"], w["conv2_1/bias"])
    relu2_2 = _conv3x3_relu(x, w["conv2_2/kernel"], w["conv2_2/bias"])
    taps = L.features(lpips_model, a)
    assert [t.shape for t in taps] == [(2, 16, 24, 64), (2, 8, 12, 128), (2, 4, 6, 256),
                                       (2, 2, 3, 512), (2, 1, 1, 512)]
    for ref, got in [(relu1_2, taps[0]), (relu2_2, taps[1])]:
        got = np.asarray(got, np.float64)
        assert np.linalg.norm(got - ref) / np.linalg.norm(ref) < 1e-5


def test_lpips_matches_numpy_formula(lpips_model, lpips_weights, image_pair):
    a, b = image_pair
    taps_a = [np.asarray(t, np.float64) for t in L.features(lpips_model, a)]
    taps_b = [np.asarray(t, np.float64) for t in L.features(lpips_model, b)]
    expected = np.zeros(a.shape[0])
    for tap, (ya, yb) in enumerate(zip(taps_a, taps_b, strict=True)):
        na = ya / (np.sqrt(np.sum(ya**2, axis=-1, keepdims=True)) + 1e-10)
        nb = yb / (np.sqrt(np.sum(yb**2, axis=-1, keepdims=True)) + 1e-10)
        weighted = np.einsum("nhwc,c->nhw", (na - nb) ** 2, lpips_weights[f"lin{tap}"])
        expected += weighted.mean(axis=(1, 2))
    got = np.asarray(L.lpips(lpips_model, a, b))
    assert got.shape == (2,) and np.all(expected > 0)
    np.testing.assert_allclose(got, expected, rtol=1e-5)


def test_lpips_metric_properties(lpips_model, image_pair):
    a, b = image_pair
    d_ab = np.asarray(L.lpips(lpips_model, a, b))
    assert np.all(np.asarray(L.lpips(lpips_model, a, a)) == 0)
    np.testing.assert_allclose(np.asarray(L.lpips(lpips_model, b, a)), d_ab, rtol=1e-6)
    assert np.all(d_ab > 0)
    far = np.asarray(L.lpips(lpips_model, a, -a))
    assert np.all(far >= 0)
    with pytest.raises(UserError, match="height and width >= 16"):
        L.lpips(lpips_model, a[:, :8], b[:, :8])


def test_lpips_unavailable_never_raises(lpips_weights, tmp_path):
    cases = {}
    cases["missing"] = tmp_path / "none.npz"
    cases["folder"] = tmp_path
    cases["corrupt"] = tmp_path / "corrupt.npz"
    cases["corrupt"].write_bytes(b"PK\x03\x04 not a zip")
    partial = dict(lpips_weights)
    del partial["conv3_2/bias"]
    cases["partial"] = tmp_path / "partial.npz"
    np.savez(cases["partial"], **partial)
    negative = {**lpips_weights, "lin2": -lpips_weights["lin2"]}
    cases["negative"] = tmp_path / "negative.npz"
    np.savez(cases["negative"], **negative)
    reasons = {}
    for name, path in cases.items():
        u = L.load_lpips(path)
        assert isinstance(u, Unavailable) and u.name == "lpips", (name, u)
        assert str(path) in u.reason and "\n" not in u.reason, (name, u.reason)
        reasons[name] = u.reason
    assert "does not exist" in reasons["missing"] and "convert_lpips" in reasons["missing"]
    assert "conv3_2/bias" in reasons["partial"]
    assert "non-negative" in reasons["negative"]


def _torch_layout(weights):
    """The test's weights as torchvision / LPIPS state dicts (OIHW convs, [1, C, 1, 1] heads)."""
    names = [k[:-len("/kernel")] for k in weights if k.endswith("/kernel")]
    vgg = {}
    for name, idx in zip(names, torchvision_conv_indices(), strict=True):
        vgg[f"features.{idx}.weight"] = weights[f"{name}/kernel"].transpose(3, 2, 0, 1)
        vgg[f"features.{idx}.bias"] = weights[f"{name}/bias"]
    lin = {f"lin{t}.model.1.weight": weights[f"lin{t}"].reshape(1, -1, 1, 1) for t in range(5)}
    return vgg, lin


def test_convert_lpips_from_torch_layout(lpips_weights, lpips_model, image_pair, tmp_path):
    assert torchvision_conv_indices() == [0, 2, 5, 7, 10, 12, 14, 17, 19, 21, 24, 26, 28]
    vgg, lin = _torch_layout(lpips_weights)
    out = convert(vgg, lin)
    assert set(out) == set(lpips_weights)
    for k, v in lpips_weights.items():
        np.testing.assert_array_equal(out[k], v, err_msg=k)
    # An lpips.LPIPS().state_dict() names the convolutions net.slice{s}.{i}.
    slices = {k.replace("features.", "net.slice1."): v for k, v in vgg.items()}
    assert all(np.array_equal(convert({**slices, **lin}, {**slices, **lin})[k], v)
               for k, v in lpips_weights.items())
    # The command line on safetensors inputs (no torch needed) -> a file load_lpips reads.
    from safetensors.numpy import save_file

    vgg = {k: np.ascontiguousarray(v) for k, v in vgg.items()}
    save_file(vgg, str(tmp_path / "vgg.safetensors"))
    save_file(lin, str(tmp_path / "lin.safetensors"))
    dst = tmp_path / "lpips_vgg.safetensors"
    convert_main(["--vgg", str(tmp_path / "vgg.safetensors"), "--lin",
                  str(tmp_path / "lin.safetensors"), "--out", str(dst)])
    model = L.load_lpips(dst)
    assert isinstance(model, L.Lpips), model
    a, b = image_pair
    np.testing.assert_array_equal(np.asarray(L.lpips(model, a, b)),
                                  np.asarray(L.lpips(lpips_model, a, b)))
    with pytest.raises(SystemExit, match="lin0.model.1.weight"):
        convert(vgg, {})
    with pytest.raises(SystemExit, match=".npz or .safetensors"):
        save(out, tmp_path / "x.pt")


def test_metrics_package_does_not_import_converter_or_torch():
    code = ("import sys, lmc_jax.metrics; "
            "print(any(m in sys.modules for m in "
            "('lmc_jax.metrics.convert_lpips', 'torch', 'transformers')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False", out


# ----------------------------------------------------------------------------------------------
# Colour


def test_saturation_of_constant_images():
    colours = np.array([[0.3, 0.4, 0.0], [1.0, 0.0, 0.0]])
    images = np.broadcast_to(colours[:, None, None, :], (2, 5, 7, 3))
    refs = np.array([[0.0, 0.0, 0.25], [0.0, 2.0, 0.0]])  # ratios 0.5/0.25 = 2, 1/2 = 0.5
    np.testing.assert_allclose(np.asarray(color.saturation_per_image(images, refs)), [2.0, 0.5],
                               rtol=1e-6)
    assert float(color.saturation(images, refs)) == pytest.approx(1.25, rel=1e-6)
    shared = np.array([0.0, 0.0, 0.5])  # one reference for all: (0.5 + 1) / 2 / 0.5
    assert float(color.saturation(images, shared)) == pytest.approx(1.5, rel=1e-6)
    # Only the mean colour counts: zero-mean texture on top changes nothing.
    texture = 0.1 * np.sign(np.sin(np.arange(7)))[None, None, :, None] * np.ones((2, 5, 7, 3))
    texture -= texture.mean(axis=(1, 2), keepdims=True)
    assert float(color.saturation(images + texture, refs)) == pytest.approx(1.25, rel=1e-5)
    with pytest.raises(UserError, match="reference_colour"):
        color.saturation(images, np.ones((3, 3)))


def test_colorfulness():
    grey = np.broadcast_to(np.linspace(-1, 1, 8)[None, :, None, None], (1, 8, 8, 3))
    assert float(color.colorfulness(grey)[0]) == pytest.approx(0.0, abs=1e-4)
    red = np.zeros((1, 4, 4, 3)) + np.array([1.0, -1.0, -1.0])
    assert float(color.colorfulness(red)[0]) == pytest.approx(0.3 * np.hypot(255, 127.5), 1e-5)
    rng = np.random.default_rng(5)
    images = rng.uniform(-1, 1, (2, 6, 5, 3))
    rgb = (images + 1) * 127.5
    rg = rgb[..., 0] - rgb[..., 1]
    yb = 0.5 * (rgb[..., 0] + rgb[..., 1]) - rgb[..., 2]
    expected = (np.sqrt(rg.std(axis=(1, 2)) ** 2 + yb.std(axis=(1, 2)) ** 2)
                + 0.3 * np.sqrt(rg.mean(axis=(1, 2)) ** 2 + yb.mean(axis=(1, 2)) ** 2))
    got = np.asarray(color.colorfulness(images))
    np.testing.assert_allclose(got, expected, rtol=1e-4)
    assert np.all(got > 0)
