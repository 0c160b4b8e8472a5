"""Metric writer: TensorBoard scalars and images (tensorboardX) plus a JSON-lines log.

Only process 0 writes (multi-host runs call every writer method on all hosts).
"""

from __future__ import annotations

import json
import os

import jax
import numpy as np


class MetricWriter:
    """`write_scalars(step, dict)`, `write_images(step, dict)`; files under `workdir`."""

    def __init__(self, workdir: str, enabled: bool | None = None):
        self.enabled = jax.process_index() == 0 if enabled is None else enabled
        self._tb = None
        self._log = None
        if self.enabled:
            os.makedirs(workdir, exist_ok=True)
            from tensorboardX import SummaryWriter

            self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"))
            self._log = open(os.path.join(workdir, "metrics.jsonl"), "a")  # noqa: SIM115

    def write_scalars(self, step: int, scalars: dict) -> None:
        if not self.enabled:
            return
        values = {k: float(v) for k, v in scalars.items()}
        for k, v in values.items():
            self._tb.add_scalar(k, v, step)
        self._log.write(json.dumps({"step": int(step), **values}) + "\n")
        self._log.flush()

    def write_images(self, step: int, images: dict[str, np.ndarray]) -> None:
        """`images[name]`: uint8 [H, W, C]."""
        if not self.enabled:
            return
        for k, v in images.items():
            self._tb.add_image(k, np.asarray(v), step, dataformats="HWC")

    def close(self) -> None:
        if self.enabled:
            self._tb.close()
            self._log.close()
