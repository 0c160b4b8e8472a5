"""CLIP from a PyTorch-format folder (converted once, cached) and the applications' CLIP figures
(`clip_view_metrics`), on a tiny random CLIP the test writes."""

import jax
import numpy as np
import pytest
from flax.traverse_util import flatten_dict

from lmc_jax import _compat
from lmc_jax.metrics import clip
from lmc_jax.priors.sd_tiny import pytorch_state_dict
from lmc_jax.priors.tokenizer import byte_tokenizer_path

SIZE = 32
MEAN, STD = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("lmc_cache")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(PyTorch-format folder, the never-saved FlaxCLIPModel, its params, tokenizer)."""
    from safetensors.numpy import save_file

    tr = _compat.transformers()
    tokenizer = tr.CLIPTokenizer.from_pretrained(str(byte_tokenizer_path()))
    text = dict(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64,
                num_hidden_layers=1, num_attention_heads=4, max_position_embeddings=77,
                bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.pad_token_id)
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                  num_attention_heads=4, image_size=SIZE, patch_size=8)
    config = tr.CLIPConfig(text_config=text, vision_config=vision, projection_dim=16)
    model = tr.FlaxCLIPModel(config, _do_init=False)
    rng = np.random.default_rng(0)

    def leaf(path, spec):
        if path[-1].key == "logit_scale":
            return np.asarray(2.6, np.float32)
        scale = 1 / np.sqrt(spec.shape[0]) if len(spec.shape) > 1 else 0.1
        return (scale * rng.standard_normal(spec.shape)).astype(np.float32)

    params = jax.tree_util.tree_map_with_path(leaf, dict(model.params_shape_tree))
    folder = tmp_path_factory.mktemp("clip_pt")
    config.architectures = ["CLIPModel"]
    config.save_pretrained(folder)
    save_file(pytorch_state_dict(params), str(folder / "model.safetensors"),
              metadata={"format": "pt"})
    tokenizer.save_pretrained(folder)
    tr.CLIPImageProcessor(size={"shortest_edge": SIZE}, crop_size=SIZE, image_mean=list(MEAN),
                          image_std=list(STD)).save_pretrained(folder)
    return folder, model, params, tokenizer


@pytest.fixture(scope="module")
def loaded(tiny, cache):
    model = clip.load_clip(str(tiny[0]), cache_dir=str(cache))
    assert isinstance(model, clip.ClipModel), model
    return model


def test_pytorch_clip_folder_loads_the_same_weights_and_caches_them(tiny, loaded, cache,
                                                                    monkeypatch):
    from safetensors import safe_open

    with safe_open(str(tiny[0] / "model.safetensors"), "np") as f:  # PyTorch names
        assert "vision_model.encoder.layers.0.self_attn.q_proj.weight" in f.keys()
    want = flatten_dict(tiny[2])
    got = flatten_dict(loaded.params)
    assert set(want) == set(got)
    for k in want:
        np.testing.assert_array_equal(np.asarray(got[k]), want[k], err_msg=str(k))
    import transformers.modeling_flax_pytorch_utils as tconv

    def boom(*a, **k):
        raise AssertionError("converted again")

    monkeypatch.setattr(tconv, "convert_pytorch_state_dict_to_flax", boom)
    again = clip.load_clip(str(tiny[0]), cache_dir=str(cache))
    assert isinstance(again, clip.ClipModel), again  # from the cache, not converted again


def test_clip_view_metrics_against_numpy(tiny, loaded):
    """CLIP score and R-precision of 'views' from the never-saved model's features in numpy."""
    _, model, params, tokenizer = tiny
    rng = np.random.default_rng(3)
    views = np.clip(rng.standard_normal((5, SIZE, SIZE, 3)) * 0.3, -1, 1).astype(np.float32)
    prompt = "a DSLR photo of a teapot"
    cands = [*clip.DEFAULT_PROMPT_SET, prompt]
    out = clip.clip_view_metrics(views, prompt, loaded)
    pixels = ((((views + 1) / 2) - np.array(MEAN)) / np.array(STD)).transpose(0, 3, 1, 2)
    image_fn = jax.jit(lambda p, x: model.get_image_features(x, params=p))  # eager is slower
    text_fn = jax.jit(lambda p, ids, mask: model.get_text_features(ids, mask, params=p))
    img = np.asarray(image_fn(params, pixels.astype(np.float32)), np.float64)
    tok = tokenizer(cands, padding=True, return_tensors="np")  # longest, not max_length
    txt = np.asarray(text_fn(params, tok.input_ids, tok.attention_mask), np.float64)
    cos = (img / np.linalg.norm(img, axis=1, keepdims=True)) @ (
        txt / np.linalg.norm(txt, axis=1, keepdims=True)).T
    true = len(cands) - 1
    assert out["clip_prompt_set_size"] == len(cands)
    assert out["clip_score"] == pytest.approx(np.mean(100 * np.maximum(cos[:, true], 0)),
                                              abs=1e-3)
    rank = np.sum(cos > cos[:, true:true + 1] + 1e-6, axis=1)
    assert out["clip_r_precision"] == pytest.approx(np.mean(rank < 1))
    # a prompt already in the set is not added twice
    assert clip.prompt_set_with(cands[2])[0] == list(clip.DEFAULT_PROMPT_SET)
    assert clip.prompt_set_with(cands[2])[1] == 2


def test_unavailable_clip_is_said_in_the_log(tmp_path, capsys):
    views = np.zeros((2, SIZE, SIZE, 3), np.float32)
    out = clip.clip_view_metrics(views, "a cat", str(tmp_path / "no_clip"))
    assert out["clip_score"].startswith("unavailable: ") and "no_clip" in out["clip_score"]
    assert out["clip_r_precision"] == out["clip_score"]
    line = capsys.readouterr().out.strip()
    assert line.startswith("WARNING: CLIP metrics not computed:") and "\n" not in line


def test_t23d_reports_clip_r_precision_when_clip_path_is_set(tiny, tmp_path, monkeypatch):
    import json
    import os

    from lmc_jax.apps import t23d
    from lmc_jax.config import load_config

    monkeypatch.setenv("LMC_JAX_CACHE", str(tmp_path / "cache"))
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    c = load_config(os.path.join(root, "configs", "t23d.py"), "mixture")  # exact prior: cheap
    c.steps, c.render.size, c.render.num_coarse, c.render.num_fine = 2, 16, 8, 8
    c.field.width, c.output.video_frames, c.output.video_size = 16, 4, 16
    c.output.mesh_resolution, c.output.grid_every, c.log_every, c.checkpoint_every = 16, 2, 2, 2
    c.clip_path = str(tiny[0])
    metrics = t23d.run(c, str(tmp_path / "run"))
    assert metrics["clip_prompt_set_size"] == len(clip.DEFAULT_PROMPT_SET) + 1
    assert 0.0 <= metrics["clip_score"] <= 100.0
    assert metrics["clip_r_precision"] * 8 == round(metrics["clip_r_precision"] * 8)  # 8 views
    saved = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert saved["clip_r_precision"] == metrics["clip_r_precision"]
