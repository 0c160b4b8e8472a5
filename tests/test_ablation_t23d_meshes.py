"""benchmarks/ablation_t23d.py's mesh figures: each scene's mesh as the app writes it."""

from __future__ import annotations

import numpy as np
from _bench import load_benchmark


def test_scene_meshes_of_the_initial_blob_and_their_scores():
    import optax

    from lmc_jax.apps import t23d
    from lmc_jax.nerf import shading

    bench = load_benchmark("ablation_t23d")
    config = bench.tiny_config(steps=1)
    config.output.mesh_resolution = 24
    field = t23d.build_field(config.field)
    opt = optax.adam(1e-3)
    params = [t23d.init_state(config.copy_and_resolve_references(), field,
                              shading.BackgroundMLP(), opt).params]
    meshes = bench.scene_meshes(field, params, config)
    # The untrained field is the linear blob: one closed ball, no floater.
    pieces_raw, pieces, watertight, euler, faces = meshes[0]
    assert (pieces_raw, pieces, watertight, euler) == (1, 1, 1, 2) and faces > 100
    table = np.asarray([[3, 1, 1, 2, 900], [1, 1, 1, 0, 800], [2, 2, 0, 3, 500], [0, 0, 0, 0, 0]])
    scores = bench.mesh_scores(table, ["a", "b", "c", "d"])
    assert scores["mesh_pieces_raw"] == 1.5 and scores["mesh_pieces"] == 1.0
    assert scores["mesh_one_closed"] == 0.5  # 'a' and 'b'; 'd' has no mesh
    assert scores["mesh_euler_2"] == 0.25 and scores["mesh_euler_0"] == 0.25
    assert scores["per_scene_mesh"]["c"] == {"pieces_raw": 2, "pieces": 2, "watertight": 0,
                                             "euler": 3, "faces": 500}


def test_prompt_benchmark_counts_one_closed_piece():
    bench = load_benchmark("t23d_prompts")
    per = {"a": {"mesh_pieces_raw": 4, "mesh_pieces": 1, "mesh_watertight": True, "mesh_euler": 2},
           "b": {"mesh_pieces_raw": 1, "mesh_pieces": 1, "mesh_watertight": True, "mesh_euler": 0},
           "c": {"mesh_pieces_raw": 2, "mesh_pieces": 2, "mesh_watertight": True, "mesh_euler": 4},
           "d": {"mesh_pieces": 0, "empty_scene": True}}
    assert bench.mesh_summary({"lmc": per}) == {
        "lmc": "2 of 4 one closed piece; Euler numbers [0, 2, 4]; pieces before removing "
               "floaters 1-4"}
