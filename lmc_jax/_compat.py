"""The one place where diffusers 0.39 is patched to run on jax >= 0.10.

Known breakages (docs/design.md section 3):
- `jax.tree_map` was removed; diffusers' `FlaxModelMixin.to_bf16/to_fp16/to_fp32` call it.
- `FlaxDDPMScheduler.step` calls `jnp.clip(a_min=...)`; we never call `step` (guidance only
  needs `alphas_cumprod`), so it is left alone.
- diffusers logs a Flax deprecation warning dozens of times per model init: silenced here.

Import this module before touching diffusers: `from lmc_jax import _compat` then
`_compat.diffusers()` returns the patched module.
"""

from __future__ import annotations

import functools
import warnings

import jax


@functools.cache
def diffusers():
    """Returns the `diffusers` module with the jax >= 0.10 shims applied (once)."""
    if not hasattr(jax, "tree_map"):
        jax.tree_map = jax.tree_util.tree_map  # removed in jax 0.6; diffusers still calls it
    warnings.filterwarnings("ignore", message=".*Flax classes are deprecated.*")
    warnings.filterwarnings("ignore", message=".*TensorFlow and JAX classes are deprecated.*")
    import diffusers as _diffusers

    _diffusers.utils.logging.set_verbosity_error()
    return _diffusers


@functools.cache
def transformers():
    """Returns `transformers` with its logging quietened (Flax deprecation notices)."""
    warnings.filterwarnings("ignore", message=".*TensorFlow and JAX classes are deprecated.*")
    import transformers as _transformers

    _transformers.utils.logging.set_verbosity_error()
    return _transformers
