"""The one training loop (lmc_jax.loop) on a toy problem: resume after SIGTERM is bit-identical,
a changed fixed key is refused before the app builds anything, a NaN stops the run keeping the
last good checkpoint, periodic actions run on time and their scalars are logged, and an app's
UserError passes through."""

from __future__ import annotations

import json
import os
import signal

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from lmc_jax.checkpoint import EXIT_PREEMPTED, Checkpointer, Preempted
from lmc_jax.errors import UserError
from lmc_jax.loop import Every, TrainLoop, TrainState, init_train_state, train

STEPS = 8
OPT = optax.sgd(0.1)


def _config(**changes) -> dict:
    c = {"seed": 0, "width": 3, "log_every": 2, "checkpoint_every": 4, "keep_checkpoints": 5}
    c.update(changes)
    return c


def _fresh(config: dict) -> TrainState:
    params = jnp.zeros((config["width"],))
    return init_train_state(params, OPT.init(params), jax.random.PRNGKey(config["seed"]))


@jax.jit
def _step(state: TrainState):
    """SGD on ||p - z||^2 / 2 with z ~ N(1, 1) drawn from fold_in(key, step)."""
    z = 1.0 + jax.random.normal(jax.random.fold_in(state.key, state.step), state.params.shape)
    grads = state.params - z
    updates, opt_state = OPT.update(grads, state.opt_state, state.params)
    return state.replace(step=state.step + 1, params=optax.apply_updates(state.params, updates),
                         opt_state=opt_state), {"loss": 0.5 * jnp.sum(grads**2)}


def _closed_form(config: dict, steps: int) -> np.ndarray:
    """The same recursion written out: p <- p - 0.1 (p - z_i)."""
    p = np.zeros(config["width"], np.float32)
    key = jax.random.PRNGKey(config["seed"])
    for i in range(steps):
        z = 1.0 + np.asarray(jax.random.normal(jax.random.fold_in(key, i), p.shape))
        p = p - np.float32(0.1) * (p - z)
    return p


def _jsonl(workdir) -> list[dict]:
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def test_resume_after_sigterm_is_bit_identical_and_matches_the_recursion(tmp_path):
    c = _config()
    full = train(str(tmp_path / "full"), c, _fresh(c), lambda s, i: _step(s), steps=STEPS)
    np.testing.assert_allclose(full.state.params, _closed_form(c, STEPS), rtol=1e-6)
    assert [r["step"] for r in _jsonl(tmp_path / "full")] == [2, 4, 6, 8]

    def interrupted(state, i):
        if i == 4:  # SIGTERM arrives during step 5: the loop saves step 5, then exits 143
            signal.raise_signal(signal.SIGTERM)
        return _step(state)

    cut = str(tmp_path / "cut")
    with pytest.raises(Preempted) as e:
        train(cut, c, _fresh(c), interrupted, steps=STEPS)
    assert e.value.code == EXIT_PREEMPTED and e.value.step == 5
    ckpt = Checkpointer(cut)
    assert ckpt.steps() == [4, 5]
    ckpt.close()
    res = train(cut, c, _fresh(c), lambda s, i: _step(s), steps=STEPS)
    assert res.start_step == 5 and int(res.state.step) == STEPS
    np.testing.assert_array_equal(res.state.params, full.state.params)
    np.testing.assert_array_equal(res.state.opt_state, full.state.opt_state)
    assert _jsonl(cut) == _jsonl(tmp_path / "full")


def test_a_crash_resumes_from_the_last_checkpoint_and_logs_each_step_once(tmp_path):
    """A crash after step 6 (logged, not saved) resumes from checkpoint 4; step 6 is logged
    once, with the same values as an uninterrupted run."""
    c = _config()

    def crashing(state, i):
        if i == 6:
            raise RuntimeError("the machine went away")
        return _step(state)

    with pytest.raises(RuntimeError):
        train(str(tmp_path / "crash"), c, _fresh(c), crashing, steps=STEPS)
    assert [r["step"] for r in _jsonl(tmp_path / "crash")] == [2, 4, 6]
    res = train(str(tmp_path / "crash"), c, _fresh(c), lambda s, i: _step(s), steps=STEPS)
    assert res.start_step == 4
    full = train(str(tmp_path / "full"), c, _fresh(c), lambda s, i: _step(s), steps=STEPS)
    assert _jsonl(tmp_path / "crash") == _jsonl(tmp_path / "full")
    np.testing.assert_array_equal(res.state.params, full.state.params)


def test_changed_fixed_key_is_refused_before_the_state_is_built(tmp_path):
    c = _config()
    train(str(tmp_path), c, _fresh(c), lambda s, i: _step(s), steps=4, fixed_keys=("width",))
    built = []
    with pytest.raises(UserError, match=r"width: 3 -> 5"):
        with TrainLoop(str(tmp_path), _config(width=5), steps=8, fixed_keys=("width",)):
            built.append(True)  # where an app builds its (large) state
    assert not built
    # Other keys may change: a longer run resumes from step 4.
    res = train(str(tmp_path), _config(log_every=1), _fresh(c), lambda s, i: _step(s), steps=6,
                fixed_keys=("width",))
    assert res.start_step == 4 and int(res.state.step) == 6


def test_nan_stops_the_run_and_keeps_the_last_finite_checkpoint(tmp_path):
    c = _config()

    def poisoned(state, i):
        state, m = _step(state)
        if i >= 4:  # steps 5.. go NaN
            state = state.replace(params=state.params * jnp.nan)
            m = {"loss": jnp.float32(jnp.nan)}
        return state, m

    with pytest.raises(UserError, match=r"non-finite metrics \(loss\) at step 6.*step 4.*lower"):
        train(str(tmp_path), c, _fresh(c), poisoned, steps=STEPS, hint="lower it")
    ckpt = Checkpointer(str(tmp_path))
    assert ckpt.steps() == [4]
    ckpt.close()
    assert [r["step"] for r in _jsonl(tmp_path)] == [2, 4]


def test_periodic_actions_run_every_n_and_at_the_end_and_are_logged(tmp_path):
    c = _config(log_every=100)
    seen = []

    def action(done, state):
        seen.append((done, int(state.step)))
        return {"twice_step": 2.0 * done}

    res = train(str(tmp_path), c, _fresh(c), lambda s, i: _step(s), steps=7,
                every=[Every(3, action)])
    assert seen == [(3, 3), (6, 6), (7, 7)]
    rows = _jsonl(tmp_path)
    assert [r for r in rows if "twice_step" in r] == [
        {"step": 3, "twice_step": 6.0}, {"step": 6, "twice_step": 12.0},
        {"step": 7, "twice_step": 14.0}]
    assert [r["step"] for r in rows if "loss" in r] == [7]  # the last step is always logged
    assert len(res.logged) == 1
    assert res.logged[0]["loss"] == pytest.approx(float(res.metrics["loss"]))


def test_an_apps_user_error_passes_through(tmp_path):
    c = _config()

    def bad(state, i):
        raise UserError("data.path is empty; pass --config.data.path=DIR")

    with pytest.raises(UserError, match="data.path is empty"):
        train(str(tmp_path), c, _fresh(c), bad, steps=3)


def test_a_state_holding_one_array_twice_gets_distinct_buffers():
    """The steps donate their state; one buffer cannot be donated twice (train_prior's EMA
    starts as its params), so the loop copies a repeated leaf before the first step."""
    from lmc_jax.loop import distinct_buffers

    w = jnp.arange(4.0)
    state = init_train_state({"w": w}, (), extra={"w": w})
    out = distinct_buffers(state)
    assert out.params["w"] is w and out.extra["w"] is not w
    np.testing.assert_array_equal(np.asarray(out.extra["w"]), np.asarray(w))
    step = jax.jit(lambda s: s.replace(step=s.step + 1), donate_argnums=0)
    assert int(step(out).step) == 1
