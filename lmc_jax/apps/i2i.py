"""Zero-shot image-to-image training (configs/i2i.py).

`f_theta(x)` is a small residual conv net on the prior's `x`. One jitted step:
  y = f_theta(x);  g = guidance(prior, y, t, eps, cond(prompt), hp)
  loss(theta) = sum(sg(g) * y) / B + identity_weight * mean ||y - x||^2
Held-out figures: `heldout_L_cond` (mean norm of the conditioning part of the guidance
gradient on held-out outputs: it falls as outputs agree with the prompt) and, on the exact
mixture, `heldout_target_acc`.

Parallelism: each batch of images (`batch`, a multiple of the mesh's `data` axis) and its
prompt embeddings are split over `data`; f_theta's params and optimizer state are replicated;
the frozen prior's large arrays split over `model` with `parallel.model_axis > 1`
(lmc_jax.parallel). Only process 0 writes outputs.

Survival: resumes from WORKDIR/checkpoints (the batch is a function of `(seed, step)`, the
step's noise of `fold_in(key, step)`); SIGTERM/SIGINT save a checkpoint and exit with status
143; a non-finite loss stops the run and keeps the last good checkpoint.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import struct

from lmc_jax import io, parallel
from lmc_jax.checkpoint import Checkpointer, Preemption, TrainGuard
from lmc_jax.config import require_positive, require_prompt
from lmc_jax.errors import UserError
from lmc_jax.guidance import Conditioning, GuidanceParams, surrogate_loss
from lmc_jax.guidance.common import rebind_exact_bias
from lmc_jax.guidance.from_config import build_guidance, negative_prompt, noise_for_step
from lmc_jax.priors.base import Prior
from lmc_jax.priors.factory import build_prior
from lmc_jax.writer import MetricWriter


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


@struct.dataclass
class I2IState:
    step: jax.Array
    params: Any
    opt_state: Any
    key: jax.Array


def make_data(config, prior: Prior, batch: int, seed: int, workdir: str):
    """`batch(step) -> x`: the training images in the prior's x space."""
    if config.data.source == "prior":
        from lmc_jax.priors import gaussian

        if prior.bias_fn is None:
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
               seed: int) -> I2IState:
    """The untrained state; the step's noise comes from the second of `seed`'s 3 keys."""
    params = init_params(net, x_shape, seed)
    return I2IState(step=jnp.asarray(0, jnp.int32), params=params, opt_state=opt.init(params),
                    key=jax.random.split(jax.random.PRNGKey(seed), 3)[1])


def conditioning(prior: Prior, prompt: str, n: int, negative: str | None = None) -> Conditioning:
    """`n` copies of the prompt's, the null prompt's and (NFSD) the negative prompt's embeddings."""
    return Conditioning(c=prior.embed_text([prompt] * n), u=prior.embed_text([""] * n),
                        neg=None if negative is None else prior.embed_text([negative] * n))


def make_step(net: Translator, prior: Prior, fn: Callable, hp: GuidanceParams,
              opt: optax.GradientTransformation, config: ml_collections.ConfigDict,
              mesh: jax.sharding.Mesh):
    """`step(state, x, cond) -> (state, metrics)` on `mesh`: `x` and `cond` split over `data`,
    the state replicated, the prior's params an argument of the compiled step (placed once)."""
    gcfg = config.guidance

    def step(state: I2IState, prior_params, x: jax.Array, cond: Conditioning):
        pr = prior.replace(params=prior_params)
        hp_ = rebind_exact_bias(hp, prior, pr)
        x, cond = parallel.constrain_batch((x, cond), mesh)
        t, eps = noise_for_step(gcfg, state.key, state.step, x.shape[0], pr.x_shape,
                                config.steps)
        t, eps = parallel.constrain_batch((t, eps), mesh)

        def loss_fn(p):
            y = net.apply(p, x)
            g = fn(pr, y, t, eps, cond, hp_)
            ident = jnp.mean((y - x) ** 2)
            return surrogate_loss(y, g.grad) / x.shape[0] + config.identity_weight * ident, {
                **g.scalars, "identity": ident}

        grads, metrics = jax.grad(loss_fn, has_aux=True)(state.params)
        updates, opt_state = opt.update(grads, state.opt_state, state.params)
        return state.replace(step=state.step + 1, params=optax.apply_updates(state.params, updates),
                             opt_state=opt_state), metrics

    prior_params = parallel.shard_params(prior.params, mesh)
    rep, data = parallel.replicated(mesh), parallel.batch_sharding(mesh)
    jitted = jax.jit(step, in_shardings=(rep, parallel.sharding_of(prior_params), data, data),
                     out_shardings=(rep, rep))

    def step_fn(state: I2IState, x: jax.Array, cond: Conditioning):
        return jitted(state, prior_params, parallel.shard_batch(x, mesh), cond)

    return step_fn


def train(config: ml_collections.ConfigDict, workdir: str, net: Translator, prior: Prior,
          fn: Callable, hp: GuidanceParams, *, mesh: jax.sharding.Mesh | None = None,
          on_eval: Callable[[int, Any], dict] | None = None) -> dict:
    """Trains (or resumes) f_theta on `mesh` (default: from the config).

    `on_eval(step, params) -> scalars` runs every `eval_every` steps and after the last; its
    scalars are logged. Returns `{state, start_state, metrics}` (the state at the start: fresh
    or resumed). Raises `lmc_jax.checkpoint.Preempted` (exit status 143) after saving on
    SIGTERM/SIGINT.
    """
    mesh = mesh if mesh is not None else parallel.mesh_from_config(config)
    parallel.check_batch(config.batch, mesh, "batch")
    train_data = make_data(config, prior, config.batch, config.seed, workdir)
    opt = optax.adam(config.lr)
    state = parallel.replicate(init_state(net, opt, prior.x_shape, config.seed), mesh)
    cfg_json = config.to_dict()
    ckpt = Checkpointer(workdir, every=config.checkpoint_every, keep=config.keep_checkpoints)
    metrics: dict = {}
    try:
        restored = ckpt.restore_latest(state)
        if restored is not None:
            state = restored[0]
            logging.info("resumed from step %d", int(state.step))
        start_state = state
        step_fn = make_step(net, prior, fn, hp, opt, config, mesh)
        cond = parallel.shard_batch(
            conditioning(prior, require_prompt(config.prompt), config.batch,
                         negative_prompt(config.guidance)), mesh)
        writer = MetricWriter(workdir)
        try:
            with Preemption() as pre:
                guard = TrainGuard(ckpt, pre, cfg_json, int(state.step), hint="lower lr")
                bar = io.progress(range(int(state.step), config.steps), initial=int(state.step),
                                  total=config.steps, desc="i2i", unit="step",
                                  disable=not parallel.is_main_process())
                for i in bar:
                    state, metrics = step_fn(state, train_data(i), cond)
                    done = i + 1
                    if done % config.log_every == 0 or done == config.steps:
                        guard.check_metrics(done, metrics)
                        writer.write_scalars(done, metrics)
                        bar.set_postfix({k: f"{float(v):.3g}" for k, v in metrics.items()})
                    if on_eval is not None and (done % config.eval_every == 0
                                                or done == config.steps):
                        writer.write_scalars(done, on_eval(done, state.params))
                    guard.end_of_step(done, state, last=done == config.steps)
        finally:
            writer.close()
    finally:
        ckpt.close()
    return {"state": state, "start_state": start_state, "metrics": metrics}


def run(config: ml_collections.ConfigDict, workdir: str) -> dict:
    """Trains (or resumes) f_theta, writes held-out grids and metrics; exits with status 143
    when preempted."""
    prompt = require_prompt(config.prompt)
    for k in ("steps", "batch", "heldout"):
        require_positive(config[k], k)
    prior = build_prior(config.prior)
    gcfg = config.guidance
    fn, hp = build_guidance(prior, gcfg)
    net = Translator(config.net.features, config.net.blocks)
    heldout = make_data(config, prior, config.heldout, config.seed + 99991, workdir)(0)
    k_eval = jax.random.split(jax.random.PRNGKey(config.seed), 3)[2]
    cond_h = conditioning(prior, prompt, config.heldout, negative_prompt(gcfg))
    main = parallel.is_main_process()

    @jax.jit
    def evaluate(params):
        y = net.apply(params, heldout)
        norms = []
        for i in range(4):  # a fixed set of (t, eps) draws
            t, eps = noise_for_step(gcfg, k_eval, i, y.shape[0], prior.x_shape, 1)
            g = fn(prior, y, t, eps, cond_h, hp)
            norms.append(jnp.mean(jnp.sqrt(jnp.sum(g.parts["L_cond"] ** 2, axis=(1, 2, 3)))))
        return y, jnp.mean(jnp.stack(norms))

    def eval_metrics(params) -> tuple[dict, np.ndarray]:
        y, l_cond = parallel.to_host(evaluate(params))
        out = {"heldout_L_cond": float(l_cond)}
        if prior.bias_fn is not None:
            mus = np.asarray(prior.params["mu"])
            target = int(np.argmax(np.asarray(cond_h.c[0])))
            colour = y.mean(axis=(1, 2))
            out["heldout_target_acc"] = float(np.mean(
                np.argmin(((colour[:, None] - mus[None]) ** 2).sum(-1), axis=1) == target))
        return out, np.asarray(prior.decode(y))

    def on_eval(done: int, params) -> dict:
        ev, outs = eval_metrics(params)
        if main:
            rows = [io.to_uint8(np.asarray(prior.decode(heldout))), io.to_uint8(outs)]
            io.save_png(os.path.join(workdir, f"heldout_{done:06d}.png"), io.grid(rows),
                        scale=max(1, 128 // prior.image_shape[0]))
        return ev

    # The untrained network is the identity map: its figures are those of the inputs.
    before, _ = eval_metrics(init_params(net, prior.x_shape, config.seed))
    res = train(config, workdir, net, prior, fn, hp, on_eval=on_eval)
    first = eval_metrics(res["start_state"].params)[0]
    after, _ = eval_metrics(res["state"].params)
    result = {f"{k}_before": v for k, v in before.items()}
    result.update({f"{k}_at_start": v for k, v in first.items()})
    result.update(after)
    result.update({k: float(v) for k, v in res["metrics"].items()})
    if main:
        io.write_json(os.path.join(workdir, "metrics.json"), result)
        print(io.format_table([[k, v] for k, v in result.items()], ["metric", "value"]))
    return result
