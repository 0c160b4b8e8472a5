"""Zero-shot image-to-image training (configs/i2i.py).

`f_theta(x)` is a small residual conv net on the prior's `x`. One jitted step:
  y = f_theta(x);  g = guidance(prior, y, t, eps, cond(prompt), hp)
  loss(theta) = sum(sg(g) * y) / B + identity_weight * mean ||y - x||^2
Held-out figures: `heldout_L_cond` (mean norm of the conditioning part of the guidance
gradient on held-out outputs: it falls as outputs agree with the prompt) and, on the exact
mixture, `heldout_target_acc`.
"""

from __future__ import annotations

import logging
import os
import sys
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import struct

from lmc_jax import io
from lmc_jax.checkpoint import EXIT_PREEMPTED, Checkpointer, Preemption, all_finite
from lmc_jax.config import require_positive, require_prompt
from lmc_jax.errors import UserError
from lmc_jax.guidance import Conditioning, surrogate_loss
from lmc_jax.guidance.from_config import build_guidance, noise_for_step
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


def run(config: ml_collections.ConfigDict, workdir: str) -> dict:
    prompt = require_prompt(config.prompt)
    for k in ("steps", "batch", "heldout"):
        require_positive(config[k], k)
    prior = build_prior(config.prior)
    fn, hp = build_guidance(prior, config.guidance)
    net = Translator(config.net.features, config.net.blocks)
    train_data = make_data(config, prior, config.batch, config.seed, workdir)
    heldout = make_data(config, prior, config.heldout, config.seed + 99991, workdir)(0)
    key = jax.random.PRNGKey(config.seed)
    k_init, k_run, k_eval = jax.random.split(key, 3)
    params = net.init(k_init, heldout[:1])
    opt = optax.adam(config.lr)
    state = I2IState(step=jnp.asarray(0, jnp.int32), params=params, opt_state=opt.init(params),
                     key=k_run)
    ckpt = Checkpointer(workdir, every=config.checkpoint_every, keep=config.keep_checkpoints)
    restored = ckpt.restore_latest(state)
    if restored is not None:
        state = restored[0]
        logging.info("resumed from step %d", int(state.step))

    def conditioning(n):
        return Conditioning(c=prior.embed_text([prompt] * n), u=prior.embed_text([""] * n))

    cond_b, cond_h = conditioning(config.batch), conditioning(config.heldout)
    gcfg = config.guidance

    @jax.jit
    def step_fn(state: I2IState, x: jax.Array):
        t, eps = noise_for_step(gcfg, state.key, state.step, x.shape[0], prior.x_shape,
                                config.steps)

        def loss_fn(p):
            y = net.apply(p, x)
            g = fn(prior, y, t, eps, cond_b, hp)
            ident = jnp.mean((y - x) ** 2)
            return surrogate_loss(y, g.grad) / x.shape[0] + config.identity_weight * ident, {
                **g.scalars, "identity": ident}

        grads, metrics = jax.grad(loss_fn, has_aux=True)(state.params)
        updates, opt_state = opt.update(grads, state.opt_state, state.params)
        return state.replace(step=state.step + 1, params=optax.apply_updates(state.params, updates),
                             opt_state=opt_state), metrics

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
        y, l_cond = evaluate(params)
        out = {"heldout_L_cond": float(l_cond)}
        if prior.bias_fn is not None:
            mus = np.asarray(prior.params["mu"])
            target = int(np.argmax(np.asarray(cond_h.c[0])))
            colour = np.asarray(y).mean(axis=(1, 2))
            out["heldout_target_acc"] = float(np.mean(
                np.argmin(((colour[:, None] - mus[None]) ** 2).sum(-1), axis=1) == target))
        return out, np.asarray(prior.decode(y))

    writer = MetricWriter(workdir)
    before, _ = eval_metrics(params)  # the identity map: the untrained network
    first = eval_metrics(state.params)[0]
    cfg_json = config.to_dict()
    metrics: dict = {}
    with Preemption() as pre:
        bar = io.progress(range(int(state.step), config.steps), initial=int(state.step),
                          total=config.steps, desc="i2i", unit="step")
        for i in bar:
            new_state, metrics = step_fn(state, train_data(i))
            done = i + 1
            if done % config.log_every == 0 or done == config.steps:
                if not all_finite(metrics):
                    ckpt.close()
                    raise UserError(f"non-finite i2i loss at step {done}; the last good "
                                    f"checkpoint in {ckpt.directory} is kept; lower lr")
                writer.write_scalars(done, metrics)
                bar.set_postfix({k: f"{float(v):.3g}" for k, v in metrics.items()})
            state = new_state
            if done % config.eval_every == 0 or done == config.steps:
                ev, outs = eval_metrics(state.params)
                writer.write_scalars(done, ev)
                rows = [io.to_uint8(np.asarray(prior.decode(heldout))), io.to_uint8(outs)]
                io.save_png(os.path.join(workdir, f"heldout_{done:06d}.png"), io.grid(rows),
                            scale=max(1, 128 // prior.image_shape[0]))
            if ckpt.should_save(done, last=done == config.steps) or pre.requested:
                ckpt.save(done, state, cfg_json)
            if pre.requested:
                writer.close()
                ckpt.close()
                print(f"preempted: checkpoint {done} saved in {ckpt.directory}", file=sys.stderr)
                sys.exit(EXIT_PREEMPTED)
    writer.close()
    ckpt.close()
    after, _ = eval_metrics(state.params)
    result = {f"{k}_before": v for k, v in before.items()}
    result.update({f"{k}_at_start": v for k, v in first.items()})
    result.update(after)
    result.update({k: float(v) for k, v in metrics.items()})
    io.write_json(os.path.join(workdir, "metrics.json"), result)
    print(io.format_table([[k, v] for k, v in result.items()], ["metric", "value"]))
    return result
