"""Entry point: `python -m lmc_jax.main --config=configs/<app>.py[:preset] --workdir=DIR`.

Override any config key with `--config.key=value` (e.g. `--config.guidance.w=7.5`). The
config's `app` key names the module in `lmc_jax.apps` that runs it. Bad input (an unknown key,
an empty prompt, a missing weights folder, ...) ends the run with one `error:` line and exit
status 2. A preempted run (SIGTERM/SIGINT) saves a checkpoint and exits with status 143
(`lmc_jax.checkpoint.EXIT_PREEMPTED`); the same command resumes it.
"""

from __future__ import annotations

import importlib
import logging
import os
import sys
import time

from absl import app, flags
from ml_collections import config_flags

from lmc_jax import _runtime
from lmc_jax.errors import UserError

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Experiment config file, e.g. configs/testbed.py or configs/t23d.py:tiny.",
    lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None,
                               "Output folder (checkpoints, metrics, images); default runs/<app>.")

EXIT_USER_ERROR = 2


def train_and_evaluate(config, workdir: str) -> dict:
    """Runs the app named by `config.app` and returns its metrics."""
    try:
        module = importlib.import_module(f"lmc_jax.apps.{config.app}")
    except ModuleNotFoundError as e:
        raise UserError(f"config names app {config.app!r}, which lmc_jax.apps does not have") from e
    from lmc_jax import parallel

    if parallel.is_main_process():
        os.makedirs(workdir, exist_ok=True)
        with open(os.path.join(workdir, "config.json"), "w") as f:
            f.write(config.to_json_best_effort(indent=2) + "\n")
    return module.run(config, workdir)


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise UserError(f"unexpected arguments {argv[1:]}; config values go as --config.key=value")
    try:
        config = _CONFIG.value
        if config is not None:
            _ = config.app
    except OSError as e:  # ml_collections defers a failed load to the first access
        path = flags.FLAGS["config"].config_filename
        here = sorted(f for f in os.listdir("configs") if f.endswith(".py")) if os.path.isdir(
            "configs") else []
        why = str(e).splitlines()[-1].strip()
        raise UserError(f"config file {path!r} could not be loaded ({why}); run from the "
                        f"repository root; configs here: {here}") from None
    if config is None:
        raise UserError("no config given; run e.g. python -m lmc_jax.main "
                        "--config=configs/testbed.py --workdir=runs/testbed")
    from lmc_jax import parallel

    parallel.maybe_initialize_distributed()  # multi-host jobs only; before any computation
    stamp = time.strftime("%Y%m%d-%H%M%S")
    workdir = _WORKDIR.value or os.path.join("runs", f"{config.app}-{stamp}")
    logging.info("config:\n%s", config)
    result = train_and_evaluate(config, workdir)
    print(f"outputs in {workdir}")
    # A run's warnings (t23d: an empty scene) come last, where the eye lands; exit status 0.
    for w in result.get("warnings", []) if isinstance(result, dict) else []:
        print(f"WARNING: {w}", flush=True)


def _causes(exc: BaseException):
    """The exception and its chain of causes/contexts."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        yield exc
        exc = exc.__cause__ or exc.__context__


def _load_base_config(argv: list[str]):
    """Loads the config file named in argv without overrides (for key suggestions)."""
    for arg in argv:
        if arg.startswith("--config="):
            path, _, preset = arg.split("=", 1)[1].partition(":")
            try:
                from lmc_jax.config import load_config

                return load_config(path, preset)
            except Exception:  # noqa: BLE001 - suggestions are best effort
                return None
    return None


def _has_key(cfg, dotted: str) -> bool:
    for part in dotted.split("."):
        if not hasattr(cfg, "keys") or part not in cfg.keys():
            return False
        cfg = cfg[part]
    return True


def _explain_parse_error(exc: BaseException, argv: list[str]) -> str:
    """One line for an error raised while loading --config or applying --config.KEY=VALUE."""
    for cause in _causes(exc):
        if isinstance(cause, UserError):
            return str(cause)
        for line in str(cause).splitlines():  # ml_collections stringifies config-file errors
            if "UserError: " in line:
                return line.split("UserError: ", 1)[1]
    base = _load_base_config(argv)
    overrides = [a[len("--config."):].split("=", 1)[0] for a in argv if a.startswith("--config.")]
    if base is not None:
        for key in overrides:
            if not _has_key(base, key):
                from lmc_jax.config import unknown_key_message

                return unknown_key_message(key, base)
    if not any(a.startswith("--config=") for a in argv):
        return ("no config given; run e.g. python -m lmc_jax.main --config=configs/testbed.py "
                "--workdir=runs/testbed")
    for arg in argv:
        if arg.startswith("--config="):
            path = arg.split("=", 1)[1].split(":", 1)[0]
            if not os.path.exists(path):
                return f"config file {path!r} not found (run from the repository root)"
    last = str(exc).strip().splitlines()
    return f"could not parse the flags: {last[-1] if last else type(exc).__name__}"


def _parse_flags(argv: list[str]) -> list[str]:
    try:
        return flags.FLAGS(argv)
    except Exception as e:  # noqa: BLE001 - every parse failure becomes one clear line
        raise UserError(_explain_parse_error(e, argv)) from None


def run() -> None:
    """Console entry (also `python -m lmc_jax.main`): fast CPU malloc, clean errors."""
    _runtime.maybe_reexec_with_fast_malloc(["-m", "lmc_jax.main", *sys.argv[1:]])
    try:
        app.run(main, flags_parser=_parse_flags)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(EXIT_USER_ERROR)


if __name__ == "__main__":
    run()
