"""Text-to-3D with the embedded prior over a set of prompts: LMC-SDS against SDS.

For every prompt and method, runs `configs/t23d.py:tiny` (the embedded prior) and reads the
evaluator's figures from its metrics.json (`lmc_jax.apps.t23d.evaluate_views`): accuracy and
R-precision over 8 orbit views (against all 25 shape-colour prompts) and the colourfulness
ratio (views over training renders of the same prompt; 1 is right, > 1 over-saturated), and
the mesh's figures (pieces before and after the floaters are removed, watertight, Euler
number; `mesh_summary` counts the runs whose mesh is one closed piece).
An empty scene (`empty_scene` in metrics.json: under 1% of the evaluation views' pixels opaque,
`lmc_jax.apps.t23d.occupancy`) is a failure: its accuracy and R-precision count as 0 whatever
the evaluator made of the bare background, and each method's summary counts its empty scenes.

    python benchmarks/t23d_prompts.py [--steps 300] [--methods lmc sds] [--json out.json]
        [--workdir DIR] [--figure views.png]

Methods: 'lmc' (LMC-SDS at w = 7.5 with the shipped b_psi, the preset) and 'sds' (SDS at
w = 100, its usual high guidance). Prints one row per prompt and method and the means, and
writes everything as JSON. Every run writes a textured mesh.glb (`lmc_jax.nerf.export`) and a
report.html; a run whose views show an object (not an empty scene) but wrote no GLB with faces
is counted as a missing mesh. `--figure` stacks, per run, its label, views.png (6 orbit
views) and a headless-Chromium shot of its mesh.glb (`lmc_jax.report.mesh_shot`; text only
when no browser is installed) into one image (docs/t23d_tiny_views.png). Cost: about
(steps x seconds per step) per run on 2 CPU cores, plus ~15 s per mesh shot.
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

import numpy as np

PROMPTS = (
    "a green torus", "a red cube", "a blue sphere", "a yellow cone", "a purple cylinder",
    "a red torus", "a blue cube", "a green cone", "a yellow cylinder", "a purple sphere",
    "a blue torus", "a yellow cube",
)
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_one(prompt: str, method: str, steps: int, workdir: str) -> dict:
    from lmc_jax.apps import t23d
    from lmc_jax.config import guidance_config, load_config

    c = load_config(os.path.join(ROOT, "configs", "t23d.py"), "tiny")
    c.prompt = prompt
    c.steps = steps
    c.output.grid_every = steps
    c.checkpoint_every = steps
    if method == "sds":
        c.guidance = guidance_config("sds", w=100.0, t_min=c.guidance.t_min,
                                     t_max=c.guidance.t_max)
    elif method != "lmc":
        raise SystemExit(f"unknown method {method!r}; use lmc or sds")
    return t23d.run(c, workdir)


SCORES = ("eval_accuracy", "eval_r_precision")
# Each run's mesh figures (metrics.json; lmc_jax.nerf.export): pieces before and after the
# floaters are removed, closed or not, Euler number (2: no through-hole, 0: one).
MESH_KEYS = ("mesh_pieces_raw", "mesh_pieces", "mesh_watertight", "mesh_euler")


def scored(m: dict) -> dict:
    """The run's figures with an empty scene's evaluator scores set to 0 (a failure)."""
    m = dict(m)
    m["empty_scene"] = bool(m.get("empty_scene", False))
    if m["empty_scene"]:
        m.update({k: 0.0 for k in SCORES})
    return m


def mesh_summary(results: dict[str, dict[str, dict]]) -> dict[str, str]:
    """Per method, one line on its meshes: how many are one closed piece, the Euler numbers,
    and the pieces before the floaters were removed."""
    out = {}
    for method, per in results.items():
        meshed = [m for m in per.values() if m.get("mesh_pieces")]
        closed = sum(m["mesh_pieces"] == 1 and bool(m.get("mesh_watertight")) for m in meshed)
        eulers = sorted({m.get("mesh_euler") for m in meshed}, key=str)
        raw = [m.get("mesh_pieces_raw") or 0 for m in meshed]
        out[method] = (f"{closed} of {len(per)} one closed piece; Euler numbers {eulers}; "
                       f"pieces before removing floaters {min(raw, default=0)}-"
                       f"{max(raw, default=0)}")
    return out


def summarize(results: dict[str, dict[str, dict]], keys: tuple[str, ...]) -> list[list]:
    """Per method: `[method, 'mean of N', mean of each key..., number of empty scenes]`."""
    return [[method, f"mean of {len(per)}",
             *[float(np.mean([v[k] for v in per.values()])) for k in keys],
             sum(bool(v["empty_scene"]) for v in per.values())]
            for method, per in results.items()]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--methods", nargs="+", default=["lmc", "sds"])
    parser.add_argument("--prompts", nargs="+", default=list(PROMPTS))
    parser.add_argument("--json", default="")
    parser.add_argument("--workdir", default="")
    parser.add_argument("--figure", default="", help="write the runs' views, labelled, here")
    args = parser.parse_args()
    from lmc_jax import io

    keys = (*SCORES, "colourfulness_ratio", "opaque_fraction", "mesh_faces", "seconds_per_step")
    head = ["method", "prompt", *keys, "empty_scene", *MESH_KEYS]
    rows, results = [], {}
    base = args.workdir or tempfile.mkdtemp(prefix="t23d_prompts_")
    for method in args.methods:
        for prompt in args.prompts:
            wd = os.path.join(base, method, prompt.replace(" ", "_"))
            m = scored(run_one(prompt, method, args.steps, wd))
            row = {k: m.get(k) for k in (*keys, "empty_scene", *MESH_KEYS)}
            results.setdefault(method, {})[prompt] = row
            rows.append([method, prompt, *row.values()])
            print(io.format_table(rows[-1:], head), flush=True)
    summary = summarize(results, keys)
    print(io.format_table(rows + [r + [""] * len(MESH_KEYS) for r in summary], head))
    meshes = mesh_summary(results)
    for method, line in meshes.items():
        print(f"{method} meshes: {line}")
    missing = missing_meshes(base, results)
    for method, runs in missing.items():
        print(f"{method}: {len(runs)} run(s) show an object but wrote no textured GLB"
              + (f": {', '.join(runs)}" if runs else ""))
    out = {"steps": args.steps, "results": results,
           "means": {r[0]: dict(zip(keys, r[2:-1], strict=True)) for r in summary},
           "empty_scenes": {r[0]: r[-1] for r in summary}, "missing_meshes": missing,
           "meshes": meshes}
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=2)
    if args.figure:
        labelled_views(base, args.methods, args.prompts, args.figure)


def run_dir(base: str, method: str, prompt: str) -> str:
    return os.path.join(base, method, prompt.replace(" ", "_"))


def has_textured_glb(workdir: str) -> bool:
    """Whether `workdir/mesh.glb` loads with faces and a base-colour texture (trimesh)."""
    import trimesh

    path = os.path.join(workdir, "mesh.glb")
    if not os.path.exists(path):
        return False
    meshes = list(trimesh.load(path).geometry.values())
    return bool(meshes) and all(
        len(m.faces) > 0 and getattr(m.visual.material, "baseColorTexture", None) is not None
        for m in meshes)


def missing_meshes(base: str, results: dict[str, dict[str, dict]]) -> dict[str, list[str]]:
    """Per method, the prompts whose views show an object (not `empty_scene`) but whose run
    folder has no textured GLB (`has_textured_glb`)."""
    return {method: [p for p, m in per.items()
                     if not m["empty_scene"] and not has_textured_glb(run_dir(base, method, p))]
            for method, per in results.items()}


def labelled_views(base: str, methods: list[str], prompts: list[str], path: str) -> None:
    """One row per run: its label ('LMC: a green torus', and the mesh's face count or 'no
    mesh'), its views.png, and a shot of its mesh.glb in the 3D viewer when a browser exists."""
    from PIL import Image, ImageDraw

    from lmc_jax import report

    browser = report.find_browser() is not None
    label_w, scale, rows = 170, 2, []
    for m in methods:
        for p in prompts:
            wd = run_dir(base, m, p)
            views = Image.open(os.path.join(wd, "views.png")).convert("RGB")
            views = views.resize((views.width * scale, views.height * scale), Image.NEAREST)
            glb = has_textured_glb(wd)
            mesh = None
            if glb and browser:
                shot = report.mesh_shot(wd, os.path.join(wd, "mesh_shot.png"))
                mesh = Image.open(shot).convert("RGB").resize((views.height, views.height))
            faces = json.load(open(os.path.join(wd, "metrics.json"))).get("mesh_faces", 0)
            note = f"GLB, {faces} faces" if glb else "no mesh"
            rows.append((f"{m.upper()}: {p}", note, views, mesh))
    w = label_w + max(v.width for _, _, v, _ in rows) + max(v.height for _, _, v, _ in rows)
    fig = Image.new("RGB", (w, sum(v.height for _, _, v, _ in rows)), "white")
    draw, y = ImageDraw.Draw(fig), 0
    for label, note, views, mesh in rows:
        fig.paste(views, (label_w, y))
        if mesh is not None:
            fig.paste(mesh, (label_w + views.width, y))
        draw.text((4, y + views.height // 2 - 12), label, fill="black")
        draw.text((4, y + views.height // 2 + 2), note, fill="black")
        y += views.height
    fig.save(path)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
