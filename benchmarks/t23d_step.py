"""Text-to-3D train step at real size: Stable Diffusion 2.1-base architecture, random weights.

Times the jitted step of `lmc_jax.apps.t23d` (render 64x64 views with 64+64 samples per ray,
resize to 512x512, VAE-encode, one UNet call on the cond+uncond batch of 64x64x4 latents, SDS or
LMC-SDS, backward through the encoder and the renderer, Adam) with the preset of
configs/t23d.py, on a prior that has SD 2.1-base's exact architecture (UNet 865M, VAE 84M, CLIP
ViT-H text encoder) filled with random weights: no download, and the cost of a step does not
depend on the weights' values. LMC-SDS uses a random-init `BiasNet` of the shipped size.

    python benchmarks/t23d_step.py [--arch sd21|tiny] [--dtype bfloat16] [--methods sds lmc]
                                   [--steps 20] [--peak-tflops X] [--json out.json]

Reports per method: compile time, the median step time over `--steps` timed steps (after
warm-up), XLA's FLOP count of the compiled step (`cost_analysis`), the achieved FLOP/s and its
share of the device's bf16 peak (`--peak-tflops`, or a table of known accelerators), the time
10k steps would take, and the peak device memory where the backend reports it.
`--compile-only` skips the timing (FLOP count only; works on a CPU host for `--arch sd21`, with
about 6 GB of host memory for the float32 random weights).

`--arch tiny` runs the same code on the tiny SD-architecture prior (CPU smoke test).
"""

from __future__ import annotations

import sys

if __name__ == "__main__":
    from lmc_jax import _runtime

    _runtime.maybe_reexec_with_fast_malloc(sys.argv)

import argparse
import os
import statistics
import tempfile
import time
from typing import Any

import _timing  # benchmarks/_timing.py (this script's folder is on sys.path)
import jax
import numpy as np

from lmc_jax import io
from lmc_jax.priors.sd_shapes import ARCHS

CONFIGS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "configs")

# Stable Diffusion 2.1-base, from its unet/, vae/, text_encoder/ and scheduler/ config.json
# (lmc_jax.priors.sd_shapes keeps the released models' configs).
SD21_UNET, SD21_VAE, SD21_TEXT, SD21_SCHEDULER = ARCHS["sd21-base"]

# Dense bf16 peak, TFLOP/s, by `device_kind` substring (vendor data sheets).
PEAK_BF16_TFLOPS = {
    "H200": 989.0, "H100": 989.0, "A100": 312.0, "L4": 121.0, "A10G": 125.0,
    "TPU v6": 918.0, "TPU v5p": 459.0, "TPU v5 lite": 197.0, "TPU v5e": 197.0, "TPU v4": 275.0,
}


def sd21_prior(dtype: str, seed: int = 0):
    """A `Prior` with SD 2.1-base's architecture and random weights."""
    from lmc_jax.priors.sd import make_sd_prior, random_pipeline

    unet, vae, text_encoder, tokenizer, params = random_pipeline(SD21_UNET, SD21_VAE, SD21_TEXT,
                                                                 seed)
    return make_sd_prior(unet, vae, text_encoder, tokenizer, params, SD21_SCHEDULER,
                         dtype=dtype, name="sd21-base-random")


def t23d_config(method: str, arch: str, bias_path: str):
    """configs/t23d.py's default (real-size) preset with `method`; `tiny`: the tiny prior."""
    from lmc_jax.config import load_config

    config = load_config(os.path.join(CONFIGS, "t23d.py"))
    config.prompt = "a DSLR photo of a red fox"
    config.guidance.method = method
    config.guidance.bias_path = bias_path
    if arch == "tiny":
        config.prior.name, config.prior.resolution = "tiny_sd", 64
    return config


def _flops(cost: Any) -> float:
    """The 'flops' entry of a cost analysis (a dict, or a list of one dict per program)."""
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    return float((cost or {}).get("flops", float("nan")))


def peak_tflops(explicit: float | None) -> tuple[float | None, str]:
    if explicit:
        return explicit, "--peak-tflops"
    kind = jax.devices()[0].device_kind
    for name, value in PEAK_BF16_TFLOPS.items():
        if name.lower() in kind.lower():
            return value, f"data sheet ({name})"
    return None, f"unknown for {kind!r}: pass --peak-tflops"


def measure(method: str, prior, arch: str, bias_dir: str, steps: int, warmup: int,
            compile_only: bool) -> dict[str, Any]:
    """Builds the t23d step for `method`, returns its FLOP count and step times."""
    from lmc_jax import parallel
    from lmc_jax.apps import t23d

    config = t23d_config(method, arch, bias_dir)
    _, state, step = t23d.setup(config, prior, config.prompt, parallel.mesh_from_config(config))
    t0 = time.perf_counter()
    lowered = step.jitted.lower(state, step.consts)
    row: dict[str, Any] = {"method": method,
                           "render": f"{config.render.size}px, "
                                     f"{config.render.num_coarse}+{config.render.num_fine}",
                           "x_shape": list(prior.x_shape), "image_shape": list(prior.image_shape)}
    if compile_only:  # XLA's count on the lowered (unoptimized) program: no compile needed
        row["tflop_per_step"] = _flops(lowered.cost_analysis()) / 1e12
        row["lower_s"] = time.perf_counter() - t0
        return row
    compiled = lowered.compile()
    row["compile_s"] = time.perf_counter() - t0
    row["tflop_per_step"] = _flops(compiled.cost_analysis()) / 1e12
    for _ in range(warmup):
        state, _ = compiled(state, step.consts)
    jax.block_until_ready(state)
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        state, metrics = compiled(state, step.consts)
        jax.block_until_ready(state)
        times.append(time.perf_counter() - t0)
    if not all(np.isfinite(float(v)) for v in jax.device_get(metrics).values()):
        raise RuntimeError(f"{method}: non-finite metrics {jax.device_get(metrics)}")
    row.update({"step_ms": 1e3 * statistics.median(times), "step_ms_min": 1e3 * min(times),
                "step_ms_max": 1e3 * max(times), "steps_timed": steps})
    stats = jax.devices()[0].memory_stats() or {}  # None on CPU
    if "peak_bytes_in_use" in stats:
        row["peak_memory_gib"] = stats["peak_bytes_in_use"] / 2**30
    row["minutes_per_10k_steps"] = row["step_ms"] * 10_000 / 1e3 / 60
    row["achieved_tflops"] = row["tflop_per_step"] / (row["step_ms"] / 1e3)
    return row


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", choices=["sd21", "tiny"], default="sd21")
    parser.add_argument("--dtype", choices=["bfloat16", "float32"], default="bfloat16")
    parser.add_argument("--methods", nargs="+", choices=["sds", "lmc"], default=["sds", "lmc"])
    parser.add_argument("--steps", type=int, default=20, help="timed steps per method")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--peak-tflops", type=float, default=None,
                        help="device bf16 peak (default: looked up from the device kind)")
    parser.add_argument("--compile-only", action="store_true", help="FLOP count, no timing")
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)

    from lmc_jax.priors.sd import tiny_sd_prior

    t0 = time.perf_counter()
    prior = (sd21_prior(args.dtype) if args.arch == "sd21"
             else tiny_sd_prior(image_size=64, dtype=args.dtype))
    build_s = time.perf_counter() - t0
    peak, peak_src = peak_tflops(args.peak_tflops)
    print(f"device: {_timing.device_string()} ({jax.devices()[0].device_kind}); jax "
          f"{jax.__version__}; prior {prior.name} ({args.dtype}), built in {build_s:.0f} s; "
          f"bf16 peak {peak} TFLOP/s ({peak_src})", flush=True)

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        bias_dir = _timing.save_random_bias(prior, os.path.join(tmp, "bias"))
        for method in args.methods:
            row = measure(method, prior, args.arch, bias_dir, args.steps, args.warmup,
                          args.compile_only)
            if peak and "achieved_tflops" in row:
                row["share_of_peak"] = row["achieved_tflops"] / peak
            rows.append(row)
            print(f"  {row}", flush=True)

    print(f"\n{'method':>6} | {'compile s':>9} | {'TFLOP/step':>10} | {'step ms':>8} | "
          f"{'TFLOP/s':>7} | {'of peak':>7} | {'10k steps min':>13} | {'peak GiB':>8}")
    print("-" * 92)
    fmt = lambda r, k, f: format(r[k], f) if k in r else "-"  # noqa: E731
    for r in rows:
        print(f"{r['method']:>6} | {fmt(r, 'compile_s', '9.1f'):>9} | "
              f"{r['tflop_per_step']:>10.3f} | "
              f"{fmt(r, 'step_ms', '8.1f'):>8} | {fmt(r, 'achieved_tflops', '7.1f'):>7} | "
              f"{fmt(r, 'share_of_peak', '7.1%'):>7} | "
              f"{fmt(r, 'minutes_per_10k_steps', '13.1f'):>13} | "
              f"{fmt(r, 'peak_memory_gib', '8.1f'):>8}")
    if args.json:
        res = {"device": _timing.device_string(), "device_kind": jax.devices()[0].device_kind,
               "jax": jax.__version__, "arch": args.arch, "dtype": args.dtype,
               "peak_tflops": peak, "peak_source": peak_src, "prior_build_s": build_s,
               "rows": rows}
        print(f"\nwrote {io.write_json(args.json, res)}")


if __name__ == "__main__":
    main()
