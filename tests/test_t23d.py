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


def test_nfsd_step_reads_the_negative_prompt():
    """NFSD at t >= 200: `L_proj = W (e_u - e_neg)`, `L_cond = W w (e_c - e_u)`. With the
    prompt as its own negative, `L_proj = -L_cond / w` (norms in ratio 1/w); with the null
    prompt as the negative, `L_proj = 0`. Without the negative prompt (`neg = u`) the first
    would read 0 as well."""
    from lmc_jax import parallel
    from lmc_jax.priors.factory import build_prior

    c = _config()
    c.guidance.method, c.guidance.negative_prompt = "nfsd", "green"
    c.guidance.t_min = 300  # every t above nfsd_threshold = 200
    c.batch = 2
    prior = build_prior(c.prior)
    mesh = parallel.mesh_from_config(c)
    _, state, step = t23d.setup(c, prior, "green", mesh)
    assert "emb_neg" in step.consts
    np.testing.assert_array_equal(np.asarray(step.consts["emb_neg"]),
                                  np.asarray(prior.embed_text(["green"])))
    _, m = step(state)
    l_cond, l_proj = float(m["L_cond_grad_norm"]), float(m["L_proj_grad_norm"])
    assert l_cond > 1e-3, m
    np.testing.assert_allclose(l_proj, l_cond / c.guidance.w, rtol=1e-4)
    # The same compiled step with the null prompt as the negative: delta_D = e_u - e_u = 0.
    consts = {**step.consts, "emb_neg": parallel.replicate(prior.embed_text([""]), mesh)}
    _, m0 = step.jitted(state, consts)
    # (0 up to float rounding: e_u and e_neg come from different rows of one batched call)
    assert float(m0["L_proj_grad_norm"]) < 1e-4 * float(m0["L_cond_grad_norm"]), m0
