"""The analytic testbed app (configs/testbed.py): SDS vs LMC-SDS on the exact prior.

Figures (metrics.json, printed as a table):
- `hf_retention_<run>`: high-frequency energy after the run over the energy before,
  `sum_{|f| > cutoff} |F(x_N - mu)|^2 / sum_{|f| > cutoff} |F(x_0 - mu)|^2`, averaged over the
  data samples the runs start from. SDS loses detail (< 1); LMC-SDS with an exact b keeps it.
- `bias_rel_err`: `mean_t E_x ||b_psi(x, t) - b(x, t)|| / ||b(x, t) - mu||`, t in {50..950}.
- mixture: `target_acc_<m>` (fraction of images whose mean colour ends nearest the prompted
  class mean) and `saturation_<m>` (mean over images of ||mean colour|| / ||prompted mean||).
"""

from __future__ import annotations

import logging
import os
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from lmc_jax import io
from lmc_jax.apps.optimize import optimize_x
from lmc_jax.bias import train as bias_train
from lmc_jax.bias.model import bias_fn_from
from lmc_jax.bias.store import load_bias
from lmc_jax.errors import UserError
from lmc_jax.guidance import Conditioning, Guidance, GuidanceParams
from lmc_jax.guidance.from_config import noise_spec
from lmc_jax.metrics.class_colour import class_colour_figures
from lmc_jax.priors import gaussian
from lmc_jax.priors.base import Prior
from lmc_jax.priors.factory import build_prior

EVAL_TIMESTEPS = list(range(50, 1000, 100))


def high_frequency_energy(x: jax.Array, mu: jax.Array, cutoff: float) -> jax.Array:
    """`sum_{|f| > cutoff} |F(x - mu)|^2` per image, [B] (orthonormal DFT over H, W)."""
    h, w = x.shape[1:3]
    mask = jnp.asarray(gaussian.radial_frequency(h, w) > cutoff, jnp.float32)
    xf = jnp.fft.fft2(x - mu, axes=(1, 2), norm="ortho")
    return jnp.sum(jnp.abs(xf) ** 2 * mask[None, :, :, None], axis=(1, 2, 3))


def descend(prior: Prior, x0: jax.Array, cond: Conditioning, guide: Guidance, steps: int,
            lr: float, key: jax.Array, snapshot_steps: list[int]
            ) -> tuple[jax.Array, list[np.ndarray]]:
    """`x <- x - lr * grad` (SGD) for `steps` steps with the guidance record `guide`, through
    `apps.optimize.optimize_x`; returns the final x and the snapshots taken after the steps in
    `snapshot_steps` (0 = the start). A non-finite result stops with a UserError."""
    x, snaps, _ = optimize_x(prior, x0, cond, guide, steps=steps, optimizer=optax.sgd(lr),
                             key=key, snapshot_steps=tuple(snapshot_steps))
    return x, snaps


def record(method: str, hp: GuidanceParams, gcfg: ml_collections.ConfigDict,
           steps: int) -> Guidance:
    """The guidance record of `method` with `hp` and the section's `(t, eps)` draw."""
    return Guidance(method=method, params=hp, noise=noise_spec(gcfg, steps))


def learned_bias(section: ml_collections.ConfigDict, prior: Prior, prior_cfg, seed: int,
                 workdir: str):
    """Trains b_psi for `prior` with the recipe in `section` (or loads `section.bias_path`)."""
    if section.bias_path:
        _, _, fn = load_bias(section.bias_path, prior)
        return fn, 0.0
    from lmc_jax.bias.fit import train_bias  # the same training as configs/bias.py

    cfg = ml_collections.ConfigDict({
        "seed": seed, "prior": prior_cfg,
        "data": {"source": "prior", "path": "", "cache_dir": ""},
        "bias": {k: section[k] for k in ("features", "normalize", "center", "padding",
                                         "conditional",
                                         "target", "antithetic",
                                         "loss_weight")},
        "train": {"steps": section.steps, "batch": section.batch, "lr": section.lr,
                  "warmup": section.warmup, "t_min": 0, "t_max": 1000},
        "log_every": max(section.steps // 10, 1), "checkpoint_every": section.steps,
        "keep_checkpoints": 1,
    })
    module, params, _, seconds = train_bias(cfg, workdir, prior=prior)
    return bias_fn_from(module, params), seconds


def run(config: ml_collections.ConfigDict, workdir: str) -> dict:
    """Runs the testbed and writes its figures into `workdir`."""
    if not config.prior.name.startswith("gaussian"):
        raise UserError(f"the testbed needs an exact prior (prior.name='gaussian'), got "
                        f"{config.prior.name!r}")
    start = time.time()
    os.makedirs(workdir, exist_ok=True)
    prior = build_prior(config.prior)
    key = jax.random.PRNGKey(config.seed)
    k_data, k_noise, k_eval, k_mix = jax.random.split(key, 4)
    n = config.num_images
    x0 = gaussian.sample(prior.params, k_data, n)
    emb = prior.embed_text([""] * n)
    cond = Conditioning(c=emb, u=emb)
    gcfg = config.guidance
    snapshot_steps = sorted({int(round(v)) for v in
                             np.linspace(0, config.steps, config.snapshots)})
    runs = {
        "sds": ("sds", GuidanceParams(w=gcfg.w, weighting=gcfg.weighting)),
        "lmc_exact": ("lmc", GuidanceParams(w=gcfg.w, weighting=gcfg.weighting,
                                            exact_deficiency=True)),
    }
    metrics: dict = {}
    if config.learned.enabled:
        bias_fn, secs = learned_bias(config.learned, prior, config.prior, config.seed,
                                     os.path.join(workdir, "bias_uncond"))
        metrics["bias_train_seconds"] = secs
        x_eval = gaussian.sample(prior.params, k_eval, 64)
        per_t = bias_train.relative_bias_error(bias_fn, prior, x_eval,
                                               prior.embed_text([""] * 64), EVAL_TIMESTEPS)
        ident = bias_train.relative_bias_error(lambda x, t, e: x, prior, x_eval,
                                               prior.embed_text([""] * 64), EVAL_TIMESTEPS)
        metrics["bias_rel_err"] = float(np.mean(list(per_t.values())))
        metrics["bias_rel_err_identity"] = float(np.mean(list(ident.values())))
        metrics["bias_rel_err_per_t"] = {str(k): v for k, v in per_t.items()}
        _plot_bias_error(os.path.join(workdir, "bias_error.png"), per_t, ident)
        runs["lmc"] = ("lmc", GuidanceParams(w=gcfg.w, weighting=gcfg.weighting, b_psi=bias_fn))
    mu = prior.params["mu"][0]
    e0 = high_frequency_energy(x0, mu, config.hf_cutoff)
    strips = {}
    for name, (method, hp) in runs.items():
        x_final, snaps = descend(prior, x0, cond, record(method, hp, gcfg, config.steps),
                                 config.steps, config.lr, k_noise, snapshot_steps)
        ratio = high_frequency_energy(x_final, mu, config.hf_cutoff) / e0
        metrics[f"hf_retention_{name}"] = float(jnp.mean(ratio))
        strips[name] = snaps
        logging.info("%s done: hf retention %.4f", name, metrics[f"hf_retention_{name}"])
    _write_strip(os.path.join(workdir, "strip.png"), strips)
    if config.mixture.enabled:
        metrics.update(run_mixture(config, workdir, k_mix))
    metrics["seconds"] = time.time() - start
    metrics["steps"] = config.steps
    io.write_json(os.path.join(workdir, "metrics.json"), metrics)
    print(io.format_table([[k, v] for k, v in metrics.items() if not isinstance(v, dict)],
                          ["metric", "value"]))
    return metrics


def run_mixture(config: ml_collections.ConfigDict, workdir: str, key: jax.Array) -> dict:
    """SDS at high w vs LMC-SDS at low w with a conditional b_psi, from grey + small noise."""
    mcfg = config.mixture
    prior_cfg = config.prior.copy_and_resolve_references()
    prior_cfg.name = "gaussian_mixture"
    prior = build_prior(prior_cfg)
    names = list(gaussian.DEFAULT_CLASSES)
    k = len(names)
    n = mcfg.num_images
    labels = np.arange(n) % k
    emb_c = prior.embed_text([names[i] for i in labels])
    cond = Conditioning(c=emb_c, u=prior.embed_text([""] * n))
    k_init, k_noise = jax.random.split(key)
    x0 = mcfg.init_noise * jax.random.normal(k_init, (n, *prior.x_shape))
    bias_fn, secs = learned_bias(mcfg, prior, prior_cfg, config.seed + 1,
                                 os.path.join(workdir, "bias_cond"))
    per_t = bias_train.relative_bias_error(
        bias_fn, prior, gaussian.sample(prior.params, k_init, 64, jnp.arange(64) % k),
        jax.nn.one_hot(jnp.arange(64) % k, k), EVAL_TIMESTEPS)
    out = {"mixture_bias_train_seconds": secs,
           "mixture_bias_rel_err": float(np.mean(list(per_t.values())))}
    mus = np.asarray(prior.params["mu"])
    gcfg = config.guidance
    finals = {}
    for name, method, w, fn in [("sds", "sds", mcfg.w_sds, None),
                                ("lmc", "lmc", mcfg.w_lmc, bias_fn)]:
        # The mixture's b_psi is conditional (trained on x_hat from the class prompt).
        hp = GuidanceParams(w=w, weighting=gcfg.weighting, b_psi=fn, lmc_xhat="cond")
        x, _ = descend(prior, x0, cond, record(method, hp, gcfg, config.steps), config.steps,
                       config.lr, k_noise, [])
        for k_, v in class_colour_figures(np.asarray(x), mus, labels).items():
            out[f"{k_}_{name}"] = v
        out[f"hf_energy_{name}"] = float(jnp.mean(high_frequency_energy(
            x, jnp.asarray(mus[labels])[:, None, None, :], config.hf_cutoff)))
        finals[name] = np.asarray(x)
    rows = [io.to_uint8(np.clip(finals[m][:k], -1, 1)) for m in ("sds", "lmc")]
    io.save_png(os.path.join(workdir, "mixture.png"), io.grid(rows), scale=3)
    return out


def _write_strip(path: str, strips: dict[str, list[np.ndarray]]) -> None:
    """Rows: the runs (first image of the batch); columns: steps."""
    rows = [io.to_uint8(np.stack([s[0] for s in snaps])) for snaps in strips.values()]
    io.save_png(path, io.grid(rows), scale=3)


def _plot_bias_error(path: str, per_t: dict[int, float], ident: dict[int, float]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.2), dpi=120)
    ax.plot(list(per_t), list(per_t.values()), "o-", label="b_psi (learned)")
    ax.plot(list(ident), list(ident.values()), "s--", label="identity b(x)=x")
    ax.set_xlabel("timestep t")
    ax.set_ylabel("||b_psi - b|| / ||b - mu||")
    ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
