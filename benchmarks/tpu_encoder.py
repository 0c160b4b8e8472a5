"""The VAE encoder's backward at 512 px on one TPU chip, with and without rematerialization.

    JAX_PLATFORMS=cpu python benchmarks/tpu_encoder.py [--topology v5e:2x2] [--arch sd21-base]
                                                       [--dtype bfloat16] [--size 512]
                                                       [--json out.json]

Text-to-3D, i2i and image edits pull the guidance gradient back through the VAE encoder at
512x512: the largest single source of memory traffic in the real-size step (BUILD.md section 8).
This compiles `x -> (encode(x), d encode / d x)` for one image on one chip of the named slice
(compile-only through libtpu, no weights: SD's architecture as shapes) twice in the same run:
the encoder as XLA saves it by default (`remat_encoder=False`), and as lmc_jax builds it
(`jax.checkpoint` keeping only convolution outputs, `lmc_jax.priors.sd.save_convolutions`).
It prints XLA's FLOPs and bytes accessed, the GB the encoder's own ops write to HBM and to
on-chip memory (`lmc_jax.plan.bytes_by_source`), the temporaries, and the ratio of each.
About 3 minutes per compile on 2 CPU cores. Needs the `tpu` extra.
"""

from __future__ import annotations

import sys

if __name__ == "__main__":
    from lmc_jax import _runtime

    _runtime.maybe_reexec_with_fast_malloc(sys.argv)

import argparse
import json
import os
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")

VAE = "FlaxAutoencoderKL"


def measure(remat: bool, topology: str, arch: str, dtype: str, size: int) -> dict:
    import jax
    import jax.numpy as jnp
    from jax.sharding import Mesh, NamedSharding, PartitionSpec

    from lmc_jax import plan
    from lmc_jax.config import prior_config
    from lmc_jax.priors.sd_shapes import shapes_prior

    prior, _ = shapes_prior(prior_config("sd", dtype=dtype), arch, remat_encoder=remat)
    devices, _ = plan.slice_devices(topology)
    one = NamedSharding(Mesh(devices[:1], ("chip",)), PartitionSpec())
    params = jax.tree_util.tree_map(
        lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=one), prior.params)
    image = jax.ShapeDtypeStruct((1, size, size, 3), jnp.float32, sharding=one)

    def encode_and_grad(p, x):
        z, pullback = jax.vjp(lambda a: prior.encode_fn(p, a), x)
        return z, pullback(jnp.ones_like(z))[0]

    t0 = time.time()
    compiled = jax.jit(encode_and_grad).lower(params, image).compile()
    seconds = time.time() - t0
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    written = plan.bytes_by_source(compiled.as_text())
    on_chip = VAE + plan.ON_CHIP
    return {"remat_encoder": remat, "tflop": cost["flops"] / 1e12,
            "gb_accessed": cost["bytes accessed"] / 1e9,
            "vae_gb_written_hbm": written.get(VAE, 0.0),
            "vae_gb_written_on_chip": written.get(on_chip, 0.0),
            "gb_written_total": sum(written.values()),
            "temp_gib": compiled.memory_analysis().temp_size_in_bytes / 2**30,
            "compile_s": seconds}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--topology", default="v5e:2x2", help="a libtpu slice name; one chip used")
    parser.add_argument("--arch", default="sd21-base")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--size", type=int, default=512, help="image side in pixels")
    parser.add_argument("--json", default="", help="write the rows here")
    args = parser.parse_args()
    rows = []
    for remat in (False, True):
        print(f"compiling the encoder backward, remat_encoder={remat} ...", flush=True)
        rows.append(measure(remat, args.topology, args.arch, args.dtype, args.size))
    base, new = rows
    keys = ("tflop", "gb_accessed", "vae_gb_written_hbm", "vae_gb_written_on_chip",
            "gb_written_total", "temp_gib")
    print(f"\n{args.arch} VAE encoder, {args.size} px, {args.dtype}, one {args.topology} chip\n")
    print("| figure | XLA default | remat (lmc_jax) | ratio |\n|---|---|---|---|")
    for k in keys:
        print(f"| {k} | {base[k]:.3f} | {new[k]:.3f} | {new[k] / base[k]:.2f} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"topology": args.topology, "arch": args.arch, "dtype": args.dtype,
                       "size": args.size, "measured": time.strftime("%Y-%m-%d"),
                       "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
