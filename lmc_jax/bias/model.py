"""The learned deficiency `b_psi(x, t)` of LMC-SDS (docs/design.md section 1.3).

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

Cost: LMC-SDS runs `b_psi`'s forward and VJP in every step, at batch 1 on CPU a graph of small
ops where each XLA op has a fixed cost. So the per-image and per-group means are products with
constant vectors (`spatial_mean`, `group_mean`), GroupNorm + FiLM + SiLU is one op with a
hand-written VJP (`norm_film_silu`), and padding and upsampling have loop-only VJPs; each is
tested against autodiff of its plain formula (tests/test_bias_model.py). Together they made the
forward+VJP 1.5x faster at batch 1 with the same outputs (BUILD.md section 7).
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


def _pad_axis_transpose(g: jax.Array, axis: int, r: int, padding: str) -> jax.Array:
    """Adjoint of padding `axis` by `r` entries per side ('REFLECT' | 'CIRCULAR'): every padded
    entry of the cotangent `g` is added to the entry it was copied from.

    With `n` the unpadded length: REFLECT copies entries 1..r (reversed) to the front and
    n-1-r..n-2 (reversed) to the back; CIRCULAR copies n-r..n-1 to the front and 0..r-1 to the
    back. Slices, flips and zero pads only (one fused loop on CPU, where the autodiff transpose
    of `jnp.pad` runs as several loops).
    """
    n = g.shape[axis] - 2 * r
    core = jax.lax.slice_in_dim(g, r, r + n, axis=axis)
    lo = jax.lax.slice_in_dim(g, 0, r, axis=axis)
    hi = jax.lax.slice_in_dim(g, n + r, n + 2 * r, axis=axis)
    if padding == "REFLECT":
        lo, hi = jnp.flip(lo, axis), jnp.flip(hi, axis)
        lo_at, hi_at = (1, n - 1 - r), (n - 1 - r, 1)
    else:
        lo_at, hi_at = (n - r, 0), (0, n - r)
    widths = lambda at: [(0, 0)] * axis + [at] + [(0, 0)] * (g.ndim - axis - 1)
    return core + jnp.pad(lo, widths(lo_at)) + jnp.pad(hi, widths(hi_at))


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2))
def _pad_hw(h: jax.Array, r: int, padding: str) -> jax.Array:
    """Periodic or mirror padding of H and W of NHWC `h` by `r`, with `_pad_axis_transpose`
    as its VJP."""
    mode = _JNP_PAD_MODE[padding]
    return jnp.pad(h, ((0, 0), (r, r), (r, r), (0, 0)), mode=mode)


def _pad_hw_fwd(h, r, padding):
    return _pad_hw(h, r, padding), None


def _pad_hw_bwd(r, padding, _, g):
    return (_pad_axis_transpose(_pad_axis_transpose(g, 1, r, padding), 2, r, padding),)


_pad_hw.defvjp(_pad_hw_fwd, _pad_hw_bwd)


def _pad(h: jax.Array, r: int, padding: str) -> jax.Array:
    """Pads H and W of NHWC `h` by `r` pixels: periodic, mirror, or zeros."""
    if padding == "SAME":  # zeros: the autodiff transpose is a plain slice
        return jnp.pad(h, ((0, 0), (r, r), (r, r), (0, 0)))
    return _pad_hw(h, r, padding)


def _sum_pool2(h: jax.Array) -> jax.Array:
    """Sum over each 2x2 block, stride 2, NHWC: four strided slices added (a loop, where a
    reshape-and-mean is a reduction call on CPU)."""
    return h[:, 0::2, 0::2] + h[:, 0::2, 1::2] + h[:, 1::2, 0::2] + h[:, 1::2, 1::2]


def _avg_pool2(h: jax.Array) -> jax.Array:
    """2x2 average pooling with stride 2, NHWC."""
    return 0.25 * _sum_pool2(h)


@jax.custom_vjp
def _upsample2(h: jax.Array) -> jax.Array:
    """Nearest-neighbour 2x upsampling, NHWC; its VJP is `_sum_pool2` of the cotangent."""
    return jnp.repeat(jnp.repeat(h, 2, axis=1), 2, axis=2)


_upsample2.defvjp(lambda h: (_upsample2(h), None), lambda _, g: (_sum_pool2(g),))


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


def spatial_mean(v: jax.Array) -> jax.Array:
    """`mean_{H,W} v` for NHWC `v`, [B, C].

    Written as a product with a constant vector (`[B, H*W, C] . 1/(H W)`) at float32 precision:
    XLA:CPU hands reductions to a library call with a fixed cost of tens of microseconds, which
    dominates `b_psi` at batch 1 (benchmarks/bias_cost.py), while the product is cheap.
    """
    b, hh, ww, c = v.shape
    ones = jnp.full((b, 1, hh * ww), 1.0 / (hh * ww), v.dtype)  # [B, 1, HW] @ [B, HW, C]: no
    return jnp.matmul(ones, v.reshape(b, hh * ww, c),            # transpose of v is needed
                      precision=jax.lax.Precision.HIGHEST)[:, 0]


def group_mean(v: jax.Array, groups: int) -> jax.Array:
    """GroupNorm's statistic: the mean of `v` [B, H, W, C] over H, W and the C / groups channels
    of each group, returned per channel, [B, 1, 1, C]."""
    c = v.shape[-1]
    k = c // groups
    avg = np.kron(np.eye(groups), np.full((k, k), 1.0 / k))  # block-diagonal, float64
    m = jnp.dot(spatial_mean(v), avg.astype(v.dtype), precision=jax.lax.Precision.HIGHEST)
    return m[:, None, None, :]


def _group_normalize(h: jax.Array, groups: int, eps: float, frozen: bool = False
                     ) -> tuple[jax.Array, jax.Array]:
    """`(xhat, inv)`: `xhat = (h - mean_g) * inv`, `inv = 1 / sqrt(var_g + eps)` (two-pass
    group statistics; `frozen` stops their gradients)."""
    d = h - _stat(group_mean(h, groups), frozen)
    inv = jax.lax.rsqrt(_stat(group_mean(d * d, groups), frozen) + eps)
    return d * inv, inv


def _norm_film_silu_fwd(h, scale, bias, gamma, beta, groups, eps, freeze_stats):
    del freeze_stats  # only changes the backward pass
    xhat, inv = _group_normalize(h, groups, eps)
    z = (xhat * scale + bias) * (1.0 + gamma) + beta
    sig = jax.nn.sigmoid(z)
    return z * sig, (xhat, inv, z, sig, scale, bias, gamma)


def _norm_film_silu_bwd(groups, eps, freeze_stats, res, g):
    del eps
    xhat, inv, z, sig, scale, bias, gamma = res
    dz = g * sig * (1.0 + z * (1.0 - sig))  # silu'(z) = s (1 + z (1 - s)), s = sigmoid(z)
    d_beta = jnp.sum(dz, axis=(1, 2), keepdims=True)
    d_gamma = jnp.sum(dz * (xhat * scale + bias), axis=(1, 2), keepdims=True)
    dy = dz * (1.0 + gamma)
    d_scale = jnp.sum(dy * xhat, axis=(0, 1, 2))
    d_bias = jnp.sum(dy, axis=(0, 1, 2))
    dxh = dy * scale
    if freeze_stats:
        dh = dxh * inv
    else:  # d/dh of (h - mean) / sqrt(var + eps) through both statistics
        dh = inv * (dxh - group_mean(dxh, groups) - xhat * group_mean(dxh * xhat, groups))
    return dh, d_scale, d_bias, d_gamma, d_beta


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6, 7))
def norm_film_silu(h: jax.Array, scale: jax.Array, bias: jax.Array, gamma: jax.Array,
                   beta: jax.Array, groups: int, eps: float, freeze_stats: bool) -> jax.Array:
    """`silu(GN(h) (1 + gamma) + beta)` with `GN(h) = (h - mean_g) / sqrt(var_g + eps) * scale +
    bias`; `h` [B, H, W, C], `scale`, `bias` [C], `gamma`, `beta` [B, 1, 1, C].

    One op with a hand-written VJP: the backward pass reuses the forward's normalized `h` and
    sigmoid instead of recomputing them in each of several fused loops, and takes the group
    means of the gradient as products (`group_mean`). `freeze_stats` treats the group mean and
    variance as constants in the VJP. tests/test_bias_model.py checks values and VJPs against
    plain autodiff of the same formula.
    """
    return _norm_film_silu_fwd(h, scale, bias, gamma, beta, groups, eps, freeze_stats)[0]


norm_film_silu.defvjp(_norm_film_silu_fwd, _norm_film_silu_bwd)


class GroupNorm(nn.Module):
    """GroupNorm `(h - mean_g) / sqrt(var_g + eps) * scale + bias` over (H, W, channels of g).

    With `film=(gamma, beta)` it returns `silu(GroupNorm(h) (1 + gamma) + beta)` as one op
    (`norm_film_silu`). `freeze_stats` stops the gradient through the group mean and variance
    (the value is unchanged), which makes the op pointwise for gradient footprints.
    """

    groups: int = 8
    eps: float = 1e-5
    freeze_stats: bool = False

    @nn.compact
    def __call__(self, h: jax.Array, film: tuple[jax.Array, jax.Array] | None = None
                 ) -> jax.Array:
        c = h.shape[-1]
        g = math.gcd(self.groups, c)
        scale = self.param("scale", nn.initializers.ones, (c,))
        bias = self.param("bias", nn.initializers.zeros, (c,))
        if film is not None:
            return norm_film_silu(h, scale, bias, *film, g, self.eps, self.freeze_stats)
        return _group_normalize(h, g, self.eps, self.freeze_stats)[0] * scale + bias


class Block(nn.Module):
    """conv 3x3 -> GroupNorm -> FiLM `h (1 + gamma) + beta` -> SiLU; `(gamma, beta) = Dense(e)`."""

    features: int
    padding: str = "CIRCULAR"
    dilation: int = 1
    freeze_stats: bool = False

    @nn.compact
    def __call__(self, h: jax.Array, e: jax.Array) -> jax.Array:
        h = Conv3x3(self.features, self.padding, self.dilation)(h)
        norm = GroupNorm(freeze_stats=self.freeze_stats)
        film = nn.Dense(2 * self.features, kernel_init=nn.initializers.zeros)(nn.silu(e))
        gamma, beta = jnp.split(film[:, None, None, :], 2, axis=-1)
        return norm(h, film=(gamma, beta))  # silu(GroupNorm(h) (1 + gamma) + beta)


class GlobalAdd(nn.Module):
    """Per-image global path: `h + Dense(mean_{H,W} h)` broadcast over H, W."""

    freeze_stats: bool = False

    @nn.compact
    def __call__(self, h: jax.Array) -> jax.Array:
        m = _stat(spatial_mean(h), self.freeze_stats)
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
            mu = _stat(spatial_mean(x)[:, None, None, :], fr)
            var = spatial_mean((x - mu) ** 2)[:, None, None, :]
            sd = _stat(jnp.sqrt(var + self.eps**2), fr)
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
            m = _stat(spatial_mean(xn), fr)  # [B, C]
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
