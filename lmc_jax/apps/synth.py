"""Image synthesis by score distillation: optimize `x` (pixels or latents) toward a prompt.

The optimized variable is the prior's `x` directly; the guidance gradient is fed to optax as
the gradient (`grad = guidance(x)`), as in DreamFusion's image-space experiments.
"""

from __future__ import annotations

import os
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from lmc_jax import io
from lmc_jax.config import require_positive, require_prompt
from lmc_jax.errors import UserError
from lmc_jax.guidance import Conditioning
from lmc_jax.guidance.from_config import build_guidance, noise_for_step
from lmc_jax.priors.factory import build_prior


def run(config: ml_collections.ConfigDict, workdir: str) -> dict:
    prompt = require_prompt(config.prompt)
    require_positive(config.steps, "steps")
    require_positive(config.batch, "batch")
    prior = build_prior(config.prior)
    gcfg = config.guidance
    fn, hp = build_guidance(prior, gcfg)
    n = config.batch
    cond = Conditioning(c=prior.embed_text([prompt] * n), u=prior.embed_text([""] * n),
                        neg=prior.embed_text([gcfg.negative_prompt] * n)
                        if gcfg.method == "nfsd" else None)
    key = jax.random.PRNGKey(config.seed)
    k_init, k_noise = jax.random.split(key)
    images = jnp.zeros((n, *prior.image_shape))
    if config.init == "noise":
        images = 0.5 * jax.random.normal(k_init, images.shape)
    x = prior.encode(images)
    opt = optax.adam(config.lr)
    opt_state = opt.init(x)

    @jax.jit
    def step(x, opt_state, i):
        t, eps = noise_for_step(gcfg, k_noise, i, n, prior.x_shape, config.steps)
        out = fn(prior, x, t, eps, cond, hp)
        updates, opt_state = opt.update(out.grad, opt_state, x)
        return optax.apply_updates(x, updates), opt_state, out.scalars

    start = time.time()
    bar = io.progress(range(config.steps), desc="synth", unit="step")
    scalars = {}
    for i in bar:
        x, opt_state, scalars = step(x, opt_state, jnp.asarray(i))
        if (i + 1) % config.log_every == 0 or i + 1 == config.steps:
            if not all(np.isfinite(float(v)) for v in scalars.values()):
                raise UserError(f"non-finite guidance at step {i}: {scalars}; lower the lr")
            bar.set_postfix({k: f"{float(v):.3g}" for k, v in scalars.items()})
    final = np.asarray(prior.decode(x))
    os.makedirs(workdir, exist_ok=True)
    io.save_png(os.path.join(workdir, "final.png"), io.grid([io.to_uint8(final)]), scale=4)
    metrics = {k: float(v) for k, v in scalars.items()}
    metrics.update(seconds=time.time() - start, steps=config.steps,
                   mean_colour=[float(v) for v in final.mean(axis=(0, 1, 2))])
    io.write_json(os.path.join(workdir, "metrics.json"), metrics)
    return metrics
