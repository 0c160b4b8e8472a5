"""lmc_jax: Score Distillation Sampling with Learned Manifold Corrective, in JAX/Flax.

Data flows one way: config -> prior -> guidance loss -> application step -> optax ->
checkpoint. See README.md for the commands, docs/design.md for the method and the shape of
the code, and the docstrings of `lmc_jax.guidance` for the equations next to their code.
"""

from lmc_jax import _runtime

_runtime.configure()

__version__ = "0.1.0"
