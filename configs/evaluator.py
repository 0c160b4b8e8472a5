"""Train the shape-and-colour evaluator used to score the embedded prior's images and views.

    python -m lmc_jax.main --config=configs/evaluator.py --workdir=runs/evaluator

Renders the 'eval_train' / 'eval_test' splits of `lmc_jax.data.shapes` (cached under
data.cache_dir, default WORKDIR/data), trains `lmc_jax.metrics.shapes_eval.ShapeColourNet` and
writes it to WORKDIR/evaluator (params.msgpack + evaluator.json) with its held-out shape, colour
and joint accuracy in metrics.json. Ship it by copying WORKDIR/evaluator to
lmc_jax/assets/embedded_prior/evaluator.

The object head (`model.object_head`, on by default): the training set adds `data.degraded`
blurred and fogged copies of renders (still objects) and `data.no_object_train` scenes without
an object (`lmc_jax.data.shapes.render_no_object`: bare background, fog, soft bands, glows), so
that an empty or foggy text-to-3D scene is read as "no object" and cannot score as its prompt.

Presets:
- default: 6000 training renders + 3000 degraded copies + 3000 no-object scenes, 1000 test
  renders and 1000 held-out no-object scenes, 1500 steps of batch 128 (70k-parameter CNN).
  Measured on 2 CPU cores shared with four other jobs (load average ~13): ~6 min rendering
  (once; cached), 32 min training (1.2 s/step; ~5 steps/s on idle cores). Held out: shape,
  colour and joint accuracy 1.0 on 1000 renders; object recall 1.0 on them and on their
  degraded copies; no-object recall on 1000 scenes 0.993 at the threshold the metrics use
  (p(object) < 0.1; background and fog 1.0, band 0.976, glow 0.996), 0.998 at 1/2.
- `:patterned`: the patterned world's evaluator (`data.patterned`, `model.pattern_head`: it also
  names the pattern, plain / striped / checkered / dotted), shipped in
  lmc_jax/assets/patterned_prior/evaluator; 8000 training renders (80 per shape-colour-pattern
  class), 2000 steps. Measured on 2 CPU cores shared with other jobs: 185 s rendering, 287 s
  training. Held out (1000 renders): shape 0.994, colour 1.0, pattern 0.932 (plain 0.896,
  striped 0.98, checkered 0.98, dotted 0.872: small dots on a far object read as plain);
  no-object recall 0.995.
- `:quick`: 200 + 50 renders at 16x16 (resized to 32x32), 20 steps: plumbing only,
  ~25 s on 2 idle CPU cores, ~40 s on busy ones (mostly compiling the renderer and the step).
"""

import ml_collections

from lmc_jax.config import parse_preset


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    preset = parse_preset(arg, ["quick", "patterned"], "evaluator")
    config = ml_collections.ConfigDict()
    config.app = "evaluator"
    config.seed = 0
    config.data = ml_collections.ConfigDict({
        "train_size": 6000,  # 'eval_train' renders
        "test_size": 1000,  # held-out 'eval_test' renders
        "resolution": 32,
        "seed": 0,  # the dataset's seed (lmc_jax.data.shapes)
        "cache_dir": "",  # where the rendered dataset goes (default WORKDIR/data)
        # The object head's material (lmc_jax.data.shapes.render_no_object / degrade):
        "degraded": 3000,  # blurred + fogged copies of the first 'eval_train' renders (objects)
        "no_object_train": 3000,  # scenes without an object
        "no_object_test": 1000,  # held-out ones ('eval_test' split)
        "patterned": False,  # the patterned world's renders (lmc_jax.data.shapes)
    })
    # object_head: p(object | x), so an empty or foggy scene cannot score as its prompt.
    config.model = ml_collections.ConfigDict({"features": (32, 32, 64, 64), "hidden": 64,
                                              "object_head": True, "pattern_head": False})
    config.train = ml_collections.ConfigDict({"steps": 1500, "batch": 128, "lr": 3e-3})
    if preset == "patterned":
        config.data.patterned = True
        config.data.train_size = 8000
        config.model.pattern_head = True
        config.train.steps = 2000
    if preset == "quick":
        config.data.train_size = 200
        config.data.test_size = 50
        config.data.resolution = 16
        config.data.degraded = 50
        config.data.no_object_train = 100
        config.data.no_object_test = 40
        config.train.steps = 20
        config.train.batch = 32
    return config
