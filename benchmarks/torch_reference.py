"""The PyTorch reference of benchmarks/step_time.py: the same guidance step in torch eager.

- `torch_unet_from_flax`: diffusers' torch `UNet2DConditionModel` holding the SAME weights as a
  Flax tiny SD prior, converted with diffusers' own converter
  (`diffusers.models.modeling_pytorch_flax_utils.load_flax_weights_in_pytorch_model`, the
  in-memory half of `load_flax_checkpoint_in_pytorch_model`); every torch weight is set to NaN
  first, so one the converter misses cannot go unnoticed.
- `TorchBiasNet`: a line-by-line port of `lmc_jax.bias.BiasNet` with the same weights.
- `torch_guidance_step`: SDS or LMC-SDS and the update `x <- x - lr * grad` (NCHW), the same
  arithmetic as lmc_jax.guidance with `W(t) = s_t^2`.

Needs torch: `pip install -e ".[bench]"`.
"""

from __future__ import annotations

import math
import warnings
from typing import Any

import numpy as np


def torch_unet_from_flax(flax_unet_params: Any, sample_size: int, unet_kwargs: dict) -> Any:
    """diffusers' torch UNet (eval mode) with the Flax UNet's weights; raises RuntimeError when
    the converter leaves a weight unset or drops one."""
    import jax
    import torch

    from lmc_jax import _compat

    d = _compat.diffusers()
    from diffusers.models.modeling_pytorch_flax_utils import (
        load_flax_weights_in_pytorch_model,
    )

    unet = d.UNet2DConditionModel(sample_size=sample_size, **unet_kwargs).eval()
    with torch.no_grad():  # NaN first: a weight the converter missed cannot go unnoticed
        for v in unet.state_dict().values():
            if v.is_floating_point():
                v.fill_(float("nan"))
    flax_unet = jax.tree_util.tree_map(lambda a: np.array(a, np.float32), flax_unet_params)
    with warnings.catch_warnings():  # the converter's torch.from_numpy on read-only arrays
        warnings.simplefilter("ignore", UserWarning)
        unet = load_flax_weights_in_pytorch_model(unet, flax_unet).eval()
    unset = [k for k, v in unet.state_dict().items()
             if v.is_floating_point() and bool(torch.isnan(v).any())]
    if unset:
        raise RuntimeError(f"the converter left {len(unset)} torch weights unset: {unset[:3]}")
    n_flax = sum(np.size(a) for a in jax.tree_util.tree_leaves(flax_unet))
    n_torch = sum(v.numel() for v in unet.state_dict().values() if v.is_floating_point())
    if n_flax != n_torch:  # a Flax weight the converter dropped
        raise RuntimeError(f"Flax UNet has {n_flax} weights, the torch UNet {n_torch}")
    return unet


def torch_guidance_step(unet: Any, bias: TorchBiasNet, alphas_cumprod: Any, method: str, x, t,
                        eps, emb_c, emb_u, *, w: float, lr: float):
    """One SDS ('sds') or LMC-SDS ('lmc') step on `x` [B, C, H, W]: `x - lr * grad`."""
    import torch

    with torch.no_grad():
        abar = alphas_cumprod[t].view(-1, 1, 1, 1)
        a, s = abar.sqrt(), (1.0 - abar).sqrt()
        x_t = a * x + s * eps
        e = unet(torch.cat([x_t, x_t]), torch.cat([t, t]), torch.cat([emb_c, emb_u])).sample
        e_c, e_u = e.chunk(2)
        wt = s * s  # W(t) = s_t^2 ('sigma2')
        grad = wt * w * (e_c - e_u)
        if method == "sds":
            grad = grad + wt * (e_c - eps)
        else:
            x_hat = (x_t - s * e_c) / a
            with torch.enable_grad():
                xr = x.detach().requires_grad_(True)
                b = bias(xr, t)
                (g_lmc,) = torch.autograd.grad(b, xr, (wt * a / s) * (b.detach() - x_hat))
            grad = grad + g_lmc
        return x - lr * grad


class TorchBiasNet:
    """`lmc_jax.bias.BiasNet(normalize=True, center=True, conditional=False)` in PyTorch, NCHW,
    with the Flax weights (a flat {'conv_in/Conv_0/kernel': array, ...} dict)."""

    def __init__(self, flat_params: dict[str, Any], features: int, padding: str, eps: float):
        import torch

        self.f, self.eps = features, eps
        self.pad_mode = {"REFLECT": "reflect", "CIRCULAR": "circular", "SAME": "constant"}[padding]
        self.p = {}
        for k, v in flat_params.items():
            v = np.array(v, np.float32)
            if k.endswith("kernel"):  # conv HWIO -> OIHW; dense [in, out] -> [out, in]
                v = v.transpose(3, 2, 0, 1) if v.ndim == 4 else v.T
            self.p[k] = torch.from_numpy(np.ascontiguousarray(v))

    def _conv(self, name: str, h):
        import torch.nn.functional as F

        h = F.pad(h, (1, 1, 1, 1), mode=self.pad_mode)
        return F.conv2d(h, self.p[f"{name}/kernel"], self.p[f"{name}/bias"])

    def _dense(self, name: str, h):
        import torch.nn.functional as F

        return F.linear(h, self.p[f"{name}/kernel"], self.p[f"{name}/bias"])

    def _block(self, name: str, h, e):
        import torch.nn.functional as F

        h = self._conv(f"{name}/Conv3x3_0/Conv_0", h)
        h = F.group_norm(h, math.gcd(8, h.shape[1]), self.p[f"{name}/GroupNorm_0/scale"],
                         self.p[f"{name}/GroupNorm_0/bias"], eps=1e-5)
        gamma, beta = self._dense(f"{name}/Dense_0", F.silu(e))[:, :, None, None].chunk(2, dim=1)
        return F.silu(h * (1.0 + gamma) + beta)

    def _global(self, name: str, h):
        return h + self._dense(f"{name}/Dense_0", h.mean(dim=(2, 3)))[:, :, None, None]

    def __call__(self, x, t):
        import torch
        import torch.nn.functional as F

        half = self.f // 2
        freqs = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float32) / half)
        args = t.float()[:, None] * freqs[None, :]
        e = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
        e = self._dense("time_mlp1", F.silu(self._dense("time_mlp0", e)))
        mu = x.mean(dim=(2, 3), keepdim=True)
        sd = (x.var(dim=(2, 3), unbiased=False, keepdim=True) + self.eps**2).sqrt()
        h = self._conv("conv_in/Conv_0", (x - mu) / sd)
        s0 = self._block("enc0", h, e)
        s1 = self._block("enc1", F.avg_pool2d(s0, 2), e)
        h = self._global("global_mid", self._block("mid0", F.avg_pool2d(s1, 2), e))
        h = self._block("mid1", h, e)
        h = self._block("dec1", F.interpolate(h, scale_factor=2, mode="nearest") + s1, e)
        h = self._block("dec0", F.interpolate(h, scale_factor=2, mode="nearest") + s0, e)
        r = self._conv("conv_out/Conv_0", self._global("global_out", h))
        return x + sd * r
