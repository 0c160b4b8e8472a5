"""Delta Denoising Score (DDS), the editing baseline.

`grad = W(t) (e_w(z_tgt; y_tgt) - e_w(z_src; y_src))`, with the same `eps` and `t` for the
source and the target, so the terms that do not depend on the edit cancel. Split like SDS:
`L_cond = W w [(e_c - e_u)_tgt - (e_c - e_u)_src]`, `L_proj = W [e_c,tgt - e_c,src]`.
Official settings (google/prompt-to-prompt, DDS_zeroshot.ipynb): SD 1.5, W(t) = 1, `t` uniform
in [50, 949), guidance_scale 7.5 (w = 6.5), SGD lr 0.1 on `2000 * sum(z * grad) / (H * W)`, 200
iterations; configs/edit.py's `per_method.dds` runs DDS with them.
"""

from __future__ import annotations

import jax

from lmc_jax.errors import UserError
from lmc_jax.guidance.common import (
    Conditioning,
    GuidanceOutput,
    GuidanceParams,
    denoise,
    finish,
    weight,
)
from lmc_jax.parallel import deinterleave, interleave
from lmc_jax.priors.base import Prior


def dds(prior: Prior, x: jax.Array, t: jax.Array, eps: jax.Array, cond: Conditioning,
        hp: GuidanceParams) -> GuidanceOutput:
    """DDS gradient for the target `x` against the fixed source `cond.x_src`."""
    if cond.x_src is None or cond.src is None:
        raise UserError("DDS needs a source image and a source prompt (edit app: image=PATH, "
                        "source_prompt=...)")
    both = interleave([x, jax.lax.stop_gradient(cond.x_src)])  # target and source rows
    _, (e_c, e_u) = denoise(prior, both, interleave([t, t]), interleave([eps, eps]),
                            [interleave([cond.c, cond.src]), interleave([cond.u, cond.u])])
    (c_tgt, c_src), (u_tgt, u_src) = deinterleave(e_c, 2), deinterleave(e_u, 2)
    wt = weight(prior, t, hp, x)
    return finish({"L_cond": wt * hp.w * ((c_tgt - u_tgt) - (c_src - u_src)),
                   "L_proj": wt * (c_tgt - c_src)})
