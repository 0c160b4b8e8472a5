"""A `b_psi` for LMC-SDS when the run gives none: reused from a cache, or trained on the spot.

LMC-SDS (`guidance.method='lmc'`, `guidance.bias='learned'`) needs `b_psi`, the learned
deficiency `E_eps[x_hat]` of the prior (docs/design.md 1.3). With `guidance.bias_path` empty
and `guidance.bias_auto=True` (the default), `resolve_bias` returns the folder of one:

1. The cache key is a fingerprint of the prior's weight files (sha256 of every file of the
   diffusers folder's `unet/ vae/ text_encoder/ tokenizer/ scheduler/` and model_index.json;
   for a prior without files, its config) plus the recipe (`Recipe`: samples, DDIM steps and
   guidance, training steps, batch, learning rate, architecture) and the training images'
   listing when `data.path` is given. It is not keyed by the run's prompt: one b_psi per model.
2. A hit in `<cache>/bias/<key>` is loaded after a check (the checksums.json written with it,
   `lmc_jax.cache.entry_problem`). `<cache>` is `prior.cache_dir`, else `$LMC_JAX_CACHE`, else
   `~/.cache/lmc_jax`. A damaged or half-written entry is renamed `<key>.damaged-<time>` with
   one warning line and trained again; one that cannot be renamed stops the run with one
   `error:` line naming the folder to delete.
3. A miss trains one before the main job with `lmc_jax.bias.fit.train_bias` (the bias app's
   own loop: progress bar with ETA, checkpoints, resume after a preemption) on the prior's own
   DDIM samples (`GENERIC_PROMPTS` that the prior's tokenizer knows, else the captions of the
   embedded world, plus the first run's prompt; recorded in bias.json), or on the images of
   `data.path` when the run's config has one, and stores it in the cache: written in
   `<key>.tmp<pid>`, sealed, then renamed into place (`lmc_jax.cache.publish`). Runs that want
   the same b_psi at once take turns (a file lock): one trains, the others reuse its result.

Measured cost: BUILD.md section 7 ("Automatic b_psi").
"""

from __future__ import annotations

import dataclasses
import fcntl
import hashlib
import json
import os
import shutil
import time
from pathlib import Path

import jax
import ml_collections
import numpy as np

from lmc_jax.cache import (
    CACHE_ENV,
    cache_root,
    entry_problem,
    files_fingerprint,
    publish,
    seal,
    set_aside,
    warn,
)
from lmc_jax.errors import UserError
from lmc_jax.priors.base import Prior

__all__ = ["CACHE_ENV", "Recipe", "auto_bias", "cache_key", "cache_root", "default_recipe",
           "prior_fingerprint", "resolve_bias", "sample_prompts"]
RECIPE_VERSION = 1
WEIGHT_DIRS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")

# Varied subjects, styles and scenes, so that the samples cover what a user may ask for.
GENERIC_PROMPTS = (
    "a photograph of a dog sitting on grass",
    "a DSLR photo of a red sports car",
    "a cozy living room with a sofa and a lamp",
    "a bowl of fruit on a wooden table",
    "a portrait photo of an old man with a beard",
    "a mountain landscape at sunset",
    "a city street at night with neon lights",
    "a watercolor painting of a lighthouse",
    "a plate of pasta, food photography",
    "a small wooden house in a snowy forest",
    "a cat sleeping on a windowsill",
    "a vase of flowers, studio lighting",
    "an astronaut riding a horse",
    "a ceramic mug on a white background",
    "a sailing boat on a calm lake",
    "a 3D render of a cute robot toy",
    "a pencil sketch of a castle",
    "a bird perched on a branch",
    "a pair of sneakers, product photo",
    "a stone bridge over a river in autumn",
    "a colorful hot air balloon in the sky",
    "a close-up photo of a butterfly on a leaf",
    "an oil painting of a ship in a storm",
    "a plush teddy bear",
)


@dataclasses.dataclass(frozen=True)
class Recipe:
    """What an automatic b_psi is trained on and how (all of it is in the cache key)."""

    num_samples: int
    ddim_steps: int
    sample_w: float
    steps: int
    batch: int
    lr: float = 2e-3
    warmup: int = 100
    features: int = 32
    antithetic: bool = True
    loss_weight: str = "uniform"
    seed: int = 0
    version: int = RECIPE_VERSION


def default_recipe(prior: Prior) -> Recipe:
    """Pixel priors (the embedded one): 512 samples, DDIM 25 steps at w = 2 (the embedded
    prior's sampling setting), 600 steps of batch 32 (the shipped b_psi's count). Latent priors
    (Stable Diffusion): 256 samples, DDIM 25 steps at w = 6.5 (diffusers' guidance_scale 7.5),
    2000 steps of batch 16."""
    if prior.kind == "pixel":
        return Recipe(num_samples=512, ddim_steps=25, sample_w=2.0, steps=600, batch=32)
    return Recipe(num_samples=256, ddim_steps=25, sample_w=6.5, steps=2000, batch=16)


def recipe_from_config(prior: Prior, gcfg: ml_collections.ConfigDict) -> Recipe:
    """`default_recipe` with `guidance.bias_auto_steps` / `_samples` / `_ddim_steps` when > 0."""
    r = default_recipe(prior)
    steps, samples = int(gcfg.get("bias_auto_steps", 0)), int(gcfg.get("bias_auto_samples", 0))
    ddim = int(gcfg.get("bias_auto_ddim_steps", 0))
    if min(steps, samples, ddim) < 0:
        raise UserError("guidance.bias_auto_steps, bias_auto_samples and bias_auto_ddim_steps "
                        "must be >= 0 (0 = the recipe's default)")
    if ddim:
        r = dataclasses.replace(r, ddim_steps=ddim)
    if steps:
        r = dataclasses.replace(r, steps=steps, warmup=min(r.warmup, steps // 2))
    if samples:
        r = dataclasses.replace(r, num_samples=samples, batch=min(r.batch, samples))
    return r


# ----------------------------------------------------------------------------------------------
# Cache and fingerprints.


def weight_files(folder: Path) -> list[Path]:
    """The files of a diffusers folder that define the model (not b_psi/ or evaluator/)."""
    files = [folder / "model_index.json"] if (folder / "model_index.json").is_file() else []
    for sub in WEIGHT_DIRS:
        if (folder / sub).is_dir():
            files += [p for p in (folder / sub).rglob("*") if p.is_file()]
    return files


def prior_folder(prior_cfg: ml_collections.ConfigDict) -> Path | None:
    """The weights folder (or single file) of a prior config; None for priors without files."""
    if prior_cfg.name.startswith("embedded"):  # embedded_path names the shipped ones
        from lmc_jax.priors.embedded import embedded_path

        return (Path(prior_cfg.path).expanduser() if prior_cfg.path
                else embedded_path(prior_cfg.name))
    if prior_cfg.name == "sd":
        from lmc_jax.priors.sd_load import resolve_folder

        return resolve_folder(prior_cfg.path, revision=prior_cfg.get("revision", "") or None)
    return None


def prior_fingerprint(prior_cfg: ml_collections.ConfigDict, cache: Path | None = None) -> str:
    """sha256 of the prior's weight files, or of its config when it has none (tiny_sd, gaussian)."""
    folder = prior_folder(prior_cfg)
    if folder is None:
        keep = {k: prior_cfg.get(k) for k in ("name", "resolution", "variance", "seed")}
        return hashlib.sha256(json.dumps(keep, sort_keys=True).encode()).hexdigest()
    if folder.is_file():
        return files_fingerprint(folder.parent, [folder], cache)
    files = weight_files(folder)
    if not files:
        raise UserError(f"no weight files in {folder}; pass the diffusers folder of the model")
    return files_fingerprint(folder, files, cache)


def cache_key(weights: str, recipe: Recipe, data: str = "") -> str:
    blob = json.dumps({"weights": weights, "recipe": dataclasses.asdict(recipe), "data": data},
                      sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:20]


# ----------------------------------------------------------------------------------------------
# Training data: the prior's own samples.


def sample_prompts(prior: Prior, prompt: str | None = None) -> list[str]:
    """`GENERIC_PROMPTS` the prior accepts, else (a closed vocabulary, the embedded prior) the
    captions of the embedded world it accepts, else the empty prompt; plus `prompt`."""

    def known(p: str) -> bool:
        try:
            prior.embed_text([p])
        except UserError:
            return False
        return True

    prompts = [p for p in GENERIC_PROMPTS if known(p)]
    if not prompts:
        from lmc_jax.data import shapes

        prompts = [p for p in dict.fromkeys(c for c, _, _ in shapes.all_captions()) if known(p)]
    prompts = prompts or [""]
    if prompt and prompt not in prompts and known(prompt):
        prompts.append(prompt)
    return prompts


def draw_samples(prior: Prior, prompts: list[str], recipe: Recipe, chunk: int,
                 quiet: bool = False) -> np.ndarray:
    """`recipe.num_samples` DDIM samples [N, *x_shape] float32, cycling over `prompts`."""
    from lmc_jax import io
    from lmc_jax.priors.sampling import ddim_sample

    n = recipe.num_samples
    emb_u = prior.embed_text([""])
    key = jax.random.PRNGKey(recipe.seed + 777)
    out = []
    bar = io.progress(range(0, n, chunk), desc="b_psi data: DDIM samples", unit="batch",
                      disable=quiet)
    for start in bar:
        ps = [prompts[i % len(prompts)] for i in range(start, start + chunk)]
        x = ddim_sample(prior, prior.embed_text(ps), emb_u, jax.random.fold_in(key, start),
                        w=recipe.sample_w, num_steps=recipe.ddim_steps)
        out.append(np.asarray(x, np.float32))
    return np.concatenate(out)[:n]


def bias_config(prior_cfg: ml_collections.ConfigDict, recipe: Recipe, data_path: str,
                samples_file: str) -> ml_collections.ConfigDict:
    """The configs/bias.py-shaped config that `lmc_jax.bias.fit.train_bias` runs."""
    c = ml_collections.ConfigDict()
    c.app = "bias"
    c.seed = recipe.seed
    c.prior = prior_cfg.copy_and_resolve_references()
    c.data = ml_collections.ConfigDict({
        "source": "folder" if data_path else "samples",
        "path": data_path or samples_file, "cache_dir": "", "num_images": 0})
    c.bias = ml_collections.ConfigDict({
        "features": recipe.features, "normalize": True, "center": False, "padding": "REFLECT",
        "conditional": False, "target": "uncond", "antithetic": recipe.antithetic,
        "loss_weight": recipe.loss_weight})
    c.train = ml_collections.ConfigDict({
        "steps": recipe.steps, "batch": recipe.batch, "lr": recipe.lr, "warmup": recipe.warmup,
        "t_min": 0, "t_max": 1000})
    c.log_every = max(1, min(100, recipe.steps))
    c.checkpoint_every = max(1, min(500, recipe.steps))
    c.keep_checkpoints = 1
    return c


# ----------------------------------------------------------------------------------------------
# The resolver.


def resolve_bias(prior: Prior, gcfg: ml_collections.ConfigDict,
                 config: ml_collections.ConfigDict | None = None) -> str:
    """The b_psi folder for LMC-SDS when `guidance.bias_path` is empty (see the module doc).

    `config` is the run's whole config (for `prior`, `prompt` and `data.path`); without it the
    prior's config is the one `lmc_jax.priors.factory.build_prior` recorded for `prior`.
    """
    if not gcfg.get("bias_auto", True):
        raise UserError("LMC-SDS with guidance.bias='learned' needs a trained b_psi: pass "
                        "--config.guidance.bias_path=DIR (a folder from configs/bias.py), or drop "
                        "--config.guidance.bias_auto=False to train one automatically (or use "
                        "--config.guidance.method=sds)")
    prior_cfg = config.prior if config is not None and "prior" in config else None
    if prior_cfg is None:
        from lmc_jax.priors.factory import config_of

        prior_cfg = config_of(prior)
    if prior_cfg is None:
        raise UserError("LMC-SDS with guidance.bias='learned' needs a trained b_psi and this "
                        "prior was not built from a config, so none can be trained for it: pass "
                        "--config.guidance.bias_path=DIR (configs/bias.py makes one)")
    prompt = config.get("prompt") if config is not None else None
    data = config.get("data") if config is not None else None
    data_path = str(data.get("path", "") or "") if data is not None else ""
    return auto_bias(prior, prior_cfg, recipe_from_config(prior, gcfg),
                     prompt=prompt if isinstance(prompt, str) else None, data_path=data_path,
                     cache_dir=str(prior_cfg.get("cache_dir", "") or ""))


def auto_bias(prior: Prior, prior_cfg: ml_collections.ConfigDict, recipe: Recipe, *,
              prompt: str | None = None, data_path: str = "", cache_dir: str = "",
              quiet: bool = False) -> str:
    """The cached b_psi folder for (prior's weights, recipe, data), trained first if missing."""
    from lmc_jax import parallel

    root = cache_root(cache_dir)
    weights = prior_fingerprint(prior_cfg, root)
    data_fp = ""
    if data_path:
        from lmc_jax.data.folder import fingerprint, list_images

        data_fp = fingerprint(data_path, list_images(data_path))
    key = cache_key(weights, recipe, data_fp)
    out = root / "bias" / key
    if out.exists() and entry_problem(out, root, _load_check) is None:
        print(f"b_psi for LMC-SDS: reusing {out} (cached for these weights)", flush=True)
        return str(out)
    try:
        (root / "bias").mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot create the b_psi cache in {root} ({e.strerror}); set "
                        f"--config.prior.cache_dir=DIR or ${CACHE_ENV} to a writable folder, "
                        "or pass --config.guidance.bias_path=DIR") from e
    with open(root / "bias" / f"{key}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # another run training the same b_psi: wait for it
        if out.exists() or out.is_symlink():
            problem = entry_problem(out, root, _load_check)
            if problem is None:  # trained by the run we waited for
                print(f"b_psi for LMC-SDS: reusing {out} (cached for these weights)",
                      flush=True)
                return str(out)
            _set_aside(out, problem)
        return _train_into(out, prior, prior_cfg, recipe, prompt, data_path, weights, quiet,
                           main=parallel.is_main_process())


def _load_check(folder: Path) -> None:
    """Reads a cached b_psi without its prior (entries without checksums.json): bias.json is a
    b_psi description and params.msgpack a whole msgpack tree. Raises on damage."""
    from flax import serialization

    meta = json.loads((folder / "bias.json").read_text())
    if not (isinstance(meta, dict) and isinstance(meta.get("module"), dict)
            and isinstance(meta.get("prior"), dict)):
        raise ValueError("bias.json is not a b_psi description")
    serialization.msgpack_restore((folder / "params.msgpack").read_bytes())


def _set_aside(out: Path, problem: str) -> None:
    """Renames the damaged entry `out` aside with one warning line; one error line if it can't."""
    try:
        aside = set_aside(out)
    except OSError as e:
        raise UserError(f"the cached b_psi {out} is damaged ({problem}) and cannot be moved "
                        f"aside ({e.strerror or e}): delete the folder {out} and run again") from e
    if aside is not None:
        warn(f"the cached b_psi {out} is damaged ({problem}): set aside as {aside.name}, "
             "training it again")


def _train_into(out: Path, prior: Prior, prior_cfg: ml_collections.ConfigDict, recipe: Recipe,
                prompt: str | None, data_path: str, weights: str, quiet: bool,
                main: bool) -> str:
    from lmc_jax.bias.fit import train_bias
    from lmc_jax.bias.model import param_count
    from lmc_jax.bias.store import save_bias

    work = out.with_name(out.name + ".partial")
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    if data_path:
        source, prompts = f"the images of {data_path}", []
    else:
        prompts = sample_prompts(prior, prompt)
        source = (f"{recipe.num_samples} DDIM samples of the prior itself ({len(prompts)} "
                  f"prompts, {recipe.ddim_steps} steps, w={recipe.sample_w:g})")
    print(f"LMC-SDS needs b_psi, the prior's learned deficiency E[x_hat] (no "
          f"guidance.bias_path given): training one on {source}, {recipe.steps} steps of batch "
          f"{recipe.batch}, stored in {out} and reused by later runs with these weights "
          "(--config.guidance.bias_auto=False turns this off)", flush=True)
    samples_file = work / "samples.npy"
    sample_seconds = 0.0
    if not data_path and not samples_file.is_file():
        chunk = 64 if prior.kind == "pixel" else 8
        xs = draw_samples(prior, prompts, recipe, chunk=min(chunk, recipe.num_samples),
                          quiet=quiet)
        if not np.all(np.isfinite(xs)):
            raise UserError(f"the prior's DDIM samples are not finite ({prior.name}); pass a "
                            "b_psi with --config.guidance.bias_path or images with data.path")
        np.save(work / "samples.tmp.npy", xs)
        os.replace(work / "samples.tmp.npy", samples_file)
        sample_seconds = time.time() - t0
    cfg = bias_config(prior_cfg, recipe, data_path, str(samples_file))
    module, params, _, train_seconds = train_bias(cfg, str(work), prior=prior, quiet=quiet)
    training = {
        "auto": True, "recipe": dataclasses.asdict(recipe), "weights_sha256": weights,
        "data": data_path or "prior samples", "prompts": prompts,
        "sample_seconds": sample_seconds, "train_seconds": train_seconds,
        "param_count": param_count(params), "steps": recipe.steps,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "jax_backend": jax.default_backend(),
    }
    done = out
    if main:
        tmp = out.with_name(out.name + f".tmp{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)  # left by an earlier process with this pid
        try:
            save_bias(str(tmp), module, params, prior, training=training)
            sums = seal(tmp)
            done = publish(tmp, out, out.parent.parent, _load_check, "cached b_psi", sums)
        except OSError as e:  # the training is kept: in tmp, or in work's checkpoints
            kept = tmp if (tmp / "checksums.json").is_file() else work
            if kept == work:
                shutil.rmtree(tmp, ignore_errors=True)
            raise UserError(f"b_psi trained but not stored in {out} ({e.strerror or e}); the "
                            f"trained result is kept in {kept}: "
                            + (f"pass --config.guidance.bias_path={tmp}" if kept == tmp else
                               "free the cache folder and run again to resume from it")) from e
        shutil.rmtree(work, ignore_errors=True)
    print(f"b_psi trained in {time.time() - t0:.0f} s (samples {sample_seconds:.0f} s, "
          f"training {train_seconds:.0f} s): {done}", flush=True)
    return str(done)

