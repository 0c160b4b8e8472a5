"""A fair ablation of the guidance methods on the embedded prior: image synthesis, 25 prompts.

Every row optimises the same batch (one 32x32 image per prompt of the embedded world: the 25
"a {colour} {shape}" captions of `lmc_jax.data.shapes`, in class order) from the synth app's
default start (grey, `x = 0`) with configs/synth.py:tiny's steps, lr, optimizer, timestep range
and weighting, and the same guidance noise per seed (the synth app's `k_noise`). Rows:

    SDS w=99 (diffusers' guidance_scale 100), SDS w=7.5, CSD w=7.5, NFSD w=7.5,
    LMC-SDS w=7.5 with the shipped b_psi, x_hat from e_c (lmc_xhat='cond') and from e_u
    ('uncond'),

plus two reference rows measured the same way: `real` (two disjoint sets of 25 renders, one per
prompt, of the 'eval_test' split, the "seeds") and `grey` (the start). Figures per
(row, seed), over the 25 images (each image quantised to uint8 as the synth app saves it):

- `both`, `shape`, `colour`: the shipped evaluator's accuracy against the image's prompt
  (`r_precision` in the JSON);
- `denoise`: the prior's own denoising loss with the prompt, per pixel,
  `E_{t, eps} mean_pix (eps_phi(a_t x + s_t eps; y, t) - eps)^2` over t in `T_GRID` and
  `--eps-draws` fixed noises per t (one noise set for every row, drawn from `EPS_SEED`; lower is
  more "on manifold"), and `denoise/real` its ratio to the real renders of the same prompt;
- `FD`: Frechet distance between the evaluator's 64-d penultimate features (ReLU of its hidden
  dense layer) of the 25 images and of `--real-per-prompt` x 25 real renders; with n = 25 < 64
  it is biased upward, so compare with the `real` row (25 held-out renders, same n);
- `HF/real`: energy of the 2-D DFT above `HF_CUTOFF` = 4 cycles per image (image minus its
  mean), over that of the real renders of the same prompt; `colf/real`: Hasler-Suesstrunk
  colourfulness likewise; `sat/real`: lmc_jax.metrics.color's saturation, the norm of the mean
  colour in [-1, 1] (how far the average colour is from mid-grey, so brightness counts too)
  over that of the same prompt's real renders;
- `clip%`: pixels outside [-1, 1] before the image is saved (where the optimiser overshot).

Ratios are per prompt (result over the mean of that prompt's real renders), then averaged.
Each cell is the mean over the 2 seeds +- the std over the seeds' means (ddof 0: half the gap);
the JSON also holds per-seed, per-prompt and per-t values, and each figure's spread over the 25
prompts.

NFSD's negative prompt: configs/synth.py:tiny keeps guidance_config's default ("unrealistic,
blurry, ..."), whose words the embedded prior's closed vocabulary does not know (embedding it
is a UserError, so `synth` with method=nfsd fails on :tiny). The script then uses
`--nfsd-negative` (default "a plain background": the failure mode of this world is an empty
image), checks that it reaches the NFSD call (its gradient at t >= 200 differs from the one
with `neg=None`) and records both in the JSON.

    python benchmarks/ablation.py [--quick] [--seeds 0 1] [--json PATH] [--figure PATH]

writes benchmarks/results/ablation_synth.json and docs/ablation_synth.png (rows: real renders
and the methods, columns: the 25 prompts, seed 0; a green frame where the evaluator reads both
shape and colour right, red where not). `--quick` (2 steps, 2 t values, 1 noise, 1 real render
per prompt; outputs in a temporary folder unless given) checks the plumbing (5 minutes).

Measured cost (`python benchmarks/ablation.py`, 2 CPU cores shared with other jobs, load
average 6-8): 1747 s (29 min) in all; each (method, seed) optimisation (200 steps, batch 25,
compile included) 95-196 s, the real-render references 124 s.

`--world patterned` runs the same rows on the patterned prior (`prior.name=
'embedded_patterned'`, its own b_psi for the LMC rows) with 25 patterned prompts, one per
(shape, colour) in pattern `1 + (shape + colour) mod 3` (`world_classes`), scored by the
patterned world's evaluator, which adds a `pattern` column (the evaluator names the prompt's
pattern); writes benchmarks/results/ablation_patterned.json and docs/ablation_patterned.png.
1090 s on 2 CPU cores shared with one other job.
"""

from __future__ import annotations

import sys

if __name__ == "__main__":
    from lmc_jax import _runtime

    _runtime.maybe_reexec_with_fast_malloc(sys.argv)

import argparse
import functools
import os
import tempfile
import time
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
T_GRID = tuple(int(t) for t in np.linspace(50, 950, 10))
EPS_SEED = 1234
HF_CUTOFF = 4.0
NFSD_NEGATIVE = "a plain background"
# (key, label, guidance overrides on configs/synth.py:tiny's guidance section)
ROWS: tuple[tuple[str, str, dict], ...] = (
    ("sds_w99", "SDS w=99", {"method": "sds", "w": 99.0}),
    ("sds_w7.5", "SDS w=7.5", {"method": "sds", "w": 7.5}),
    ("csd", "CSD w=7.5", {"method": "csd", "w": 7.5}),
    ("nfsd", "NFSD w=7.5", {"method": "nfsd", "w": 7.5}),
    ("lmc_cond", "LMC-SDS cond", {"method": "lmc", "w": 7.5, "bias": "learned",
                                  "bias_path": "embedded", "lmc_xhat": "cond"}),
    ("lmc_uncond", "LMC-SDS uncond", {"method": "lmc", "w": 7.5, "bias": "learned",
                                      "bias_path": "embedded", "lmc_xhat": "uncond"}),
)
FIGURES = ("both", "shape", "colour", "r_precision", "denoise", "denoise_ratio", "fd",
           "hf_ratio", "colf_ratio", "sat_ratio", "clip_frac")


# ----------------------------------------------------------------------------------------------
# Metrics (numpy / JAX; tests/test_ablation.py checks them against closed forms).


def hf_energy(images: np.ndarray, cutoff: float = HF_CUTOFF) -> np.ndarray:
    """Per-pixel energy above `cutoff` cycles per image, [N]: with the orthonormal 2-D DFT `X`
    of each channel of `x - mean(x)`, `sum_{|f| > cutoff} |X_f|^2 / (H W)` summed over channels
    (Parseval: a sinusoid of amplitude A above the cutoff gives A^2 / 2 per channel)."""
    from lmc_jax.priors.gaussian import radial_frequency

    x = np.asarray(images, np.float64)
    x = x - x.mean(axis=(1, 2), keepdims=True)
    xf = np.fft.fft2(x, axes=(1, 2), norm="ortho")
    mask = radial_frequency(x.shape[1], x.shape[2]) > cutoff
    return (np.abs(xf) ** 2 * mask[None, :, :, None]).sum(axis=(1, 2, 3)) / (x.shape[1]
                                                                            * x.shape[2])


@jax.jit
def _denoise_error(prior, x: jax.Array, t: jax.Array, eps: jax.Array, emb: jax.Array
                   ) -> jax.Array:
    """`mean_pix (eps_phi(a_t x + s_t eps; y, t) - eps)^2`, [B] (the prior is a pytree)."""
    from lmc_jax import schedule

    a, s = schedule.alpha_sigma(prior.alphas_cumprod, t)
    pred = prior.eps(schedule.add_noise(x, eps, a, s), t, emb)
    return jnp.mean((pred.astype(jnp.float32) - eps) ** 2, axis=(1, 2, 3))


def denoising_loss(prior, images: np.ndarray, emb: jax.Array, ts: Sequence[int],
                   eps: np.ndarray) -> np.ndarray:
    """The prior's denoising loss per t and image, [T, N]: the mean over pixels and the K noises
    of `(eps_phi(a_t x + s_t eps; y, t) - eps)^2`. `eps` is [T, K, N, H, W, C], `emb` [N, ...]."""
    x = jnp.asarray(images, jnp.float32)
    n, k = x.shape[0], eps.shape[1]
    xs = jnp.tile(x, (k, 1, 1, 1))  # [K N, ...], noise-major
    embs = jnp.tile(emb, (k,) + (1,) * (emb.ndim - 1))
    out = np.zeros((len(ts), n))
    for i, t in enumerate(ts):
        e = jnp.asarray(eps[i], jnp.float32).reshape(k * n, *x.shape[1:])
        err = _denoise_error(prior, xs, jnp.full((k * n,), t, jnp.int32), e, embs)
        out[i] = np.asarray(err).reshape(k, n).mean(axis=0)
    return out


@functools.partial(jax.jit, static_argnums=0)
def _features(module, params, x: jax.Array) -> tuple[jax.Array, tuple[jax.Array, jax.Array]]:
    logits, state = module.apply({"params": params}, x, capture_intermediates=True)
    return jax.nn.relu(state["intermediates"]["Dense_0"]["__call__"][0]), logits


def evaluator_features(evaluator, images: np.ndarray) -> np.ndarray:
    """The evaluator's penultimate features (ReLU of its hidden dense layer), [N, 64]."""
    from lmc_jax.metrics.shapes_eval import _to_input

    x = _to_input(jnp.asarray(images, jnp.float32))
    return np.asarray(_features(evaluator.module, evaluator.params, x)[0], np.float64)


def frechet_distance(a: np.ndarray, b: np.ndarray) -> float:
    """`||mu_a - mu_b||^2 + tr(C_a + C_b - 2 (C_a^1/2 C_b C_a^1/2)^1/2)` of feature sets
    [N, D] and [M, D] (sample covariances, ddof 1)."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    ca, cb = np.atleast_2d(np.cov(a, rowvar=False)), np.atleast_2d(np.cov(b, rowvar=False))
    w, v = np.linalg.eigh(ca)
    root_a = (v * np.sqrt(np.maximum(w, 0.0))) @ v.T
    cross = np.sqrt(np.maximum(np.linalg.eigvalsh(root_a @ cb @ root_a), 0.0)).sum()
    return float(np.sum((a.mean(0) - b.mean(0)) ** 2) + np.trace(ca) + np.trace(cb) - 2 * cross)


# ----------------------------------------------------------------------------------------------
# The experiment.


def world_classes(patterned: bool) -> np.ndarray:
    """The 25 prompts' classes (`shapes.world_class`), in (shape, colour) class order: the plain
    world's 25, or in the patterned world each (shape, colour) once, in pattern
    `1 + (shape + colour) mod 3` (striped, checkered, dotted: 8 or 9 prompts each; a Latin
    square, so every shape and every colour meets every pattern)."""
    from lmc_jax.data import shapes

    s, c = shapes.class_of(np.arange(shapes.NUM_CLASSES))
    pattern = 1 + (s + c) % 3 if patterned else np.zeros_like(s)
    return shapes.world_class(s, c, pattern)


def prompts_of_the_world(patterned: bool = False) -> list[str]:
    """The 25 prompts "a {colour} {shape}" (patterned: "a {colour} {pattern} {shape}", patterns
    from `world_classes`), in class order (`shapes.class_of(0..24)`)."""
    from lmc_jax.data import shapes

    n = shapes.NUM_CLASSES
    return [shapes.caption(*map(int, shapes.class_of(k % n)), pattern=int(k // n))
            for k in world_classes(patterned)]


def real_renders(per_prompt: int, offset: int, patterned: bool = False) -> np.ndarray:
    """[per_prompt, 25, H, W, 3] 'eval_test' renders in [-1, 1] of the 25 prompts' classes:
    replicate r of class k is example `k + P (offset + r)` (P = 25, or 100 in the patterned
    world; disjoint offsets give disjoint sets)."""
    from lmc_jax.data import shapes

    classes = world_classes(patterned)
    period = shapes.NUM_CLASSES * (len(shapes.PATTERNS) if patterned else 1)
    idx = (classes[None, :] + period * (offset + np.arange(per_prompt))[:, None]).ravel()
    u8 = shapes.render(0, "eval_test", idx, chunk=max(1, len(idx) // len(shapes.SHAPES)),
                       patterned=patterned)
    return (u8.astype(np.float32) / 127.5 - 1.0).reshape(per_prompt, len(classes),
                                                          *u8.shape[1:])


def quantise(images: np.ndarray) -> np.ndarray:
    """As the synth app saves them: clipped to [-1, 1], uint8, back to float."""
    from lmc_jax import io

    return io.to_uint8(np.asarray(images)).astype(np.float32) / 127.5 - 1.0


def guidance_for(base, overrides: dict):
    """A copy of `base` (configs/synth.py:tiny's guidance) with `overrides`."""
    g = base.copy_and_resolve_references()
    for k, v in overrides.items():
        g[k] = v
    return g


def resolve_negative(prior, gcfg, fallback: str) -> tuple[str, str]:
    """(NFSD's negative prompt, note): the config's if the prior can embed it, else `fallback`."""
    from lmc_jax.errors import UserError

    try:
        prior.embed_text([gcfg.negative_prompt])
        return gcfg.negative_prompt, "the config's guidance.negative_prompt"
    except UserError as e:
        return fallback, (f"the config's negative prompt {gcfg.negative_prompt!r} is not in the "
                          f"embedded prior's vocabulary ({str(e).split(';')[0]}); used "
                          f"--nfsd-negative {fallback!r}")


def check_negative_reaches_nfsd(prior, fn, hp, cond, x0) -> float:
    """Relative change of NFSD's gradient at t = 500 when `cond.neg` is dropped: > 0 iff the
    negative prompt reaches the guidance (delta_D = e_u - e_neg for t >= 200)."""
    n = x0.shape[0]
    t = jnp.full((n,), 500, jnp.int32)
    eps = jax.random.normal(jax.random.PRNGKey(7), x0.shape)
    g_neg = fn(prior, x0, t, eps, cond, hp).grad
    g_none = fn(prior, x0, t, eps, cond.replace(neg=None), hp).grad
    return float(jnp.linalg.norm(g_neg - g_none) / jnp.linalg.norm(g_none))


class Measure:
    """Per-image figures of a batch of 25 images (one per prompt) against fixed references."""

    def __init__(self, prior, prompts: list[str], evaluator, ref: np.ndarray, ts: Sequence[int],
                 eps_draws: int):
        from lmc_jax.metrics import color

        self.prior, self.prompts, self.evaluator, self.ts = prior, prompts, evaluator, list(ts)
        self.emb = prior.embed_text(prompts)
        n = len(prompts)
        self.eps = np.asarray(jax.random.normal(jax.random.PRNGKey(EPS_SEED),
                                                (len(ts), eps_draws, n, *prior.x_shape)))
        r = ref.shape[0]
        flat = ref.reshape(r * n, *ref.shape[2:])  # replicate-major: image j is prompt j % n
        self.ref_denoise = np.stack([self._denoise(ref[i]) for i in range(r)]).mean(0)  # [T, n]
        self.ref_hf = hf_energy(flat).reshape(r, n).mean(0)
        self.ref_colf = np.asarray(color.colorfulness(flat)).reshape(r, n).mean(0)
        self.ref_colour = ref.mean(axis=(0, 2, 3))  # [n, 3]
        self.ref_features = evaluator_features(evaluator, flat)

    def _denoise(self, images: np.ndarray) -> np.ndarray:
        return denoising_loss(self.prior, images, self.emb, self.ts, self.eps)

    def __call__(self, images: np.ndarray, clip_frac: float = 0.0) -> dict:
        from lmc_jax.metrics import color, shapes_eval

        labels = np.asarray([shapes_eval.parse_prompt(p) for p in self.prompts])
        ps, pc = self.evaluator.probs(images)
        shape_ok = ps.argmax(-1) == labels[:, 0]
        colour_ok = pc.argmax(-1) == labels[:, 1]
        per_t = self._denoise(images)  # [T, n]
        per_image = {
            "both": (shape_ok & colour_ok).astype(float),
            "shape": shape_ok.astype(float),
            "colour": colour_ok.astype(float),
            "denoise": per_t.mean(0),
            "denoise_ratio": per_t.mean(0) / self.ref_denoise.mean(0),
            "hf_ratio": hf_energy(images) / self.ref_hf,
            "colf_ratio": np.asarray(color.colorfulness(images)) / self.ref_colf,
            "sat_ratio": np.asarray(color.saturation_per_image(images, self.ref_colour)),
        }
        if self.evaluator.module.pattern_head:  # the patterned world's evaluator
            want = np.asarray([shapes_eval.parse_pattern(p) for p in self.prompts])
            per_image["pattern"] = (self.evaluator.pattern_probs(images).argmax(-1)
                                    == want).astype(float)
        out = {k: float(np.mean(v)) for k, v in per_image.items()}
        out["r_precision"] = shapes_eval.r_precision(self.evaluator, images, self.prompts)
        out["fd"] = frechet_distance(evaluator_features(self.evaluator, images),
                                     self.ref_features)
        out["clip_frac"] = float(clip_frac)
        out["denoise_per_t"] = per_t.mean(1).tolist()
        out["per_prompt"] = {k: np.round(v, 5).tolist() for k, v in per_image.items()}
        return out


def optimise(prior, prompts: list[str], config, gcfg, seed: int, negative: str | None,
             ) -> tuple[np.ndarray, float, dict]:
    """One synth optimisation of the 25-image batch; returns (raw images, seconds, extra)."""
    from lmc_jax.apps.optimize import make_optimizer, optimize_x
    from lmc_jax.guidance import Conditioning
    from lmc_jax.guidance.from_config import build_guidance, guidance_record

    n = len(prompts)
    fn, hp = build_guidance(prior, gcfg)
    neg = prior.embed_text([negative] * n) if gcfg.method == "nfsd" else None
    cond = Conditioning(c=prior.embed_text(prompts), u=prior.embed_text([""] * n), neg=neg)
    _, k_noise = jax.random.split(jax.random.PRNGKey(seed))  # the synth app's keys
    x0 = prior.encode(jnp.zeros((n, *prior.image_shape)))  # init 'grey'
    extra = {}
    if gcfg.method == "nfsd":
        extra["nfsd_neg_effect"] = check_negative_reaches_nfsd(prior, fn, hp, cond, x0)
        if not extra["nfsd_neg_effect"] > 0:
            raise SystemExit("NFSD's negative prompt does not reach the guidance")
    start = time.time()
    x, _, scalars = optimize_x(
        prior, x0, cond, guidance_record(prior, gcfg, config.steps), steps=config.steps,
        optimizer=make_optimizer(config.optimizer, config.lr), key=k_noise,
        log_every=config.log_every, desc=f"{gcfg.method} w={gcfg.w} seed {seed}")
    images = np.asarray(prior.decode(x))
    extra["final_scalars"] = scalars
    return images, time.time() - start, extra


def cell(values: Sequence[float], digits: int) -> str:
    """'mean+-std' over seeds (ddof 0); the value alone for one seed."""
    v = np.asarray(values, float)
    if not np.all(np.isfinite(v)):
        return "n/a"
    if v.size == 1:
        return f"{v[0]:.{digits}f}"
    return f"{v.mean():.{digits}f}±{v.std():.{digits}f}"


COLUMNS = (("both", "both", 2), ("shape", "shape", 2), ("colour", "colour", 2),
           ("denoise", "denoise", 4), ("denoise_ratio", "denoise/real", 2), ("fd", "FD", 1),
           ("hf_ratio", "HF/real", 2), ("colf_ratio", "colf/real", 2),
           ("sat_ratio", "sat/real", 2), ("clip_frac", "clip%", 1))


def table(results: dict, labels: dict) -> str:
    from lmc_jax import io

    rows = []
    first = next(iter(next(iter(results.values()))["seeds"].values()))
    columns = COLUMNS[:3] + ((("pattern", "pattern", 2),) if "pattern" in first else ()) \
        + COLUMNS[3:]
    for key, res in results.items():
        runs = list(res["seeds"].values())
        row = [labels[key]]
        for name, _, digits in columns:
            vals = [r[name] * (100 if name == "clip_frac" else 1) for r in runs]
            row.append(cell(vals, digits))
        secs = [r.get("seconds", 0.0) for r in runs]
        row.append(f"{np.mean(secs):.0f}" if any(secs) else "-")
        rows.append(row)
    return io.format_table(rows, ["row", *(c[1] for c in columns), "s/run"])


def summarise(res: dict) -> None:
    """Adds mean, std over seeds and the spread over prompts of every figure to `res`."""
    runs = list(res["seeds"].values())
    figures = FIGURES + (("pattern",) if "pattern" in runs[0] else ())
    res["mean"] = {k: float(np.mean([r[k] for r in runs])) for k in figures}
    res["std_over_seeds"] = {k: float(np.std([r[k] for r in runs])) for k in figures}
    res["std_over_prompts"] = {
        k: float(np.std(np.mean([r["per_prompt"][k] for r in runs], axis=0)))
        for k in runs[0]["per_prompt"]}


def figure(path: str, prompts: list[str], rows: list[tuple[str, np.ndarray, np.ndarray]],
           world: str = "Embedded prior") -> None:
    """Rows of 25 images (label, images [25, H, W, 3] in [-1, 1], evaluator hits [25])."""
    titles = [" ".join(p.split()[1:-1]) + "\n" + p.split()[-1] for p in prompts]
    grid_figure(path, titles, rows, f"{world}, {len(prompts)} prompts, seed 0 (frame: evaluator "
                "reads shape and colour right = green)")


def grid_figure(path: str, titles: list[str], rows: list[tuple[str, np.ndarray, np.ndarray | None]],
                suptitle: str, cell: tuple[float, float] = (0.72, 0.86),
                margin: float = 1.2) -> None:
    """A grid of images, one row per (label, images [n, H, W, 3] in [-1, 1], hits [n] or None),
    framed green/red by `hits` (grey without), column titles on the first row."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from lmc_jax import io

    n = len(titles)
    fig, axes = plt.subplots(len(rows), n, figsize=(cell[0] * n + margin,
                                                    cell[1] * len(rows) + 0.5), squeeze=False)
    for i, (label, images, hits) in enumerate(rows):
        for j in range(n):
            ax = axes[i, j]
            ax.imshow(io.to_uint8(images[j]), interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            for spine in ax.spines.values():
                spine.set_color("0.6" if hits is None else
                                ("tab:green" if hits[j] else "tab:red"))
                spine.set_linewidth(2.0)
            if i == 0:
                ax.set_title(titles[j], fontsize=7)
            if j == 0:
                ax.set_ylabel(label, fontsize=7, rotation=0, ha="right", va="center")
    fig.suptitle(suptitle, fontsize=8)
    fig.tight_layout(pad=0.3, w_pad=0.1, h_pad=0.2)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="plumbing run (minutes)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--rows", nargs="+", default=[r[0] for r in ROWS],
                        choices=[r[0] for r in ROWS])
    parser.add_argument("--eps-draws", type=int, default=4, help="noises per t (denoise)")
    parser.add_argument("--real-per-prompt", type=int, default=8,
                        help="real renders per prompt (references)")
    parser.add_argument("--nfsd-negative", default=NFSD_NEGATIVE,
                        help="NFSD's negative prompt if the config's is not embeddable")
    parser.add_argument("--world", default="plain", choices=["plain", "patterned"],
                        help="patterned: the patterned prior (prior.name='embedded_patterned') "
                             "and 25 patterned prompts (`world_classes`)")
    parser.add_argument("--json", default="")
    parser.add_argument("--figure", default="")
    args = parser.parse_args()

    from lmc_jax import io
    from lmc_jax.config import load_config
    from lmc_jax.metrics import shapes_eval
    from lmc_jax.priors.factory import build_prior

    start = time.time()
    config = load_config(os.path.join(ROOT, "configs", "synth.py"), "tiny")
    ts, draws, per_prompt = T_GRID, args.eps_draws, args.real_per_prompt
    out_dir = tempfile.mkdtemp(prefix="ablation_") if args.quick else ""
    if args.quick:
        config.steps, config.log_every = 2, 1
        ts, draws, per_prompt = (T_GRID[1], T_GRID[-2]), 1, 1
    patterned = args.world == "patterned"
    stem = "ablation_patterned" if patterned else "ablation_synth"
    json_path = args.json or (os.path.join(out_dir, f"{stem}.json") if args.quick else
                              os.path.join(ROOT, "benchmarks", "results", f"{stem}.json"))
    fig_path = args.figure or (os.path.join(out_dir, f"{stem}.png") if args.quick else
                               os.path.join(ROOT, "docs", f"{stem}.png"))

    if patterned:
        config.prior.name = "embedded_patterned"
    prior = build_prior(config.prior)
    prompts = prompts_of_the_world(patterned)
    evaluator = shapes_eval.load_shipped_evaluator(config.prior.name)
    negative, neg_note = resolve_negative(prior, config.guidance, args.nfsd_negative)
    print(f"NFSD negative prompt: {negative!r} ({neg_note})", flush=True)
    ref = real_renders(per_prompt, offset=0, patterned=patterned)
    held_out = real_renders(len(args.seeds), offset=per_prompt,  # the `real` row's "seeds"
                            patterned=patterned)
    measure = Measure(prior, prompts, evaluator, ref, ts, draws)
    print(f"references ready ({time.time() - start:.0f} s)", flush=True)

    labels = {"real": "real renders", "grey": "grey init", **{k: lab for k, lab, _ in ROWS}}
    results: dict = {"real": {"seeds": {}}, "grey": {"seeds": {}}}
    shown = {}
    for i, s in enumerate(args.seeds):
        results["real"]["seeds"][str(s)] = measure(held_out[i])
    shown["real"] = held_out[0]
    grey = quantise(np.zeros((len(prompts), *prior.image_shape), np.float32))
    results["grey"]["seeds"] = {str(s): measure(grey) for s in args.seeds[:1]}
    for key, _, overrides in ROWS:
        if key not in args.rows:
            continue
        gcfg = guidance_for(config.guidance, overrides)
        res = results[key] = {"guidance": gcfg.to_dict(), "seeds": {}}
        if gcfg.method == "nfsd":
            res["guidance"]["negative_prompt"] = negative
        for s in args.seeds:
            raw, secs, extra = optimise(prior, prompts, config, gcfg, s, negative)
            images = quantise(raw)
            m = measure(images, clip_frac=float(np.mean(np.abs(raw) > 1.0)))
            m.update(seconds=secs, **extra)
            res["seeds"][str(s)] = m
            if s == args.seeds[0]:
                shown[key] = images
            print(f"{labels[key]} seed {s}: both {m['both']:.2f} denoise {m['denoise']:.4f} "
                  f"HF/real {m['hf_ratio']:.2f} ({secs:.0f} s)", flush=True)
    for res in results.values():
        summarise(res)

    text = table(results, labels)
    print(text)
    total = time.time() - start
    out = {
        "command": "python " + " ".join(sys.argv), "seconds": total, "prompts": prompts,
        "world": args.world, "prior": config.prior.name,
        "seeds": args.seeds, "steps": config.steps, "lr": config.lr,
        "optimizer": config.optimizer, "init": config.init, "t_grid": list(ts),
        "eps_draws": draws, "eps_seed": EPS_SEED, "real_per_prompt": per_prompt,
        "hf_cutoff": HF_CUTOFF, "nfsd_negative_prompt": negative, "nfsd_negative_note": neg_note,
        "real_reference_denoise_per_t": measure.ref_denoise.mean(1).tolist(),
        "devices": str(jax.devices()), "load_average": list(os.getloadavg()),
        "table": text, "results": results,
    }
    io.write_json(json_path, out)
    hits = {k: np.asarray(results[k]["seeds"][str(args.seeds[0])]["per_prompt"]["both"]) > 0.5
            for k in shown}
    figure(fig_path, prompts, [(labels[k], shown[k], hits[k]) for k in shown],
           "Patterned embedded prior" if patterned else "Embedded prior")
    print(f"wrote {json_path} and {fig_path} ({total:.0f} s)")


if __name__ == "__main__":
    main()
