"""Optimizing the prior's `x` directly (image synthesis and editing share this loop).

`x <- optimizer(x, grad_scale * guidance(x))`: the guidance gradient is handed to optax as the
gradient of `x` (DreamFusion's image-space experiments; DDS's official code uses SGD, lr 0.1,
the gradient scaled by 2000 / (H * W): configs/edit.py's `per_method.dds`).
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

from lmc_jax import io
from lmc_jax.errors import UserError
from lmc_jax.guidance import Conditioning, Guidance
from lmc_jax.priors.base import Prior


def shipped_world(prior_name: str) -> str:
    """The shipped embedded prior a prior name stands for: 'embedded_patterned' for that config
    name or the shipped folder's loaded name 'embedded(patterned_prior,...)', else 'embedded'."""
    return "embedded_patterned" if "patterned" in prior_name else "embedded"


def evaluator_scores(prior_name: str, images: np.ndarray, prompt: str) -> dict:
    """The shipped shape-and-colour evaluator's figures for `images` ([N, H, W, 3] in [-1, 1])
    made for `prompt` with the embedded prior: `eval_accuracy` (shape and colour both right)
    and `eval_r_precision` (against all 25 shape-colour prompts), and with the patterned
    prior (`prior_name` 'embedded_patterned' or the shipped folder's 'embedded(patterned_prior,
    ...)') its evaluator's `eval_pattern_accuracy`; `{}` for other priors (`prior_name` not
    'embedded...'), prompts the evaluator cannot read, or no evaluator."""
    if not prior_name.startswith("embedded"):
        return {}
    from lmc_jax.metrics import shapes_eval

    try:
        shapes_eval.parse_prompt(prompt)
        evaluator = shapes_eval.load_shipped_evaluator(shipped_world(prior_name))
    except UserError:
        return {}
    images = np.clip(np.asarray(images, np.float32), -1.0, 1.0)
    out = {"eval_accuracy": shapes_eval.accuracy(evaluator, images, prompt),
           "eval_r_precision": shapes_eval.r_precision(evaluator, images, prompt)}
    if evaluator.module.pattern_head:
        out["eval_pattern_accuracy"] = shapes_eval.pattern_accuracy(evaluator, images, prompt)
    return out


def make_optimizer(name: str, lr: float) -> optax.GradientTransformation:
    if name == "adam":
        return optax.adam(lr)
    if name == "sgd":
        return optax.sgd(lr)
    raise UserError(f"optimizer must be 'adam' or 'sgd', got {name!r}")


def make_x_step(prior: Prior, cond: Conditioning, guide: Guidance, *,
                optimizer: optax.GradientTransformation, key: jax.Array,
                grad_scale: float = 1.0) -> Callable:
    """The jitted step `(x, opt_state, i, prior_params) -> (x, opt_state, scalars)`: noise
    and timesteps for step `i` (`guide.draw`), the guidance gradient, one optimizer update of
    `x` [B, ...].

    The prior's params are an argument (placed by the caller, e.g. split over a mesh's 'model'
    axis), not constants baked into the compiled step (GBs for Stable Diffusion). `x` and
    `opt_state` are donated: pass the ones the previous step returned.
    """

    @functools.partial(jax.jit, donate_argnums=(0, 1))
    def step(x, opt_state, i, prior_params):
        pr = prior.replace(params=prior_params)
        t, eps = guide.draw(key, i, x.shape[0], pr.x_shape)
        out = guide(pr, x, t, eps, cond)
        updates, opt_state = optimizer.update(grad_scale * out.grad, opt_state, x)
        return optax.apply_updates(x, updates), opt_state, out.scalars

    return step


def optimize_x(prior: Prior, x0: jax.Array, cond: Conditioning, guide: Guidance, *, steps: int,
               optimizer: optax.GradientTransformation, key: jax.Array, grad_scale: float = 1.0,
               snapshot_steps: tuple[int, ...] = (), log_every: int = 0, desc: str = "optimize",
               writer=None, tag: str = "") -> tuple[jax.Array, list[np.ndarray], dict]:
    """Runs `steps` guidance steps on `x`; returns (x, decoded snapshots, last scalars).

    `guide`: the guidance record (its annealing over `guide.noise.total_steps`, normally
    `steps`). Snapshots are decoded images (numpy) after the steps listed in `snapshot_steps`
    (0 = the start). A non-finite gradient stops with a UserError. With a `writer`
    (MetricWriter), the scalars are logged every `log_every` steps and the snapshots as images,
    names prefixed by `tag`. The run keeps no checkpoints: it is short (a re-run starts over).
    """
    step = make_x_step(prior, cond, guide, optimizer=optimizer, key=key, grad_scale=grad_scale)
    x = jnp.array(x0, copy=True)  # the step donates x: the caller keeps x0
    opt_state = optimizer.init(x)
    snaps = [np.asarray(prior.decode(x0))] if 0 in snapshot_steps else []
    scalars: dict = {}
    bar = io.progress(range(steps), desc=desc, unit="step", disable=log_every <= 0)
    for i in bar:
        x, opt_state, scalars = step(x, opt_state, jnp.asarray(i), prior.params)
        if (log_every > 0 and (i + 1) % log_every == 0) or i + 1 == steps:
            values = {k: float(v) for k, v in scalars.items()}
            if not all(np.isfinite(v) for v in values.values()):
                raise UserError(f"non-finite guidance at step {i + 1} ({values}); lower lr, "
                                "grad_scale or guidance.w")
            bar.set_postfix({k: f"{v:.3g}" for k, v in values.items()})
            if writer is not None:
                writer.write_scalars(i + 1, {f"{tag}{k}": v for k, v in values.items()})
        if i + 1 in snapshot_steps:
            snaps.append(np.asarray(prior.decode(x)))
            if writer is not None and snaps[-1].shape[-1] == 3:
                writer.write_images(i + 1, {f"{tag}image": io.grid([io.to_uint8(snaps[-1])])})
    return x, snaps, {k: float(v) for k, v in scalars.items()}
