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
"""

import ml_collections

from lmc_jax.config import guidance_config, parse_preset, prior_config

METHODS = ("sds", "lmc", "dds", "nfsd", "csd")


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
    c.optimizer = "adam"  # adam | sgd (DDS's anchor: sgd, lr 0.1, grad_scale 2000)
    c.grad_scale = 1.0
    c.compare = compare
    c.methods = METHODS  # compared methods; lmc needs a b_psi (guidance.bias/bias_path)
    c.w_by_method = ml_collections.ConfigDict({"sds": 99.0, "lmc": 7.5, "dds": 7.5,
                                               "nfsd": 7.5, "csd": 7.5})
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
