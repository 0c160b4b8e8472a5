"""The learned deficiency model `b_psi(x, t) ~ E_eps[x_hat]` of LMC-SDS (DESIGN.md section 1)."""

from lmc_jax.bias.model import (
    BiasNet,
    bias_fn_from,
    param_count,
    receptive_field,
    timestep_embedding,
)

__all__ = ["BiasNet", "bias_fn_from", "param_count", "receptive_field", "timestep_embedding"]
