"""The analytic testbed: SDS vs LMC-SDS on the exact Gaussian prior (DESIGN.md section 4).

Starting from samples of a stationary Gaussian with a 1/(f^2 + 1) power spectrum (natural-image
like), plain gradient descent with SDS at w = 0 pulls every image toward the blurred one-step
estimate and erases high frequencies; LMC-SDS with the closed-form deficiency b(x, t) keeps
them. Writes metrics.json (hf_retention_sds, hf_retention_lmc_exact), strip.png, and prints a
table.

    python -m lmc_jax.main --config=configs/testbed.py --workdir=runs/testbed

Takes about 10-20 s on 2 CPU cores (most of it start-up and compilation). Presets:
`:quick` (fewer images and steps, for tests).
"""

import ml_collections

from lmc_jax.config import guidance_config, parse_preset, prior_config


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    preset = parse_preset(arg, ["quick"], "testbed")
    config = ml_collections.ConfigDict()
    config.app = "testbed"
    config.seed = 0
    config.prior = prior_config("gaussian", resolution=32, variance=0.25)
    # w = 0: the projection term alone, where the two methods differ.
    config.guidance = guidance_config("lmc", w=0.0, weighting="sigma2", t_min=20, t_max=980)
    config.num_images = 8
    config.steps = 200
    config.lr = 0.05  # plain gradient descent: x <- x - lr * grad
    config.hf_cutoff = 8.0  # high frequencies: |f| > 8 cycles per image (half the Nyquist band)
    config.snapshots = 5  # columns of the figure
    if preset == "quick":
        config.num_images = 4
        config.steps = 60
        config.snapshots = 3
    return config
