"""Bad input and interruptions outside the train loop: the workdir lock, a refused run leaves
the folder as it was, one `error:` line for OS failures, metrics.jsonl without repeated steps,
unreadable checkpoints, oversized images, --help and quiet third-party logs."""

from __future__ import annotations

import errno
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time

import pytest
from _runs import one_error_line, tree

from lmc_jax import main as main_mod
from lmc_jax import workdir as wd_mod
from lmc_jax.errors import UserError
from lmc_jax.writer import MetricWriter

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _cli(*args, timeout=300):
    env = dict(os.environ, JAX_PLATFORMS="cpu", LMC_JAX_NO_REEXEC="1")
    return subprocess.run([sys.executable, "-m", "lmc_jax.main", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)


@pytest.fixture
def holder(tmp_path):
    """A second process holding the lock of tmp_path/busy."""
    wd = tmp_path / "busy"
    code = ("import sys, time; from lmc_jax.workdir import WorkdirLock; "
            f"WorkdirLock({str(wd)!r}, command='the holder').acquire(); "
            "print('held', flush=True); time.sleep(120)")
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, stdout=subprocess.PIPE,
                            text=True)
    assert proc.stdout.readline().strip() == "held"
    yield wd, proc
    proc.kill()
    proc.wait()


def test_busy_workdir_names_the_other_process(holder):
    wd, proc = holder
    with pytest.raises(UserError, match=rf"in use by another run: pid {proc.pid} on host "
                                        rf"{socket.gethostname()}, started .*the holder"):
        wd_mod.WorkdirLock(str(wd)).acquire()
    # The CLI stops at once, before loading any app, and leaves the folder alone.
    before = tree(wd)
    cli = _cli("--config=configs/synth.py:mixture", f"--workdir={wd}")
    one_error_line(cli, f"pid {proc.pid}", "pick another --workdir")
    assert tree(wd) == before


def test_stale_lock_is_taken_over_with_a_note(tmp_path, caplog):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    wd = tmp_path / "stale"
    wd.mkdir()
    (wd / ".lock").write_text(json.dumps({"host": socket.gethostname(), "pid": dead.pid,
                                          "start": time.time() - 60}))
    with caplog.at_level(logging.WARNING):
        lock = wd_mod.WorkdirLock(str(wd)).acquire()
    assert f"pid {dead.pid}" in lock.note and "taking over" in caplog.text
    assert json.loads((wd / ".lock").read_text())["pid"] == os.getpid()
    lock.release()
    assert not (wd / ".lock").exists()


def test_workdir_that_is_a_file_or_unwritable(tmp_path, monkeypatch):
    f = tmp_path / "file"
    f.write_text("x")
    with pytest.raises(UserError, match=r"is a file, not a folder; pick another --workdir"):
        wd_mod.WorkdirLock(str(f)).acquire()
    cli = _cli("--config=configs/synth.py:mixture", f"--workdir={f}")
    one_error_line(cli, "is a file")
    assert f.read_text() == "x"

    real_open = os.open

    def read_only(path, flags, *args):
        if str(path).endswith(wd_mod.LOCK_NAME):
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), path)
        return real_open(path, flags, *args)

    monkeypatch.setattr(os, "open", read_only)
    fresh = tmp_path / "ro"
    with pytest.raises(UserError, match=r"not writable \(Read-only file system\)"):
        wd_mod.WorkdirLock(str(fresh)).acquire()
    assert not fresh.exists()  # the folder it created is gone again


def test_os_failures_become_one_line():
    full = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), "/x/metrics.jsonl")
    try:
        try:
            raise full
        except OSError as e:
            raise RuntimeError("tensorboard flush failed") from e
    except RuntimeError as wrapped:
        line = main_mod._one_line(wrapped)
    assert line.startswith("the disk is full at /x/metrics.jsonl") and "free disk space" in line
    ro = OSError(errno.EROFS, os.strerror(errno.EROFS), "/ro/config.json")
    assert "cannot write at /ro/config.json" in main_mod._one_line(ro)
    assert main_mod._one_line(ValueError("a bug")) is None


def test_refused_run_leaves_the_folder_as_it_was(tmp_path):
    """A new workdir is removed again; an existing one keeps its bytes (config.json too)."""
    from ml_collections import ConfigDict

    config = ConfigDict({"app": "no_such_app", "seed": 0})
    new = tmp_path / "new"
    with pytest.raises(UserError, match="no_such_app"):
        main_mod.train_and_evaluate(config, str(new))
    assert not new.exists()
    old = tmp_path / "old"
    (old / "checkpoints" / "5").mkdir(parents=True)
    (old / "config.json").write_text('{"app": "earlier"}\n')
    before = tree(old)
    with pytest.raises(UserError):
        main_mod.train_and_evaluate(config, str(old))
    assert tree(old) == before


def test_config_json_is_written_only_when_the_run_starts(tmp_path):
    wd = tmp_path / "run"
    lock = wd_mod.WorkdirLock(str(wd)).acquire()
    wd_mod.set_pending_config(str(wd), '{"app": "x"}\n')
    assert not (wd / "config.json").exists()
    MetricWriter(str(wd))  # an app creates it after validating its config
    assert json.loads((wd / "config.json").read_text()) == {"app": "x"}
    lock.release()
    assert sorted(os.listdir(wd)) == ["config.json"]


def _steps(path) -> list[int]:
    return [json.loads(line)["step"] for line in open(path)]


@pytest.mark.parametrize("known_start", [True, False])
def test_metrics_jsonl_holds_each_step_once_after_a_resume(tmp_path, known_start):
    wd = str(tmp_path)
    w = MetricWriter(wd, enabled=True)
    for s in range(1, 8):  # killed after step 7; the newest checkpoint is step 4
        w.write_scalars(s, {"loss": s})
    w.close()
    w = MetricWriter(wd, enabled=True, start_step=4 if known_start else None)
    for s in range(5, 11):
        w.write_scalars(s, {"loss": 10 * s})
    w.close()
    path = os.path.join(wd, "metrics.jsonl")
    assert _steps(path) == list(range(1, 11))
    losses = [json.loads(line)["loss"] for line in open(path)]
    assert losses == [1, 2, 3, 4] + [10.0 * s for s in range(5, 11)]


def test_writer_close_on_a_full_disk_is_one_user_error(tmp_path):
    w = MetricWriter(str(tmp_path), enabled=True)
    w.write_scalars(1, {"loss": 1.0})

    class Full:
        def close(self):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    w._log = Full()
    with pytest.raises(UserError, match=r"could not write metrics .*No space left.*free disk"):
        w.close()
    # In a `finally` after the checkpoint save failed: that first error is the one reported.
    w = MetricWriter(str(tmp_path), enabled=True)
    w.write_scalars(2, {"loss": 1.0})
    w._log = Full()
    with pytest.raises(UserError, match=r"could not write checkpoint 4"):
        try:
            raise UserError("could not write checkpoint 4: the disk is full")
        finally:
            w.close()


def test_every_checkpoint_unreadable_stops_unless_fresh_start(tmp_path):
    import jax.numpy as jnp

    from lmc_jax.checkpoint import Checkpointer

    wd = str(tmp_path)
    state = {"w": jnp.arange(4.0), "step": jnp.asarray(2)}
    ckpt = Checkpointer(wd, every=2)
    for step in (2, 4):
        ckpt.save(step, state, {"x": 1})
    ckpt.close()
    for step in (2, 4):  # the files are gone, the folders stay
        for d, _, files in os.walk(os.path.join(wd, "checkpoints", str(step))):
            for name in files:
                os.remove(os.path.join(d, name))
    ckpt = Checkpointer(wd, every=2)
    with pytest.raises(UserError, match=r"none of the checkpoints .*steps 4, 2.*--fresh_start"):
        ckpt.restore_latest(state)
    assert ckpt.steps() == [2, 4]  # nothing moved without the flag
    ckpt.close()
    ckpt = Checkpointer(wd, every=2, fresh_start=True)
    assert ckpt.restore_latest(state) is None
    assert ckpt.steps() == []
    assert len(os.listdir(os.path.join(wd, "checkpoints_unreadable"))) == 2
    ckpt.close()


def test_decompression_bomb_in_data_path_is_one_user_error(tmp_path, monkeypatch):
    """PIL refuses images over 2 * MAX_IMAGE_PIXELS (a 14000x14000 one by default); the limit
    is lowered here so that a 100x100 image stands in for it."""
    from PIL import Image

    from lmc_jax.data.folder import image_dataset

    folder = tmp_path / "images"
    folder.mkdir()
    Image.new("RGB", (40, 40), (200, 0, 0)).save(folder / "small.png")
    Image.new("L", (100, 100)).save(folder / "huge.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 2000)  # 40x40 = 1600 passes, 100x100 not
    with pytest.raises(UserError, match=r"huge\.png.* too large to decode safely.*downscale"):
        image_dataset(str(folder), 32, str(tmp_path / "cache"))


def test_help_lists_apps_presets_and_keys():
    proc = subprocess.run([sys.executable, "-m", "lmc_jax.main", "--help"], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    for name in sorted(os.listdir(os.path.join(ROOT, "configs"))):
        if name.endswith(".py"):
            assert f"  {name[:-3]} " in out, name
    assert "presets: tiny, mixture" in out and "guidance.w" in out and "--fresh_start" in out


def test_third_party_info_is_filtered_ours_kept():
    f = main_mod._OwnInfoOnly()

    def record(path, level):
        return logging.LogRecord("x", level, path, 1, "m", None, None)

    ours = os.path.join(ROOT, "lmc_jax", "apps", "t23d.py")
    orbax = os.path.join("site-packages", "orbax", "checkpoint", "x.py")
    assert f.filter(record(ours, logging.INFO))
    assert not f.filter(record(orbax, logging.INFO))
    assert f.filter(record(orbax, logging.WARNING))


def test_sigterm_during_startup_exits_143(tmp_path):
    env = dict(os.environ, JAX_PLATFORMS="cpu", LMC_JAX_NO_REEXEC="1")
    proc = subprocess.Popen([sys.executable, "-m", "lmc_jax.main",
                             "--config=configs/synth.py:mixture", f"--workdir={tmp_path / 'w'}"],
                            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    time.sleep(1.0)  # importing absl/JAX or loading the config
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err[-2000:]
    assert "Traceback" not in err and "run the same command again" in err, err[-2000:]
    assert not os.path.exists(tmp_path / "w" / ".lock")


def test_sigterm_after_the_last_steps_check_reaches_the_process_handler():
    """SIGTERM during the last save: the loop ends normally, then main's handler (exit 143)
    gets the signal instead of the run writing its outputs as if nothing had happened."""
    from lmc_jax.checkpoint import Preemption

    seen = []
    old = signal.signal(signal.SIGTERM, lambda s, f: seen.append(s))
    try:
        with Preemption() as pre:
            signal.raise_signal(signal.SIGTERM)
            assert pre.requested and seen == []  # the loop's handler took it
        assert seen == [signal.SIGTERM]
    finally:
        signal.signal(signal.SIGTERM, old)
