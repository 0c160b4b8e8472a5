"""The learned deficiency `b_psi(x, t)` of LMC-SDS (DESIGN.md section 1).

`b_psi` predicts, for a *clean* image or latent `x` [B, H, W, C] and timesteps `t` [B], the
denoiser's expected one-step estimate

    b(x, t) = E_eps[x_hat(a_t x + s_t eps; t)],   x_hat = (x_t - s_t eps_phi(x_t; t)) / a_t,

which for natural images is roughly a timestep-dependent low-pass filter (near the identity at
small `t`, a wide blur at large `t`). LMC-SDS replaces `L_proj` by
`L_lmc = 1/2 W(t) (a_t/s_t) || b_psi(x, t) - sg(x_hat) ||^2` and consumes `b_psi` through the
callable `bias_fn(x, t, emb)` that `bias_fn_from` builds.

Architecture of `BiasNet` (features f = 32 by default, ~75k parameters, far below any UNet):

    xn = (x - mu) / sd                       (normalize=True; mu, sd per image and channel)
    h  = conv_in(xn)                                            level 0, H x W
    s0 = block(h);  h = block(avgpool2(s0)) =: s1               level 1, H/2
    h  = block(avgpool2(s1));  h += Dense(mean_hw h);  h = block(h)     level 2, H/4 (+ global)
    h  = block(up2(h) + s1);  h = block(up2(h) + s0);  h += Dense(mean_hw h)
    r  = conv_out(h) [+ K(t) mean_hw(xn)]    (DC path, only when not centred, see `center`)
    b  = x + sd * r                          (residual; conv_out, K start at zero: b = x at init)

Each `block` is conv 3x3 -> GroupNorm -> FiLM `h (1 + gamma(t)) + beta(t)` -> SiLU, with
`(gamma, beta) = Dense(SiLU(e))` and `e = MLP(timestep_embedding(t)) [+ Dense(mean_L emb)]`.
Receptive field of the local path (every per-image statistic held fixed, see
`receptive_field`): 36 x 36 input pixels for every output pixel (measured on 64 x 64 inputs; the
window is not centred, its offset follows the 4 x 4 pooling grid), well above the
17 x 17 that a 1/f^2 Wiener filter at large `t` needs; the two global-mean paths (and the
normalization statistics and GroupNorm) add per-image terms from the whole image, so a DC gain
is representable.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

PADDINGS = ("CIRCULAR", "REFLECT", "SAME")
_JNP_PAD_MODE = {"CIRCULAR": "wrap", "REFLECT": "reflect", "SAME": "constant"}


def timestep_embedding(t: jax.Array, dim: int, max_period: float = 10000.0) -> jax.Array:
    """Sinusoidal embedding of timesteps `t` [B] (ints or floats), float32 [B, dim].

    With `k = dim // 2` and frequencies `w_i = max_period^(-i / k)`, i = 0..k-1:
    `emb(t) = [cos(t w_0), ..., cos(t w_{k-1}), sin(t w_0), ..., sin(t w_{k-1})]`
    (zero-padded by one column when `dim` is odd).
    """
    t = jnp.asarray(t, jnp.float32)
    half = dim // 2
    freqs = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / half)
    args = t[:, None] * freqs[None, :]
    emb = jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)
    if dim % 2:
        emb = jnp.pad(emb, ((0, 0), (0, 1)))
    return emb


def _stat(v: jax.Array, frozen: bool) -> jax.Array:
    """A per-image statistic; `frozen` stops its gradient (for receptive-field measurement)."""
    return jax.lax.stop_gradient(v) if frozen else v


def _pad(h: jax.Array, r: int, padding: str) -> jax.Array:
    """Pads H and W of NHWC `h` by `r` pixels: periodic, mirror, or zeros."""
    return jnp.pad(h, ((0, 0), (r, r), (r, r), (0, 0)), mode=_JNP_PAD_MODE[padding])


def _avg_pool2(h: jax.Array) -> jax.Array:
    """2x2 average pooling with stride 2, NHWC."""
    b, hh, ww, c = h.shape
    return h.reshape(b, hh // 2, 2, ww // 2, 2, c).mean(axis=(2, 4))


def _upsample2(h: jax.Array) -> jax.Array:
    """Nearest-neighbour 2x upsampling, NHWC."""
    return jnp.repeat(jnp.repeat(h, 2, axis=1), 2, axis=2)


class Conv3x3(nn.Module):
    """3x3 convolution with explicit padding ('CIRCULAR' | 'REFLECT' | 'SAME' = zeros)."""

    features: int
    padding: str = "CIRCULAR"
    dilation: int = 1
    zero_init: bool = False

    @nn.compact
    def __call__(self, h: jax.Array) -> jax.Array:
        init = nn.initializers.zeros if self.zero_init else nn.initializers.lecun_normal()
        conv = nn.Conv(self.features, (3, 3), padding="VALID",
                       kernel_dilation=(self.dilation, self.dilation), kernel_init=init)
        return conv(_pad(h, self.dilation, self.padding))


class GroupNorm(nn.Module):
    """GroupNorm `(h - mean_g) / sqrt(var_g + eps) * scale + bias` over (H, W, channels of g).

    `freeze_stats` stops the gradient through the group mean and variance (the value is
    unchanged), which makes the op pointwise for gradient footprints.
    """

    groups: int = 8
    eps: float = 1e-5
    freeze_stats: bool = False

    @nn.compact
    def __call__(self, h: jax.Array) -> jax.Array:
        b, hh, ww, c = h.shape
        g = math.gcd(self.groups, c)
        hg = h.reshape(b, hh, ww, g, c // g)
        mean = _stat(hg.mean(axis=(1, 2, 4), keepdims=True), self.freeze_stats)
        var = _stat(hg.var(axis=(1, 2, 4), keepdims=True), self.freeze_stats)
        hg = (hg - mean) * jax.lax.rsqrt(var + self.eps)
        scale = self.param("scale", nn.initializers.ones, (c,))
        bias = self.param("bias", nn.initializers.zeros, (c,))
        return hg.reshape(b, hh, ww, c) * scale + bias


class Block(nn.Module):
    """conv 3x3 -> GroupNorm -> FiLM `h (1 + gamma) + beta` -> SiLU; `(gamma, beta) = Dense(e)`."""

    features: int
    padding: str = "CIRCULAR"
    dilation: int = 1
    freeze_stats: bool = False

    @nn.compact
    def __call__(self, h: jax.Array, e: jax.Array) -> jax.Array:
        h = Conv3x3(self.features, self.padding, self.dilation)(h)
        h = GroupNorm(freeze_stats=self.freeze_stats)(h)
        film = nn.Dense(2 * self.features, kernel_init=nn.initializers.zeros)(nn.silu(e))
        gamma, beta = jnp.split(film[:, None, None, :], 2, axis=-1)
        return nn.silu(h * (1.0 + gamma) + beta)


class GlobalAdd(nn.Module):
    """Per-image global path: `h + Dense(mean_{H,W} h)` broadcast over H, W."""

    freeze_stats: bool = False

    @nn.compact
    def __call__(self, h: jax.Array) -> jax.Array:
        m = _stat(h.mean(axis=(1, 2)), self.freeze_stats)
        return h + nn.Dense(h.shape[-1])(m)[:, None, None, :]


class BiasNet(nn.Module):
    """The deficiency model `b_psi(x, t[, emb]) ~ E_eps[x_hat]`; see the module docstring.

    Attributes:
      features: channels of every conv (f); parameters grow as ~ 6 * 9 f^2.
      normalize: the net sees `xn = (x - mu) / sd` (per image and channel, `sd = sqrt(var +
        eps^2)`) and returns `b = x + sd * r(xn)`, i.e. `mu + sd (xn + r(xn))`. Then `b` is
        equivariant to per-channel affine maps: `b(c x + d) = c b(x) + d` for c > 0 (exact up to
        the relative `eps^2 / (2 var)` and float rounding). Without it `b = x + r(x)`.
      center: with `normalize`, subtract `mu` (True) or only divide by `sd` (False: `xn = x /
        sd`). Shift equivariance (True) forbids any DC gain: the image mean passes through
        unchanged, while the exact deficiency of the Gaussian testbed shrinks it by
        `a^2 lam_0 / (a^2 lam_0 + s^2)` (0.84 at t=500, 0.06 at t=999), so a centred model's
        relative error there is at least 0.09 at t=500 and 1.3 at t=800 (DC term alone). With
        False, `b(c x) = c b(x)` (c > 0) still holds exactly and a t-dependent C x C DC map
        `r += K(t) mean_hw(xn)` is added (also with normalize=False).
      padding: 'CIRCULAR' (periodic data, the Gaussian testbed), 'REFLECT' or 'SAME' (zeros;
        natural images and latents).
      conditional: add `Dense(mean_L emb)` to the time embedding; `emb` is [B, K] or [B, L, D].
      freeze_stats: stop gradients through all per-image statistics (normalization, GroupNorm,
        global paths); values are unchanged. Only for `receptive_field`.
      eps: the normalization floor (in units of `x`).

    Input H and W must be divisible by 4 (two 2x poolings).
    """

    features: int = 32
    normalize: bool = True
    center: bool = True
    padding: str = "CIRCULAR"
    conditional: bool = False
    freeze_stats: bool = False
    eps: float = 1e-4

    @nn.compact
    def __call__(self, x: jax.Array, t: jax.Array, emb: jax.Array | None = None) -> jax.Array:
        """`x` [B, H, W, C], `t` [B] (or scalar) in 0..999, `emb` [B, K] | [B, L, D] -> `b`."""
        if self.padding not in PADDINGS:
            raise ValueError(f"unknown padding {self.padding!r}; choose one of {PADDINGS}")
        if x.ndim != 4 or x.shape[1] % 4 or x.shape[2] % 4:
            raise ValueError(f"BiasNet takes NHWC x with H, W divisible by 4, got {x.shape}")
        bsz, c = x.shape[0], x.shape[-1]
        t = jnp.broadcast_to(jnp.asarray(t), (bsz,))
        f, pad, fr = self.features, self.padding, self.freeze_stats

        e = timestep_embedding(t, f)
        e = nn.Dense(f, name="time_mlp1")(nn.silu(nn.Dense(f, name="time_mlp0")(e)))
        if self.conditional:
            if emb is None:
                raise ValueError("BiasNet(conditional=True) needs `emb` ([B, K] or [B, L, D])")
            emb = jnp.asarray(emb)
            pooled = emb.mean(axis=1) if emb.ndim == 3 else emb
            pooled = jnp.broadcast_to(pooled, (bsz, pooled.shape[-1]))
            e = e + nn.Dense(f, name="cond_proj")(pooled)

        if self.normalize:
            mu = _stat(x.mean(axis=(1, 2), keepdims=True), fr)
            sd = _stat(jnp.sqrt(x.var(axis=(1, 2), keepdims=True) + self.eps**2), fr)
            xn = (x - mu) / sd if self.center else x / sd
        else:
            sd, xn = 1.0, x

        h = Conv3x3(f, pad, name="conv_in")(xn)
        s0 = Block(f, pad, freeze_stats=fr, name="enc0")(h, e)
        s1 = Block(f, pad, freeze_stats=fr, name="enc1")(_avg_pool2(s0), e)
        h = Block(f, pad, freeze_stats=fr, name="mid0")(_avg_pool2(s1), e)
        h = GlobalAdd(fr, name="global_mid")(h)
        h = Block(f, pad, freeze_stats=fr, name="mid1")(h, e)
        h = Block(f, pad, freeze_stats=fr, name="dec1")(_upsample2(h) + s1, e)
        h = Block(f, pad, freeze_stats=fr, name="dec0")(_upsample2(h) + s0, e)
        h = GlobalAdd(fr, name="global_out")(h)
        r = Conv3x3(c, pad, zero_init=True, name="conv_out")(h)
        if not (self.normalize and self.center):  # DC path; mean(xn) = 0 when centred
            m = _stat(xn.mean(axis=(1, 2)), fr)  # [B, C]
            k = nn.Dense(c * c, kernel_init=nn.initializers.zeros, name="dc_map")(nn.silu(e))
            r = r + jnp.einsum("bij,bj->bi", k.reshape(bsz, c, c), m)[:, None, None, :]
            # Skip gate g(t) (starts at 1): b = g(t) x + sd r. At large t the deficiency is a
            # strong blur, b far from x; the gate lets the net drop the identity instead of
            # cancelling it to a fraction of a percent. Kept out of the centred mode, whose
            # exact shift equivariance needs g = 1.
            g = 1.0 + nn.Dense(c, kernel_init=nn.initializers.zeros, name="skip_gate")(
                nn.silu(e))
            return g[:, None, None, :] * x + sd * r
        return x + sd * r


def bias_fn_from(module: BiasNet, params: Any) -> Callable[..., jax.Array]:
    """The callable `b(x, t, emb=None) -> b_psi(x, t) [B, H, W, C]` float32 that guidance consumes.

    `params` is the module's 'params' collection (or a variables dict holding it). Pure and
    jittable; `emb` is ignored unless `module.conditional`.
    """
    if isinstance(params, dict) and set(params) == {"params"}:
        params = params["params"]
    variables = {"params": params}

    def bias_fn(x: jax.Array, t: jax.Array, emb: jax.Array | None = None) -> jax.Array:
        x = jnp.asarray(x, jnp.float32)
        return module.apply(variables, x, t, emb if module.conditional else None).astype(
            jnp.float32)

    return bias_fn


def param_count(params: Any) -> int:
    """Total number of scalars in a parameter pytree."""
    return int(sum(np.size(p) for p in jax.tree_util.tree_leaves(params)))


@functools.partial(jax.jit, static_argnums=0)
def _centre_grad(module: BiasNet, params: Any, x: jax.Array, t: jax.Array,
                 emb: jax.Array | None) -> jax.Array:
    """`d/dx sum_c b_c(x)[H/2, W/2]`, [1, H, W, C]."""
    hh, ww = x.shape[1:3]
    centre = lambda xx: module.apply({"params": params}, xx, t, emb)[0, hh // 2, ww // 2, :].sum()
    return jax.grad(centre)(x)


def receptive_field(module: BiasNet, params: Any, x_shape: tuple[int, int, int],
                    seed: int = 0) -> tuple[int, int]:
    """Empirical receptive field (height, width) of the local path of `b_psi`.

    Definition: the bounding box of the input pixels where `d b_c(x)[H/2, W/2] / d x` is nonzero
    for some channels (summed over output channels), at a random `x ~ N(0, I)` of shape
    [1, *x_shape], `t = 500`, with every per-image statistic held fixed (`freeze_stats=True`:
    input mean/std, GroupNorm statistics and the global-mean paths contribute values but no
    gradient), so only the convolutional path is measured. `x_shape` should exceed the field
    (e.g. 64 x 64), else circular padding wraps and the whole image is reported. With the
    initial parameters `conv_out` is zero and `b` is the identity (field 1 x 1): measure trained
    or perturbed parameters.
    """
    if isinstance(params, dict) and set(params) == {"params"}:
        params = params["params"]
    local = module.clone(freeze_stats=True)
    hh, ww, c = x_shape
    x = jax.random.normal(jax.random.PRNGKey(seed), (1, hh, ww, c), jnp.float32)
    t = jnp.full((1,), 500, jnp.int32)
    emb = None
    if module.conditional:  # any emb of the projection's width; it only enters via FiLM
        emb = jnp.zeros((1, params["cond_proj"]["kernel"].shape[0]), jnp.float32)

    g = np.abs(np.asarray(_centre_grad(local, params, x, t, emb)[0])).sum(axis=-1)
    rows = np.nonzero(g.sum(axis=1) > 0)[0]
    cols = np.nonzero(g.sum(axis=0) > 0)[0]
    return int(rows[-1] - rows[0] + 1), int(cols[-1] - cols[0] + 1)
