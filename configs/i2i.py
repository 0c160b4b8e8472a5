"""Zero-shot image-to-image: train a small network with a score-distillation loss, no pairs.

    python -m lmc_jax.main --config=configs/i2i.py --workdir=runs/i2i \
        --config.prior.path=/path/to/sd --config.data.path=/path/to/photos \
        --config.prompt="a watercolor painting" --config.guidance.bias_path=/path/to/b_psi

The network maps the prior's `x` (pixels, or SD latents of your images) to an edited `x`;
its loss is the guidance gradient toward `prompt` plus `identity_weight * ||f(x) - x||^2`
(keeps the structure). Held-out images get before/after grids and figures in metrics.json.

Presets: default = Stable Diffusion + a folder of images; `:mixture` (exact Gaussian mixture:
turns red samples blue, ~1 minute on 2 CPU cores); `:tiny` (the embedded prior, offline:
"a red X" -> "a blue X"):

    python -m lmc_jax.main --config=configs/i2i.py:tiny --workdir=runs/i2i-tiny

trains f_theta on 200 renders of red objects (the 'train' split of lmc_jax.data.shapes) toward
"a blue {shape}" (each render's own primitive), LMC-SDS with the shipped b_psi, 300 steps, no
target images; it scores 50 held-out red renders of the 'eval_test' split with the shipped
evaluator (lmc_jax.apps.i2i_shapes) and writes heldout_*.png, heldout.npz and metrics.json.
Measured: 390 s on 2 CPU cores shared with other jobs (load average 13-17), renders, compiles
and held-out scoring included. `--config.guidance.method=sds` or `=dds` runs a baseline at its
own settings (`per_method`); benchmarks/ablation_i2i.py compares them.

Parallelism: each batch is split over all devices (`batch` must be a multiple of their number
divided by `parallel.model_axis`); `--config.parallel.model_axis=M` splits the prior's large
arrays over M devices.
"""

import ml_collections
from ml_collections.config_dict import placeholder

from lmc_jax.config import guidance_config, parse_preset, prior_config


def method_settings(**values) -> ml_collections.ConfigDict:
    """One method's `per_method` section: w, weighting, t_min, t_max, empty (None: the shared
    `guidance` value) unless given; typed, so `--config.per_method.M.KEY=...` works."""
    kinds = {"w": float, "weighting": str, "t_min": int, "t_max": int}
    return ml_collections.ConfigDict({
        k: placeholder(kind) if values.get(k) is None else kind(values[k])
        for k, kind in kinds.items()})


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    preset = parse_preset(arg, ["mixture", "tiny"], "i2i")
    c = ml_collections.ConfigDict()
    c.app = "i2i"
    c.seed = 0
    c.prompt = "a watercolor painting"
    c.source_prompt = ""  # mixture: the class the training images are drawn from
    c.prior = prior_config("sd", path="", resolution=512)
    c.guidance = guidance_config("lmc", w=7.5, bias="learned")
    c.data = ml_collections.ConfigDict({"source": "folder", "path": "", "cache_dir": ""})
    c.net = ml_collections.ConfigDict({"features": 32, "blocks": 3})
    c.identity_weight = 0.1
    c.lpips_path = ""  # LPIPS-VGG weights (lmc_jax/metrics/lpips.py): held-out LPIPS to the input
    c.steps = 2000
    c.batch = 4
    c.lr = 1e-3
    c.heldout = 8
    c.eval_every = 500
    c.log_every = 50
    c.checkpoint_every = 500
    c.keep_checkpoints = 2
    c.parallel = ml_collections.ConfigDict({"model_axis": "auto"})  # or a number (parallel.py)
    if preset == "mixture":
        c.prompt = "blue"
        c.source_prompt = "red"
        c.prior = prior_config("gaussian_mixture", resolution=32)
        c.guidance = guidance_config("lmc", w=7.5, bias="exact")
        c.data.source = "prior"
        c.steps = 150
        c.batch = 8
        c.eval_every = 50
        c.log_every = 25
        c.checkpoint_every = 50
    if preset == "tiny":
        c.prompt = "a blue {shape}"  # {shape}: each render's own primitive
        c.source_prompt = "a red {shape}"  # DDS's source prompt
        c.prior = prior_config("embedded", resolution=32)
        # NFSD's negative prompt: the source, as configs/edit.py:tiny (the prior's words only)
        c.guidance = guidance_config("lmc", w=7.5, bias="learned", bias_path="embedded",
                                     negative_prompt="a red {shape}")
        # Each method's own guidance settings over `guidance` (as configs/edit.py's): SDS at
        # DreamFusion's w = 100, DDS as its official code (W(t) = 1, t in [50, 949),
        # guidance_scale 7.5 = w 6.5), LMC-SDS at the shared w = 7.5 (docs/baselines.md).
        c.per_method = ml_collections.ConfigDict({
            "lmc": method_settings(),
            "sds": method_settings(w=100.0),
            "dds": method_settings(w=6.5, weighting="one", t_min=50, t_max=949),
        })
        c.data = ml_collections.ConfigDict({
            "source": "renders", "colour": "red", "split": "train", "num_images": 200,
            "heldout_split": "eval_test"})
        c.heldout = 50
        c.steps = 300
        c.batch = 8
        c.eval_every = 100
        c.log_every = 50
        c.checkpoint_every = 100
    return c
