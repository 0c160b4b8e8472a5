"""Zero-shot image-to-image on the embedded prior: LMC-SDS against SDS and DDS, held-out scores.

Every row trains the translator f_theta of `lmc_jax.apps.i2i` with configs/i2i.py:tiny as it
ships (200 renders of red objects from the 'train' split, 300 steps, batch 8, Adam lr 1e-3,
identity weight 0.1, per-image prompts "a blue {shape}", no target images) and one guidance
method at its own settings (`per_method` of the preset):

    lmc      LMC-SDS, w = 7.5, the shipped b_psi, W(t) = sigma^2, t in [20, 980)
    sds      SDS at DreamFusion's w = 100 (same W(t) and t range)
    dds      DDS as its official code: w = 6.5 (guidance_scale 7.5), W(t) = 1, t in [50, 949),
             source prompt "a red {shape}", source image the input itself
    sds_low  SDS at w = 7.5 (the low-w setting that won the synth ablation on this prior)

Each trained f_theta maps 50 held-out red renders (the 'eval_test' split: scenes it never saw,
10 per shape), scored as the app scores them (lmc_jax.apps.i2i_shapes): the shipped evaluator's
`target_colour` (reads blue), `shape_kept` (reads the input's shape), `both`; `rms_to_input`
(RMS change, pixels in [-1, 1]); `rms_to_recoloured` (RMS to the same scene rendered blue: the
paired answer, never trained on); LPIPS-VGG to the input with `--lpips FILE` (its weights do not
ship; without them the JSON says 'unavailable'). Two reference rows are scored the same way:
`identity` (f = id: the inputs) and `recoloured` (the blue renders themselves). Cells: mean over
the seeds +- half their gap (std, ddof 0). The JSON also holds each run's held-out figures at
every `eval_every` step (`trajectory`, from the run's metrics.jsonl): recorded, never used to pick
a step. Rerun with the same `--workdir` to re-score finished runs without training them again.

    python benchmarks/ablation_i2i.py [--quick] [--seeds 0 1] [--rows lmc sds dds sds_low]
        [--lpips FILE] [--json PATH] [--figure PATH]

writes benchmarks/results/ablation_i2i.json and docs/i2i_tiny.png (columns: the first 10
held-out inputs, 2 per shape; rows: the inputs, each method's outputs at seed 0, the blue
renders; a green frame where the evaluator reads blue and the input's shape, red where not).
`--quick` (2 steps, 10 held-out renders, outputs in a temporary folder unless given) checks the
plumbing.

Measured cost (`python benchmarks/ablation_i2i.py`, 2 CPU cores shared with other jobs, load
average 6-17): 1674 s (28 min) in all; each (row, seed) run 145-369 s, renders, compiles and
held-out scoring included. Re-scoring the 8 finished runs (same `--workdir`): 407 s.
"""

from __future__ import annotations

import sys

if __name__ == "__main__":
    from lmc_jax import _runtime

    _runtime.maybe_reexec_with_fast_malloc(sys.argv)

import argparse
import faulthandler
import json
import os
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import ablation  # noqa: E402  (benchmarks/ablation.py: its figure grid)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ROWS = (
    ("lmc", "LMC-SDS w = 7.5", "lmc", {}),
    ("sds", "SDS w = 100", "sds", {}),
    ("dds", "DDS (official settings)", "dds", {}),
    ("sds_low", "SDS w = 7.5", "sds", {"w": 7.5}),
)
FIGURES = ("target_colour", "shape_kept", "both", "rms_to_input", "rms_to_recoloured",
           "lpips_to_input")
SHOWN = 10  # held-out columns in the figure


def row_config(method: str, overrides: dict, seed: int, quick: bool, lpips: str):
    """configs/i2i.py:tiny for one row: `method` with `overrides` over its per-method settings."""
    from lmc_jax.config import load_config

    config = load_config(os.path.join(ROOT, "configs", "i2i.py"), "tiny")
    config.seed = seed
    config.guidance.method = method
    for key, value in overrides.items():
        config.per_method[method][key] = value
    config.lpips_path = lpips
    if quick:
        config.steps, config.heldout, config.data.num_images = 2, 10, 20
        config.eval_every = config.log_every = config.checkpoint_every = 2
    return config


def train_row(method: str, overrides: dict, seed: int, quick: bool, lpips: str,
              workdir: str) -> dict:
    """Trains and scores one (row, seed); returns its held-out figures, outputs and seconds."""
    from lmc_jax.apps import i2i

    start = time.time()
    timing = os.path.join(workdir, "bench_seconds.json")  # the training run's, kept on re-scoring
    trained = os.path.exists(timing)
    metrics = i2i.run(row_config(method, overrides, seed, quick, lpips), workdir)
    seconds = time.time() - start
    if trained:
        with open(timing) as f:
            seconds = json.load(f)["seconds"]
    else:
        with open(timing, "w") as f:
            json.dump({"seconds": seconds}, f)
    with np.load(os.path.join(workdir, "heldout.npz")) as f:
        saved = {k: f[k] for k in f.files}
    trajectory = {}  # the held-out figures at every eval_every step (metrics.jsonl)
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        for line in f:
            rec = json.loads(line)
            if "heldout_both" in rec:
                trajectory[str(rec["step"])] = {k: rec[f"heldout_{k}"] for k in FIGURES[:5]}
    return {"figures": {k: metrics[f"heldout_{k}"] for k in FIGURES},
            "identity": {k: metrics[f"heldout_{k}_before"] for k in FIGURES},
            "recoloured": {k: metrics.get(f"reference_recoloured_{k}") for k in FIGURES},
            "settings": metrics["settings"], "seconds": seconds,
            "trajectory": trajectory,
            "train_metrics": {k: metrics[k] for k in metrics
                              if isinstance(metrics[k], float) and not k.startswith(
                                  ("heldout_", "reference_"))},
            "saved": saved}


def cell(values: list, digits: int) -> str:
    """'mean ± std' over seeds (ddof 0), the value alone for one seed, a note if not numbers."""
    if not all(isinstance(v, float) for v in values):
        return "n/a"
    v = np.asarray(values, float)
    return f"{v[0]:.{digits}f}" if v.size == 1 else f"{v.mean():.{digits}f} ± {v.std():.{digits}f}"


def scorer_for(saved: dict, prompt: str):
    """The app's held-out scorer (lmc_jax.apps.i2i_shapes.Scorer) for the saved held-out set."""
    from lmc_jax.apps.i2i_shapes import Scorer, target_colour

    return Scorer({"pixels": saved["inputs"], "shape": saved["shape"],
                   "recoloured": saved["recoloured"]}, target_colour(prompt))


def figure(path: str, rows: list[tuple[str, np.ndarray, np.ndarray]], shapes: np.ndarray
           ) -> None:
    """Rows (label, images [n, H, W, 3] in [-1, 1], hits [n] or None for no frame colour)."""
    from lmc_jax.data.shapes import SHAPES

    ablation.grid_figure(path, [SHAPES[int(k)] for k in shapes], rows,
                         "f_theta: 'a red X' -> 'a blue X', held-out renders, seed 0 (frame: "
                         "evaluator reads blue and the input's shape = green)",
                         cell=(0.8, 0.9), margin=1.6)


def main() -> None:
    faulthandler.enable()  # a crash in XLA prints a traceback instead of dying silently
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="plumbing run (2 steps)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--rows", nargs="+", default=[r[0] for r in ROWS],
                        choices=[r[0] for r in ROWS])
    parser.add_argument("--lpips", default="", help="LPIPS-VGG weights (.npz, convert_lpips)")
    parser.add_argument("--json", default="")
    parser.add_argument("--figure", default="")
    parser.add_argument("--workdir", default="", help="where the runs go (default: a temp dir)")
    args = parser.parse_args()

    from lmc_jax import io

    start = time.time()
    out_dir = tempfile.mkdtemp(prefix="ablation_i2i_") if args.quick else ""
    json_path = args.json or (os.path.join(out_dir, "ablation_i2i.json") if args.quick else
                              os.path.join(ROOT, "benchmarks", "results", "ablation_i2i.json"))
    fig_path = args.figure or (os.path.join(out_dir, "i2i_tiny.png") if args.quick else
                               os.path.join(ROOT, "docs", "i2i_tiny.png"))
    runs_dir = args.workdir or tempfile.mkdtemp(prefix="ablation_i2i_runs_")
    spec = {r[0]: r for r in ROWS}
    results, saved = {}, {}
    for key in args.rows:
        _, label, method, overrides = spec[key]
        results[key] = {"label": label, "seeds": {}}
        for seed in args.seeds:
            run = train_row(method, overrides, seed, args.quick, args.lpips,
                            os.path.join(runs_dir, f"{key}-seed{seed}"))
            saved[(key, seed)] = run.pop("saved")
            results[key]["seeds"][str(seed)] = run
            print(f"{label}, seed {seed}: {run['figures']} ({run['seconds']:.0f} s)", flush=True)
    first = saved[(args.rows[0], args.seeds[0])]
    references = {"identity": next(iter(results[args.rows[0]]["seeds"].values()))["identity"],
                  "recoloured": next(iter(results[args.rows[0]]["seeds"].values()))["recoloured"]}
    header = ["row", "target colour", "shape kept", "both", "RMS to input",
              "RMS to blue render", "LPIPS to input", "s/run"]
    digits = (2, 2, 2, 3, 3, 3)
    table = []
    for res in results.values():
        runs = list(res["seeds"].values())
        for name in FIGURES:
            vals = [r["figures"][name] for r in runs]
            if all(isinstance(v, float) for v in vals):
                res.setdefault("mean", {})[name] = float(np.mean(vals))
                res.setdefault("std_over_seeds", {})[name] = float(np.std(vals))
        table.append([res["label"]] + [cell([r["figures"][n] for r in runs], d)
                                       for n, d in zip(FIGURES, digits, strict=True)]
                     + [f"{np.mean([r['seconds'] for r in runs]):.0f}"])
    for name, figs in references.items():
        table.append([f"({name})"] + [cell([figs[n]], d) for n, d in zip(FIGURES, digits,
                                                                         strict=True)] + ["-"])
    total = time.time() - start
    print(io.format_table(table, header))
    out = {"config": "configs/i2i.py:tiny", "seeds": args.seeds, "quick": args.quick,
           "heldout": {"split": "eval_test", "n": int(len(first["inputs"])),
                       "indices": [int(i) for i in first["indices"]]},
           "rows": results, "references": references, "table": {"header": header,
                                                                 "rows": table},
           "seconds_this_invocation": total,  # re-scoring finished runs is ~1 min each
           "seconds_of_the_runs": float(sum(r["seconds"] for res in results.values()
                                            for r in res["seeds"].values()))}
    io.write_json(json_path, out)
    # The figure: the first SHOWN held-out inputs, each row's outputs at the first seed.
    prompt = row_config("lmc", {}, 0, args.quick, "").prompt
    scorer = scorer_for({k: v[:SHOWN] for k, v in first.items()}, prompt)
    seed = args.seeds[0]
    rows = [("input (red)", first["inputs"][:SHOWN], None)]
    for key in args.rows:
        y = saved[(key, seed)]["outputs"][:SHOWN]
        colour_ok, shape_ok = scorer.hits(y)
        rows.append((results[key]["label"], y, colour_ok & shape_ok))
    rows.append(("blue render\n(reference)", first["recoloured"][:SHOWN], None))
    figure(fig_path, rows, first["shape"][:SHOWN])
    print(f"wrote {json_path} and {fig_path} ({total:.0f} s)")


if __name__ == "__main__":
    main()
