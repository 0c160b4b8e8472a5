"""Batches of clean training samples `x` (in the prior's x space) and their conditioning.

A source is a function `batch(step) -> (x [B, *x_shape], emb [B, ...])`, deterministic in
`step` (so a resumed run sees the same data):

- 'prior': samples of the exact Gaussian (mixture) prior itself; for a conditional target the
  embedding is the sample's class, else the null prompt's.
- 'gaussian_images': images with a 1/(f^2 + 1) spectrum at the prior's image size, passed
  through `prior.encode` (a stand-in for natural images where none are available).
- 'folder': a directory of images (see `lmc_jax.data.folder`).
- 'shapes': renders of the embedded prior's training set (see `lmc_jax.data.shapes`).
- 'samples': an .npy file of samples already in x space at `data.path` (the prior's own DDIM
  samples of `lmc_jax.bias.auto`), null-prompt conditioning.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from lmc_jax.errors import UserError
from lmc_jax.priors import gaussian
from lmc_jax.priors.base import Prior

Batch = tuple[jax.Array, jax.Array]


def make_source(cfg: ml_collections.ConfigDict, prior: Prior, batch: int, seed: int,
                conditional: bool, workdir: str) -> Callable[[int], Batch]:
    """The source named by `cfg.source` (see the module docstring)."""
    key = jax.random.PRNGKey(seed + 1)
    null = prior.embed_text([""])
    if cfg.source == "prior":
        if not prior.has_exact_bias:
            raise UserError("data.source='prior' needs an exact prior (prior.name='gaussian' or "
                            "'gaussian_mixture')")
        k = prior.params["mu"].shape[0]

        @jax.jit
        def draw(step):
            k_lab, k_x = jax.random.split(jax.random.fold_in(key, step))
            labels = jax.random.randint(k_lab, (batch,), 0, k)
            x = gaussian.sample(prior.params, k_x, batch, labels)
            emb = jax.nn.one_hot(labels, k) if conditional else jnp.broadcast_to(
                null, (batch, *null.shape[1:]))
            return x, emb

        return lambda step: draw(jnp.asarray(step))
    if cfg.source == "gaussian_images":
        h, w, c = prior.image_shape
        lam = jnp.asarray(gaussian.power_spectrum(h, w, 0.25))
        params = {"mu": jnp.zeros((1, c)), "log_pi": jnp.zeros((1,)), "lam": lam}

        @jax.jit
        def draw_images(step):
            return gaussian.sample(params, jax.random.fold_in(key, step), batch)

        emb = jnp.broadcast_to(null, (batch, *null.shape[1:]))
        return lambda step: (prior.encode(draw_images(jnp.asarray(step))), emb)
    if cfg.source == "shapes":
        from lmc_jax.data.shapes import shapes_source

        return shapes_source(cfg, prior, batch, seed, conditional, workdir)
    if cfg.source == "samples":
        from lmc_jax.data.shapes import epoch_indices

        xs = np.load(cfg.path)
        indices = epoch_indices(len(xs), batch, seed)
        emb = jnp.broadcast_to(null, (batch, *null.shape[1:]))
        return lambda step: (jnp.asarray(xs[indices(step)]), emb)
    if cfg.source == "folder":
        from lmc_jax.data.folder import folder_source

        return folder_source(cfg, prior, batch, seed, workdir)
    raise UserError(f"unknown data.source {cfg.source!r}; choose 'folder', 'prior', "
                    "'gaussian_images' or 'shapes'")
