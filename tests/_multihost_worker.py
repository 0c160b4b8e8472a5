"""Runs `python -m lmc_jax.main ARGS` and records every file this process opens for writing.

Usage: python tests/_multihost_worker.py WRITES_LOG -- MAIN_ARGS...

The paths go, one a line, to WRITES_LOG (which must lie outside the workdir). Used by
tests/test_multihost.py to check that only process 0 of a multi-process job writes outputs.
"""

from __future__ import annotations

import os
import runpy
import sys


def main() -> None:
    log_path, sep, *args = sys.argv[1:]
    assert sep == "--", "usage: _multihost_worker.py WRITES_LOG -- MAIN_ARGS..."
    log = open(log_path, "w", buffering=1)  # noqa: SIM115 - open for the life of the process

    def hook(event: str, payload: tuple) -> None:
        if event == "open" and payload and isinstance(payload[0], (str, bytes, os.PathLike)):
            mode = payload[1] if len(payload) > 1 else "r"
            flags = payload[2] if len(payload) > 2 else 0
            writes = (isinstance(mode, str) and any(c in mode for c in "wax+")) or (
                isinstance(flags, int) and flags & (os.O_WRONLY | os.O_RDWR))
            if writes:
                log.write(os.fsdecode(payload[0]) + "\n")
        elif event in ("os.rename", "os.replace", "os.mkdir", "os.remove", "os.rmdir"):
            if payload and isinstance(payload[0], (str, bytes, os.PathLike)):
                log.write(os.fsdecode(payload[0]) + "\n")

    sys.addaudithook(hook)
    sys.argv = ["lmc_jax.main", *args]
    runpy.run_module("lmc_jax.main", run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main()
