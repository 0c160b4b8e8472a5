"""launch/: shell scripts parse, the Colab notebook is valid nbformat-4 JSON, configs exist."""

import ast
import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LAUNCH = ROOT / "launch"
SCRIPTS = sorted(LAUNCH.glob("*.sh"))
NOTEBOOK = LAUNCH / "colab.ipynb"
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
