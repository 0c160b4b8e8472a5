"""Text-to-3D: a Mip-NeRF-style field optimized with LMC-SDS (or any baseline).

    python -m lmc_jax.main --config=configs/t23d.py --workdir=runs/fox \
        --config.prior.path=/path/to/stable-diffusion-2-1-base \
        --config.prompt="a DSLR photo of a fox"

Default preset: Stable Diffusion 2.1-base from `prior.path` (a local diffusers folder or hub
id), LMC-SDS at w = 7.5 with the automatic b_psi (trained on the prior's own samples on the
first run and cached; `guidance.bias_path` names one trained by configs/bias.py instead), 10k
steps, one view per step on any number of devices (`parallel.model_axis='auto'`; plan a TPU
slice first with `python -m lmc_jax.plan --config=configs/t23d.py --topology=v5e:2x2`), 64x64
renders upsampled to 512 and VAE-encoded (as threestudio does). Cost of a step, counted by XLA
(`python benchmarks/t23d_step.py --compile-only`, bf16): 3.9 TFLOP, of which 1.6 for the UNet on
the cond+uncond batch of 64x64x4 latents, 2.3 for the VAE encoder's forward and backward at
512x512 and 0.06 for rendering and the field. Its time on a GPU/TPU has not been measured yet (no
accelerator has been available to this project): at 30-40% of an H100's bf16 peak the matrix
work alone is 10-13 ms per step, and the renderer's small ops add to it;
`benchmarks/t23d_step.py` measures it.

Presets that need no weights (offline, 2 CPU cores):
- `:tiny` the embedded prior (a 32x32 text-to-image model of coloured shapes shipped with
  lmc_jax; prompts like "a green torus", "a box, red") with LMC-SDS and its shipped b_psi:
  a coloured shape in a few minutes; metrics.json holds the shape-and-colour evaluator's
  accuracy and R-precision over views of the result.
- `:mixture` the exact Gaussian-mixture prior (prompts red/green/blue/yellow): the object takes
  the prompted colour.

Outputs in the workdir: config.json, checkpoints/, tensorboard/, metrics.jsonl,
metrics.json, grid_<step>.png (fixed views during training), video.mp4 (or .gif), views.png,
view_top.png, mesh.glb (baked albedo texture), mesh.obj + mesh.mtl + mesh_albedo.png, mesh.ply
(one closed mesh in all three, lmc_jax.nerf.export), report.html (everything on one page,
offline). output.mesh_threshold: 'auto' (the density level whose silhouette covers the rays at
least half opaque; lmc_jax.nerf.surface.opaque_threshold) or a density.
"""

import ml_collections

from lmc_jax.config import EMBEDDED_NEGATIVE_PROMPT, guidance_config, parse_preset, prior_config


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    preset = parse_preset(arg, ["tiny", "mixture"], "t23d")
    c = ml_collections.ConfigDict()
    c.app = "t23d"
    c.seed = 0
    c.prompt = "a DSLR photo of a red fox, highly detailed"
    c.view_dependent_prompt = True
    c.prior = prior_config("sd", path="", resolution=512)
    c.guidance = guidance_config("lmc", w=7.5, bias="learned", t_min=20, t_max=980,
                                 t_anneal="linear", t_max_final=500)
    c.steps = 10000
    c.batch = 1  # views per step
    c.lr = 1e-3
    c.grad_clip = 1.0
    c.render = ml_collections.ConfigDict({
        "size": 64,  # renders are size x size, then resized to the prior's input
        "num_coarse": 64, "num_fine": 64, "scene_radius": 1.0,
    })
    c.camera = ml_collections.ConfigDict({
        "elevation_range": (-10.0, 80.0), "azimuth_range": (-180.0, 180.0),
        "distance_range": (1.5, 2.0), "fovy_range": (40.0, 70.0),
    })
    c.shading = ml_collections.ConfigDict({
        "probs": (0.2, 0.4, 0.4),  # albedo, lambertian, textureless
        "ambient": 0.1, "diffuse": 0.9, "background": "random",  # random | mlp | grey
        "grey_range": (0.55, 0.85),  # background='grey': uniform grey level per view
    })
    # The initial density blob (lmc_jax.nerf.field): Magic3D's linear one, threestudio's default
    # with these values and softplus. DreamFusion's Gaussian ('gaussian') leaves the scene
    # outside the ball at softplus(~0) = 0.69, a fog over 90% of a :tiny view; removing it
    # (reg.opacity) emptied the whole scene for 'a yellow ring' (LMC-SDS and CSD) and 'a yellow
    # torus' (LMC-SDS) at seed 0, an empty scene from which softplus' vanishing slope never lets
    # the guidance recover. The linear blob starts with the ball alone (16% of a :tiny view).
    c.field = ml_collections.ConfigDict({
        "width": 64, "depth": 4, "max_deg": 8, "blob_density": 10.0, "blob_radius": 0.5,
        "blob_shape": "linear",  # linear | gaussian
    })
    c.reg = ml_collections.ConfigDict({"orientation": 1e-2, "opacity": 1e-3})
    # view_size: views.png (6 orbit views) and view_top.png (looking down), rendered from the
    # field. mesh_outlier_fraction: mesh pieces with fewer faces than this fraction of all are
    # removed (threestudio's isosurface_outlier_n_faces_threshold; 0 keeps every piece).
    # mesh_smooth: Gaussian blur of the density grid before meshing, in voxels: 1 closes the
    # voxel-wide tunnels of a noisy field (each a handle of the mesh); 0 meshes it as it is.
    c.output = ml_collections.ConfigDict({
        "video_frames": 60, "video_size": 256, "video_fps": 24, "view_size": 256,
        "mesh_resolution": 128, "mesh_threshold": "auto", "mesh_outlier_fraction": 0.01,
        "mesh_smooth": 0.0, "texture_size": 1024, "grid_every": 1000,
    })
    c.clip_path = ""  # a CLIP folder or hub id: CLIP score + R-precision of orbit views
    c.log_every = 50
    c.checkpoint_every = 1000
    c.keep_checkpoints = 2
    c.parallel = ml_collections.ConfigDict({"model_axis": "auto"})  # or a number (parallel.py)
    if preset in ("tiny", "mixture"):
        c.steps = 300
        c.render.size = 32
        c.render.num_coarse = 24
        c.render.num_fine = 24
        c.field.width = 32
        c.field.depth = 2
        c.field.max_deg = 6
        c.lr = 5e-3
        c.output.video_frames = 24
        # Output views cost render time on 2 CPU cores (the demo's field, back to back on a
        # shared 2-core host: 24 video frames took 39 s at 64 px and 110 s at 128 px, six
        # views 110 s at 256 px), so :tiny keeps its video at 64 px and renders its views at
        # 128 px.
        c.output.video_size = 64
        c.output.view_size = 128
        c.output.mesh_resolution = 48
        c.output.texture_size = 512
        c.output.grid_every = 100
        c.log_every = 25
        c.checkpoint_every = 100
    if preset == "tiny":
        # The embedded prior (lmc_jax.priors.embedded): 32x32 renders of coloured shapes, so
        # the camera and background follow its training renders (lmc_jax.data.shapes).
        c.prompt = "a green torus"
        c.view_dependent_prompt = False
        c.prior = prior_config("embedded", resolution=32)
        c.guidance = guidance_config("lmc", w=7.5, bias="learned", bias_path="embedded",
                                     t_min=20, t_max=980,
                                     negative_prompt=EMBEDDED_NEGATIVE_PROMPT)
        c.shading.background = "grey"
        c.camera.elevation_range = (0.0, 50.0)
        c.camera.distance_range = (2.0, 2.6)
        c.camera.fovy_range = (45.0, 45.0)
        # Sparsity strong enough to matter next to the guidance gradient (which sums over the
        # 32x32 pixels while L_opacity is a mean): at 1e-3 the field filled the scene with
        # background-grey fog for some prompts ("a yellow cone": R-precision 0); 30 removes it,
        # 300 empties the scene (measured on the cone, sphere, cylinder and torus).
        c.reg.opacity = 30.0
    if preset == "mixture":
        c.prompt = "green"
        c.view_dependent_prompt = False
        c.prior = prior_config("gaussian_mixture", resolution=32)
        c.guidance = guidance_config("lmc", w=7.5, bias="exact", t_min=20, t_max=980)
    return c
