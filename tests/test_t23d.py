"""The text-to-3D app end to end on the exact mixture prior, and its bad-input errors."""

import json
import os

import imageio.v2 as iio
import numpy as np
import pytest

from lmc_jax.apps import t23d
from lmc_jax.config import load_config
from lmc_jax.errors import UserError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _config(preset="mixture"):
    c = load_config(os.path.join(ROOT, "configs", "t23d.py"), preset)
    c.steps = 4
    c.render.size = 16
    c.render.num_coarse = 8
    c.render.num_fine = 8
    c.field.width = 16
    c.output.video_frames = 6
    c.output.video_size = 16
    c.output.view_size = 24
    c.output.mesh_resolution = 16
    c.output.texture_size = 64
    c.output.grid_every = 2
    c.log_every = 2
    c.checkpoint_every = 2
    return c


def test_short_run_writes_video_mesh_grids_and_resumes(tmp_path):
    c = _config()
    metrics = t23d.run(c, str(tmp_path))
    assert all(np.isfinite(v) for v in metrics.values() if isinstance(v, float))
    video = metrics["video"]
    frames = iio.mimread(video) if video.endswith(".gif") else [f for f in iio.get_reader(video)]
    assert len(frames) == 6 and frames[0].shape[:2] == (16, 16)
    assert (tmp_path / "mesh.obj").exists() and (tmp_path / "mesh.ply").exists()
    assert (tmp_path / "mesh.glb").exists() and (tmp_path / "report.html").exists()
    assert metrics["mesh_faces"] > 0
    # The initial blob: one closed piece with no hole (lmc_jax.nerf.cleanup).
    assert metrics["mesh_pieces"] == 1 and metrics["mesh_watertight"], metrics
    assert metrics["mesh_euler"] == 2 and metrics["mesh_pieces_raw"] >= 1
    views = iio.imread(tmp_path / "views.png")
    assert views.shape == (2 * (24 + 2) + 2, 3 * (24 + 2) + 2, 3)
    assert iio.imread(tmp_path / "view_top.png").shape == (24, 24, 3)
    assert not metrics["empty_scene"] and "warnings" not in metrics  # the initial blob is opaque
    assert (tmp_path / "grid_000002.png").exists() and (tmp_path / "grid_000004.png").exists()
    lines = (tmp_path / "metrics.jsonl").read_text().strip().splitlines()
    assert [json.loads(ln)["step"] for ln in lines] == [2, 4]
    # Asking for more steps in the same workdir continues from the checkpoint at step 4.
    c.steps = 6
    t23d.run(c, str(tmp_path))
    lines = (tmp_path / "metrics.jsonl").read_text().strip().splitlines()
    assert [json.loads(ln)["step"] for ln in lines] == [2, 4, 6]


@pytest.mark.parametrize("key,value,needle", [
    ("prompt", "  ", "prompt is empty"),
    ("steps", 0, "steps must be > 0"),
    ("render.size", 12, "render.size=12"),
    ("render.size", 64, "render.size=64"),
    ("field.blob_shape", "cubic", "field.blob_shape"),
    ("output.mesh_outlier_fraction", 1.5, r"output.mesh_outlier_fraction=1.5 .*\[0, 1\)"),
    ("output.view_size", 0, "output.view_size must be > 0"),
    ("output.mesh_smooth", -1.0, "output.mesh_smooth=-1.0 is not a width in voxels"),
])
def test_bad_input_is_a_clear_error(tmp_path, key, value, needle):
    c = _config()
    section, _, leaf = key.rpartition(".")
    (c[section] if section else c)[leaf] = value
    with pytest.raises(UserError, match=needle):
        t23d.run(c, str(tmp_path))


def test_default_preset_without_weights_says_where_to_get_them(tmp_path):
    c = _config("")
    with pytest.raises(UserError, match=":tiny"):
        t23d.run(c, str(tmp_path))


def test_tiny_preset_uses_the_embedded_prior_and_reports_the_evaluator(tmp_path):
    c = _config("tiny")
    assert c.prior.name == "embedded" and c.guidance.bias_path == "embedded"
    c.steps = 2
    c.output.grid_every = 2
    metrics = t23d.run(c, str(tmp_path))
    for key in ("eval_accuracy", "eval_r_precision"):
        assert 0.0 <= metrics[key] <= 1.0, metrics
    assert metrics["colourfulness_ratio"] > 0
    saved = json.loads((tmp_path / "metrics.json").read_text())
    assert saved["eval_r_precision"] == metrics["eval_r_precision"]


def test_tiny_preset_rejects_words_the_prior_never_saw(tmp_path):
    c = _config("tiny")
    c.prompt = "a DSLR photo of a fox"
    with pytest.raises(UserError, match="'fox'"):
        t23d.run(c, str(tmp_path))


def test_nfsd_step_reads_the_negative_prompt():
    """NFSD at t >= 200: `L_proj = W (e_u - e_neg)`, `L_cond = W w (e_c - e_u)`. With the
    prompt as its own negative, `L_proj = -L_cond / w` (norms in ratio 1/w); with the null
    prompt as the negative, `L_proj = 0`. Without the negative prompt (`neg = u`) the first
    would read 0 as well."""
    from lmc_jax import parallel
    from lmc_jax.priors.factory import build_prior

    c = _config()
    c.guidance.method, c.guidance.negative_prompt = "nfsd", "green"
    c.guidance.t_min = 300  # every t above nfsd_threshold = 200
    c.batch = 2
    prior = build_prior(c.prior)
    mesh = parallel.mesh_from_config(c)
    _, state, step = t23d.setup(c, prior, "green", mesh)
    assert "emb_neg" in step.consts
    np.testing.assert_array_equal(np.asarray(step.consts["emb_neg"]),
                                  np.asarray(prior.embed_text(["green"])))
    start = parallel.to_host(state)  # the step donates its state; keep a copy for the rerun
    _, m = step(state)
    l_cond, l_proj = float(m["L_cond_grad_norm"]), float(m["L_proj_grad_norm"])
    assert l_cond > 1e-3, m
    np.testing.assert_allclose(l_proj, l_cond / c.guidance.w, rtol=1e-4)
    # The same compiled step with the null prompt as the negative: delta_D = e_u - e_u = 0.
    consts = {**step.consts, "emb_neg": parallel.replicate(prior.embed_text([""]), mesh)}
    _, m0 = step.jitted(parallel.replicate(start, mesh), consts)
    # (0 up to float rounding: e_u and e_neg come from different rows of one batched call)
    assert float(m0["L_proj_grad_norm"]) < 1e-4 * float(m0["L_cond_grad_norm"]), m0


def _constant_head_field(blob_density: float, blob_radius: float, bias: float):
    """A field whose density is `softplus(bias + blob(x))` exactly (density head's kernel 0)."""
    import jax
    import jax.numpy as jnp

    from lmc_jax.nerf.field import MLPField

    field = MLPField(width=8, depth=1, max_deg=2, blob_density=blob_density,
                     blob_radius=blob_radius)
    p = field.init(jax.random.PRNGKey(0), jnp.zeros((1, 3)), jnp.zeros((1, 3)))
    head = p["params"]["density_head"]
    head = {"kernel": jnp.zeros_like(head["kernel"]), "bias": jnp.full_like(head["bias"], bias)}
    p = {"params": {**p["params"], "density_head": head}}
    return field, {"field": p}


def test_empty_scene_criterion_on_an_empty_field_and_a_solid_ball():
    """A field of density softplus(-30) ~ 1e-13 is an empty scene. A ball of density
    `sigma(r) = softplus(-30 + A exp(-r^2 / 2 rho^2))` is opaque (acc >= 1/2) on the rays whose
    optical depth `tau(p) = int sigma(sqrt(p^2 + s^2)) ds` at impact parameter `p` exceeds
    ln 2: on the pixels whose ray passes within `p*` of the centre, `tau(p*) = ln 2`."""
    c = _config()
    field, params = _constant_head_field(0.0, 0.2, -30.0)
    empty = t23d.occupancy(t23d.eval_views(field, params, c)[1])
    assert empty["empty_scene"] and empty["opaque_fraction"] == 0.0
    assert empty["mean_opacity"] < 1e-6

    a, rho = 1e3, 0.2
    field, params = _constant_head_field(a, rho, -30.0)
    views, acc = t23d.eval_views(field, params, c)
    assert views.shape == (t23d.EVAL_VIEWS, t23d.EVAL_SIZE, t23d.EVAL_SIZE, 3)
    ball = t23d.occupancy(acc)
    # tau(p) by the trapezoid rule on a fine grid, then p* by bisection.
    s = np.linspace(-1.0, 1.0, 20001)

    def tau(p):
        z = -30.0 + a * np.exp(-(p**2 + s**2) / (2 * rho**2))
        return np.trapezoid(np.logaddexp(0.0, z), s)

    lo, hi = 0.0, 1.0
    for _ in range(50):
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if tau(mid) > np.log(2.0) else (lo, mid)
    # Pixel centres (generate_rays' pinhole) whose ray passes within p* of the origin.
    n, dist = t23d.EVAL_SIZE, float(np.mean(c.camera.distance_range))
    focal = 0.5 * n / np.tan(0.5 * np.deg2rad(float(np.mean(c.camera.fovy_range))))
    u = (np.arange(n) + 0.5 - 0.5 * n) / focal
    tan_theta = np.hypot(u[:, None], u[None, :])
    impact = dist * tan_theta / np.sqrt(1.0 + tan_theta**2)  # D sin(theta)
    want = float(np.mean(impact < lo))
    assert 0.05 < want < 0.5, want
    np.testing.assert_allclose(ball["opaque_fraction"], want, rtol=0.05)
    assert not ball["empty_scene"] and ball["mean_opacity"] > 0.9 * want


def test_a_collapsed_field_ends_the_cli_run_with_a_warning_and_status_0(tmp_path):
    """A field whose density is ~0 everywhere (a blob of -100 over the whole scene): metrics.json
    says `empty_scene`, the last line of the output is the warning, the exit status is 0."""
    import subprocess
    import sys

    flags = {"steps": 2, "render.size": 16, "render.num_coarse": 8, "render.num_fine": 8,
             "field.width": 16, "field.blob_density": -100.0, "field.blob_radius": 10.0,
             "output.video_frames": 4, "output.video_size": 16, "output.view_size": 16,
             "output.mesh_resolution": 16,
             "output.grid_every": 2, "log_every": 2, "checkpoint_every": 2}
    proc = subprocess.run(
        [sys.executable, "-m", "lmc_jax.main", "--config=configs/t23d.py:mixture",
         f"--workdir={tmp_path}", *[f"--config.{k}={v}" for k, v in flags.items()]],
        cwd=ROOT, env=dict(os.environ, JAX_PLATFORMS="cpu"), capture_output=True, text=True,
        timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip().splitlines()[-1].startswith("WARNING: EMPTY SCENE"), proc.stdout
    saved = json.loads((tmp_path / "metrics.json").read_text())
    assert saved["empty_scene"] is True and saved["opaque_fraction"] == 0.0, saved
    assert saved["warnings"][0].startswith("EMPTY SCENE")


def test_the_prompt_benchmark_counts_an_empty_scene_as_a_failure():
    from _bench import load_benchmark

    bench = load_benchmark("t23d_prompts")
    full = {"eval_accuracy": 1.0, "eval_r_precision": 1.0, "opaque_fraction": 0.2,
            "empty_scene": False}
    # The evaluator may well pick the prompt's class for a bare grey view: it does not count.
    empty = {"eval_accuracy": 0.5, "eval_r_precision": 1.0, "opaque_fraction": 0.0,
             "empty_scene": True}
    assert bench.scored(full) == full
    assert bench.scored(empty)["eval_r_precision"] == 0.0
    assert bench.scored(empty)["eval_accuracy"] == 0.0
    per = {"a": bench.scored(full), "b": bench.scored(empty), "c": bench.scored(full)}
    (row,) = bench.summarize({"lmc": per}, ("eval_r_precision", "opaque_fraction"))
    assert row[0] == "lmc" and row[-1] == 1
    np.testing.assert_allclose(row[2:4], [2 / 3, 0.4 / 3])


@pytest.mark.parametrize("shape,lo,hi", [("linear", 0.05, 0.35), ("gaussian", 0.8, 1.0)])
def test_the_initial_scene_is_an_object_not_a_fog(shape, lo, hi):
    """:tiny's untrained field seen by the evaluation views: the linear blob is a ball covering
    about what the embedded prior's objects cover (8-23% of a view); DreamFusion's Gaussian
    blob leaves softplus(~0) fog over the whole scene (most of the view opaque)."""
    import optax

    from lmc_jax.nerf import shading

    c = load_config(os.path.join(ROOT, "configs", "t23d.py"), "tiny")
    assert c.field.blob_shape == "linear"
    c.field.blob_shape = shape
    field = t23d.build_field(c.field)
    state = t23d.init_state(c, field, shading.BackgroundMLP(), optax.adam(1e-3))
    occ = t23d.occupancy(t23d.eval_views(field, state.params, c)[1])
    assert lo < occ["opaque_fraction"] < hi, occ
