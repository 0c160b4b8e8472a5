"""Trains the embedded text-to-image prior on rendered shapes (configs/train_prior.py).

The model (`lmc_jax.priors.embedded`): diffusers' `FlaxUNet2DConditionModel` on 32x32 RGB pixels
and a 2-layer `FlaxCLIPTextModel` on a word-level tokenizer, trained jointly with the DDPM loss

    L = E_{x, y, t, eps} || f_phi(a_t x + s_t eps; enc(y), t) - target ||^2,

t uniform in [0, T), the caption `y` a random template of the example's (shape, colour), and
replaced by the empty caption with probability `cond_dropout` (so classifier-free guidance has
an unconditional model). The target is `eps` (`prediction_type='epsilon'`) or the velocity
`v = a_t eps - s_t x` (`'v_prediction'`, Salimans & Ho 2022). With `eps`, the denoised estimate
`x_hat = (x_t - s_t eps_hat) / a_t` multiplies the network's error by `s_t / a_t` (about 6 at
t = 600, 150 at t = 999), so a small model never learns the global colour of its samples; with
`v`, `x_hat = a_t x_t - s_t v_hat` and the error is never amplified. The exported weights are an
exponential moving average (`ema`). `init_from` starts from a trained prior's weights (a
fine-tune, e.g. from an `epsilon` model to `v_prediction`).

Parallelism: each batch (images and caption ids, `batch` a multiple of the mesh's `data` axis)
is split over `data`; the trained weights, their EMA and the optimizer state are replicated
(the model is small: no `model` axis). Only process 0 writes outputs.

Outputs in the workdir: checkpoints/ (resumable, like every app), prior/ (the diffusers folder
to copy into lmc_jax/assets/embedded_prior/ or pass as prior.path), samples.png (DDIM samples,
one row per colour, one column per shape), metrics.json (loss, train time, and the evaluator's
accuracy on the samples when an evaluator is available).
"""

from __future__ import annotations

import json
import logging
import os
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import traverse_util

from lmc_jax import io, parallel
from lmc_jax.config import require_positive
from lmc_jax.data import shapes
from lmc_jax.errors import UserError
from lmc_jax.loop import TrainState, init_train_state
from lmc_jax.loop import train as train_loop
from lmc_jax.priors import embedded
from lmc_jax.priors.sampling import ddim_sample
from lmc_jax.priors.sd import PREDICTION_TYPES, alphas_cumprod_from_config, make_sd_prior

FIXED_KEYS = ("seed", "data.", "batch", "prediction_type", "init_from")


def caption_table(tokenizer: Any, patterned: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Token ids of every caption variant per class [C, V, L] (C = 25, or 100 in the patterned
    world, indexed by `shapes.world_class`) and of the empty caption [L].

    Classes with fewer variants (one shape word) repeat theirs, so each class has V entries.
    """
    per_class: dict[int, list[str]] = {}
    for text, s, c, p in shapes.world_captions(patterned):
        per_class.setdefault(shapes.world_class(s, c, p), []).append(text)
    v = max(len(t) for t in per_class.values())
    rows = [(per_class[k] * v)[:v] for k in range(len(per_class))]
    enc = lambda texts: tokenizer(texts, padding="max_length",  # noqa: E731
                                  max_length=embedded.MAX_TOKENS, truncation=True,
                                  return_tensors="np").input_ids
    table = np.stack([enc(r) for r in rows]).astype(np.int32)
    return table, enc([""])[0].astype(np.int32)


def make_train_step(unet: Any, text_encoder: Any, opt: optax.GradientTransformation,
                    alphas_cumprod: jax.Array, ema: float, cond_dropout: float,
                    prediction_type: str = "epsilon", mesh: jax.sharding.Mesh | None = None):
    """`step(state, key, images [B,H,W,3] in [-1,1], ids [B,L], null_ids [L]) -> (state, loss)`
    on `mesh` (default: all devices): `images`, `ids` split over `data`, the rest replicated.
    `state.extra` holds the EMA of the weights."""
    mesh = mesh if mesh is not None else parallel.make_mesh()

    def loss_fn(params, key, images, ids, null_ids):
        b = images.shape[0]
        k_t, k_eps, k_drop = jax.random.split(key, 3)
        t = jax.random.randint(k_t, (b,), 0, alphas_cumprod.shape[0])
        eps = jax.random.normal(k_eps, images.shape)
        drop = jax.random.uniform(k_drop, (b,)) < cond_dropout
        t, eps, drop = parallel.constrain_batch((t, eps, drop), mesh)
        ids = jnp.where(drop[:, None], null_ids[None], ids)
        emb = text_encoder(ids, params=params["text_encoder"]).last_hidden_state
        a = jnp.sqrt(alphas_cumprod[t])[:, None, None, None]
        s = jnp.sqrt(1.0 - alphas_cumprod[t])[:, None, None, None]
        x_t = a * images + s * eps
        target = eps if prediction_type == "epsilon" else a * eps - s * images
        out = unet.apply({"params": params["unet"]}, jnp.transpose(x_t, (0, 3, 1, 2)), t,
                         emb).sample
        return jnp.mean((jnp.transpose(out, (0, 2, 3, 1)) - target) ** 2)

    def step(state: TrainState, key, images, ids, null_ids):
        images, ids = parallel.constrain_batch((images, ids), mesh)
        loss, grads = jax.value_and_grad(loss_fn)(state.params, key, images, ids, null_ids)
        updates, opt_state = opt.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        # EMA with warm-up: decay min(ema, (1 + n) / (10 + n)).
        n = state.step.astype(jnp.float32)
        d = jnp.minimum(ema, (1.0 + n) / (10.0 + n))
        new_ema = jax.tree_util.tree_map(lambda e, p: d * e + (1 - d) * p, state.extra, params)
        return state.replace(step=state.step + 1, params=params, opt_state=opt_state,
                             extra=new_ema), {"loss": loss}

    rep, data = parallel.replicated(mesh), parallel.batch_sharding(mesh)
    jitted = parallel.jit_step(step, mesh, [rep, data, data, rep])

    def step_fn(state: TrainState, key, images, ids, null_ids):
        images, ids = parallel.shard_batch((images, ids), mesh)
        return jitted(state, key, images, ids, null_ids)

    return step_fn


def sample_grid(prior, key: jax.Array, w: float, steps: int, per_class: int = 1,
                patterned: bool = False):
    """DDIM samples for every 'a {colour} {shape}' prompt (and its patterned versions):
    (uint8 [C*per_class,...], prompts), prompts ordered pattern, colour, shape."""
    prompts = [shapes.caption(s, c, pattern=p)
               for p in range(len(shapes.PATTERNS) if patterned else 1)
               for c in range(len(shapes.COLOURS)) for s in range(len(shapes.SHAPES))]
    prompts = [p for p in prompts for _ in range(per_class)]
    emb_c = prior.embed_text(prompts)
    emb_u = prior.embed_text([""])
    x = ddim_sample(prior, emb_c, emb_u, key, w=w, num_steps=steps)
    return np.asarray(io.to_uint8(np.asarray(x))), prompts


def remap_token_embedding(loaded: np.ndarray, fresh: np.ndarray, old_vocab: dict[str, int],
                          new_vocab: dict[str, int]) -> np.ndarray:
    """The token-embedding matrix for `new_vocab` [V_new, D]: each token's row from `loaded`
    (indexed by `old_vocab`) where the old tokenizer has the token, else its `fresh` row. The
    word tokenizer's ids follow the sorted vocabulary, so new words shift the old ids."""
    out = np.array(fresh, np.float32)
    for token, i in new_vocab.items():
        if token in old_vocab:
            out[i] = np.asarray(loaded[old_vocab[token]], np.float32)
    return out


def initial_params(config: ml_collections.ConfigDict, unet: Any, text_encoder: Any,
                   tokenizer: Any = None) -> Any:
    """Fresh weights from `seed`, or those of the prior at `init_from` ('embedded': shipped).
    A source with another vocabulary (the plain world's prior fine-tuned on the patterned
    world) keeps its words' embeddings, matched by word (`remap_token_embedding`)."""
    fresh = embedded.init_params(unet, text_encoder, config.seed)
    if not config.init_from:
        return jax.tree_util.tree_map(jnp.asarray, fresh)
    folder = embedded.embedded_path() if config.init_from == "embedded" else config.init_from
    src = embedded.embedded_prior(path=folder)
    loaded = {k: src.params[k] for k in fresh}
    old_vocab_file = os.path.join(folder, "tokenizer", "vocab.json")
    if tokenizer is not None and os.path.isfile(old_vocab_file):
        with open(old_vocab_file) as f:
            old_vocab = json.load(f)
        new_vocab = tokenizer.get_vocab()
        if old_vocab != new_vocab:
            key = ("text_model", "embeddings", "token_embedding", "embedding")
            flat = traverse_util.flatten_dict(loaded["text_encoder"])
            flat[key] = remap_token_embedding(
                flat[key], traverse_util.flatten_dict(fresh["text_encoder"])[key], old_vocab,
                new_vocab)
            loaded["text_encoder"] = traverse_util.unflatten_dict(flat)
            logging.info("token embeddings of %d words kept, %d new",
                         len(set(old_vocab) & set(new_vocab)),
                         len(set(new_vocab) - set(old_vocab)))
    want = jax.tree_util.tree_map(lambda x: x.shape, fresh)
    got = jax.tree_util.tree_map(lambda x: x.shape, loaded)
    if want != got:
        raise UserError(f"init_from={config.init_from!r} has a different architecture from "
                        "lmc_jax.priors.embedded (its weight shapes differ); start without "
                        "--config.init_from or from a prior trained by this config")
    logging.info("initialised from %s", config.init_from)
    return jax.tree_util.tree_map(lambda x: jnp.asarray(x, jnp.float32), loaded)


def validate(config: ml_collections.ConfigDict) -> None:
    require_positive(config.steps, "steps")
    require_positive(config.batch, "batch")
    if not 0.0 <= config.cond_dropout < 1.0:
        raise UserError(f"cond_dropout must be in [0, 1), got {config.cond_dropout}")
    if config.prediction_type not in PREDICTION_TYPES:
        raise UserError(f"prediction_type must be one of {list(PREDICTION_TYPES)}, got "
                        f"{config.prediction_type!r}")


def train(config: ml_collections.ConfigDict, workdir: str, *,
          mesh: jax.sharding.Mesh | None = None, data: dict[str, np.ndarray] | None = None
          ) -> dict[str, Any]:
    """Trains (or resumes) the prior on `mesh` (default: from the config).

    `data`: the training set `{'image' uint8 [N, r, r, 3], 'shape' [N], 'colour' [N]}`, with
    'pattern' [N] in the patterned world (default: `data.num_train` renders of the shapes
    'train' split, of the patterned world with `data.patterned`). Returns `{state, losses, seconds,
    unet, text_encoder, tokenizer}`. Raises `lmc_jax.checkpoint.Preempted` (exit status 143)
    after saving on SIGTERM/SIGINT.
    """
    validate(config)
    mesh = mesh if mesh is not None else parallel.mesh_from_config(config)
    parallel.check_batch(config.batch, mesh, "batch")
    patterned = bool(config.data.get("patterned", False))
    if data is None:
        cache_dir = os.path.expanduser(config.data.cache_dir or os.path.join(workdir, "data"))
        data = shapes.load_arrays("train", config.data.num_train, cache_dir,
                                  config.data.resolution, config.seed, patterned)
    n = len(data["image"])
    if n < config.batch:
        raise UserError(f"data.num_train={n} is smaller than batch={config.batch}")
    images = data["image"].astype(np.float32) / 127.5 - 1.0
    labels = shapes.world_class(data["shape"], data["colour"],
                                data.get("pattern", np.zeros_like(data["shape"])))

    tok_dir = os.path.join(workdir, "tokenizer")
    embedded.write_word_tokenizer(tok_dir, shapes.vocabulary(patterned))
    unet, text_encoder, tokenizer = embedded.new_modules(tok_dir)
    table, null_ids = caption_table(tokenizer, patterned)
    alphas_cumprod = jnp.asarray(alphas_cumprod_from_config(embedded.SCHEDULER))

    warmup = min(config.warmup, config.steps // 2)
    lr = optax.warmup_cosine_decay_schedule(0.0, config.lr, warmup, max(config.steps, warmup + 1),
                                            config.lr * 0.05)
    opt = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(lr, weight_decay=0.0))
    params = initial_params(config, unet, text_encoder, tokenizer)
    # The EMA starts as a copy of the weights, not the same arrays: the step donates its state,
    # and one buffer cannot be donated twice.
    ema = jax.tree_util.tree_map(lambda p: np.array(p, copy=True), params)
    state = parallel.replicate(init_train_state(params, opt.init(params), extra=ema), mesh)
    key = jax.random.PRNGKey(config.seed)
    step_fn = make_train_step(unet, text_encoder, opt, alphas_cumprod, config.ema,
                              config.cond_dropout, config.prediction_type, mesh)
    indices = shapes.epoch_indices(n, config.batch, config.seed)
    table_j, null_j = jnp.asarray(table), parallel.replicate(jnp.asarray(null_ids), mesh)

    def step(state: TrainState, i: int):
        idx = indices(i)
        k_step = jax.random.fold_in(key, i)
        variant = jax.random.randint(jax.random.fold_in(k_step, 7), (len(idx),), 0, table.shape[1])
        ids = table_j[jnp.asarray(labels[idx]), variant]
        return step_fn(state, k_step, images[idx], ids, null_j)

    res = train_loop(workdir, config, state, step, steps=config.steps, fixed_keys=FIXED_KEYS,
                     desc="train prior", hint="lower lr")
    return {"state": res.state, "losses": [m["loss"] for m in res.logged],
            "seconds": res.seconds, "unet": unet, "text_encoder": text_encoder,
            "tokenizer": tokenizer}


def run(config: ml_collections.ConfigDict, workdir: str) -> dict:
    """Trains (or resumes) the embedded prior and exports it to WORKDIR/prior."""
    res = train(config, workdir)
    state, losses, seconds = res["state"], res["losses"], res["seconds"]
    unet, text_encoder, tokenizer = res["unet"], res["text_encoder"], res["tokenizer"]

    host = parallel.to_host(state.extra)  # the EMA weights
    prior = make_sd_prior(unet, None, text_encoder, tokenizer, host,
                          embedded.scheduler_config(config.prediction_type),
                          name="embedded(trained)")
    grid_images, prompts = sample_grid(prior, jax.random.PRNGKey(config.seed + 1),
                                       config.sample.w, config.sample.steps,
                                       config.sample.per_class,
                                       bool(config.data.get("patterned", False)))
    metrics: dict[str, Any] = {"steps": config.steps, "train_seconds": seconds,
                               "final_loss": losses[-1] if losses else None,
                               "unet_params": int(sum(x.size for x in
                                                      jax.tree_util.tree_leaves(host["unet"]))),
                               "text_params": int(sum(x.size for x in jax.tree_util.tree_leaves(
                                   host["text_encoder"])))}
    try:
        from lmc_jax.metrics import shapes_eval

        ev = shapes_eval.load_shipped_evaluator()
        x = jnp.asarray(grid_images.astype(np.float32) / 127.5 - 1.0)
        metrics["sample_accuracy"] = float(shapes_eval.accuracy(ev, x, prompts))
        metrics["sample_r_precision"] = float(shapes_eval.r_precision(ev, x, prompts))
    except (UserError, ImportError) as e:
        metrics["sample_accuracy"] = f"unavailable: {e}"
    if parallel.is_main_process():
        out = embedded.save_pipeline(os.path.join(workdir, "prior"), unet, text_encoder,
                                     tokenizer, host,
                                     prediction_type=config.prediction_type)
        per = config.sample.per_class
        rows = [grid_images[r * 5 * per:(r + 1) * 5 * per]
                for r in range(len(grid_images) // (5 * per))]
        io.save_png(os.path.join(workdir, "samples.png"), io.grid(rows), scale=2)
        io.write_json(os.path.join(workdir, "metrics.json"), metrics)
        print(io.format_table([[k, v] for k, v in metrics.items()], ["metric", "value"]))
        print(f"prior saved to {out}")
    return metrics
