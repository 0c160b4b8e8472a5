"""Trains the shape-and-colour evaluator (configs/evaluator.py) and writes it to WORKDIR/evaluator.

Renders (once, cached under `data.cache_dir`) the 'eval_train' and 'eval_test' splits of
`lmc_jax.data.shapes`, trains `lmc_jax.metrics.shapes_eval.ShapeColourNet` on 'eval_train'
(plus, with `model.object_head`, `data.degraded` blurred and fogged copies of it, still objects,
and `data.no_object_train` scenes without an object, `shapes.render_no_object`), measures
shape, colour and joint (both right) accuracy on the held-out 'eval_test', how often it reads
held-out renders, their degraded copies and held-out no-object scenes right (object or not),
and saves the evaluator with those figures in its metadata. With `data.patterned` the renders
are the patterned world's and `model.pattern_head` learns their pattern (from the crisp renders
only: a blurred copy may have lost it), measured on the held-out renders per pattern. Copy
WORKDIR/evaluator to `lmc_jax/assets/embedded_prior/evaluator` (the patterned world's:
`lmc_jax/assets/patterned_prior/evaluator`) to ship it.
"""

from __future__ import annotations

import os
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from lmc_jax import io
from lmc_jax.config import require_positive
from lmc_jax.data import shapes
from lmc_jax.errors import UserError
from lmc_jax.metrics import shapes_eval


def run(config: ml_collections.ConfigDict, workdir: str) -> dict:
    """Trains, evaluates and saves the evaluator; returns its metrics."""
    dc, tc = config.data, config.train
    for key in ("data.train_size", "data.test_size", "data.resolution", "train.steps",
                "train.batch", "train.lr"):
        section, name = key.split(".")
        require_positive(config[section][name], key)
    object_head = bool(config.model.get("object_head", False))
    if object_head:
        for key in ("no_object_train", "no_object_test"):
            require_positive(dc[key], f"data.{key}")
    pattern_head = bool(config.model.get("pattern_head", False))
    patterned = bool(dc.get("patterned", False))
    if pattern_head and not patterned:
        raise UserError("model.pattern_head needs the patterned world's renders: set "
                        "--config.data.patterned=True (or use configs/evaluator.py:patterned)")
    cache_dir = dc.cache_dir or os.path.join(workdir, "data")
    start = time.time()
    train = shapes.load_arrays("eval_train", dc.train_size, cache_dir, dc.resolution, dc.seed,
                               patterned)
    test = shapes.load_arrays("eval_test", dc.test_size, cache_dir, dc.resolution, dc.seed,
                              patterned)
    images, labels_s, labels_c = train["image"], train["shape"], train["colour"]
    labels_p = train["pattern"]
    objects = np.ones(len(images), np.float32)
    if object_head:
        n_deg = min(int(dc.degraded), len(images))
        none = shapes.render_no_object(dc.seed, "eval_train", dc.no_object_train, dc.resolution)
        images = np.concatenate([images, shapes.degrade(images[:n_deg], dc.seed), none])
        labels_s = np.concatenate([labels_s, labels_s[:n_deg], np.zeros(len(none), np.int32)])
        labels_c = np.concatenate([labels_c, labels_c[:n_deg], np.zeros(len(none), np.int32)])
        objects = np.concatenate([objects, np.ones(n_deg, np.float32),
                                  np.zeros(len(none), np.float32)])
        labels_p = np.concatenate([labels_p, np.full(n_deg + len(none), -1, np.int32)])
    data_seconds = time.time() - start

    module = shapes_eval.ShapeColourNet(features=tuple(config.model.features),
                                        hidden=config.model.hidden, object_head=object_head,
                                        pattern_head=pattern_head)
    start = time.time()
    params = shapes_eval.train_evaluator(
        images, labels_s, labels_c, steps=tc.steps, batch=tc.batch,
        lr=tc.lr, seed=config.seed, module=module, objects=objects,
        patterns=labels_p if pattern_head else None,
        progress=lambda r: io.progress(r, desc="train evaluator", unit="step"))
    train_seconds = time.time() - start

    # Measure the weights as saved (float16), i.e. exactly what `load_evaluator` gives.
    params = jax.tree_util.tree_map(
        lambda p: jnp.asarray(p, jnp.float16).astype(jnp.float32), params)
    evaluator = shapes_eval.Evaluator(module, params)
    ps, pc = evaluator.probs(test["image"])
    shape_ok = ps.argmax(-1) == test["shape"]
    colour_ok = pc.argmax(-1) == test["colour"]
    metrics = {
        "test_shape_accuracy": float(np.mean(shape_ok)),
        "test_colour_accuracy": float(np.mean(colour_ok)),
        "test_joint_accuracy": float(np.mean(shape_ok & colour_ok)),
        **(_object_metrics(evaluator, test["image"], dc) if object_head else {}),
        **(_pattern_metrics(evaluator, test) if pattern_head else {}),
        "train_size": int(dc.train_size),
        "test_size": int(dc.test_size),
        "steps": int(tc.steps),
        "param_count": shapes_eval.param_count(params),
        "data_seconds": data_seconds,
        "train_seconds": train_seconds,
    }
    out = os.path.join(workdir, "evaluator")
    shapes_eval.save_evaluator(out, params, module=module, metadata={
        **{k: v for k, v in metrics.items() if not k.endswith("seconds")},
        "data_seed": int(dc.seed), "resolution": int(dc.resolution), "seed": int(config.seed),
        "patterned": patterned,
        "batch": int(tc.batch), "lr": float(tc.lr)})
    io.write_json(os.path.join(workdir, "metrics.json"), metrics)
    print(io.format_table([[k, v] for k, v in metrics.items()], ["metric", "value"]))
    print(f"evaluator saved to {out}")
    return metrics


def _pattern_metrics(evaluator: shapes_eval.Evaluator, test: dict) -> dict:
    """The pattern head's accuracy on the held-out renders, in all and per pattern."""
    ok = evaluator.pattern_probs(test["image"]).argmax(-1) == test["pattern"]
    out = {"test_pattern_accuracy": float(np.mean(ok))}
    for k, name in enumerate(shapes.PATTERNS):
        if np.any(test["pattern"] == k):
            out[f"test_pattern_accuracy_{name}"] = float(np.mean(ok[test["pattern"] == k]))
    return out


def _object_metrics(evaluator: shapes_eval.Evaluator, test_images: np.ndarray,
                    dc: ml_collections.ConfigDict) -> dict:
    """How often the object head is right on held-out material: renders (object), their
    degraded copies (object; another seed than training's) and no-object scenes ('eval_test'
    split), and the no-object recall per kind."""
    none = shapes.render_no_object(dc.seed, "eval_test", dc.no_object_test, dc.resolution)
    is_none = shapes_eval.no_object(evaluator, none)
    kinds = np.arange(len(none)) % len(shapes.NO_OBJECT_KINDS)
    out = {
        "test_object_recall": float(np.mean(~shapes_eval.no_object(evaluator, test_images))),
        "test_degraded_object_recall": float(np.mean(~shapes_eval.no_object(
            evaluator, shapes.degrade(test_images, dc.seed + 1)))),
        "test_no_object_recall": float(np.mean(is_none)),
    }
    for k, kind in enumerate(shapes.NO_OBJECT_KINDS):
        out[f"test_no_object_recall_{kind}"] = float(np.mean(is_none[kinds == k]))
    return out
