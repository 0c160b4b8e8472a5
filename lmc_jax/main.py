"""Entry point: `python -m lmc_jax.main --config=configs/<app>.py[:preset] --workdir=DIR`.

Override any config key with `--config.key=value` (e.g. `--config.guidance.w=7.5`); `--help`
lists the apps, their presets and the most used keys. The config's `app` key names the module
in `lmc_jax.apps` that runs it. Bad input (an unknown key, an empty prompt, a missing weights
folder, a busy or unwritable workdir, a full disk, ...) ends the run with one `error:` line and
exit status 2, and a refused run leaves the workdir as it was (`lmc_jax.workdir`). A preempted
run (SIGTERM at any time from process start; SIGINT in the train loop) saves what it can and
exits with status 143 (`lmc_jax.checkpoint.EXIT_PREEMPTED`); the same command resumes it.
Third-party INFO logs (Orbax, JAX) are shown only with `--verbosity=1` or more.
"""

from __future__ import annotations

import os
import signal
import sys

EXIT_PREEMPTED = 143  # = lmc_jax.checkpoint.EXIT_PREEMPTED (not imported: that loads JAX)


_ACTIVE_LOCK: list = []  # the run's lmc_jax.workdir.WorkdirLock, released on SIGTERM


def _on_sigterm(signum, frame) -> None:  # noqa: ARG001
    """Outside the train loop there is nothing to save: say so, release the workdir and exit
    143 at once. (Raising here instead could be swallowed by a GC callback or a __del__.)"""
    try:
        sys.stderr.write(f"stopped by {signal.Signals(signum).name} outside the train loop; "
                         "checkpoints already written are kept; run the same command again to "
                         f"resume (exit status {EXIT_PREEMPTED})\n")
        sys.stderr.flush()
        sys.stdout.flush()
        for lock in _ACTIVE_LOCK:
            lock.release()
    finally:
        os._exit(EXIT_PREEMPTED)


def install_signal_handler() -> None:
    """SIGTERM exits 143 (`_on_sigterm`) until the train loop installs its own handler
    (`lmc_jax.checkpoint.Preemption`, which saves first) and after it restores this one."""
    try:
        signal.signal(signal.SIGTERM, _on_sigterm)
    except ValueError:  # not the main thread (embedded use)
        pass


if __name__ == "__main__":  # first thing: a SIGTERM during the imports below exits 143 too
    install_signal_handler()

import importlib  # noqa: E402
import logging  # noqa: E402
import time  # noqa: E402

from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from lmc_jax import _runtime  # noqa: E402
from lmc_jax.errors import UserError  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Experiment config file, e.g. configs/testbed.py or configs/t23d.py:tiny.",
    lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None,
                               "Output folder (checkpoints, metrics, images); default runs/<app>.")
_FRESH_START = flags.DEFINE_bool(
    "fresh_start", False, "Start from step 0 when every checkpoint in the workdir is unreadable "
    "(they are moved to checkpoints_unreadable/); without it such a run stops.")

EXIT_USER_ERROR = 2
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The keys most runs set, with what they do (shown by --help).
COMMON_KEYS = (
    ("prompt", "the text prompt (synth, t23d, edit)"),
    ("seed", "the run's seed"),
    ("steps", "optimization steps"),
    ("guidance.method", "lmc | sds | csd | nfsd"),
    ("guidance.w", "guidance (CFG) scale"),
    ("prior.path", "Stable Diffusion weights folder (diffusers layout)"),
    ("batch", "views/images per step"),
    ("lr", "learning rate"),
    ("log_every", "metrics every N steps"),
    ("checkpoint_every", "checkpoint every N steps (resume: the same command again)"),
    ("parallel.model_axis", "devices per model group (split the prior)"),
)


def train_and_evaluate(config, workdir: str) -> dict:
    """Runs the app named by `config.app` in `workdir` (locked for the run) and returns its
    metrics. config.json is written once the app has validated the config (see
    `lmc_jax.workdir`); a refused run (UserError) leaves the workdir as it was."""
    from lmc_jax import checkpoint, parallel
    from lmc_jax import workdir as wd_mod

    lock = None
    if parallel.is_main_process():
        lock = wd_mod.WorkdirLock(workdir, command=" ".join(sys.argv[1:])[:300]).acquire()
        _ACTIVE_LOCK.append(lock)
        wd_mod.set_pending_config(workdir, config.to_json_best_effort(indent=2) + "\n")
    checkpoint.set_fresh_start(bool(_FRESH_START.value) if flags.FLAGS.is_parsed() else False)
    try:
        try:
            module = importlib.import_module(f"lmc_jax.apps.{config.app}")
        except ModuleNotFoundError as e:
            raise UserError(f"config names app {config.app!r}, which lmc_jax.apps does not "
                            "have") from e
        result = module.run(config, workdir)
        wd_mod.commit_config(workdir)
        return result
    except UserError:
        wd_mod.clear_pending_config()
        if lock is not None:
            lock.rollback()
        raise
    finally:
        wd_mod.clear_pending_config()
        if lock is not None:
            lock.release()
            _ACTIVE_LOCK.remove(lock)


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
    quiet_third_party_logs()
    from lmc_jax import parallel

    parallel.maybe_initialize_distributed()  # multi-host jobs only; before any computation
    stamp = time.strftime("%Y%m%d-%H%M%S")
    workdir = _WORKDIR.value or os.path.join("runs", f"{config.app}-{stamp}")
    if _verbosity() >= 1:
        logging.info("config:\n%s", config)
    result = train_and_evaluate(config, workdir)
    print(f"outputs in {workdir}")
    # A run's warnings (t23d: an empty scene) come last, where the eye lands; exit status 0.
    for w in result.get("warnings", []) if isinstance(result, dict) else []:
        print(f"WARNING: {w}", flush=True)


# --- logging ------------------------------------------------------------------------------

def _verbosity() -> int:
    try:
        return int(flags.FLAGS["verbosity"].value) if flags.FLAGS["verbosity"].present else 0
    except (KeyError, flags.Error):
        return 0


class _OwnInfoOnly(logging.Filter):
    """Keeps WARNING and above from everyone, INFO and below from lmc_jax only."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno >= logging.WARNING:
            return True
        return f"{os.sep}lmc_jax{os.sep}" in (record.pathname or "")


def quiet_third_party_logs() -> None:
    """Third-party INFO lines (Orbax writes ~65 per save) off unless --verbosity >= 1."""
    if _verbosity() >= 1:
        return
    handlers = list(logging.getLogger().handlers)
    try:
        from absl import logging as absl_logging

        handlers.append(absl_logging.get_absl_handler())
    except ImportError:
        pass
    for h in handlers:
        if not any(isinstance(f, _OwnInfoOnly) for f in h.filters):
            h.addFilter(_OwnInfoOnly())


# --- --help -------------------------------------------------------------------------------

def _config_summary(path: str) -> tuple[str, list[str]]:
    """(first docstring line, presets) of one configs/*.py file, read without running it."""
    import ast

    try:
        with open(path) as f:
            tree = ast.parse(f.read())
    except (OSError, SyntaxError):
        return "", []
    doc = (ast.get_docstring(tree) or "").strip().splitlines()
    presets: list[str] = []
    for node in ast.walk(tree):
        if (isinstance(node, ast.Call) and getattr(node.func, "id", None) == "parse_preset"
                and len(node.args) > 1):
            try:
                presets = [str(p) for p in ast.literal_eval(node.args[1])]
            except ValueError:
                pass
    return (doc[0] if doc else ""), presets


def help_text() -> str:
    """What `--help` prints: usage, the apps with their presets, the common keys and flags."""
    folder = "configs" if os.path.isdir("configs") else os.path.join(ROOT, "configs")
    lines = ["usage: python -m lmc_jax.main --config=configs/<app>.py[:preset] [--workdir=DIR]",
             "                              [--config.KEY=VALUE ...] [--fresh_start] "
             "[--verbosity=1]", "",
             "Runs one app from its config; the same command again resumes it from its newest",
             "checkpoint. Bad input ends with one 'error:' line (exit 2); SIGTERM saves and",
             "exits 143.", "", "apps (--config=configs/<app>.py[:preset]):"]
    files = sorted(f for f in os.listdir(folder) if f.endswith(".py")) if os.path.isdir(
        folder) else []
    for name in files:
        doc, presets = _config_summary(os.path.join(folder, name))
        lines.append(f"  {name[:-3]:<12} {doc}")
        if presets:
            lines.append(f"  {'':<12} presets: {', '.join(presets)}")
    if not files:
        lines.append(f"  (no configs/ folder found in {os.getcwd()}; run from the repository root)")
    lines += ["", "most used keys (--config.KEY=VALUE; an unknown key is named with the nearest "
              "ones):"]
    lines += [f"  {k:<22} {v}" for k, v in COMMON_KEYS]
    lines += ["", "flags:",
              "  --workdir=DIR          outputs and checkpoints (default runs/<app>-<time>); "
              "one run at a time",
              "  --fresh_start          start over when every checkpoint in DIR is unreadable",
              "  --verbosity=1          also show third-party INFO logs (Orbax, JAX)",
              "", "e.g. python -m lmc_jax.main --config=configs/t23d.py:tiny "
              "--workdir=runs/t23d --config.prompt='a red box'"]
    return "\n".join(lines)


def _wants_help(argv: list[str]) -> bool:
    return any(a in ("-h", "--help", "-help", "--helpshort", "--helpfull", "-?") for a in argv)


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


def _one_line(exc: BaseException) -> str | None:
    """The `error:` text for an OS-level failure the user can fix (full disk, read-only or
    missing folder, no permission), found anywhere in the exception's chain; else None."""
    for cause in _causes(exc):
        if isinstance(cause, UserError):
            return str(cause)
        text = str(cause).lower()
        err = getattr(cause, "errno", None)
        where = getattr(cause, "filename", None)
        at = f" at {where}" if where else ""
        if err in (28, 122) or "no space left on device" in text or "disk quota" in text:
            return (f"the disk is full{at} ({type(cause).__name__}: "
                    f"{(str(cause).splitlines() or [''])[0][:160]}); free disk space (or pick "
                    "another --workdir) and run the same command again to resume")
        if err in (13, 30) and where:
            return (f"cannot write{at} ({os.strerror(err)}); make it writable or pick another "
                    "--workdir")
    return None


def run() -> None:
    """Console entry (also `python -m lmc_jax.main`): fast CPU malloc, clean errors."""
    install_signal_handler()
    if _wants_help(sys.argv[1:]):
        print(help_text())
        sys.exit(0)
    _runtime.maybe_reexec_with_fast_malloc(["-m", "lmc_jax.main", *sys.argv[1:]])
    try:
        app.run(main, flags_parser=_parse_flags)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(EXIT_USER_ERROR)
    except Exception as e:  # noqa: BLE001 - OS failures the user can fix get one line
        line = _one_line(e)
        if line is None:
            raise
        print(f"error: {line}", file=sys.stderr)
        sys.exit(EXIT_USER_ERROR)


if __name__ == "__main__":
    run()
