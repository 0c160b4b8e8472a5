"""Process-level runtime settings applied once, before JAX allocates anything.

On CPU, glibc malloc hands XLA's large per-step temporaries back to the OS after every step
and JAX pays for it in page faults (measured: a jitted SDS step at batch 4 took 652 ms with the
default allocator and 243 ms with the settings below). glibc reads these variables only at
process start, so `configure` can set them for child processes only; `lmc_jax.main` re-executes
itself once with them set (see `maybe_reexec_with_fast_malloc`). Users who embed lmc_jax in
their own process can export them in the shell (BUILD.md).

Every entry point that calls `maybe_reexec_with_fast_malloc` (lmc_jax.main, lmc_jax.plan and
the scripts in benchmarks/) also turns on Python's fault handler: a crash in native code (a
segmentation fault in XLA, say) prints the Python stack of every thread to stderr instead of
ending the process silently.
"""

from __future__ import annotations

import faulthandler
import os
import sys

FAST_MALLOC_ENV = {
    "MALLOC_ARENA_MAX": "1",
    "MALLOC_MMAP_MAX_": "0",
    "MALLOC_TRIM_THRESHOLD_": "100000000000",
}
_REEXEC_MARK = "LMC_JAX_REEXECED"


def configure() -> None:
    """Sets environment defaults that must precede the first JAX import (idempotent)."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    for key, value in FAST_MALLOC_ENV.items():
        os.environ.setdefault(key, value)


def fast_malloc_active() -> bool:
    """True when this process started with the fast-malloc settings (glibc read them)."""
    return os.environ.get(_REEXEC_MARK) == "1"


def maybe_reexec_with_fast_malloc(argv: list[str]) -> None:
    """Re-executes the current Python command once so that glibc sees FAST_MALLOC_ENV.

    Only on Linux, only when not already done, and never when LMC_JAX_NO_REEXEC=1. Turns on
    the fault handler first (here and, by PYTHONFAULTHANDLER, in the re-executed process).
    """
    if not faulthandler.is_enabled():
        faulthandler.enable()
    os.environ.setdefault("PYTHONFAULTHANDLER", "1")
    if sys.platform != "linux" or os.environ.get("LMC_JAX_NO_REEXEC") == "1":
        return
    if os.environ.get(_REEXEC_MARK) == "1":
        return
    env = dict(os.environ)
    env.update(FAST_MALLOC_ENV)
    env[_REEXEC_MARK] = "1"
    os.execve(sys.executable, [sys.executable, *argv], env)
