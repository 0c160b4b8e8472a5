"""Image synthesis by score distillation (configs/synth.py): optimize `x` toward a prompt.

With `guidance.fixed_noise`, each seed draws its noise once and keeps it; `seeds > 1` writes a
grid over seeds that shows the diversity this gives.

Parallelism: the `batch` images being optimized are split over the mesh's `data` axis (`batch`
must be a multiple of it), the prior's large arrays over `model` with `parallel.model_axis > 1`
(lmc_jax.parallel). Only process 0 writes files. The run is short and keeps no checkpoints:
SIGTERM ends it (a re-run starts over).
"""

from __future__ import annotations

import os
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from lmc_jax import io, parallel
from lmc_jax.apps.optimize import evaluator_scores, make_optimizer, optimize_x
from lmc_jax.config import require_positive, require_prompt
from lmc_jax.guidance import Conditioning
from lmc_jax.guidance.from_config import guidance_record
from lmc_jax.priors.factory import build_prior
from lmc_jax.writer import MetricWriter


def run(config: ml_collections.ConfigDict, workdir: str) -> dict:
    prompt = require_prompt(config.prompt)
    require_positive(config.steps, "steps")
    require_positive(config.batch, "batch")
    require_positive(config.seeds, "seeds")
    prior = build_prior(config.prior)
    n = config.batch
    mesh = parallel.mesh_from_config(config)
    parallel.check_batch(n, mesh, "batch")
    prior = prior.replace(params=parallel.shard_params(prior.params, mesh))
    guide = guidance_record(prior, config.guidance, config.steps, config)
    neg = guide.negative_prompt
    cond = Conditioning(c=prior.embed_text([prompt] * n), u=prior.embed_text([""] * n),
                        neg=None if neg is None else prior.embed_text([neg] * n))
    start = time.time()
    finals, metrics = [], {}
    writer = MetricWriter(workdir)  # writes on process 0 only
    for s in range(config.seeds):
        k_init, k_noise = jax.random.split(jax.random.PRNGKey(config.seed + s))
        images = jnp.zeros((n, *prior.image_shape))
        if config.init == "noise":
            images = 0.5 * jax.random.normal(k_init, images.shape)
        x0 = parallel.shard_batch(prior.encode(images), mesh)  # the images split over 'data'
        x, _, metrics = optimize_x(
            prior, x0, cond, guide, steps=config.steps,
            optimizer=make_optimizer(config.optimizer, config.lr), key=k_noise,
            log_every=config.log_every, desc=f"synth seed {config.seed + s}",
            snapshot_steps=(config.steps,), writer=writer, tag=f"seed{config.seed + s}/")
        finals.append(io.to_uint8(np.asarray(prior.decode(parallel.to_host(x)))))
    writer.close()
    main = parallel.is_main_process()
    if main:
        os.makedirs(workdir, exist_ok=True)
        io.save_png(os.path.join(workdir, "final.png"), io.grid(finals), scale=4)
    colours = np.concatenate(finals).astype(np.float32).mean(axis=(0, 1, 2)) / 127.5 - 1.0
    metrics.update(seconds=time.time() - start, steps=config.steps,
                   mean_colour=[float(v) for v in colours])
    metrics.update(evaluator_scores(
        prior.name, np.concatenate(finals).astype(np.float32) / 127.5 - 1.0, prompt))
    if config.get("clip_path", ""):  # CLIP score + R-precision (lmc_jax.metrics.clip)
        from lmc_jax.metrics.clip import clip_view_metrics

        metrics.update(clip_view_metrics(
            np.concatenate(finals).astype(np.float32) / 127.5 - 1.0, prompt, config.clip_path))
    if main:
        io.write_json(os.path.join(workdir, "metrics.json"), metrics)
    return metrics
