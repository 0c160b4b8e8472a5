"""The analytic testbed: the paper's claim, reproduced on an exact Gaussian prior.

docs/design.md section 4. Settings fixed so the figures mean
the same everywhere: 32x32x3 images; SD's scaled-linear betas (0.00085..0.012, 1000 steps); a
stationary Gaussian with power spectrum 1/(f^2 + 1) scaled to pixel variance 0.25; timesteps
uniform in [20, 980]; W(t) = s_t^2; plain gradient descent with lr 0.05; high frequencies are
|f| > 8 cycles per image.

1. From data samples, SDS at w = 0 vs LMC-SDS with the closed-form b (hf_retention_sds,
   hf_retention_lmc_exact).
2. b_psi trained on the prior (configs/bias.py's recipe): bias_rel_err (mean over t in
   {50, 150, ..., 950} of ||b_psi - b|| / ||b - mu||) and hf_retention_lmc with it.
3. A conditional mixture (4 constant-colour classes) from grey plus small noise: SDS at w = 100
   vs LMC-SDS at w = 7.5 with a learned conditional b_psi (target_acc_*, saturation_*).

Writes metrics.json, strip.png (rows SDS / LMC exact / LMC learned; columns steps),
bias_error.png (error against t) and mixture.png, and prints a table.

    python -m lmc_jax.main --config=configs/testbed.py --workdir=runs/testbed

Measured (full run, 2 CPU cores shared with other jobs): 2633 s, of which 1469 s train the
unconditional b_psi (3000 steps) and 957 s the conditional one (1500 steps); bias_rel_err 0.043,
hf_retention_sds 0.004, hf_retention_lmc_exact 1.000, hf_retention_lmc 0.988, mixture:
target_acc 1 / 1, saturation SDS 1.40 / LMC 0.86, mixture_bias_rel_err 0.40.
Presets: `:quick` (a few hundred b_psi steps, fewer images: for tests and a first look,
~1 minute), `:exact` (part 1 only, ~15 s).

`:manifold` (lmc_jax.apps.manifold): where LMC-SDS differs from CSD. On one Gaussian the exact
b cancels LMC's projection term for every x (LMC = CSD plus zero-mean noise); here the prior is
an exact mixture of six textured classes (prior 'gaussian_patterns', shared-covariance variance
0.02) and LMC runs with the best linear b (closed form), the mixture's own b (Monte Carlo) and a
b_psi learned on samples, from blurred / patched / blended / noise starts, at w = 0 and w = 7.5,
against SDS (w = 0, 7.5, 100) and CSD. Writes metrics.json, manifold.png and a table.

    python -m lmc_jax.main --config=configs/testbed.py:manifold --workdir=runs/manifold

Measured on 2 CPU cores shared with other jobs: b_psi 2000 steps ~11 min, then the 13 runs
~6-12 min (`--config.manifold.learned.bias_path=DIR/bias` reuses a trained b_psi). Results
(seed 0, seed 1 within 0.03): docs/design.md section 4.4 and docs/testbed_manifold.png.

`:manifold_quick`: the same without the learned b_psi, fewer steps (the test's plumbing run).
"""

import ml_collections

from lmc_jax.config import guidance_config, parse_preset, prior_config


def _bias_training(steps: int, conditional: bool) -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict({
        "features": 32, "normalize": True, "center": False, "padding": "CIRCULAR",
        "conditional": conditional,
        "target": "cond" if conditional else "uncond", "antithetic": True,
        "loss_weight": "relative",
        "steps": steps, "batch": 32, "lr": 2e-3, "warmup": 100,
        "bias_path": "",  # reuse a trained b_psi folder instead of training one
    })


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    preset = parse_preset(arg, ["quick", "exact", "manifold", "manifold_quick"], "testbed")
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
    # 3000 steps at lr 3e-3: bias_rel_err 0.043 in the full run (1500 steps at 2e-3 gave
    # 0.085); the conditional mixture b_psi keeps the shorter schedule.
    config.learned = _bias_training(3000, conditional=False)
    config.learned.lr = 3e-3
    config.learned.enabled = True
    config.mixture = _bias_training(1500, conditional=True)
    config.mixture.update({"enabled": True, "num_images": 16, "init_noise": 0.05,
                           "w_sds": 100.0, "w_lmc": 7.5})
    if preset == "quick":
        config.num_images = 4
        config.steps = 60
        config.snapshots = 3
        config.learned.steps = 200
        config.learned.batch = 16
        config.mixture.steps = 200
        config.mixture.batch = 16
        config.mixture.num_images = 8
    if preset.startswith("manifold"):
        return _manifold(preset == "manifold_quick")
    if preset == "exact":
        config.learned.enabled = False
        config.mixture.enabled = False
    return config


def _manifold(quick: bool) -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()
    config.app = "manifold"
    config.seed = 0
    config.prior = prior_config("gaussian_patterns", resolution=32, variance=0.02)
    config.guidance = guidance_config("lmc", weighting="sigma2", t_min=20, t_max=980)
    config.steps = 200
    config.lr = 0.05
    config.manifold = ml_collections.ConfigDict({
        "w_low": 7.5, "w_high": 100.0,
        "blur_cutoff": 3.0,  # blurred starts: Gaussian low-pass at 3 cycles per image
        "noise_std": 0.5,  # noise starts: white noise of this std
        "hf_cutoff": 4.0,  # hf: energy above 4 cycles per image (where the patterns live)
        "post_pairs": 16,  # antithetic pairs of the Monte Carlo E[x_hat | x]
        "settings": ("w0", "wlow"),  # w0: null prompt, w = 0; wlow: class prompt, w_low
    })
    config.manifold.learned = _bias_training(2000, conditional=False)
    config.manifold.learned.lr = 3e-3
    config.manifold.learned.enabled = True
    if quick:
        config.steps = 20
        config.manifold.post_pairs = 2
        config.manifold.learned.enabled = False
    return config
