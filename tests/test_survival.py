"""Runs survive interruption (lmc_jax.checkpoint): exact resume, SIGTERM, NaN, corrupt
checkpoints, changed configs and full disks, on the bias-training and text-to-3D apps.

Every test here compiles the same tiny steps: the module shares them through JAX's persistent
compilation cache (a temporary folder, shared by pytest-xdist workers and handed to the
subprocess of the SIGTERM test).
"""

from __future__ import annotations

import errno
import glob
import logging
import os
import shutil
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from _runs import tree

from lmc_jax import writer as writer_mod
from lmc_jax.apps import t23d
from lmc_jax.bias import fit as bias_app  # the b_psi training (configs/bias.py runs it)
from lmc_jax.checkpoint import (
    EXIT_PREEMPTED,
    Checkpointer,
    Preempted,
    all_finite,
    check_resume_config,
)
from lmc_jax.config import load_config
from lmc_jax.errors import UserError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIAS_STEPS, BIAS_EVERY = 150, 50
# The same run as python -m lmc_jax.main --config=configs/bias.py:quick plus these overrides.
BIAS_OVERRIDES = {"prior.resolution": 16, "train.batch": 8, "bias.features": 8,
                  "train.steps": BIAS_STEPS, "checkpoint_every": BIAS_EVERY, "log_every": 25}
CACHE_KEYS = ("jax_compilation_cache_dir", "jax_persistent_cache_min_compile_time_secs",
              "jax_persistent_cache_min_entry_size_bytes")


def _load_config(name: str, preset: str):
    return load_config(os.path.join(ROOT, "configs", f"{name}.py"), preset)


def bias_config(**changes):
    c = _load_config("bias", "quick")
    for key, value in {**BIAS_OVERRIDES, **changes}.items():
        section, _, leaf = key.rpartition(".")
        (c[section] if section else c)[leaf] = value
    return c


def t23d_config():
    c = _load_config("t23d", "mixture")
    c.steps = 4
    c.render.size, c.render.num_coarse, c.render.num_fine = 16, 8, 8
    c.field.width = 16
    c.log_every, c.checkpoint_every, c.output.grid_every = 1, 2, 1000
    return c


@pytest.fixture(scope="module", autouse=True)
def compile_cache(tmp_path_factory):
    from jax.experimental.compilation_cache import compilation_cache as cc

    # Under pytest-xdist the workers share one cache (their basetemps' common parent).
    shared = os.environ.get("PYTEST_XDIST_WORKER") is not None
    base = tmp_path_factory.getbasetemp()
    path = str(base.parent / "lmc_jax_compile_cache" if shared else base / "jax_cache")
    os.makedirs(path, exist_ok=True)
    old = {k: jax.config.values[k] for k in CACHE_KEYS}
    for key, value in zip(CACHE_KEYS, (path, 0.0, 0), strict=True):
        jax.config.update(key, value)
    cc.reset_cache()  # re-read the settings even if this process compiled before
    yield path
    for key, value in old.items():
        jax.config.update(key, value)
    cc.reset_cache()


def _preempt_at(monkeypatch, step: int) -> None:
    """SIGTERM to this process right after the metrics of `step` are written."""
    write = writer_mod.MetricWriter.write_scalars

    def write_then_signal(self, s, scalars):
        write(self, s, scalars)
        if s == step:
            signal.raise_signal(signal.SIGTERM)

    monkeypatch.setattr(writer_mod.MetricWriter, "write_scalars", write_then_signal)


def _assert_same(a, b) -> None:
    jax.tree_util.tree_map(np.testing.assert_array_equal, jax.device_get(a), jax.device_get(b))


@pytest.fixture(scope="module")
def bias_runs(tmp_path_factory):
    """One uninterrupted b_psi run, and one stopped by SIGTERM at step 75 then resumed."""
    full = str(tmp_path_factory.mktemp("bias_full"))
    _, params_full, _, _ = bias_app.train_bias(bias_config(), full, quiet=True)
    cut = str(tmp_path_factory.mktemp("bias_cut"))
    with pytest.MonkeyPatch.context() as mp:
        _preempt_at(mp, 75)
        with pytest.raises(Preempted) as stop:
            bias_app.train_bias(bias_config(), cut, quiet=True)
    assert stop.value.code == EXIT_PREEMPTED and stop.value.step == 75
    assert Checkpointer(cut).steps() == [50, 75]
    _, params_cut, _, _ = bias_app.train_bias(bias_config(), cut, quiet=True)
    return {"full": full, "cut": cut, "params_full": params_full, "params_cut": params_cut}


def test_bias_resume_is_bit_identical(bias_runs):
    _assert_same(bias_runs["params_full"], bias_runs["params_cut"])


@pytest.fixture(scope="module")
def t23d_runs(tmp_path_factory):
    full = str(tmp_path_factory.mktemp("t23d_full"))
    state_full = t23d.train(t23d_config(), full)["state"]
    cut = str(tmp_path_factory.mktemp("t23d_cut"))
    with pytest.MonkeyPatch.context() as mp:
        _preempt_at(mp, 1)  # not a checkpoint step: the preemption save writes step 1
        with pytest.raises(Preempted):
            t23d.train(t23d_config(), cut)
    assert Checkpointer(cut).steps() == [1]
    state_cut = t23d.train(t23d_config(), cut)["state"]
    return {"full": full, "cut": cut, "state_full": state_full, "state_cut": state_cut}


def test_t23d_resume_is_bit_identical(t23d_runs):
    _assert_same(t23d_runs["state_full"], t23d_runs["state_cut"])


def test_shape_changing_config_is_refused_with_the_keys(t23d_runs, bias_runs, tmp_path):
    c = t23d_config()
    c.field.width = 32
    with pytest.raises(UserError, match=r"field\.width: 16 -> 32.*new --workdir"):
        t23d.train(c, t23d_runs["cut"])
    wd = str(tmp_path / "bias")
    shutil.copytree(bias_runs["full"], wd)
    with pytest.raises(UserError, match=r"bias\.features: 8 -> 16"):
        bias_app.train_bias(bias_config(**{"bias.features": 16}), wd, quiet=True)
    # Harmless changes resume: the run is already at its last step, nothing is recomputed.
    _, params, _, _ = bias_app.train_bias(bias_config(log_every=7, keep_checkpoints=5), wd,
                                          quiet=True)
    _assert_same(params, bias_runs["params_full"])


def test_refused_runs_leave_the_workdir_as_it_was(t23d_runs, tmp_path):
    """Through lmc_jax.main: a resume that changes field.width keeps the folder's config.json
    and everything else byte for byte; an unknown prompt leaves no workdir behind."""
    from lmc_jax import main

    wd = str(tmp_path / "cut")
    shutil.copytree(t23d_runs["cut"], wd)
    with open(os.path.join(wd, "config.json"), "w") as f:
        f.write(t23d_config().to_json_best_effort(indent=2) + "\n")
    before = tree(wd)
    c = t23d_config()
    c.field.width = 32
    with pytest.raises(UserError, match=r"field\.width: 16 -> 32"):
        main.train_and_evaluate(c, wd)
    assert tree(wd) == before
    c = t23d_config()
    c.prompt = "a purple zebra"
    new = tmp_path / "new"
    with pytest.raises(UserError, match="zebra|purple"):
        main.train_and_evaluate(c, str(new))
    assert not new.exists()


def test_resume_config_check_allows_steps_logging_and_outputs():
    saved = {"steps": 10, "log_every": 5, "output": {"video_size": 64}, "field": {"width": 16}}
    new = {"steps": 20, "log_every": 1, "output": {"video_size": 128}, "field": {"width": 16}}
    check_resume_config(saved, new, ("field.",), 10, "dir")
    new["field"]["width"] = 8
    with pytest.raises(UserError, match=r"field\.width: 16 -> 8"):
        check_resume_config(saved, new, ("field.",), 10, "dir")


def _corrupt_newest(workdir: str) -> int:
    """Truncates the biggest file of the newest checkpoint's state to half its size."""
    step = Checkpointer(workdir).steps()[-1]
    files = [f for f in glob.glob(os.path.join(workdir, "checkpoints", str(step), "state", "**"),
                                  recursive=True) if os.path.isfile(f)]
    biggest = max(files, key=os.path.getsize)
    with open(biggest, "r+b") as f:
        f.truncate(os.path.getsize(biggest) // 2)
    return step


def test_corrupt_newest_checkpoint_falls_back_to_the_previous(bias_runs, tmp_path, caplog):
    wd = str(tmp_path / "bias")
    shutil.copytree(bias_runs["full"], wd)
    assert _corrupt_newest(wd) == BIAS_STEPS
    with caplog.at_level(logging.WARNING):
        _, params, _, _ = bias_app.train_bias(bias_config(), wd, quiet=True)
    assert f"checkpoint {BIAS_STEPS} in" in caplog.text and "unreadable" in caplog.text
    # It resumed from step 100, re-ran the last 50 steps, and ends where the full run ended.
    _assert_same(params, bias_runs["params_full"])
    assert Checkpointer(wd).steps() == [100, 150]
    assert len(os.listdir(os.path.join(wd, "checkpoints_unreadable"))) == 1


def test_flipped_byte_is_caught_by_the_digest(bias_runs, tmp_path, caplog):
    """Same size, one byte flipped in the newest state: not restored silently."""
    wd = str(tmp_path / "bias")
    shutil.copytree(bias_runs["full"], wd)
    files = [f for f in glob.glob(os.path.join(wd, "checkpoints", str(BIAS_STEPS), "state", "**"),
                                  recursive=True) if os.path.isfile(f)]
    biggest = max(files, key=os.path.getsize)
    with open(biggest, "rb") as f:
        data = bytearray(f.read())
    data[len(data) // 2] ^= 0xFF
    with open(biggest, "wb") as f:
        f.write(bytes(data))
    with caplog.at_level(logging.WARNING):
        _, params, _, _ = bias_app.train_bias(bias_config(), wd, quiet=True)
    assert f"checkpoint {BIAS_STEPS} in" in caplog.text and "unreadable" in caplog.text
    _assert_same(params, bias_runs["params_full"])


def test_nan_stops_the_run_and_keeps_the_last_finite_checkpoint(monkeypatch, tmp_path):
    """A NaN batch at step 76 poisons the state; the save at 100 is refused, 50 stays."""
    make_source = bias_app.make_source

    def poisoned(*args, **kwargs):
        source = make_source(*args, **kwargs)

        def batch(step):
            x, emb = source(step)
            return (x * np.nan if step == 75 else x), emb

        return batch

    monkeypatch.setattr(bias_app, "make_source", poisoned)
    for log_every, what in ((1000, "parameters or optimizer state"), (25, r"metrics \(")):
        wd = str(tmp_path / f"log{log_every}")
        with pytest.raises(UserError, match=rf"non-finite {what}.* at step 100; the last good "
                                            r"checkpoint \(step 50\)"):
            bias_app.train_bias(bias_config(log_every=log_every), wd, quiet=True)
        ckpt = Checkpointer(wd)
        assert ckpt.steps() == [50]
        state, saved_config = ckpt.read(50)
        assert all_finite(state) and saved_config["train"]["steps"] == BIAS_STEPS


def test_full_disk_is_a_clear_error_and_keeps_the_previous_checkpoint(monkeypatch, tmp_path):
    save = ocp.CheckpointManager.save

    def full_disk(self, step, *args, **kwargs):
        if step == 100:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return save(self, step, *args, **kwargs)

    monkeypatch.setattr(ocp.CheckpointManager, "save", full_disk)
    wd = str(tmp_path)
    with pytest.raises(UserError, match=r"checkpoint 100 .*the disk is full.*checkpoint 50 is "
                                        r"kept; free disk space"):
        bias_app.train_bias(bias_config(), wd, quiet=True)
    monkeypatch.setattr(ocp.CheckpointManager, "save", save)
    assert Checkpointer(wd).steps() == [50]


def test_sigterm_saves_exits_143_and_the_same_command_finishes(bias_runs, compile_cache,
                                                               tmp_path):
    """The CLI under a real SIGTERM; the finished run equals the uninterrupted one."""
    wd = str(tmp_path / "run")
    cmd = [sys.executable, "-m", "lmc_jax.main", "--config=configs/bias.py:quick",
           f"--workdir={wd}", *[f"--config.{k}={v}" for k, v in BIAS_OVERRIDES.items()]]
    env = dict(os.environ, LMC_JAX_NO_REEXEC="1", JAX_COMPILATION_CACHE_DIR=compile_cache,
               JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
               JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    first = os.path.join(wd, "checkpoints", str(BIAS_EVERY))
    deadline = time.time() + 300
    while not os.path.isdir(first) and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    assert proc.poll() is None, f"the run ended before its first checkpoint: {proc.stderr.read()}"
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == EXIT_PREEMPTED, err[-3000:]
    assert "preempted at step" in err and "run the same command again" in err, err[-3000:]
    assert "Traceback" not in err, err[-3000:]
    stopped = Checkpointer(wd).steps()[-1]
    assert BIAS_EVERY <= stopped < BIAS_STEPS

    again = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    assert Checkpointer(wd).steps()[-1] == BIAS_STEPS
    from lmc_jax.bias.store import load_bias
    from lmc_jax.priors.factory import build_prior

    _, params, _ = load_bias(os.path.join(wd, "bias"), build_prior(bias_config().prior))
    _assert_same(params, bias_runs["params_full"])
