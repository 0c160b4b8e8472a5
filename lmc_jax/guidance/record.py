"""The guidance record: everything a guidance step needs, built once from the config.

`Guidance` bundles the method, its hyper-parameters (`GuidanceParams`: w, weighting, b_psi or
the exact deficiency, NFSD's threshold, LMC's x_hat choice), how each step draws `(t, eps)`
(`NoiseSpec`: t range, annealing, fixed noise) and NFSD's negative prompt. It is an immutable
pytree without leaves (every field is static), so a jitted step closes over it (or takes it as
an argument) and never reads a ConfigDict. `lmc_jax.guidance.from_config.guidance_record`
builds it from a config's `guidance` section; tests and testbeds build it directly.

    guide = guidance_record(prior, config.guidance, total_steps=config.steps)
    t, eps = guide.draw(key, step, batch, prior.x_shape)
    out = guide(prior, x, t, eps, cond)          # GuidanceOutput: grad, parts, scalars
"""

from __future__ import annotations

import jax
from flax import struct

from lmc_jax.guidance.common import Conditioning, GuidanceOutput, GuidanceParams, sample_noise
from lmc_jax.priors.base import Prior


@struct.dataclass
class NoiseSpec:
    """How optimisation step `i` draws its timesteps and noise (`sample_noise`).

    t_min, t_max: the timestep range [t_min, t_max). t_max_final, anneal: the range's upper end
    moves from `t_max` to `t_max_final` over `total_steps` ('none', 'linear', 'sqrt').
    fixed_noise: one `eps` and one stratified timestep offset per run (the paper's option).
    """

    t_min: int = struct.field(pytree_node=False, default=20)
    t_max: int = struct.field(pytree_node=False, default=980)
    t_max_final: int | None = struct.field(pytree_node=False, default=None)
    anneal: str = struct.field(pytree_node=False, default="none")
    fixed_noise: bool = struct.field(pytree_node=False, default=False)
    total_steps: int = struct.field(pytree_node=False, default=1)

    def draw(self, key: jax.Array, step: jax.Array, batch: int, x_shape: tuple[int, ...]
             ) -> tuple[jax.Array, jax.Array]:
        """`(t [B] int32, eps [B, *x_shape])` for step `step` of the run keyed by `key`."""
        return sample_noise(key, step, batch, x_shape, fixed_noise=self.fixed_noise,
                            t_min=self.t_min, t_max=self.t_max, t_max_final=self.t_max_final,
                            anneal=self.anneal, total_steps=self.total_steps)


@struct.dataclass
class Guidance:
    """method: a key of `lmc_jax.guidance.METHODS`. params: its `GuidanceParams`. noise: the
    per-step `(t, eps)` draw. negative_prompt: NFSD's (None for the other methods)."""

    method: str = struct.field(pytree_node=False, default="sds")
    params: GuidanceParams = struct.field(pytree_node=False, default_factory=GuidanceParams)
    noise: NoiseSpec = struct.field(pytree_node=False, default_factory=NoiseSpec)
    negative_prompt: str | None = struct.field(pytree_node=False, default=None)

    @property
    def fn(self):
        """The method's function `fn(prior, x, t, eps, cond, hp) -> GuidanceOutput`."""
        from lmc_jax.guidance import METHODS

        return METHODS[self.method]

    def __call__(self, prior: Prior, x: jax.Array, t: jax.Array, eps: jax.Array,
                 cond: Conditioning) -> GuidanceOutput:
        """The guidance gradient w.r.t. `x` (and its named parts) at `(t, eps)`."""
        return self.fn(prior, x, t, eps, cond, self.params)

    def draw(self, key: jax.Array, step: jax.Array, batch: int, x_shape: tuple[int, ...]
             ) -> tuple[jax.Array, jax.Array]:
        """`self.noise.draw`: the timesteps and noise of optimisation step `step`."""
        return self.noise.draw(key, step, batch, x_shape)
