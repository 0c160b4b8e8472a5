"""A fair ablation of the guidance methods on the embedded prior: text-to-3D, 25 prompts.

Every row runs configs/t23d.py:tiny (the README's main job: 300 steps, lr, field, cameras,
opacity regulariser, t range, the preset's negative prompt) on all 25 prompts of the embedded
world ("a {colour} {shape}", `lmc_jax.data.shapes`, in class order) for each seed, changing only
the guidance section. Rows:

    SDS w=100, SDS w=7.5, CSD w=7.5, NFSD w=7.5 (negative "a plain background", the preset's),
    LMC-SDS w=7.5 with the shipped b_psi, x_hat from e_u (`lmc_xhat='uncond'`, the preset) and
    from e_c ('cond'); `--bias-path DIR` adds LMC-SDS with another b_psi folder.

The 25 scenes of one (row, seed) train together: `apps.t23d.setup` builds each scene's state and
jitted step exactly as `python -m lmc_jax.main` does, and one `jax.vmap` of that step advances
all 25 (a scene's inputs are its state and its prompt embeddings; the prior's params are
shared). On 2 CPU cores this is ~8x faster per scene than 25 separate runs (a :tiny step renders
one 32x32 view, too little work to fill the cores). Each scene is then scored exactly as
`apps.t23d.run` scores a run: its `EVAL_VIEWS` = 8 orbit views (32x32, elevation 20 degrees, on
the evaluator's grey), their opacity (`occupancy`: an empty scene is a failure, its scores 0),
and per view set (the 25 scenes' view v, v = 0..7) the synth ablation's figures
(benchmarks/ablation.py `Measure`: evaluator accuracy, the prior's denoising loss with the
prompt over real renders', Frechet distance of evaluator features, high-frequency energy,
colourfulness and saturation over real renders'), averaged over the 8 views. When the shipped
evaluator has its "no object" head (`lmc_jax.metrics.shapes_eval`), `no_object` is the fraction
of views it reads as empty or fog, and those views count as misses in both/R-precision.
Each scene's mesh is measured as the app makes it (`scene_meshes`: pieces before and after the
floaters are removed, watertight, Euler number; stored with the views as `<row>/<seed>/mesh`,
so rows trained before this have none): columns 'pieces raw', 'pieces' and '1 closed' (the
fraction of scenes whose mesh is one closed piece), per scene in the JSON.

    python benchmarks/ablation_t23d.py [--quick] [--seeds 0 1] [--rows ...] [--steps 300]
        [--views PATH.npz] [--score-only] [--json PATH] [--figure PATH]

Writes the views of every scene (uint8, with their opacity) to `--views` as it goes
(benchmarks/results/ablation_t23d_views.npz; rows already there are not trained again, so an
interrupted run continues), then benchmarks/results/ablation_t23d.json and
docs/ablation_t23d.png (seed 0, view 0 of every prompt and row; green frame: the evaluator
reads shape and colour right). `--score-only` re-scores saved views (e.g. with a new
evaluator). `--quick`: 3 steps, 1 seed, 2 rows, temporary outputs (plumbing, ~3 min).

`--world patterned`: the patterned prior, its b_psi and evaluator (a `pattern` column) and
benchmarks/ablation.py's 25 patterned prompts; outputs `ablation_t23d_patterned*` (measured:
546 s per (row, seed) alone on 2 CPU cores, 823-1006 s when two runs share them).
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

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import ablation  # noqa: E402  (benchmarks/ablation.py: metrics shared with the synth ablation)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LMC = {"method": "lmc", "w": 7.5, "bias": "learned", "bias_path": "embedded"}
# (key, label, guidance overrides on configs/t23d.py:tiny's guidance section)
ROWS: tuple[tuple[str, str, dict], ...] = (
    ("sds_w100", "SDS w=100", {"method": "sds", "w": 100.0}),
    ("sds_w7.5", "SDS w=7.5", {"method": "sds", "w": 7.5}),
    ("csd", "CSD w=7.5", {"method": "csd", "w": 7.5}),
    ("nfsd", "NFSD w=7.5", {"method": "nfsd", "w": 7.5}),
    ("lmc_uncond", "LMC-SDS uncond", {**LMC, "lmc_xhat": "uncond"}),
    ("lmc_cond", "LMC-SDS cond", {**LMC, "lmc_xhat": "cond"}),
)
FIGURES = ("both", "r_precision", "shape", "colour", "empty", "no_object", "denoise",
           "denoise_ratio", "fd", "hf_ratio", "colf_ratio", "sat_ratio")


def figures_of(m: dict) -> tuple[str, ...]:
    """FIGURES, plus 'pattern' where the scores `m` have it (the patterned world)."""
    return FIGURES + (("pattern",) if "pattern" in m else ())


COLUMNS = (("both", "both", 2), ("r_precision", "R-prec", 2), ("shape", "shape", 2),
           ("colour", "colour", 2), ("empty", "empty", 2), ("no_object", "no-obj", 2),
           ("denoise_ratio", "denoise/real", 2), ("fd", "FD", 1), ("hf_ratio", "HF/real", 2),
           ("colf_ratio", "colf/real", 2))


# Where the scenes' meshes were measured (`mesh_scores`): mean pieces before and after the
# floaters are removed, fraction of one closed piece.
MESH_COLUMNS = (("mesh_pieces_raw", "pieces raw", 1), ("mesh_pieces", "pieces", 2),
                ("mesh_one_closed", "1 closed", 2))


def tiny_config(steps: int):
    from lmc_jax.config import load_config

    c = load_config(os.path.join(ROOT, "configs", "t23d.py"), "tiny")
    c.steps = steps
    return c


def train_scenes(config, prior, prompts: list[str], seed: int, progress: bool = True
                 ) -> tuple[list, object, float]:
    """Trains one scene per prompt from `config` (seed `seed`) with one vmapped step.

    Returns (per-scene params, the field module, seconds). Scene i is what `apps.t23d.train`
    computes for prompt i: the same initial state, step function and keys; only the float
    reductions of the batched computation may differ.
    """
    from lmc_jax import io, parallel
    from lmc_jax.apps import t23d

    mesh = parallel.mesh_from_config(config)
    states, emb = [], []
    for p in prompts:
        c = config.copy_and_resolve_references()
        c.prompt, c.seed = p, seed
        t23d.validate(c, prior)
        field, state, step = t23d.setup(c, prior, p, mesh)
        states.append(state)
        emb.append(step.consts["emb_views"])
    consts = dict(step.consts, emb_views=jnp.stack(emb))
    axes = {k: (0 if k == "emb_views" else None) for k in consts}
    batched = jax.tree_util.tree_map(lambda *a: jnp.stack(a), *states)
    # The plain step vmapped and jitted once (not the app's jit with its shardings and donation
    # nested in another jit: docs/design.md, "A crash on some x86 hosts").
    vstep = jax.jit(jax.vmap(step.fn, in_axes=(0, axes)), donate_argnums=0)
    start = time.time()
    bar = io.progress(range(config.steps), desc=f"{len(prompts)} scenes, seed {seed}",
                      unit="step", disable=not progress)
    for _ in bar:
        batched, metrics = vstep(batched, consts)
    jax.block_until_ready(batched)
    seconds = time.time() - start
    if not np.all(np.isfinite(np.asarray(metrics["grad_norm"]))):
        print("warning: non-finite gradient norm in some scene", flush=True)
    params = [jax.tree_util.tree_map(lambda a, i=i: a[i], batched.params)
              for i in range(len(prompts))]
    return params, field, seconds


def scene_views(field, params: list, config) -> tuple[np.ndarray, np.ndarray]:
    """uint8 views [S, 8, 32, 32, 3] and opacity [S, 8, 32, 32] (`apps.t23d.eval_views`;
    opacity stored as uint8 `round(255 acc)`, exact for `occupancy`'s test `acc >= 1/2`)."""
    from lmc_jax.apps import t23d

    out = [t23d.eval_views(field, p, config) for p in params]
    acc = np.stack([a for _, a in out])
    return np.stack([v for v, _ in out]), np.round(255.0 * np.clip(acc, 0, 1)).astype(np.uint8)


# Per scene, the mesh figures stored as `<row>/<seed>/mesh` (int [S, len(MESH_FIGURES)]).
MESH_FIGURES = ("pieces_raw", "pieces", "watertight", "euler", "faces")


def scene_meshes(field, params: list, config) -> np.ndarray:
    """Each scene's mesh as `apps.t23d.write_outputs` makes it (`export.extract_mesh` at the
    preset's resolution, level, outlier fraction and smoothing; `cleanup.mesh_figures`):
    int [S, 5] = pieces before the floaters are removed, pieces, watertight (0/1), Euler
    number, faces; a scene with no surface has zeros."""
    from lmc_jax.nerf import export

    oc, rows = config.output, []
    for p in params:
        try:
            mesh = export.extract_mesh(field, p["field"], oc.mesh_resolution,
                                       config.render.scene_radius, oc.mesh_threshold,
                                       outlier_fraction=oc.mesh_outlier_fraction,
                                       smooth=oc.mesh_smooth)
        except export.NoSurfaceError:
            rows.append([0] * len(MESH_FIGURES))
            continue
        fig = mesh["figures"]
        rows.append([mesh["raw"]["pieces"], fig["pieces"], int(fig["watertight"]), fig["euler"],
                     len(mesh["faces"])])
    return np.asarray(rows, np.int64)


def mesh_scores(meshes: np.ndarray, prompts: list[str]) -> dict:
    """The figures of one (row, seed)'s meshes `scene_meshes` [25, 5]: mean pieces before and
    after the cleanup, the fraction of scenes whose mesh is one closed piece (`one_closed`)
    and of those with Euler number 2 (no through-hole) and 0 (one), and per scene."""
    m = {k: meshes[:, i] for i, k in enumerate(MESH_FIGURES)}
    meshed = m["faces"] > 0
    one_closed = meshed & (m["pieces"] == 1) & (m["watertight"] == 1)
    return {"mesh_pieces_raw": float(m["pieces_raw"].mean()),
            "mesh_pieces": float(m["pieces"].mean()),
            "mesh_one_closed": float(one_closed.mean()),
            "mesh_euler_2": float((meshed & (m["euler"] == 2)).mean()),
            "mesh_euler_0": float((meshed & (m["euler"] == 0)).mean()),
            "per_scene_mesh": {p: dict(zip(MESH_FIGURES, map(int, row), strict=True))
                               for p, row in zip(prompts, meshes, strict=True)}}


def score(measure, evaluator, views: np.ndarray, acc: np.ndarray) -> dict:
    """The figures of one (row, seed): views [25, V, H, W, 3] uint8, acc [25, V, H, W]."""
    from lmc_jax.apps import t23d
    from lmc_jax.metrics import shapes_eval

    n, v = views.shape[:2]
    empty = np.asarray([t23d.occupancy(acc[i])["empty_scene"] for i in range(n)])
    per_view = []
    for j in range(v):
        x = views[:, j].astype(np.float32) / 127.5 - 1.0
        m = measure(x)
        none = shapes_eval.no_object(evaluator, x)
        hit = np.asarray(m["per_prompt"]["both"], bool) & ~none & ~empty
        m["per_prompt"]["both"] = hit.astype(float).tolist()
        m["both"] = float(hit.mean())
        rp = shapes_eval.r_precision_per_image(evaluator, x, measure.prompts)
        m["per_prompt"]["r_precision"] = (rp & ~none & ~empty).astype(float).tolist()
        m["r_precision"] = float(np.mean(m["per_prompt"]["r_precision"]))
        m["no_object"] = float(none.mean())
        if "pattern" in m:  # the patterned world's evaluator: the pattern read right
            pat = np.asarray(m["per_prompt"]["pattern"], bool) & ~none & ~empty
            m["per_prompt"]["pattern"] = pat.astype(float).tolist()
            m["pattern"] = float(pat.mean())
        per_view.append(m)
    out = {k: float(np.mean([m[k] for m in per_view])) for k in figures_of(per_view[0])
           if k not in ("empty",)}
    out["empty"] = float(empty.mean())
    out["empty_prompts"] = [measure.prompts[i] for i in np.flatnonzero(empty)]
    out["per_prompt"] = {k: np.mean([m["per_prompt"][k] for m in per_view], 0).round(4).tolist()
                         for k in ("both", "r_precision", "denoise_ratio", "hf_ratio",
                                   "colf_ratio", "pattern") if k in per_view[0]["per_prompt"]}
    return out


def table(results: dict, labels: dict) -> str:
    from lmc_jax import io

    rows = []
    first = next(iter(next(iter(results.values()))["seeds"].values()))
    columns = COLUMNS[:1] + ((("pattern", "pattern", 2),) if "pattern" in first else ()) \
        + COLUMNS[1:] + (MESH_COLUMNS if "mesh_pieces" in first else ())
    for key, res in results.items():
        runs = list(res["seeds"].values())
        row = [labels[key]]
        row += [ablation.cell([r.get(name, np.nan) for r in runs], digits)
                for name, _, digits in columns]
        row.append(str(len(runs)))
        rows.append(row)
    # Training seconds are in the JSON (per seed), not here: cells trained at other machine
    # loads are not comparable.
    return io.format_table(rows, ["row", *(c[1] for c in columns), "seeds"])


def load_views(path: str) -> dict:
    if not os.path.exists(path):
        return {}
    with np.load(path) as z:
        return {k: z[k] for k in z.files}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="plumbing run (minutes)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--rows", nargs="+", default=[r[0] for r in ROWS])
    parser.add_argument("--steps", type=int, default=0, help="default: the preset's (300)")
    parser.add_argument("--bias-path", default="",
                        help="adds a row 'lmc_other': LMC-SDS with this b_psi folder")
    parser.add_argument("--bias-label", default="LMC-SDS other b_psi")
    parser.add_argument("--eps-draws", type=int, default=2, help="noises per t (denoise)")
    parser.add_argument("--real-per-prompt", type=int, default=8)
    parser.add_argument("--views", default="", help="npz of the scenes' views (resumable)")
    parser.add_argument("--score-only", action="store_true")
    parser.add_argument("--train-only", action="store_true")
    parser.add_argument("--world", default="plain", choices=["plain", "patterned"],
                        help="patterned: the patterned prior and evaluator, 25 patterned "
                             "prompts (benchmarks/ablation.py `world_classes`)")
    parser.add_argument("--json", default="")
    parser.add_argument("--figure", default="")
    args = parser.parse_args()

    from lmc_jax import io
    from lmc_jax.metrics import shapes_eval
    from lmc_jax.priors.factory import build_prior

    rows = list(ROWS)
    if args.bias_path:
        rows.append(("lmc_other", args.bias_label, {**LMC, "bias_path": args.bias_path}))
        args.rows = [*args.rows, "lmc_other"]
    unknown = sorted(set(args.rows) - {r[0] for r in rows})
    if unknown:
        raise SystemExit(f"error: unknown rows {unknown}; choose from {[r[0] for r in rows]}")
    out_dir = tempfile.mkdtemp(prefix="ablation_t23d_") if args.quick else ""
    res_dir = out_dir or os.path.join(ROOT, "benchmarks", "results")
    steps = args.steps or (3 if args.quick else 0)
    ts, draws, per_prompt = ablation.T_GRID, args.eps_draws, args.real_per_prompt
    if args.quick:
        args.seeds, args.rows = args.seeds[:1], args.rows[:2]
        ts, draws, per_prompt = (ablation.T_GRID[1], ablation.T_GRID[-2]), 1, 1
    patterned = args.world == "patterned"
    stem = "ablation_t23d_patterned" if patterned else "ablation_t23d"
    views_path = args.views or os.path.join(res_dir, f"{stem}_views.npz")
    json_path = args.json or os.path.join(res_dir, f"{stem}.json")
    fig_path = args.figure or (os.path.join(out_dir, f"{stem}.png") if args.quick else
                               os.path.join(ROOT, "docs", f"{stem}.png"))

    start = time.time()
    config = tiny_config(steps) if steps else tiny_config(300)
    if patterned:
        config.prior.name = "embedded_patterned"
    prior = build_prior(config.prior)
    prompts = ablation.prompts_of_the_world(patterned)
    saved = load_views(views_path)
    seconds = {}
    if os.path.exists(views_path + ".json"):
        with open(views_path + ".json") as f:
            seconds = json.load(f)
    for key, label, overrides in rows:
        if key not in args.rows or args.score_only:
            continue
        for s in args.seeds:
            name = f"{key}/{s}"
            if f"{name}/views" in saved:
                continue
            c = config.copy_and_resolve_references()
            c.guidance = ablation.guidance_for(config.guidance, overrides)
            params, field, secs = train_scenes(c, prior, prompts, s)
            views, acc = scene_views(field, params, c)
            saved[f"{name}/views"], saved[f"{name}/acc"] = views, acc
            saved[f"{name}/mesh"] = scene_meshes(field, params, c)
            seconds[name] = secs
            np.savez_compressed(views_path, **saved)
            io.write_json(views_path + ".json", seconds)
            print(f"{label} seed {s}: {secs:.0f} s for 25 scenes", flush=True)

    if args.train_only:
        return
    evaluator = shapes_eval.load_shipped_evaluator(config.prior.name)
    ref = ablation.real_renders(per_prompt, offset=0, patterned=patterned)
    measure = ablation.Measure(prior, prompts, evaluator, ref, ts, draws)
    labels = {k: lab for k, lab, _ in rows}
    results: dict = {}
    for key, _, overrides in rows:
        if key not in args.rows:
            continue
        runs = {}
        for s in args.seeds:
            name = f"{key}/{s}"
            if f"{name}/views" not in saved:
                continue
            runs[str(s)] = score(measure, evaluator, saved[f"{name}/views"],
                                 saved[f"{name}/acc"].astype(np.float32) / 255.0)
            runs[str(s)]["seconds"] = seconds.get(name, 0.0)
            if f"{name}/mesh" in saved:  # rows trained before meshes were measured have none
                runs[str(s)].update(mesh_scores(saved[f"{name}/mesh"], prompts))
        if runs:
            first = next(iter(runs.values()))
            keys = figures_of(first) + tuple(k for k, _, _ in MESH_COLUMNS if k in first)
            results[key] = {"guidance_overrides": overrides, "seeds": runs,
                            "mean": {k: float(np.mean([r.get(k, np.nan) for r in runs.values()]))
                                     for k in keys}}
    text = table(results, labels)
    print(text)
    io.write_json(json_path, {
        "command": "python " + " ".join(sys.argv), "prompts": prompts, "seeds": args.seeds,
        "world": args.world, "prior": config.prior.name,
        "steps": config.steps, "t_grid": list(ts), "eps_draws": draws,
        "real_per_prompt": per_prompt, "evaluator_no_object_head":
        shapes_eval.has_object_head(evaluator), "seconds": time.time() - start,
        "results": results, "table": text})
    shown = [(labels[k], saved[f"{k}/{args.seeds[0]}/views"][:, 0].astype(np.float32) / 127.5
              - 1.0, np.asarray(results[k]["seeds"][str(args.seeds[0])]["per_prompt"]["both"])
              > 0.5) for k in results if str(args.seeds[0]) in results[k]["seeds"]]
    ablation.figure(fig_path, prompts, shown,
                    "Text-to-3D, patterned prior" if patterned else "Text-to-3D, embedded prior")
    print(f"wrote {json_path}, {fig_path}, {views_path}")


if __name__ == "__main__":
    main()
