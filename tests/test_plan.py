"""lmc_jax.plan: the apps' real steps compiled ahead of time for a TPU slice on this CPU host.

Needs libtpu (the TPU compiler; `pip install -e ".[tpu]"`, a second environment in .ci/run)
and skips, saying so, without it. Small programs (the exact Gaussian-mixture prior, a 16x16
field) keep each compile to seconds; the checks are what the TPU compiler reports: the state is
donated (aliased bytes = the state's bytes), a data-parallel step's only collectives are
all-reduces (no collective-permute: the cond/uncond rows of the guidance batch stay on their
device), and bad input is one error line.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys

import pytest

from lmc_jax.config import load_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOPOLOGY = "v5e:2x2"  # 4 chips

needs_libtpu = pytest.mark.skipif(
    importlib.util.find_spec("libtpu") is None,
    reason="libtpu is not installed: the TPU compile-only tests run in the `tpu` extra's "
           "environment (pip install -e \".[test,tpu]\"; .ci/run does)")


def _t23d(batch: int, model_axis: str = "auto"):
    c = load_config(os.path.join(ROOT, "configs", "t23d.py"), "mixture")
    c.batch, c.parallel.model_axis = batch, model_axis
    c.render.size, c.render.num_coarse, c.render.num_fine = 16, 8, 8
    c.field.width, c.field.depth = 16, 2
    return c


def _bias(batch: int = 8):
    c = load_config(os.path.join(ROOT, "configs", "bias.py"), "quick")
    c.prior.resolution, c.train.batch, c.bias.features = 16, batch, 8
    return c


def _state_bytes(config) -> int:
    """Bytes of the app's train state (what donation must alias), from its own init."""
    import jax
    import optax

    from lmc_jax.apps import bias, t23d
    from lmc_jax.bias import train
    from lmc_jax.nerf import shading
    from lmc_jax.priors.factory import build_prior

    if config.app == "t23d":
        opt = optax.chain(optax.clip_by_global_norm(config.grad_clip), optax.adam(config.lr))
        state = t23d.init_state(config, t23d.build_field(config.field), shading.BackgroundMLP(),
                                opt)
    else:
        prior = build_prior(config.prior)
        state = train.init_state(bias.build_module(config.bias), prior,
                                 optax.adam(config.train.lr), config.seed,
                                 prior.embed_text([""]))
    return sum(x.nbytes for x in jax.tree_util.tree_leaves(state))


@pytest.fixture(scope="module")
def plan():
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    from lmc_jax import plan

    return plan


def _check_donated(row, config):
    """Every byte of the state is aliased (the device pads small arrays to its tiles, so the
    aliased bytes may exceed the state's logical bytes, never the outputs')."""
    alias, out = row["alias_gib"] * 2**30, row["out_gib"] * 2**30
    state = _state_bytes(config)
    assert state <= alias <= out, (alias, state, out)


@needs_libtpu
def test_data_parallel_t23d_step_donates_its_state_and_only_all_reduces(plan):
    config = _t23d(batch=4)
    row = plan.plan(config, TOPOLOGY, quiet=True)
    assert (row["devices"], row["data"], row["model"]) == (4, 4, 1)
    _check_donated(row, config)
    _check_data_parallel_collectives(row)
    assert row["verdict"].startswith("fits")


def _check_data_parallel_collectives(row):
    """The gradient is summed over the data axis (all-reduce); nothing moves rows between chips
    (the 44 collective-permutes of concatenating cond/uncond along the split batch axis are
    gone). The one other kind: the test prior's (the exact Gaussian mixture's) class
    likelihood einsums over the image, which XLA gathers (docs/design.md 2.6); the embedded
    and SD priors' steps have the all-reduce alone (BUILD.md's plan table)."""
    coll = row["collectives"]
    assert "all-reduce" in coll, coll
    assert set(coll) <= {"all-reduce", "all-gather"}, coll
    for source in coll.get("all-gather", {}).get("sources", {}):
        assert "khwc" in source or "bhw" in source, coll


@needs_libtpu
def test_model_split_t23d_step_compiles_and_donates(plan):
    config = _t23d(batch=2, model_axis="2")
    row = plan.plan(config, TOPOLOGY, quiet=True)
    assert (row["data"], row["model"]) == (2, 2)
    _check_donated(row, config)


@needs_libtpu
def test_default_batch_one_picks_a_split_for_the_slice(plan):
    config = _t23d(batch=1)
    row = plan.plan(config, TOPOLOGY, quiet=True)
    assert (row["data"], row["model"]) == (1, 4)
    assert row["verdict"].startswith("fits") and "--config.batch=4" in row["verdict"]


@needs_libtpu
def test_bias_training_step_compiles_data_parallel_and_donates(plan):
    config = _bias()
    row = plan.plan(config, TOPOLOGY, quiet=True)
    assert (row["data"], row["model"]) == (4, 1)
    _check_donated(row, config)
    _check_data_parallel_collectives(row)


@needs_libtpu
def test_v4_is_planned_one_device_per_chip(plan):
    """libtpu lists v4's two TensorCores per chip as devices; JAX on a v4 host (and
    jax.make_mesh) uses one per chip."""
    devices, _ = plan.slice_devices("v4:2x2x1")
    assert len(devices) == 4 and all(d.core_on_chip == 0 for d in devices)
    assert plan.chip_figures(devices)["hbm_gib"] == 32.0


@needs_libtpu
def test_a_batch_that_does_not_split_is_a_user_error(plan):
    from lmc_jax.errors import UserError

    with pytest.raises(UserError, match="multiple of 4"):
        plan.plan(_t23d(batch=3, model_axis="1"), TOPOLOGY, quiet=True)


@needs_libtpu
def test_an_unknown_topology_is_one_error_line():
    env = dict(os.environ, JAX_PLATFORMS="cpu", LMC_JAX_NO_REEXEC="1")
    proc = subprocess.run([sys.executable, "-m", "lmc_jax.plan", "--config=configs/t23d.py:mixture",
                           "--topology=v9z:2x2"], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-2000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "v9z:2x2" in errors[0] and "v5e:2x2" in errors[0], proc.stderr


def test_without_libtpu_a_topology_is_one_clear_error(plan, monkeypatch):
    from lmc_jax.errors import UserError

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "libtpu" else real(name, *a))
    with pytest.raises(UserError, match=r"\.\[tpu\]"):
        plan.slice_devices(TOPOLOGY)


def test_this_hosts_devices_plan_the_step_and_count_a_collective(plan):
    """No topology: this host's own device (one CPU here). The donated state is aliased; the
    collectives parser counts an all-reduce in a compiled module's text."""
    config = _t23d(batch=1)
    row = plan.plan(config, "", quiet=True)
    assert row["topology"] == "local" and row["devices"] >= 1
    _check_donated(row, config)
    hlo = ('  %all-reduce.3 = f32[128,4]{1,0} all-reduce(f32[128,4]{1,0} %p), '
           'metadata={op_name="jit(step)/psum"}\n'
           '  %cp-start = (f32[8]{0}, f32[8]{0}) collective-permute-start(f32[8]{0} %q)\n'
           '  %cp-done = f32[8]{0} collective-permute-done((f32[8]{0}, f32[8]{0}) %cp-start)')
    found = plan.collectives(hlo)
    assert found["all-reduce"]["count"] == 1 and found["all-reduce"]["bytes"] == 128 * 4 * 4
    assert found["collective-permute"]["count"] == 1
    assert found["collective-permute"]["bytes"] == 32
    # Bytes written by top-level instructions, by model; a fused body's ops are not counted.
    module = ('%fused_computation.1 (p: f32[4]) -> f32[4] {\n'
              '  ROOT %m = f32[4]{0} multiply(f32[4]{0} %p, f32[4]{0} %p), '
              'metadata={op_name="jit(s)/FlaxAutoencoderKL/mul"}\n}\n\n'
              'ENTRY %main.2 (a: f32[4]) -> bf16[500] {\n'
              '  %a = f32[4]{0} parameter(0)\n'
              '  %f = f32[1000]{0} fusion(f32[4]{0} %a), kind=kLoop, calls=%fused_computation.1, '
              'metadata={op_name="jit(s)/FlaxUNet2DConditionModel/conv"}\n'
              '  ROOT %c = bf16[500]{0} copy(f32[1000]{0} %f), '
              'metadata={op_name="jit(s)/MLPField/dense"}\n'
              '  %r = f32[10]{0} fusion(f32[4]{0} %a), calls=%fused_computation.1, '
              'metadata={op_name="jit(s)/transpose(jvp(resize))"}\n'
              '  %t = f32[20]{0} copy(f32[20]{0} %f)\n}\n')
    written = plan.bytes_by_source(module)
    assert written == {"FlaxUNet2DConditionModel": 4000 / 1e9, "MLPField": 1000 / 1e9,
                       "other: resize": 40 / 1e9, "other: copy (no op_name)": 80 / 1e9}, written


@pytest.mark.parametrize("app,overrides", [("synth", {}), ("edit", {"guidance.method": "dds"}),
                                           ("i2i", {"steps": 2})])
def test_every_app_plans_on_this_host(plan, app, overrides):
    """synth, edit (DDS: a source image and prompt) and i2i build, compile and report too."""
    config = load_config(os.path.join(ROOT, "configs", f"{app}.py"), "mixture")
    for key, value in overrides.items():
        section, _, name = key.rpartition(".")
        (config[section] if section else config)[name] = value
    row = plan.plan(config, "", quiet=True)
    assert row["app"] == app and row["tflop"] > 0 and row["gb_accessed"] > 0
    assert row["alias_gib"] > 0  # x and its optimizer state (synth/edit), the net's (i2i)
