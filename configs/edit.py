"""Image editing by score distillation: move a given image toward a target prompt.

    python -m lmc_jax.main --config=configs/edit.py --workdir=runs/edit \
        --config.prior.path=/path/to/sd --config.image=photo.jpg \
        --config.source_prompt="a photo of a cat" --config.prompt="a photo of a tiger"

`image` is any common format; it is converted to RGB and resized/center-cropped to the prior's
size (with a message). DDS uses `source_prompt`; the other methods ignore it.

Presets: default = Stable Diffusion from `prior.path`; `:tiny` (the embedded prior of coloured
shapes; with no `image`, a render of the source prompt is edited: a red cube -> a blue cube);
`:mixture` (exact Gaussian mixture; with no `image`, a sample of the source class is edited:
red -> blue). Add `_compare` (`:compare`, `:tiny_compare`,
`:mixture_compare`) to run every method (SDS, LMC-SDS, DDS, NFSD, CSD) on the same image,
seed and steps and write one labelled grid (methods x steps) and a metrics table.

Per-method settings (`per_method.<method>`): wherever a method runs (alone with
`--config.guidance.method=M`, or in a compare run), its non-empty keys replace the shared
`guidance.*` (w, weighting, t_min, t_max) and optimizer (optimizer, lr, grad_scale,
grad_reduce) settings; empty keys keep the shared value. The run prints the replacements and
metrics.json records each method's settings. Change one with e.g.
`--config.per_method.dds.lr=0.05`. Defaults:

- DDS runs as its official code does (google/prompt-to-prompt, DDS_zeroshot.ipynb): W(t) = 1,
  t uniform in [50, 949) (`randint(50, 950 - 1)`), guidance_scale 7.5 (w = 6.5 here), SGD with
  lr 0.1 on the loss `2000 * sum(z * grad) / (H * W)` (grad_scale 2000, grad_reduce 'mean_hw').
  Its 200 iterations are the default preset's `steps` (steps are shared by every method).
- SDS: w = 99 (DreamFusion and threestudio's SD guidance use 100 in this convention).
- LMC-SDS, NFSD, CSD: the shared settings (w = 7.5, W(t) = sigma2, Adam).

See docs/baselines.md for every setting that differs from a paper or its official code.
"""

import ml_collections
from ml_collections.config_dict import placeholder

from lmc_jax.config import guidance_config, parse_preset, prior_config

METHODS = ("sds", "lmc", "dds", "nfsd", "csd")
# Keys a method may set for itself (per_method.<method>.KEY), with their types.
PER_METHOD_KEYS = {"w": float, "weighting": str, "t_min": int, "t_max": int, "optimizer": str,
                   "lr": float, "grad_scale": float, "grad_reduce": str}


def method_settings(**values) -> ml_collections.ConfigDict:
    """One method's `per_method` section: every key of PER_METHOD_KEYS, empty (None: the
    shared value) unless given; typed, so `--config.per_method.M.KEY=...` works for any key."""
    unknown = set(values) - set(PER_METHOD_KEYS)
    if unknown:
        raise ValueError(f"unknown per-method keys {sorted(unknown)}; use {list(PER_METHOD_KEYS)}")
    return ml_collections.ConfigDict({
        k: placeholder(kind) if values.get(k) is None else kind(values[k])
        for k, kind in PER_METHOD_KEYS.items()})


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    preset = parse_preset(arg, ["tiny", "mixture", "compare", "tiny_compare",
                                "mixture_compare"], "edit")
    base, compare = preset.replace("compare", "").strip("_"), preset.endswith("compare")
    c = ml_collections.ConfigDict()
    c.app = "edit"
    c.seed = 0
    c.image = ""
    c.prompt = "a photo of a tiger"
    c.source_prompt = "a photo of a cat"
    c.prior = prior_config("sd", path="", resolution=512)
    c.guidance = guidance_config("lmc", w=7.5, bias="learned")
    c.steps = 200
    c.lr = 0.05
    c.optimizer = "adam"  # adam | sgd
    c.grad_scale = 1.0  # the guidance gradient is multiplied by this before the optimizer
    # 'sum': the gradient as is (of sum(sg(grad) * x)); 'mean_hw': divided by x's H * W
    c.grad_reduce = "sum"
    c.compare = compare
    c.methods = METHODS  # compared methods; lmc needs a b_psi (guidance.bias/bias_path)
    # Each method's own settings over the shared ones (see the module docstring).
    c.per_method = ml_collections.ConfigDict({
        "sds": method_settings(w=99.0),
        "lmc": method_settings(),
        "dds": method_settings(w=6.5, weighting="one", t_min=50, t_max=949, optimizer="sgd",
                               lr=0.1, grad_scale=2000.0, grad_reduce="mean_hw"),
        "nfsd": method_settings(),
        "csd": method_settings(),
    })
    c.snapshots = 5
    c.clip_path = ""  # a FlaxCLIPModel folder or hub id for CLIP scores (else "unavailable")
    c.log_every = 50
    if base == "tiny":
        c.prompt = "a blue cube"
        c.source_prompt = "a red cube"
        c.prior = prior_config("embedded", resolution=32)
        c.guidance = guidance_config("lmc", w=7.5, bias="learned", bias_path="embedded",
                                     negative_prompt="a red cube")
        c.steps = 100
    if base == "mixture":
        c.prompt = "blue"
        c.source_prompt = "red"
        c.prior = prior_config("gaussian_mixture", resolution=32)
        # NFSD's negative prompt must name a class here: steer away from the source colour.
        c.guidance = guidance_config("lmc", w=7.5, bias="exact", negative_prompt="red")
        c.steps = 100
    return c
