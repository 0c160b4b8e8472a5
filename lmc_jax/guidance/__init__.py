"""Guidance losses with one signature: `fn(prior, x, t, eps, cond, hp) -> GuidanceOutput`.

| name  | module                  | gradient w.r.t. x                                   |
|-------|-------------------------|-----------------------------------------------------|
| sds   | lmc_jax.guidance.sds    | L_cond + L_proj = W w (e_c - e_u) + W (e_c - eps)    |
| lmc   | lmc_jax.guidance.lmc    | L_cond + grad L_lmc (learned manifold corrective)   |
| dds   | lmc_jax.guidance.dds    | W (e_w(x; y_tgt) - e_w(x_src; y_src))               |
| nfsd  | lmc_jax.guidance.sds    | W (delta_D + w (e_c - e_u))                          |
| csd   | lmc_jax.guidance.sds    | L_cond alone                                         |

`Guidance` (lmc_jax.guidance.record) is the record an app step reads: the method, its
`GuidanceParams` and the per-step `(t, eps)` draw, built once by
`lmc_jax.guidance.from_config.guidance_record`.
"""

from lmc_jax.guidance.common import (
    Conditioning,
    GuidanceOutput,
    GuidanceParams,
    sample_noise,
    surrogate_loss,
)
from lmc_jax.guidance.dds import dds
from lmc_jax.guidance.lmc import lmc_loss, lmc_sds
from lmc_jax.guidance.record import Guidance, NoiseSpec
from lmc_jax.guidance.sds import csd, nfsd, sds

METHODS = {"sds": sds, "lmc": lmc_sds, "dds": dds, "nfsd": nfsd, "csd": csd}

__all__ = [
    "METHODS", "Conditioning", "Guidance", "GuidanceOutput", "GuidanceParams", "NoiseSpec", "csd",
    "dds", "lmc_loss", "lmc_sds", "nfsd", "sample_noise", "sds", "surrogate_loss",
]
