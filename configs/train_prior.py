"""Trains the embedded text-to-image prior (lmc_jax.priors.embedded) on rendered shapes.

    python -m lmc_jax.main --config=configs/train_prior.py --workdir=runs/prior

Renders the 'train' split of lmc_jax.data.shapes once (16k images, about 4 minutes on 2 CPU
cores, cached in WORKDIR/data), then trains the 1.1M-parameter pixel UNet and the text encoder.
Measured on 2 CPU cores: 0.55-1.0 s per step at batch 32. Resumable: run the same command again
after an interruption. The result, WORKDIR/prior, is what ships in
lmc_jax/assets/embedded_prior/ (copy it there, next to bias/ and evaluator/), or pass it as
--config.prior.path to any app with prior.name='embedded'.

The shipped weights, in two stages (both measured on 2 CPU cores):
1. an eps-prediction model: `--config.prediction_type=epsilon --config.steps=2000` (2059 s),
   then the same command with `--config.steps=3500` (another 1473 s; the cosine schedule
   restarts from the longer horizon). Its DDIM samples score only 0.12 with the evaluator:
   right object colours, wrong colourful backgrounds (see lmc_jax/apps/train_prior.py on why).
2. fine-tuned to v-prediction in a new workdir: `--config.init_from=RUN1/prior
   --config.steps=3000` (1918 s). Its DDIM samples (50 steps, w = 2, two per prompt) score 1.0
   with the evaluator over all 25 shape-colour prompts (samples.png, copied to
   docs/embedded_prior_samples.png).

Parallelism: each batch is split over all devices (`batch` must be a multiple of their number);
the model is small and replicated on each.

The patterned world (`:patterned`): the same shapes and colours with a surface pattern named in
the caption (plain, striped, checkered, dotted: "a red striped ball"; lmc_jax.data.shapes),
detail a blur destroys. The preset fine-tunes the shipped prior (`init_from='embedded'`; the
token embeddings of known words are kept, the new words start fresh) on 16k patterned renders:

    python -m lmc_jax.main --config=configs/train_prior.py:patterned --workdir=runs/patterned

Its result ships in lmc_jax/assets/patterned_prior/ (`prior.name='embedded_patterned'`).
Measured on 2 CPU cores shared with other jobs (2026-12-06): rendering 6 min, 2500 steps 31
min (0.75 s/step). Its DDIM samples (50 steps, w = 2, two per prompt, 200 in all) score 1.0
on shape and colour and 0.76 on the pattern with the patterned evaluator (striped 0.44, read
as checkered half the time; plain 0.88, checkered 0.94, dotted 0.78).

Presets: `:quick` (a few steps on a few images, for tests), `:patterned`.
"""

import ml_collections

from lmc_jax.config import parse_preset


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    preset = parse_preset(arg, ["quick", "patterned"], "train_prior")
    c = ml_collections.ConfigDict()
    c.app = "train_prior"
    c.seed = 0
    c.data = ml_collections.ConfigDict({"num_train": 16000, "resolution": 32, "cache_dir": "",
                                         "patterned": False})
    c.steps = 3000
    c.batch = 32
    c.lr = 1e-3
    c.warmup = 200
    c.ema = 0.999
    c.prediction_type = "v_prediction"  # or 'epsilon' (see lmc_jax/apps/train_prior.py)
    c.init_from = ""  # a prior folder ('embedded': the shipped one) to fine-tune from
    c.cond_dropout = 0.1  # probability of training on the empty caption (for CFG)
    c.sample = ml_collections.ConfigDict({"w": 2.0, "steps": 50, "per_class": 2})
    c.log_every = 50
    c.checkpoint_every = 250
    c.keep_checkpoints = 2
    if preset == "patterned":
        c.data.patterned = True
        c.init_from = "embedded"
        c.steps = 2500
        c.sample.per_class = 1
    if preset == "quick":
        c.data.num_train = 64
        c.steps = 4
        c.batch = 8
        c.warmup = 1
        c.sample.steps = 2
        c.sample.per_class = 1
        c.log_every = 2
        c.checkpoint_every = 2
    return c
