"""Helpers for tests that run lmc_jax as a user would: a folder's exact contents, and the one
`error:` line a bad input must end with."""

from __future__ import annotations

import os
import subprocess

from lmc_jax import workdir


def tree(path: str | os.PathLike) -> dict:
    """{relative path: bytes} of every file under `path` (and the folders, as None)."""
    return workdir.snapshot(path) or {}


def one_error_line(proc: subprocess.CompletedProcess, *needles: str) -> str:
    """Asserts exit 2, no traceback and a last stderr line `error: ...` holding `needles`."""
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = [ln for ln in proc.stderr.strip().splitlines() if ln.strip()]
    assert lines and lines[-1].startswith("error: "), proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-2000:]
    for needle in needles:
        assert needle in lines[-1], lines[-1]
    return lines[-1]
