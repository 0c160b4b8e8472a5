"""lmc_jax's on-disk cache: converted Flax weights and automatic b_psi, keyed by file contents.

The cache folder is the `prior.cache_dir` config key, else `$LMC_JAX_CACHE`, else
`~/.cache/lmc_jax`. Keys are sha256 digests of the files a result was made from; a file's digest
is memoized in `<cache>/digests.json` under its path, size and modification time, so a second
run does not read multi-GB weights again to hash them.

An entry (a folder `<cache>/<kind>/<key>`) is written whole into `<key>.tmp<pid>`, sealed with
`checksums.json` (the sha256 of every file, written last) and renamed into place (`publish`).
A reader checks it with `entry_problem` before use; a damaged or half-written entry is renamed
to `<key>.damaged-<time>` (`set_aside`, never deleted) and built again. A file whose size and
modification time are those it had when last hashed is not read again to check it (the memo).
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import sys
import time
from collections.abc import Callable, Iterable
from pathlib import Path

CACHE_ENV = "LMC_JAX_CACHE"
CHECKSUMS = "checksums.json"


def cache_root(cache_dir: str | os.PathLike | None = None) -> Path:
    """`cache_dir`, else `$LMC_JAX_CACHE`, else `~/.cache/lmc_jax` (not created here)."""
    return Path(cache_dir or os.environ.get(CACHE_ENV) or "~/.cache/lmc_jax").expanduser()


def _stamp(path: Path) -> str:
    st = path.stat()
    return f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}"


def file_digest(path: Path, memo: dict[str, str] | None = None) -> str:
    """sha256 of a file's bytes; `memo` (keyed by path, size and mtime) skips unchanged files."""
    stamp = _stamp(path)
    if memo is not None and stamp in memo:
        return memo[stamp]
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 23), b""):
            h.update(chunk)
    digest = h.hexdigest()
    if memo is not None:
        memo[stamp] = digest
    return digest


def files_fingerprint(root: Path, files: Iterable[Path], cache: Path | None = None) -> str:
    """sha256 over (name relative to `root`, content sha256) of `files`, sorted; the digests
    are memoized in `cache`/digests.json when `cache` is given (best effort)."""
    memo = _load_memo(cache)
    n = len(memo)
    h = hashlib.sha256()
    for f in sorted(files):
        h.update(f"{f.relative_to(root).as_posix()}\0{file_digest(f, memo)}\n".encode())
    _save_memo(cache, memo, n)
    return h.hexdigest()


def _load_memo(cache: Path | None) -> dict[str, str]:
    memo_file = cache / "digests.json" if cache is not None else None
    if memo_file is not None and memo_file.is_file():
        try:
            memo = json.loads(memo_file.read_text())
        except (OSError, ValueError):
            return {}
        return memo if isinstance(memo, dict) else {}
    return {}


def _save_memo(cache: Path | None, memo: dict[str, str], n: int) -> None:
    """Writes `memo` to `cache`/digests.json when it grew past `n` entries (best effort)."""
    if cache is None or len(memo) == n:
        return
    memo_file = cache / "digests.json"
    try:
        memo_file.parent.mkdir(parents=True, exist_ok=True)
        tmp = memo_file.with_name(f"digests.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(memo))
        os.replace(tmp, memo_file)
    except OSError:
        pass  # a read-only cache only costs hashing again next time


# ----------------------------------------------------------------------------------------------
# Entries: sealed by a checksum list, checked before use, set aside when damaged.


def warn(message: str) -> None:
    """One `WARNING: ...` line on stderr."""
    print(f"WARNING: {message}", file=sys.stderr, flush=True)


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def seal(folder: Path, cache: Path | None = None) -> dict[str, str]:
    """Writes `folder`/checksums.json, the sha256 of each of its other files, and returns it.

    The files are flushed to disk first and the list goes last (temporary name, then rename),
    so a folder with a list was complete when the list was written. With `cache`, the digests
    are memoized there (for a folder that stays where it is)."""
    memo = _load_memo(cache)
    n = len(memo)
    sums = {}
    for p in sorted(q for q in folder.rglob("*") if q.is_file() and q.name != CHECKSUMS):
        _fsync(p)
        sums[p.relative_to(folder).as_posix()] = file_digest(p, memo)
    _save_memo(cache, memo, n)
    tmp = folder / f"{CHECKSUMS}.{os.getpid()}.tmp"
    tmp.write_text(json.dumps(sums, indent=1, sort_keys=True))
    _fsync(tmp)
    os.replace(tmp, folder / CHECKSUMS)
    return sums


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return f"{type(e).__name__}: {text.splitlines()[0][:200] if text else ''}"


def entry_problem(folder: Path, cache: Path | None = None,
                  load_check: Callable[[Path], object] | None = None) -> str | None:
    """None when the entry `folder` is intact, else what is wrong with it, in a few words.

    Intact: every file named in its checksums.json is there with that sha256 (digests memoized
    in `cache`/digests.json). A folder without a readable list (written before lists existed,
    or the list lost) is intact when `load_check(folder)` does not raise; it is then sealed."""
    try:
        sums = json.loads((folder / CHECKSUMS).read_text())
        if not (isinstance(sums, dict) and sums
                and all(isinstance(v, str) for v in sums.values())):
            sums = None
    except (OSError, ValueError, UnicodeDecodeError):
        sums = None
    if sums is None:
        if load_check is None:
            return f"no readable {CHECKSUMS}: written only in part"
        try:
            load_check(folder)
        except Exception as e:  # noqa: BLE001 - any failure to read it means damaged
            return f"no {CHECKSUMS} and {_first_line(e)}"
        try:
            seal(folder, cache)
        except OSError:
            pass  # a read-only cache: checked by loading again next time
        return None
    memo = _load_memo(cache)
    n = len(memo)
    try:
        for rel, want in sorted(sums.items()):
            p = folder / rel
            if not p.is_file():
                return f"{rel} is missing"
            if file_digest(p, memo) != want:
                return f"{rel} does not match its checksum"
    except OSError as e:
        return f"unreadable ({_first_line(e)})"
    finally:
        _save_memo(cache, memo, n)
    return None


def set_aside(folder: Path) -> Path | None:
    """Renames a damaged entry to `<name>.damaged-<time>` next to it and returns the new path;
    None when `folder` is gone already (another run set it aside). Raises OSError when it
    cannot be renamed."""
    base = f"{folder.name}.damaged-{time.strftime('%Y%m%d-%H%M%S')}"
    for i in range(100):
        aside = folder.with_name(base if i == 0 else f"{base}-{os.getpid()}-{i}")
        if aside.exists():
            continue
        try:
            os.rename(folder, aside)
        except FileNotFoundError:
            return None
        return aside
    raise OSError(errno.EEXIST, f"no free name for {base}")


def publish(tmp: Path, dest: Path, cache: Path | None = None,
            load_check: Callable[[Path], object] | None = None, what: str = "cache entry",
            sums: dict[str, str] | None = None) -> Path:
    """Moves the finished (sealed) entry `tmp` to `dest` and returns `dest`.

    A folder already at `dest` is checked: an intact one (another run's equal result) is kept
    and `tmp` removed; a damaged or half-present one is set aside first (one warning line).
    `sums` (from `seal`) memoizes the digests under the final names. Raises OSError when `tmp`
    cannot be moved; `tmp` is then left as it is."""
    for _ in range(5):
        try:
            os.rename(tmp, dest)  # atomic; also replaces an empty folder
        except OSError as e:
            if e.errno not in (errno.ENOTEMPTY, errno.EEXIST) or not dest.is_dir():
                raise
            problem = entry_problem(dest, cache, load_check)
            if problem is None:
                shutil.rmtree(tmp, ignore_errors=True)
                return dest
            aside = set_aside(dest)
            if aside is not None:
                warn(f"the {what} {dest} was damaged ({problem}): set aside as {aside.name}")
            continue
        if sums and cache is not None:
            memo = _load_memo(cache)
            n = len(memo)
            try:
                for rel, digest in sums.items():
                    memo[_stamp(dest / rel)] = digest
            except OSError:
                return dest
            _save_memo(cache, memo, n)
        return dest
    raise OSError(errno.ENOTEMPTY, f"{dest} keeps being replaced by other runs")
