"""The automatic b_psi (trained on the prior's own DDIM samples) against the shipped one (trained
on real renders), on the embedded prior where both exist.

Error against `x_hat` targets on held-out real renders ('eval_test' split of the embedded world,
never seen by either): per render and t, `E_eps[x_hat]` is estimated from `--pairs` antithetic
pairs, and the error is `benchmarks/bias_loss.py`'s `embedded_error` (the squared distance with
the estimate's own variance taken out, divided by `||E_eps[x_hat] - m||`, `m` the mean training
render). The identity `b(x) = x` (x_hat of a perfect denoiser with no deficiency) and the Monte
Carlo floor are printed for scale.

    python benchmarks/bias_auto.py [--auto DIR] [--heldout 16] [--pairs 32] [--json out.json]

Without `--auto` the b_psi is found (or trained: `lmc_jax.bias.auto`, default recipe) in the
cache, as `python -m lmc_jax.main` would with no `guidance.bias_path`.
"""

from __future__ import annotations

import sys

if __name__ == "__main__":
    from lmc_jax import _runtime

    _runtime.maybe_reexec_with_fast_malloc(sys.argv)

import argparse
import json
import os
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from bias_loss import TS, embedded_error, embedded_reference, noise_floor  # noqa: E402

from lmc_jax import io  # noqa: E402


def run(auto_path: str, heldout: int, pairs: int, num_images: int, cache_dir: str) -> dict:
    from lmc_jax.bias.store import load_bias
    from lmc_jax.config import guidance_config, prior_config
    from lmc_jax.data import shapes
    from lmc_jax.priors.embedded import embedded_path
    from lmc_jax.priors.factory import build_prior

    pcfg = prior_config("embedded")
    prior = build_prior(pcfg)
    if not auto_path:
        from lmc_jax.bias.auto import resolve_bias

        auto_path = resolve_bias(prior, guidance_config("lmc", bias="learned"))
    shipped_path = str(embedded_path() / "bias")
    train_mean = shapes.load_arrays("train", num_images, cache_dir)["image"]
    train_mean = train_mean.astype(np.float32).mean(0) / 127.5 - 1.0
    t0 = time.time()
    reference = embedded_reference(prior, heldout, pairs, train_mean)
    res: dict = {"ts": TS, "heldout": heldout, "pairs": pairs,
                 "reference_seconds": time.time() - t0, "noise_floor": noise_floor(reference),
                 "auto_path": auto_path, "rows": {}}
    candidates = {"shipped (real renders)": load_bias(shipped_path, prior)[2],
                  "automatic (own samples)": load_bias(auto_path, prior)[2],
                  "identity b(x) = x": lambda x, t, e: x}
    for name, fn in candidates.items():
        per_t = embedded_error(fn, reference)
        res["rows"][name] = {"per_t": per_t, "mean": float(np.mean(list(per_t.values())))}
    with open(os.path.join(auto_path, "bias.json")) as f:
        res["auto_training"] = json.load(f)["training"]
    return res


def table(res: dict) -> str:
    rows = [[name, *[f"{r['per_t'][t]:.4f}" for t in res["ts"]], f"{r['mean']:.4f}"]
            for name, r in res["rows"].items()]
    floor = res["noise_floor"]
    rows.append(["(Monte Carlo floor)", *[f"{floor[t]:.4f}" for t in res["ts"]],
                 f"{np.mean(list(floor.values())):.4f}"])
    return io.format_table(rows, ["b_psi", *[f"t={t}" for t in res["ts"]], "mean"])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--auto", default="", help="automatic b_psi folder (default: cache)")
    parser.add_argument("--heldout", type=int, default=16)
    parser.add_argument("--pairs", type=int, default=32)
    parser.add_argument("--num-images", type=int, default=1024,
                        help="training renders whose mean centres the error")
    parser.add_argument("--cache-dir", default=os.path.join(tempfile.gettempdir(),
                                                            "lmc_jax_bias_loss"))
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    res = run(args.auto, args.heldout, args.pairs, args.num_images, args.cache_dir)
    print("relative error against E_eps[x_hat] on held-out renders (lower is better)")
    print(table(res))
    if args.json:
        print(f"wrote {io.write_json(args.json, res)}")


if __name__ == "__main__":
    main()
