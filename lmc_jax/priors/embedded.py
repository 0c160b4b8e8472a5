"""The embedded prior: a small pixel-space text-to-image diffusion model trained by lmc_jax.

It is a diffusers pipeline without a VAE, read by the same loader as real Stable Diffusion
(`lmc_jax.priors.sd.load_stable_diffusion`): `FlaxUNet2DConditionModel` on 32x32 RGB images in
[-1, 1] (`UNET`), a 2-layer `FlaxCLIPTextModel` (`TEXT`) and a word-level CLIP tokenizer whose
vocabulary is exactly the words of the training captions (`lmc_jax.data.shapes.vocabulary`), so
an unknown word is an error listing the vocabulary instead of a silent guess. The DDPM schedule
is linear (betas 1e-4..0.02, 1000 steps; `SCHEDULER`), as usual for pixel-space models: SD's
scaled-linear schedule leaves 7% of the signal at t = T, which a 32x32 pixel model would see as
colour leaking through the noise.

`configs/train_prior.py` trains it on `lmc_jax.data.shapes` and writes the folder; the copy
shipped with lmc_jax lives in `lmc_jax/assets/embedded_prior/` (fp16 msgpack weights, a few MB),
with its b_psi in `bias/` and the shape-and-colour evaluator in `evaluator/`.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax
import numpy as np

from lmc_jax import _compat
from lmc_jax.errors import UserError
from lmc_jax.priors.base import Prior

BOS_TOKEN = "<|startoftext|>"
EOS_TOKEN = "<|endoftext|>"
MAX_TOKENS = 16

UNET = dict(
    sample_size=32,
    in_channels=3,
    out_channels=3,
    down_block_types=("DownBlock2D", "DownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "UpBlock2D", "UpBlock2D"),
    block_out_channels=(32, 32, 64),
    layers_per_block=1,
    cross_attention_dim=64,
    attention_head_dim=8,
)
TEXT = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    max_position_embeddings=MAX_TOKENS,
)
SCHEDULER = {
    "_class_name": "FlaxDDPMScheduler",
    "beta_schedule": "linear",
    "beta_start": 0.0001,
    "beta_end": 0.02,
    "num_train_timesteps": 1000,
    "prediction_type": "epsilon",
    "clip_sample": False,
    "trained_betas": None,
}


# prior.name -> the shipped pipeline folder under lmc_jax/assets/.
SHIPPED = {"embedded": "embedded_prior", "embedded_patterned": "patterned_prior"}


def embedded_path(name: str = "embedded") -> Path:
    """The shipped pipeline folder of `name` (`SHIPPED`): `lmc_jax/assets/embedded_prior/`, or
    `patterned_prior/` (the patterned world, configs/train_prior.py:patterned)."""
    if name not in SHIPPED:
        raise UserError(f"no shipped prior {name!r}; choose one of {list(SHIPPED)}")
    return Path(__file__).resolve().parent.parent / "assets" / SHIPPED[name]


def write_word_tokenizer(directory: str | os.PathLike, words: Sequence[str],
                         model_max_length: int = MAX_TOKENS) -> Path:
    """A CLIPTokenizer folder whose tokens are exactly `words` (plus BOS/EOS).

    Each word gets merges that join its characters left to right (`r e`, `re d</w>`), so CLIP's
    BPE turns a known word into its one token; the vocabulary holds only whole words, so
    anything else tokenizes to pieces that `closed_vocabulary_check` reports. Raises ValueError
    if two words' merges interfere (a word would not come out as one token).
    """
    words = sorted(set(words))
    vocab = {f"{w}</w>": i for i, w in enumerate(words)}
    vocab[BOS_TOKEN] = len(vocab)
    vocab[EOS_TOKEN] = len(vocab)
    merges: dict[tuple[str, str], None] = {}
    for w in words:
        chars = list(w[:-1]) + [w[-1] + "</w>"]
        left = chars[0]
        for c in chars[1:]:
            merges[(left, c)] = None
            left = left + c
    # Another word's merge can fire inside a word first ('p l' of 'plain' inside 'purple');
    # appending the merge of the stuck pieces (lowest priority) completes it without
    # changing words that already complete.
    for _ in range(100):
        stuck = [pieces for w in words if len(pieces := _bpe(w, merges)) > 1]
        if not stuck:
            break
        for pieces in stuck:
            merges[(pieces[0], pieces[1])] = None
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    specials = {"bos_token": BOS_TOKEN, "eos_token": EOS_TOKEN, "pad_token": EOS_TOKEN,
                "unk_token": EOS_TOKEN}
    config = {"tokenizer_class": "CLIPTokenizer", "model_max_length": int(model_max_length),
              "do_lower_case": True, "errors": "replace", "add_prefix_space": False, **specials}
    (out / "vocab.json").write_text(json.dumps(vocab, indent=1) + "\n")
    (out / "merges.txt").write_text(
        "#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2, sort_keys=True))
    (out / "special_tokens_map.json").write_text(json.dumps(specials, indent=2, sort_keys=True))
    tokenizer = _compat.transformers().CLIPTokenizer.from_pretrained(str(out))
    for w in words:
        pieces = tokenizer.tokenize(w)
        if pieces != [f"{w}</w>"]:
            raise ValueError(f"word {w!r} tokenizes to {pieces}, not one token")
    return out


def _bpe(word: str, merges: dict[tuple[str, str], None]) -> list[str]:
    """CLIP's BPE of one word: repeatedly merge the present pair with the lowest merge rank."""
    rank = {m: i for i, m in enumerate(merges)}
    pieces = list(word[:-1]) + [word[-1] + "</w>"]
    while len(pieces) > 1:
        pairs = [(rank.get((a, b), len(rank)), i) for i, (a, b) in
                 enumerate(zip(pieces, pieces[1:], strict=False))]
        best, i = min(pairs)
        if best == len(rank):
            break
        pieces[i:i + 2] = [pieces[i] + pieces[i + 1]]
    return pieces


def new_modules(tokenizer_dir: str | os.PathLike) -> tuple[Any, Any, Any]:
    """(unet, text_encoder, tokenizer) of the embedded architecture (modules only, no weights)."""
    d, tr = _compat.diffusers(), _compat.transformers()
    tokenizer = tr.CLIPTokenizer.from_pretrained(str(tokenizer_dir))
    unet = d.FlaxUNet2DConditionModel(**UNET)
    text_config = tr.CLIPTextConfig(
        vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, **TEXT)
    text_encoder = tr.FlaxCLIPTextModel(text_config, _do_init=False)
    return unet, text_encoder, tokenizer


def init_params(unet: Any, text_encoder: Any, seed: int) -> dict[str, Any]:
    """Random {'unet', 'text_encoder'} weights (Flax-default-like, numpy, deterministic)."""
    from lmc_jax.priors.sd import _random_params

    key = jax.random.PRNGKey(0)  # only shapes are read
    return {
        "unet": _random_params(jax.eval_shape(unet.init_weights, key), seed, 0),
        "text_encoder": _random_params(text_encoder.params_shape_tree, seed, 2),
    }


def scheduler_config(prediction_type: str = "epsilon") -> dict[str, Any]:
    """`SCHEDULER` for a model that predicts `prediction_type` ('epsilon' or 'v_prediction')."""
    return {**SCHEDULER, "prediction_type": prediction_type}


def save_pipeline(directory: str | os.PathLike, unet: Any, text_encoder: Any, tokenizer: Any,
                  params: dict[str, Any], dtype: str = "float16",
                  prediction_type: str = "epsilon") -> Path:
    """Writes the VAE-less diffusers folder (model_index.json has `"vae": [null, null]`).

    `dtype='float16'` halves the files; the loader casts weights back to the prior's dtype.
    """
    from lmc_jax.priors import sd

    cast = jax.tree_util.tree_map(lambda x: np.asarray(x, np.dtype(dtype)), params)
    return sd.save_pipeline(directory, unet, None, text_encoder, tokenizer, cast,
                            scheduler_config(prediction_type))


def embedded_prior(dtype: str = "float32", path: str | os.PathLike | None = None,
                   attention: str = "late_norm") -> Prior:
    """The shipped embedded prior (or the pipeline at `path`), via the Stable Diffusion loader."""
    from lmc_jax.priors.sd import load_stable_diffusion

    folder = Path(path) if path else embedded_path()
    if not (folder / "unet").is_dir():
        raise UserError(
            f"the embedded prior is not in {folder}; train it with `python -m lmc_jax.main "
            f"--config=configs/train_prior.py --workdir=runs/prior` and pass "
            f"--config.prior.path=runs/prior/prior")
    prior = load_stable_diffusion(str(folder), dtype=dtype, attention=attention)
    return prior.replace(name=f"embedded({folder.name},{dtype})")
