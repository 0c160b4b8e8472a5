"""Bad inputs and random kills on text-to-3D `:tiny`: one row per case, then the counts.

    python benchmarks/survive_matrix.py [--kills 20] [--seed 0] [--only matrix|caches|kills]
                                        [--case 'disk full'] [--json out.json]

Every case runs `python -m lmc_jax.main --config=configs/t23d.py:tiny` (tiny sizes, see
`TINY`) as a user would, in a fresh temporary folder, with a shared JAX compilation cache.

The bad-input matrix: each case must end with exit status 2 and one `error:` line as the last
stderr line (no traceback), and must leave the workdir as it was (byte for byte, or absent when
it did not exist). Full disks are injected by a `sitecustomize` that makes Orbax's save (and
then the TensorBoard writer's close) raise ENOSPC, since a real full disk cannot be made here.

The damaged caches (`--only caches`; `--case` filters them too): a cache entry made by a first
run (an automatic b_psi of a small recipe for t23d `:tiny`; Stable Diffusion weights converted
from a tiny PyTorch-format folder for `configs/synth.py`) is damaged (weights truncated, the
metadata file removed with its folder left, the metadata garbage) and the run started again in
the same cache: it must exit 0 with one warning line naming the `<key>.damaged-<time>` folder it
set aside (kept as it was) and leave an intact entry. Where the damaged entry cannot be moved
aside (a `sitecustomize` refuses the rename): b_psi, exit 2 and one `error:` line that names
the folder to delete; converted weights, exit 0, converted again uncached, one warning naming
it. Two runs started at once on an empty cache must train b_psi once.

The kill loop: one workdir, the same command started again and again; each start is stopped
by SIGTERM or SIGKILL at a random time, some during startup (before the first step), some
during a checkpoint save (while Orbax's temporary folder exists), some while the outputs are
written (after the last checkpoint). SIGTERM must exit 143; every run after a kill resumes. At
the end the last checkpoint's digest must equal an uninterrupted run's (bit-identical), at most
one checkpoint interval of logged steps may be lost per kill, and metrics.jsonl must hold each
step once.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from lmc_jax import workdir as lmc_workdir

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS, EVERY = 8, 2
TINY = {"steps": STEPS, "render.size": 8, "render.num_coarse": 4, "render.num_fine": 4,
        "field.width": 8, "log_every": 1, "checkpoint_every": EVERY, "keep_checkpoints": 2,
        "output.grid_every": 1000, "output.video_frames": 2, "output.video_size": 8,
        "output.mesh_resolution": 8}
FAULTS = '''
import errno, os
_step = int(os.environ.get("SURVIVE_ENOSPC_AT_STEP", "0"))
if _step:
    import orbax.checkpoint as ocp
    _save = ocp.CheckpointManager.save
    def _full(self, step, *a, **k):
        if step >= _step:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return _save(self, step, *a, **k)
    ocp.CheckpointManager.save = _full
    import tensorboardX
    def _close(self):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    tensorboardX.SummaryWriter.close = _close
if os.environ.get("SURVIVE_NO_SET_ASIDE"):  # a cache whose damaged entries cannot be moved
    _rename = os.rename
    def _refuse(src, dst, *a, **k):
        if ".damaged-" in os.fspath(dst):
            raise OSError(errno.EROFS, os.strerror(errno.EROFS))
        return _rename(src, dst, *a, **k)
    os.rename = _refuse
'''


def _args(workdir: str, preset: str = "tiny", **over) -> list[str]:
    keys = {**TINY, **over}
    return [sys.executable, "-m", "lmc_jax.main", f"--config=configs/t23d.py:{preset}",
            f"--workdir={workdir}", *[f"--config.{k}={v}" for k, v in keys.items()]]


class Bench:
    def __init__(self, tmp: str):
        self.tmp = tmp
        faults = os.path.join(tmp, "faults")
        os.makedirs(faults)
        with open(os.path.join(faults, "sitecustomize.py"), "w") as f:
            f.write(FAULTS)
        self.env = dict(os.environ, JAX_PLATFORMS="cpu",
                        JAX_COMPILATION_CACHE_DIR=os.path.join(tmp, "jax_cache"),
                        JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
                        JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0",
                        PYTHONPATH=os.pathsep.join([faults, os.environ.get("PYTHONPATH", "")]))
        self.rows: list[dict] = []

    def run(self, cmd: list[str], timeout: float = 900, **env) -> subprocess.CompletedProcess:
        return subprocess.run(cmd, cwd=ROOT, env={**self.env, **env}, capture_output=True,
                              text=True, timeout=timeout)

    def start(self, cmd: list[str]) -> subprocess.Popen:
        return subprocess.Popen(cmd, cwd=ROOT, env=self.env, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)

    def row(self, **r) -> None:
        self.rows.append(r)
        cells = " ".join(f"{k}={v}" for k, v in r.items() if k != "line")
        print(f"{cells}  {r.get('line', '')[:150]}", flush=True)


def _last_line(err: str) -> str:
    lines = [ln for ln in err.strip().splitlines() if ln.strip()]
    return lines[-1] if lines else ""


def _digest(workdir: str) -> tuple[int, str] | None:
    """(step, sha256 of the state) of the newest checkpoint, read from its integrity item."""
    d = os.path.join(workdir, "checkpoints")
    steps = sorted(int(s) for s in os.listdir(d) if s.isdigit()) if os.path.isdir(d) else []
    if not steps:
        return None
    for root, _, files in os.walk(os.path.join(d, str(steps[-1]), "integrity")):
        for name in files:
            try:
                data = json.load(open(os.path.join(root, name)))
            except (ValueError, UnicodeDecodeError):
                continue
            if isinstance(data, dict) and "sha256" in data:
                return steps[-1], data["sha256"]
    return steps[-1], ""


def _logged_steps(workdir: str) -> list[int]:
    path = os.path.join(workdir, "metrics.jsonl")
    if not os.path.exists(path):
        return []
    out = []
    for line in open(path):
        try:
            out.append(int(json.loads(line)["step"]))
        except (ValueError, KeyError):
            pass
    return out


# --- the bad-input matrix -----------------------------------------------------------------

def matrix(b: Bench, only: str = "") -> None:
    tmp = b.tmp
    finished = os.path.join(tmp, "finished")  # a finished run, copied for the resume cases

    def copy_of_finished(name: str) -> str:
        if not os.path.isdir(finished):
            done = b.run(_args(finished))
            assert done.returncode == 0, done.stderr[-3000:]
        wd = os.path.join(tmp, name)
        shutil.copytree(finished, wd)
        return wd

    def no_files(name: str) -> str:
        wd = copy_of_finished(name)
        for step in os.listdir(os.path.join(wd, "checkpoints")):
            for d, _, files in os.walk(os.path.join(wd, "checkpoints", step)):
                for f in files:
                    os.remove(os.path.join(d, f))
        return wd

    def corrupt(name: str) -> str:
        wd = copy_of_finished(name)
        for d, _, files in os.walk(os.path.join(wd, "checkpoints")):
            for f in files:
                p = os.path.join(d, f)
                with open(p, "r+b") as fh:
                    fh.truncate(os.path.getsize(p) // 2)
        return wd

    def a_file(name: str) -> str:
        p = os.path.join(tmp, name)
        open(p, "w").write("not a folder\n")
        return p

    def big_image(name: str) -> str:
        from PIL import Image

        folder = os.path.join(tmp, name + "_images")
        os.makedirs(folder)
        Image.new("RGB", (40, 40), (200, 0, 0)).save(os.path.join(folder, "ok.png"))
        Image.new("L", (14000, 14000)).save(os.path.join(folder, "huge.png"))
        return folder

    def random_prior(name: str) -> str:
        folder = os.path.join(tmp, name + "_prior")
        for sub in ("unet", "vae", "text_encoder", "tokenizer", "scheduler"):
            os.makedirs(os.path.join(folder, sub))
            for f in ("config.json", "model_index.json"):
                with open(os.path.join(folder, sub if f == "config.json" else "", f), "wb") as fh:
                    fh.write(os.urandom(256))
        return folder

    holder_code = ("import sys, time; from lmc_jax.workdir import WorkdirLock; "
                   "WorkdirLock(sys.argv[1], command='holder').acquire(); print('held', "
                   "flush=True); time.sleep(600)")
    cases = [
        ("unknown key", lambda n: os.path.join(tmp, n), {"stpes": 3}, {}),
        ("unknown nested key", lambda n: os.path.join(tmp, n), {"guidance.wieght": 3}, {}),
        ("empty prompt", lambda n: os.path.join(tmp, n), {"prompt": " "}, {}),
        ("unknown prompt word", lambda n: os.path.join(tmp, n), {"prompt": "a purple zebra"},
         {}),
        ("steps=0", lambda n: os.path.join(tmp, n), {"steps": 0}, {}),
        ("batch=0", lambda n: os.path.join(tmp, n), {"batch": 0}, {}),
        ("render.size too large", lambda n: os.path.join(tmp, n), {"render.size": 4096}, {}),
        ("bad blob_shape", lambda n: os.path.join(tmp, n), {"field.blob_shape": "cube"}, {}),
        ("bad background", lambda n: os.path.join(tmp, n), {"shading.background": "pink"}, {}),
        ("unknown guidance method", lambda n: os.path.join(tmp, n),
         {"guidance.method": "sdx"}, {}),
        ("model_axis does not divide", lambda n: os.path.join(tmp, n),
         {"parallel.model_axis": 3}, {}),
        ("missing bias_path", lambda n: os.path.join(tmp, n),
         {"guidance.bias_path": os.path.join(tmp, "nope")}, {}),
        ("resume changes field.width", copy_of_finished, {"field.width": 16}, {}),
        ("workdir is a file", a_file, {}, {}),
        ("unwritable workdir", lambda n: "/sys/lmc_jax_survive", {}, {}),
        ("every checkpoint's files deleted", no_files, {}, {}),
        ("every checkpoint truncated", corrupt, {}, {}),
        ("disk full during a save", lambda n: os.path.join(tmp, n), {},
         {"SURVIVE_ENOSPC_AT_STEP": "4"}),
        ("busy workdir", lambda n: os.path.join(tmp, n), {}, {"holder": "1"}),
    ]
    for name, make, over, env in cases:
        if only not in name:
            continue
        wd = make(name.replace(" ", "_").replace("'", ""))
        holder = None
        if env.pop("holder", None):
            holder = subprocess.Popen([sys.executable, "-c", holder_code, wd], cwd=ROOT,
                                      env=b.env, stdout=subprocess.PIPE, text=True)
            holder.stdout.readline()
        before = lmc_workdir.snapshot(wd)
        p = b.run(_args(wd, **over), **env)
        if holder is not None:
            holder.kill()
            holder.wait()
        line = _last_line(p.stderr)
        one = line.startswith("error: ") and "Traceback" not in p.stderr
        # A disk-full run keeps what it had (checkpoint 2); every other case changes nothing.
        kept = (lmc_workdir.snapshot(wd) == before if "disk full" not in name
                else (_digest(wd) or (0,))[0] == 2)
        b.row(kind="input", case=name, exit=p.returncode, one_line=one, unchanged=kept,
              ok=p.returncode == 2 and one and kept, line=line)
    # Two more, on other apps' inputs (data.path; prior.path, the real-prior loader's case).
    for name, make, app, over in (
            ("14000x14000 image in data.path", big_image, "configs/bias.py:tiny",
             {"data.source": "folder"}),
            ("prior folder of random bytes", random_prior, "configs/synth.py", {})):
        if only not in name:
            continue
        folder = make(name.split()[0])
        key = "data.path" if "data" in name else "prior.path"
        wd = os.path.join(tmp, name.split()[0] + "_run")
        cmd = [sys.executable, "-m", "lmc_jax.main", f"--config={app}", f"--workdir={wd}",
               f"--config.{key}={folder}", *[f"--config.{k}={v}" for k, v in over.items()]]
        p = b.run(cmd)
        line = _last_line(p.stderr)
        one = line.startswith("error: ") and "Traceback" not in p.stderr
        b.row(kind="input", case=name, exit=p.returncode, one_line=one, unchanged=True,
              ok=p.returncode == 2 and one, line=line)
    if only not in "--fresh_start after all unreadable":
        return
    # Starting over on purpose after every checkpoint was lost.
    wd = no_files("fresh_start")
    p = b.run([*_args(wd), "--fresh_start"])
    b.row(kind="input", case="--fresh_start after all unreadable", exit=p.returncode,
          one_line=True, unchanged=True, ok=p.returncode == 0, line=_last_line(p.stdout))


# --- damaged cache entries ----------------------------------------------------------------

BIAS_RECIPE = {"steps": 2, "guidance.bias_path": "", "guidance.bias_auto_steps": 20,
               "guidance.bias_auto_samples": 32, "guidance.bias_auto_ddim_steps": 4}


def _truncate(path: str) -> None:
    os.truncate(path, os.path.getsize(path) // 2)


def _cache_entry(cache: str, kind: str) -> str:
    """The b_psi entry of `cache` (kind 'bias'), or its converted UNet (kind 'flax')."""
    root = os.path.join(cache, kind)
    for name in sorted(os.listdir(root)):
        entry = os.path.join(root, name)
        if "." in name:  # a lock, a temporary or a set-aside folder
            continue
        if kind == "bias" or json.load(open(os.path.join(entry, "source.json")))[
                "folder"].endswith("unet"):
            return entry
    raise AssertionError(f"no {kind} entry in {cache}")


def caches(b: Bench, only: str = "") -> None:
    from lmc_jax.cache import entry_problem

    tmp = b.tmp
    pt = os.path.join(tmp, "tiny_sd_pytorch")

    def command(kind: str, wd: str) -> list[str]:
        if kind == "bias":
            return _args(wd, **BIAS_RECIPE)
        return [sys.executable, "-m", "lmc_jax.main", "--config=configs/synth.py",
                f"--workdir={wd}", f"--config.prior.path={pt}", "--config.prior.resolution=64",
                "--config.steps=1"]

    good: dict[str, str] = {}

    def cache_copy(kind: str, name: str) -> str:
        """A copy of a cache that a first run filled (made once per kind)."""
        if kind not in good:
            if kind == "flax":
                made = b.run([sys.executable, "-c", "import sys; from lmc_jax.priors import "
                              "sd_tiny; sd_tiny.save_tiny_pytorch_pipeline(sys.argv[1])", pt])
                assert made.returncode == 0, made.stderr[-3000:]
            good[kind] = os.path.join(tmp, f"cache_{kind}_first")
            first = b.run(command(kind, os.path.join(tmp, f"first_{kind}")),
                          LMC_JAX_CACHE=good[kind])
            assert first.returncode == 0, first.stderr[-3000:]
        cache = os.path.join(tmp, name)
        shutil.copytree(good[kind], cache)
        return cache

    meta = {"bias": "bias.json", "flax": "source.json"}
    weights = {"bias": "params.msgpack", "flax": "flax.safetensors"}
    damages = {
        "weights truncated": lambda e, k: _truncate(os.path.join(e, weights[k])),
        "metadata removed, folder left": lambda e, k: os.remove(os.path.join(e, meta[k])),
        "garbage metadata": lambda e, k: Path(e, meta[k]).write_bytes(os.urandom(64)),
    }
    what = {"bias": "b_psi cache", "flax": "converted weights"}
    cases = [(f"{what[k]}: {d}", k, d, {}) for k in ("bias", "flax") for d in damages]
    cases += [(f"{what[k]}: damaged and cannot be moved aside", k, "weights truncated",
               {"SURVIVE_NO_SET_ASIDE": "1"}) for k in ("bias", "flax")]
    for name, kind, damage, env in cases:
        if only not in name:
            continue
        slug = name.replace(" ", "_").replace(":", "").replace(",", "")
        cache = cache_copy(kind, slug)
        entry = _cache_entry(cache, kind)
        damages[damage](entry, kind)
        before = sorted(os.listdir(entry))
        p = b.run(command(kind, os.path.join(tmp, slug + "_run")), LMC_JAX_CACHE=cache, **env)
        out = p.stdout + p.stderr
        warns = [ln for ln in p.stderr.splitlines() if ln.startswith("WARNING")]
        aside = [n for n in os.listdir(os.path.dirname(entry))
                 if n.startswith(os.path.basename(entry) + ".damaged-")]
        clean = "Traceback" not in out
        if not env:  # set aside, kept as it was, rebuilt, one warning naming it
            kept = len(aside) == 1 and sorted(
                os.listdir(os.path.join(os.path.dirname(entry), aside[0]))) == before
            healed = kept and entry_problem(Path(entry), Path(cache)) is None
            line = warns[0] if warns else _last_line(p.stderr)
            ok = (p.returncode == 0 and clean and len(warns) == 1 and healed
                  and aside[0] in line)
        elif kind == "bias":  # one error line naming the folder to delete
            line = _last_line(p.stderr)
            healed = False
            ok = (p.returncode == 2 and clean and line.startswith("error: ")
                  and f"delete the folder {entry}" in line)
        else:  # converted again without the cache, one warning naming the folder
            line = warns[0] if warns else _last_line(p.stderr)
            healed = False
            ok = (p.returncode == 0 and clean and len(warns) == 1
                  and f"delete the folder {entry}" in line)
        b.row(kind="cache", case=name, exit=p.returncode, warnings=len(warns),
              traceback=not clean, healed=healed, ok=ok, line=line)
    name = "b_psi cache: two runs at once on an empty cache"
    if only not in name:
        return
    cache = os.path.join(tmp, "cache_at_once")
    procs = [subprocess.Popen(command("bias", os.path.join(tmp, f"at_once_{i}")), cwd=ROOT,
                              env={**b.env, "LMC_JAX_CACHE": cache}, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for i in range(2)]
    outs = [proc.communicate(timeout=1800) for proc in procs]
    trained = sum(out.count("training one on") for out, _ in outs)
    reused = sum(out.count("reusing") for out, _ in outs)
    clean = not any("Traceback" in err for _, err in outs)
    codes = [proc.returncode for proc in procs]
    b.row(kind="cache", case=name, exit=max(codes), warnings=0, traceback=not clean,
          healed=trained == 1 and reused == 1, ok=codes == [0, 0] and clean and trained == 1,
          line=f"trained {trained}x, reused {reused}x")


# --- the kill loop ------------------------------------------------------------------------

def _wait_for(proc: subprocess.Popen, cond, deadline: float) -> bool:
    while time.time() < deadline and proc.poll() is None:
        if cond():
            return True
        time.sleep(0.005)
    return False


def kills(b: Bench, n: int, rng: random.Random) -> None:
    ref = os.path.join(b.tmp, "reference")
    p = b.run(_args(ref))
    assert p.returncode == 0, p.stderr[-3000:]
    want = _digest(ref)
    t0 = time.time()
    p = b.run(_args(os.path.join(b.tmp, "timing")))
    span = time.time() - t0  # one whole run, warm cache
    wd = os.path.join(b.tmp, "killed")
    ck = os.path.join(wd, "checkpoints")
    modes = ["startup", "save", "outputs", "random"]
    for i in range(n):
        sig = signal.SIGTERM if i % 2 == 0 else signal.SIGKILL
        mode = modes[(i // 2) % len(modes)]
        before = _digest(wd)
        proc = b.start(_args(wd))
        deadline = time.time() + 2 * span + 60
        if mode == "startup":
            time.sleep(rng.uniform(0.2, 3.0))
            hit = proc.poll() is None
        elif mode == "save":
            hit = _wait_for(proc, lambda: os.path.isdir(ck) and any(
                "tmp" in s for s in os.listdir(ck)), deadline)
        elif mode == "outputs":
            hit = _wait_for(proc, lambda: os.path.isdir(os.path.join(ck, str(STEPS))), deadline)
        else:
            time.sleep(rng.uniform(0.0, span))
            hit = proc.poll() is None
        logged = _logged_steps(wd)
        hit = hit and proc.poll() is None  # the moment came and the run was still going
        if hit:
            proc.send_signal(sig)
        _, err = proc.communicate(timeout=900)
        after = _digest(wd)
        newest = after[0] if after else 0
        lost = max([s for s in logged if s <= STEPS] or [0]) - newest
        expect = 143 if sig == signal.SIGTERM else -9
        finished = proc.returncode == 0  # the run ended before the signal
        same = after == want if finished else None  # a finished run: bit-identical?
        ok = ((proc.returncode == expect and hit) or (finished and same and not hit)) and (
            "Traceback" not in err and lost <= EVERY)
        b.row(kind="kill", i=i, signal=sig.name, at=mode, hit=hit, exit=proc.returncode,
              ckpt_before=before[0] if before else None, ckpt_after=newest, lost_steps=lost,
              finished_bit_identical=same, ok=ok, line=_last_line(err))
        if finished:  # start over so that every kill interrupts something
            shutil.rmtree(wd)
    p = b.run(_args(wd))
    got = _digest(wd)
    steps = _logged_steps(wd)
    once = steps == list(range(1, STEPS + 1))
    b.row(kind="final", exit=p.returncode, bit_identical=got == want, steps_once=once,
          ok=p.returncode == 0 and got == want and once, line=_last_line(p.stderr))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--kills", type=int, default=20)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--only", choices=["matrix", "caches", "kills"], default=None)
    ap.add_argument("--case", default="", help="only the matrix and cache cases whose name "
                    "has this")
    ap.add_argument("--json", default="")
    args = ap.parse_args()
    t0 = time.time()
    with tempfile.TemporaryDirectory(prefix="survive_") as tmp:
        b = Bench(tmp)
        if args.only in (None, "matrix"):
            matrix(b, args.case)
        if args.only in (None, "caches"):
            caches(b, args.case)
        if args.only in (None, "kills"):
            kills(b, args.kills, random.Random(args.seed))
    inputs = [r for r in b.rows if r["kind"] == "input"]
    cached = [r for r in b.rows if r["kind"] == "cache"]
    killed = [r for r in b.rows if r["kind"] == "kill"]
    final = [r for r in b.rows if r["kind"] == "final"]
    print(f"\nbad inputs: {sum(r['ok'] for r in inputs)}/{len(inputs)} one error line, exit 2, "
          "folder unchanged")
    print(f"damaged caches: {sum(r['ok'] for r in cached)}/{len(cached)} set aside and rebuilt "
          "with one warning line (or one error line), no traceback")
    print(f"kills: {sum(r['ok'] for r in killed)}/{len(killed)} exit 143 (TERM) / -9 (KILL), "
          f"no traceback, <= {EVERY} steps lost; "
          f"{sum(r['hit'] for r in killed)} hit their moment")
    ends = [r for r in killed if r["finished_bit_identical"] is not None]
    print(f"runs that finished between kills: {len(ends)}, bit-identical to the uninterrupted "
          f"run: {sum(bool(r['finished_bit_identical']) for r in ends)}")
    for r in final:
        print(f"final resume: exit {r['exit']}, bit-identical {r['bit_identical']}, "
              f"metrics.jsonl steps once {r['steps_once']}")
    print(f"wall {time.time() - t0:.0f} s")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(b.rows, f, indent=1, default=str)


if __name__ == "__main__":
    main()
