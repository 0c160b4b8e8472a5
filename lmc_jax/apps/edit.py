"""Image editing (configs/edit.py): one method, or every method side by side (`compare`).

Metrics per method (metrics.json, printed as a table): `dist_to_source` (RMS change of the
image, lower keeps more of the source), `colorfulness` (Hasler-Suesstrunk on the final image),
`seconds_per_step`; on the Gaussian mixture also `target_acc` (fraction whose mean colour ends
nearest the target class) and `saturation` (||mean colour|| / ||target class mean||).
metrics.json also records the `settings` each method ran with (`method_settings`).
"""

from __future__ import annotations

import logging
import os
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from lmc_jax import io
from lmc_jax.apps.optimize import evaluator_scores, make_optimizer, optimize_x
from lmc_jax.config import require_positive, require_prompt
from lmc_jax.errors import UserError
from lmc_jax.guidance import Conditioning
from lmc_jax.guidance.from_config import guidance_record
from lmc_jax.metrics.class_colour import class_colour_figures
from lmc_jax.priors.base import Prior
from lmc_jax.priors.factory import build_prior
from lmc_jax.writer import MetricWriter


def load_source_image(path: str, prior: Prior, source_prompt: str, key: jax.Array) -> jax.Array:
    """The image to edit, [1, H, W, 3] in [-1, 1] at the prior's image size."""
    h = prior.image_shape[0]
    if not path and not prior.has_exact_bias:
        from lmc_jax.data import shapes
        from lmc_jax.metrics.shapes_eval import parse_prompt

        try:  # the embedded prior: a held-out render of the source prompt
            shape, colour = parse_prompt(source_prompt)
        except UserError:
            raise UserError("no image given; pass --config.image=PATH (png, jpg, webp, ...)"
                            ) from None
        pixels = shapes.render(0, "eval_test", [shapes.class_id(shape, colour)], resolution=h)
        return jnp.asarray(pixels, jnp.float32) / 127.5 - 1.0
    if not path:
        from lmc_jax.priors import gaussian

        label = int(np.argmax(np.asarray(prior.embed_text([source_prompt])[0])))
        return gaussian.sample(prior.params, key, 1, jnp.array([label]))
    if not os.path.exists(path):
        raise UserError(f"image {path!r} does not exist; pass --config.image=PATH")
    from lmc_jax.data.folder import load_image

    try:
        from PIL import Image

        with Image.open(path) as im:
            size, mode = im.size, im.mode
        pixels, converted = load_image(path, h)
    except (OSError, ValueError) as e:
        raise UserError(f"{path!r} is not an image this tool can read ({e}); use PNG or JPEG"
                        ) from None
    if converted:
        print(f"note: converted {path} from {mode} to RGB")
    if size != (h, h):
        print(f"note: resized {path} from {size[0]}x{size[1]} to {h}x{h} (center crop)")
    return jnp.asarray(pixels[None], jnp.float32) / 127.5 - 1.0


OPTIMIZER_KEYS = ("optimizer", "lr", "grad_scale", "grad_reduce")
GUIDANCE_KEYS = ("w", "weighting", "t_min", "t_max")


def method_settings(config: ml_collections.ConfigDict, method: str
                    ) -> tuple[ml_collections.ConfigDict, dict, dict]:
    """What `method` runs with: the shared `guidance` section and optimizer keys, with the
    non-empty keys of `config.per_method.<method>` over them (configs/edit.py).

    Returns `(gcfg, opt, replaced)`: the method's guidance section, its optimizer settings
    (optimizer, lr, grad_scale, grad_reduce) and `{key: (shared, own)}` for each key whose
    value the method's own settings changed.
    """
    gcfg = config.guidance.copy_and_resolve_references()
    gcfg.method = method
    opt = {k: config[k] for k in OPTIMIZER_KEYS}
    own = config.get("per_method", {}).get(method, {})
    replaced = {}
    for key, value in own.items():
        if value is None:
            continue
        if key not in GUIDANCE_KEYS + OPTIMIZER_KEYS:
            raise UserError(f"per_method.{method}.{key} is not a per-method setting; use one of "
                            f"{list(GUIDANCE_KEYS + OPTIMIZER_KEYS)}")
        target = gcfg if key in GUIDANCE_KEYS else opt
        if target[key] != value:
            replaced[key] = (target[key], value)
        target[key] = value
    if opt["grad_reduce"] not in ("sum", "mean_hw"):
        raise UserError(f"grad_reduce must be 'sum' or 'mean_hw', got {opt['grad_reduce']!r} "
                        f"(for {method})")
    return gcfg, opt, replaced


def effective_grad_scale(opt: dict, x_shape: tuple[int, ...]) -> float:
    """`grad_scale`, divided by the H * W of `x` ([H, W, C]) for grad_reduce='mean_hw' (DDS's
    official loss is `sum(z * grad) / (H * W)`, scaled by 2000)."""
    scale = float(opt["grad_scale"])
    return scale / (x_shape[0] * x_shape[1]) if opt["grad_reduce"] == "mean_hw" else scale


def run(config: ml_collections.ConfigDict, workdir: str) -> dict:
    prompt = require_prompt(config.prompt)
    require_positive(config.steps, "steps")
    prior = build_prior(config.prior)
    methods = list(config.methods) if config.compare else [config.guidance.method]
    if any(m == "dds" for m in methods):
        require_prompt(config.source_prompt, "source_prompt")
    key = jax.random.PRNGKey(config.seed)
    k_img, k_noise = jax.random.split(key)
    source = load_source_image(config.image, prior, config.source_prompt, k_img)
    x_src = prior.encode(source)
    gcfg = config.guidance
    cond = Conditioning(c=prior.embed_text([prompt]), u=prior.embed_text([""]),
                        src=prior.embed_text([config.source_prompt or ""]),
                        neg=prior.embed_text([gcfg.negative_prompt]), x_src=x_src)
    snapshot_steps = tuple(sorted({int(round(v)) for v in
                                   np.linspace(0, config.steps, config.snapshots)}))
    os.makedirs(workdir, exist_ok=True)
    rows, table, metrics, finals = [], [], {}, {}
    writer = MetricWriter(workdir)
    for method in methods:
        mcfg, opt, replaced = method_settings(config, method)
        try:
            guide = guidance_record(prior, mcfg, config.steps, config)
        except UserError as e:
            if not config.compare:
                raise
            logging.warning("skipping %s: %s", method, e)
            continue
        if replaced:
            print(f"note: {method} runs with its own settings (per_method.{method}): " + ", ".join(
                f"{k} {new} (shared: {old})" for k, (old, new) in replaced.items()))
        start = time.time()
        x, snaps, scalars = optimize_x(
            prior, x_src, cond, guide, steps=config.steps,
            optimizer=make_optimizer(opt["optimizer"], opt["lr"]), key=k_noise,
            grad_scale=effective_grad_scale(opt, prior.x_shape), snapshot_steps=snapshot_steps,
            log_every=config.log_every, desc=f"edit {method}", writer=writer, tag=f"{method}/")
        m = image_metrics(np.asarray(prior.decode(x)), np.asarray(source), prior, prompt)
        m.update(evaluator_scores(prior.name, np.asarray(prior.decode(x)), prompt))
        m["seconds_per_step"] = (time.time() - start) / config.steps
        settings = {k: mcfg[k] for k in GUIDANCE_KEYS} | opt
        metrics[method] = {**m, **scalars, "settings": settings}
        rows.append((method, io.to_uint8(np.concatenate(snaps))))
        finals[method] = np.asarray(prior.decode(x))
        table.append([method] + [m.get(k, "") for k in image_metrics_keys(prior)])
    writer.close()
    _add_clip_scores(config.clip_path, metrics, finals, prompt)
    grid = labelled_grid(rows)
    io.save_png(os.path.join(workdir, "compare.png" if config.compare else "edit.png"), grid,
                scale=max(1, 256 // prior.image_shape[0]))
    io.write_json(os.path.join(workdir, "metrics.json"), metrics)
    if table:
        print(io.format_table(table, ["method"] + image_metrics_keys(prior)))
    return metrics


def _add_clip_scores(clip_path: str, metrics: dict, finals: dict, prompt: str) -> None:
    """CLIP score of each method's result, or 'unavailable: <reason>' (the run goes on)."""
    from lmc_jax.metrics import Unavailable, clip_score, load_clip

    model = (load_clip(clip_path) if clip_path else
             Unavailable("clip", "no metrics weights given (set --config.clip_path=DIR)"))
    if clip_path and isinstance(model, Unavailable):  # said in the log, not only metrics.json
        print(f"WARNING: CLIP metrics not computed: {model.reason}", flush=True)
    for method, images in finals.items():
        if isinstance(model, Unavailable):
            metrics[method]["clip_score"] = str(model)
        elif images.shape[-1] == 3:
            metrics[method]["clip_score"] = float(np.mean(clip_score(
                model, np.clip(images, -1, 1), [prompt] * len(images))))


def image_metrics_keys(prior: Prior) -> list[str]:
    keys = ["colorfulness", "dist_to_source", "seconds_per_step"]
    if prior.name.startswith("embedded"):
        keys += ["eval_accuracy", "eval_r_precision"]
    return sorted(keys + (["saturation", "target_acc"] if prior.has_exact_bias else []))


def image_metrics(final: np.ndarray, source: np.ndarray, prior: Prior, prompt: str) -> dict:
    """Per-edit figures (see the module docstring)."""
    from lmc_jax.metrics.color import colorfulness

    out = {"dist_to_source": float(np.sqrt(np.mean((final - source) ** 2))),
           "colorfulness": float(np.mean(colorfulness(np.clip(final, -1, 1))))}
    if prior.has_exact_bias:  # exact mixture: class of the mean colour
        target = int(np.argmax(np.asarray(prior.embed_text([prompt])[0])))
        out.update(class_colour_figures(final, prior.params["mu"], target))
    return out


def labelled_grid(rows: list[tuple[str, np.ndarray]]) -> np.ndarray:
    """Rows of uint8 images with the row's name written in a left margin."""
    from PIL import Image, ImageDraw

    body = io.grid([imgs for _, imgs in rows])
    h = rows[0][1].shape[1]
    margin = 48
    canvas = Image.new("RGB", (body.shape[1] + margin, body.shape[0]), (255, 255, 255))
    canvas.paste(Image.fromarray(body), (margin, 0))
    draw = ImageDraw.Draw(canvas)
    for i, (name, _) in enumerate(rows):
        draw.text((4, 2 + i * (h + 2) + h // 2 - 5), name.upper(), fill=(0, 0, 0))
    return np.asarray(canvas)
