"""Train the learned deficiency b_psi(x, t) of LMC-SDS for a prior.

    python -m lmc_jax.main --config=configs/bias.py:gaussian --workdir=runs/bias-gaussian

Writes the trained model to WORKDIR/bias (params.msgpack + bias.json); point an application
at it with --config.guidance.bias=learned --config.guidance.bias_path=WORKDIR/bias.

Presets:
- default: Stable Diffusion from prior.path, trained on a folder of your images
  (--config.data.path=DIR; resized and center-cropped, encoded to latents once and cached).
  Cost estimate for SD 2.1-base at 64x64x4 latents, batch 32, 20k steps: one UNet forward per
  sample (no backward through the UNet), i.e. roughly a third of a fine-tuning step: about
  1-2 hours on one A100/H100 or a v4 TPU host (an estimate from the UNet's FLOPs, not
  measured here).
- `:gaussian`: the exact Gaussian prior of the testbed (32x32x3), fresh samples every step;
  ~2-4 minutes on 2 CPU cores.
- `:mixture`: the conditional Gaussian mixture (4 colour classes), conditional b_psi.
- `:embedded`: the embedded prior (lmc_jax.priors.embedded) on its training renders; this is
  the b_psi shipped in lmc_jax/assets/embedded_prior/bias.
- `:patterned`: the patterned embedded prior (`prior.name='embedded_patterned'`) on its
  training renders (`data.patterned`); the b_psi shipped in lmc_jax/assets/patterned_prior/bias
  was trained with `--config.train.steps=600` (as the plain one) and the default uniform loss:
  361 s on 2 CPU cores shared with other jobs, plus rendering 4096 patterned renders.
- `:tiny`: the embedded prior again, a few steps (plumbing, for tests).

Loss weighting (`bias.loss_weight`): 'uniform' (the plain squared error to `sg(x_hat)`) is the
default, measured against 'relative' (each sample's error divided by its own target's
spatial-variation energy) by `python benchmarks/bias_loss.py --priors gaussian embedded`
(docs/baselines.md, "b_psi's loss weighting"). On the exact Gaussian prior (1000 steps, batch
32, seeds 0 and 1), `relative_bias_error` against the closed form, mean over t = 50..950:
uniform 0.067 / 0.072 against relative 0.118 / 0.126 with antithetic pairs (0.094 / 0.115
against 0.134 / 0.149 without); uniform is 3-4x closer at t <= 550 and level above. On the
embedded prior (300 steps, seed 0, against 32-pair Monte-Carlo E[x_hat] of 16 held-out renders)
the two tie on the mean (0.838 / 0.832), uniform closer at t <= 550 (0.190 against 0.208),
relative at t >= 650 (1.77 against 1.81). The shipped embedded b_psi was trained with 'relative'.
"""

import ml_collections

from lmc_jax.config import parse_preset, prior_config


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    preset = parse_preset(arg, ["gaussian", "mixture", "embedded", "patterned", "tiny",
                                       "quick"], "bias")
    config = ml_collections.ConfigDict()
    config.app = "bias"
    config.seed = 0
    config.prior = prior_config("sd", path="", resolution=512)
    config.data = ml_collections.ConfigDict({
        # folder | prior (sample the exact prior) | gaussian_images | shapes (embedded prior)
        "source": "folder",
        "path": "",  # folder: a directory of images (png/jpg/...)
        "cache_dir": "",  # folder/shapes: where the array_record dataset goes (default workdir)
        "num_images": 4096,  # shapes: training renders used
        "patterned": False,  # shapes: renders of the patterned world
    })
    config.bias = ml_collections.ConfigDict({
        "features": 32,
        "normalize": True,  # per-image, per-channel normalized input; de-normalized output
        # subtract the per-image mean too (exact shift equivariance, but the image mean then
        # passes through unchanged: wrong where the deficiency shrinks the mean, e.g. large t)
        "center": False,
        "padding": "REFLECT",  # CIRCULAR for periodic data (the Gaussian testbed)
        "conditional": False,
        "target": "uncond",  # x_hat from the null prompt ('uncond') or the sample's ('cond')
        "antithetic": True,  # average x_hat over eps and -eps (unbiased, lower variance)
        "loss_weight": "uniform",  # uniform | relative (see lmc_jax.bias.train, above)
    })
    config.train = ml_collections.ConfigDict({
        "steps": 20000, "batch": 32, "lr": 2e-3, "warmup": 200, "t_min": 0, "t_max": 1000,
    })
    config.log_every = 100
    config.checkpoint_every = 1000
    config.keep_checkpoints = 2
    config.parallel = ml_collections.ConfigDict({"model_axis": "auto"})  # or a number (parallel.py)
    if preset in ("gaussian", "mixture", "quick"):
        mixture = preset == "mixture"
        config.prior = prior_config("gaussian_mixture" if mixture else "gaussian", resolution=32)
        config.data.source = "prior"
        config.bias.padding = "CIRCULAR"
        config.bias.conditional = mixture
        config.bias.target = "cond" if mixture else "uncond"
        config.train.steps = 3000
        config.log_every = 250
    if preset == "quick":
        config.train.steps = 300
        config.train.batch = 16
        config.log_every = 50
    if preset in ("embedded", "patterned", "tiny"):
        config.prior = prior_config("embedded", resolution=32)
        config.data.source = "shapes"
        config.train.steps = 1500
        config.log_every = 100
    if preset == "patterned":
        config.prior.name = "embedded_patterned"
        config.data.patterned = True
    if preset == "tiny":
        config.data.num_images = 256
        config.train.steps = 100
        config.train.batch = 8
        config.log_every = 20
    return config
