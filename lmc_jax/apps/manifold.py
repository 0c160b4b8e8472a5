"""The manifold testbed (configs/testbed.py:manifold): what LMC-SDS's corrective does that CSD
does not, measured exactly.

Why a mixture: on one Gaussian the exact deficiency `b(x, t) = E_eps[x_hat | x]` holds for every
`x`, so `E[grad L_lmc] = W (a/s) J_b^T (b - E[x_hat | x]) = 0` everywhere and LMC-SDS is CSD plus
zero-mean noise. The paper's corrective needs a *shallow* `b` that models the content-independent
blur and not the pull toward the data. Here the data are an exact mixture of textured Gaussians
(`lmc_jax.priors.gaussian.pattern_classes`: six sharp patterns, each with a small stationary
Gaussian around it), and the deficiency models compared are

- `lin`: the best linear model, the Wiener filter of the single Gaussian with the mixture's mean
  and covariance (closed form; what an ideal shallow b_psi could learn),
- `post`: the mixture's own `E_eps[x_hat | x]` (Monte Carlo, 16 antithetic pairs): the exact
  model, which must give CSD in expectation,
- `learned`: a b_psi trained on samples of the mixture (configs/bias.py's recipe).

From off-manifold starts (a data sample blurred; a data sample with a patch of another class;
a 50/50 blend of two classes; white noise), each method descends `x <- x - lr * grad` at `w = 0`
(null prompt) and at a low `w` (the start's class as prompt), against SDS (also at `w = 100`)
and CSD. Measured exactly on the result:
- `logp`: log-density under the (unconditional) prior, nats per dimension;
- `dist`: RMS distance to the nearest class mean; `acc`: the nearest class is the start's;
- `hf`: energy above `hf_cutoff` cycles per image over the data's mean (1 = as detailed as data);
- `moved`: RMS distance from the start; `oob`: fraction of pixels outside [-1, 1].
"""

from __future__ import annotations

import logging
import os
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from lmc_jax import io
from lmc_jax.apps.testbed import descend, high_frequency_energy, learned_bias, record
from lmc_jax.errors import UserError
from lmc_jax.guidance import Conditioning, GuidanceParams
from lmc_jax.priors import gaussian
from lmc_jax.priors.base import Prior
from lmc_jax.priors.factory import build_prior

STARTS = ("blurred", "patched", "blend", "noise")


def make_starts(prior: Prior, key: jax.Array, blur_cutoff: float, noise_std: float
                ) -> tuple[jax.Array, np.ndarray, np.ndarray]:
    """One start of each kind per class: returns `x0` [4K, H, W, C], the class each start
    belongs to (its prompt at low w) [4K], and the start kind's index into STARTS [4K].

    blurred: a sample of class k low-passed at `blur_cutoff` cycles per image (Gaussian gain);
    patched: a sample of class k with its central half-size square from a sample of class k+1;
    blend: `(mu_k + mu_{k+1}) / 2` plus a sample of the shared Gaussian; noise: white noise.
    """
    k = prior.params["log_pi"].shape[0]
    h, w, c = prior.x_shape
    labels = np.arange(k)
    k1, k2, k3, k4 = jax.random.split(key, 4)
    data = gaussian.sample(prior.params, k1, k, jnp.asarray(labels))
    gain = jnp.exp(-0.5 * (jnp.asarray(gaussian.radial_frequency(h, w)) / blur_cutoff) ** 2)
    blurred = gaussian.fourier_filter(data, gain)
    other = gaussian.sample(prior.params, k2, k, jnp.asarray((labels + 1) % k))
    mask = np.zeros((h, w, 1), np.float32)
    mask[h // 4: h // 4 + h // 2, w // 4: w // 4 + w // 2] = 1.0
    patched = data * (1 - mask) + other * mask
    means = gaussian.mean_images(prior.params)
    zero_mean = gaussian.sample(prior.params, k3, k, jnp.zeros(k, jnp.int32)) - means[0]
    blend = 0.5 * (means + means[(labels + 1) % k]) + zero_mean
    noise = noise_std * jax.random.normal(k4, (k, h, w, c))
    x0 = jnp.concatenate([blurred, patched, blend, noise])
    return x0, np.tile(labels, 4), np.repeat(np.arange(4), k)


def result_metrics(prior: Prior, x: jax.Array, x0: jax.Array, labels: np.ndarray,
                   data_hf: float, cutoff: float) -> dict[str, np.ndarray]:
    """Per-image exact figures of a result (see the module docstring)."""
    h, w, c = prior.x_shape
    means = gaussian.mean_images(prior.params)
    dists = jnp.sqrt(jnp.mean((x[:, None] - means[None]) ** 2, axis=(2, 3, 4)))  # [B, K]
    return {
        "logp": np.asarray(gaussian.log_density(prior.params, x)) / (h * w * c),
        "dist": np.asarray(jnp.min(dists, axis=1)),
        "acc": np.asarray(jnp.argmin(dists, axis=1)) == labels,
        "hf": np.asarray(high_frequency_energy(x, 0.0, cutoff)) / data_hf,
        "moved": np.asarray(jnp.sqrt(jnp.mean((x - x0) ** 2, axis=(1, 2, 3)))),
        "oob": np.asarray(jnp.mean(jnp.abs(x) > 1.0, axis=(1, 2, 3))),
    }


def bias_distances(biases: dict, x: jax.Array, k: int) -> dict[str, dict]:
    """RMS differences between the deficiency models at several t (unconditional), to see
    which one a learned b_psi resembles: `learned-lin`, `learned-post` and `post-lin`."""
    emb = jnp.ones((x.shape[0], k))
    out: dict[str, dict] = {}
    for t in (50, 200, 400, 600, 800):
        tt = jnp.full((x.shape[0],), t, jnp.int32)
        b = {name: fn(x, tt, emb) for name, fn in biases.items()}
        out[str(t)] = {f"{p}-{q}": float(jnp.sqrt(jnp.mean((b[p] - b[q]) ** 2)))
                       for p, q in [("learned", "lin"), ("learned", "post"), ("post", "lin")]}
    return out


def run(config: ml_collections.ConfigDict, workdir: str) -> dict:
    """Runs every (setting, method) from the same starts and noise; writes metrics.json,
    manifold.png and a table."""
    if config.prior.name != "gaussian_patterns":
        raise UserError(f"the manifold testbed needs prior.name='gaussian_patterns', got "
                        f"{config.prior.name!r}")
    start = time.time()
    os.makedirs(workdir, exist_ok=True)
    prior = build_prior(config.prior)
    mc = config.manifold
    key = jax.random.PRNGKey(config.seed)
    k_start, k_data, k_noise = jax.random.split(key, 3)
    x0, labels, kinds = make_starts(prior, k_start, mc.blur_cutoff, mc.noise_std)
    n = x0.shape[0]
    k = prior.params["log_pi"].shape[0]
    data = gaussian.sample(prior.params, k_data, 256)
    data_hf = float(jnp.mean(high_frequency_energy(data, 0.0, mc.hf_cutoff)))
    data_logp = float(jnp.mean(gaussian.log_density(prior.params, data))) / data[0].size
    ac = prior.alphas_cumprod
    params = prior.params

    def lin(z, t, emb):  # unconditional, like a b_psi trained on unlabelled data
        return gaussian.linear_bias_fn(params, z, t, jnp.ones((z.shape[0], k)), ac)

    def post(z, t, emb):  # the exact deficiency for the prompt LMC uses
        return gaussian.posterior_bias_fn(params, z, t, emb, ac, num_pairs=mc.post_pairs)

    biases = {"lin": lin, "post": post}
    metrics: dict = {"data_logp_per_dim": data_logp, "data_hf": data_hf}
    if mc.learned.enabled:
        learned, secs = learned_bias(mc.learned, prior, config.prior, config.seed,
                                     os.path.join(workdir, "bias"))
        biases["learned"] = learned
        metrics["bias_train_seconds"] = secs
        metrics["bias_distances"] = {
            "data": bias_distances(biases, data[:32], k),
            "starts": bias_distances(biases, x0, k)}
    names = list(gaussian.pattern_classes(prior.x_shape[0]))
    gcfg = config.guidance
    rows, finals = [], {}
    settings = [("w0", 0.0, [""] * n), ("wlow", mc.w_low, [names[i] for i in labels])]
    for setting, w, prompts in [s for s in settings if s[0] in mc.settings]:
        cond = Conditioning(c=prior.embed_text(prompts), u=prior.embed_text([""] * n))
        runs = [("sds", "sds", w, None, "cond"), ("csd", "csd", w, None, "cond")]
        if setting == "wlow":
            runs.insert(0, ("sds_w100", "sds", mc.w_high, None, "cond"))
        for b in biases:
            xhats = ["uncond"] if setting == "w0" or b == "post" else ["cond", "uncond"]
            runs += [(f"lmc_{b}" + (f"/{xh}" if setting == "wlow" and b != "post" else ""),
                      "lmc", w, biases[b], xh) for xh in xhats]
        for name, method, wv, bias, xhat in runs:
            t0 = time.time()
            hp = GuidanceParams(w=wv, weighting=gcfg.weighting, b_psi=bias, lmc_xhat=xhat)
            x, _ = descend(prior, x0, cond, record(method, hp, gcfg, config.steps),
                           config.steps, config.lr, k_noise, [])
            m = result_metrics(prior, x, x0, labels, data_hf, mc.hf_cutoff)
            entry = {"setting": setting, "method": name, "w": wv, "seconds": time.time() - t0}
            for key_, v in m.items():
                entry[key_] = float(np.mean(v))
                entry[f"{key_}_by_start"] = {s: float(np.mean(v[kinds == i]))
                                             for i, s in enumerate(STARTS)}
            rows.append(entry)
            finals[(setting, name)] = np.asarray(x)
            logging.info("%s %s: logp %.3f dist %.3f hf %.3f", setting, name, entry["logp"],
                         entry["dist"], entry["hf"])
    metrics["runs"] = rows
    metrics["starts"] = {"kinds": list(STARTS), "per_kind": k, "total": n}
    metrics["seconds"] = time.time() - start
    io.write_json(os.path.join(workdir, "metrics.json"), metrics)
    _figure(os.path.join(workdir, "manifold.png"), x0, finals, kinds, k)
    print(format_table(rows, data_logp))
    return metrics


def format_table(rows: list[dict], data_logp: float) -> str:
    """log-density per start kind (the noise starts dominate a plain mean), then the means of
    the other figures over all starts."""
    cols = ["dist", "acc", "hf", "moved", "oob"]
    table = [[r["setting"], r["method"], r["w"]]
             + [round(r["logp_by_start"][k], 3) for k in STARTS]
             + [round(r[c], 3) for c in cols] for r in rows]
    table.insert(0, ["data", "", ""] + [round(data_logp, 3)] * len(STARTS)
                 + ["", "", 1.0, "", ""])
    return io.format_table(table, ["setting", "method", "w"]
                           + [f"logp:{k}" for k in STARTS] + cols)


def _figure(path: str, x0: jax.Array, finals: dict, kinds: np.ndarray, k: int) -> None:
    """Rows: the starts, then each (setting, method); columns: two examples per start kind."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = np.concatenate([np.flatnonzero(kinds == i)[:2] for i in range(len(STARTS))])
    rows = [("start", np.asarray(x0))] + [(f"{s} {m}", x) for (s, m), x in finals.items()]
    fig, axes = plt.subplots(len(rows), len(cols), figsize=(1.1 * len(cols) + 1.6,
                                                            1.1 * len(rows)), dpi=100)
    for r, (label, xs) in enumerate(rows):
        for c, idx in enumerate(cols):
            ax = axes[r, c]
            ax.imshow(np.clip((xs[idx] + 1) / 2, 0, 1), interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(STARTS[kinds[idx]], fontsize=8)
            if c == 0:
                ax.set_ylabel(label, fontsize=7, rotation=0, ha="right", va="center")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
