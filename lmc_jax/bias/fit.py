"""Fitting b_psi on a mesh with the train loop: the step and the loop every b_psi training
runs (`configs/bias.py` through `lmc_jax.apps.bias`, and the automatic b_psi of
`lmc_jax.bias.auto`), so that the library never imports an app.

Parallelism: each batch of images (`train.batch`, a multiple of the mesh's `data` axis) is
split over `data`; b_psi's params and optimizer state are replicated and donated; the frozen
prior's large arrays split over `model` with `parallel.model_axis > 1` (lmc_jax.parallel).
Survival: `lmc_jax.loop.TrainLoop` (resume, NaN guard, preemption).
"""

from __future__ import annotations

import jax
import ml_collections
import optax

from lmc_jax import parallel
from lmc_jax.bias import train
from lmc_jax.bias.model import BiasNet
from lmc_jax.config import require_positive
from lmc_jax.data.sources import make_source
from lmc_jax.errors import UserError
from lmc_jax.loop import TrainLoop
from lmc_jax.priors.factory import build_prior

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
