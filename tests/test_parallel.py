"""Data/model parallelism (lmc_jax.parallel): one device and eight give the same run.

The multi-device checks run in one subprocess with
`XLA_FLAGS=--xla_force_host_platform_device_count=8` (JAX reads it at startup): each app's
real train step runs a few steps on a mesh over all 8 CPU devices and on `jax.devices()[:1]`,
and the results must agree to float tolerance (the batch's gradient is summed in another
order). The subprocess writes a JSON file of measurements that the test checks.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time

import numpy as np
import pytest

from lmc_jax.config import load_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RTOL, ATOL = 1e-5, 1e-6


def _load_config(name: str, preset: str):
    return load_config(os.path.join(ROOT, "configs", f"{name}.py"), preset)


def t23d_config(steps: int = 2):
    c = _load_config("t23d", "mixture")
    c.steps, c.batch = steps, 8
    c.render.size, c.render.num_coarse, c.render.num_fine = 16, 8, 8
    c.field.width = 16
    c.log_every, c.checkpoint_every, c.output.grid_every = 1, 1000, 1000
    return c


def bias_config(steps: int = 3):
    c = _load_config("bias", "quick")
    c.prior.resolution = 16
    c.train.steps, c.train.batch, c.train.warmup = steps, 8, 1
    c.bias.features = 8
    c.log_every, c.checkpoint_every = 1, 1000
    return c


# --- the subprocess ---------------------------------------------------------------------

def _tree_diff(a, b) -> tuple[float, bool]:
    """(max abs difference, allclose at RTOL/ATOL) over two pytrees of arrays."""
    import jax

    la, lb = jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)
    assert len(la) == len(lb)
    diff, close = 0.0, True
    for x, y in zip(la, lb, strict=True):
        x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
        diff = max(diff, float(np.max(np.abs(x - y))) if x.size else 0.0)
        close &= bool(np.allclose(x, y, rtol=RTOL, atol=ATOL))
    return diff, close


def _metrics_log(workdir: str) -> list[dict]:
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def _run_logs_diff(tmp: str, app: str) -> tuple[float, bool]:
    """`_log_diff` of the metrics logged by the runs in TMP/APP-8 and TMP/APP-1."""
    return _log_diff(*(_metrics_log(os.path.join(tmp, f"{app}-{n}")) for n in ("8", "1")))


def _log_diff(a: list[dict], b: list[dict]) -> tuple[float, bool]:
    assert [r["step"] for r in a] == [r["step"] for r in b]
    diffs = [abs(r[k] - s[k]) / max(abs(r[k]), 1e-3) for r, s in zip(a, b, strict=True)
             for k in r]
    return max(diffs), max(diffs) < 1e-4


def _worker(out_path: str) -> None:
    import jax
    import jax.numpy as jnp

    from lmc_jax import parallel
    from lmc_jax.apps import bias as bias_app
    from lmc_jax.apps import t23d
    from lmc_jax.apps.optimize import make_optimizer, optimize_x
    from lmc_jax.bias.model import bias_fn_from
    from lmc_jax.errors import UserError
    from lmc_jax.guidance import Conditioning
    from lmc_jax.guidance.from_config import guidance_record
    from lmc_jax.priors import gaussian
    from lmc_jax.priors.factory import build_prior

    # The exact priors' arrays are small: let the model axis split them too (lam [H, W]).
    parallel.MIN_MODEL_SHARD_SIZE = 1
    res: dict = {"devices": len(jax.devices()), "seconds": {}}
    clock = [time.time()]

    def lap(name):
        res["seconds"][name] = round(time.time() - clock[0], 1)
        clock[0] = time.time()
    meshes = {"8": parallel.make_mesh(1), "1": parallel.make_mesh(1, jax.devices()[:1]),
              "4x2": parallel.make_mesh(2)}
    tmp = tempfile.mkdtemp()

    # text-to-3D: the app's loop, 8 views per step over 8 devices vs one device.
    runs = {}
    for name in ("8", "1"):
        wd = os.path.join(tmp, f"t23d-{name}")
        runs[name] = (t23d.train(t23d_config(), wd, mesh=meshes[name]), wd)
    p8, p1 = runs["8"][0]["state"].params, runs["1"][0]["state"].params
    res["t23d_params"] = _tree_diff(p8, p1)
    res["t23d_log"] = _run_logs_diff(tmp, "t23d")
    res["t23d_replicated"] = all(x.sharding.is_fully_replicated and len(x.sharding.device_set)
                                 == 8 for x in jax.tree_util.tree_leaves(p8))
    cfg = t23d_config()
    frames = [t23d.render_orbit(runs[n][0]["field"], p, cfg, 3, 16) for n, p in
              (("8", p8), ("1", p1))]
    lap("t23d")
    res["t23d_frames_max_uint8_diff"] = int(np.max(np.abs(frames[0].astype(int) - frames[1])))
    cfg.batch = 6
    try:
        t23d.train(cfg, os.path.join(tmp, "t23d-bad"), mesh=meshes["8"])
        res["t23d_bad_batch"] = ""
    except UserError as e:
        res["t23d_bad_batch"] = str(e)

    lap("t23d_frames_bad_batch")
    # b_psi training: the app's loop, 8 images per batch over 8 devices and on one device. The
    # result is the trained b_psi: its outputs on fixed inputs. (Raw params: Adam's first steps
    # move the conv biases that GroupNorm cancels by lr * noise / (|noise| + eps), noise = float
    # rounding, so those differ by up to ~0.1 lr; they do not change the outputs.)
    outs, params = {}, {}
    for name in ("8", "1"):
        wd = os.path.join(tmp, f"bias-{name}")
        module, params[name], prior, _ = bias_app.train_bias(bias_config(), wd, quiet=True,
                                                             mesh=meshes[name])
        x = gaussian.sample(prior.params, jax.random.PRNGKey(7), 4)
        t = jnp.array([50, 300, 600, 900])
        outs[name] = bias_fn_from(module, jax.device_get(params[name]))(
            x, t, prior.embed_text([""] * 4))
    res["bias_outputs"] = _tree_diff(outs["8"], outs["1"])
    res["bias_raw_params_info"] = _tree_diff(params["8"], params["1"])
    res["bias_log"] = _run_logs_diff(tmp, "bias")

    lap("bias")
    # synth: the optimized images x [8, ...] split over 'data' on 8 devices, and over 4 with the
    # prior's lam [H, W] split over 'model' (optimizer 'sgd': with Adam, pixels whose guidance
    # gradient is ~0 move by lr * rounding noise / eps).
    sc = _load_config("synth", "mixture")
    prior0 = build_prior(sc.prior)
    xs = {}
    for name in ("8", "1", "4x2"):
        mesh = meshes[name]
        prior = prior0.replace(params=parallel.shard_params(prior0.params, mesh))
        if name == "4x2":
            res["synth_lam_spec"] = str(prior.params["lam"].sharding.spec)
        guide = guidance_record(prior, sc.guidance, 3)
        n = 8
        cond = Conditioning(c=prior.embed_text([sc.prompt] * n), u=prior.embed_text([""] * n))
        x0 = parallel.shard_batch(
            0.5 * jax.random.normal(jax.random.PRNGKey(3), (n, *prior.x_shape)), mesh)
        x, _, _ = optimize_x(prior, x0, cond, guide, steps=3,
                             optimizer=make_optimizer("sgd", sc.lr), key=jax.random.PRNGKey(4))
        xs[name] = x
        res[f"synth_x_devices_{name}"] = len(x.sharding.device_set)
    res["synth_x"] = _tree_diff(xs["8"], xs["1"])
    res["synth_x_model2"] = _tree_diff(xs["4x2"], xs["1"])
    res["synth_x_split"] = not xs["8"].sharding.is_fully_replicated

    lap("synth")
    # image-to-image: f_theta's loop on the exact mixture, 8 images per batch.
    from lmc_jax.apps import i2i

    ic = _load_config("i2i", "mixture")
    ic.steps, ic.log_every, ic.eval_every, ic.checkpoint_every = 3, 1, 1000, 1000
    iprior = build_prior(ic.prior)
    iguide = guidance_record(iprior, ic.guidance, ic.steps)
    inet = i2i.Translator(ic.net.features, ic.net.blocks)
    ip = {}
    for name in ("8", "1", "4x2"):
        wd = os.path.join(tmp, f"i2i-{name}")
        ip[name] = i2i.train(ic, wd, inet, iprior, iguide, mesh=meshes[name])["state"].params
    # Compared: f_theta's outputs on fixed images (raw params: Adam moves weights whose gradient
    # is rounding noise by ~lr, as for b_psi above).
    xi = 0.5 * jax.random.normal(jax.random.PRNGKey(6), (4, *iprior.x_shape))
    yi = {k: inet.apply(jax.device_get(v), xi) for k, v in ip.items()}
    res["i2i_outputs"] = _tree_diff(yi["8"], yi["1"])
    res["i2i_outputs_model2"] = _tree_diff(yi["4x2"], yi["1"])
    res["i2i_raw_params_info"] = _tree_diff(ip["8"], ip["1"])
    res["i2i_log"] = _run_logs_diff(tmp, "i2i")

    lap("i2i")
    # Training the embedded prior: 2 steps at batch 8 on synthetic renders. Compared: the
    # logged loss and the trained UNet's output on a fixed input (raw params: see b_psi above).
    from lmc_jax.apps import train_prior

    pc = _load_config("train_prior", "quick")
    pc.steps, pc.log_every, pc.checkpoint_every = 2, 1, 1000
    rng = np.random.default_rng(0)
    data = {"image": rng.integers(0, 256, (16, 32, 32, 3), dtype=np.uint8),
            "shape": rng.integers(0, 3, 16), "colour": rng.integers(0, 3, 16)}
    unet_out = {}
    for name in ("8", "1"):
        wd = os.path.join(tmp, f"prior-{name}")
        r = train_prior.train(pc, wd, mesh=meshes[name], data=data)
        p = jax.device_get(r["state"].params)
        ids = jnp.zeros((2, 8), jnp.int32)
        emb = r["text_encoder"](ids, params=p["text_encoder"]).last_hidden_state
        x = jax.random.normal(jax.random.PRNGKey(5), (2, 3, 32, 32))
        unet_out[name] = r["unet"].apply({"params": p["unet"]}, x, jnp.array([100, 800]),
                                         emb).sample
    # A 24-layer UNet sums in another order: tolerance relative to the output's scale.
    diff = float(np.max(np.abs(np.asarray(unet_out["8"]) - np.asarray(unet_out["1"]))))
    scale = float(np.max(np.abs(np.asarray(unet_out["1"]))))
    res["prior_unet_out"] = (diff, diff <= RTOL * scale)
    res["prior_log"] = _run_logs_diff(tmp, "prior")

    lap("train_prior")
    # The sharding rule for a prior's big arrays (default size threshold), model axis of 2.
    parallel.MIN_MODEL_SHARD_SIZE = 1 << 14
    big = {"kernel": jnp.zeros((3, 3, 64, 128)), "bias": jnp.zeros((128,)),
           "odd": jnp.zeros((256, 129)), "small": jnp.zeros((16, 16))}
    placed = parallel.shard_params(big, meshes["4x2"])
    res["model_specs"] = {k: str(tuple(v.sharding.spec)) for k, v in placed.items()}
    with open(out_path, "w") as f:
        json.dump(res, f)


def test_one_and_eight_devices_agree(tmp_path):
    """All 1-vs-8-device checks in one test: under pytest-xdist a shared fixture would run the
    (one-minute) subprocess once per worker."""
    out = tmp_path / "result.json"
    # Optimization level 0 halves XLA's compile time here; both sides run the same code.
    flags = "--xla_force_host_platform_device_count=8 --xla_backend_optimization_level=0"
    env = dict(os.environ, XLA_FLAGS=flags, JAX_PLATFORMS="cpu", LMC_JAX_NO_REEXEC="1")
    proc = subprocess.run([sys.executable, os.path.abspath(__file__), str(out)], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    res = json.loads(out.read_text())
    print("1-vs-8 device max abs differences:",
          {k: v[0] for k, v in res.items() if isinstance(v, list) and len(v) == 2},
          "seconds:", res["seconds"])
    assert res["devices"] == 8
    # The same result on one device and on eight (and on 4 data x 2 model for synth, i2i).
    for key in ("t23d_params", "bias_outputs", "synth_x", "synth_x_model2", "i2i_outputs",
                "i2i_outputs_model2", "prior_unet_out"):
        diff, close = res[key]
        assert close, f"{key}: max abs diff {diff} beyond rtol={RTOL}, atol={ATOL}"
    # A run's outputs do not depend on the device count: logged metrics and rendered views.
    for key in ("t23d_log", "bias_log", "i2i_log", "prior_log"):
        assert res[key][1], (key, res[key])
    assert res["t23d_frames_max_uint8_diff"] <= 1
    # Params replicated over the 8 devices; the batch split over them.
    assert res["t23d_replicated"]
    assert res["synth_x_devices_8"] == 8 and res["synth_x_split"]
    assert res["synth_x_devices_1"] == 1
    # A batch that does not divide over the data axis names the key to change.
    msg = res["t23d_bad_batch"]
    assert "batch=6" in msg and "--config.batch" in msg and "multiple of 8" in msg, msg
    # The model axis splits only big arrays whose last axis it divides.
    assert res["model_specs"] == {"kernel": "(None, None, None, 'model')", "bias": "()",
                                  "odd": "()", "small": "()"}
    assert res["synth_lam_spec"] == "P(None, 'model')"  # with the size threshold lowered


def test_single_host_needs_no_distributed_init(monkeypatch):
    from lmc_jax import parallel

    for var in ("LMC_JAX_DISTRIBUTED", "JAX_COORDINATOR_ADDRESS", "SLURM_JOB_ID",
                "OMPI_COMM_WORLD_SIZE", "TPU_WORKER_HOSTNAMES", "MEGASCALE_COORDINATOR_ADDRESS"):
        monkeypatch.delenv(var, raising=False)
    assert parallel.distributed_env() is None
    assert parallel.maybe_initialize_distributed() is False
    assert parallel.is_main_process()
    monkeypatch.setenv("SLURM_JOB_ID", "1")
    monkeypatch.setenv("SLURM_NTASKS", "1")
    assert parallel.distributed_env() is None  # one task: nothing to coordinate
    monkeypatch.setenv("SLURM_NTASKS", "4")
    assert parallel.distributed_env() == "slurm"
    monkeypatch.setenv("LMC_JAX_DISTRIBUTED", "0")
    assert parallel.distributed_env() is None


def test_model_axis_must_divide_the_devices():
    import jax

    from lmc_jax import parallel
    from lmc_jax.errors import UserError

    n = len(jax.devices())
    with pytest.raises(UserError, match="parallel.model_axis"):
        parallel.make_mesh(n + 1)


if __name__ == "__main__":
    _worker(sys.argv[1])
