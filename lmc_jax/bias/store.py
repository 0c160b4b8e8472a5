"""Saving and loading a trained `b_psi` with its config and the prior it was trained for.

A bias folder holds `params.msgpack` (Flax serialization, no pickle) and `bias.json`:
`{"module": {BiasNet fields}, "prior": {"name", "kind", "x_shape"}, "training": {...}}`.
Applications load it with `load_bias(path, prior)`, which refuses a `b_psi` made for another
resolution, channel count or space (latent vs pixel).
"""

from __future__ import annotations

import json
import os
from typing import Any

import jax
import jax.numpy as jnp
from flax import serialization

from lmc_jax.bias.model import BiasNet, bias_fn_from
from lmc_jax.errors import UserError
from lmc_jax.priors.base import Prior

MODULE_FIELDS = ("features", "normalize", "center", "padding", "conditional")


def prior_signature(prior: Prior) -> dict:
    return {"name": prior.name, "kind": prior.kind, "x_shape": list(prior.x_shape)}


def save_bias(path: str, module: BiasNet, params: Any, prior: Prior,
              training: dict | None = None) -> str:
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, "params.msgpack"), "wb") as f:
        f.write(serialization.to_bytes(params))
    meta = {"module": {k: getattr(module, k) for k in MODULE_FIELDS},
            "prior": prior_signature(prior), "training": training or {}}
    with open(os.path.join(path, "bias.json"), "w") as f:
        json.dump(meta, f, indent=2, default=float)
    return path


def load_bias(path: str, prior: Prior):
    """Returns `(module, params, bias_fn)` for the `b_psi` in folder `path`."""
    meta_path = os.path.join(path, "bias.json")
    if not os.path.exists(meta_path):
        raise UserError(f"no trained b_psi at {path!r} (expected bias.json and params.msgpack); "
                        "train one with python -m lmc_jax.main --config=configs/bias.py")
    with open(meta_path) as f:
        meta = json.load(f)
    want, have = prior_signature(prior), meta["prior"]
    problems = []
    if have["kind"] != want["kind"]:
        problems.append(f"it works on {have['kind']} inputs, the prior on {want['kind']}")
    if list(have["x_shape"][:2]) != want["x_shape"][:2]:
        problems.append(f"resolution {have['x_shape'][:2]} vs the prior's {want['x_shape'][:2]}")
    if have["x_shape"][2] != want["x_shape"][2]:
        problems.append(f"{have['x_shape'][2]} channels vs the prior's {want['x_shape'][2]}")
    if problems:
        raise UserError(f"b_psi at {path!r} was trained for prior {have['name']!r} and does not "
                        f"match prior {want['name']!r}: {'; '.join(problems)}; train one for this "
                        "prior with configs/bias.py")
    module = BiasNet(**{k: v for k, v in meta["module"].items() if k in MODULE_FIELDS})
    x = jnp.zeros((1, *prior.x_shape))
    template = module.init(jax.random.PRNGKey(0), x, jnp.zeros((1,), jnp.int32),
                           prior.embed_text([""]))["params"]
    with open(os.path.join(path, "params.msgpack"), "rb") as f:
        params = serialization.from_bytes(template, f.read())
    return module, params, bias_fn_from(module, params)
