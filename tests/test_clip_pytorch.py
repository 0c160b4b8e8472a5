"""CLIP from a PyTorch-format folder (converted once, cached) and the applications' CLIP figures
(`clip_view_metrics`), on a tiny random CLIP the test writes."""

import _clip
import numpy as np
import pytest
from flax.traverse_util import flatten_dict

from lmc_jax.metrics import clip

SIZE = 32
MEAN, STD = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("lmc_cache")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(PyTorch-format folder, the never-saved FlaxCLIPModel, its params, tokenizer)."""
    model, params, tokenizer = _clip.random_clip(SIZE, layers=1)
    folder = _clip.save_clip(tmp_path_factory.mktemp("clip_pt"), model, params, tokenizer, MEAN,
                             STD, pytorch=True)
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
    cos = _clip.numpy_cosines(model, params, tokenizer, views, cands, MEAN, STD)
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
    c.output.view_size = 16
    c.output.mesh_resolution, c.output.grid_every, c.log_every, c.checkpoint_every = 16, 2, 2, 2
    c.clip_path = str(tiny[0])
    metrics = t23d.run(c, str(tmp_path / "run"))
    assert metrics["clip_prompt_set_size"] == len(clip.DEFAULT_PROMPT_SET) + 1
    assert 0.0 <= metrics["clip_score"] <= 100.0
    assert metrics["clip_r_precision"] * 8 == round(metrics["clip_r_precision"] * 8)  # 8 views
    saved = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert saved["clip_r_precision"] == metrics["clip_r_precision"]
