"""The table of benchmarks/step_time.py: per-process timings aggregated into one row per
(framework, method, batch), with paired ratios (torch/JAX, LMC/SDS) and the targets."""

from __future__ import annotations

import statistics
from typing import Any

METHODS = ("sds", "lmc")
# Targets (reported, not asserted).
TARGET_JAX_SPEEDUP = {1: 1.2, 4: 1.0}  # torch/JAX at batch 1 and 4
TARGET_LMC_OVER_SDS = 1.05


def aggregate(workers: list[dict[str, Any]], memory: dict[str, Any] | None) -> list[dict]:
    """One row per (framework, method, batch): medians over processes and paired ratios."""
    per: dict[tuple[str, str, int], list[float]] = {}
    for w in workers:
        for r in w["rows"]:
            per.setdefault((r["framework"], r["method"], r["batch"]), []).append(r["median"])
    mem = {(r["framework"], r["method"], r["batch"]): r for r in (memory or {}).get("rows", [])}
    rows = []
    for (fw, m, b), meds in per.items():
        sds_meds = per[(fw, "sds", b)]
        row = {
            "framework": fw, "method": m, "batch": b,
            "median_ms": statistics.median(meds), "process_medians_ms": meds,
            # paired within each process, then the median over processes
            "torch_over_this": statistics.median(
                t / j for t, j in zip(per[("torch", m, b)], meds, strict=True)),
            "over_sds": statistics.median(v / s for v, s in zip(meds, sds_meds, strict=True)),
        }
        if (fw, m, b) in mem:
            row.update({k: v for k, v in mem[(fw, m, b)].items()
                        if k not in ("framework", "method", "batch")})
        rows.append(row)
    rows.sort(key=lambda r: (r["batch"], METHODS.index(r["method"]), r["framework"]))
    return rows


def _fmt(v: float | None, spec: str) -> str:
    return "-" if v is None else format(v, spec)


def report(res: dict[str, Any], bias_features: int) -> None:
    """Prints the results of `step_time.main` (`res`) as a table with the targets."""
    w0 = res["workers"][0]
    print(f"device: {w0['device']}; jax {w0['jax']}, torch {w0['torch']} "
          f"({w0['torch_threads']} threads)")
    print(f"CPU malloc settings (JAX and torch, timing processes): {w0['fast_malloc']}")
    print(f"load average before/after: {res['load_before']} / {res['load_after']}")
    print(f"tiny SD UNet {w0['unet_params']:,} weights; b_psi BiasNet(features={bias_features}) "
          f"{w0['bias_params']:,} weights; latents {'x'.join(map(str, w0['x_shape']))} (HxWxC)")
    checks = {k: max(w["check"][k] for w in res["workers"]) for k in w0["check"]}
    print("torch vs JAX, relative difference (max over processes): "
          + ", ".join(f"{k} {v:.2e}" for k, v in checks.items()))
    print(f"{len(res['workers'])} processes x {res['repeats']} alternating repeats per step; "
          "median of per-process medians [range]; ratios paired per process")
    mem_note = "peak RSS delta" if res.get("memory") else ""
    print()
    head = (f"{'framework':<9} | {'method':<6} | {'B':>2} | {'median ms':>9} | "
            f"{'range ms':>13} | {'torch/this':>10} | {'vs SDS':>6} | {'peak MiB':>8} | "
            f"{'XLA tmp MiB':>11}")
    print(head)
    print("-" * len(head))
    for r in res["rows"]:
        lo, hi = min(r["process_medians_ms"]), max(r["process_medians_ms"])
        print(f"{r['framework']:<9} | {r['method']:<6} | {r['batch']:>2} | {r['median_ms']:>9.1f} |"
              f" {f'{lo:.1f}-{hi:.1f}':>13} | {r['torch_over_this']:>10.2f} | "
              f"{r['over_sds']:>6.3f} | {_fmt(r.get('peak_rss_delta_mib'), '8.1f'):>8} | "
              f"{_fmt(r.get('xla_temp_mib'), '11.2f'):>11}")
    print("\njax: lmc_jax's default (late-normalized attention); jax-dattn: the same step with "
          "diffusers' own FlaxAttention (prior.attention='diffusers').")
    if mem_note:
        print(f"\npeak MiB: peak RSS increase during one warm step (VmHWM - VmRSS), measured in a "
              f"separate process with {res['memory']['allocator']}; XLA tmp: the compiled "
              "step's temporaries (memory_analysis).")
    print("\ntargets (reported, not asserted):")
    for r in res["rows"]:
        if r["framework"] == "jax" and r["method"] == "sds" and r["batch"] in TARGET_JAX_SPEEDUP:
            want = TARGET_JAX_SPEEDUP[r["batch"]]
            print(f"  JAX SDS speed-up over torch eager at B={r['batch']}: "
                  f"{r['torch_over_this']:.2f}x (target >= {want}x): "
                  f"{'met' if r['torch_over_this'] >= want else 'NOT met'}")
    for r in res["rows"]:
        if r["framework"] == "jax" and r["method"] == "lmc":
            print(f"  JAX LMC/SDS step at B={r['batch']}: {r['over_sds']:.3f} (target <= "
                  f"{TARGET_LMC_OVER_SDS}): "
                  f"{'met' if r['over_sds'] <= TARGET_LMC_OVER_SDS else 'NOT met'}")
