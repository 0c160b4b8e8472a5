"""DreamFusion-style NeRF building blocks: one module per topic.

- `ipe`: Mip-NeRF conical frustums -> Gaussians and the integrated positional encoding.
- `sampling`: ray/scene-sphere intersection, stratified and importance (coarse-to-fine) samples.
- `field`: the MLP field (density with DreamFusion's blob, albedo).
- `cameras`: random orbit cameras (OpenGL, z-up world), rays and radii, view prompt suffixes.
- `volume`: the volume-rendering equation (weights, composites).
- `renderer`: `render_rays`, the pieces above wired into a coarse-to-fine render of a field.
- `shading`: density-gradient normals, albedo/lambertian/textureless shading, backgrounds.
- `regularizers`: orientation and opacity losses.
- `surface`: density grid, iso level ('auto': the opaque rays'), closed marching-cubes mesh.
- `cleanup`: mesh pieces, floater removal, topology figures (watertight, Euler number).
- `texture`: xatlas UV atlas and the baked albedo texture.
- `mesh_io`: GLB, OBJ + MTL + PNG and PLY writers.
- `video`: MP4 (GIF fallback) writer.
- `export`: the entry that runs them: one closed, cleaned mesh in every format.
"""

from lmc_jax.nerf.cameras import (
    VIEW_SUFFIXES,
    generate_rays,
    look_at,
    orbit_camera_to_world,
    orbit_video_cameras,
    prompt_with_view,
    sample_orbit_cameras,
    spherical_to_position,
    view_index,
    view_suffix,
    wrap_azimuth,
)
from lmc_jax.nerf.export import (
    density_grid,
    evaluate_in_chunks,
    extract_mesh,
    field_albedo_fn,
    field_density_fn,
    grid_points,
    marching_cubes,
    to_uint8,
    write_obj,
    write_ply,
    write_video,
)
from lmc_jax.nerf.field import MLPField, density_blob
from lmc_jax.nerf.ipe import (
    conical_frustum_to_gaussian,
    frustum_moments,
    integrated_pos_enc,
    lift_gaussian,
    pos_enc,
)
from lmc_jax.nerf.regularizers import opacity_entropy_loss, opacity_loss, orientation_loss
from lmc_jax.nerf.renderer import render_rays
from lmc_jax.nerf.sampling import (
    blur_weights,
    intersect_sphere,
    resample_along_rays,
    sample_pdf,
    sample_stratified,
)
from lmc_jax.nerf.shading import (
    SHADING_MODES,
    BackgroundMLP,
    field_with_normals,
    lambertian,
    normals_from_density_gradient,
    point_light_directions,
    random_solid_background,
    sample_light_position,
    sample_shading_mode,
    shade,
    value_and_position_gradient,
)
from lmc_jax.nerf.volume import composite, compute_alpha_weights, volume_render

__all__ = [
    "VIEW_SUFFIXES",
    "SHADING_MODES",
    "BackgroundMLP",
    "MLPField",
    "blur_weights",
    "composite",
    "compute_alpha_weights",
    "conical_frustum_to_gaussian",
    "density_blob",
    "density_grid",
    "evaluate_in_chunks",
    "extract_mesh",
    "field_albedo_fn",
    "field_density_fn",
    "field_with_normals",
    "frustum_moments",
    "generate_rays",
    "grid_points",
    "integrated_pos_enc",
    "intersect_sphere",
    "lambertian",
    "lift_gaussian",
    "look_at",
    "marching_cubes",
    "normals_from_density_gradient",
    "opacity_entropy_loss",
    "opacity_loss",
    "orbit_camera_to_world",
    "orbit_video_cameras",
    "orientation_loss",
    "point_light_directions",
    "pos_enc",
    "prompt_with_view",
    "random_solid_background",
    "render_rays",
    "resample_along_rays",
    "sample_light_position",
    "sample_orbit_cameras",
    "sample_pdf",
    "sample_shading_mode",
    "sample_stratified",
    "shade",
    "spherical_to_position",
    "to_uint8",
    "value_and_position_gradient",
    "view_index",
    "view_suffix",
    "volume_render",
    "wrap_azimuth",
    "write_obj",
    "write_ply",
    "write_video",
]
