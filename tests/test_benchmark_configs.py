"""benchmarks/t23d_step.py times the real-size step on a prior built from architecture
constants, not downloaded weights: check them against Stable Diffusion 2.1-base's published
parameter counts (the checkpoint's unet/, vae/ and text_encoder/), from shapes alone."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import jax
import numpy as np

from lmc_jax import _compat

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "t23d_step.py"


def _count(tree) -> int:
    return sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(tree))


def test_sd21_architecture_matches_the_published_parameter_counts(monkeypatch):
    monkeypatch.syspath_prepend(str(SCRIPT.parent))  # the script imports benchmarks/_timing.py
    spec = importlib.util.spec_from_file_location("t23d_step", SCRIPT)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    d, tr = _compat.diffusers(), _compat.transformers()
    key = jax.random.PRNGKey(0)
    unet = jax.eval_shape(d.FlaxUNet2DConditionModel(**bench.SD21_UNET).init_weights, key)
    vae = jax.eval_shape(d.FlaxAutoencoderKL(**bench.SD21_VAE).init_weights, key)
    text = tr.FlaxCLIPTextModel(tr.CLIPTextConfig(**bench.SD21_TEXT),
                                _do_init=False).params_shape_tree
    assert _count(unet) == 865_910_724
    assert _count(vae) == 83_653_863
    assert _count(text) == 340_387_840
    assert bench.SD21_SCHEDULER["prediction_type"] == "epsilon"  # 2.1-base; 2.1 (768) is v
