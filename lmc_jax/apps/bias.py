"""Trains `b_psi` for a prior (configs/bias.py) and writes it to WORKDIR/bias.

Resumes from WORKDIR/checkpoints; SIGTERM/SIGINT save and exit with EXIT_PREEMPTED; a
non-finite loss stops the run and keeps the last good checkpoint.
"""

from __future__ import annotations

import logging
import os
import sys
import time

import jax.numpy as jnp
import ml_collections
import optax

from lmc_jax import io
from lmc_jax.bias import train
from lmc_jax.bias.model import BiasNet, bias_fn_from, param_count
from lmc_jax.bias.store import save_bias
from lmc_jax.checkpoint import EXIT_PREEMPTED, Checkpointer, Preemption, all_finite
from lmc_jax.config import require_positive
from lmc_jax.data.sources import make_source
from lmc_jax.errors import UserError
from lmc_jax.priors.factory import build_prior
from lmc_jax.writer import MetricWriter

EVAL_TIMESTEPS = list(range(50, 1000, 100))


def build_module(cfg: ml_collections.ConfigDict) -> BiasNet:
    return BiasNet(features=cfg.features, normalize=cfg.normalize, center=cfg.center,
                   padding=cfg.padding, conditional=cfg.conditional)


def train_bias(config: ml_collections.ConfigDict, workdir: str, prior=None, quiet=False):
    """Trains (or resumes) b_psi; returns `(module, params, prior, seconds)`."""
    require_positive(config.train.steps, "train.steps")
    require_positive(config.train.batch, "train.batch")
    if config.bias.target not in ("cond", "uncond"):
        raise UserError(f"bias.target must be 'cond' or 'uncond', got {config.bias.target!r}")
    prior = prior or build_prior(config.prior)
    conditional = config.bias.target == "cond"
    if conditional and not config.bias.conditional:
        raise UserError("bias.target='cond' needs bias.conditional=True")
    module = build_module(config.bias)
    tc = config.train
    warmup = min(tc.warmup, tc.steps // 2)
    lr = optax.warmup_cosine_decay_schedule(0.0, tc.lr, warmup, max(tc.steps, warmup + 1),
                                            tc.lr * 1e-2)
    opt = optax.adam(lr)
    source = make_source(config.data, prior, tc.batch, config.seed, conditional, workdir)
    state = train.init_state(module, prior, opt, config.seed, source(0)[1])
    ckpt = Checkpointer(workdir, every=config.checkpoint_every, keep=config.keep_checkpoints)
    restored = ckpt.restore_latest(state)
    if restored is not None:
        state = restored[0]
        logging.info("resumed from step %d", int(state.step))
    step_fn = train.make_train_step(module, prior, opt, t_min=tc.t_min, t_max=tc.t_max,
                                    antithetic=config.bias.antithetic,
                                    loss_weight=config.bias.loss_weight)
    writer = MetricWriter(workdir)
    start_step = int(state.step)
    start = time.time()
    cfg_json = config.to_dict()
    with Preemption() as pre:
        bar = io.progress(range(start_step, tc.steps), initial=start_step, total=tc.steps,
                          desc="train b_psi", unit="step", disable=quiet)
        for i in bar:
            x, emb = source(i)
            new_state, metrics = step_fn(state, x, emb)
            if (i + 1) % config.log_every == 0 or i + 1 == tc.steps:
                if not all_finite(metrics):
                    ckpt.close()
                    raise UserError(f"non-finite b_psi loss at step {i + 1} ({metrics}); the "
                                    f"last good checkpoint in {ckpt.directory} is kept; lower "
                                    "train.lr")
                writer.write_scalars(i + 1, metrics)
                bar.set_postfix(loss=f"{float(metrics['loss']):.4g}")
            state = new_state
            if ckpt.should_save(i + 1, last=i + 1 == tc.steps) or pre.requested:
                ckpt.save(i + 1, state, cfg_json)
            if pre.requested:
                writer.close()
                ckpt.close()
                print(f"preempted: checkpoint {i + 1} saved in {ckpt.directory}", file=sys.stderr)
                sys.exit(EXIT_PREEMPTED)
    writer.close()
    ckpt.close()
    return module, state.params, prior, time.time() - start


def run(config: ml_collections.ConfigDict, workdir: str) -> dict:
    module, params, prior, seconds = train_bias(config, workdir)
    out = os.path.join(workdir, "bias")
    metrics = {"train_seconds": seconds, "param_count": param_count(params),
               "steps": config.train.steps}
    if prior.bias_fn is not None:  # exact prior: compare with the closed-form b on fresh samples
        conditional = config.bias.target == "cond"
        data = config.data.copy_and_resolve_references()
        data.source = "prior"
        source = make_source(data, prior, 64,
                             config.seed + 12345, conditional, workdir)
        x, emb = source(0)
        if not conditional:
            emb = jnp.ones((x.shape[0], prior.params["mu"].shape[0]))
        per_t = train.relative_bias_error(bias_fn_from(module, params), prior, x, emb,
                                          EVAL_TIMESTEPS)
        metrics["bias_rel_err"] = sum(per_t.values()) / len(per_t)
        metrics["bias_rel_err_per_t"] = {str(k): v for k, v in per_t.items()}
    save_bias(out, module, params, prior, training=metrics)
    io.write_json(os.path.join(workdir, "metrics.json"), metrics)
    print(io.format_table([[k, v] for k, v in metrics.items() if not isinstance(v, dict)],
                          ["metric", "value"]))
    print(f"b_psi saved to {out}")
    return metrics
