"""launch/: the Colab notebook runs top to bottom on a CPU (nbclient), launch/tpu_vm.sh and
launch/gpu.sh run their real commands against a fake gcloud (tests/_fake_gcloud.py) whose
machines are this one, and what they name (configs, config keys, the JAX pin) exists."""

import ast
import contextlib
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tarfile
from pathlib import Path

import jax
import pytest

ROOT = Path(__file__).resolve().parents[1]
LAUNCH = ROOT / "launch"
SCRIPTS = sorted(LAUNCH.glob("*.sh"))
NOTEBOOK = LAUNCH / "colab.ipynb"
JAX_PIN = re.search(r'"jax==([^"]+)"', (ROOT / "pyproject.toml").read_text()).group(1)
CELL_KEYS = {"markdown": {"cell_type", "metadata", "source"},
             "code": {"cell_type", "metadata", "source", "outputs", "execution_count"}}


def test_launch_files_exist():
    names = {p.name for p in LAUNCH.iterdir()}
    assert {"tpu_vm.sh", "gpu.sh", "colab.ipynb"} <= names, names


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_shell_script_parses(script):
    proc = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert script.read_text().startswith("#!/usr/bin/env bash\n")


def _source(cell) -> str:
    src = cell["source"]
    return src if isinstance(src, str) else "".join(src)


def test_notebook_is_nbformat4():
    nb = json.loads(NOTEBOOK.read_text())
    assert nb["nbformat"] == 4 and isinstance(nb["nbformat_minor"], int)
    assert isinstance(nb["metadata"], dict) and isinstance(nb["cells"], list) and nb["cells"]
    for cell in nb["cells"]:
        kind = cell["cell_type"]
        assert kind in CELL_KEYS, kind
        assert CELL_KEYS[kind] <= set(cell), (kind, set(cell))
        assert isinstance(cell["metadata"], dict)
        src = cell["source"]
        assert isinstance(src, str) or all(isinstance(line, str) for line in src)
        if kind == "code":
            assert cell["outputs"] == [] and cell["execution_count"] is None  # saved clean
            # Python apart from IPython's `!shell` lines
            ast.parse("".join(line for line in _source(cell).splitlines(keepends=True)
                              if not line.lstrip().startswith(("!", "%"))))
    code = "\n".join(_source(c) for c in nb["cells"] if c["cell_type"] == "code")
    for needle in ("drive.mount", "configs/t23d.py:tiny", "video.mp4", "views.png", "Video("):
        assert needle in code, needle


def _config_mentions() -> list[tuple[str, str]]:
    """(file, config path) for every `--config=PATH` and `configs/NAME.py` in launch/."""
    found = []
    for path in sorted(LAUNCH.iterdir()):
        if not path.is_file():
            continue
        text = path.read_text()
        if path.suffix == ".ipynb":
            text = "\n".join(_source(c) for c in json.loads(text)["cells"])
        for m in re.finditer(r"--config[= ]([^\s'\"\\:$]+)", text):
            found.append((path.name, m.group(1)))
        for m in re.finditer(r"\bconfigs/[\w./-]*?\.py", text):
            found.append((path.name, m.group(0)))
    return found


def test_every_config_in_launch_exists():
    mentions = _config_mentions()
    assert any(name == "colab.ipynb" for name, _ in mentions)
    assert any(name.endswith(".sh") for name, _ in mentions)
    missing = [(name, cfg) for name, cfg in mentions if not (ROOT / cfg).is_file()]
    assert not missing, missing
    assert all(cfg.startswith("configs/") for _, cfg in mentions), mentions


# --- the pins and config keys that launch/ names ------------------------------------------------

def _launch_texts() -> dict[str, str]:
    texts = {}
    for path in sorted(LAUNCH.iterdir()):
        if path.is_file():
            text = path.read_text()
            if path.suffix == ".ipynb":
                text = "\n".join(_source(c) for c in json.loads(text)["cells"])
            texts[path.name] = text
    return texts


def test_every_jax_version_in_launch_is_the_pinned_one():
    pin = JAX_PIN
    found = []
    for name, text in _launch_texts().items():
        # jax[tpu]==X, and the defaults JAX_VERSION="${JAX_VERSION:-X}" / JAX_VERSION = 'X'
        for m in re.finditer(r"jax\[\w+\]==([^\s'\"]+)|JAX_VERSION(?::-| = ')([^}'\s]+)", text):
            found.append((name, m.group(1) or m.group(2)))
    assert {name for name, _ in found} == {"colab.ipynb", "gpu.sh", "tpu_vm.sh"}, found
    assert any(v == pin for _, v in found), found
    assert all(v in (pin, "$JAX_VERSION", "{JAX_VERSION}") for _, v in found), (pin, found)


def test_every_config_key_in_launch_exists_in_the_t23d_config():
    from lmc_jax.config import load_config

    keys = {(name, m.group(1)) for name, text in _launch_texts().items()
            for m in re.finditer(r"--config\.([\w.]+)=", text) if m.group(1) != "key"}
    assert {"prompt", "prior.path", "prior.dtype"} <= {k for _, k in keys}, keys
    keys |= {("TINY_FLAGS", flag[len("--config."):].split("=")[0]) for flag in TINY_FLAGS}
    for preset in (None, "tiny"):
        config = load_config(str(ROOT / "configs" / "t23d.py"), preset)
        for name, key in keys:
            node = config
            for part in key.split("."):
                assert part in node, f"{name}: --config.{key} is not a key of configs/t23d.py"
                node = node[part]


def test_what_the_notebook_says_of_tiny_is_what_the_config_does():
    """:tiny is the shipped embedded prior with its shipped b_psi; the real run needs no
    b_psi flag (automatic) and no weight-format flag (detected)."""
    from lmc_jax.config import load_config
    from lmc_jax.data import shapes

    text = _launch_texts()["colab.ipynb"]
    tiny = load_config(str(ROOT / "configs" / "t23d.py"), "tiny")
    assert tiny.prior.name == "embedded" and tiny.guidance.bias_path == "embedded"
    assert "embedded prior" in text and not re.search(r"random\W+stable", text, re.I)
    for words in shapes.SHAPE_WORDS.values():
        assert "/".join(words) in text, words
    for colour in shapes.COLOURS:
        assert colour in text, colour
    real = load_config(str(ROOT / "configs" / "t23d.py"))
    assert real.guidance.method == "lmc" and real.guidance.bias_path == ""
    assert real.guidance.bias_auto is True
    code = "\n".join(_source(c) for c in json.loads(NOTEBOOK.read_text())["cells"]
                     if c["cell_type"] == "code")
    assert "from_pt" not in text and "bias_path" not in code
    assert "lmc_jax.plan" in text


# --- running them: the notebook, and the scripts with a fake gcloud --------------------------

# configs/t23d.py:tiny made cheap: the same program, 2 steps, small renders and outputs.
TINY_FLAGS = ["--config.steps=2", "--config.render.size=16", "--config.render.num_coarse=8",
              "--config.render.num_fine=8", "--config.field.width=16",
              "--config.output.video_frames=4", "--config.output.video_size=16",
              "--config.output.view_size=16", "--config.output.mesh_resolution=16",
              "--config.output.texture_size=64", "--config.output.grid_every=2",
              "--config.log_every=1", "--config.checkpoint_every=2"]
T23D_OUTPUTS = ("config.json", "metrics.json", "video.mp4", "views.png", "mesh.glb",
                "report.html")
# The scripts' jobs: image synthesis on the exact Gaussian-mixture prior, 2 steps (~7 s of CPU
# cold, against ~50 s for t23d.py:tiny, which the notebook runs). The scripts pass CONFIG and
# EXTRA_ARGS through unchanged whatever the app: what is tested is their command line.
SCRIPT_CONFIG = "configs/synth.py:mixture"
SCRIPT_FLAGS = ["--config.steps=2", "--config.prompt=a blue one"]  # quoting kept to the job
SYNTH_OUTPUTS = ("config.json", "metrics.json", "final.png")


def _outputs_of_a_2_step_run(workdir: Path, app: str, prior: str, outputs: tuple) -> None:
    missing = [f for f in outputs if not (workdir / f).is_file()]
    assert not missing, (missing, sorted(os.listdir(workdir)) if workdir.is_dir() else workdir)
    metrics = json.loads((workdir / "metrics.json").read_text())
    assert metrics["steps"] == 2, metrics
    config = json.loads((workdir / "config.json").read_text())
    assert (config["app"], config["prior"]["name"], config["steps"]) == (app, prior, 2), config
    if app == "synth":
        assert config["prompt"] == "a blue one", config["prompt"]


@pytest.fixture(scope="module")
def run_env(tmp_path_factory) -> dict[str, str]:
    """The environment of the lmc_jax runs below: CPU, one JAX compilation cache for all of
    them (and for the xdist workers: their basetemps' common parent), a private lmc_jax cache."""
    base = tmp_path_factory.getbasetemp()
    shared = os.environ.get("PYTEST_XDIST_WORKER") is not None
    compile_cache = base.parent / "lmc_jax_compile_cache" if shared else base / "jax_cache"
    compile_cache.mkdir(parents=True, exist_ok=True)
    return {"JAX_PLATFORMS": "cpu", "TF_CPP_MIN_LOG_LEVEL": "2",
            "JAX_COMPILATION_CACHE_DIR": str(compile_cache),
            "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
            "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0",
            "LMC_JAX_CACHE": str(tmp_path_factory.mktemp("lmc_jax_cache"))}


def _outputs_by_cell(nb) -> dict[str, tuple[str, list[dict]]]:
    """{cell id: (its stream text, its display outputs)} of an executed notebook."""
    out = {}
    for cell in nb.cells:
        if cell.cell_type != "code":
            continue
        assert cell.execution_count is not None, cell.id
        text = "".join(o.get("text", "") for o in cell.outputs if o.output_type == "stream")
        shown = [o for o in cell.outputs if o.output_type in ("display_data", "execute_result")]
        out[cell.id] = (text, shown)
    return out


def test_the_colab_notebook_runs_top_to_bottom_on_a_cpu(tmp_path, run_env, monkeypatch):
    """Every cell of launch/colab.ipynb, in order, in a Jupyter kernel (nbclient, which raises
    on the first cell that fails): the Colab-only and TPU-only cells say they are skipped, the
    demo runs `configs/t23d.py:tiny` (2 steps here, through the notebook's LMC_NOTEBOOK_ARGS)
    and the result cell shows its video and views."""
    import nbformat
    from nbclient import NotebookClient

    # A kernel on this interpreter, whatever kernels the user's Jupyter knows.
    spec = tmp_path / "jupyter" / "kernels" / "lmc_jax_test"
    spec.mkdir(parents=True)
    (spec / "kernel.json").write_text(json.dumps({
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "lmc_jax test", "language": "python"}))
    monkeypatch.setenv("JUPYTER_PATH", str(tmp_path / "jupyter"))
    monkeypatch.setenv("JUPYTER_RUNTIME_DIR", str(tmp_path / "jupyter_runtime"))
    monkeypatch.setenv("IPYTHONDIR", str(tmp_path / "ipython"))
    for key, value in run_env.items():
        monkeypatch.setenv(key, value)
    drive = tmp_path / "drive"
    monkeypatch.setenv("LMC_NOTEBOOK_DIR", str(drive))
    monkeypatch.setenv("LMC_NOTEBOOK_ARGS", shlex.join(TINY_FLAGS))

    nb = nbformat.read(NOTEBOOK, as_version=4)
    NotebookClient(nb, timeout=600, kernel_name="lmc_jax_test",
                   resources={"metadata": {"path": str(LAUNCH)}}).execute()
    cells = _outputs_by_cell(nb)

    assert f"Not on Colab: using the checkout at {ROOT}" in cells["install"][0]
    assert " cpu [" in cells["jax"][0], cells["jax"][0]
    assert "outputs in" in cells["demo"][0], cells["demo"][0][-3000:]
    workdir = drive / "t23d-tiny-a-green-torus"
    _outputs_of_a_2_step_run(workdir, "t23d", "embedded", T23D_OUTPUTS)
    text, shown = cells["show"]
    assert "eval_accuracy" in text and "video.mp4" in text, text
    assert any("<video" in o.data.get("text/html", "") for o in shown), shown
    assert sum("image/png" in o.data for o in shown) >= 1, shown
    assert "Plan skipped: no TPU" in cells["plan"][0]
    assert "--config=configs/t23d.py" in cells["real_settings"][0]
    assert f"Skipped: no Stable Diffusion folder at {drive / 'sd21'}" in cells["real_run"][0]


def _fake_gcloud(tmp_path: Path, vm_env: dict[str, str] | None = None, execute: bool = False,
                 workers: int = 1) -> dict[str, str]:
    """PATH and settings that put tests/_fake_gcloud.py first as `gcloud`."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    gcloud = bin_dir / "gcloud"
    gcloud.write_text(f'#!/bin/sh\nexec "{sys.executable}" "{ROOT / "tests" / "_fake_gcloud.py"}" '
                      '"$@"\n')
    gcloud.chmod(0o755)
    env = {k: v for k, v in os.environ.items() if k not in ("PROJECT", "CONFIG", "WORKDIR",
                                                           "EXTRA_ARGS", "GCS_BUCKET", "REPO_URL")}
    env.update(PATH=f"{bin_dir}:{os.environ['PATH']}", FAKE_GCLOUD_DIR=str(tmp_path / "cloud"),
               FAKE_GCLOUD_EXEC="1" if execute else "0", FAKE_TPU_WORKERS=str(workers),
               FAKE_GCLOUD_VM_ENV=json.dumps(vm_env or {}))
    return env


def _calls(tmp_path: Path) -> list[list[str]]:
    lines = (tmp_path / "cloud" / "calls.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines]


def _called(calls: list[list[str]], *words: str) -> list[list[str]]:
    return [c for c in calls if all(w in c for w in words)]


def _bash(script: str, *args: str, env: dict[str, str], timeout: int = 600):
    return subprocess.run([shutil.which("bash"), str(LAUNCH / script), *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)


def _main_argv(runner: str) -> list[str]:
    """The command of ~/lmc_run.sh that runs the job."""
    (line,) = [ln for ln in runner.splitlines() if "lmc_jax.main" in ln]
    return shlex.split(line)


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
def test_tpu_vm_sh_runs_the_job_on_a_one_worker_tpu(tmp_path, run_env):
    """launch/tpu_vm.sh end to end against a fake gcloud whose "TPU VM" is this machine: the
    queued resource is created, this checkout is copied (tar) and unpacked in the remote home,
    the install command runs (its pip records what it would install), ~/lmc_run.sh runs the job
    (`python -m lmc_jax.main`, 2 steps) from the unpacked copy, the
    script sees exit status 0, fetches the outputs and deletes the TPU."""
    home = tmp_path / "cloud" / "home"
    venv_bin = home / "lmc_venv" / "bin"
    venv_bin.mkdir(parents=True)
    # The remote venv: its python is this interpreter; its pip only records its arguments.
    for name, body in {"python": f'exec "{sys.executable}" "$@"',
                       "pip": 'echo "$*" >> "$HOME/pip.log"'}.items():
        (venv_bin / name).write_text(f"#!/bin/sh\n{body}\n")
        (venv_bin / name).chmod(0o755)
    (venv_bin / "activate").write_text(f'export PATH="{venv_bin}:$PATH"\n')
    env = _fake_gcloud(tmp_path, vm_env=run_env, execute=True)
    out = tmp_path / "out"
    out.mkdir()
    env.update(CONFIG=SCRIPT_CONFIG, RUN_NAME="tiny", EXTRA_ARGS=shlex.join(SCRIPT_FLAGS),
               POLL_SECONDS="1", WAIT_SECONDS="0", OUT_DIR=str(out))
    try:
        proc = _bash("tpu_vm.sh", env=env)
    finally:  # never leave the job behind
        pid = home / "lmc_run.pid"
        if pid.is_file():
            with contextlib.suppress(ProcessLookupError, ValueError):
                os.kill(int(pid.read_text()), signal.SIGKILL)
    assert proc.returncode == 0, (proc.stderr[-3000:], (home / "lmc_run.log").read_text()[-3000:]
                                  if (home / "lmc_run.log").exists() else "no log")
    calls = _calls(tmp_path)
    (create,) = _called(calls, "queued-resources", "create")
    assert {"--accelerator-type=v5litepod-8", "--runtime-version=v2-alpha-tpuv5-lite", "--spot",
            "--node-id=lmc-jax-tpu", "--zone=us-central1-a"} <= set(create), create
    assert all(c[:2] == ["--quiet", "--project=test-project"] for c in calls[1:]), calls
    shipped = home / "lmc_jax"
    assert (shipped / "configs" / "t23d.py").is_file()
    assert (shipped / "lmc_jax" / "assets" / "embedded_prior" / "bias").is_dir()
    assert not any((shipped / name).exists() for name in (".git", "runs", ".venv"))
    assert (home / "pip.log").read_text().splitlines()[-1] == (
        f"install -q -e ./lmc_jax jax[tpu]=={JAX_PIN}")

    argv = _main_argv((home / "lmc_run.sh").read_text())
    assert argv == ["python", "-m", "lmc_jax.main", f"--config={SCRIPT_CONFIG}",
                    "--workdir=../runs/tiny", *SCRIPT_FLAGS], argv
    assert (home / "lmc_run.rc").read_text().strip() == "0"
    _outputs_of_a_2_step_run(home / "runs" / "tiny", "synth", "gaussian_mixture", SYNTH_OUTPUTS)
    with tarfile.open(out / "tiny-out.tar.gz") as tar:
        assert "tiny/metrics.json" in tar.getnames()
    assert _called(calls, "queued-resources", "delete")
    assert not (tmp_path / "cloud" / "qr").exists() and not (tmp_path / "cloud" / "tpu").exists()
    assert "job finished" in proc.stderr


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
def test_tpu_vm_sh_on_a_multi_host_slice_starts_every_worker_distributed(tmp_path):
    """A 2-worker slice (fake gcloud, commands recorded, not run): a direct `tpu-vm create`
    (on demand), the code cloned from REPO_URL on every worker, the bucket mounted, and every
    worker's job is the single-host command above with LMC_JAX_DISTRIBUTED=1 and the workdir in
    the bucket."""
    env = _fake_gcloud(tmp_path, workers=2)
    env.update(CONFIG=SCRIPT_CONFIG, RUN_NAME="big", EXTRA_ARGS=shlex.join(SCRIPT_FLAGS),
               ACCELERATOR="v4-16", RUNTIME="tpu-ubuntu2204-base", USE_QUEUED_RESOURCE="0",
               SPOT="0", GCS_BUCKET="my-bucket", REPO_URL="https://example.com/lmc_jax.git",
               POLL_SECONDS="0", WAIT_SECONDS="0")
    proc = _bash("tpu_vm.sh", env=env, timeout=60)
    assert proc.returncode == 0, proc.stderr[-3000:]
    calls = _calls(tmp_path)
    (create,) = _called(calls, "tpu-vm", "create")
    assert {"--accelerator-type=v4-16", "--version=tpu-ubuntu2204-base"} <= set(create)
    assert "--spot" not in create
    ssh = [c[-1] for c in _called(calls, "ssh", "--worker=all")]
    assert any("git clone https://example.com/lmc_jax.git lmc_jax" in c for c in ssh), ssh
    assert any(f"'jax[tpu]=={JAX_PIN}'" in c for c in ssh), ssh
    assert any("gcsfuse --implicit-dirs my-bucket gcs" in c for c in ssh), ssh
    (scp,) = _called(calls, "scp", "--worker=all")
    assert not Path(scp[scp.index("scp") + 1]).exists()  # the script removes its temporary file
    argv = _main_argv((tmp_path / "cloud" / "home" / "lmc_run.sh").read_text())  # as copied
    assert argv == ["env", "LMC_JAX_DISTRIBUTED=1", "python", "-m", "lmc_jax.main",
                    f"--config={SCRIPT_CONFIG}", "--workdir=../gcs/big", *SCRIPT_FLAGS], argv
    assert "job on 2 worker(s): env LMC_JAX_DISTRIBUTED=1 python -m lmc_jax.main" in proc.stderr
    assert "without GCS_BUCKET" not in proc.stderr
    assert _called(calls, "tpu-vm", "delete")  # done, outputs in the bucket: TPU deleted


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
def test_gpu_sh_gce_boots_a_vm_whose_startup_script_runs_the_job(tmp_path, run_env):
    """launch/gpu.sh gce against a fake gcloud whose VM is this machine: the spot VM is created
    with this script as its startup script, which (on "boot") runs `launch/gpu.sh host` from the
    VM's copy of the code: the job (2 steps) in its retry loop, to
    `.lmc_done`; gce mode then sees the job done and stops the VM."""
    assert jax.__version__ == JAX_PIN  # the VM's venv is this one: nothing to pip-install
    remote_dir = tmp_path / "opt" / "lmc_jax"  # the VM's clone of the code: this checkout
    remote_dir.parent.mkdir()
    remote_dir.symlink_to(ROOT, target_is_directory=True)
    workdir, log = tmp_path / "gpu_run", tmp_path / "lmc_jax.log"
    env = _fake_gcloud(tmp_path, execute=True,
                       vm_env={**run_env, "VENV": sys.prefix, "REQUIRE_GPU": "0",
                               "RETRY_SLEEP": "0"})
    env.update(CONFIG=SCRIPT_CONFIG, WORKDIR=str(workdir), REPO_URL=str(ROOT),
               EXTRA_ARGS=shlex.join(SCRIPT_FLAGS), REMOTE_DIR=str(remote_dir),
               REMOTE_LOG=str(log), POLL_SECONDS="0", MAX_RETRIES="1")
    proc = _bash("gpu.sh", "gce", env=env)
    assert proc.returncode == 0, (proc.stderr[-3000:], log.read_text()[-3000:]
                                  if log.exists() else "no log")
    calls = _calls(tmp_path)
    (create,) = _called(calls, "instances", "create")
    assert {"--machine-type=g2-standard-8", "--accelerator=type=nvidia-l4,count=1",
            "--provisioning-model=SPOT", "--instance-termination-action=STOP"} <= set(create)
    startup = (tmp_path / "cloud" / "startup.sh").read_text()
    assert f"git clone {ROOT} {remote_dir}" in startup
    assert (tmp_path / "cloud" / "startup.rc").read_text() == "0", log.read_text()[-3000:]
    text = log.read_text()
    assert f"run 1: {SCRIPT_CONFIG}" in text and "done; outputs in" in text, text[-3000:]
    assert "run 2:" not in text and "MAX_RETRIES=1" in startup
    assert (workdir / ".lmc_done").is_file()
    _outputs_of_a_2_step_run(workdir, "synth", "gaussian_mixture", SYNTH_OUTPUTS)
    (ssh,) = _called(calls, "compute", "ssh")
    assert f"sudo test -f {workdir}/.lmc_done" in ssh[-1], ssh
    assert calls[-1][2:5] == ["compute", "instances", "stop"], calls[-1]


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
def test_gpu_sh_gce_stops_the_vm_when_the_job_fails(tmp_path):
    """A job that stops on bad input (exit 2, not retried) leaves .lmc_failed; gce mode shows
    the end of its log, stops the VM and exits 1 instead of waiting forever."""
    remote_dir = tmp_path / "lmc_jax"
    remote_dir.symlink_to(ROOT, target_is_directory=True)
    workdir, log = tmp_path / "run", tmp_path / "lmc_jax.log"
    env = _fake_gcloud(tmp_path, execute=True, vm_env={
        "VENV": sys.prefix, "REQUIRE_GPU": "0", "JAX_PLATFORMS": "cpu", "RETRY_SLEEP": "0"})
    env.update(CONFIG=SCRIPT_CONFIG, WORKDIR=str(workdir), REPO_URL=str(ROOT),
               EXTRA_ARGS="--config.no_such_key=1", REMOTE_DIR=str(remote_dir),
               REMOTE_LOG=str(log), POLL_SECONDS="0")
    proc = _bash("gpu.sh", "gce", env=env, timeout=300)
    assert proc.returncode == 1, (proc.stderr[-3000:], log.read_text()[-3000:])
    assert (workdir / ".lmc_failed").read_text().strip() == "2"
    assert not (workdir / ".lmc_done").exists()
    assert "job failed" in proc.stderr and "unknown config key 'no_such_key'" in proc.stdout
    assert _calls(tmp_path)[-1][2:5] == ["compute", "instances", "stop"]


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
def test_gpu_sh_stops_with_one_line_where_jax_sees_no_gpu(tmp_path):
    env = dict(os.environ, VENV=sys.prefix, JAX_VERSION=jax.__version__, JAX_PLATFORMS="cpu",
               WORKDIR=str(tmp_path / "run"))
    proc = _bash("gpu.sh", env=env, timeout=120)
    assert proc.returncode == 1, proc.stderr[-2000:]
    assert proc.stderr.strip().splitlines()[-1].startswith("error: JAX sees no GPU"), proc.stderr
    assert "REQUIRE_GPU=0" in proc.stderr
    assert not (tmp_path / "run").exists()


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
@pytest.mark.parametrize("script,args", [("tpu_vm.sh", ()), ("gpu.sh", ("gce",)),
                                         ("gpu.sh", ("gce-status",))])
def test_the_cloud_scripts_stop_with_one_line_without_gcloud(tmp_path, script, args):
    env = {"PATH": str(tmp_path), "HOME": str(tmp_path), "REPO_URL": "https://example.com/x.git"}
    proc = _bash(script, *args, env=env, timeout=60)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().splitlines() == [
        "error: gcloud not found: install the Google Cloud CLI (https://cloud.google.com/sdk) "
        "and run gcloud auth login"], proc.stderr
