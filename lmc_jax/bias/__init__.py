"""The learned deficiency model `b_psi(x, t) ~ E_eps[x_hat]` of LMC-SDS.

See docs/design.md section 1.3 (the method) and 1.4 (why `b_psi` must stay shallow).
"""

from lmc_jax.bias.model import (
    BiasNet,
    bias_fn_from,
    param_count,
    receptive_field,
    timestep_embedding,
)

__all__ = ["BiasNet", "bias_fn_from", "param_count", "receptive_field", "timestep_embedding"]
