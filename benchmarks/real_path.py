"""The real path, walked end to end: a PyTorch-format Stable Diffusion 2.1-base folder (random
weights, the official file layout) through the documented commands, with time and peak RAM.

Phases, each a separate process (its peak resident set is the kernel's `ru_maxrss` of that
child, from `os.wait4`):

1. `build`: random SD 2.1-base weights (`benchmarks/t23d_step.py`'s architecture; the byte
   tokenizer stands in for CLIP's BPE files) written as a PyTorch folder like the Hub's
   (`lmc_jax.priors.sd_tiny.save_pytorch_pipeline`: `unet/diffusion_pytorch_model.safetensors`,
   `text_encoder/model.safetensors`, torch class names, no Flax files).
2. `load 1` / `load 2`: `build_prior(prior.path=DIR)` with an empty cache (converts PyTorch ->
   Flax and caches it), then again (reads the cache).
3. `t23d 1` / `t23d 2`: the documented text-to-3D command, `python -m lmc_jax.main
   --config=configs/t23d.py --workdir=W --config.prior.path=DIR` (LMC-SDS by default) plus
   `--config.steps=N` and the automatic b_psi's recipe made tiny (`guidance.bias_auto_*`): the
   first trains and caches a b_psi, the second reuses weights and b_psi.
4. `edit`, `i2i`: README's / the configs' documented commands on a generated photo / folder of
   photos, same overrides (i2i trains its b_psi on its `data.path` images: a new cache key).

    python benchmarks/real_path.py [--arch sd21|tiny] [--steps 2] [--bias-steps 2]
        [--bias-samples 2] [--bias-ddim-steps 2] [--phases ...] [--dir DIR] [--json out.json]

Prints one row per phase: exit status, seconds, peak RSS (GiB), and what the run said about
its b_psi. `--arch tiny` walks the same path on the tiny SD architecture. Measured (BUILD.md
section 7, 2 idle CPU cores): `--arch sd21`, all phases 22 minutes, 4.9 GiB of weights written
twice (folder + conversion cache), peak RSS 14.7 GiB (give it 16 GiB free).
"""

from __future__ import annotations

import sys

if __name__ == "__main__":
    from lmc_jax import _runtime

    _runtime.maybe_reexec_with_fast_malloc(sys.argv)

import argparse
import os
import re
import shutil
import subprocess
import tempfile
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
PHASES = ("build", "load1", "load2", "t23d1", "t23d2", "edit", "i2i")
PROMPT = "a DSLR photo of a fox"


def build(folder: str, arch: str) -> None:
    """Writes the PyTorch-format pipeline (in this process)."""
    from lmc_jax.priors import sd_tiny

    if arch == "tiny":
        sd_tiny.save_tiny_pytorch_pipeline(folder)
        return
    sys.path.insert(0, HERE)
    import jax
    from t23d_step import SD21_TEXT, SD21_UNET, SD21_VAE

    from lmc_jax import _compat
    from lmc_jax.priors.tokenizer import byte_tokenizer_path

    d, tr = _compat.diffusers(), _compat.transformers()
    tok = tr.CLIPTokenizer.from_pretrained(str(byte_tokenizer_path()))
    unet, vae = d.FlaxUNet2DConditionModel(**SD21_UNET), d.FlaxAutoencoderKL(**SD21_VAE)
    text = tr.FlaxCLIPTextModel(tr.CLIPTextConfig(**{
        "bos_token_id": tok.bos_token_id, "eos_token_id": tok.eos_token_id,
        "pad_token_id": tok.pad_token_id, **SD21_TEXT}), _do_init=False)
    key = jax.random.PRNGKey(0)  # shapes only
    # one component's random weights in memory at a time (sd_tiny.random_pipeline's values)
    params = {
        "unet": lambda: sd_tiny._random_params(jax.eval_shape(unet.init_weights, key), 0, 0),
        "vae": lambda: sd_tiny._random_params(jax.eval_shape(vae.init_weights, key), 0, 1),
        "text_encoder": lambda: sd_tiny._random_params(text.params_shape_tree, 0, 2),
    }
    sd_tiny.save_pytorch_pipeline(folder, unet, vae, text, tok, params)


def load(folder: str) -> None:
    """`build_prior` as the apps call it (in this process)."""
    from lmc_jax.config import prior_config
    from lmc_jax.priors.factory import build_prior

    t0 = time.time()
    prior = build_prior(prior_config("sd", path=folder))
    print(f"loaded {prior.name} in {time.time() - t0:.1f} s", flush=True)


def photos(folder: str, n: int, size: int) -> list[str]:
    """`n` smooth random RGB photos (PNG) for edit and i2i."""
    from PIL import Image

    os.makedirs(folder, exist_ok=True)
    rng = np.random.default_rng(0)
    yy, xx = np.meshgrid(np.linspace(0, 1, size), np.linspace(0, 1, size), indexing="ij")
    paths = []
    for i in range(n):
        f = rng.uniform(0.5, 3, (2, 3))
        img = 0.5 + 0.4 * np.sin(2 * np.pi * (f[0] * yy[..., None] + f[1] * xx[..., None]))
        path = os.path.join(folder, f"photo{i}.png")
        Image.fromarray((img * 255).astype(np.uint8)).save(path)
        paths.append(path)
    return paths


def run_phase(cmd: list[str], env: dict, log: str) -> dict:
    """Runs `cmd`, returns status, seconds, peak RSS (GiB) and the b_psi lines of its output."""
    t0 = time.time()
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
        _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.time() - t0
    text = open(log, errors="replace").read()
    said = [ln.strip()[:160] for ln in re.split(r"[\r\n]", text)
            if ln.startswith(("LMC-SDS needs b_psi", "b_psi for LMC-SDS", "b_psi trained",
                              "error:", "loaded "))]
    return {"cmd": " ".join(cmd[1:]), "status": os.waitstatus_to_exitcode(status),
            "seconds": seconds, "peak_rss_gib": usage.ru_maxrss / 2**20, "said": said,
            "log": log}


def commands(args, folder: str, work: str, img: list[str], img_dir: str) -> dict[str, list]:
    main = [sys.executable, "-m", "lmc_jax.main"]
    tiny_bias = [f"--config.guidance.bias_auto_steps={args.bias_steps}",
                 f"--config.guidance.bias_auto_samples={args.bias_samples}",
                 f"--config.guidance.bias_auto_ddim_steps={args.bias_ddim_steps}"]
    me = [sys.executable, os.path.abspath(__file__)]
    t23d = ["--config=configs/t23d.py", f"--config.prior.path={folder}",
            f"--config.prompt={PROMPT}", f"--config.steps={args.steps}", *tiny_bias]
    return {
        "build": [*me, "--_build", folder, "--arch", args.arch],
        "load1": [*me, "--_load", folder],
        "load2": [*me, "--_load", folder],
        "t23d1": [*main, *t23d, f"--workdir={work}/t23d1"],
        "t23d2": [*main, *t23d, f"--workdir={work}/t23d2"],
        "edit": [*main, "--config=configs/edit.py", f"--workdir={work}/edit",
                 f"--config.prior.path={folder}", f"--config.image={img[0]}",
                 "--config.source_prompt=a photo of a cat",
                 "--config.prompt=a photo of a tiger", f"--config.steps={args.steps}",
                 *tiny_bias],
        "i2i": [*main, "--config=configs/i2i.py", f"--workdir={work}/i2i",
                f"--config.prior.path={folder}", f"--config.data.path={img_dir}",
                "--config.prompt=a watercolor painting", f"--config.steps={args.steps}",
                "--config.batch=2", "--config.heldout=2", *tiny_bias],
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", choices=["sd21", "tiny"], default="sd21")
    parser.add_argument("--steps", type=int, default=2, help="steps of each app")
    parser.add_argument("--bias-steps", type=int, default=2)
    parser.add_argument("--bias-samples", type=int, default=2)
    parser.add_argument("--bias-ddim-steps", type=int, default=2)
    parser.add_argument("--phases", nargs="+", default=list(PHASES), choices=PHASES)
    parser.add_argument("--dir", default="", help="work folder (default: a temporary one)")
    parser.add_argument("--keep", action="store_true", help="keep the work folder")
    parser.add_argument("--json", default=None)
    parser.add_argument("--_build", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--_load", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args._build:
        build(args._build, args.arch)
        return {}
    if args._load:
        load(args._load)
        return {}

    from lmc_jax import io

    work = args.dir or tempfile.mkdtemp(prefix="lmc_real_path_")
    folder = os.path.join(work, f"{args.arch}-pytorch")
    env = {**os.environ, "LMC_JAX_CACHE": os.path.join(work, "cache")}
    img_dir = os.path.join(work, "photos")
    size = 512 if args.arch == "sd21" else 64
    img = photos(img_dir, 4, size)
    cmds = commands(args, folder, work, img, img_dir)
    res = {"arch": args.arch, "steps": args.steps, "work": work, "load_average":
           os.getloadavg(), "cpus": os.cpu_count(), "phases": {}}
    for name in args.phases:
        print(f"[{name}] {' '.join(cmds[name][1:])}", flush=True)
        row = run_phase(cmds[name], env, os.path.join(work, f"{name}.log"))
        res["phases"][name] = row
        print(f"[{name}] exit {row['status']}, {row['seconds']:.1f} s, peak RSS "
              f"{row['peak_rss_gib']:.2f} GiB; " + " | ".join(row["said"]), flush=True)
    res["load_average_after"] = os.getloadavg()
    print(io.format_table(
        [[n, r["status"], f"{r['seconds']:.1f}", f"{r['peak_rss_gib']:.2f}",
          " | ".join(r["said"])[:110]] for n, r in res["phases"].items()],
        ["phase", "exit", "seconds", "peak RSS GiB", "b_psi / load"]))
    if args.json:
        print(f"wrote {io.write_json(args.json, res)}")
    if not args.keep and not args.dir:
        shutil.rmtree(work, ignore_errors=True)
    return res


if __name__ == "__main__":
    out = main()
    if out and any(r["status"] != 0 for r in out["phases"].values()):
        sys.exit(1)
