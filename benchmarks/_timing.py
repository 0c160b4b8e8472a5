"""Timing, memory and setup helpers shared by the scripts in `benchmarks/` (not a public API).

The scripts run as `python benchmarks/<name>.py`, so this module is imported as `_timing` from
the script's own folder. It imports neither JAX nor torch at module level: `time_ms` takes the
function that waits for a result (`block_jax` for JAX's asynchronous dispatch, `no_sync` for
eager PyTorch on CPU).

Protocol used by every benchmark: warm up (compiles, settles the allocator), then call the
functions under comparison *alternately* and report medians, so that a change in machine load
hits all of them alike.
"""

from __future__ import annotations

import os
import platform
import random
import statistics
import time
from collections.abc import Callable

from lmc_jax import _runtime


def malloc_status() -> str:
    """Whether this process runs with the CPU malloc settings of `lmc_jax._runtime`."""
    if _runtime.fast_malloc_active():
        return "active (re-executed with " + " ".join(
            f"{k}={v}" for k, v in _runtime.FAST_MALLOC_ENV.items()) + ")"
    inherited = all(os.environ.get(k) == v for k, v in _runtime.FAST_MALLOC_ENV.items())
    return "active (inherited from the environment)" if inherited else "INACTIVE (glibc default)"


def fast_malloc_on() -> bool:
    return malloc_status().startswith("active")


def block_jax(result: object) -> object:
    """Waits for every JAX array in `result` (JAX dispatches asynchronously)."""
    import jax

    return jax.block_until_ready(result)


def no_sync(result: object) -> object:
    """For eager frameworks whose calls return finished results (PyTorch on CPU)."""
    return result


def time_ms(fn: Callable[[], object], sync: Callable[[object], object] = block_jax) -> float:
    """Wall time of one call of `fn`, in milliseconds, until `sync` says the result is ready."""
    t0 = time.perf_counter()
    sync(fn())
    return 1e3 * (time.perf_counter() - t0)


def alternate(fns: dict[str, tuple[Callable[[], object], Callable[[object], object]]],
              repeats: int, warmup: int, *, shuffle: bool = False, gap_s: float = 0.0
              ) -> dict[str, list[float]]:
    """Times the functions alternately: `fns[name] = (fn, sync)`; returns ms samples by name.

    `warmup` untimed rounds come first. Each round calls every function once, in the given order,
    or with `shuffle` in a seeded random order, so that no function always runs right after the
    same other one (a rotation would keep the neighbours); `gap_s` sleeps between calls so that
    one framework's spinning worker threads do not run into the next call.
    """
    names = list(fns)
    rng = random.Random(0)
    for _ in range(warmup):
        for name in names:
            fn, sync = fns[name]
            sync(fn())
    samples: dict[str, list[float]] = {name: [] for name in names}
    for _ in range(repeats):
        order = rng.sample(names, len(names)) if shuffle else names
        for name in order:
            if gap_s:
                time.sleep(gap_s)
            fn, sync = fns[name]
            samples[name].append(time_ms(fn, sync))
    return samples


def summary(samples: list[float]) -> dict[str, float]:
    """Median, min and max of a list of timings."""
    return {"median": statistics.median(samples), "min": min(samples), "max": max(samples)}


def device_string() -> str:
    """The CPU and its core count (the JAX platform is added by callers that import JAX)."""
    return f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores"


def load_average() -> list[float]:
    """1, 5 and 15 minute load averages (empty where the OS has none)."""
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except OSError:
        return []


# Resident memory (Linux): VmRSS is the current resident set, VmHWM its peak since the process
# started or since "5" was written to /proc/self/clear_refs (Linux >= 4.0).

def _status_kib(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def rss_mib() -> float | None:
    kib = _status_kib("VmRSS")
    return None if kib is None else kib / 1024


def peak_rss_mib() -> float | None:
    kib = _status_kib("VmHWM")
    return None if kib is None else kib / 1024


def reset_peak_rss() -> bool:
    """Resets VmHWM to the current RSS; False where the kernel does not allow it."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_rss_delta_mib(fn: Callable[[], object], sync: Callable[[object], object]
                       ) -> float | None:
    """Peak resident memory above the level before the call, during one call of `fn` (MiB).

    Meaningful only where freed memory goes back to the OS (see step_time.py's memory probe);
    None where /proc gives no answer.
    """
    if not reset_peak_rss():
        return None
    before = rss_mib()
    sync(fn())
    peak = peak_rss_mib()
    if before is None or peak is None:
        return None
    return max(peak - before, 0.0)


def save_random_bias(prior, directory: str) -> str:
    """Saves a random-init `BiasNet` of the shipped size (features 32, REFLECT) for `prior` into
    `directory` (a `guidance.bias_path`): the cost of LMC-SDS does not depend on its weights."""
    import jax
    import jax.numpy as jnp

    from lmc_jax.bias import BiasNet
    from lmc_jax.bias.store import save_bias

    module = BiasNet(features=32, padding="REFLECT")
    params = module.init(jax.random.PRNGKey(0), jnp.zeros((1, *prior.x_shape)),
                         jnp.zeros((1,), jnp.int32))["params"]
    return save_bias(directory, module, params, prior)
