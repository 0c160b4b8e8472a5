"""Text-to-3D (configs/t23d.py): DreamFusion-style optimization of a Mip-NeRF field.

One jitted train step:
  cameras ~ random orbits; rays -> render (coarse-to-fine, random shading and background)
  images [B, S, S, 3] in [-1, 1] -> x = prior.encode(resize(images, prior.image_shape))
  grad_x = guide(prior, x, t, eps, cond[view])     (the guidance record: SDS, LMC-SDS, ...)
  loss(params) = sum(sg(grad_x) * x) + lambda_o L_orient + lambda_a L_opacity
  params <- Adam(grad loss)

so `d loss / d params = (dx/dparams)^T grad_x + regularizer gradients` (the guidance gradient
pulled back through the VAE encoder and the volume renderer by reverse-mode autodiff).

Parallelism: the `batch` views of a step are split over the mesh's `data` axis (`batch` must be
a multiple of it), params and optimizer state are replicated, the prior's large arrays split
over `model` with `parallel.model_axis > 1` (lmc_jax.parallel).

Survival (lmc_jax.loop): resumes from WORKDIR/checkpoints (bit-identical to an uninterrupted
run: each step's randomness is `fold_in(key, step)`); a resume whose config changed `field.*`
is refused. SIGTERM/SIGINT save a checkpoint and exit with status 143 (`EXIT_PREEMPTED`); run
the same command again to continue. A NaN/inf loss or state stops the run with an error and
keeps the last good checkpoint. Only process 0 writes files.
"""

from __future__ import annotations

import functools
import logging
import os
import time
from collections import namedtuple
from collections.abc import Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from lmc_jax import io, parallel, report
from lmc_jax.config import require_positive, require_prompt
from lmc_jax.errors import UserError
from lmc_jax.guidance import Conditioning, surrogate_loss
from lmc_jax.guidance.from_config import guidance_record
from lmc_jax.guidance.record import Guidance
from lmc_jax.loop import Every, TrainLoop, TrainState, init_train_state
from lmc_jax.nerf import cameras, export, regularizers, shading
from lmc_jax.nerf.field import BLOB_SHAPES, MLPField
from lmc_jax.nerf.renderer import render_rays
from lmc_jax.priors.base import Prior
from lmc_jax.priors.factory import build_prior


def build_field(cfg: ml_collections.ConfigDict) -> MLPField:
    return MLPField(width=cfg.width, depth=cfg.depth, max_deg=cfg.max_deg,
                    blob_density=cfg.blob_density, blob_radius=cfg.blob_radius,
                    blob_shape=cfg.blob_shape)


def validate(config: ml_collections.ConfigDict, prior: Prior) -> str:
    prompt = require_prompt(config.prompt)
    require_positive(config.steps, "steps")
    require_positive(config.batch, "batch")
    size, img = config.render.size, prior.image_shape[0]
    if size < 8 or size > img or (prior.kind == "pixel" and img % size):
        raise UserError(f"render.size={size} does not fit prior {prior.name!r} (image size "
                        f"{img}): use a size between 8 and {img}"
                        + (f" that divides {img}" if prior.kind == "pixel" else ""))
    if config.field.blob_shape not in BLOB_SHAPES:
        raise UserError(f"field.blob_shape must be one of {list(BLOB_SHAPES)}, got "
                        f"{config.field.blob_shape!r}")
    export.check_threshold(config.output.mesh_threshold)
    export.check_outlier_fraction(config.output.mesh_outlier_fraction)
    export.check_smooth(config.output.mesh_smooth)
    require_positive(config.output.texture_size, "output.texture_size")
    require_positive(config.output.view_size, "output.view_size")
    if config.shading.background not in BACKGROUNDS:
        raise UserError(f"shading.background must be one of {list(BACKGROUNDS)}, got "
                        f"{config.shading.background!r}")
    return prompt


def view_embeddings(prior: Prior, prompt: str, view_dependent: bool) -> jax.Array:
    """[4, ...] embeddings of the prompt with each view suffix (front, side, back, overhead)."""
    if not view_dependent:
        return jnp.concatenate([prior.embed_text([prompt])] * len(cameras.VIEW_SUFFIXES))
    return prior.embed_text([cameras.prompt_with_view(prompt, s) for s in cameras.VIEW_SUFFIXES])


def to_prior_input(prior: Prior, images: jax.Array) -> jax.Array:
    """Renders [B, S, S, 3] in [-1, 1] -> the prior's `x` (resize, then encode)."""
    h, w, _ = prior.image_shape
    if images.shape[1:3] != (h, w):
        images = jax.image.resize(images, (images.shape[0], h, w, 3), "bilinear")
    return prior.encode(images)


def frozen(section: ml_collections.ConfigDict) -> tuple:
    """A config section's values as an immutable named tuple (lists become tuples): what a
    traced step reads instead of the ConfigDict."""
    d = section.to_dict()
    return namedtuple("Section", list(d))(*(tuple(v) if isinstance(v, list) else v
                                            for v in d.values()))


def make_step(config, prior: Prior, guide: Guidance, field: MLPField, background, opt,
              emb_views, emb_null, mesh: jax.sharding.Mesh | None = None,
              emb_neg: jax.Array | None = None):
    """The jitted train step `(state) -> (state, metrics)` on `mesh` (default: all devices).

    The views (cameras, rays, renders, x) are split over the mesh's `data` axis; the state
    comes back replicated. The prior's params and the prompt embeddings are arguments of the
    compiled step (placed once by `parallel.shard_params`), not constants baked into it.
    `emb_neg` [1, ...]: NFSD's negative prompt (`consts["emb_neg"]`; None: NFSD uses `u`).
    """
    mesh = mesh if mesh is not None else parallel.mesh_from_config(config)
    rc, cc, sc, reg = (frozen(config[k]) for k in ("render", "camera", "shading", "reg"))
    b, size = config.batch, rc.size
    parallel.check_batch(b, mesh, "batch")
    split = lambda tree: parallel.constrain_batch(tree, mesh)  # noqa: E731

    def render_views(params, key, step):
        k_cam, k_shade, k_light, k_bg, k_ray = jax.random.split(key, 5)
        cams = split(cameras.sample_orbit_cameras(
            k_cam, b, cc.elevation_range, cc.azimuth_range, cc.distance_range, cc.fovy_range))
        origins, directions, radii = split(
            cameras.generate_rays(cams["c2w"], cams["fovy"], size, size))
        modes = shading.sample_shading_mode(k_shade, sc.probs, (b,))
        light = shading.sample_light_position(k_light, cams["c2w"][:, :3, 3])
        if sc.background == "mlp":
            bg = background.apply(params["background"], directions)
        else:
            if sc.background == "grey":  # a plain grey, like the embedded prior's renders
                lo, hi = sc.grey_range
                solid = jnp.repeat(jax.random.uniform(k_bg, (b, 1), minval=lo, maxval=hi), 3, -1)
            else:
                solid = shading.random_solid_background(k_bg, (b,))
            bg = jnp.broadcast_to(solid[:, None, None], directions.shape)
        out = render_rays(field, params["field"], k_ray, origins, directions, radii,
                          scene_radius=rc.scene_radius, num_coarse=rc.num_coarse,
                          num_fine=rc.num_fine, randomized=True,
                          shading_mode=modes[:, None, None],
                          light_position=light[:, None, None, :], background=split(bg),
                          ambient=sc.ambient, diffuse=sc.diffuse)
        view = cameras.view_index(cams["elevation"], cams["azimuth"])
        return out, directions, view

    def loss_fn(params, consts, key, step):
        pr = prior.replace(params=consts["prior"])
        k_render, k_noise = jax.random.split(key)
        out, directions, view = render_views(params, k_render, step)
        images = out["rgb"] * 2.0 - 1.0
        x = split(to_prior_input(pr, images))
        t, eps = split(guide.draw(k_noise, step, b, pr.x_shape))
        batched = lambda e: jnp.broadcast_to(e, (b,) + e.shape[1:])  # noqa: E731
        neg = consts.get("emb_neg")
        cond = split(Conditioning(c=consts["emb_views"][view], u=batched(consts["emb_null"]),
                                  neg=None if neg is None else batched(neg)))
        g = guide(pr, x, t, eps, cond)
        l_orient = regularizers.orientation_loss(out["weights"], out["normals"], directions)
        l_opacity = regularizers.opacity_loss(out["acc"])
        loss = surrogate_loss(x, g.grad) + reg.orientation * l_orient + reg.opacity * l_opacity
        metrics = {**g.scalars, "L_orient": l_orient, "L_opacity": l_opacity,
                   "t_mean": jnp.mean(t.astype(jnp.float32))}
        return loss, metrics

    def step_fn(state: TrainState, consts):
        key = jax.random.fold_in(state.key, state.step)
        grads, metrics = jax.grad(loss_fn, has_aux=True)(state.params, consts, key, state.step)
        updates, opt_state = opt.update(grads, state.opt_state, state.params)
        metrics["grad_norm"] = optax.global_norm(grads)
        return state.replace(step=state.step + 1, params=optax.apply_updates(state.params, updates),
                             opt_state=opt_state), metrics

    consts = {"prior": parallel.shard_params(prior.params, mesh),
              "emb_views": parallel.replicate(emb_views, mesh),
              "emb_null": parallel.replicate(emb_null, mesh)}
    if emb_neg is not None:
        consts["emb_neg"] = parallel.replicate(emb_neg, mesh)
    jitted = parallel.jit_step(step_fn, mesh, [parallel.sharding_of(consts)])

    def step(state: TrainState, i: int | None = None):  # noqa: ARG001 - the loop's signature
        return jitted(state, consts)

    # AOT: `step.jitted.lower(state, step.consts)`; `step.fn` is the plain (unjitted) step,
    # for callers that transform it (benchmarks/ablation_t23d.py vmaps it over scenes).
    step.jitted, step.consts, step.fn = jitted, consts, step_fn
    return step


def render_orbit(field: MLPField, params, config, num: int, size: int, elevation: float = 15.0,
                 background: float = 1.0):
    """Deterministic lambertian views (light at the camera) on a 360-degree orbit, on a grey
    level `background`: uint8 [N, size, size, 3]."""
    return orbit_views(field, params, config, num, size, elevation, background)[0]


# Rays per chunk of an output view: the view is rendered chunk by chunk (`jax.lax.map`), so
# memory is bounded by the chunk, not the view (a 128x128 video frame of the default field is
# 2M samples; rendered whole, with normals, it took 10 GiB on CPU).
RENDER_CHUNK = 4096


@functools.lru_cache(maxsize=8)
def _view_renderer(field: MLPField, size: int, scene_radius: float, num_coarse: int,
                   num_fine: int, background: float) -> Callable:
    """The jitted `(field params, c2w, fovy) -> (rgb, acc)` of one deterministic view, built
    once per setting: grids, video and evaluation views reuse the compiled function."""
    rays = size * size
    chunk = min(RENDER_CHUNK, rays)
    pad = -rays % chunk

    def render_chunk(p, o, d, r):
        out = render_rays(field, p, None, o, d, r, scene_radius=scene_radius,
                          num_coarse=num_coarse, num_fine=num_fine, randomized=False,
                          shading_mode=1, light_position=o,
                          background=jnp.full(3, background, jnp.float32),
                          compute_normals=True)
        return out["rgb"], out["acc"]

    @jax.jit
    def one(p, c2w, fovy):
        o, d, r = (jnp.pad(a.reshape(rays, -1), ((0, pad), (0, 0))).reshape(-1, chunk,
                                                                            a.shape[-1])
                   for a in cameras.generate_rays(c2w[None], fovy[None], size, size))
        rgb, acc = jax.lax.map(lambda a: render_chunk(p, *a), (o, d, r))
        return (rgb.reshape(-1, 3)[:rays].reshape(size, size, 3),
                acc.reshape(-1)[:rays].reshape(size, size))

    return one


def orbit_views(field: MLPField, params, config, num: int, size: int, elevation: float = 15.0,
                background: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """`render_orbit`'s views (uint8 [N, size, size, 3]) and their accumulated opacity
    `acc = sum_i w_i` in [0, 1] (float [N, size, size])."""
    rc = config.render
    cams = cameras.orbit_video_cameras(num, elevation=elevation,
                                       distance=float(np.mean(config.camera.distance_range)),
                                       fovy=float(np.mean(config.camera.fovy_range)))
    one = _view_renderer(field, int(size), float(rc.scene_radius), int(rc.num_coarse),
                         int(rc.num_fine), float(background))
    # Host copy: this process renders alone (process 0 of a multi-host job writes the outputs).
    p = jax.device_get(params["field"])
    rgb, acc = zip(*[jax.device_get(one(p, cams["c2w"][i], cams["fovy"][i]))
                     for i in range(num)], strict=True)
    return io.to_uint8(np.stack(rgb), 0.0, 1.0), np.stack(acc).astype(np.float32)


BACKGROUNDS = ("random", "mlp", "grey")
EVAL_VIEWS = 8  # views on an orbit at elevation 20 degrees for the evaluator's scores
EVAL_SIZE = 32  # their size in pixels
# Empty scene: under 1% of the evaluation views' pixels at least half opaque (see `occupancy`).
OPAQUE_ACC = 0.5
EMPTY_OPAQUE_FRACTION = 0.01

# Config keys that fix the shapes of the checkpointed state: a resume must not change them.
FIXED_KEYS = ("field.",)


def init_state(config, field: MLPField, background, opt) -> TrainState:
    """Step 0: params `{field, background}` and the run's key, from `config.seed`."""
    key = jax.random.PRNGKey(config.seed)
    k_field, k_bg, k_run = jax.random.split(key, 3)
    zeros = jnp.zeros((1, 3))
    params = {"field": field.init(k_field, zeros, zeros),
              "background": background.init(k_bg, zeros)}
    return init_train_state(params, opt.init(params), k_run)


def setup(config: ml_collections.ConfigDict, prior: Prior, prompt: str,
          mesh: jax.sharding.Mesh) -> tuple[MLPField, TrainState, Callable]:
    """The field, its fresh state (replicated on `mesh`) and the jitted step toward `prompt`:
    what `train` runs, and what benchmarks/ time."""
    field = build_field(config.field)
    background = shading.BackgroundMLP()
    opt = optax.chain(optax.clip_by_global_norm(config.grad_clip), optax.adam(config.lr))
    state = parallel.replicate(init_state(config, field, background, opt), mesh)
    emb_views = view_embeddings(prior, prompt, config.view_dependent_prompt)
    guide = guidance_record(prior, config.guidance, config.steps, config)
    neg = guide.negative_prompt
    step = make_step(config, prior, guide, field, background, opt, emb_views,
                     prior.embed_text([""]), mesh,
                     emb_neg=None if neg is None else prior.embed_text([neg]))
    return field, state, step


def train(config: ml_collections.ConfigDict, workdir: str, *, prior: Prior | None = None,
          mesh: jax.sharding.Mesh | None = None) -> dict:
    """Optimizes (or resumes) the field; returns `{field, state, metrics, seconds, start_step}`.

    Raises `lmc_jax.checkpoint.Preempted` (exit status 143) after saving on SIGTERM/SIGINT.
    """
    prior = prior or build_prior(config.prior)
    prompt = validate(config, prior)
    mesh = mesh if mesh is not None else parallel.mesh_from_config(config)
    parallel.check_batch(config.batch, mesh, "batch")
    with TrainLoop(workdir, config, steps=config.steps, fixed_keys=FIXED_KEYS,
                   desc="text-to-3D", hint="lower lr or guidance.w",
                   show=lambda k: k.endswith("grad_norm") or k.startswith("L_")) as loop:
        field, state, step = setup(config, prior, prompt, mesh)

        def grid(done: int, state: TrainState) -> dict:
            if not parallel.is_main_process():
                return {}
            views = io.grid([render_orbit(field, state.params, config, 4, config.render.size)])
            io.save_png(os.path.join(workdir, f"grid_{done:06d}.png"), views, scale=2)
            return {"views": views}

        res = loop.run(loop.restore(state), step, every=[Every(config.output.grid_every, grid)])
    return {"field": field, "state": res.state, "metrics": res.metrics, "seconds": res.seconds,
            "start_step": res.start_step}


def run(config: ml_collections.ConfigDict, workdir: str) -> dict:
    """Trains (or resumes) and writes the outputs; exits with status 143 when preempted.

    An empty scene (`occupancy`) is a result, not an error: metrics.json says
    `"empty_scene": true` and the returned `warnings` (printed last by lmc_jax.main) say so.
    """
    res = train(config, workdir)
    field, state, train_seconds = res["field"], res["state"], res["seconds"]
    out = {}
    if parallel.is_main_process():
        out = write_outputs(field, state.params, config, workdir)
        views, acc = eval_views(field, state.params, config)
        out.update(occupancy(acc))
        out.update(evaluate_views(field, state.params, config, views=views))
        if config.get("clip_path", ""):  # CLIP score + R-precision of orbit views (DreamFusion)
            from lmc_jax.metrics.clip import clip_view_metrics

            size = config.output.video_size
            clip_views = orbit_views(field, state.params, config, EVAL_VIEWS, size)[0]
            out.update(clip_view_metrics(clip_views.astype(np.float32) / 127.5 - 1.0,
                                         config.prompt, config.clip_path))
        if out["empty_scene"]:
            out["warnings"] = [empty_scene_warning(out, workdir)]
        elif out["no_surface"]:
            out["warnings"] = [f"NO MESH: {out['no_surface_reason']}; no mesh.glb written."]
        elif not out.get("mesh_watertight", True):
            out["warnings"] = ["MESH NOT CLOSED: some edges of mesh.glb/.obj/.ply have one "
                               "face or more than two; a printer or a boolean may refuse it."]
    result = {k: float(v) for k, v in res["metrics"].items()}
    result.update(out, train_seconds=train_seconds, steps=config.steps,
                  seconds_per_step=train_seconds / max(config.steps - res["start_step"], 1))
    if parallel.is_main_process():
        io.write_json(os.path.join(workdir, "metrics.json"), result)
        report.write_report(workdir, result, config.to_dict())
        print(io.format_table([[k, v] for k, v in result.items()
                               if not isinstance(v, (str, list))], ["metric", "value"]))
        for w in result.get("warnings", []):
            logging.warning("%s", w)
    return result


def eval_views(field: MLPField, params, config) -> tuple[np.ndarray, np.ndarray]:
    """The `EVAL_VIEWS` orbit views (elevation 20 degrees, `EVAL_SIZE` pixels, on the
    evaluator's mid grey) and their accumulated opacity."""
    from lmc_jax.data import shapes

    return orbit_views(field, params, config, EVAL_VIEWS, EVAL_SIZE, elevation=20.0,
                       background=float(np.mean(shapes.BACKGROUND)))


def occupancy(acc: np.ndarray) -> dict:
    """Whether the views `acc` [N, H, W] (accumulated opacity `1 - prod_i (1 - alpha_i)`) show
    anything.

        opaque_fraction = mean_pixels [acc >= 1/2],   mean_opacity = mean_pixels acc
        empty_scene     = opaque_fraction < 0.01

    A pixel with `acc >= 1/2` shows more field than background. The embedded prior's training
    objects cover 8% (smallest) to 23% (mean) of their 32x32 renders, an object of any prior
    framed by the orbit cameras a few percent at least; under 1% (10 pixels of a 32x32 view)
    no object is there: the field collapsed (no density) or is faint fog only.
    """
    acc = np.asarray(acc, np.float32)
    opaque = float(np.mean(acc >= OPAQUE_ACC))
    return {"mean_opacity": float(np.mean(acc)), "opaque_fraction": opaque,
            "empty_scene": opaque < EMPTY_OPAQUE_FRACTION}


def empty_scene_warning(out: dict, workdir: str) -> str:
    """The line that tells a user the run produced nothing to look at."""
    return (f"EMPTY SCENE: {100 * out['opaque_fraction']:.2f}% of the evaluation views' pixels "
            f"are opaque (acc >= {OPAQUE_ACC}; < {100 * EMPTY_OPAQUE_FRACTION:g}% counts as "
            f"empty), mean opacity {out['mean_opacity']:.4f}: the field collapsed and "
            f"{os.path.join(workdir, 'video.mp4')} shows background only. Try another seed, a "
            "lower reg.opacity or a higher guidance.w.")


NUM_VIEWS = 6  # orbit views in views.png (two rows of three)
TOP_ELEVATION = 90.0  # view_top.png: the camera straight above the object, looking down


def write_outputs(field: MLPField, params, config, workdir: str) -> dict:
    """The 360-degree video, the views and the mesh.

    video.mp4: `output.video_frames` orbit frames of `output.video_size` pixels; views.png:
    `NUM_VIEWS` orbit views and view_top.png: one view from straight above (a torus's hole, or
    its absence, shows there), both rendered from the field at `output.view_size` pixels; the
    mesh by `export.write_field_assets` (one closed mesh without floaters as GLB and OBJ with a
    baked albedo texture, and PLY; its figures go into the metrics). `output_seconds`: the time
    all of this took.
    """
    start = time.time()
    oc = config.output
    frames = render_orbit(field, params, config, oc.video_frames, oc.video_size)
    video = export.write_video(os.path.join(workdir, "video.mp4"), frames, fps=oc.video_fps)
    views = render_orbit(field, params, config, NUM_VIEWS, oc.view_size)
    half = (NUM_VIEWS + 1) // 2
    io.save_png(os.path.join(workdir, "views.png"), io.grid([views[:half], views[half:]]))
    top = render_orbit(field, params, config, 1, oc.view_size, elevation=TOP_ELEVATION)
    io.save_png(os.path.join(workdir, "view_top.png"), top[0])
    out = {"video": str(video), **export.write_field_assets(
        workdir, field, params["field"], resolution=oc.mesh_resolution,
        bound=config.render.scene_radius, threshold=oc.mesh_threshold,
        texture_size=oc.texture_size, outlier_fraction=oc.mesh_outlier_fraction,
        smooth=oc.mesh_smooth)}
    out["output_seconds"] = time.time() - start
    return out


def evaluate_views(field: MLPField, params, config, views: np.ndarray | None = None) -> dict:
    """The shape-and-colour evaluator's scores of `EVAL_VIEWS` orbit views of the result.

    With the embedded prior and a prompt the evaluator reads ("a green torus";
    lmc_jax.metrics.shapes_eval): the fraction of views classified as the prompt
    (`eval_accuracy`), R-precision against all 25 shape-colour prompts (`eval_r_precision`),
    and the views' colourfulness over that of held-out training renders of the same prompt
    (`colourfulness_ratio`: 1 is right, > 1 over-saturated); with the patterned prior also
    the fraction of views whose pattern is the prompt's (`eval_pattern_accuracy`). Otherwise
    `{}`. `views`: those of
    `eval_views`, when already rendered.
    """
    from lmc_jax.apps.optimize import evaluator_scores, shipped_world
    from lmc_jax.data import shapes
    from lmc_jax.metrics.color import colorfulness
    from lmc_jax.metrics.shapes_eval import parse_pattern, parse_prompt

    if views is None:
        views = eval_views(field, params, config)[0]
    x = views.astype(np.float32) / 127.5 - 1.0
    scores = evaluator_scores(config.prior.name, x, config.prompt)
    if not scores:
        return {}
    shape, colour = parse_prompt(config.prompt)
    patterned = shipped_world(config.prior.name) == "embedded_patterned"  # its own renders
    k = shapes.world_class(shape, colour, parse_pattern(config.prompt) if patterned else 0)
    period = shapes.NUM_CLASSES * (len(shapes.PATTERNS) if patterned else 1)
    refs = shapes.render(0, "eval_test", np.arange(k, k + 16 * period, period),
                         patterned=patterned)
    ref_c = float(jnp.mean(colorfulness(jnp.asarray(refs.astype(np.float32) / 127.5 - 1.0))))
    views_c = float(jnp.mean(colorfulness(jnp.asarray(x))))
    return {**scores, "colourfulness": views_c, "colourfulness_ratio": views_c / ref_c}
