"""lmc_jax's on-disk cache: converted Flax weights and automatic b_psi, keyed by file contents.

The cache folder is the `prior.cache_dir` config key, else `$LMC_JAX_CACHE`, else
`~/.cache/lmc_jax`. Keys are sha256 digests of the files a result was made from; a file's digest
is memoized in `<cache>/digests.json` under its path, size and modification time, so a second
run does not read multi-GB weights again to hash them.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable
from pathlib import Path

CACHE_ENV = "LMC_JAX_CACHE"


def cache_root(cache_dir: str | os.PathLike | None = None) -> Path:
    """`cache_dir`, else `$LMC_JAX_CACHE`, else `~/.cache/lmc_jax` (not created here)."""
    return Path(cache_dir or os.environ.get(CACHE_ENV) or "~/.cache/lmc_jax").expanduser()


def file_digest(path: Path, memo: dict[str, str] | None = None) -> str:
    """sha256 of a file's bytes; `memo` (keyed by path, size and mtime) skips unchanged files."""
    st = path.stat()
    stamp = f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}"
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
    memo_file = cache / "digests.json" if cache is not None else None
    memo: dict[str, str] = {}
    if memo_file is not None and memo_file.is_file():
        try:
            memo = json.loads(memo_file.read_text())
        except (OSError, ValueError):
            memo = {}
    n = len(memo)
    h = hashlib.sha256()
    for f in sorted(files):
        h.update(f"{f.relative_to(root).as_posix()}\0{file_digest(f, memo)}\n".encode())
    if memo_file is not None and len(memo) != n:
        try:
            memo_file.parent.mkdir(parents=True, exist_ok=True)
            tmp = memo_file.with_name(f"digests.{os.getpid()}.tmp")
            tmp.write_text(json.dumps(memo))
            os.replace(tmp, memo_file)
        except OSError:
            pass  # a read-only cache only costs hashing again next time
    return h.hexdigest()
