"""Metric writer: TensorBoard scalars and images (tensorboardX) plus a JSON-lines log.

Only process 0 writes (multi-host runs call every writer method on all hosts).

`metrics.jsonl` holds each step once after any resume: records at or after the resumed run's
first step are dropped from the file before it writes (`start_step`, the restored step, when
the caller knows it; otherwise the first step this writer logs), and TensorBoard is told to
purge them too. A failure to write (a full disk) is one `UserError`, also from `close()`.
"""

from __future__ import annotations

import json
import logging
import os
import sys

import jax
import numpy as np

from lmc_jax.errors import UserError


def _write_error(path: str, e: BaseException) -> UserError:
    first = (str(e).splitlines() or [""])[0][:160]
    return UserError(f"could not write metrics to {path} ({type(e).__name__}: {first}); free "
                     "disk space (or pick another --workdir) and run the same command again to "
                     "resume")


def drop_steps_from(path: str, first: int) -> int:
    """Rewrites the JSON-lines file `path` without records whose step is >= `first` (lines that
    do not parse are dropped too: a torn last line). Returns how many records were dropped."""
    if not os.path.exists(path):
        return 0
    keep, dropped = [], 0
    with open(path) as f:
        for line in f:
            try:
                rec = json.loads(line)
                step = int(rec["step"])
            except (ValueError, KeyError, TypeError):
                dropped += 1
                continue
            if step >= first:
                dropped += 1
            else:
                keep.append(line if line.endswith("\n") else line + "\n")
    if dropped:
        tmp = f"{path}.tmp{os.getpid()}"
        with open(tmp, "w") as f:
            f.writelines(keep)
        os.replace(tmp, path)
    return dropped


class MetricWriter:
    """`write_scalars(step, dict)`, `write_images(step, dict)`; files under `workdir`.

    `start_step`: the step the run resumed from (0 for a fresh run); records after it are
    dropped from metrics.jsonl and TensorBoard. Without it, the first step written decides.
    """

    def __init__(self, workdir: str, enabled: bool | None = None, start_step: int | None = None):
        self.enabled = jax.process_index() == 0 if enabled is None else enabled
        self._tb = None
        self._log = None
        self._workdir = workdir
        self._path = os.path.join(workdir, "metrics.jsonl")
        self._start = start_step
        if self.enabled:
            from lmc_jax import workdir as wd_mod

            try:
                wd_mod.commit_config(workdir)  # the app validated its config: config.json now
                os.makedirs(workdir, exist_ok=True)
                if start_step is not None:
                    drop_steps_from(self._path, int(start_step) + 1)
            except OSError as e:
                raise _write_error(self._path, e) from None

    def _open(self, first_step: int) -> None:
        """Opens the files at the first write (so that a resume's first step is known)."""
        from tensorboardX import SummaryWriter

        purge = int(self._start) + 1 if self._start is not None else int(first_step)
        try:
            if self._start is None:
                drop_steps_from(self._path, purge)
            self._tb = SummaryWriter(os.path.join(self._workdir, "tensorboard"), purge_step=purge)
            self._log = open(self._path, "a")  # noqa: SIM115
        except OSError as e:
            raise _write_error(self._path, e) from None

    def write_scalars(self, step: int, scalars: dict) -> None:
        if not self.enabled:
            return
        if self._log is None:
            self._open(step)
        values = {k: float(v) for k, v in scalars.items()}
        try:
            for k, v in values.items():
                self._tb.add_scalar(k, v, step)
            self._log.write(json.dumps({"step": int(step), **values}) + "\n")
            self._log.flush()
        except OSError as e:
            raise _write_error(self._path, e) from None

    def write_images(self, step: int, images: dict[str, np.ndarray]) -> None:
        """`images[name]`: uint8 [H, W, C]."""
        if not self.enabled:
            return
        if self._tb is None:
            self._open(step)
        for k, v in images.items():
            self._tb.add_image(k, np.asarray(v), step, dataformats="HWC")

    def close(self) -> None:
        """Closes the files; a failure is one `UserError`. Called from a `finally` while an
        error is on its way out (a full disk seen by the checkpoint save), a failure here is
        a warning and that first error stays the one reported."""
        if not self.enabled:
            return
        errors = []
        for f in (self._tb, self._log):
            if f is None:
                continue
            try:
                f.close()
            except Exception as e:  # noqa: BLE001 - tensorboardX wraps OSErrors variously
                errors.append(e)
        self._tb = self._log = None
        if errors:
            err = _write_error(self._path, errors[0])
            if sys.exc_info()[1] is not None:
                logging.warning("%s", err)
                return
            raise err from None
