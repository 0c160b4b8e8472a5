"""LMC-SDS against SDS inside each application's own jitted step, on the tiny SD prior.

benchmarks/step_time.py times the bare guidance step (and compares it with PyTorch); this
script times the steps the applications actually run, built by their own code, with the tiny
SD-architecture prior (64x64 images, 4x32x32 latents) and a `BiasNet` of the shipped size
(random weights: the cost does not depend on them):

- synth (and edit, the same step): `lmc_jax.apps.optimize.make_x_step`, guidance + Adam on the
  latents of B images;
- i2i: `lmc_jax.apps.i2i.make_step`, the translator network f_theta on B latents, guidance on
  its outputs, backward through f_theta, Adam;
- t23d: `lmc_jax.apps.t23d.make_step` with configs/t23d.py:tiny's renderer and field (32x32
  renders, 24+24 samples per ray) on B views, resized to 64x64 and VAE-encoded.

For each app and batch size the SDS and LMC-SDS steps are called alternately (after warm-up)
and the table gives medians and the LMC/SDS ratio (target <= 1.05, issue 7).

    python benchmarks/app_steps.py [--apps synth i2i t23d] [--batches 1 4] [--repeats 15]
                                   [--json out.json]
"""

from __future__ import annotations

import sys

if __name__ == "__main__":
    from lmc_jax import _runtime

    _runtime.maybe_reexec_with_fast_malloc(sys.argv)

import argparse
import os
import statistics
import tempfile
from collections.abc import Callable

import _timing  # benchmarks/_timing.py (this script's folder is on sys.path)
import jax
import jax.numpy as jnp
import optax

from lmc_jax import io, parallel
from lmc_jax.config import guidance_config, load_config
from lmc_jax.guidance import Conditioning
from lmc_jax.guidance.from_config import guidance_record

CONFIGS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "configs")
APPS = ("synth", "i2i", "t23d")
PROMPT = "a photo of a cat"


def _guidance(method: str, bias_dir: str):
    return guidance_config(method, w=7.5, bias="learned", bias_path=bias_dir)


def synth_step(prior, method: str, batch: int, bias_dir: str) -> Callable[[], object]:
    from lmc_jax.apps.optimize import make_x_step

    guide = guidance_record(prior, _guidance(method, bias_dir), 1000)
    cond = Conditioning(c=prior.embed_text([PROMPT] * batch), u=prior.embed_text([""] * batch))
    x = prior.encode(0.5 * jax.random.normal(jax.random.PRNGKey(1),
                                             (batch, *prior.image_shape)))
    opt = optax.adam(1e-2)
    step = make_x_step(prior, cond, guide, optimizer=opt, key=jax.random.PRNGKey(2))
    carry = [x, opt.init(x)]  # the step donates x and opt_state: thread them through

    def call():
        out = step(*carry, jnp.asarray(7), prior.params)
        carry[:] = out[:2]
        return out
    return call


def i2i_step(prior, method: str, batch: int, bias_dir: str) -> Callable[[], object]:
    from lmc_jax.apps import i2i

    config = load_config(os.path.join(CONFIGS, "i2i.py"))
    config.guidance = _guidance(method, bias_dir)
    config.batch = batch
    mesh = parallel.mesh_from_config(config)
    guide = guidance_record(prior, config.guidance, config.steps)
    net = i2i.Translator(config.net.features, config.net.blocks)
    opt = optax.adam(config.lr)
    state = parallel.replicate(i2i.init_state(net, opt, prior.x_shape, config.seed), mesh)
    step = i2i.make_step(net, prior, guide, opt, config.identity_weight, mesh)
    x = jax.random.normal(jax.random.PRNGKey(1), (batch, *prior.x_shape))
    cond = parallel.shard_batch(i2i.conditioning(prior, PROMPT, batch), mesh)
    return _threaded(state, lambda s: step(s, x, cond))


def t23d_step(prior, method: str, batch: int, bias_dir: str) -> Callable[[], object]:
    from lmc_jax.apps import t23d

    config = load_config(os.path.join(CONFIGS, "t23d.py"))
    tiny = load_config(os.path.join(CONFIGS, "t23d.py"), "tiny")
    config.render, config.field = tiny.render, tiny.field
    config.guidance = _guidance(method, bias_dir)
    config.batch = batch
    _, state, step = t23d.setup(config, prior, PROMPT, parallel.mesh_from_config(config))
    return _threaded(state, step)


def _threaded(state, step: Callable) -> Callable[[], object]:
    """A call of `step(state) -> (state, metrics)` that feeds each call the state the previous
    one returned (the train steps donate their state: a consumed state cannot be reused)."""
    carry = [state]

    def call():
        out = step(carry[0])
        carry[0] = out[0]
        return out
    return call


BUILDERS = {"synth": synth_step, "i2i": i2i_step, "t23d": t23d_step}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--apps", nargs="+", choices=APPS, default=list(APPS))
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--repeats", type=int, default=15, help="timed calls per step")
    parser.add_argument("--warmup", type=int, default=3, help="untimed calls (incl. compile)")
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)

    from lmc_jax.priors.sd import tiny_sd_prior

    prior = tiny_sd_prior(image_size=64)
    load_before = _timing.load_average()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        bias_dir = _timing.save_random_bias(prior, os.path.join(tmp, "bias"))
        for app in args.apps:
            for batch in args.batches:
                fns = {m: (BUILDERS[app](prior, m, batch, bias_dir), _timing.block_jax)
                       for m in ("sds", "lmc")}
                samples = _timing.alternate(fns, args.repeats, args.warmup)
                sds, lmc = (statistics.median(samples[m]) for m in ("sds", "lmc"))
                rows.append({"app": app, "batch": batch, "sds_ms": sds, "lmc_ms": lmc,
                             "lmc_over_sds": lmc / sds,
                             "sds_ms_minmax": [min(samples["sds"]), max(samples["sds"])],
                             "lmc_ms_minmax": [min(samples["lmc"]), max(samples["lmc"])]})
                print(f"  {app} B={batch}: SDS {sds:.1f} ms, LMC-SDS {lmc:.1f} ms", flush=True)

    print(f"\ndevice: {jax.devices()[0].platform}: {_timing.device_string()}; jax "
          f"{jax.__version__}; CPU malloc settings: {_timing.malloc_status()}")
    print(f"prior {prior.name}, latents {'x'.join(map(str, prior.x_shape))}; medians of "
          f"{args.repeats} alternating calls; load average before/after: {load_before} / "
          f"{_timing.load_average()}\n")
    print(f"{'app':>6} | {'B':>2} | {'SDS ms':>8} | {'LMC-SDS ms':>10} | {'LMC/SDS':>7}")
    print("-" * 46)
    for r in rows:
        print(f"{r['app']:>6} | {r['batch']:>2} | {r['sds_ms']:>8.1f} | {r['lmc_ms']:>10.1f} | "
              f"{r['lmc_over_sds']:>7.3f}")
    if args.json:
        print(f"\nwrote {io.write_json(args.json, {'prior': prior.name, 'rows': rows})}")


if __name__ == "__main__":
    main()
