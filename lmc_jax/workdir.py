"""One run per workdir, and nothing written to it before the run is validated.

`WorkdirLock` holds `<workdir>/.lock` (an exclusive `flock`, released by the kernel even when
the process is killed) with the owner's host, pid and start time in it. A second run on a busy
workdir stops at once with a `UserError` naming the owner; a lock file left by a dead process is
taken over with a note. Where `flock` is not available (some network filesystems: gcsfuse) the
owner's pid is checked on the same host; a lock from another host is taken over only with
`LMC_JAX_TAKE_OVER_LOCK=1` (launch/tpu_vm.sh sets it when it relaunches after a preemption,
when the previous VM is gone for sure). `rollback()` puts the folder back as it was when a run
is refused (removes the lock, the empty folders this run created, and the workdir itself if this
run created it and it is empty).

`config.json` is written by `commit_config()` only: `lmc_jax.main` registers the resolved config
with `set_pending_config`, and the first checkpoint save, the metric writer's creation (both
come after an app has validated its config and checked the resume) or the end of the run writes
it. A refused run never touches the folder's config.
"""

from __future__ import annotations

import datetime
import errno
import json
import logging
import os
import socket
import time

from lmc_jax.errors import UserError

LOCK_NAME = ".lock"
_UNWRITABLE = (errno.EROFS, errno.EACCES, errno.EPERM)
_pending: dict[str, str] = {}  # {"workdir": ..., "text": ...} of the run in this process


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def _describe(owner: dict) -> str:
    started = owner.get("start")
    when = (datetime.datetime.fromtimestamp(started).strftime("%Y-%m-%d %H:%M:%S")
            if isinstance(started, (int, float)) else "an unknown time")
    cmd = f" ({owner['command']})" if owner.get("command") else ""
    return f"pid {owner.get('pid', '?')} on host {owner.get('host', '?')}, started {when}{cmd}"


def _unwritable(workdir: str, e: OSError) -> UserError:
    return UserError(f"--workdir {workdir!r} is not writable ({e.strerror or e}); make it "
                     "writable or pick another --workdir")


class WorkdirLock:
    """An exclusive lock on one workdir for the life of a run (see the module docstring)."""

    def __init__(self, workdir: str, command: str = ""):
        self.workdir = os.path.abspath(workdir)
        self.path = os.path.join(self.workdir, LOCK_NAME)
        self.command = command
        self.note = ""  # set when a stale lock was taken over
        self._fd: int | None = None
        self._created = False
        self._before: set[str] = set()

    def acquire(self) -> WorkdirLock:
        """Takes the lock or raises `UserError` (busy, a file, unwritable)."""
        wd = self.workdir
        if os.path.exists(wd) and not os.path.isdir(wd):
            raise UserError(f"--workdir {wd!r} is a file, not a folder; pick another --workdir "
                            "(or move the file away)")
        self._created = not os.path.exists(wd)
        try:
            os.makedirs(wd, exist_ok=True)
        except OSError as e:
            raise _unwritable(wd, e) from None
        self._before = set(os.listdir(wd))
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            self.rollback()
            if e.errno in _UNWRITABLE:
                raise _unwritable(wd, e) from None
            raise
        try:
            import fcntl

            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            owner = _read_owner(fd)
            os.close(fd)
            raise UserError(f"--workdir {wd!r} is in use by another run: {_describe(owner)}; "
                            "wait for it to end or stop it, or pick another --workdir") from None
        except (ImportError, OSError):  # no flock here (some network filesystems): pid check
            owner = _read_owner(fd)
            same_host = owner.get("host") == socket.gethostname()
            take = os.environ.get("LMC_JAX_TAKE_OVER_LOCK") == "1" and not same_host
            if owner and owner.get("pid") != os.getpid() and not take and (
                    not same_host or _pid_alive(int(owner.get("pid", 0)))):
                os.close(fd)
                raise UserError(f"--workdir {wd!r} is in use by another run: {_describe(owner)};"
                                f" wait for it to end, or delete {self.path} if that run is "
                                "gone, or pick another --workdir") from None
        previous = _read_owner(fd)
        if previous:
            self.note = (f"taking over the lock of {wd} left by a run that is gone "
                         f"({_describe(previous)})")
            logging.warning("%s", self.note)
        me = {"host": socket.gethostname(), "pid": os.getpid(), "start": time.time(),
              "command": self.command}
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, (json.dumps(me) + "\n").encode(), 0)
        except OSError as e:
            os.close(fd)
            self.rollback()
            raise _unwritable(wd, e) from None
        self._fd = fd
        return self

    def release(self) -> None:
        """Removes the lock file and lets go of the lock (idempotent)."""
        if self._fd is None:
            return
        try:
            if _read_owner(self._fd).get("pid") == os.getpid():
                os.unlink(self.path)
        except OSError:
            pass
        os.close(self._fd)
        self._fd = None

    def rollback(self) -> None:
        """After a refused run: release, then remove what this run added that holds no file."""
        self.release()
        if not os.path.isdir(self.workdir):
            return
        for name in set(os.listdir(self.workdir)) - self._before:
            path = os.path.join(self.workdir, name)
            if name == LOCK_NAME and os.path.isfile(path):
                continue  # another process's
            if os.path.isdir(path) and not os.path.islink(path):
                _remove_empty_tree(path)
        if self._created:
            try:
                os.rmdir(self.workdir)
            except OSError:
                pass

    def __enter__(self) -> WorkdirLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def _read_owner(fd: int) -> dict:
    try:
        data = os.pread(fd, 4096, 0).decode("utf-8", "replace").strip()
        owner = json.loads(data) if data else {}
        return owner if isinstance(owner, dict) else {}
    except (OSError, ValueError):
        return {}


def _remove_empty_tree(path: str) -> bool:
    """Removes `path` if it holds only empty folders; True when removed."""
    empty = True
    for name in os.listdir(path):
        sub = os.path.join(path, name)
        if not (os.path.isdir(sub) and not os.path.islink(sub) and _remove_empty_tree(sub)):
            empty = False
    if empty:
        try:
            os.rmdir(path)
        except OSError:
            return False
    return empty


def snapshot(path: str | os.PathLike) -> dict | None:
    """A path's exact contents: {relative path: bytes} of every file under a folder (folders as
    None), {"": bytes} for a file, None when nothing is there. Equal snapshots before and after a
    refused run are what "loses nothing" means (tests and benchmarks/survive_matrix.py)."""
    if not os.path.exists(path):
        return None
    if not os.path.isdir(path):
        with open(path, "rb") as f:
            return {"": f.read()}
    out = {}
    for d, dirs, files in os.walk(path):
        for name in dirs:
            out[os.path.relpath(os.path.join(d, name), path)] = None
        for name in files:
            with open(os.path.join(d, name), "rb") as f:
                out[os.path.relpath(os.path.join(d, name), path)] = f.read()
    return out


def set_pending_config(workdir: str, text: str) -> None:
    """Registers the config text `commit_config` will write to `<workdir>/config.json`."""
    _pending.clear()
    _pending.update(workdir=os.path.abspath(workdir), text=text)


def clear_pending_config() -> None:
    _pending.clear()


def commit_config(workdir: str | None = None) -> None:
    """Writes the pending config.json (once; process 0 only; a no-op when none is pending or
    when `workdir` is not the pending run's)."""
    if not _pending:
        return
    if workdir is not None and os.path.abspath(workdir) != _pending["workdir"]:
        return
    import jax

    if jax.process_index() != 0:
        _pending.clear()
        return
    path = os.path.join(_pending["workdir"], "config.json")
    tmp = f"{path}.tmp{os.getpid()}"
    os.makedirs(_pending["workdir"], exist_ok=True)
    with open(tmp, "w") as f:
        f.write(_pending["text"])
    os.replace(tmp, path)
    _pending.clear()
