"""The shape-and-colour evaluator: shipped accuracy, metrics, prompt parsing, save/load, app."""

import json
import os

import numpy as np
import pytest

from lmc_jax import config as lmc_config
from lmc_jax.apps import evaluator as evaluator_app
from lmc_jax.data import shapes
from lmc_jax.errors import UserError
from lmc_jax.metrics import shapes_eval

N_HELD_OUT = 200
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def shipped():
    return shapes_eval.load_shipped_evaluator()


@pytest.fixture(scope="module")
def held_out():
    """Renders from a seed the shipped evaluator never saw, in [-1, 1], with their prompts."""
    idx = np.arange(N_HELD_OUT)
    # One chunk per shape (40 examples each), no padding.
    images = shapes.render(seed=123, split="eval_test", indices=idx, chunk=N_HELD_OUT // 5)
    images = images.astype(np.float32)
    s, c = shapes.class_of(idx)
    prompts = [shapes.caption(int(a), int(b), template=i % len(shapes.TEMPLATES), synonym=i)
               for i, (a, b) in enumerate(zip(s, c, strict=True))]
    return images / 127.5 - 1.0, prompts, s, c


def test_shipped_evaluator_metadata(shipped):
    assert shapes_eval.param_count(shipped.params) < 150_000
    assert shipped.metadata["test_joint_accuracy"] >= 0.97


def test_shipped_evaluator_classifies_held_out_renders(shipped, held_out):
    images, prompts, _, _ = held_out
    assert shapes_eval.accuracy(shipped, images, prompts) >= 0.9


def test_r_precision_own_vs_wrong_prompts(shipped, held_out):
    images, prompts, s, c = held_out
    assert shapes_eval.r_precision(shipped, images, prompts) >= 0.9
    # Every prompt names another shape and another colour than its image.
    wrong = [f"a {list(shapes.COLOURS)[(b + 1) % 5]} {shapes.SHAPES[(a + 2) % 5]}"
             for a, b in zip(s, c, strict=True)]
    assert shapes_eval.r_precision(shipped, images, wrong) <= 0.05
    assert shapes_eval.accuracy(shipped, images, wrong) <= 0.05


def test_probs_any_size_and_uint8(shipped, held_out):
    images = held_out[0][:8]
    ps, pc = shipped.probs(images)
    assert ps.shape == pc.shape == (8, 5)
    np.testing.assert_allclose(ps.sum(-1), 1.0, atol=1e-5)
    u8 = np.round((images + 1.0) * 127.5).astype(np.uint8)
    np.testing.assert_allclose(shipped.probs(u8)[0], ps, atol=1e-4)
    big = np.repeat(np.repeat(images, 2, axis=1), 2, axis=2)  # 64x64, resized back to 32x32
    assert np.array_equal(shipped.probs(big)[0].argmax(-1), ps.argmax(-1))
    with pytest.raises(UserError, match="square RGB"):
        shipped.probs(images[:, :, :16])


def test_parse_prompt():
    assert shapes_eval.parse_prompt("a ball, red") == (0, 0)
    assert shapes_eval.parse_prompt("A render of a PURPLE Ring!") == (2, 4)
    assert shapes_eval.parse_prompt("a box on a plain background, green") == (1, 1)
    assert shapes_eval.parse_prompt("a sphere ball, red red") == (0, 0)  # synonyms agree
    with pytest.raises(UserError, match="names no shape.*ball"):
        shapes_eval.parse_prompt("a red teapot")
    with pytest.raises(UserError, match="names no colour.*purple"):
        shapes_eval.parse_prompt("an orange cube")
    with pytest.raises(UserError, match="more than one shape"):
        shapes_eval.parse_prompt("a red cube and a cone")
    with pytest.raises(UserError, match="more than one colour"):
        shapes_eval.parse_prompt("a red or blue cube")
    assert len(set(map(shapes_eval.parse_prompt, shapes_eval.default_candidates()))) == 25


def test_save_load_round_trip(shipped, held_out, tmp_path):
    path = shapes_eval.save_evaluator(tmp_path / "ev", shipped.params, {"note": "copy"},
                                      module=shipped.module)
    loaded = shapes_eval.load_evaluator(path)
    assert loaded.metadata == {"note": "copy"}
    for a, b in zip(shipped.probs(held_out[0][:16]), loaded.probs(held_out[0][:16]),
                    strict=True):
        np.testing.assert_array_equal(a, b)


def test_load_errors(shipped, tmp_path):
    with pytest.raises(UserError, match="lacks params.msgpack, evaluator.json"):
        shapes_eval.load_evaluator(tmp_path / "missing")
    path = shapes_eval.save_evaluator(tmp_path / "ev", shipped.params, module=shipped.module)
    meta = json.loads((path / "evaluator.json").read_text())
    meta["colours"] = ["red", "green", "blue", "yellow", "orange"]
    (path / "evaluator.json").write_text(json.dumps(meta))
    with pytest.raises(UserError, match="trained for colours"):
        shapes_eval.load_evaluator(path)


def test_missing_shipped_evaluator_says_how_to_train(monkeypatch, tmp_path):
    monkeypatch.setattr(shapes_eval, "shipped_evaluator_path",
                        lambda world="embedded": tmp_path / "none")
    with pytest.raises(UserError, match="configs/evaluator.py"):
        shapes_eval.load_shipped_evaluator()


def test_quick_app_end_to_end(tmp_path):
    config = lmc_config.load_config(os.path.join(ROOT, "configs", "evaluator.py"), "quick")
    metrics = evaluator_app.run(config, str(tmp_path))
    assert 0.0 <= metrics["test_joint_accuracy"] <= 1.0
    assert json.loads((tmp_path / "metrics.json").read_text())["steps"] == config.train.steps
    ev = shapes_eval.load_evaluator(tmp_path / "evaluator")
    assert ev.metadata["test_size"] == config.data.test_size
    ps, pc = ev.probs(np.zeros((3, 16, 16, 3), np.float32))
    assert ps.shape == pc.shape == (3, 5) and np.all(np.isfinite(ps))
    assert shapes_eval.has_object_head(ev) == config.model.object_head
    for key in ("test_object_recall", "test_degraded_object_recall", "test_no_object_recall"):
        assert 0.0 <= metrics[key] <= 1.0


def test_shipped_evaluator_says_no_object(shipped, held_out):
    """Held-out renders (another seed) show an object, and so do their blurred and fogged
    copies; the bare background at text-to-3D's evaluation grey and held-out no-object scenes
    (fog, soft bands and glows) do not, and then score 0 for every prompt."""
    images, prompts, _, _ = held_out
    assert shapes_eval.has_object_head(shipped)
    assert np.mean(shapes_eval.no_object(shipped, images)) <= 0.03
    u8 = np.round((images + 1.0) * 127.5).astype(np.uint8)
    degraded = shapes.degrade(u8, seed=123)
    assert np.mean(shapes_eval.no_object(shipped, degraded)) <= 0.1
    none = shapes.render_no_object(123, "eval_test", 80)
    grey = np.full((4, 32, 32, 3), np.mean(shapes.BACKGROUND) * 2.0 - 1.0, np.float32)
    assert np.all(shapes_eval.no_object(shipped, grey))
    assert np.mean(shapes_eval.no_object(shipped, none)) >= 0.9
    assert shapes_eval.accuracy(shipped, grey, prompts[:4]) == 0.0
    assert shapes_eval.r_precision(shipped, grey, prompts[:4]) == 0.0


def test_no_object_scenes_and_degrade():
    a = shapes.render_no_object(5, "eval_train", 8)
    np.testing.assert_array_equal(a, shapes.render_no_object(5, "eval_train", 8))
    assert not np.array_equal(a, shapes.render_no_object(5, "eval_test", 8))
    x = a.astype(np.float32) / 255.0
    lo, hi = shapes.BACKGROUND
    # 'background' (i % 4 == 0): one grey in the renders' range, plus pixel noise of std 0.01.
    for im in x[0::4]:
        assert lo - 0.01 < im.mean() < hi + 0.01 and im.std() < 0.02
    # No kind has a render's hard edge: neighbouring pixels differ by far less than an
    # object's silhouette against the background.
    renders = shapes.render(5, "eval_train", range(8)).astype(np.float32) / 255.0
    edge = lambda im: np.abs(np.diff(im, axis=1)).max()  # noqa: E731
    assert max(map(edge, x)) < 0.5 * min(map(edge, renders))
    same = shapes.degrade((renders * 255).round().astype(np.uint8), 0, max_sigma=0.0,
                          max_fog=0.0)
    np.testing.assert_array_equal(same, (renders * 255).round().astype(np.uint8))


def test_parse_pattern():
    assert shapes_eval.parse_pattern("a red striped ball") == 1
    assert shapes_eval.parse_pattern("a Dotted cone, blue") == 3
    assert shapes_eval.parse_pattern("a red ball on a plain background") == 0  # 'plain' scene
    with pytest.raises(UserError, match="several patterns"):
        shapes_eval.parse_pattern("a striped checkered box")


def test_pattern_labels_need_a_pattern_head():
    images = np.zeros((4, 16, 16, 3), np.uint8)
    labels = np.zeros(4, np.int32)
    with pytest.raises(UserError, match="pattern head"):
        shapes_eval.train_evaluator(images, labels, labels, 1, 2, 1e-3, 0, patterns=labels)
    with pytest.raises(UserError, match="pattern head"):
        shapes_eval.train_evaluator(images, labels, labels, 1, 2, 1e-3, 0,
                                    module=shapes_eval.ShapeColourNet(pattern_head=True))
    with pytest.raises(UserError, match="no pattern head"):
        shapes_eval.load_shipped_evaluator().pattern_probs(images)
