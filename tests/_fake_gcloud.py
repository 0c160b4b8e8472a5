"""A stand-in for `gcloud` that tests/test_launch.py puts on PATH to run launch/*.sh offline.

It records every call (one JSON list of arguments per line in `$FAKE_GCLOUD_DIR/calls.jsonl`),
keeps the state of one TPU (queued resource and node) and one Compute Engine VM as files in
`$FAKE_GCLOUD_DIR`, and answers the queries the scripts make. With `FAKE_GCLOUD_EXEC=1` the
"machines" are this one: `ssh --command=CMD` runs CMD with bash in `$FAKE_GCLOUD_DIR/home` (the
remote home directory), `scp` copies to and from that folder, and creating a VM runs its startup
script, as the VM's first boot would. Those commands get only the environment of
`$FAKE_GCLOUD_VM_ENV` (JSON), HOME and a PATH with a `sudo` that runs its arguments: nothing of
the caller's settings leaks onto the "machine". Without it, `ssh` only answers the job-status
query (LOST before the job was started, then 0).

`$FAKE_TPU_WORKERS` is the TPU's worker count (default 1). An unknown command exits 3.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

STATE = Path(os.environ["FAKE_GCLOUD_DIR"])
HOME = STATE / "home"
EXEC = os.environ.get("FAKE_GCLOUD_EXEC") == "1"


def _parse(args: list[str]) -> tuple[list[str], dict[str, str]]:
    words, flags = [], {}
    for a in args:
        if a.startswith("--"):
            key, _, value = a[2:].partition("=")
            flags[key] = value
        else:
            words.append(a)
    return words, flags


def _vm_env() -> dict[str, str]:
    shims = STATE / "vm_bin"
    shims.mkdir(exist_ok=True)
    sudo = shims / "sudo"
    if not sudo.exists():
        sudo.write_text('#!/bin/sh\nexec "$@"\n')
        sudo.chmod(0o755)
    env = {"HOME": str(HOME), "PATH": f"{shims}:/usr/local/bin:/usr/bin:/bin", "LANG": "C.UTF-8"}
    env.update(json.loads(os.environ.get("FAKE_GCLOUD_VM_ENV", "{}")))
    return env


def _on_vm(command: list[str]) -> int:
    HOME.mkdir(exist_ok=True)
    return subprocess.run(command, cwd=HOME, env=_vm_env()).returncode


def _flag(path: Path) -> bool:
    return (STATE / path).exists()


def _set(name: str, value: str | None) -> None:
    if value is None:
        (STATE / name).unlink(missing_ok=True)
    else:
        (STATE / name).write_text(value)


def _ssh(flags: dict[str, str]) -> int:
    command = flags["command"]
    if EXEC:
        return _on_vm(["bash", "-c", command])
    if "setsid" in command:  # start_job of tpu_vm.sh
        _set("job_started", "1")
    if "lmc_run.rc" in command and "cat" in command:  # job_status of tpu_vm.sh
        print("0" if _flag(Path("job_started")) else "LOST")
    return 0


def _scp(words: list[str], name: str) -> int:
    src, dst = words[-2], words[-1]
    HOME.mkdir(exist_ok=True)
    if src.startswith(name + ":"):
        shutil.copyfile(HOME / src.split(":", 1)[1], dst)
    else:
        shutil.copyfile(src, HOME / dst.split(":", 1)[1])
    return 0


def _tpu(words: list[str], flags: dict[str, str]) -> int:
    kind, op = words[2], words[3]
    if kind == "queued-resources":
        if op == "describe":
            if not _flag(Path("qr")):
                print("ERROR: NOT_FOUND", file=sys.stderr)
                return 1
            print("ACTIVE")
        elif op == "create":
            _set("qr", words[4])
            _set("tpu", flags["node-id"])
        elif op == "delete":
            _set("qr", None)
            _set("tpu", None)
        else:
            return _unknown()
        return 0
    if kind != "tpu-vm":
        return _unknown()
    if op == "describe":
        if not _flag(Path("tpu")):
            print("ERROR: NOT_FOUND", file=sys.stderr)
            return 1
        fmt = flags.get("format", "")
        if fmt == "value(state)":
            print("READY")
        elif fmt == "value(networkEndpoints.len())":
            print(os.environ.get("FAKE_TPU_WORKERS", "1"))
        else:
            return _unknown()
        return 0
    if op == "create":
        _set("tpu", words[4])
        return 0
    if op == "delete":
        _set("tpu", None)
        return 0
    if not _flag(Path("tpu")):
        print(f"ERROR: TPU {words[4]} not found", file=sys.stderr)
        return 1
    if op == "ssh":
        return _ssh(flags)
    if op == "scp":
        return _scp(words, (STATE / "tpu").read_text())
    return _unknown()


def _instances(words: list[str], flags: dict[str, str]) -> int:
    op = words[2]
    if op == "describe":
        if not _flag(Path("vm")):
            print("ERROR: NOT_FOUND", file=sys.stderr)
            return 1
        print((STATE / "vm").read_text())
    elif op == "create":
        key, _, file = flags["metadata-from-file"].partition("=")
        assert key == "startup-script", flags
        shutil.copyfile(file, STATE / "startup.sh")
        _set("vm", "RUNNING")
        if EXEC:  # the first boot runs the startup script
            _set("startup.rc", str(_on_vm(["bash", str(STATE / "startup.sh")])))
    elif op == "start":
        _set("vm", "RUNNING")
    elif op == "stop":
        _set("vm", "TERMINATED")
    elif op == "delete":
        _set("vm", None)
    else:
        return _unknown()
    return 0


def _unknown() -> int:
    print(f"fake gcloud: unknown command {sys.argv[1:]}", file=sys.stderr)
    return 3


def main(args: list[str]) -> int:
    STATE.mkdir(parents=True, exist_ok=True)
    with open(STATE / "calls.jsonl", "a") as f:
        f.write(json.dumps(args) + "\n")
    words, flags = _parse(args)
    if words[:2] == ["config", "get-value"]:
        print(os.environ.get("FAKE_GCLOUD_PROJECT", "test-project"))
        return 0
    if "quiet" not in flags or not flags.get("project"):
        print("fake gcloud: the scripts call gcloud --quiet --project=...", file=sys.stderr)
        return 3
    if words[:2] == ["compute", "tpus"]:
        return _tpu(words, flags)
    if words[:2] == ["compute", "instances"]:
        return _instances(words, flags)
    if words[:2] == ["compute", "ssh"]:
        if not _flag(Path("vm")):
            return 1
        return _ssh(flags)
    return _unknown()


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
