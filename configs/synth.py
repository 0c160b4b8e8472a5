"""Image synthesis: optimize pixels (pixel priors) or latents (Stable Diffusion) toward a prompt.

    python -m lmc_jax.main --config=configs/synth.py:mixture --workdir=runs/synth \
        --config.prompt="green"

Presets: default = Stable Diffusion from `prior.path` (a local diffusers folder or hub id);
`:tiny` = the embedded prior of coloured shapes (offline; prompts like "a yellow cone") with
LMC-SDS and its shipped b_psi (seconds on a CPU; metrics.json holds the evaluator's scores);
`:mixture` = the exact Gaussian-mixture prior (prompts: red, green, blue, yellow; seconds).
"""

import ml_collections

from lmc_jax.config import EMBEDDED_NEGATIVE_PROMPT, guidance_config, parse_preset, prior_config


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    preset = parse_preset(arg, ["tiny", "mixture"], "synth")
    config = ml_collections.ConfigDict()
    config.app = "synth"
    config.seed = 0
    config.prompt = "a photograph of a red fox in the snow"
    config.prior = prior_config("sd", path="", resolution=512)
    config.guidance = guidance_config("sds", w=99.0)
    config.batch = 1
    config.steps = 500
    config.lr = 0.02
    config.init = "grey"  # grey | noise
    config.optimizer = "adam"  # adam | sgd
    config.seeds = 1  # > 1: one run per seed (seed, seed + 1, ...), rows of final.png
    config.clip_path = ""  # a CLIP folder or hub id: CLIP score + R-precision of the results
    config.log_every = 50
    config.parallel = ml_collections.ConfigDict({"model_axis": "auto"})  # or a number (parallel.py)
    if preset == "tiny":
        config.prompt = "a yellow cone"
        config.prior = prior_config("embedded", resolution=32)
        config.guidance = guidance_config("lmc", w=7.5, bias="learned", bias_path="embedded",
                                          negative_prompt=EMBEDDED_NEGATIVE_PROMPT)
        config.steps = 200
        config.lr = 0.05
        config.log_every = 50
    elif preset == "mixture":
        config.prompt = "red"
        config.prior = prior_config("gaussian_mixture", resolution=32)
        config.guidance = guidance_config("lmc", w=7.5, bias="exact")
        config.steps = 200
        config.lr = 0.05
        config.log_every = 50
    return config
