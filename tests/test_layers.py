"""The library never imports the applications: `lmc_jax.apps` (and the entry points above it)
may use every library package, never the other way round (a plan or a run of the automatic
b_psi must not climb from the library into an app)."""

from __future__ import annotations

import ast
import pathlib

PACKAGE = pathlib.Path(__file__).resolve().parent.parent / "lmc_jax"
LIBRARY = ("bias", "data", "guidance", "metrics", "nerf", "priors")


def _imports(path: pathlib.Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
            names.update(f"{node.module}.{a.name}" for a in node.names)
    return names


def test_no_library_module_imports_an_app():
    offenders = {}
    files = [f for pkg in LIBRARY for f in (PACKAGE / pkg).rglob("*.py")]
    assert len(files) > 20  # the walk found the library
    for f in files:
        bad = sorted(n for n in _imports(f) if n == "lmc_jax.apps" or n.startswith("lmc_jax.apps."))
        if bad:
            offenders[str(f.relative_to(PACKAGE))] = bad
    assert not offenders, offenders
