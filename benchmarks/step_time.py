"""Step time of SDS and LMC-SDS on the tiny SD-architecture UNet: JAX (jitted) vs PyTorch eager.

One guidance step on 4x32x32 latents (HxWxC 32x32x4) at batch B is
  - SDS:  one UNet call on the cond+uncond batch (2B latents), `grad = W (e_w - eps)`;
  - LMC-SDS: the same UNet call, plus `b_psi(x, t)` forward and VJP (`BiasNet`, ~75k weights),
    `grad = W w (e_c - e_u) + W (a/s) J_b^T (b - x_hat)`;
followed by the update `x <- x - lr * grad`.

- JAX: `lmc_jax.guidance.sds` / `lmc_sds` and the update inside one `jax.jit`; the prior and the
  `b_psi` weights are arguments of the jitted step (not compiled-in constants). Twice: with
  lmc_jax's default attention (`lmc_jax.priors.attention`, row 'jax') and with diffusers' own
  `FlaxAttention` (row 'jax-dattn'), to show what the late-normalized attention buys.
- PyTorch eager: diffusers' torch `UNet2DConditionModel` holding the SAME weights, converted from
  the Flax parameters with diffusers' own converter
  (`diffusers.models.modeling_pytorch_flax_utils.load_flax_weights_in_pytorch_model`, the
  in-memory half of `load_flax_checkpoint_in_pytorch_model`), the same text embeddings, and a
  line-by-line port of `BiasNet` with the same weights; `torch.set_num_threads(2)`
  (benchmarks/torch_reference.py).
  Before timing, every process checks that the torch UNet's eps and both steps' gradients match
  JAX (about 1e-4 relative: Flax's GEGLU uses tanh-GELU, docs/design.md section 5).

Protocol: `--processes` fresh worker processes run one after the other; each warms up, then
times the four steps (JAX SDS, torch SDS, JAX LMC, torch LMC) alternately, in a random order
per round, `--repeats` rounds per batch size. The table reports the median over processes of
each process's median, with the range of the per-process medians; ratios are paired within each
process (torch/JAX, LMC/SDS), then the median over processes is taken.

Peak memory per step: `jax.devices()[0].memory_stats()` is None on CPU, so one more process
measures the peak resident-set increase during one step (VmHWM after resetting it through
/proc/self/clear_refs, minus VmRSS before the step), for both frameworks, with glibc set to
return every freed block of 64 KiB or more to the OS (`MALLOC_MMAP_THRESHOLD_=65536`) so that
RSS follows live memory (under the fast-malloc settings freed memory is kept and reused, and the
increase in a warm process is ~0). For JAX it also records XLA's compiled memory analysis
(temporaries + outputs of the step).

    python benchmarks/step_time.py [--processes 3] [--repeats 20] [--batches 1 4] [--json out.json]

The JAX side needs the CPU malloc settings of `lmc_jax._runtime`: the script re-executes itself
once with them (glibc reads them only at process start) and the workers inherit them; the output
says whether they are active. PyTorch runs in the same processes, so under the same allocator.
Needs torch: `pip install -e ".[bench]"`. The table: benchmarks/step_time_report.py.
"""

from __future__ import annotations

import sys

if __name__ == "__main__":
    from lmc_jax import _runtime

    _runtime.maybe_reexec_with_fast_malloc(sys.argv)

import argparse
import json
import os
import subprocess
import tempfile
import time
from typing import Any

import _timing  # benchmarks/_timing.py (this script's folder is on sys.path)
import numpy as np
from step_time_report import aggregate, report
from torch_reference import TorchBiasNet, torch_guidance_step, torch_unet_from_flax

from lmc_jax import _runtime, io

# 'jax-dattn': the same JAX step with diffusers' own FlaxAttention (prior.attention='diffusers')
# instead of lmc_jax's late-normalized attention (lmc_jax.priors.attention, the default).
FRAMEWORKS = ("jax", "jax-dattn", "torch")
JAX_ATTENTION = {"jax": "late_norm", "jax-dattn": "diffusers"}
METHODS = ("sds", "lmc")
GUIDANCE_W = 7.5  # the paper's w (value does not change the cost)
WEIGHTING = "sigma2"
LR = 0.01
BIAS_FEATURES = 32
BIAS_PADDING = "REFLECT"  # configs/bias.py's default for latents
BIAS_EPS = 1e-4  # BiasNet.eps
MEMORY_PROBE_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536"}



def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------------------------
# The two implementations.


class Setup:
    """Both frameworks' models with the same weights, and the jitted JAX steps."""

    def __init__(self, threads: int, seed: int = 0):
        import jax
        import jax.numpy as jnp
        import torch
        from flax.traverse_util import flatten_dict

        from lmc_jax.bias import BiasNet
        from lmc_jax.priors.sd import TINY_UNET, tiny_sd_prior

        torch.set_num_threads(threads)
        self.threads = torch.get_num_threads()
        self.priors = {fw: tiny_sd_prior(seed=seed, image_size=64, attention=impl)
                       for fw, impl in JAX_ATTENTION.items()}
        self.prior = self.priors["jax"]
        h, w, c = self.prior.x_shape
        self.x_shape = (h, w, c)

        # b_psi: BiasNet with its init perturbed (conv_out starts at zero, which would make b the
        # identity and the torch check vacuous; the cost is the same).
        self.bias_module = BiasNet(features=BIAS_FEATURES, padding=BIAS_PADDING, eps=BIAS_EPS)
        params = jax.jit(self.bias_module.init)(
            jax.random.PRNGKey(seed), jnp.zeros((1, h, w, c)), jnp.zeros((1,), jnp.int32))
        leaves, tree = jax.tree_util.tree_flatten(params["params"])
        keys = jax.random.split(jax.random.PRNGKey(seed + 1), len(leaves))
        self.bias_params = jax.tree_util.tree_unflatten(tree, [
            p + 0.05 * jax.random.normal(k, p.shape) for p, k in zip(leaves, keys, strict=True)])

        # torch UNet with the Flax weights, through diffusers' own converter.
        unet = torch_unet_from_flax(self.prior.params["unet"], h, TINY_UNET)
        self.torch_unet = unet
        self.torch_bias = TorchBiasNet(flatten_dict(self.bias_params, sep="/"),
                                       BIAS_FEATURES, BIAS_PADDING, BIAS_EPS)
        self.torch_abar = torch.from_numpy(np.array(self.prior.alphas_cumprod, np.float32))
        self.unet_params = int(sum(np.size(p) for p in jax.tree_util.tree_leaves(
            self.prior.params["unet"])))
        self.bias_param_count = int(sum(np.size(p) for p in leaves))
        self.jax_steps = {m: make_jax_step(m, self.bias_module) for m in METHODS}

    def inputs(self, batch: int, seed: int = 0) -> dict[str, Any]:
        """Latents, timesteps, noise and text embeddings for both frameworks (same values)."""
        import jax.numpy as jnp
        import torch

        from lmc_jax.guidance import Conditioning

        rng = np.random.default_rng([seed, batch])
        x = rng.standard_normal((batch, *self.x_shape), np.float32)
        eps = rng.standard_normal(x.shape, np.float32)
        t = rng.integers(20, 980, size=(batch,)).astype(np.int32)
        emb_c = np.asarray(self.prior.embed_text(["a photo of a cat"] * batch))
        emb_u = np.asarray(self.prior.embed_text([""] * batch))
        nchw = lambda a: torch.from_numpy(np.ascontiguousarray(a.transpose(0, 3, 1, 2)))
        return {
            "jax": dict(x=jnp.asarray(x), t=jnp.asarray(t), eps=jnp.asarray(eps),
                        cond=Conditioning(c=jnp.asarray(emb_c), u=jnp.asarray(emb_u))),
            "torch": dict(x=nchw(x), t=torch.from_numpy(t.astype(np.int64)), eps=nchw(eps),
                          emb_c=torch.from_numpy(emb_c), emb_u=torch.from_numpy(emb_u)),
        }

    def step_fn(self, framework: str, method: str, inp: dict[str, Any]):
        """A zero-argument callable running one step, and the matching `sync`."""
        if framework in self.priors:
            step, a = self.jax_steps[method], inp["jax"]
            args = (self.priors[framework], self.bias_params, a["x"], a["t"], a["eps"], a["cond"])
            return (lambda: step(*args)), _timing.block_jax
        a = inp["torch"]
        return (lambda: self.torch_step(method, **a)), _timing.no_sync

    def torch_step(self, method: str, x, t, eps, emb_c, emb_u):
        """The PyTorch eager step (NCHW), the same arithmetic as lmc_jax.guidance."""
        return torch_guidance_step(self.torch_unet, self.torch_bias, self.torch_abar, method, x,
                                   t, eps, emb_c, emb_u, w=GUIDANCE_W, lr=LR)


def make_jax_step(method: str, bias_module: Any):
    """`step(prior, bias_params, x, t, eps, cond) -> (x - lr grad, scalars)`, jitted."""
    import jax

    from lmc_jax.bias import bias_fn_from
    from lmc_jax.guidance import GuidanceParams, lmc_sds, sds

    fn = {"sds": sds, "lmc": lmc_sds}[method]

    @jax.jit
    def step(prior, bias_params, x, t, eps, cond):
        bias_fn = bias_fn_from(bias_module, bias_params) if method == "lmc" else None
        hp = GuidanceParams(w=GUIDANCE_W, weighting=WEIGHTING, b_psi=bias_fn)
        out = fn(prior, x, t, eps, cond, hp)
        return x - LR * out.grad, out.scalars

    return step


def _rel(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(a), 1e-30))


def check_equivalence(setup: Setup, batch: int) -> dict[str, float]:
    """Relative differences torch vs JAX: UNet eps, b_psi, and each step's gradient."""
    import torch

    inp = setup.inputs(batch, seed=123)
    j, tt = inp["jax"], inp["torch"]
    to_nhwc = lambda v: v.detach().numpy().transpose(0, 2, 3, 1)
    x2 = np.concatenate([np.asarray(j["x"])] * 2)
    t2 = np.concatenate([np.asarray(j["t"])] * 2)
    emb = np.concatenate([np.asarray(j["cond"].c), np.asarray(j["cond"].u)])
    e_jax = np.asarray(setup.prior.eps(x2, t2, emb))
    with torch.no_grad():
        e_torch = to_nhwc(setup.torch_unet(
            torch.from_numpy(np.ascontiguousarray(x2.transpose(0, 3, 1, 2))),
            torch.from_numpy(t2.astype(np.int64)), torch.from_numpy(emb)).sample)
        b_torch = to_nhwc(setup.torch_bias(tt["x"], tt["t"]))
    from lmc_jax.bias import bias_fn_from

    b_jax = np.asarray(bias_fn_from(setup.bias_module, setup.bias_params)(j["x"], j["t"]))
    e_dattn = np.asarray(setup.priors["jax-dattn"].eps(x2, t2, emb))
    out = {"unet_eps": _rel(e_jax, e_torch), "b_psi": _rel(b_jax, b_torch),
           "late_norm_vs_diffusers_attention": _rel(e_dattn, e_jax)}
    x0 = np.asarray(j["x"])
    for m in METHODS:
        xj = np.asarray(setup.step_fn("jax", m, inp)[0]()[0])
        xt = to_nhwc(setup.step_fn("torch", m, inp)[0]())
        out[f"{m}_grad"] = _rel((x0 - xj) / LR, (x0 - xt) / LR)
    return out


# ----------------------------------------------------------------------------------------------
# Worker processes.


def run_worker(args: argparse.Namespace) -> dict[str, Any]:
    """One timing process: checks, warm-up, alternating timings per batch size."""
    import jax
    import torch

    t0 = time.perf_counter()
    setup = Setup(args.threads)
    check = check_equivalence(setup, args.batches[0])  # a batch size timed anyway
    _log(f"  setup {time.perf_counter() - t0:.1f} s; torch vs JAX relative difference: "
         + ", ".join(f"{k} {v:.2e}" for k, v in check.items()))
    rows = []
    for bsz in args.batches:
        inp = setup.inputs(bsz)
        fns = {f"{fw}/{m}": setup.step_fn(fw, m, inp) for m in METHODS for fw in FRAMEWORKS}
        samples = _timing.alternate(fns, args.repeats, args.warmup, shuffle=True, gap_s=args.gap)
        for name, s in samples.items():
            fw, m = name.split("/")
            rows.append({"framework": fw, "method": m, "batch": bsz, **_timing.summary(s),
                         "samples": [round(v, 3) for v in s]})
        meds = {r["framework"] + "/" + r["method"]: r["median"] for r in rows if r["batch"] == bsz}
        _log(f"  B={bsz}: " + ", ".join(f"{k} {v:.1f} ms" for k, v in meds.items()))
    return {
        "jax": jax.__version__, "torch": torch.__version__,
        "device": f"{jax.devices()[0].platform}: {_timing.device_string()}",
        "fast_malloc": _timing.malloc_status(), "torch_threads": setup.threads,
        "unet_params": setup.unet_params, "bias_params": setup.bias_param_count,
        "x_shape": list(setup.x_shape), "check": check, "rows": rows,
        "vm_hwm_mib": _timing.peak_rss_mib(), "seconds": time.perf_counter() - t0,
    }


def run_memory_probe(args: argparse.Namespace) -> dict[str, Any]:
    """Peak RSS increase during one warm step, per framework, method, batch (see module doc)."""
    setup = Setup(args.threads)
    rows = []
    for bsz in args.batches:
        inp = setup.inputs(bsz)
        for m in METHODS:
            for fw in FRAMEWORKS:
                fn, sync = setup.step_fn(fw, m, inp)
                for _ in range(2):
                    sync(fn())
                deltas = [_timing.peak_rss_delta_mib(fn, sync) for _ in range(5)]
                row = {"framework": fw, "method": m, "batch": bsz,
                       "peak_rss_delta_mib": None if None in deltas else max(deltas)}
                if fw in setup.priors:
                    a = inp["jax"]
                    ma = setup.jax_steps[m].lower(setup.priors[fw], setup.bias_params, a["x"],
                                                  a["t"], a["eps"], a["cond"]
                                                  ).compile().memory_analysis()
                    if ma is not None:
                        row["xla_temp_mib"] = ma.temp_size_in_bytes / 2**20
                        row["xla_output_mib"] = ma.output_size_in_bytes / 2**20
                rows.append(row)
    return {"rows": rows, "allocator": " ".join(f"{k}={v}" for k, v in MEMORY_PROBE_ENV.items()),
            "vm_hwm_mib": _timing.peak_rss_mib()}


def _spawn(mode: str, args: argparse.Namespace, env: dict[str, str]) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "out.json")
        cmd = [sys.executable, os.path.abspath(__file__), f"--{mode}", out,
               "--repeats", str(args.repeats), "--warmup", str(args.warmup),
               "--threads", str(args.threads), "--gap", str(args.gap),
               "--batches", *map(str, args.batches)]
        subprocess.run(cmd, env=env, check=True)
        with open(out) as f:
            return json.load(f)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--processes", type=int, default=3, help="timing processes, in turn")
    parser.add_argument("--repeats", type=int, default=20, help="timed rounds per batch size")
    parser.add_argument("--warmup", type=int, default=3, help="untimed rounds (incl. compile)")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    parser.add_argument("--gap", type=float, default=0.005, help="seconds between timed calls")
    parser.add_argument("--no-memory", action="store_true", help="skip the memory probe")
    parser.add_argument("--json", default=None, help="also write the results here")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--memory-probe", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.worker or args.memory_probe:
        res = run_worker(args) if args.worker else run_memory_probe(args)
        with open(args.worker or args.memory_probe, "w") as f:
            json.dump(res, f)
        return

    try:
        import torch  # noqa: F401
    except ImportError:
        sys.exit('error: this benchmark needs PyTorch: pip install -e ".[bench]" '
                 "(torch==2.13.0, the CPU wheel)")
    if not _timing.fast_malloc_on():
        _log("warning: the CPU malloc settings are not active (LMC_JAX_NO_REEXEC=1?); JAX "
             "numbers will be slower than with them")
    res: dict[str, Any] = {"repeats": args.repeats, "warmup": args.warmup,
                           "batches": args.batches, "load_before": _timing.load_average()}
    workers = []
    for i in range(args.processes):
        _log(f"timing process {i + 1}/{args.processes} (load {_timing.load_average()})")
        workers.append(_spawn("worker", args, dict(os.environ)))
    memory = None
    if not args.no_memory:
        _log("memory probe process")
        env = {k: v for k, v in os.environ.items()
               if k not in _runtime.FAST_MALLOC_ENV and k != _runtime._REEXEC_MARK}
        env.update(MEMORY_PROBE_ENV, LMC_JAX_NO_REEXEC="1")
        memory = _spawn("memory-probe", args, env)
    res.update(load_after=_timing.load_average(), workers=workers, memory=memory,
               rows=aggregate(workers, memory))
    report(res, BIAS_FEATURES)
    if args.json:
        print(f"\nwrote {io.write_json(args.json, res)}")


if __name__ == "__main__":
    main()
