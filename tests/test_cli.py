"""The command line: a real run of the testbed and one clear error line for bad input."""

import json
import os
import subprocess
import sys

import pytest
from _runs import one_error_line

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _main(*args, timeout=600):
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    return subprocess.run([sys.executable, "-m", "lmc_jax.main", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)


def test_testbed_exact_end_to_end(tmp_path):
    proc = _main("--config=configs/testbed.py:exact", f"--workdir={tmp_path}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    # SDS at w = 0 erases high frequencies; LMC-SDS with the exact b keeps them.
    assert metrics["hf_retention_sds"] < 0.5
    assert 0.95 < metrics["hf_retention_lmc_exact"] < 1.05
    assert (tmp_path / "strip.png").stat().st_size > 0
    assert (tmp_path / "config.json").exists()
    assert "hf_retention_lmc_exact" in proc.stdout


@pytest.mark.parametrize("override,needles", [
    ("--config.stpes=3", ["'stpes'", "--config.steps"]),
    ("--config.guidance.wieght=3", ["'guidance.wieght'", "--config.guidance."]),
])
def test_unknown_config_key(override, needles):
    one_error_line(_main("--config=configs/synth.py:mixture", override), *needles)


def test_empty_prompt(tmp_path):
    proc = _main("--config=configs/synth.py:mixture", "--config.prompt= ", f"--workdir={tmp_path}")
    one_error_line(proc, "prompt is empty")


def test_nonpositive_steps(tmp_path):
    proc = _main("--config=configs/synth.py:mixture", "--config.steps=0", f"--workdir={tmp_path}")
    one_error_line(proc, "steps must be > 0")


def test_missing_weights_path(tmp_path):
    missing = str(tmp_path / "no-such-sd")
    proc = _main("--config=configs/synth.py", f"--config.prior.path={missing}",
                 f"--workdir={tmp_path}")
    one_error_line(proc, missing, ":tiny")


def test_unknown_preset_and_missing_config_file():
    one_error_line(_main("--config=configs/synth.py:tyni"), "'tyni'", "tiny")
    one_error_line(_main("--config=configs/no_such.py"), "no_such.py")
