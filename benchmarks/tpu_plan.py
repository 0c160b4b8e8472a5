"""TPU plans at Stable Diffusion 2.1-base size, compiled on this CPU host (`lmc_jax.plan`).

    python benchmarks/tpu_plan.py [--only SUBSTRING] [--table]

One row per (app, slice, settings): the app's real step on SD 2.1-base's architecture (shapes
only, `--arch=sd21-base`, no weights), compiled by libtpu for the named slice. Each compile is
its own process (`python -m lmc_jax.plan ... --json`) and takes 10-25 minutes on 2 CPU cores,
so the script appends each row to benchmarks/results/tpu_plan.json as soon as it is done and
skips rows already there: run it in the background, across sessions, until every row is in.
`--table` prints the rows as the Markdown table of BUILD.md (and each row's GB written per
chip-step by model: where the HBM traffic goes). Needs the `tpu` extra (libtpu);
run with JAX_PLATFORMS=cpu.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

from lmc_jax.plan import written_summary

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(ROOT, "benchmarks", "results", "tpu_plan.json")
BF16 = ["--config.prior.dtype=bfloat16"]
# Rows are compiled again when the steps change. 2: the VAE encoder is rematerialized (only
# convolution outputs are kept for the backward pass). The rows of step version 1 are kept in
# tpu_plan_v1.json, for the before/after figures of BUILD.md.
STEP_VERSION = 2

# (name, config file, topology, overrides); the first rows are the ones a user needs most.
ROWS = [
    ("t23d lmc bf16 batch 4 (data=4)", "configs/t23d.py", "v5e:2x2", BF16 + ["--config.batch=4"]),
    ("t23d lmc bf16 default", "configs/t23d.py", "v5e:2x2", BF16),
    ("t23d lmc bf16 default", "configs/t23d.py", "v5e:2x4", BF16),
    ("t23d lmc bf16 default", "configs/t23d.py", "v4:2x2x1", BF16),
    ("t23d lmc bf16 default", "configs/t23d.py", "v5p:2x2x1", BF16),
    ("t23d lmc bf16 default", "configs/t23d.py", "v6e:2x2", BF16),
    ("t23d lmc bf16 default", "configs/t23d.py", "v5e:4x4", BF16),
    ("t23d lmc fp32 default", "configs/t23d.py", "v5e:2x2", []),
    ("t23d lmc bf16 batch 4, model_axis 2", "configs/t23d.py", "v5e:2x2",
     BF16 + ["--config.batch=4", "--config.parallel.model_axis=2"]),
    ("t23d lmc bf16 batch 4, model_axis 4", "configs/t23d.py", "v5e:2x2",
     BF16 + ["--config.batch=4", "--config.parallel.model_axis=4"]),
    ("t23d sds bf16 batch 4 (data=4)", "configs/t23d.py", "v5e:2x2",
     BF16 + ["--config.batch=4", "--config.guidance.method=sds", "--config.guidance.w=100"]),
    ("bias bf16 default", "configs/bias.py", "v5e:2x2", BF16),
    ("i2i lmc bf16 default", "configs/i2i.py", "v5e:2x2", BF16),
]


def key(name: str, topology: str) -> str:
    return f"{name} @ {topology}"


def load() -> list[dict]:
    if not os.path.exists(RESULTS):
        return []
    with open(RESULTS) as f:
        return json.load(f)


def save(rows: list[dict]) -> None:
    tmp = RESULTS + ".tmp"
    with open(tmp, "w") as f:
        json.dump(rows, f, indent=1, default=str)
    os.replace(tmp, RESULTS)


def run_row(name: str, config: str, topology: str, overrides: list[str]) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "row.json")
        cmd = [sys.executable, "-X", "faulthandler", "-m", "lmc_jax.plan", f"--config={config}",
               f"--topology={topology}", "--arch=sd21-base", f"--json={out}", *overrides]
        env = dict(os.environ, JAX_PLATFORMS="cpu")
        t0 = time.time()
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
        if proc.returncode != 0 or not os.path.exists(out):
            tail = "\n".join(proc.stderr.splitlines()[-15:])
            raise RuntimeError(f"{key(name, topology)} failed ({proc.returncode}):\n{tail}")
        with open(out) as f:
            row = json.load(f)
    row.update(name=name, key=key(name, topology), command=" ".join(cmd[3:]),
               wall_s=time.time() - t0, measured=time.strftime("%Y-%m-%d"),
               host_cpus=os.cpu_count(), step_version=STEP_VERSION)
    return row


def table(rows: list[dict]) -> str:
    head = ("| row | slice | data x model | per chip args / temp / total GiB (HBM) | "
            "aliased (donated) MiB | TFLOP / GB per chip-step | roofline ms (compute / memory) | "
            "collectives | compile s |\n|---|---|---|---|---|---|---|---|---|")
    order = {key(name, topology): i for i, (name, _, topology, _) in enumerate(ROWS)}
    rows = sorted(rows, key=lambda r: order.get(r["key"], len(order)))
    out = [head]
    for r in rows:
        coll = ", ".join(f"{c['count']} {k}" for k, c in r["collectives"].items()) or "none"
        roof = (f"{r['roofline_ms']:.0f} ({r['compute_ms']:.0f} / {r['memory_ms']:.0f})"
                if "roofline_ms" in r else "-")
        out.append(f"| {r['name']} | {r['topology']} ({r['devices']}x {r['device_kind']}) | "
                   f"{r['data']} x {r['model']} | {r['args_gib']:.2f} / {r['temp_gib']:.2f} / "
                   f"{r['total_gib']:.2f} ({r['hbm_gib']:.0f}) | {r['alias_gib'] * 1024:.2f} | "
                   f"{r['tflop']:.2f} / {r['gb_accessed']:.1f} | {roof} | {coll} | "
                   f"{r['compile_s']:.0f} |")
    written = [f"- {r['name']} @ {r['topology']}: {written_summary(r['gb_written_by'])}"
               for r in rows if r.get("gb_written_by")]
    return "\n".join(out + ([""] + written if written else []))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", default="", help="run only rows whose key contains this")
    parser.add_argument("--table", action="store_true", help="print the table and exit")
    args = parser.parse_args()
    if args.table:
        print(table(load()))
        return
    for name, config, topology, overrides in ROWS:
        k = key(name, topology)
        if args.only not in k or any(r["key"] == k and r.get("step_version") == STEP_VERSION
                                     for r in load()):
            continue  # done
        print(f"compiling {k} ...", flush=True)
        try:
            row = run_row(name, config, topology, overrides)
        except RuntimeError as e:
            print(f"error: {e}", flush=True)
            continue
        rows = [r for r in load() if r["key"] != k] + [row]
        save(rows)
        print(f"  {row['total_gib']:.2f} GiB per chip, {row['gb_accessed']:.1f} GB, "
              f"{row['compile_s']:.0f} s; {len(rows)} rows in {RESULTS}", flush=True)
    print(table(load()))


if __name__ == "__main__":
    main()
