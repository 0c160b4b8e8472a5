"""Trains `b_psi` for a prior (configs/bias.py) and writes it to WORKDIR/bias.

The training itself (step, mesh, loop) lives in `lmc_jax.bias.fit`, shared with the
automatic b_psi; this app runs it and writes the result.

Survival (lmc_jax.loop): resumes from WORKDIR/checkpoints, bit-identical to an uninterrupted
run (the batch is a function of `(seed, step)`, the step's noise of `fold_in(key, step)`); a
resume that changes the architecture (`FIXED_KEYS`) is refused. SIGTERM/SIGINT save a
checkpoint and exit with status 143 (`EXIT_PREEMPTED`): run the same command again to
continue. A non-finite loss or state stops the run with an error and keeps the last good
checkpoint. Only process 0 writes outputs.
"""

from __future__ import annotations

import os

import jax.numpy as jnp
import ml_collections

from lmc_jax import io, parallel
from lmc_jax.bias import train
from lmc_jax.bias.fit import FIXED_KEYS, build_module, make_step, train_bias
from lmc_jax.bias.model import bias_fn_from, param_count
from lmc_jax.bias.store import save_bias
from lmc_jax.data.sources import make_source

EVAL_TIMESTEPS = list(range(50, 1000, 100))
__all__ = ["FIXED_KEYS", "build_module", "make_step", "run", "train_bias"]


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
