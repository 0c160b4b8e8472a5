"""benchmarks/ablation_t23d.py: its vmapped training of 25 scenes is the app's own step, scene
by scene, and its scoring counts empty scenes as failures."""

from __future__ import annotations

import jax
import numpy as np
import pytest
from _bench import load_benchmark

PROMPTS = ["a red cube", "a blue torus"]


@pytest.fixture(scope="module")
def bench():
    return load_benchmark("ablation_t23d")


def test_vmapped_scenes_equal_the_apps_step_run_alone(bench):
    from lmc_jax import parallel
    from lmc_jax.apps import t23d
    from lmc_jax.priors.factory import build_prior

    config = bench.tiny_config(steps=2)
    prior = build_prior(config.prior)
    params, _, _ = bench.train_scenes(config, prior, PROMPTS, seed=3, progress=False)
    mesh = parallel.mesh_from_config(config)
    c = config.copy_and_resolve_references()
    c.prompt, c.seed = PROMPTS[1], 3  # the second scene: a mix-up of scenes would show
    _, state, step = t23d.setup(c, prior, PROMPTS[1], mesh)
    for _ in range(config.steps):
        state = step(state)[0]
    leaves = jax.tree_util.tree_leaves
    for a, b in zip(leaves(state.params), leaves(params[1]), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-5)
    assert max(float(np.max(np.abs(np.asarray(a) - np.asarray(b))))
               for a, b in zip(leaves(params[0]), leaves(params[1]), strict=True)) > 1e-4
