"""Zero-shot image-to-image training (configs/i2i.py).

`f_theta(x)` is a small residual conv net on the prior's `x`. One jitted step:
  y = f_theta(x);  g = guide(prior, y, t, eps, cond(prompt))     (the guidance record)
  loss(theta) = sum(sg(g) * y) / B + identity_weight * mean ||y - x||^2
Held-out figures: `heldout_L_cond` (mean norm of the conditioning part of the guidance
gradient on held-out outputs: it falls as outputs agree with the prompt), on the exact
mixture `heldout_target_acc`, and on the embedded prior's renders (`data.source='renders'`,
configs/i2i.py:tiny; lmc_jax.apps.i2i_shapes) the shipped evaluator's `heldout_target_colour`,
`heldout_shape_kept` and `heldout_both`, the RMS change `heldout_rms_to_input`, the distance to
the same scene in the target colour `heldout_rms_to_recoloured`, and LPIPS to the input when
`lpips_path` names its weights. Each has a `_before` value (the untrained f_theta is the
identity map); the renders run also writes `heldout.npz` (inputs, outputs, shape ids,
recoloured references).

Prompts may hold `{shape}` (renders only): each image's prompt names its own primitive.
`per_method.<method>` (as in configs/edit.py) sets a method's own w, weighting, t_min, t_max.
DDS's source image is each batch's input `x`, its source prompt `source_prompt`.

Parallelism: each batch of images (`batch`, a multiple of the mesh's `data` axis) and its
prompt embeddings are split over `data`; f_theta's params and optimizer state are replicated;
the frozen prior's large arrays split over `model` with `parallel.model_axis > 1`
(lmc_jax.parallel). Only process 0 writes outputs.

Survival (lmc_jax.loop): resumes from WORKDIR/checkpoints (the batch is a function of
`(seed, step)`, the step's noise of `fold_in(key, step)`), refusing a resume that changes
`FIXED_KEYS`; SIGTERM/SIGINT save a checkpoint and exit with status 143; a non-finite loss
stops the run and keeps the last good checkpoint.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from lmc_jax import io, parallel
from lmc_jax.config import require_positive, require_prompt
from lmc_jax.errors import UserError
from lmc_jax.guidance import Conditioning, Guidance, surrogate_loss
from lmc_jax.guidance.from_config import guidance_record
from lmc_jax.loop import Every, TrainLoop, TrainState, init_train_state
from lmc_jax.metrics.class_colour import class_colour_figures
from lmc_jax.priors.base import Prior
from lmc_jax.priors.factory import build_prior

# Config keys that fix the shapes of the checkpointed f_theta: a resume must not change them.
FIXED_KEYS = ("net.", "prior.name", "prior.resolution")


class Translator(nn.Module):
    """`f(x) = x + conv_out(ResBlocks(conv_in(x)))`, conv_out zero-initialized (f = id at init)."""

    features: int = 32
    blocks: int = 3

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        h = nn.Conv(self.features, (3, 3))(x)
        for _ in range(self.blocks):
            r = nn.Conv(self.features, (3, 3))(nn.silu(nn.GroupNorm(8)(h)))
            h = h + nn.Conv(self.features, (3, 3))(nn.silu(nn.GroupNorm(8)(r)))
        return x + nn.Conv(x.shape[-1], (3, 3), kernel_init=nn.initializers.zeros)(nn.silu(h))


def make_batches(config, prior: Prior, batch: int, seed: int, workdir: str):
    """`batch(step) -> (x, shape ids or None)`: the training images in the prior's x space,
    with each image's primitive for `data.source='renders'` (None for the other sources)."""
    if config.data.source == "renders":
        from lmc_jax.apps.i2i_shapes import training_set
        from lmc_jax.data.shapes import epoch_indices

        xs, labels = training_set(config, prior)
        indices = epoch_indices(len(xs), batch, seed)

        def get(step):
            idx = indices(step)
            return jnp.asarray(xs[idx]), labels[idx]

        return get
    data = make_data(config, prior, batch, seed, workdir)
    return lambda step: (data(step), None)


def make_data(config, prior: Prior, batch: int, seed: int, workdir: str):
    """`batch(step) -> x`: the training images in the prior's x space."""
    if config.data.source == "renders":
        batches = make_batches(config, prior, batch, seed, workdir)
        return lambda step: batches(step)[0]
    if config.data.source == "prior":
        from lmc_jax.priors import gaussian

        if not prior.has_exact_bias:
            raise UserError("data.source='prior' needs the exact Gaussian(-mixture) prior")
        label = None
        if config.source_prompt:
            label = int(np.argmax(np.asarray(prior.embed_text([config.source_prompt])[0])))
        key = jax.random.PRNGKey(seed)

        @jax.jit
        def draw(step):
            labels = None if label is None else jnp.full((batch,), label)
            return gaussian.sample(prior.params, jax.random.fold_in(key, step), batch, labels)

        return lambda step: draw(jnp.asarray(step))
    from lmc_jax.data.sources import make_source

    source = make_source(config.data, prior, batch, seed, False, workdir)
    return lambda step: source(step)[0]


def init_params(net: Translator, x_shape: tuple[int, ...], seed: int) -> Any:
    """The untrained network's params (f = identity): the first of `seed`'s 3 keys."""
    k_init = jax.random.split(jax.random.PRNGKey(seed), 3)[0]
    return net.init(k_init, jnp.zeros((1, *x_shape), jnp.float32))  # only shapes are read


def init_state(net: Translator, opt: optax.GradientTransformation, x_shape: tuple[int, ...],
               seed: int) -> TrainState:
    """The untrained state; the step's noise comes from the second of `seed`'s 3 keys."""
    params = init_params(net, x_shape, seed)
    return init_train_state(params, opt.init(params),
                            jax.random.split(jax.random.PRNGKey(seed), 3)[1])


def conditioning(prior: Prior, prompt: str, n: int, negative: str | None = None,
                 source: str | None = None) -> Conditioning:
    """`n` copies of the prompt's, the null prompt's, (NFSD) the negative prompt's and (DDS)
    the source prompt's embeddings."""
    return Conditioning(c=prior.embed_text([prompt] * n), u=prior.embed_text([""] * n),
                        neg=None if negative is None else prior.embed_text([negative] * n),
                        src=None if source is None else prior.embed_text([source] * n))


def conditioning_of(prior: Prior, prompt: str, guide: Guidance, source_prompt: str = ""
                    ) -> Callable[[int, np.ndarray | None], Conditioning]:
    """`cond(n, shapes) -> Conditioning` for `n` images: `conditioning` of the prompts, or with
    `{shape}` in them (target, DDS's source or NFSD's negative prompt) one prompt per image
    naming its primitive (`shapes`: their ids)."""
    from lmc_jax.apps.i2i_shapes import SHAPE_SLOT, fill

    source = source_prompt if guide.method == "dds" else None
    if guide.method == "dds" and not source:
        raise UserError("DDS needs a source prompt: set --config.source_prompt=...")
    negative = guide.negative_prompt
    if SHAPE_SLOT not in prompt + (source or "") + (negative or ""):  # one set per batch size
        made: dict[int, Conditioning] = {}

        def same(n: int, shapes: np.ndarray | None = None) -> Conditioning:
            if n not in made:
                made[n] = conditioning(prior, prompt, n, negative, source)
            return made[n]

        return same
    from lmc_jax.data.shapes import SHAPES

    def filled(text: str | None, s: int) -> str | None:
        return None if text is None else fill(text, s)

    table = [conditioning(prior, fill(prompt, s), 1, filled(negative, s), filled(source, s))
             for s in range(len(SHAPES))]
    table = jax.tree.map(lambda *rows: jnp.concatenate(rows), *table)

    def cond(n: int, shapes: np.ndarray | None = None) -> Conditioning:
        if shapes is None:
            raise UserError(f"a prompt with {SHAPE_SLOT} needs images whose primitive is known: "
                            "data.source='renders'")
        return jax.tree.map(lambda a: a[jnp.asarray(shapes)], table)

    return cond


def make_step(net: Translator, prior: Prior, guide: Guidance, opt: optax.GradientTransformation,
              identity_weight: float, mesh: jax.sharding.Mesh):
    """`step(state, x, cond) -> (state, metrics)` on `mesh`: `x` and `cond` split over `data`,
    the state replicated, the prior's params an argument of the compiled step (placed once)."""

    def step(state: TrainState, prior_params, x: jax.Array, cond: Conditioning):
        pr = prior.replace(params=prior_params)
        x, cond = parallel.constrain_batch((x, cond), mesh)
        if guide.method == "dds":  # DDS compares each output with its own input
            cond = cond.replace(x_src=x)
        t, eps = guide.draw(state.key, state.step, x.shape[0], pr.x_shape)
        t, eps = parallel.constrain_batch((t, eps), mesh)

        def loss_fn(p):
            y = net.apply(p, x)
            g = guide(pr, y, t, eps, cond)
            ident = jnp.mean((y - x) ** 2)
            return surrogate_loss(y, g.grad) / x.shape[0] + identity_weight * ident, {
                **g.scalars, "identity": ident}

        grads, metrics = jax.grad(loss_fn, has_aux=True)(state.params)
        updates, opt_state = opt.update(grads, state.opt_state, state.params)
        return state.replace(step=state.step + 1, params=optax.apply_updates(state.params, updates),
                             opt_state=opt_state), metrics

    prior_params = parallel.shard_params(prior.params, mesh)
    data = parallel.batch_sharding(mesh)
    jitted = parallel.jit_step(step, mesh, [parallel.sharding_of(prior_params), data, data])

    def step_fn(state: TrainState, x: jax.Array, cond: Conditioning):
        return jitted(state, prior_params, parallel.shard_batch(x, mesh), cond)

    step_fn.jitted, step_fn.prior_params = jitted, prior_params  # AOT (lmc_jax.plan)
    return step_fn


def make_evaluate(net: Translator, prior: Prior, guide: Guidance, key: jax.Array,
                  draws: int = 4) -> Callable:
    """The jitted `evaluate(params, prior_params, x, cond) -> (f_theta(x), ||L_cond||)`: the
    held-out outputs and the mean norm of the conditioning term over `draws` fixed (t, eps).

    The prior's params are an argument, not constants compiled into the function (3.5 GB for
    Stable Diffusion's UNet: a second copy of the weights and, at SD 2.1-base's size, the
    difference between fitting a 24 GiB host and running out of memory).
    """
    draw = guide.noise.replace(total_steps=1).draw

    @jax.jit
    def evaluate(params, prior_params, x: jax.Array, cond: Conditioning):
        pr = prior.replace(params=prior_params)
        y = net.apply(params, x)

        def norm(i):  # one compiled guidance call for every draw (lax.map, not unrolled)
            t, eps = draw(key, i, y.shape[0], pr.x_shape)
            g = guide(pr, y, t, eps, cond)
            return jnp.mean(jnp.sqrt(jnp.sum(g.parts["L_cond"] ** 2, axis=(1, 2, 3))))

        return y, jnp.mean(jax.lax.map(norm, jnp.arange(draws)))

    return evaluate


def train(config: ml_collections.ConfigDict, workdir: str, net: Translator, prior: Prior,
          guide: Guidance, *, mesh: jax.sharding.Mesh | None = None,
          on_eval: Callable[[int, Any], dict] | None = None) -> dict:
    """Trains (or resumes) f_theta on `mesh` (default: from the config).

    `on_eval(step, params) -> scalars` runs every `eval_every` steps and after the last; its
    scalars are logged. Returns `{state, start_state, metrics}` (the state at the start: fresh
    or resumed). Raises `lmc_jax.checkpoint.Preempted` (exit status 143) after saving on
    SIGTERM/SIGINT.
    """
    mesh = mesh if mesh is not None else parallel.mesh_from_config(config)
    parallel.check_batch(config.batch, mesh, "batch")
    with TrainLoop(workdir, config, steps=config.steps, fixed_keys=FIXED_KEYS, desc="i2i",
                   hint="lower lr") as loop:
        train_data = make_batches(config, prior, config.batch, config.seed, workdir)
        opt = optax.adam(config.lr)
        state = parallel.replicate(init_state(net, opt, prior.x_shape, config.seed), mesh)
        step = make_step(net, prior, guide, opt, config.identity_weight, mesh)
        cond_of = conditioning_of(prior, require_prompt(config.prompt), guide,
                                  config.get("source_prompt", ""))
        fixed = None if train_data(0)[1] is not None else parallel.shard_batch(
            cond_of(config.batch), mesh)

        def one_step(state: TrainState, i: int):
            x, shapes = train_data(i)
            cond = fixed if fixed is not None else parallel.shard_batch(
                cond_of(config.batch, shapes), mesh)
            return step(state, x, cond)

        every = [] if on_eval is None else [
            Every(config.eval_every, lambda done, state: on_eval(done, state.params))]
        res = loop.run(loop.restore(state), one_step, every)
    return {"state": res.state, "start_state": res.start_state, "metrics": res.metrics}


def run(config: ml_collections.ConfigDict, workdir: str) -> dict:
    """Trains (or resumes) f_theta, writes held-out grids and metrics; exits with status 143
    when preempted."""
    from lmc_jax.apps import i2i_shapes

    prompt = require_prompt(config.prompt)
    for k in ("steps", "batch", "heldout"):
        require_positive(config[k], k)
    prior = build_prior(config.prior)
    gcfg, replaced = i2i_shapes.method_guidance(config)
    if replaced:
        print(f"note: {gcfg.method} runs with its own settings (per_method.{gcfg.method}): "
              + ", ".join(f"{k} {new} (shared: {old})" for k, (old, new) in replaced.items()))
    guide = guidance_record(prior, gcfg, config.steps, config)
    net = Translator(config.net.features, config.net.blocks)
    cond_of = conditioning_of(prior, prompt, guide, config.get("source_prompt", ""))
    scorer, held = None, None
    if config.data.source == "renders":  # held-out renders, scored by the shipped evaluator
        held = i2i_shapes.heldout_set(config, prior)
        heldout = jnp.asarray(held["x"])
        cond_h = cond_of(config.heldout, held["shape"])
        scorer = i2i_shapes.Scorer(held, i2i_shapes.target_colour(prompt),
                                   config.get("lpips_path", ""))
    else:
        heldout = make_data(config, prior, config.heldout, config.seed + 99991, workdir)(0)
        cond_h = cond_of(config.heldout)
    if guide.method == "dds":
        cond_h = cond_h.replace(x_src=heldout)
    k_eval = jax.random.split(jax.random.PRNGKey(config.seed), 3)[2]
    evaluate = make_evaluate(net, prior, guide, k_eval)
    main = parallel.is_main_process()

    def eval_metrics(params, lpips: bool = False) -> tuple[dict, np.ndarray]:
        y, l_cond = parallel.to_host(evaluate(params, prior.params, heldout, cond_h))
        out = {"heldout_L_cond": float(l_cond)}
        if prior.has_exact_bias:  # the exact mixture: class of the mean colour
            target = int(np.argmax(np.asarray(cond_h.c[0])))
            out["heldout_target_acc"] = class_colour_figures(y, prior.params["mu"],
                                                             target)["target_acc"]
        images = np.asarray(prior.decode(y))
        if scorer is not None:
            out.update({f"heldout_{k}": v for k, v in scorer(images, lpips).items()})
        return out, images

    def on_eval(done: int, params) -> dict:
        ev, outs = eval_metrics(params)
        if main:  # inputs over outputs, 10 to a row
            ins, outs = io.to_uint8(np.asarray(prior.decode(heldout))), io.to_uint8(outs)
            rows = [r for i in range(0, len(ins), 10) for r in (ins[i:i + 10], outs[i:i + 10])]
            io.save_png(os.path.join(workdir, f"heldout_{done:06d}.png"), io.grid(rows),
                        scale=max(1, 128 // prior.image_shape[0]))
        return ev

    # The untrained network is the identity map: its figures are those of the inputs.
    before, _ = eval_metrics(init_params(net, prior.x_shape, config.seed), lpips=True)
    res = train(config, workdir, net, prior, guide, on_eval=on_eval)
    first = eval_metrics(res["start_state"].params)[0]
    after, outputs = eval_metrics(res["state"].params, lpips=True)
    result = {f"{k}_before": v for k, v in before.items()}
    result.update({f"{k}_at_start": v for k, v in first.items()})
    result.update(after)
    result.update({k: float(v) for k, v in res["metrics"].items()})
    if scorer is not None:  # the paired answer, for reference: what a perfect f_theta scores
        result.update({f"reference_recoloured_{k}": v
                       for k, v in scorer(held["recoloured"]).items()})
    result["settings"] = {"method": gcfg.method,
                          **{k: gcfg[k] for k in i2i_shapes.GUIDANCE_KEYS}}
    if main:
        io.write_json(os.path.join(workdir, "metrics.json"), result)
        if held is not None:
            np.savez_compressed(os.path.join(workdir, "heldout.npz"), inputs=held["pixels"],
                                outputs=np.clip(outputs, -1.0, 1.0), shape=held["shape"],
                                recoloured=held["recoloured"], indices=held["indices"])
        print(io.format_table([[k, v] for k, v in result.items() if not isinstance(v, dict)],
                              ["metric", "value"]))
    return result
