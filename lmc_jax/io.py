"""Small file-output helpers: PNG images and grids, metrics.json, the resolved config."""

from __future__ import annotations

import json
import os
from collections.abc import Sequence

import numpy as np
from PIL import Image


def to_uint8(images: np.ndarray, lo: float = -1.0, hi: float = 1.0) -> np.ndarray:
    """Maps float images in [lo, hi] to uint8 [0, 255] (clipped)."""
    x = (np.asarray(images, np.float32) - lo) / (hi - lo)
    return np.round(np.clip(x, 0.0, 1.0) * 255.0).astype(np.uint8)


def grid(rows: Sequence[np.ndarray], pad: int = 2, pad_value: int = 255) -> np.ndarray:
    """Tiles uint8 images: `rows[i]` is [N_i, H, W, C] (N_i may differ); returns [H', W', C]."""
    h, w, c = rows[0].shape[1:]
    ncol = max(len(r) for r in rows)
    out = np.full((len(rows) * (h + pad) + pad, ncol * (w + pad) + pad, c), pad_value, np.uint8)
    for i, row in enumerate(rows):
        for j, img in enumerate(row):
            y, x = pad + i * (h + pad), pad + j * (w + pad)
            out[y:y + h, x:x + w] = img
    return out


def save_png(path: str, image: np.ndarray, scale: int = 1) -> str:
    """Writes an [H, W, C] uint8 image (C in {1, 3, 4}), optionally upscaled by `scale`."""
    img = np.asarray(image)
    if img.shape[-1] == 1:
        img = img[..., 0]
    pil = Image.fromarray(img)
    if scale > 1:
        pil = pil.resize((pil.width * scale, pil.height * scale), Image.NEAREST)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    pil.save(path)
    return path


def write_json(path: str, data: dict) -> str:
    """Writes `data` (floats, ints, strings, nested) as pretty JSON, atomically (a temporary
    file renamed over `path`: a run stopped mid-write never leaves a truncated file)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(data, f, indent=2, sort_keys=True, default=float)
        f.write("\n")
    os.replace(tmp, path)
    return path


def format_table(rows: Sequence[Sequence[object]], header: Sequence[str]) -> str:
    """A plain-text table with aligned columns (floats to 4 significant digits)."""
    def fmt(v):
        return f"{v:.4g}" if isinstance(v, float) else str(v)
    cells = [list(map(str, header))] + [[fmt(v) for v in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    lines = ["  ".join(c.ljust(wd) for c, wd in zip(r, widths, strict=True)) for r in cells]
    lines.insert(1, "  ".join("-" * wd for wd in widths))
    return "\n".join(lines)


def progress(iterable, **kwargs):
    """A tqdm progress bar (it/s, ETA, postfix for loss terms); sparse when not on a terminal."""
    import sys

    from tqdm import tqdm

    tty = sys.stderr.isatty()
    kwargs.setdefault("mininterval", 0.5 if tty else 15.0)
    kwargs.setdefault("dynamic_ncols", True)
    return tqdm(iterable, **kwargs)
