"""Colour figures: the testbed's saturation ratio and Hasler & Suesstrunk's colourfulness.

Saturation ratio (the analytic testbed's `saturation_<method>`; > 1 means over-saturated):

    saturation = 1/N sum_n ||mean_hw x_n|| / ||r_n||

with `x_n` [H, W, C] in the space of the reference colours `r_n` (one per image, or one for all).

Colourfulness M (Hasler & Suesstrunk 2003, "Measuring colourfulness in natural images", Eq. 3),
per image, on 0..255 RGB:

    rg = R - G,   yb = (R + G) / 2 - B
    M = sqrt(std(rg)^2 + std(yb)^2) + 0.3 sqrt(mean(rg)^2 + mean(yb)^2)

(population std and mean over the pixels). A grey image has M = 0; pure red has
M = 0.3 * sqrt(255^2 + 127.5^2) ~ 85.5. The paper calls M > 59 "extremely colourful".
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from lmc_jax.errors import UserError


def _check(images: jax.Array, what: str) -> jax.Array:
    images = jnp.asarray(images, jnp.float32)
    if images.ndim != 4:
        raise UserError(f"{what} takes images [batch, height, width, channels] (NHWC), got shape "
                        f"{tuple(images.shape)}")
    return images


def saturation_per_image(images: jax.Array, reference_colour: jax.Array) -> jax.Array:
    """[N, H, W, C], reference [N, C] or [C] -> [N] `||mean_hw x_n|| / ||r_n||`.

    A zero reference gives inf (or nan for a zero mean colour): pass a non-zero colour.
    """
    images = _check(images, "saturation")
    ref = jnp.asarray(reference_colour, jnp.float32)
    if ref.shape not in ((images.shape[-1],), (images.shape[0], images.shape[-1])):
        raise UserError(f"reference_colour has shape {tuple(ref.shape)}; for images "
                        f"{tuple(images.shape)} it must be [{images.shape[-1]}] or "
                        f"[{images.shape[0]}, {images.shape[-1]}]")
    colour = jnp.mean(images, axis=(1, 2))
    return jnp.linalg.norm(colour, axis=-1) / jnp.linalg.norm(jnp.broadcast_to(ref, colour.shape),
                                                              axis=-1)


def saturation(images: jax.Array, reference_colour: jax.Array) -> jax.Array:
    """Mean over images of `||mean colour|| / ||reference||` (module docstring); a scalar."""
    return jnp.mean(saturation_per_image(images, reference_colour))


def colorfulness(images: jax.Array) -> jax.Array:
    """[N, H, W, 3] RGB in [-1, 1] -> [N] Hasler & Suesstrunk colourfulness on the 0..255 scale."""
    images = _check(images, "colorfulness")
    if images.shape[-1] != 3:
        raise UserError(f"colorfulness takes RGB images, got {images.shape[-1]} channels")
    rgb = (images + 1.0) * 127.5
    r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    rg = r - g
    yb = 0.5 * (r + g) - b
    axes = (1, 2)
    std = jnp.sqrt(jnp.var(rg, axis=axes) + jnp.var(yb, axis=axes))
    mean = jnp.sqrt(jnp.mean(rg, axis=axes) ** 2 + jnp.mean(yb, axis=axes) ** 2)
    return std + 0.3 * mean


__all__ = ["colorfulness", "saturation", "saturation_per_image"]
