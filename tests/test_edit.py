"""Image editing on the exact mixture prior: every method moves toward the target class."""

import json
import os

import numpy as np
import pytest
from PIL import Image

from lmc_jax.apps import edit, synth
from lmc_jax.config import load_config
from lmc_jax.errors import UserError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _config(name, preset):
    return load_config(os.path.join(ROOT, "configs", f"{name}.py"), preset)


def _mean_colour_distance(images, colour):
    return float(np.linalg.norm(np.asarray(images).mean(axis=(0, 1, 2)) - colour))


def test_every_method_moves_the_image_toward_the_target_class(tmp_path):
    c = _config("edit", "mixture_compare")
    c.steps = 40
    c.snapshots = 2
    c.log_every = 0
    metrics = edit.run(c, str(tmp_path))
    assert set(metrics) == {"sds", "lmc", "dds", "nfsd", "csd"}
    for method, m in metrics.items():
        assert m["target_acc"] == 1.0, (method, m)
        assert m["dist_to_source"] > 0.1, method
    assert (tmp_path / "compare.png").exists()
    assert json.loads((tmp_path / "metrics.json").read_text())["lmc"]["target_acc"] == 1.0


def test_dds_with_equal_prompts_leaves_the_image_unchanged(tmp_path):
    c = _config("edit", "mixture")
    c.guidance.method = "dds"
    c.prompt = c.source_prompt = "red"
    c.steps = 5
    c.log_every = 0
    m = edit.run(c, str(tmp_path))
    assert m["dds"]["dist_to_source"] == 0.0
    # Run alone, DDS takes its own (official) settings too.
    assert m["dds"]["settings"]["optimizer"] == "sgd" and m["dds"]["settings"]["w"] == 6.5
    # No CLIP weights configured: the metric says why it is missing, and the run went on.
    assert m["dds"]["clip_score"].startswith("unavailable: ")


def test_dds_runs_with_its_official_settings_and_the_others_keep_theirs():
    c = _config("edit", "compare")
    gcfg, opt, replaced = edit.method_settings(c, "dds")
    # google/prompt-to-prompt DDS_zeroshot.ipynb: W(t) = 1, randint(50, 949), guidance_scale
    # 7.5, SGD lr 0.1 on 2000 * sum(z * grad) / (H * W).
    assert (gcfg.method, gcfg.w, gcfg.weighting, gcfg.t_min, gcfg.t_max) == (
        "dds", 6.5, "one", 50, 949)
    assert opt == {"optimizer": "sgd", "lr": 0.1, "grad_scale": 2000.0, "grad_reduce": "mean_hw"}
    assert set(replaced) == {"w", "weighting", "t_min", "t_max", "optimizer", "lr",
                             "grad_scale", "grad_reduce"}
    assert edit.effective_grad_scale(opt, (64, 64, 4)) == 2000.0 / 4096  # SD 1.5 at 512
    shared = (7.5, "sigma2", 20, 980, {"optimizer": "adam", "lr": 0.05, "grad_scale": 1.0,
                                       "grad_reduce": "sum"})
    for method in ("lmc", "nfsd", "csd"):
        g, o, r = edit.method_settings(c, method)
        assert (g.w, g.weighting, g.t_min, g.t_max, o) == shared and r == {}, method
        assert edit.effective_grad_scale(o, (64, 64, 4)) == 1.0
    g, o, r = edit.method_settings(c, "sds")
    assert g.w == 99.0 and r == {"w": (7.5, 99.0)} and o == shared[-1]
    # One method's own setting changes that method only; shared changes reach the others.
    c.per_method.csd.weighting = "one"
    c.guidance.w = 3.0
    assert edit.method_settings(c, "csd")[0].weighting == "one"
    assert edit.method_settings(c, "nfsd")[0].weighting == "sigma2"
    assert edit.method_settings(c, "nfsd")[0].w == 3.0
    assert edit.method_settings(c, "dds")[0].w == 6.5
    c.per_method.dds.grad_reduce = "mean"
    with pytest.raises(UserError, match="grad_reduce must be"):
        edit.method_settings(c, "dds")


def _write(path, mode, size):
    rng = np.random.default_rng(0)
    channels = {"L": 1, "RGB": 3, "RGBA": 4}[mode]
    arr = rng.integers(0, 255, (size[1], size[0], channels), dtype=np.uint8)
    Image.fromarray(arr[..., 0] if channels == 1 else arr, mode).save(path)


@pytest.mark.parametrize("mode,size", [("L", (32, 32)), ("RGBA", (40, 32)), ("RGB", (64, 48))])
def test_image_files_are_converted_and_resized_with_a_message(tmp_path, capsys, mode, size):
    c = _config("edit", "mixture")
    c.image = str(tmp_path / "in.png")
    _write(c.image, mode, size)
    c.steps = 2
    c.log_every = 0
    edit.run(c, str(tmp_path / "out"))
    said = capsys.readouterr().out
    if mode != "RGB":
        assert "converted" in said
    if size != (32, 32):
        assert "resized" in said and f"{size[0]}x{size[1]} to 32x32" in said


def test_bad_image_and_prompt_are_clear_errors(tmp_path):
    c = _config("edit", "mixture")
    c.image = str(tmp_path / "missing.png")
    with pytest.raises(UserError, match="does not exist"):
        edit.run(c, str(tmp_path))
    junk = tmp_path / "junk.png"
    junk.write_text("this is not a PNG")
    c.image = str(junk)
    with pytest.raises(UserError, match="not an image"):
        edit.run(c, str(tmp_path))
    c.image = ""
    c.prompt = ""
    with pytest.raises(UserError, match="prompt is empty"):
        edit.run(c, str(tmp_path))


def test_synth_reaches_the_prompted_colour_and_fixed_noise_seeds_differ(tmp_path):
    c = _config("synth", "mixture")
    c.steps = 60
    c.log_every = 0
    c.seeds = 2
    c.init = "noise"
    c.guidance.fixed_noise = True
    m = synth.run(c, str(tmp_path))
    from lmc_jax.priors.gaussian import DEFAULT_CLASSES

    colour = np.array(m["mean_colour"])[None, None, None]
    dists = {k: _mean_colour_distance(colour, np.array(v)) for k, v in DEFAULT_CLASSES.items()}
    assert c.prompt == "red" and min(dists, key=dists.get) == "red", dists
    img = np.asarray(Image.open(tmp_path / "final.png")).astype(float)
    top, bottom = img[: img.shape[0] // 2], img[img.shape[0] // 2:]
    assert np.abs(top.mean() - bottom.mean()) < 20 and np.abs(top - bottom).mean() > 5
    assert any((tmp_path / "tensorboard").iterdir())  # TensorBoard scalars and images


def test_tiny_presets_use_the_embedded_prior_and_its_evaluator(tmp_path):
    c = _config("edit", "tiny")
    assert c.prior.name == "embedded" and c.image == ""
    c.steps = 3
    c.snapshots = 2
    c.log_every = 0
    m = edit.run(c, str(tmp_path / "edit"))["lmc"]  # no image: a render of the source prompt
    assert 0.0 <= m["eval_accuracy"] <= 1.0 and 0.0 <= m["eval_r_precision"] <= 1.0
    s = _config("synth", "tiny")
    s.steps = 3
    s.log_every = 0
    m = synth.run(s, str(tmp_path / "synth"))
    assert 0.0 <= m["eval_accuracy"] <= 1.0 and 0.0 <= m["eval_r_precision"] <= 1.0
