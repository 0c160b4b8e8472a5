"""b_psi's loss weighting (`bias.loss_weight`: 'relative' or 'uniform') against the right answer.

b_psi is trained to `E_eps[x_hat(a_t x + s_t eps; t)]` (lmc_jax.bias.train). 'relative' divides
each sample's squared error by the spatial-variation energy of its own (noisy) target, which
moves the minimizer off `E_eps[x_hat]` when the target is noisy; 'uniform' is the plain squared
error. This script trains b_psi with each option (same seed, same steps, same data) and measures
the error of the result:

- `gaussian`: the exact Gaussian prior of configs/bias.py:gaussian; the error is
  `relative_bias_error` (lmc_jax.bias.train) against the closed form `prior.exact_bias` on 64
  held-out samples. Run with and without antithetic pairs (with them the target *is* the closed
  form, because x_hat is affine in eps there; without them it is noisy).
- `embedded`: the shipped 32x32 prior (configs/bias.py:embedded, antithetic pairs as shipped).
  `E_eps[x_hat]` is estimated per held-out render ('eval_test' split) and t from `--pairs`
  antithetic pairs; the squared error is corrected for that estimate's own variance, and divided
  by `||E_eps[x_hat] - m||` (`m` the mean training render, where x_hat goes as t grows), as
  `relative_bias_error` divides by `||b - mu||`.

    python benchmarks/bias_loss.py [--priors gaussian embedded] [--seeds 0 1] \
        [--gaussian-steps 1000] [--embedded-steps 300] [--json bias_loss.json]

Prints one table per prior (error per t, mean, seconds) and writes everything to `--json`.
"""

from __future__ import annotations

import sys

if __name__ == "__main__":
    from lmc_jax import _runtime

    _runtime.maybe_reexec_with_fast_malloc(sys.argv)

import argparse
import functools
import os
import tempfile
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from lmc_jax import io, schedule
from lmc_jax.bias import train
from lmc_jax.bias.model import bias_fn_from
from lmc_jax.config import load_config
from lmc_jax.priors.base import x_hat_from_eps

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TS = list(range(50, 1000, 100))
LOSS_WEIGHTS = ("relative", "uniform")


def bias_config(preset: str, *, loss_weight: str, antithetic: bool, steps: int, seed: int,
                batch: int, num_images: int, cache_dir: str) -> ml_collections.ConfigDict:
    """configs/bias.py:PRESET with the measured option, steps and seed."""
    c = load_config(os.path.join(ROOT, "configs", "bias.py"), preset)
    c.seed = seed
    c.bias.loss_weight = loss_weight
    c.bias.antithetic = antithetic
    c.train.steps = steps
    c.train.batch = batch
    c.log_every = steps
    c.checkpoint_every = steps
    c.keep_checkpoints = 1
    if preset == "embedded":
        c.data.num_images = num_images
        c.data.cache_dir = cache_dir
    return c


def train_one(config: ml_collections.ConfigDict, prior) -> tuple:
    """Trains b_psi through the app's own loop in a throw-away workdir."""
    from lmc_jax.apps import bias as bias_app

    with tempfile.TemporaryDirectory() as workdir:
        module, params, _, seconds = bias_app.train_bias(config, workdir, prior=prior, quiet=True)
    return bias_fn_from(module, params), seconds


def gaussian_error(bias_fn, prior) -> dict[int, float]:
    """`relative_bias_error` on 64 held-out samples (the bias app's own evaluation)."""
    from lmc_jax.priors import gaussian

    x = gaussian.sample(prior.params, jax.random.PRNGKey(12345), 64)
    emb = jnp.ones((x.shape[0], prior.params["mu"].shape[0]))
    return train.relative_bias_error(bias_fn, prior, x, emb, TS)


def mc_reference(prior, x: jax.Array, emb: jax.Array, pairs: int, centre: jax.Array,
                 seed: int = 7) -> dict:
    """Monte-Carlo `E_eps[x_hat]` of clean `x` [n, H, W, C] at each t in TS, from `pairs`
    antithetic pairs `(x_hat(eps) + x_hat(-eps)) / 2`.

    Returns x, emb, and per t: `mean` [n, H, W, C], `var_of_mean` [n] (the summed variance of
    that estimate: the pair averages' sample variance / pairs) and `ref` [n]
    (`||mean - centre||`).
    """
    n = x.shape[0]

    @jax.jit
    def pair_mean(key, t):
        tt = jnp.full((2 * n,), t, jnp.int32)
        eps = jax.random.normal(key, x.shape)
        a, s = schedule.alpha_sigma(prior.alphas_cumprod, tt)
        xx, ee = jnp.concatenate([x, x]), jnp.concatenate([eps, -eps])
        x_t = schedule.add_noise(xx, ee, a, s)
        xh = x_hat_from_eps(x_t, prior.eps(x_t, tt, jnp.concatenate([emb, emb])), a, s)
        return 0.5 * (xh[:n] + xh[n:])

    out = {"x": x, "emb": emb}
    key = jax.random.PRNGKey(seed)
    for t in TS:
        samples = jnp.stack([pair_mean(jax.random.fold_in(key, 1000 * t + k), t)
                             for k in range(pairs)])
        mean = samples.mean(0)
        var = jnp.sum(samples.var(0, ddof=1), axis=(1, 2, 3)) / pairs
        ref = jnp.sqrt(jnp.sum((mean - centre) ** 2, axis=(1, 2, 3)))
        out[t] = {"mean": mean, "var_of_mean": var, "ref": ref}
    return out


def embedded_reference(prior, n: int, pairs: int, train_mean: np.ndarray) -> dict:
    """`mc_reference` for the first `n` held-out renders ('eval_test' split), null prompt,
    centred on the mean training render."""
    from lmc_jax.data import shapes

    x = jnp.asarray(shapes.render(0, "eval_test", list(range(n)), resolution=32),
                    jnp.float32) / 127.5 - 1.0
    null = prior.embed_text([""])
    emb = jnp.broadcast_to(null, (n, *null.shape[1:]))
    return mc_reference(prior, x, emb, pairs, jnp.asarray(train_mean))


def embedded_error(bias_fn, reference: dict) -> dict[int, float]:
    """Mean over renders of `sqrt(max(||b_psi - mean||^2 - var_of_mean, 0)) / ref` per t."""
    x, emb = reference["x"], reference["emb"]
    out = {}
    for t in TS:
        r = reference[t]
        b = bias_fn(x, jnp.full((x.shape[0],), t, jnp.int32), emb)
        sq = jnp.sum((b - r["mean"]) ** 2, axis=(1, 2, 3)) - r["var_of_mean"]
        out[t] = float(jnp.mean(jnp.sqrt(jnp.maximum(sq, 0.0)) / r["ref"]))
    return out


def noise_floor(reference: dict) -> dict[int, float]:
    """The Monte-Carlo estimate's own error, `sqrt(var_of_mean) / ref`, mean over renders."""
    return {t: float(jnp.mean(jnp.sqrt(reference[t]["var_of_mean"]) / reference[t]["ref"]))
            for t in TS}


def run(priors: list[str], seeds: list[int], gaussian_steps: int, embedded_steps: int,
        gaussian_batch: int, embedded_batch: int, num_images: int, heldout: int, pairs: int,
        cache_dir: str) -> dict:
    from lmc_jax.priors.factory import build_prior

    results: dict = {"ts": TS, "seeds": seeds, "runs": []}
    for name in priors:
        preset = "gaussian" if name == "gaussian" else "embedded"
        steps = gaussian_steps if name == "gaussian" else embedded_steps
        batch = gaussian_batch if name == "gaussian" else embedded_batch
        antithetic_options = (True, False) if name == "gaussian" else (True,)
        base = bias_config(preset, loss_weight="relative", antithetic=True, steps=steps,
                           seed=0, batch=batch, num_images=num_images, cache_dir=cache_dir)
        prior = build_prior(base.prior)
        if name == "gaussian":
            error = functools.partial(gaussian_error, prior=prior)
        else:
            from lmc_jax.data import shapes

            train_mean = shapes.load_arrays("train", num_images, cache_dir)["image"]
            train_mean = train_mean.astype(np.float32).mean(0) / 127.5 - 1.0
            t0 = time.time()
            reference = embedded_reference(prior, heldout, pairs, train_mean)
            results["embedded_reference"] = {
                "heldout": heldout, "pairs": pairs, "seconds": time.time() - t0,
                "noise_floor": noise_floor(reference)}
            error = functools.partial(embedded_error, reference=reference)
        for antithetic in antithetic_options:
            for loss_weight in LOSS_WEIGHTS:
                for seed in seeds:
                    cfg = bias_config(preset, loss_weight=loss_weight, antithetic=antithetic,
                                      steps=steps, seed=seed, batch=batch,
                                      num_images=num_images, cache_dir=cache_dir)
                    fn, seconds = train_one(cfg, prior)
                    per_t = error(fn)
                    row = {"prior": name, "antithetic": antithetic, "loss_weight": loss_weight,
                           "seed": seed, "steps": steps, "batch": batch,
                           "train_seconds": seconds, "per_t": per_t,
                           "mean": float(np.mean(list(per_t.values())))}
                    results["runs"].append(row)
                    print(f"{name} antithetic={antithetic} {loss_weight} seed {seed}: "
                          f"mean {row['mean']:.4f} ({seconds:.0f} s)", flush=True)
    return results


def table(results: dict) -> str:
    """One row per (prior, antithetic, loss_weight): the error per t and its mean, over seeds."""
    groups: dict = {}
    for r in results["runs"]:
        groups.setdefault((r["prior"], r["antithetic"], r["loss_weight"]), []).append(r)
    rows = []
    for (prior, anti, lw), runs in groups.items():
        per_t = [np.mean([r["per_t"][t] for r in runs]) for t in results["ts"]]
        means = [r["mean"] for r in runs]
        rows.append([prior, "yes" if anti else "no", lw, *[f"{v:.4f}" for v in per_t],
                     f"{np.mean(means):.4f}", " ".join(f"{m:.4f}" for m in means)])
    if "embedded_reference" in results:
        floor = results["embedded_reference"]["noise_floor"]
        rows.append(["embedded", "", "(MC floor)", *[f"{floor[t]:.4f}" for t in results["ts"]],
                     f"{np.mean(list(floor.values())):.4f}", ""])
    return io.format_table(rows, ["prior", "antithetic", "loss_weight",
                                  *[f"t={t}" for t in results["ts"]], "mean", "per seed"])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--priors", nargs="+", default=["gaussian"],
                        choices=["gaussian", "embedded"])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--gaussian-steps", type=int, default=1000)
    parser.add_argument("--gaussian-batch", type=int, default=32)
    parser.add_argument("--embedded-steps", type=int, default=300)
    parser.add_argument("--embedded-batch", type=int, default=32)
    parser.add_argument("--num-images", type=int, default=1024,
                        help="embedded: training renders used")
    parser.add_argument("--heldout", type=int, default=16, help="embedded: held-out renders")
    parser.add_argument("--pairs", type=int, default=32,
                        help="embedded: antithetic pairs per render and t for E_eps[x_hat]")
    parser.add_argument("--cache-dir", default=os.path.join(tempfile.gettempdir(),
                                                            "lmc_jax_bias_loss"),
                        help="embedded: where the training renders are cached")
    parser.add_argument("--json", default=None, help="also write the results here")
    args = parser.parse_args(argv)

    t0 = time.time()
    res = run(args.priors, args.seeds, args.gaussian_steps, args.embedded_steps,
              args.gaussian_batch, args.embedded_batch, args.num_images, args.heldout,
              args.pairs, args.cache_dir)
    res["total_seconds"] = time.time() - t0
    res["device"] = f"{jax.devices()[0].platform}, jax {jax.__version__}"
    print("\nrelative error of b_psi against E_eps[x_hat] (mean over seeds; lower is better)")
    print(table(res))
    print(f"total {res['total_seconds']:.0f} s")
    if args.json:
        print(f"wrote {io.write_json(args.json, res)}")


if __name__ == "__main__":
    main()
