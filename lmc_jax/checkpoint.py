"""Checkpoints (Orbax) and the run loop's survival kit: resume, preemption, NaN guard.

A run's state is one pytree (params, optimizer state, step, RNG key, ...). `Checkpointer`
saves it every N steps with the resolved config and a digest of the state beside it, keeps the
newest K, and restores the newest checkpoint that reads back cleanly: a partial, truncated or
corrupt newest one is skipped with a warning and moved to `checkpoints_unreadable/`. When every
checkpoint is unreadable the run stops (`UserError` saying what was found) instead of starting
over silently; `--fresh_start` (`set_fresh_start(True)`) starts over on purpose. A resume
whose config changed a key that fixes the state's shapes (`fixed_keys`) is refused with a
message naming the keys. `Preemption` turns SIGTERM/SIGINT into a flag the loop checks.
`TrainGuard` is the per-step part of the loop every app shares:

- at log steps, non-finite metrics stop the run (`UserError`) and the last good checkpoint stays;
- a checkpoint is written only for a finite state;
- on preemption it saves and raises `Preempted` (a `SystemExit` with status
  `EXIT_PREEMPTED` = 143 and a one-line message); re-running the same command resumes.

Resumed runs are bit-identical to uninterrupted ones as long as each step's randomness is
`fold_in(key, step)` and the data is a function of `(seed, step)` (every app does both).
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import signal
import sys
import time
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from lmc_jax.errors import UserError

EXIT_PREEMPTED = 143  # 128 + SIGTERM, what schedulers expect from a clean preemption exit
_DISK_FULL = (errno.ENOSPC, errno.EDQUOT)
_DISK_FULL_TEXT = ("no space left on device", "disk quota exceeded", "enospc", "resource_exhausted")


_FRESH_START = [False]  # set by lmc_jax.main --fresh_start


def set_fresh_start(allowed: bool) -> None:
    """Whether a workdir whose checkpoints are all unreadable may start over from step 0."""
    _FRESH_START[0] = bool(allowed)


class Preempted(SystemExit):
    """Raised by `TrainGuard` after saving on SIGTERM/SIGINT; exits with `EXIT_PREEMPTED`."""

    def __init__(self, step: int, directory: str):
        super().__init__(EXIT_PREEMPTED)
        self.step = step
        self.directory = directory


class Checkpointer:
    """Saves/restores `{state, config, integrity}` under `workdir/checkpoints/<step>/`."""

    def __init__(self, workdir: str, *, every: int = 1000, keep: int = 3,
                 fresh_start: bool | None = None):
        self.workdir = os.path.abspath(workdir)
        self.directory = os.path.abspath(os.path.join(workdir, "checkpoints"))
        self.every = max(int(every), 1)
        self.fresh_start = _FRESH_START[0] if fresh_start is None else bool(fresh_start)
        self._mgr = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                                 cleanup_tmp_directories=True,  # partial saves
                                                 enable_async_checkpointing=False),
        )

    def should_save(self, step: int, last: bool = False) -> bool:
        return last or step % self.every == 0

    def save(self, step: int, state: Any, config: dict | None = None) -> None:
        """Writes checkpoint `step` (blocking). A failed write leaves older ones intact."""
        integrity = {"sha256": state_digest(state), "time": time.time()}
        try:
            from lmc_jax import workdir as wd_mod

            wd_mod.commit_config(self.workdir)  # the run passed validation: config.json now
            self._mgr.save(step, args=ocp.args.Composite(
                state=ocp.args.StandardSave(state),
                config=ocp.args.JsonSave(_jsonable(config or {})),
                integrity=ocp.args.JsonSave(integrity)), force=True)
            self._mgr.wait_until_finished()
        except Exception as e:
            full = _is_disk_full(e)
            if not (full or isinstance(e, OSError)):
                raise
            older = [s for s in self.steps() if s < step]
            kept = f"checkpoint {older[-1]} is kept" if older else "no older checkpoint exists"
            what = f"{type(e).__name__}: {(str(e).splitlines() or [''])[0][:160]}"
            why = f"the disk is full ({what})" if full else what
            raise UserError(f"could not write checkpoint {step} to {self.directory}: {why}; "
                            f"{kept}; free disk space (or pick another --workdir) and run the "
                            "same command again to resume") from e

    def steps(self) -> list[int]:
        self._mgr.reload()
        return sorted(self._mgr.all_steps())

    def restore_latest(self, target: Any, config: dict | None = None,
                       fixed_keys: Sequence[str] = ()) -> tuple[Any, dict, int] | None:
        """Restores the newest readable checkpoint into the structure of `target`.

        `config`/`fixed_keys`: this run's config and the dotted keys (or `section.` prefixes)
        that fix the state's shapes; a checkpoint saved with other values for them is refused
        (UserError naming the keys). Returns `(state, config, step)` or None when there is none.
        When checkpoints exist and none reads back: UserError, unless `fresh_start`.
        """
        skipped, reasons = [], []
        result = None
        for step in reversed(self.steps()):
            try:
                saved = self._read_config(step)
            except Exception as e:  # noqa: BLE001 - any unreadable checkpoint is skipped
                self._warn_unreadable(step, e)
                skipped.append(step)
                reasons.append(_short(e))
                continue
            if config is not None and fixed_keys:
                check_resume_config(saved, config, fixed_keys, step, self.directory)
            try:
                state = self._read_state(step, target)
                _check_same_structure(target, state, step)
            except UserError:
                raise
            except Exception as e:  # noqa: BLE001
                self._warn_unreadable(step, e)
                skipped.append(step)
                reasons.append(_short(e))
                continue
            result = (state, saved, step)
            break
        if skipped and result is None and not self.fresh_start:
            found = ", ".join(map(str, skipped))
            raise UserError(f"none of the checkpoints in {self.directory} (steps {found}) reads "
                            f"back (newest: {reasons[0]}); the run stopped rather than start "
                            "over: restore the files, or add --fresh_start to move them to "
                            "checkpoints_unreadable/ and start from step 0, or use a new "
                            "--workdir")
        if skipped:
            self._set_aside(skipped)
        return result

    def read(self, step: int) -> tuple[Any, dict]:
        """`(state, config)` of checkpoint `step` as saved (nested dicts of arrays, no target)."""
        out = self._mgr.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(), config=ocp.args.JsonRestore()))
        return out.state, dict(out.config or {})

    def check_resume(self, config: dict, fixed_keys: Sequence[str]) -> int | None:
        """Refuses early (before building the state) when the newest checkpoint with a readable
        config was saved with other values for `fixed_keys`; returns its step (None: none)."""
        for step in reversed(self.steps()):
            try:
                saved = self._read_config(step)
            except Exception:  # noqa: BLE001 - restore_latest warns about it and skips it
                continue
            check_resume_config(saved, config, fixed_keys, step, self.directory)
            return step
        return None

    def _item_exists(self, step: int, item: str) -> bool:
        return os.path.isdir(os.path.join(self.directory, str(step), item))

    def _read_config(self, step: int) -> dict:
        out = self._mgr.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))
        return dict(out.config or {})

    def _read_state(self, step: int, target: Any) -> Any:
        args = {"state": ocp.args.StandardRestore(target)}
        check = self._item_exists(step, "integrity")  # older checkpoints have no digest
        if check:
            args["integrity"] = ocp.args.JsonRestore()
        out = self._mgr.restore(step, args=ocp.args.Composite(**args))
        if check:
            want = (out.integrity or {}).get("sha256")
            got = state_digest(out.state)
            if want != got:
                raise ValueError(f"the restored state's digest {got[:12]} is not the saved "
                                 f"{str(want)[:12]}")
        return out.state

    def _warn_unreadable(self, step: int, e: BaseException) -> None:
        logging.warning("checkpoint %d in %s is unreadable (%s: %s); trying an older one", step,
                        self.directory, type(e).__name__, (str(e).splitlines() or [""])[0][:200])

    def _set_aside(self, steps: list[int]) -> None:
        """Moves unreadable step folders out of the way (a new save at that step would fail)."""
        if jax.process_index() != 0:
            return
        dest = self.directory + "_unreadable"
        for step in steps:
            src = os.path.join(self.directory, str(step))
            if not os.path.isdir(src):
                continue
            os.makedirs(dest, exist_ok=True)
            target = os.path.join(dest, f"{step}-{time.strftime('%Y%m%d-%H%M%S')}")
            os.replace(src, target)
            logging.warning("moved unreadable checkpoint %d to %s", step, target)
        self._mgr.reload()

    def close(self) -> None:
        self._mgr.close()


def _short(e: BaseException) -> str:
    return f"{type(e).__name__}: {(str(e).splitlines() or [''])[0][:120]}"


def _is_disk_full(e: BaseException) -> bool:
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, OSError) and e.errno in _DISK_FULL:
            return True
        if any(s in str(e).lower() for s in _DISK_FULL_TEXT):
            return True
        e = e.__cause__ or e.__context__
    return False


def _jsonable(tree: Any) -> Any:
    return json.loads(json.dumps(tree, default=str))


def state_digest(tree: Any) -> str:
    """sha256 over the dtypes, shapes and bytes of every leaf (host-side; tree order)."""
    h = hashlib.sha256()
    for x in jax.tree_util.tree_leaves(tree):
        if isinstance(x, jax.Array) and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
            x = jax.random.key_data(x)
        a = np.ascontiguousarray(np.asarray(x))
        h.update(f"{a.dtype.str}{a.shape}".encode())
        h.update(a.tobytes())
    return h.hexdigest()


def _flatten(d: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(d, dict):
        out = {}
        for k, v in d.items():
            out.update(_flatten(v, f"{prefix}{k}."))
        return out
    return {prefix[:-1]: d}


def check_resume_config(saved: dict, current: dict, fixed_keys: Sequence[str], step: int,
                        directory: str) -> None:
    """Refuses to resume when a key in `fixed_keys` (a dotted key, or a prefix ending in '.')
    differs between the checkpoint's config and this run's; other keys may change."""
    old, new = _flatten(_jsonable(saved)), _flatten(_jsonable(current))
    if not old:  # a checkpoint saved without its config: nothing to compare
        return

    def fixed(key: str) -> bool:
        return any(key == f or (f.endswith(".") and key.startswith(f)) for f in fixed_keys)

    changed = sorted(k for k in set(old) | set(new) if fixed(k) and old.get(k) != new.get(k))
    if changed:
        diffs = ", ".join(f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in changed)
        raise UserError(f"the config changed since checkpoint {step} in {directory} ({diffs}); "
                        f"{'this key sets' if len(changed) == 1 else 'these keys set'} the "
                        "shapes of the saved state: restore the old value(s) to resume, or use "
                        "a new --workdir to start over")


def _check_same_structure(target: Any, restored: Any, step: int) -> None:
    shapes_t = [np.shape(x) for x in jax.tree_util.tree_leaves(target)]
    shapes_r = [np.shape(x) for x in jax.tree_util.tree_leaves(restored)]
    if shapes_t != shapes_r:
        raise UserError(f"checkpoint {step} has different shapes from this run's state; "
                        "the config changed a size: use a new --workdir")


class Preemption:
    """Context manager: SIGTERM/SIGINT set `.requested` instead of killing the process (a
    second SIGINT interrupts at once).

    In a multi-process job JAX's coordination service owns SIGTERM: `should_stop(step)` then
    asks `multihost_utils.reached_preemption_sync_point`, so that every process saves the same
    step together.
    """

    def __init__(self):
        self.requested = False
        self.signal = None
        self._old = {}
        self._multi = jax.process_count() > 1

    def _handler(self, signum, frame):  # noqa: ARG002
        if self.requested and signum == signal.SIGINT:  # a second Ctrl-C: stop right away
            raise KeyboardInterrupt
        self.requested = True
        self.signal = signum
        logging.warning("received signal %d: saving a checkpoint and stopping", signum)

    def should_stop(self, step: int) -> bool:
        """Whether to save and stop after `step` (call once per step, on every process)."""
        if self._multi:
            from jax.experimental import multihost_utils

            try:
                if multihost_utils.reached_preemption_sync_point(step):
                    self.requested = True
            except RuntimeError:  # no preemption service (not started by jax.distributed)
                pass
        return self.requested

    def __enter__(self) -> Preemption:
        sigs = (signal.SIGINT,) if self._multi else (signal.SIGTERM, signal.SIGINT)
        for sig in sigs:
            try:
                self._old[sig] = signal.signal(sig, self._handler)
            except ValueError:  # not the main thread
                pass
        return self

    def __exit__(self, *exc) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)
        # A SIGTERM that came after the last step's check (during its save) is not lost: the
        # process-level handler (lmc_jax.main's, which exits 143) gets it once the loop is done.
        if (exc[0] is None and self.requested and self.signal == signal.SIGTERM
                and callable(self._old.get(signal.SIGTERM))):
            signal.raise_signal(signal.SIGTERM)


def all_finite(tree: Any) -> bool:
    """True when every leaf of `tree` is finite (host-side check)."""
    for x in jax.tree_util.tree_leaves(tree):
        a = np.asarray(x)
        if jax.dtypes.issubdtype(a.dtype, np.inexact) and not np.all(np.isfinite(a)):
            return False
    return True


class TrainGuard:
    """The survival part of a train loop (see the module docstring).

        with Preemption() as pre:
            guard = TrainGuard(ckpt, pre, config.to_dict(), start_step, hint="lower lr")
            for i in range(start, steps):
                state, metrics = step_fn(state)
                if log_step: guard.check_metrics(i + 1, metrics); write...
                guard.end_of_step(i + 1, state, last=i + 1 == steps)
    """

    def __init__(self, ckpt: Checkpointer, pre: Preemption, config: dict | None,
                 start_step: int = 0, hint: str = "lower the learning rate"):
        self.ckpt = ckpt
        self.pre = pre
        self.config = config
        self.hint = hint
        self.last_good = start_step if start_step > 0 else None

    def _kept(self) -> str:
        if self.last_good is None:
            return "no checkpoint was written yet"
        return f"the last good checkpoint (step {self.last_good}) in {self.ckpt.directory} is kept"

    def non_finite(self, step: int, what: str) -> UserError:
        return UserError(f"non-finite {what} at step {step}; {self._kept()}; {self.hint}, then "
                         "run the same command again to resume from it")

    def check_metrics(self, step: int, metrics: dict) -> None:
        """Stops the run (UserError) when a logged metric is NaN/inf."""
        if not all_finite(metrics):
            bad = sorted(k for k, v in metrics.items() if not np.all(np.isfinite(np.asarray(v))))
            raise self.non_finite(step, f"metrics ({', '.join(bad)})")

    def end_of_step(self, step: int, state: Any, last: bool = False) -> bool:
        """Saves when due (or preempted), never a non-finite state; raises `Preempted` after
        the save on SIGTERM/SIGINT. Returns True when a checkpoint was written."""
        stop = self.pre.should_stop(step)
        saved = False
        if self.ckpt.should_save(step, last=last) or stop:
            if not all_finite(state):
                raise self.non_finite(step, "parameters or optimizer state")
            self.ckpt.save(step, state, self.config)
            self.last_good = step
            saved = True
        if stop:
            print(f"preempted at step {step}: checkpoint saved in {self.ckpt.directory}; run the "
                  f"same command again to resume (exit status {EXIT_PREEMPTED})", file=sys.stderr)
            raise Preempted(step, self.ckpt.directory)
        return saved
