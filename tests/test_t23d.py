"""The text-to-3D app end to end on the exact mixture prior, and its bad-input errors."""

import json
import os

import imageio.v2 as iio
import numpy as np
import pytest

from lmc_jax.apps import t23d
from lmc_jax.config import load_config
from lmc_jax.errors import UserError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _config(preset="mixture"):
    c = load_config(os.path.join(ROOT, "configs", "t23d.py"), preset)
    c.steps = 4
    c.render.size = 16
    c.render.num_coarse = 8
    c.render.num_fine = 8
    c.field.width = 16
    c.output.video_frames = 6
    c.output.video_size = 16
    c.output.mesh_resolution = 16
    c.output.mesh_threshold = 5.0
    c.output.grid_every = 2
    c.log_every = 2
    c.checkpoint_every = 2
    return c


def test_short_run_writes_video_mesh_grids_and_resumes(tmp_path):
    c = _config()
    metrics = t23d.run(c, str(tmp_path))
    assert all(np.isfinite(v) for v in metrics.values() if isinstance(v, float))
    video = metrics["video"]
    frames = iio.mimread(video) if video.endswith(".gif") else [f for f in iio.get_reader(video)]
    assert len(frames) == 6 and frames[0].shape[:2] == (16, 16)
    assert (tmp_path / "mesh.obj").exists() and (tmp_path / "mesh.ply").exists()
    assert metrics["mesh_faces"] > 0
    assert (tmp_path / "grid_000002.png").exists() and (tmp_path / "grid_000004.png").exists()
    lines = (tmp_path / "metrics.jsonl").read_text().strip().splitlines()
    assert [json.loads(ln)["step"] for ln in lines] == [2, 4]
    # Asking for more steps in the same workdir continues from the checkpoint at step 4.
    c.steps = 6
    t23d.run(c, str(tmp_path))
    lines = (tmp_path / "metrics.jsonl").read_text().strip().splitlines()
    assert [json.loads(ln)["step"] for ln in lines] == [2, 4, 6]


@pytest.mark.parametrize("key,value,needle", [
    ("prompt", "  ", "prompt is empty"),
    ("steps", 0, "steps must be > 0"),
    ("render.size", 12, "render.size=12"),
    ("render.size", 64, "render.size=64"),
])
def test_bad_input_is_a_clear_error(tmp_path, key, value, needle):
    c = _config()
    section, _, leaf = key.rpartition(".")
    (c[section] if section else c)[leaf] = value
    with pytest.raises(UserError, match=needle):
        t23d.run(c, str(tmp_path))


def test_default_preset_without_weights_says_where_to_get_them(tmp_path):
    c = _config("")
    with pytest.raises(UserError, match=":tiny"):
        t23d.run(c, str(tmp_path))


def test_tiny_preset_uses_the_embedded_prior_and_reports_the_evaluator(tmp_path):
    c = _config("tiny")
    assert c.prior.name == "embedded" and c.guidance.bias_path == "embedded"
    c.steps = 2
    c.output.grid_every = 2
    metrics = t23d.run(c, str(tmp_path))
    for key in ("eval_accuracy", "eval_r_precision"):
        assert 0.0 <= metrics[key] <= 1.0, metrics
    assert metrics["colourfulness_ratio"] > 0
    saved = json.loads((tmp_path / "metrics.json").read_text())
    assert saved["eval_r_precision"] == metrics["eval_r_precision"]


def test_tiny_preset_rejects_words_the_prior_never_saw(tmp_path):
    c = _config("tiny")
    c.prompt = "a DSLR photo of a fox"
    with pytest.raises(UserError, match="'fox'"):
        t23d.run(c, str(tmp_path))
