"""The `Prior` interface: frozen parameters (a pytree) plus pure functions.

Every backend (exact Gaussian, Stable Diffusion, tiny SD-architecture) returns a `Prior`.
Conventions, shared by all of lmc_jax:
- Arrays are NHWC. `x` is what the diffusion model diffuses: pixels in [-1, 1] for pixel
  priors, scaled VAE latents for latent priors. `x_shape = (H, W, C)` of one sample.
- `t` is an int32 vector [B] of discrete timesteps in [0, len(alphas_cumprod)).
- `emb` is the prior's text conditioning for a batch, `embed_text(prompts)` makes it; the empty
  prompt "" gives the unconditional embedding.
- `eps(x_t, t, emb)` is the denoiser's noise prediction `eps_phi(x_t; y, t)` (float32 out).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import struct

from lmc_jax.errors import UserError


@struct.dataclass
class Prior:
    """A diffusion prior. A pytree: `params` and `alphas_cumprod` are its leaves.

    Attributes:
      params: frozen parameters (UNet, VAE, text encoder, or Gaussian statistics).
      alphas_cumprod: [T] float32, the VP schedule.
      eps_fn: `(params, x_t, t, emb) -> eps`, pure and jittable.
      embed_fn: `(prompts) -> emb` [N, ...]; may tokenize in Python (not jittable).
      encode_fn: `(params, images [B, H', W', 3] in [-1, 1]) -> x`, or None for pixel priors.
      decode_fn: `(params, x) -> images`, or None for pixel priors.
      bias_fn: the exact deficiency `(params, x, t, emb) -> b(x, t) = E_eps[x_hat]` where it is
        known in closed form (the Gaussian prior), else None.
      x_shape: (H, W, C) of `x`.
      image_shape: (H', W', 3) of decoded images.
      kind: 'pixel' or 'latent'.
      name: a short description for logs.
    """

    params: Any
    alphas_cumprod: jax.Array
    eps_fn: Callable[..., jax.Array] = struct.field(pytree_node=False)
    embed_fn: Callable[[Sequence[str]], jax.Array] = struct.field(pytree_node=False)
    encode_fn: Callable[..., jax.Array] | None = struct.field(pytree_node=False, default=None)
    decode_fn: Callable[..., jax.Array] | None = struct.field(pytree_node=False, default=None)
    bias_fn: Callable[..., jax.Array] | None = struct.field(pytree_node=False, default=None)
    x_shape: tuple[int, int, int] = struct.field(pytree_node=False, default=(32, 32, 3))
    image_shape: tuple[int, int, int] = struct.field(pytree_node=False, default=(32, 32, 3))
    kind: str = struct.field(pytree_node=False, default="pixel")
    name: str = struct.field(pytree_node=False, default="prior")

    @property
    def has_exact_bias(self) -> bool:
        """Whether the deficiency `b(x, t)` is known in closed form (the Gaussian priors)."""
        return self.bias_fn is not None

    @property
    def num_timesteps(self) -> int:
        return int(self.alphas_cumprod.shape[0])

    def eps(self, x_t: jax.Array, t: jax.Array, emb: jax.Array) -> jax.Array:
        """Noise prediction `eps_phi(x_t; y, t)`, [B, H, W, C] float32."""
        return self.eps_fn(self.params, x_t, t, emb)

    def embed_text(self, prompts: Sequence[str]) -> jax.Array:
        """Text conditioning for `prompts`; "" is the unconditional (null) prompt."""
        if isinstance(prompts, str):
            prompts = [prompts]
        return self.embed_fn(list(prompts))

    def encode(self, images: jax.Array) -> jax.Array:
        """Images [B, H', W', 3] in [-1, 1] -> `x` (identity for pixel priors)."""
        return images if self.encode_fn is None else self.encode_fn(self.params, images)

    def decode(self, x: jax.Array) -> jax.Array:
        """`x` -> images [B, H', W', 3] in about [-1, 1] (identity for pixel priors)."""
        return x if self.decode_fn is None else self.decode_fn(self.params, x)

    def exact_bias(self, x: jax.Array, t: jax.Array, emb: jax.Array) -> jax.Array:
        """The closed-form deficiency `b(x, t) = E_eps[x_hat]`, where the backend knows it."""
        if self.bias_fn is None:
            raise UserError(
                f"prior {self.name!r} has no closed-form deficiency b(x, t); use a trained b_psi "
                "(guidance.bias_path) or the Gaussian prior"
            )
        return self.bias_fn(self.params, x, t, emb)

    def check_x(self, x: jax.Array, what: str = "x") -> None:
        """Raises a UserError unless `x` is [B, *x_shape]."""
        if x.ndim != 4 or tuple(x.shape[1:]) != tuple(self.x_shape):
            raise UserError(
                f"{what} has shape {tuple(x.shape)} but prior {self.name!r} takes "
                f"[batch, {', '.join(map(str, self.x_shape))}] (NHWC); resize or pick a prior "
                "of that size"
            )


def x_hat_from_eps(x_t: jax.Array, eps: jax.Array, a: jax.Array, s: jax.Array) -> jax.Array:
    """One-step denoised estimate `x_hat = (x_t - s_t eps) / a_t` (a, s per sample, [B])."""
    a = jnp.reshape(a, a.shape + (1,) * (x_t.ndim - 1))
    s = jnp.reshape(s, s.shape + (1,) * (x_t.ndim - 1))
    return (x_t - s * eps) / a
