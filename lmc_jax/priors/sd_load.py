"""Loading Stable Diffusion weights as users have them: Flax or PyTorch folders, Hub ids, single
files; PyTorch weights converted to Flax once and cached.

`load_stable_diffusion(path)` reads:
- a diffusers folder (`unet/ vae/ text_encoder/ tokenizer/ scheduler/`). Per model folder, Flax
  weights (`diffusion_flax_model.msgpack`, `flax_model.msgpack`) are read when present (unless
  `from_pt=True`); otherwise PyTorch weights, in this order: `<stem>.safetensors`, `<stem>.bin`
  (needs torch), the fp16 variant `<stem>.fp16.safetensors` / `.fp16.bin`, or a sharded
  `<stem>.safetensors.index.json`. No flag is needed for a PyTorch-only folder.
- a Hugging Face Hub id (`revision` picks a branch, tag or commit; from the local HF cache when
  offline).
- a single-file checkpoint (`.safetensors`, `.ckpt`): converted with diffusers'
  `StableDiffusionPipeline.from_single_file` (needs torch, and diffusers must find the model's
  config offline); otherwise one error line with the command that converts it.

PyTorch weights are converted with diffusers' / transformers' own PyTorch-to-Flax converters,
then written to `<cache>/flax/<key>/flax.safetensors` (Flax names, source dtype), `<key>` being a
sha256 of the model folder's config.json and weight files (`lmc_jax.cache`): the next load of the
same files reads that (memory-mapped) and skips the conversion. An entry is written in a
temporary folder, sealed with its checksums.json and renamed into place; one that fails its
check or does not load is renamed `<key>.damaged-<time>` with one warning line and converted
again (when it cannot be renamed: converted again, not cached, and the warning names the folder
to delete).
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import socket
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import jax
import numpy as np
from flax.traverse_util import flatten_dict, unflatten_dict

from lmc_jax import _compat
from lmc_jax.cache import (
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
from lmc_jax.priors.sd import COMPONENTS, _jnp_dtype, make_sd_prior

WEIGHTS_HINT = (
    "on a connected machine run `huggingface-cli download stabilityai/stable-diffusion-2-1-base "
    "--local-dir /path/sd21`, copy the folder here and pass --config.prior.path=/path/sd21 "
    "(the ':tiny' config presets need no weights)"
)
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")
SINGLE_FILE_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".pth", ".bin")
CONVERTER_VERSION = 1  # part of the converted-weights cache key
VARIANTS = ("", ".fp16")


def load_stable_diffusion(path: str, *, dtype: str = "float32", from_pt: bool = False,
                          attention: str = "late_norm", revision: str | None = None,
                          cache_dir: str | None = None) -> Prior:
    """Loads a Stable Diffusion (1.x/2.x) pipeline as a latent `Prior` (see the module doc).

    A pipeline whose model_index.json sets `"vae": [null, null]` has no VAE: its UNet works on
    RGB pixels and the result is a pixel `Prior` (the embedded prior, `lmc_jax.priors.embedded`).

    Args:
      path: a local diffusers folder, a Hub id such as 'stabilityai/stable-diffusion-2-1-base',
        or a single-file checkpoint.
      dtype: 'float32' or 'bfloat16'.
      from_pt: read the PyTorch weights even where Flax weights exist too.
      attention: see `lmc_jax.priors.sd.make_sd_prior`.
      revision: Hub branch/tag/commit (ignored for local folders).
      cache_dir: where converted weights are cached (`lmc_jax.cache.cache_root`).
    """
    _jnp_dtype(dtype)
    cache = cache_root(cache_dir)
    folder = resolve_folder(str(path), revision=revision)
    if folder.is_file():
        folder = _single_file_folder(folder, cache)
    pixel = _declares_no_vae(folder)
    needed = [c for c in COMPONENTS if not (pixel and c == "vae")]
    missing = [c + "/" for c in needed if not (folder / c).is_dir()]
    if missing:
        raise UserError(
            f"{path!r} is not a complete diffusers Stable Diffusion folder: it has no "
            f"{', '.join(missing)} (needs {', '.join(c + '/' for c in needed)}); {WEIGHTS_HINT}"
        )
    d, tr = _compat.diffusers(), _compat.transformers()
    unet, unet_params = _load_diffusers_model(d.FlaxUNet2DConditionModel, folder / "unet",
                                              from_pt, cache)
    vae, vae_params = (None, None) if pixel else _load_diffusers_model(
        d.FlaxAutoencoderKL, folder / "vae", from_pt, cache)
    text_encoder, text_params = _load_text_encoder(folder / "text_encoder", from_pt, cache)
    try:
        tokenizer = tr.CLIPTokenizer.from_pretrained(str(folder / "tokenizer"))
    except (OSError, ValueError, TypeError) as e:
        raise UserError(f"cannot read the tokenizer in {folder / 'tokenizer'} "
                        f"(CLIPTokenizer needs vocab.json and merges.txt): {_first_line(e)}") from e
    scheduler_config = _read_json(folder / "scheduler" / "scheduler_config.json")
    params = {"unet": unet_params, "vae": vae_params, "text_encoder": text_params}
    return make_sd_prior(unet, vae, text_encoder, tokenizer, params, scheduler_config,
                         dtype=dtype, name=f"sd:{path}:{dtype}", attention=attention)


def _declares_no_vae(folder: Path) -> bool:
    """True when model_index.json exists and names no VAE (a pixel-space pipeline)."""
    index = folder / "model_index.json"
    if not index.is_file():
        return False
    entry = _read_json(index).get("vae", "absent")
    return entry is None or (isinstance(entry, list) and all(v is None for v in entry))


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return f"{type(e).__name__}: {text.splitlines()[0] if text else ''}"


def _read_json(file: Path) -> dict[str, Any]:
    if not file.is_file():
        raise UserError(f"{file} is missing; a diffusers folder has it (re-download the model)")
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as e:  # JSONDecodeError is a ValueError
        raise UserError(f"{file} is not a JSON file ({_first_line(e)}); the folder is damaged: "
                        "download the model again") from e
    if not isinstance(data, dict):
        raise UserError(f"{file} holds no JSON object; the folder is damaged: download the "
                        "model again")
    return data


# ----------------------------------------------------------------------------------------------
# Where the files are: local folder, Hub snapshot, single file.


def resolve_folder(path: str, *, revision: str | None = None) -> Path:
    """The local folder (or single file) of a prior path; a Hub id -> its local snapshot
    (downloaded if the Hub is reachable, else from the local HF cache)."""
    local = Path(path).expanduser()
    if local.is_dir():
        return local
    if local.is_file():
        if local.suffix.lower() in SINGLE_FILE_SUFFIXES:
            return local
        raise UserError(f"prior path {path!r} is a file but not a checkpoint (.safetensors, "
                        f".ckpt); pass the diffusers folder that holds "
                        f"{', '.join(c + '/' for c in COMPONENTS)}")
    if not _HUB_ID.fullmatch(path):
        raise UserError(f"Stable Diffusion weights not found: {path!r} does not exist; "
                        f"{WEIGHTS_HINT}")
    try:
        return Path(_snapshot(path, revision=revision))
    except Exception as e:  # offline, unknown repo, bad revision, auth: all end the same way
        rev = f" at revision {revision!r}" if revision else ""
        raise UserError(
            f"Stable Diffusion weights not found: {path!r}{rev} is not a local folder and could "
            f"not be fetched from the Hugging Face Hub ({type(e).__name__}); {WEIGHTS_HINT}"
        ) from e


def _snapshot(repo_id: str, *, revision: str | None) -> str:
    """Downloads only what the loader reads (Flax weights if the repository has them, else
    PyTorch safetensors, else their fp16 variant); from the local HF cache alone when offline."""
    import huggingface_hub

    base = ["model_index.json", "*/config.json", "scheduler/*.json", "tokenizer/*"]
    weights = {
        "flax": ["unet/diffusion_flax_model.msgpack", "vae/diffusion_flax_model.msgpack",
                 "text_encoder/flax_model.msgpack"],
        "pt": ["unet/diffusion_pytorch_model.safetensors",
               "vae/diffusion_pytorch_model.safetensors", "text_encoder/model.safetensors"],
        "fp16": ["unet/diffusion_pytorch_model.fp16.safetensors",
                 "vae/diffusion_pytorch_model.fp16.safetensors",
                 "text_encoder/model.fp16.safetensors"],
    }
    online = _hub_reachable(huggingface_hub.constants.ENDPOINT)
    if online:
        files = set(huggingface_hub.list_repo_files(repo_id, revision=revision))
        kind = next((k for k, names in weights.items() if all(n in files for n in names)), "pt")
        patterns = base + weights[kind]
    else:
        patterns = base + [n for names in weights.values() for n in names]
    return huggingface_hub.snapshot_download(repo_id, revision=revision, allow_patterns=patterns,
                                             local_files_only=not online)


def _hub_reachable(endpoint: str) -> bool:
    """False when the Hub's host does not even resolve (offline): avoids ~25 s of HTTP retries."""
    if any(os.environ.get(k) for k in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return True
    host = urlparse(endpoint).hostname
    try:
        socket.getaddrinfo(host, 443)
    except (OSError, UnicodeError):
        return False
    return True


def single_file_command(file: Path) -> str:
    """The shell command that converts a single-file checkpoint to a diffusers folder."""
    out = file.with_suffix("")
    return (f"python -c \"from diffusers import StableDiffusionPipeline as P; "
            f"P.from_single_file('{file}').save_pretrained('{out}')\"")


def _single_file_folder(file: Path, cache: Path) -> Path:
    """A diffusers folder made from a single-file checkpoint (cached by its sha256)."""
    key = files_fingerprint(file.parent, [file], cache)[:20]
    out = cache / "single_file" / key
    if out.exists() and _usable(out, cache, _check_diffusers_entry, "converted checkpoint"):
        return out
    how = (f"convert it on a machine with internet access and torch: "
           f"`{single_file_command(file)}`, then pass --config.prior.path={file.with_suffix('')}")
    try:
        import torch  # noqa: F401
    except ImportError:
        raise UserError(f"{file} is a single-file checkpoint; lmc_jax reads diffusers folders and "
                        f"converting it needs torch (not installed): {how}") from None
    logging.info("converting the single-file checkpoint %s with diffusers", file)
    tmp = out.with_name(f"{key}.tmp{os.getpid()}")
    try:
        from diffusers import StableDiffusionPipeline

        pipe = StableDiffusionPipeline.from_single_file(str(file), local_files_only=True)
        pipe.save_pretrained(str(tmp), safe_serialization=True)
    except Exception as e:  # diffusers raises many types; all mean "cannot convert here"
        shutil.rmtree(tmp, ignore_errors=True)
        raise UserError(f"{file} is a single-file checkpoint and diffusers could not convert it "
                        f"offline ({_first_line(e)[:160]}); {how}") from e
    try:
        return publish(tmp, out, cache, _check_diffusers_entry, "converted checkpoint",
                       seal(tmp))
    except OSError as e:  # the conversion is kept where it was written
        warn(f"could not move the converted checkpoint into the cache {out} ({e}); using {tmp}")
        return tmp


# ----------------------------------------------------------------------------------------------
# Weight files and conversion.


class _ShapeOnly:
    """Stands in for a model in the PyTorch->Flax converters, which only read parameter shapes.

    diffusers' converter would otherwise initialize the full model eagerly (minutes for the SD
    UNet on CPU), and transformers' needs `_do_init=True`.
    """

    def __init__(self, shapes: Any, base_model_prefix: str = ""):
        self.params = shapes
        self.base_model_prefix = base_model_prefix

    def init_weights(self, rng: Any) -> Any:
        del rng
        return self.params


class _AsNumpy:
    """Wraps an array so that diffusers' converter can call `.numpy()` on it like on a tensor."""

    def __init__(self, array: np.ndarray):
        self.array = array

    def numpy(self) -> np.ndarray:
        return self.array


def pytorch_weight_files(folder: Path, stem: str) -> list[Path]:
    """The PyTorch weight files of `stem` in `folder` (first match of the module doc's order)."""
    for variant in VARIANTS:
        for ext in ("safetensors", "bin"):
            f = folder / f"{stem}{variant}.{ext}"
            if f.is_file():
                return [f]
            index = folder / f"{stem}{variant}.{ext}.index.json"
            if index.is_file():
                shards = sorted(set(_read_json(index).get("weight_map", {}).values()))
                return [folder / s for s in shards]
    return []


def _read_pt_files(files: list[Path]) -> dict[str, np.ndarray]:
    """PyTorch state dict as numpy: float16/float32 kept, other floats (bf16) -> float32."""
    state: dict[str, np.ndarray] = {}
    for f in files:
        if not f.is_file():
            raise UserError(f"{f} is missing (named by the shard index); download the model again")
        if f.suffix == ".safetensors":
            state.update(_read_safetensors(f))
            continue
        try:
            import torch
        except ImportError as e:
            raise UserError(f"{f} is a PyTorch pickle and torch is not installed; install torch "
                            "or use the .safetensors file of the same model") from e
        loaded = torch.load(str(f), map_location="cpu", weights_only=True)
        for k, v in loaded.items():
            v = v if v.dtype in (torch.float16, torch.float32) or not v.is_floating_point() \
                else v.float()
            state[k] = v.numpy()
    return state


def _read_safetensors(file: Path) -> dict[str, np.ndarray]:
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(file), framework="np") as f:
            return {k: f.get_tensor(k) for k in f.keys()}
    except (TypeError, ValueError):  # bfloat16 has no numpy dtype: read through JAX
        with safe_open(str(file), framework="flax") as f:
            return {k: np.asarray(f.get_tensor(k), np.float32) for k in f.keys()}
    except SafetensorError as e:
        raise UserError(f"{file} is not a readable safetensors file ({_first_line(e)}); "
                        "download the model again") from e


def _check_params(expected: Any, params: Any, folder: Path) -> dict[str, Any]:
    """Keeps the expected weights; a missing one or a wrong shape is a UserError."""
    want = flatten_dict(dict(expected))
    got = flatten_dict(dict(params))
    missing = [k for k in want if k not in got]
    if missing:
        raise UserError(f"{folder}: the checkpoint lacks {len(missing)} of {len(want)} weights "
                        f"(e.g. {'/'.join(missing[0])}); it does not match {folder}/config.json")
    for k, spec in want.items():
        if tuple(got[k].shape) != tuple(spec.shape):
            raise UserError(f"{folder}: weight {'/'.join(k)} has shape {tuple(got[k].shape)} but "
                            f"config.json implies {tuple(spec.shape)}")
    return unflatten_dict({k: got[k] for k in want})


def _contiguous(x: Any) -> np.ndarray:
    """A C-contiguous numpy view of `x` (a copy only when it is not contiguous already)."""
    a = np.asarray(x)
    return a if a.flags.c_contiguous else np.array(a, order="C")


def _cache_entry(folder: Path, files: list[Path], cache: Path) -> Path:
    """The conversion cache folder of `folder`'s config.json + weight `files` (by content)."""
    key = files_fingerprint(folder, [folder / "config.json", *files], cache)[:24]
    return cache / "flax" / f"v{CONVERTER_VERSION}-{key}"


def _check_flax_entry(entry: Path) -> None:
    """Load check of a converted-weights entry without checksums.json: source.json is a JSON
    object and flax.safetensors a whole safetensors file (its header matches its size)."""
    from safetensors import safe_open

    if not isinstance(json.loads((entry / "source.json").read_text()), dict):
        raise ValueError("source.json holds no JSON object")
    with safe_open(str(entry / "flax.safetensors"), framework="np") as f:
        list(f.keys())


def _check_diffusers_entry(entry: Path) -> None:
    """Load check of a converted single-file checkpoint without checksums.json."""
    if not isinstance(json.loads((entry / "model_index.json").read_text()), dict):
        raise ValueError("model_index.json holds no JSON object")


_UNMOVABLE: set[str] = set()  # damaged entries already reported as impossible to set aside


def _usable(entry: Path, cache: Path, load_check, what: str, problem: str | None = None) -> bool:
    """True when the existing cache `entry` passes its check; otherwise (or given a `problem`)
    it is set aside with one warning line, and False."""
    if problem is None:
        problem = entry_problem(entry, cache, load_check)
    if problem is None:
        return True
    try:
        aside = set_aside(entry)
    except OSError as e:
        if str(entry) not in _UNMOVABLE:
            _UNMOVABLE.add(str(entry))
            warn(f"the {what} cache {entry} is damaged ({problem}) and cannot be moved aside "
                 f"({e.strerror or e}): converting again without caching; delete the folder "
                 f"{entry}")
        return False
    if aside is not None:
        warn(f"the {what} cache {entry} is damaged ({problem}): set aside as {aside.name}, "
             "converting again")
    return False


def _cached(entry: Path, cache: Path) -> Any | None:
    """Flax params stored in a cache entry (device arrays, read once), or None; a damaged entry
    is set aside (`_usable`) and None returned."""
    if not entry.exists() or not _usable(entry, cache, _check_flax_entry, "converted-weights"):
        return None
    from safetensors import safe_open

    try:
        with safe_open(str(entry / "flax.safetensors"), framework="flax") as f:
            flat = {tuple(k.split("/")): f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # noqa: BLE001 - passed its check but does not load: damaged
        _usable(entry, cache, _check_flax_entry, "converted-weights", _first_line(e))
        return None
    return unflatten_dict(flat)


def _converted(folder: Path, files: list[Path], cache: Path, convert) -> Any:
    """Flax params of PyTorch `files`: from the cache when converted before, else `convert()`
    and store (best effort: an unwritable cache only costs converting again)."""
    entry = _cache_entry(folder, files, cache)
    params = _cached(entry, cache)
    if params is not None:
        return params
    t0 = time.time()
    params = convert()
    logging.info("converted %s from PyTorch in %.1f s", folder, time.time() - t0)
    if str(entry) in _UNMOVABLE:
        return params
    tmp = entry.with_name(f"{entry.name}.tmp{os.getpid()}")
    try:
        from safetensors.numpy import save_file

        shutil.rmtree(tmp, ignore_errors=True)  # left by an earlier process with this pid
        tmp.mkdir(parents=True)
        flat = {"/".join(k): _contiguous(v) for k, v in flatten_dict(dict(params)).items()}
        save_file(flat, str(tmp / "flax.safetensors"))
        (tmp / "source.json").write_text(json.dumps(
            {"folder": str(folder.resolve()), "files": [f.name for f in files]}, indent=2))
        publish(tmp, entry, cache, _check_flax_entry, "converted-weights cache", seal(tmp))
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        logging.warning("could not cache the converted weights in %s: %s", entry, e)
    return params


def _load_diffusers_model(cls: Any, folder: Path, from_pt: bool, cache: Path) -> tuple[Any, Any]:
    """(module, params) for a diffusers model folder (config.json + Flax or PyTorch weights)."""
    if not (folder / "config.json").is_file():
        raise UserError(f"{folder} has no config.json; is it a diffusers model folder?")
    flax_file = folder / "diffusion_flax_model.msgpack"
    pt_files = pytorch_weight_files(folder, "diffusion_pytorch_model")
    try:
        if pt_files and (from_pt or not flax_file.is_file()):
            model = cls.from_config(cls.load_config(str(folder)))
            cached = _cached(_cache_entry(folder, pt_files, cache), cache)
            if cached is not None:  # checked against config.json when it was converted
                return model, cached
            shapes = jax.eval_shape(model.init_weights, jax.random.PRNGKey(0))

            def convert():
                from diffusers.models.modeling_flax_pytorch_utils import (
                    convert_pytorch_state_dict_to_flax,
                )

                state = _read_pt_files(pt_files)
                params = convert_pytorch_state_dict_to_flax(
                    {k: _AsNumpy(v) for k, v in state.items()}, _ShapeOnly(shapes))
                return _check_params(shapes, params, folder)

            return model, _check_params(shapes, _converted(folder, pt_files, cache, convert),
                                        folder)
        if not flax_file.is_file():
            raise UserError(f"{folder} has no weights: neither {flax_file.name} nor PyTorch "
                            "diffusion_pytorch_model[.fp16].safetensors/.bin; download the model "
                            "again")
        model, params = cls.from_pretrained(str(folder), dtype=np.float32)
        shapes = jax.eval_shape(model.init_weights, jax.random.PRNGKey(0))
        return model, _check_params(shapes, params, folder)
    except UserError:
        raise
    except (OSError, ValueError, KeyError) as e:
        raise UserError(f"cannot load {folder}: {_first_line(e)}") from e


def _load_text_encoder(folder: Path, from_pt: bool, cache: Path) -> tuple[Any, Any]:
    """(FlaxCLIPTextModel, params) from flax_model.msgpack or PyTorch weights."""
    tr = _compat.transformers()
    if not (folder / "config.json").is_file():
        raise UserError(f"{folder} has no config.json; is it a transformers model folder?")
    flax_file = folder / "flax_model.msgpack"
    pt_files = pytorch_weight_files(folder, "model") or pytorch_weight_files(folder,
                                                                            "pytorch_model")
    try:
        if pt_files and (from_pt or not flax_file.is_file()):
            config = tr.CLIPTextConfig.from_pretrained(str(folder))
            model = tr.FlaxCLIPTextModel(config, _do_init=False)
            shapes = model.params_shape_tree

            def convert():
                from transformers.modeling_flax_pytorch_utils import (
                    convert_pytorch_state_dict_to_flax,
                )

                state = _read_pt_files(pt_files)
                params = convert_pytorch_state_dict_to_flax(
                    state, _ShapeOnly(shapes, model.base_model_prefix))
                return _check_params(shapes, params, folder)

            return model, _check_params(shapes, _converted(folder, pt_files, cache, convert),
                                        folder)
        if not flax_file.is_file():
            raise UserError(f"{folder} has no weights: neither {flax_file.name} nor PyTorch "
                            "model[.fp16].safetensors / pytorch_model.bin; download the model "
                            "again")
        model, params = tr.FlaxCLIPTextModel.from_pretrained(str(folder), _do_init=False)
        return model, _check_params(model.params_shape_tree, params, folder)
    except UserError:
        raise
    except (OSError, ValueError, KeyError) as e:
        raise UserError(f"cannot load {folder}: {_first_line(e)}") from e


__all__ = ["WEIGHTS_HINT", "load_stable_diffusion", "pytorch_weight_files", "resolve_folder",
           "single_file_command"]
