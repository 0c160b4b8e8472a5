"""The one training loop every app runs (docs/design.md section 2.7).

An app supplies a fresh `TrainState` and a pure step `step(state, i) -> (state, metrics)`
(jitted inside; `i` is the Python index of the step, for host-side data); `TrainLoop` owns
everything around it:

- resume: the newest readable checkpoint under `WORKDIR/checkpoints` replaces the fresh state;
  a checkpoint saved with other values for the app's `fixed_keys` (the config keys that fix the
  state's shapes) is refused with a message naming them, before the app builds anything;
- the NaN/inf guard: at log steps non-finite metrics stop the run (`UserError`), a non-finite
  state is never saved, the last good checkpoint stays (`lmc_jax.checkpoint.TrainGuard`);
- preemption: SIGTERM/SIGINT save a checkpoint and exit with status 143 (`Preempted`);
- progress (a tqdm bar), metrics (TensorBoard + metrics.jsonl on process 0), checkpoints every
  `checkpoint_every` steps and after the last;
- periodic actions (`Every`): grids, held-out evaluation; their scalars are logged too.

Bit-identical resume needs each step's randomness to be `fold_in(state.key, state.step)` and its
data a function of `(seed, i)`; every app does both.

    with TrainLoop(workdir, config, steps=config.steps, fixed_keys=FIXED_KEYS,
                   desc="i2i") as loop:
        state = loop.restore(fresh_state)
        result = loop.run(state, step, every=[Every(config.eval_every, on_eval)])
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import struct

from lmc_jax import io, parallel
from lmc_jax.checkpoint import Checkpointer, Preemption, TrainGuard
from lmc_jax.writer import MetricWriter

StepFn = Callable[["TrainState", int], tuple["TrainState", dict]]


@struct.dataclass
class TrainState:
    """What every app checkpoints.

    step: int32 scalar, the number of steps done. params: what the optimizer updates.
    opt_state: the optax state. key: the run's PRNG key (step i draws from `fold_in(key, i)`),
    or None. extra: anything else the step carries (train_prior: the EMA weights), or None.
    """

    step: jax.Array
    params: Any
    opt_state: Any
    key: jax.Array | None = None
    extra: Any = None


def init_train_state(params: Any, opt_state: Any, key: jax.Array | None = None,
                     extra: Any = None) -> TrainState:
    """A state at step 0."""
    return TrainState(step=jnp.asarray(0, jnp.int32), params=params, opt_state=opt_state,
                      key=key, extra=extra)


@dataclasses.dataclass(frozen=True)
class Every:
    """A periodic action: `fn(done, state) -> {name: value} | None` after every `n` steps and
    after the last; scalar values are written with the step's metrics, uint8 [H, W, C] values as
    images. It runs on every process (an
    action that writes files checks `parallel.is_main_process()` itself)."""

    n: int
    fn: Callable[[int, TrainState], dict | None]


@dataclasses.dataclass
class LoopResult:
    """state: after the last step. start_state: fresh or resumed, before the first step run
    here (a host copy). metrics: the last step's. logged: the metrics of every log step (floats).
    seconds: wall time of the steps run here."""

    state: TrainState
    start_state: TrainState
    metrics: dict
    logged: list[dict]
    seconds: float

    @property
    def start_step(self) -> int:
        return int(self.start_state.step)


def _section(config: Any, name: str, default: Any) -> Any:
    return config.get(name, default) if hasattr(config, "get") else default


class TrainLoop:
    """Checkpointer + resume + guarded, logged steps (see the module docstring).

    `config` (ConfigDict or dict) is saved beside each checkpoint; `log_every`,
    `checkpoint_every` and `keep_checkpoints` default to its keys of those names. `hint` ends
    the message of a non-finite stop (what to lower). `show(key)` picks the metrics shown on the
    progress bar. `quiet` hides the bar.
    """

    def __init__(self, workdir: str, config: ml_collections.ConfigDict | dict, *, steps: int,
                 fixed_keys: Sequence[str] = (), desc: str = "train",
                 hint: str = "lower the learning rate", log_every: int | None = None,
                 checkpoint_every: int | None = None, keep_checkpoints: int | None = None,
                 show: Callable[[str], bool] | None = None, quiet: bool = False):
        self.workdir = workdir
        self.config = config.to_dict() if hasattr(config, "to_dict") else dict(config)
        self.steps = int(steps)
        self.fixed_keys = tuple(fixed_keys)
        self.desc, self.hint, self.quiet = desc, hint, quiet
        self.log_every = max(int(log_every or _section(config, "log_every", 100)), 1)
        self.every = int(checkpoint_every or _section(config, "checkpoint_every", 1000))
        self.keep = int(keep_checkpoints or _section(config, "keep_checkpoints", 3))
        self.show = show or (lambda k: True)
        self.ckpt: Checkpointer | None = None
        self.start_state: TrainState | None = None

    def __enter__(self) -> TrainLoop:
        self.ckpt = Checkpointer(self.workdir, every=self.every, keep=self.keep)
        try:
            if self.fixed_keys:  # refuse a changed shape before the app builds its state
                self.ckpt.check_resume(self.config, self.fixed_keys)
        except BaseException:
            self.ckpt.close()
            raise
        return self

    def __exit__(self, *exc) -> None:
        if self.ckpt is not None:
            self.ckpt.close()

    def restore(self, state: TrainState) -> TrainState:
        """The newest readable checkpoint restored into `state`'s structure, or `state`."""
        restored = self.ckpt.restore_latest(state, self.config, self.fixed_keys)
        if restored is not None:
            state = restored[0]
            logging.info("resumed from step %d", int(state.step))
        self.start_state = _host_copy(state)
        return state

    def _log_step(self, done: int) -> bool:
        return done % self.log_every == 0 or done == self.steps

    def run(self, state: TrainState, step: StepFn, every: Sequence[Every] = ()) -> LoopResult:
        """Runs the steps from `state.step` to `steps` (call `restore` first to resume)."""
        if self.start_state is None:
            self.start_state = _host_copy(state)
        state = distinct_buffers(state)
        start_step = int(state.step)
        metrics: dict = {}
        logged: list[dict] = []
        start = time.time()
        writer = MetricWriter(self.workdir, start_step=start_step)  # drops records > start
        try:
            with Preemption() as pre:
                guard = TrainGuard(self.ckpt, pre, self.config, start_step, hint=self.hint)
                bar = io.progress(range(start_step, self.steps), initial=start_step,
                                  total=self.steps, desc=self.desc, unit="step",
                                  disable=self.quiet or not parallel.is_main_process())
                for i in bar:
                    state, metrics = step(state, i)
                    done = i + 1
                    if self._log_step(done):
                        guard.check_metrics(done, metrics)
                        values = {k: float(v) for k, v in metrics.items()}
                        writer.write_scalars(done, values)
                        logged.append(values)
                        bar.set_postfix({k: f"{v:.3g}" for k, v in values.items()
                                         if self.show(k)})
                    for action in every:
                        if done % action.n == 0 or done == self.steps:
                            _write(writer, done, action.fn(done, state))
                    guard.end_of_step(done, state, last=done == self.steps)
        finally:
            writer.close()
        return LoopResult(state=state, start_state=self.start_state, metrics=metrics,
                          logged=logged, seconds=time.time() - start)


def distinct_buffers(state: Any) -> Any:
    """`state` with every array leaf that appears twice (the same object: an EMA initialized
    as the params, say) replaced by a copy: the steps donate their state, and XLA refuses to
    donate one buffer twice (and crashed doing so on CPU)."""
    seen: set[int] = set()

    def leaf(x):
        if not isinstance(x, jax.Array):
            return x
        if id(x) in seen:
            return jnp.copy(x)
        seen.add(id(x))
        return x

    return jax.tree_util.tree_map(leaf, state)


def _host_copy(state: TrainState) -> TrainState:
    """A host (numpy) copy: the apps' steps donate their state, so the device arrays of the
    state a run starts from are consumed by its first step."""
    return parallel.to_host(state)


def _write(writer: MetricWriter, step: int, out: dict | None) -> None:
    """An action's output: uint8 [H, W, C] arrays as images, the rest as scalars."""
    out = out or {}
    images = {k: v for k, v in out.items() if np.ndim(v) == 3}
    scalars = {k: v for k, v in out.items() if k not in images}
    if scalars:
        writer.write_scalars(step, scalars)
    if images:
        writer.write_images(step, images)


def train(workdir: str, config: ml_collections.ConfigDict | dict, state: TrainState,
          step: StepFn, *, steps: int, every: Sequence[Every] = (), **loop_kwargs: Any
          ) -> LoopResult:
    """`TrainLoop` in one call, for an app whose fresh state is cheap to build: restores, then
    runs. `loop_kwargs`: `TrainLoop`'s keywords (fixed_keys, desc, hint, show, quiet, ...)."""
    with TrainLoop(workdir, config, steps=steps, **loop_kwargs) as loop:
        return loop.run(loop.restore(state), step, every)
