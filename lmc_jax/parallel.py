"""Data (and optional model) parallelism with `jax.sharding` (docs/design.md section 2.6).

One 2-D mesh over all devices with axes `('data', 'model')`:
- the batch (t23d's cameras/views, bias training's images, synth's `x`) is split over `data`
  along its leading axis;
- params and optimizer state are replicated;
- with `parallel.model_axis = M > 1` the frozen prior's large arrays (UNet kernels) are split
  over `model`: the last axis of every array with >= 2 dims, at least `min_size` elements and
  a last axis that `M` divides; everything else is replicated.

`jax.jit` with in/out shardings (and `with_sharding_constraint` inside the steps) does the
rest: XLA inserts the gradient all-reduce. No `pmap`. A run gives the same result (up to float
summation order) on any number of devices; test it on a CPU with
`XLA_FLAGS=--xla_force_host_platform_device_count=8`.

Multi-host jobs: `maybe_initialize_distributed()` (called by `lmc_jax.main` before anything
touches a device) starts `jax.distributed` when the environment is a multi-process job, and only
process 0 writes outputs (`is_main_process()`). Every process builds the same global batch (the
data sources are deterministic in `(seed, step)`) and keeps its own shards of it.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
from collections.abc import Iterator, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from lmc_jax.errors import UserError

DATA = "data"
MODEL = "model"
MIN_MODEL_SHARD_SIZE = 1 << 14  # arrays smaller than this (elements) stay replicated


def make_mesh(model: int = 1, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A `('data', 'model')` mesh over `devices` (default: all), `model` devices per model group."""
    devices = list(jax.devices() if devices is None else devices)
    n = len(devices)
    model = int(model)
    if model < 1 or n % model:
        raise UserError(f"parallel.model_axis={model} must be >= 1 and divide the number of "
                        f"devices ({n}); set --config.parallel.model_axis to one of "
                        f"{[m for m in range(1, n + 1) if n % m == 0]}")
    # jax.make_mesh orders the devices by the physical topology (TPU/GPU interconnect).
    return jax.make_mesh((n // model, model), (DATA, MODEL),
                         axis_types=(AxisType.Auto, AxisType.Auto), devices=devices)


AUTO = "auto"


def auto_model_axis(batch: int | None, n: int) -> int:
    """`parallel.model_axis='auto'`: the smallest model group that lets `batch` split over the
    rest, i.e. `data = gcd(batch, n)` and `model = n / data` (no batch known: model = 1).

    So a batch that fills the devices is pure data parallelism, and t23d's default single view
    on a 4-chip slice splits the prior 4 ways over `model` instead of being refused."""
    if not batch or batch < 1:
        return 1
    return n // math.gcd(int(batch), n)


def config_batch(config: Any) -> int | None:
    """The per-step batch an app's config splits over `data` (`batch`, or `train.batch`)."""
    if not hasattr(config, "get"):
        return None
    if config.get("batch", None) is not None:
        return int(config.get("batch"))
    train = config.get("train", None)
    if train is not None and hasattr(train, "get") and train.get("batch", None) is not None:
        return int(train.get("batch"))
    return None


def model_axis_of(config: Any, n: int, batch: int | None = None) -> tuple[int, bool]:
    """`(model, automatic)`: the config's `parallel.model_axis` for `n` devices ('auto' or a
    number, default 1). `batch` defaults to `config_batch(config)`."""
    par = config.get("parallel", None) if hasattr(config, "get") else None
    value = par.get("model_axis", 1) if par is not None else 1
    if str(value).strip().lower() == AUTO:
        return auto_model_axis(batch if batch is not None else config_batch(config), n), True
    try:
        return int(value), False
    except (TypeError, ValueError):
        raise UserError(f"parallel.model_axis={value!r} must be 'auto' or a number of devices "
                        "per model group, e.g. --config.parallel.model_axis=2") from None


_SAID: set[tuple[int, int, int]] = set()  # automatic splits already announced


def mesh_from_config(config: Any, devices: Sequence[jax.Device] | None = None,
                     batch: int | None = None) -> Mesh:
    """The mesh for a config's optional `parallel.model_axis` (default 1; 'auto': see
    `auto_model_axis`, announced in one log line when there is more than one device)."""
    devices = list(jax.devices() if devices is None else devices)
    model, automatic = model_axis_of(config, len(devices), batch)
    mesh = make_mesh(model, devices)
    said = (len(devices), data_size(mesh), model)
    if automatic and len(devices) > 1 and said not in _SAID:
        _SAID.add(said)
        b = batch if batch is not None else config_batch(config)
        logging.warning("parallel: %d devices -> data=%d x model=%d (parallel.model_axis=auto, "
                        "batch=%s)%s", len(devices), data_size(mesh), model, b,
                        "" if model == 1 else f"; --config.batch={len(devices)} (or a multiple)"
                        " makes it pure data parallelism")
    return mesh


def data_size(mesh: Mesh) -> int:
    return int(mesh.shape[DATA])


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Leading axis split over `data`, the rest replicated (any rank >= 1)."""
    return NamedSharding(mesh, P(DATA))


def _leaf_batch_sharding(mesh: Mesh, x: Any) -> NamedSharding:
    return batch_sharding(mesh) if np.ndim(x) >= 1 else replicated(mesh)


def check_batch(batch: int, mesh: Mesh, key: str) -> None:
    """A clear error when `batch` (config key `key`) does not split evenly over `data`."""
    n = data_size(mesh)
    if batch % n:
        par = "" if mesh.shape[MODEL] == 1 else f" ({mesh.size} devices / parallel.model_axis=" \
                                                f"{mesh.shape[MODEL]})"
        raise UserError(f"{key}={batch} does not split over the {n}-way data axis{par}: set "
                        f"--config.{key} to a multiple of {n}")


_ABSTRACT: list[bool] = []


@contextlib.contextmanager
def abstract_placement() -> Iterator[None]:
    """Inside: placing a pytree (`replicate`, `shard_batch`, `shard_params`) returns
    `jax.ShapeDtypeStruct`s carrying the shardings instead of device arrays. An app's own setup
    then builds its step for devices this host cannot hold arrays on (a TPU slice described by
    `jax.experimental.topologies`), ready for `jitted.lower(...)` (lmc_jax.plan)."""
    _ABSTRACT.append(True)
    try:
        yield
    finally:
        _ABSTRACT.pop()


def abstract(tree: Any, shardings: Any) -> Any:
    """`jax.ShapeDtypeStruct`s of `tree`'s leaves with `shardings` (one, or a matching tree)."""
    def one(x, sharding):
        return jax.ShapeDtypeStruct(np.shape(x), x.dtype if hasattr(x, "dtype")
                                    else np.asarray(x).dtype, sharding=sharding)

    if isinstance(shardings, jax.sharding.Sharding):
        return jax.tree_util.tree_map(lambda x: one(x, shardings), tree)
    return jax.tree_util.tree_map(one, tree, shardings)


def _put(tree: Any, shardings: Any) -> Any:
    """`jax.device_put`; in a multi-process job every process holds the same global value and
    keeps its own shards of it (`jax.make_array_from_callback`); abstract under
    `abstract_placement()`."""
    if _ABSTRACT:
        return abstract(tree, shardings)
    if jax.process_count() == 1:
        return jax.device_put(tree, shardings)

    def put(x, sharding):
        if isinstance(x, jax.Array) and x.sharding == sharding:
            return x
        value = np.asarray(x)
        return jax.make_array_from_callback(value.shape, sharding, lambda idx: value[idx])

    if isinstance(shardings, jax.sharding.Sharding):
        return jax.tree_util.tree_map(lambda x: put(x, shardings), tree)
    return jax.tree_util.tree_map(put, tree, shardings)


def replicate(tree: Any, mesh: Mesh) -> Any:
    """Puts every leaf of `tree` on every device of `mesh`."""
    return _put(tree, replicated(mesh))


def shard_batch(tree: Any, mesh: Mesh) -> Any:
    """Splits the leading axis of every leaf over `data` (scalars are replicated)."""
    return _put(tree, jax.tree_util.tree_map(lambda x: _leaf_batch_sharding(mesh, x), tree))


def constrain_batch(tree: Any, mesh: Mesh) -> Any:
    """Inside a jitted function: the leading axis of every leaf is split over `data`."""
    return jax.tree_util.tree_map(
        lambda x: jax.lax.with_sharding_constraint(x, _leaf_batch_sharding(mesh, x)), tree)


def interleave(arrays: list[jax.Array]) -> jax.Array:
    """`k` arrays [B, ...] -> one [k B, ...] whose row `k b + i` is row `b` of array `i`.

    Not `concatenate`: when the batch axis is split over devices (`parallel`), each device's
    rows of the inputs become one contiguous block of the output, so the stacking (and
    `deinterleave`) stays on the device. Concatenating along the split axis instead moves half
    the rows between devices, both ways and in the backward pass (XLA's collective-permutes).
    """
    stacked = jnp.stack(arrays, axis=1)
    return jnp.reshape(stacked, (-1,) + stacked.shape[2:])


def deinterleave(out: jax.Array, k: int) -> list[jax.Array]:
    """The inverse of `interleave`: [k B, ...] -> `k` arrays [B, ...]."""
    out = jnp.reshape(out, (-1, k) + out.shape[1:])
    return [out[:, i] for i in range(k)]


def model_spec(shape: Sequence[int], model: int, min_size: int | None = None) -> P:
    """The rule for frozen prior arrays: split the last axis over `model` where it divides
    (arrays with >= 2 dims and >= `min_size` elements, default `MIN_MODEL_SHARD_SIZE`)."""
    min_size = MIN_MODEL_SHARD_SIZE if min_size is None else min_size
    if model > 1 and len(shape) >= 2 and int(np.prod(shape)) >= min_size and shape[-1] % model == 0:
        return P(*([None] * (len(shape) - 1)), MODEL)
    return P()


def param_shardings(tree: Any, mesh: Mesh, min_size: int | None = None) -> Any:
    """Per-leaf shardings of a frozen parameter pytree (see `model_spec`)."""
    model = int(mesh.shape[MODEL])
    return jax.tree_util.tree_map(
        lambda x: NamedSharding(mesh, model_spec(np.shape(x), model, min_size)), tree)


def shard_params(tree: Any, mesh: Mesh, min_size: int | None = None) -> Any:
    """Places a frozen parameter pytree: replicated, large arrays split over `model`."""
    return _put(tree, param_shardings(tree, mesh, min_size))


def jit_step(fn: Any, mesh: Mesh, arg_shardings: Sequence[Any]) -> Any:
    """`jax.jit` of a train step `fn(state, *args) -> (state, metrics)`: the state replicated
    in and out and donated (XLA writes the new state into the old one's buffers: no second
    copy of params and optimizer state per step), `args` placed as `arg_shardings` say.

    A donated state is consumed: the caller must use the returned one (`TrainLoop` does)."""
    rep = replicated(mesh)
    return jax.jit(fn, in_shardings=(rep, *arg_shardings), out_shardings=(rep, rep),
                   donate_argnums=0)


def sharding_of(tree: Any) -> Any:
    """The shardings of a pytree of placed arrays (for `jax.jit(in_shardings=...)`)."""
    return jax.tree_util.tree_map(lambda x: x.sharding, tree)


def to_host(tree: Any) -> Any:
    """Numpy copies of (possibly sharded, possibly multi-host) arrays, whole on every process."""
    def get(x):
        if isinstance(x, jax.Array) and not x.is_fully_addressable:
            from jax.experimental import multihost_utils

            return np.asarray(multihost_utils.process_allgather(x, tiled=True))
        return np.asarray(x)

    return jax.tree_util.tree_map(get, tree)


# --- multi-host ---------------------------------------------------------------------------

def _int_env(name: str) -> int:
    try:
        return int(os.environ.get(name, "0"))
    except ValueError:
        return 0


def distributed_env() -> str | None:
    """The multi-process launcher this process runs under, or None (a single process).

    Recognised: LMC_JAX_DISTRIBUTED=1 (forced; =0 disables), JAX_COORDINATOR_ADDRESS (explicit,
    with JAX_NUM_PROCESSES and JAX_PROCESS_ID where no cluster manager sets them, e.g. several
    processes on one machine or hand-started hosts),
    Slurm with more than one task, Open MPI with more than one rank, and Cloud TPU / GKE
    multi-host slices (TPU_WORKER_HOSTNAMES with several hosts, or MEGASCALE_COORDINATOR_ADDRESS).
    A Cloud TPU VM pod slice launched with `gcloud ... --worker=all` sets none of these: launch
    it with LMC_JAX_DISTRIBUTED=1 (launch/ does).
    """
    forced = os.environ.get("LMC_JAX_DISTRIBUTED", "").strip()
    if forced == "0":
        return None
    if forced == "1":
        return "LMC_JAX_DISTRIBUTED=1"
    if os.environ.get("JAX_COORDINATOR_ADDRESS"):
        return "JAX_COORDINATOR_ADDRESS"
    if "SLURM_JOB_ID" in os.environ and max(_int_env("SLURM_NTASKS"),
                                            _int_env("SLURM_NPROCS")) > 1:
        return "slurm"
    if _int_env("OMPI_COMM_WORLD_SIZE") > 1:
        return "openmpi"
    hosts = os.environ.get("TPU_WORKER_HOSTNAMES", "")
    if "," in hosts or os.environ.get("MEGASCALE_COORDINATOR_ADDRESS"):
        return "cloud-tpu"
    return None


def maybe_initialize_distributed() -> bool:
    """Calls `jax.distributed.initialize()` in a multi-process job (see `distributed_env`).

    A no-op on a single host (e.g. a CPU or one GPU box) and when already initialized. Must run
    before the first JAX computation. Returns True when this process is part of a
    multi-process job.
    """
    if jax.distributed.is_initialized():
        return True
    env = distributed_env()
    if env is None:
        return False
    logging.info("multi-process job detected (%s): jax.distributed.initialize()", env)
    kwargs = {}
    if os.environ.get("JAX_NUM_PROCESSES") and os.environ.get("JAX_PROCESS_ID"):
        kwargs = {"num_processes": _int_env("JAX_NUM_PROCESSES"),
                  "process_id": _int_env("JAX_PROCESS_ID")}
    try:
        jax.distributed.initialize(**kwargs)
    except (RuntimeError, ValueError) as e:
        raise UserError(f"jax.distributed.initialize() failed under {env} ({e}); on a single "
                        "host set LMC_JAX_DISTRIBUTED=0") from e
    logging.info("process %d of %d", jax.process_index(), jax.process_count())
    return True


def is_main_process() -> bool:
    """True on the process that writes outputs (process 0)."""
    return jax.process_index() == 0
