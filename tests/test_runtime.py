"""lmc_jax._runtime: an entry point's crash in native code is never silent."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_a_segfault_after_the_entry_point_setup_prints_the_python_stack(tmp_path):
    script = tmp_path / "crash.py"
    script.write_text(textwrap.dedent("""
        import ctypes
        import sys

        from lmc_jax import _runtime

        _runtime.maybe_reexec_with_fast_malloc(sys.argv)


        def deep_in_a_benchmark():
            ctypes.string_at(0)  # reads address 0: SIGSEGV


        deep_in_a_benchmark()
    """))
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONFAULTHANDLER",
                                                            "LMC_JAX_REEXECED")}
    proc = subprocess.run([sys.executable, str(script)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    assert "Segmentation fault" in proc.stderr, proc.stderr
    assert "deep_in_a_benchmark" in proc.stderr, proc.stderr
