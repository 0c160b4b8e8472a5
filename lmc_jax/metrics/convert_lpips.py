"""Converts the official PyTorch LPIPS (VGG) weights into the one file `load_lpips` reads.

Inputs (download them on a connected machine):
- VGG16 ImageNet weights of torchvision:
  https://download.pytorch.org/models/vgg16-397923af.pth (keys `features.{i}.weight|bias`), or
  an `lpips.LPIPS(net='vgg').state_dict()` saved with torch.save (keys `net.slice{s}.{i}.*`,
  which also carries the heads);
- the LPIPS linear heads, `weights/v0.1/vgg.pth` of github.com/richzhang/PerceptualSimilarity
  (or of the `lpips` pip package; keys `lin{l}.model.1.weight`, shape [1, C_l, 1, 1]).

    python -m lmc_jax.metrics.convert_lpips --vgg vgg16-397923af.pth --lin vgg.pth \\
        --out lpips_vgg.npz

Layout changes: a torch conv weight [C_out, C_in, 3, 3] (OIHW) becomes a Flax kernel
[3, 3, C_in, C_out] (HWIO; both frameworks cross-correlate, so no flip); a head [1, C, 1, 1]
becomes [C]. `.pth` files need torch (`torch.load(weights_only=True)`); `.safetensors` inputs
do not. This module is a script: the package never imports it.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from lmc_jax.metrics.lpips import VGG16_BLOCKS, expected_shapes, make_lpips


def torchvision_conv_indices() -> list[int]:
    """Index in torchvision's `vgg16().features` of each of the 13 convolutions.

    `features` is [conv, relu] per convolution and one max pool after each block:
    0, 2, 5, 7, 10, 12, 14, 17, 19, 21, 24, 26, 28.
    """
    indices, i = [], 0
    for block in VGG16_BLOCKS:
        for _ in block:
            indices.append(i)
            i += 2
        i += 1
    return indices


def read_torch_state(path: str | Path) -> dict[str, np.ndarray]:
    """A state dict file (`.pth`/`.bin` via torch, `.safetensors` without) as float32 arrays."""
    path = Path(path)
    if path.suffix == ".safetensors":
        from safetensors.numpy import load_file

        return {k: np.asarray(v, np.float32) for k, v in load_file(str(path)).items()}
    try:
        import torch
    except ImportError as e:
        raise SystemExit(f"{path} is a PyTorch pickle: install torch (CPU build is enough) to "
                         "convert it") from e
    state = torch.load(str(path), map_location="cpu", weights_only=True)
    return {k: v.float().numpy() for k, v in state.items()}


def convert(vgg_state: dict[str, np.ndarray], lin_state: dict[str, np.ndarray]) -> dict:
    """torch state dicts -> the flat `{name: array}` of the weights file (see lpips.py)."""
    out = {}
    names = [f"conv{b + 1}_{i + 1}" for b, block in enumerate(VGG16_BLOCKS)
             for i in range(len(block))]
    for name, idx in zip(names, torchvision_conv_indices(), strict=True):
        w, bias = _find(vgg_state, idx)
        out[f"{name}/kernel"] = np.transpose(np.asarray(w, np.float32), (2, 3, 1, 0))
        out[f"{name}/bias"] = np.asarray(bias, np.float32)
    for tap in range(len(VGG16_BLOCKS)):
        key = f"lin{tap}.model.1.weight"
        if key not in lin_state:
            raise SystemExit(f"the heads file lacks {key}: is it LPIPS weights/v0.1/vgg.pth?")
        out[f"lin{tap}"] = np.asarray(lin_state[key], np.float32).reshape(-1)
    want = expected_shapes()
    for key, shape in want.items():
        if out[key].shape != shape:
            raise SystemExit(f"{key} has shape {out[key].shape} after conversion, expected "
                             f"{shape}: the inputs are not VGG16 / LPIPS-VGG weights")
    return out


def _find(state: dict[str, np.ndarray], idx: int) -> tuple[np.ndarray, np.ndarray]:
    """Weight and bias of torchvision feature `idx` under either naming (features./net.slice)."""
    for prefix in ["features", "module.features"] + [f"net.slice{s}" for s in range(1, 6)]:
        w, b = state.get(f"{prefix}.{idx}.weight"), state.get(f"{prefix}.{idx}.bias")
        if w is not None and b is not None:
            return w, b
    raise SystemExit(f"the VGG file has no features.{idx}.weight/bias: is it torchvision's "
                     "vgg16 (not vgg16_bn) state dict?")


def save(weights: dict[str, np.ndarray], out: str | Path) -> Path:
    """Writes `out`, an uncompressed `.npz` or a `.safetensors` file."""
    out = Path(out)
    if out.suffix not in (".npz", ".safetensors"):
        raise SystemExit(f"--out {out} must end in .npz or .safetensors")
    out.parent.mkdir(parents=True, exist_ok=True)
    if out.suffix == ".safetensors":
        from safetensors.numpy import save_file

        save_file({k: np.ascontiguousarray(v) for k, v in weights.items()}, str(out))
    else:
        np.savez(out, **weights)
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vgg", required=True, help="torchvision vgg16 state dict (.pth)")
    parser.add_argument("--lin", help="LPIPS heads (v0.1/vgg.pth); default: read from --vgg")
    parser.add_argument("--out", required=True, help="output .npz or .safetensors")
    args = parser.parse_args(argv)
    vgg_state = read_torch_state(args.vgg)
    lin_state = read_torch_state(args.lin) if args.lin else vgg_state
    weights = convert(vgg_state, lin_state)
    make_lpips(weights)  # the same checks load_lpips makes
    print(save(weights, args.out))


if __name__ == "__main__":
    main()
