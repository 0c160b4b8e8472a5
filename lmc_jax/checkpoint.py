"""Checkpoints (Orbax) and the run loop's survival kit: resume, preemption, NaN guard.

A run's state is one pytree (params, optimizer state, step, RNG key, ...). `Checkpointer`
saves it every N steps with the resolved config beside it, keeps the newest K, and restores
the newest checkpoint that reads back cleanly (a partial or corrupt newest one is skipped with
a warning). `Preemption` turns SIGTERM/SIGINT into a flag the loop checks, so the loop can
save and exit cleanly with `EXIT_PREEMPTED`.
"""

from __future__ import annotations

import logging
import os
import signal
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from lmc_jax.errors import UserError

EXIT_PREEMPTED = 143  # 128 + SIGTERM, what schedulers expect from a clean preemption exit


class Checkpointer:
    """Saves/restores `{state, config}` under `workdir/checkpoints/<step>/`."""

    def __init__(self, workdir: str, *, every: int = 1000, keep: int = 3):
        self.directory = os.path.abspath(os.path.join(workdir, "checkpoints"))
        self.every = max(int(every), 1)
        self._mgr = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                                 enable_async_checkpointing=False),
        )

    def should_save(self, step: int, last: bool = False) -> bool:
        return last or step % self.every == 0

    def save(self, step: int, state: Any, config: dict | None = None) -> None:
        """Writes checkpoint `step` (blocking). A failed write leaves older ones intact."""
        try:
            self._mgr.save(step, args=ocp.args.Composite(
                state=ocp.args.StandardSave(state),
                config=ocp.args.JsonSave(config or {})), force=True)
            self._mgr.wait_until_finished()
        except OSError as e:
            raise UserError(f"could not write checkpoint {step} to {self.directory} ({e}); "
                            "free disk space or pick another --workdir; the previous checkpoint "
                            "is kept") from e

    def steps(self) -> list[int]:
        self._mgr.reload()
        return sorted(self._mgr.all_steps())

    def restore_latest(self, target: Any) -> tuple[Any, dict, int] | None:
        """Restores the newest readable checkpoint into the structure of `target`.

        Returns `(state, config, step)` or None when there is none.
        """
        for step in reversed(self.steps()):
            try:
                out = self._mgr.restore(step, args=ocp.args.Composite(
                    state=ocp.args.StandardRestore(target), config=ocp.args.JsonRestore()))
                _check_same_structure(target, out.state, step)
                return out.state, dict(out.config or {}), step
            except UserError:
                raise
            except Exception as e:  # noqa: BLE001 - any unreadable checkpoint is skipped
                logging.warning("checkpoint %d in %s is unreadable (%s); trying an older one",
                                step, self.directory, str(e).splitlines()[0][:200])
        return None

    def close(self) -> None:
        self._mgr.close()


def _check_same_structure(target: Any, restored: Any, step: int) -> None:
    shapes_t = [np.shape(x) for x in jax.tree_util.tree_leaves(target)]
    shapes_r = [np.shape(x) for x in jax.tree_util.tree_leaves(restored)]
    if shapes_t != shapes_r:
        raise UserError(f"checkpoint {step} has different shapes from this run's state; "
                        "the config changed a size: use a new --workdir")


class Preemption:
    """Context manager: SIGTERM/SIGINT set `.requested` instead of killing the process."""

    def __init__(self):
        self.requested = False
        self.signal = None
        self._old = {}

    def _handler(self, signum, frame):  # noqa: ARG002
        self.requested = True
        self.signal = signum
        logging.warning("received signal %d: saving a checkpoint and stopping", signum)

    def __enter__(self) -> Preemption:
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                self._old[sig] = signal.signal(sig, self._handler)
            except ValueError:  # not the main thread
                pass
        return self

    def __exit__(self, *exc) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)


def all_finite(tree: Any) -> bool:
    """True when every leaf of `tree` is finite (host-side check)."""
    return all(bool(np.all(np.isfinite(np.asarray(x)))) for x in jax.tree_util.tree_leaves(tree))
