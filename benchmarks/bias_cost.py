"""Cost of the learned deficiency `b_psi` against one denoiser call, on this machine.

LMC-SDS adds, per step, one forward and one VJP of `b_psi(x, t)` (the gradient
`J_b(x)^T (b_psi(x, t) - x_hat)`) to the UNet call that every SDS-type method makes on the
cond+uncond batch (`eps` on 2B latents). This script times both, jitted, with
`block_until_ready`, on 4x32x32 latents of the tiny SD-architecture prior:

    python benchmarks/bias_cost.py [--repeats 30] [--batches 1 4] [--json out.json]

Calls alternate (UNet, b_psi, UNet, ...) after a warm-up, and the table reports medians.
The script re-executes itself once with the CPU malloc settings of `lmc_jax._runtime` (glibc
reads them only at process start) and says whether they are active; LMC_JAX_NO_REEXEC=1 turns
that off.
"""

from __future__ import annotations

import sys

if __name__ == "__main__":
    from lmc_jax import _runtime

    _runtime.maybe_reexec_with_fast_malloc(sys.argv)

import argparse
import statistics

import _timing  # benchmarks/_timing.py (this script's folder is on sys.path)
import jax
import jax.numpy as jnp

from lmc_jax import io
from lmc_jax.bias import BiasNet, param_count


def run(batches: list[int], repeats: int, warmup: int, features: int) -> dict:
    """Times `prior.eps` on [2B, 32, 32, 4] and `b_psi` forward+VJP on [B, 32, 32, 4]."""
    from lmc_jax.priors.sd import tiny_sd_prior

    prior = tiny_sd_prior(seed=0, image_size=64)
    h, w, c = prior.x_shape
    module = BiasNet(features=features, padding="REFLECT")
    key = jax.random.PRNGKey(0)
    bias_params = jax.jit(module.init)(key, jnp.zeros((1, h, w, c)), jnp.zeros((1,), jnp.int32))
    bias_params = bias_params["params"]

    @jax.jit
    def unet_call(prior, x_t, t, emb):  # one UNet call on the cond+uncond batch
        return prior.eps(x_t, t, emb)

    @jax.jit
    def bias_fwd_vjp(params, x, t, cot):  # b_psi(x, t) and J_b(x)^T cot
        b, vjp = jax.vjp(lambda z: module.apply({"params": params}, z, t), x)
        return b, vjp(cot)[0]

    rows = []
    for bsz in batches:
        kx, kt, kc = jax.random.split(jax.random.fold_in(key, bsz), 3)
        x = jax.random.normal(kx, (bsz, h, w, c), jnp.float32)
        t = jax.random.randint(kt, (bsz,), 20, 980)
        cot = jax.random.normal(kc, x.shape, jnp.float32)
        emb = jnp.concatenate([prior.embed_text(["a photo of a cat"] * bsz),
                               prior.embed_text([""] * bsz)])
        x2, t2 = jnp.concatenate([x, x]), jnp.concatenate([t, t])
        unet = lambda: unet_call(prior, x2, t2, emb)  # noqa: B023 (used in this iteration)
        bias = lambda: bias_fwd_vjp(bias_params, x, t, cot)  # noqa: B023
        # warm-up compiles, then settles the allocator; then UNet, b_psi, UNet, ...
        samples = _timing.alternate({"unet": (unet, _timing.block_jax),
                                     "bias": (bias, _timing.block_jax)}, repeats, warmup)
        tu, tb = samples["unet"], samples["bias"]
        mu, mb = statistics.median(tu), statistics.median(tb)
        rows.append({"batch": bsz, "unet_batch": 2 * bsz, "unet_eps_ms": mu,
                     "bias_fwd_vjp_ms": mb, "ratio": mb / mu,
                     "unet_eps_ms_minmax": [min(tu), max(tu)],
                     "bias_fwd_vjp_ms_minmax": [min(tb), max(tb)]})
    unet_params = prior.params.get("unet") if isinstance(prior.params, dict) else None
    return {
        "device": f"{jax.devices()[0].platform}: {_timing.device_string()}",
        "fast_malloc": _timing.malloc_status(),
        "x_shape": [h, w, c],
        "repeats": repeats,
        "bias_features": features,
        "bias_params": param_count(bias_params),
        "unet_params": param_count(unet_params) if unet_params is not None else None,
        "prior": prior.name,
        "rows": rows,
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=30, help="timed calls per function")
    parser.add_argument("--warmup", type=int, default=3, help="untimed calls (incl. compile)")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--features", type=int, default=32, help="BiasNet width")
    parser.add_argument("--json", default=None, help="also write the results here")
    args = parser.parse_args(argv)

    res = run(args.batches, args.repeats, args.warmup, args.features)
    print(f"device: {res['device']}; jax {jax.__version__}")
    print(f"CPU malloc settings: {res['fast_malloc']}")
    unet_p = "?" if res["unet_params"] is None else f"{res['unet_params']:,}"
    print(f"b_psi: BiasNet(features={res['bias_features']}), {res['bias_params']:,} parameters; "
          f"UNet ({res['prior']}): {unet_p} parameters")
    print(f"latents {'x'.join(map(str, res['x_shape']))} (HxWxC), medians of "
          f"{res['repeats']} alternating calls\n")
    print(f"{'B':>3} | {'UNet eps on 2B (ms)':>19} | {'b_psi fwd+VJP on B (ms)':>23} | "
          f"{'ratio b/UNet':>12}")
    print("-" * 66)
    for r in res["rows"]:
        print(f"{r['batch']:>3} | {r['unet_eps_ms']:>19.2f} | {r['bias_fwd_vjp_ms']:>23.2f} | "
              f"{r['ratio']:>12.3f}")
    if args.json:
        print(f"\nwrote {io.write_json(args.json, res)}")


if __name__ == "__main__":
    main()
