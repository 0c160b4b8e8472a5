"""Multi-host for real: two processes joined by `jax.distributed` on localhost (2 CPU devices
each) run text-to-3D through `python -m lmc_jax.main`, against the same run in this process on
one device.

Checks: both end with exit 0; the final parameters equal the single-process run's (up to float
summation order across processes); only process 0 writes outputs (process 1 opens no file for
writing outside checkpoints/, where Orbax has every process write its own shards); metrics.jsonl
holds each step once. The exact Gaussian-mixture preset (`configs/t23d.py:mixture`) with tiny
sizes keeps the three compilations within the suite's budget on 2 busy cores.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from lmc_jax import parallel
from lmc_jax.apps import t23d
from lmc_jax.checkpoint import Checkpointer
from lmc_jax.config import load_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORKER = os.path.join(ROOT, "tests", "_multihost_worker.py")
STEPS = 3
OVERRIDES = {"steps": STEPS, "batch": 4, "render.size": 8, "render.num_coarse": 4,
             "render.num_fine": 4, "field.width": 8, "log_every": 1, "checkpoint_every": STEPS,
             "output.grid_every": 1000, "output.video_frames": 2, "output.video_size": 8,
             "output.view_size": 8, "output.mesh_resolution": 8}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(devices: int, **extra) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("JAX_", "XLA_", "SLURM_",
                                                                   "OMPI_", "TPU_"))}
    env.update(JAX_PLATFORMS="cpu", LMC_JAX_NO_REEXEC="1",
               XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}", **extra)
    return env


def _start(workdir: str, log: str, env: dict) -> subprocess.Popen:
    args = ["--config=configs/t23d.py:mixture", f"--workdir={workdir}",
            *[f"--config.{k}={v}" for k, v in OVERRIDES.items()]]
    return subprocess.Popen([sys.executable, WORKER, log, "--", *args], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    base = tmp_path_factory.mktemp("multihost")
    coord = f"127.0.0.1:{_free_port()}"
    multi = str(base / "multi")
    procs = [_start(multi, str(base / f"writes{i}.txt"),
                    _env(2, JAX_COORDINATOR_ADDRESS=coord, JAX_NUM_PROCESSES="2",
                         JAX_PROCESS_ID=str(i))) for i in range(2)]
    # The reference: the same training in this process, on one device, while they run.
    config = load_config(os.path.join(ROOT, "configs", "t23d.py"), "mixture")
    for key, value in OVERRIDES.items():
        section, _, leaf = key.rpartition(".")
        (config[section] if section else config)[leaf] = value
    one = parallel.make_mesh(1, jax.devices()[:1])
    single = t23d.train(config, str(base / "single"), mesh=one)["state"]
    outs = []
    for p in procs:
        try:
            outs.append(p.communicate(timeout=600))
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            raise
    for p, (_, err) in zip(procs, outs, strict=True):
        assert p.returncode == 0, err[-3000:]
    return {"base": base, "multi": multi, "single": jax.device_get(single), "outs": outs,
            "config": config.to_dict()}


def _final_state(workdir: str):
    """The state of the last checkpoint as numpy arrays (saved sharded over 2 processes)."""
    assert Checkpointer(workdir).steps() == [STEPS]
    path = os.path.join(workdir, "checkpoints", str(STEPS), "state")
    reader = ocp.PyTreeCheckpointer()
    meta = reader.metadata(path)
    meta = getattr(meta, "item_metadata", meta)
    args = jax.tree_util.tree_map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), meta)
    return reader.restore(path, restore_args=args)


def test_two_processes_match_one_and_only_process_0_writes(runs):
    multi = _final_state(runs["multi"])
    single = runs["single"]
    leaves_m = jax.tree_util.tree_leaves(multi["params"])
    leaves_s = jax.tree_util.tree_leaves(single.params)
    assert len(leaves_m) == len(leaves_s) > 0
    for a, b in zip(leaves_m, leaves_s, strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=2e-5, atol=2e-6)
    assert int(np.asarray(multi["step"])) == int(single.step) == STEPS
    with open(os.path.join(runs["multi"], "config.json")) as f:
        assert json.load(f)["field"] == runs["config"]["field"]

    wd = os.path.realpath(runs["multi"])
    written = {i: {os.path.realpath(p) for p in
                   (runs["base"] / f"writes{i}.txt").read_text().splitlines()} for i in range(2)}
    inside = {i: {p for p in w if p.startswith(wd + os.sep)} for i, w in written.items()}
    outputs = {i: {p for p in w if not p.startswith(os.path.join(wd, "checkpoints"))}
               for i, w in inside.items()}
    assert outputs[1] == set(), sorted(outputs[1])[:10]
    names = {os.path.relpath(p, wd) for p in outputs[0]}
    assert "metrics.jsonl" in names, sorted(names)
    # metrics.json and config.json are written atomically, via a temporary file each.
    for final in ("metrics.json", "config.json"):
        assert any(n == final or n.startswith(final + ".tmp") for n in names), sorted(names)
        assert os.path.isfile(os.path.join(wd, final))
    steps = [json.loads(line)["step"] for line in open(os.path.join(wd, "metrics.jsonl"))]
    assert steps == list(range(1, STEPS + 1))
    assert "outputs in" in runs["outs"][0][0] and "outputs in" in runs["outs"][1][0]
