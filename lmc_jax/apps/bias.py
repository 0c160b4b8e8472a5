"""Trains `b_psi` for a prior (configs/bias.py) and writes it to WORKDIR/bias.

Parallelism: each batch of images (`train.batch`, a multiple of the mesh's `data` axis) is
split over `data`; b_psi's params and optimizer state are replicated; the frozen prior's large
arrays split over `model` with `parallel.model_axis > 1` (lmc_jax.parallel).

Survival (lmc_jax.loop): resumes from WORKDIR/checkpoints, bit-identical to an uninterrupted
run (the batch is a function of `(seed, step)`, the step's noise of `fold_in(key, step)`); a
resume that changes the architecture (`FIXED_KEYS`) is refused. SIGTERM/SIGINT save a
checkpoint and exit with status 143 (`EXIT_PREEMPTED`): run the same command again to
continue. A non-finite loss or state stops the run with an error and keeps the last good
checkpoint. Only process 0 writes outputs.
"""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import ml_collections
import optax

from lmc_jax import io, parallel
from lmc_jax.bias import train
from lmc_jax.bias.model import BiasNet, bias_fn_from, param_count
from lmc_jax.bias.store import save_bias
from lmc_jax.config import require_positive
from lmc_jax.data.sources import make_source
from lmc_jax.errors import UserError
from lmc_jax.loop import TrainLoop
from lmc_jax.priors.factory import build_prior

EVAL_TIMESTEPS = list(range(50, 1000, 100))
# Config keys that fix the architecture and shapes of the checkpointed b_psi.
FIXED_KEYS = ("bias.features", "bias.conditional", "bias.normalize", "bias.center",
              "bias.padding", "prior.name", "prior.resolution")


def build_module(cfg: ml_collections.ConfigDict) -> BiasNet:
    return BiasNet(features=cfg.features, normalize=cfg.normalize, center=cfg.center,
                   padding=cfg.padding, conditional=cfg.conditional)


def make_step(module: BiasNet, prior, opt, config: ml_collections.ConfigDict,
              mesh: jax.sharding.Mesh):
    """`step(state, x, emb) -> (state, metrics)` on `mesh`: `x`, `emb` split over `data`,
    the state replicated, the prior's params an argument of the compiled step (placed once)."""
    tc = config.train

    def step(state, prior_params, x, emb):
        inner = train.make_train_step(module, prior.replace(params=prior_params), opt,
                                      t_min=tc.t_min, t_max=tc.t_max,
                                      antithetic=config.bias.antithetic,
                                      loss_weight=config.bias.loss_weight)
        x, emb = parallel.constrain_batch((x, emb), mesh)
        return inner(state, x, emb)

    prior_params = parallel.shard_params(prior.params, mesh)
    data = parallel.batch_sharding(mesh)
    jitted = parallel.jit_step(step, mesh, [parallel.sharding_of(prior_params), data, data])

    def step_fn(state, x, emb):
        x, emb = parallel.shard_batch((x, emb), mesh)
        return jitted(state, prior_params, x, emb)

    step_fn.jitted, step_fn.prior_params = jitted, prior_params  # AOT (lmc_jax.plan)
    return step_fn


def train_bias(config: ml_collections.ConfigDict, workdir: str, prior=None, quiet=False,
               mesh: jax.sharding.Mesh | None = None):
    """Trains (or resumes) b_psi; returns `(module, params, prior, seconds)`.

    Raises `lmc_jax.checkpoint.Preempted` (exit status 143) after saving on SIGTERM/SIGINT.
    """
    require_positive(config.train.steps, "train.steps")
    require_positive(config.train.batch, "train.batch")
    if config.bias.target not in ("cond", "uncond"):
        raise UserError(f"bias.target must be 'cond' or 'uncond', got {config.bias.target!r}")
    mesh = mesh if mesh is not None else parallel.mesh_from_config(config)
    parallel.check_batch(config.train.batch, mesh, "train.batch")
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
    with TrainLoop(workdir, config, steps=tc.steps, fixed_keys=FIXED_KEYS, desc="train b_psi",
                   hint="lower train.lr", quiet=quiet, show=lambda k: k == "loss") as loop:
        source = make_source(config.data, prior, tc.batch, config.seed, conditional, workdir)
        state = parallel.replicate(
            train.init_state(module, prior, opt, config.seed, source(0)[1]), mesh)
        step = make_step(module, prior, opt, config, mesh)
        res = loop.run(loop.restore(state), lambda state, i: step(state, *source(i)))
    return module, res.state.params, prior, res.seconds


def run(config: ml_collections.ConfigDict, workdir: str) -> dict:
    """Trains (or resumes) b_psi and saves it; exits with status 143 when preempted."""
    module, params, prior, seconds = train_bias(config, workdir)
    out = os.path.join(workdir, "bias")
    metrics = {"train_seconds": seconds, "param_count": param_count(params),
               "steps": config.train.steps}
    if prior.has_exact_bias:  # exact prior: compare with the closed-form b on fresh samples
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
    if parallel.is_main_process():
        save_bias(out, module, params, prior, training=metrics)
        io.write_json(os.path.join(workdir, "metrics.json"), metrics)
        print(io.format_table([[k, v] for k, v in metrics.items() if not isinstance(v, dict)],
                              ["metric", "value"]))
        print(f"b_psi saved to {out}")
    return metrics
