"""Plan a job before paying for it: compile an app's real train step for a TPU slice ahead of
time, on any host, and read off what one chip needs.

    python -m lmc_jax.plan --config=configs/t23d.py --topology=v5e:2x4 [--config.key=value ...]

The same config flags as `lmc_jax.main` (every app: t23d, synth, edit, i2i, bias). The step is
the app's own (its `setup`/`make_step`, its mesh, shardings and donation) built on abstract
weights: a Stable Diffusion prior is shapes only (`lmc_jax.priors.sd_shapes`: from the
diffusers folder's config files, or a built-in architecture, `--arch=sd15|sd21-base|sd21`), so
no weights are read and nothing big is allocated. `--topology` names a slice the way libtpu
does (`v5e:2x2`, `v5e:2x4`, `v4:2x2x1`, `v5p:2x2x1`, `v6e:2x2`, ...; needs the `tpu` extra:
`pip install -e ".[tpu]"`); without it the plan uses this host's own devices (on a TPU VM or
a Colab TPU runtime: its real chips). XLA's own compiler then reports, per chip: memory
(arguments, temporaries, outputs, aliased = donated state), FLOPs and bytes accessed per step,
and the collectives it inserted. A roofline time (the larger of FLOPs / the chip's bf16 peak
and bytes / its HBM bandwidth, data-sheet figures) is an estimate, not a measurement: a
compile-only plan cannot see the real step time, the input pipeline or host overheads.

A learned b_psi that would be trained or read from the cache (`guidance.bias_path` empty) is
replaced by an untrained one of the automatic recipe's size: its cost does not depend on its
weights.
"""

from __future__ import annotations

import sys

if __name__ == "__main__":
    from lmc_jax import _runtime

    _runtime.maybe_reexec_with_fast_malloc(["-m", "lmc_jax.plan", *sys.argv[1:]])

import collections
import importlib.util
import os
import re
import tempfile
import time
from typing import Any

from lmc_jax.errors import UserError

# Data-sheet figures per chip: HBM GiB, dense bf16 TFLOP/s, HBM GB/s (Cloud TPU documentation).
CHIPS = {
    "TPU v4": (32.0, 275.0, 1228.0),
    "TPU v5 lite": (16.0, 197.0, 819.0),
    "TPU v5": (95.0, 459.0, 2765.0),  # v5p
    "TPU v6 lite": (32.0, 918.0, 1640.0),
}
APPS = ("t23d", "synth", "edit", "i2i", "bias")
COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "collective-permute", "all-to-all")
EXAMPLES = "v5e:2x2, v5e:2x4, v5e:4x4, v4:2x2x1, v5p:2x2x1, v6e:2x2"


# --- devices ------------------------------------------------------------------------------

def slice_devices(topology: str) -> tuple[list, str]:
    """`(devices, description)`: the devices of a named TPU slice (compile-only, through
    libtpu) or, for an empty name, this host's own devices."""
    import jax

    if not topology:
        devs = jax.devices()
        return devs, f"this host's {len(devs)} {devs[0].platform} device(s) ({devs[0].device_kind})"
    if importlib.util.find_spec("libtpu") is None:
        raise UserError("planning for a TPU slice needs libtpu, the TPU compiler: pip install "
                        "-e \".[tpu]\" (in a separate environment: with libtpu installed every "
                        "JAX start looks for a TPU)")
    from jax.experimental import topologies

    if os.environ.get("JAX_PLATFORMS", "").strip() == "cpu":
        # Compile-only on a host without TPU chips: nothing to guard, so libtpu's one-process
        # lock (meant for a host's real chips) need not stop a second planner.
        os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    try:
        devs = topologies.get_topology_desc(topology_name=topology, platform="tpu").devices
        if any(getattr(d, "core_on_chip", 0) for d in devs):
            # libtpu lists each TensorCore of a v4 chip as a device; JAX on a real v4 host
            # runs one device per chip ("megacore"), and jax.make_mesh accepts only that.
            devs = topologies.get_topology_desc(topology_name=topology, platform="tpu",
                                                chip_config_name="megacore").devices
    except Exception as e:  # noqa: BLE001 - libtpu's errors are long; one line names the fix
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        raise UserError(f"libtpu does not know the TPU topology {topology!r} ({first}); name a "
                        f"slice as <chip>:<layout>, e.g. {EXAMPLES}") from None
    return list(devs), (f"TPU slice {topology}: {len(devs)} devices ({devs[0].device_kind}), "
                        "compile-only")


def chip_figures(devices: list) -> dict[str, float | None]:
    """HBM per device (GiB), bf16 TFLOP/s and HBM GB/s per device, from the data sheet (a
    chip listed as several devices is divided among them; v4 is planned one device per chip,
    as JAX runs it)."""
    kind = devices[0].device_kind
    per_chip = collections.Counter(tuple(getattr(d, "coords", (d.id,))) for d in devices)
    share = max(per_chip.values()) if per_chip else 1
    if kind in CHIPS:
        hbm, tflops, bw = CHIPS[kind]
        return {"hbm_gib": hbm / share, "tflops": tflops / share, "gbps": bw / share,
                "devices_per_chip": share, "source": "data sheet"}
    limit = None
    try:
        limit = (devices[0].memory_stats() or {}).get("bytes_limit")
    except Exception:  # noqa: BLE001 - CPU devices have no memory stats
        pass
    return {"hbm_gib": limit / 2**30 if limit else None, "tflops": None, "gbps": None,
            "devices_per_chip": 1, "source": "device memory_stats" if limit else "unknown"}


# --- the app's step, on abstract weights --------------------------------------------------

def plan_prior(config: Any, arch: str) -> tuple[Any, str]:
    """The prior the plan builds the step on: Stable Diffusion as shapes only; the small
    shipped/analytic priors as they are (their weights are small and offline)."""
    if config.prior.name == "sd":
        from lmc_jax.priors.sd_shapes import shapes_prior

        return shapes_prior(config.prior, arch)
    from lmc_jax.priors.factory import build_prior

    return build_prior(config.prior), f"{config.prior.name} (its own weights)"


def untrained_bias(config: Any, prior: Any, folder: str) -> str | None:
    """Points `guidance.bias_path` at an untrained b_psi of the automatic recipe's size when
    the run would train or look one up (LMC-SDS, learned, empty path); returns what was done."""
    g = config.get("guidance", None)
    if g is None or g.method != "lmc" or g.bias != "learned" or g.bias_path:
        return None
    import jax

    from lmc_jax.bias.auto import default_recipe
    from lmc_jax.bias.model import BiasNet
    from lmc_jax.bias.store import save_bias

    recipe = default_recipe(prior)
    module = BiasNet(features=recipe.features, normalize=True, center=False, padding="REFLECT",
                     conditional=False)
    x = jax.numpy.zeros((1, *prior.x_shape))
    params = module.init(jax.random.PRNGKey(0), x, jax.numpy.zeros((1,), jax.numpy.int32),
                         prior.embed_text([""]))["params"]
    save_bias(folder, module, params, prior, training={"untrained": "lmc_jax.plan"})
    with config.unlocked():
        g.bias_path = folder
    return f"an untrained b_psi ({recipe.features} features, the automatic recipe's size)"


def lowered_step(config: Any, prior: Any, mesh: Any) -> Any:
    """`jitted.lower(...)` of the app's train step on `mesh`, every input abstract."""
    import jax

    from lmc_jax import parallel

    app = config.app
    with parallel.abstract_placement():
        if app == "t23d":
            from lmc_jax.apps import t23d

            prompt = t23d.validate(config, prior)
            _, state, step = t23d.setup(config, prior, prompt, mesh)
            return step.jitted.lower(state, step.consts)
        batch = parallel.config_batch(config) or 1  # edit: one image
        parallel.check_batch(batch, mesh, "batch" if app != "bias" else "train.batch")
        x = parallel.shard_batch(jax.ShapeDtypeStruct((batch, *prior.x_shape), "float32"), mesh)
        emb = prior.embed_text([""] * batch)
        if app == "bias":
            import optax

            from lmc_jax.bias import fit, train

            module = fit.build_module(config.bias)
            opt = optax.adam(config.train.lr)
            state = parallel.replicate(train.init_state(module, prior, opt, config.seed, emb),
                                       mesh)
            step = fit.make_step(module, prior, opt, config, mesh)
            return step.jitted.lower(state, step.prior_params, x,
                                     parallel.shard_batch(emb, mesh))
        from lmc_jax.guidance import Conditioning
        from lmc_jax.guidance.from_config import guidance_record

        guide = guidance_record(prior, config.guidance, config.steps, config)
        neg = None if guide.negative_prompt is None else emb
        cond = Conditioning(c=emb, u=emb, neg=neg)
        if config.guidance.method == "dds":  # DDS reads a source image and prompt
            cond = cond.replace(x_src=jax.numpy.zeros((batch, *prior.x_shape)), src=emb)
        if app == "i2i":
            import optax

            from lmc_jax.apps import i2i

            net = i2i.Translator(config.net.features, config.net.blocks)
            opt = optax.adam(config.lr)
            state = parallel.replicate(i2i.init_state(net, opt, prior.x_shape, config.seed),
                                       mesh)
            step = i2i.make_step(net, prior, guide, opt, config.identity_weight, mesh)
            return step.jitted.lower(state, step.prior_params, x,
                                     parallel.shard_batch(cond, mesh))
        if app in ("synth", "edit"):
            from lmc_jax.apps.optimize import make_optimizer, make_x_step

            opt = make_optimizer(config.optimizer, config.lr)
            step = make_x_step(prior, cond, guide, optimizer=opt, key=jax.random.PRNGKey(0))
            opt_state = parallel.shard_batch(opt.init(jax.numpy.zeros((batch,
                                                                       *prior.x_shape))), mesh)
            i = parallel.replicate(jax.numpy.asarray(0), mesh)
            return step.lower(x, opt_state, i, parallel.shard_params(prior.params, mesh))
    raise UserError(f"lmc_jax.plan plans the apps {list(APPS)}; config.app is {app!r}")


# --- what the compiler says ---------------------------------------------------------------

_DTYPE_BYTES = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2, "s32": 4,
                "u32": 4, "f32": 4, "s64": 8, "u64": 8, "f64": 8, "c64": 8}
_SHAPE = re.compile(r"\b(pred|[suf]\d+|bf16|c64)\[([\d,]*)\]")
_OP = re.compile(r"=\s*(.*?)\s+(" + "|".join(COLLECTIVES) + r")(-start|-done)?\(")
_OP_NAME = re.compile(r'op_name="([^"]*)"')


def _shape_bytes(text: str) -> int:
    total = 0
    for dtype, dims in _SHAPE.findall(text):
        n = 1
        for d in filter(None, dims.split(",")):
            n *= int(d)
        total += n * _DTYPE_BYTES.get(dtype, 4)
    return total


def collectives(hlo: str) -> dict[str, dict]:
    """`{kind: {count, bytes, sources}}` of the collectives in a compiled module's text: each
    synchronous op or async pair counted once (at its `-done`, whose result is the output), its
    bytes those of its result, its sources the `op_name`s of the JAX ops that made it."""
    out: dict[str, dict] = {}
    for line in hlo.splitlines():
        m = _OP.search(line)
        if m is None or m.group(3) == "-start":
            continue
        kind = m.group(2)
        row = out.setdefault(kind, {"count": 0, "bytes": 0, "sources": collections.Counter()})
        row["count"] += 1
        row["bytes"] += _shape_bytes(m.group(1))
        name = _OP_NAME.search(line)
        row["sources"][name.group(1) if name else "?"] += 1
    return out


_INSTR = re.compile(r"^\s*(?:ROOT\s+)?%\S+\s*=\s*(.*?)\s+([a-z][\w-]*)\(")
_MEMORY_SPACE = re.compile(r"\{[^}]*S\(\d+\)[^}]*\}")
ON_CHIP = " [memory space S(n), not HBM]"  # suffix of bytes_by_source's on-chip entries
_SCOPES = ("FlaxUNet2DConditionModel", "FlaxAutoencoderKL", "FlaxCLIPTextTransformer",
           "BiasNet", "MLPField", "BackgroundMLP", "Translator")


def bytes_by_source(hlo: str) -> dict[str, float]:
    """GB *written* per step by the top-level instructions of a compiled module (fusions,
    copies, convolutions, ...; not the ops inside a fusion, which stay on chip), grouped by the
    model whose op made them (`op_name` metadata: the UNet, the VAE, the field, ...; the rest
    as 'other: <JAX op>', or '<HLO op> (no op_name)' for what XLA added itself, e.g. layout
    copies). Reads and writes together are XLA's 'bytes accessed'; this splits the
    writes, a guide to where the HBM traffic goes."""
    out: dict[str, float] = collections.Counter()
    fused = False
    for line in hlo.splitlines():
        if line and not line[0].isspace():  # a computation's header: fused bodies stay on chip
            fused = line.startswith("%fused") or " %fused" in line.split("(")[0] \
                or line.startswith("fused")
            continue
        if fused:
            continue
        m = _INSTR.match(line)
        if m is None or m.group(2) in ("parameter", "constant", "get-tuple-element", "tuple",
                                       "bitcast") or m.group(2).endswith("-start"):
            continue  # an async pair is counted at its -done, whose result is the destination
        name = _OP_NAME.search(line)
        op = name.group(1) if name else ""
        scope = next((s for s in _SCOPES if s in op), None)
        if scope is None:  # the JAX op itself, its jit/jvp/transpose wrappers taken off
            last = re.sub(r"^(?:\w+\()+|\)+$", "", op.split("/")[-1]) if op else ""
            scope = f"other: {last or m.group(2) + ' (no op_name)'}"
        if _MEMORY_SPACE.search(m.group(1)):  # a layout in another memory space (on chip)
            scope += ON_CHIP
        out[scope] += _shape_bytes(m.group(1)) / 1e9
    return dict(sorted(out.items(), key=lambda kv: -kv[1]))


def written_summary(written: dict[str, float]) -> str:
    """`bytes_by_source`'s split in one line: GB written to HBM by model (XLA's own ops and
    the small rest as 'other'), and the total that lands in on-chip memory."""
    hbm: dict[str, float] = collections.Counter()
    on_chip = 0.0
    for name, gb in written.items():
        if name.endswith(ON_CHIP):
            on_chip += gb
        else:
            hbm["other" if name.startswith("other:") else name] += gb
    parts = ", ".join(f"{k} {v:.1f}" for k, v in hbm.most_common() if v >= 0.05)
    return (f"GB written per chip-step: to HBM {sum(hbm.values()):.1f}"
            + (f" ({parts})" if parts else "") + f"; to on-chip memory {on_chip:.1f}")


def analyse(compiled: Any, chip: dict) -> dict[str, Any]:
    """Per-device memory, FLOPs, bytes, collectives and the roofline estimate."""
    mem = compiled.memory_analysis()
    cost = compiled.cost_analysis()
    cost = (cost[0] if isinstance(cost, (list, tuple)) else cost) or {}
    gib = lambda b: float(b) / 2**30  # noqa: E731
    row: dict[str, Any] = {
        "args_gib": gib(mem.argument_size_in_bytes), "temp_gib": gib(mem.temp_size_in_bytes),
        "out_gib": gib(mem.output_size_in_bytes), "alias_gib": gib(mem.alias_size_in_bytes),
        "code_gib": gib(mem.generated_code_size_in_bytes),
        "tflop": float(cost.get("flops", float("nan"))) / 1e12,
        "gb_accessed": float(cost.get("bytes accessed", float("nan"))) / 1e9,
    }
    # Donated outputs live in their arguments' buffers: count them once.
    row["total_gib"] = (row["args_gib"] + row["temp_gib"] + row["out_gib"] - row["alias_gib"]
                        + row["code_gib"])
    hlo = compiled.as_text()
    coll = collectives(hlo)
    row["gb_written_by"] = bytes_by_source(hlo)
    row["collectives"] = {k: {"count": v["count"], "mb": v["bytes"] / 1e6,
                              "sources": dict(v["sources"].most_common(4))}
                          for k, v in sorted(coll.items())}
    if chip["tflops"] and chip["gbps"]:
        row["compute_ms"] = row["tflop"] / chip["tflops"] * 1e3
        row["memory_ms"] = row["gb_accessed"] / chip["gbps"] * 1e3
        row["roofline_ms"] = max(row["compute_ms"], row["memory_ms"])
    return row


def verdict(row: dict, chip: dict, config: Any, mesh: Any) -> str:
    """'fits' or what to change so that it fits."""
    hbm = chip["hbm_gib"]
    if hbm is None:
        return "unknown: this device reports no memory size"
    n, model = mesh.size, int(mesh.shape["model"])
    if row["total_gib"] <= 0.9 * hbm:
        out = f"fits ({row['total_gib']:.2f} of {hbm:.1f} GiB per device)"
        if model > 1:  # the batch covers fewer devices than there are: the prior is split
            count = sum(c["count"] for c in row["collectives"].values())
            key = "train.batch" if config.app == "bias" else "batch"
            out += (f"; the batch splits over {n // model} of {n} devices and the prior over "
                    f"{model} ({count} collectives per step): --config.{key}={n} (or a "
                    f"multiple of {n}) runs data-parallel with the gradient's all-reduce "
                    "only, if that many images per step suit the run")
        return out
    fixes = []
    if config.get("prior", {}).get("dtype", "float32") == "float32":
        fixes.append("--config.prior.dtype=bfloat16 (halves the prior's weights)")
    if model < n:
        fixes.append(f"--config.parallel.model_axis={min(n, model * 2)} (split the prior over "
                     "more devices)")
    fixes.append("a smaller batch (temporaries grow with it)")
    return (f"does NOT fit: {row['total_gib']:.2f} GiB per device against {hbm:.1f} GiB; try "
            + "; or ".join(fixes))


def format_plan(row: dict) -> str:
    """The printed table."""
    from lmc_jax import io

    lines = [["per device: arguments", f"{row['args_gib']:.2f} GiB"],
             ["per device: temporaries", f"{row['temp_gib']:.2f} GiB"],
             ["per device: outputs", f"{row['out_gib']:.2f} GiB"],
             ["per device: aliased (donated state)", f"{row['alias_gib'] * 1024:.2f} MiB"],
             ["per device: total / HBM", f"{row['total_gib']:.2f} / "
              + (f"{row['hbm_gib']:.1f} GiB" if row.get("hbm_gib") else "? GiB")],
             ["TFLOP per device-step", f"{row['tflop']:.3f}"],
             ["GB accessed per device-step", f"{row['gb_accessed']:.1f}"]]
    if "roofline_ms" in row:
        lines.append(["roofline (estimate)", f"{row['roofline_ms']:.1f} ms (compute "
                      f"{row['compute_ms']:.1f}, memory {row['memory_ms']:.1f})"])
    lines.append(["bytes written", written_summary(row["gb_written_by"])])
    for kind, c in row["collectives"].items():
        lines.append([f"collective: {kind}", f"{c['count']} ({c['mb']:.1f} MB)"])
    if not row["collectives"]:
        lines.append(["collectives", "none"])
    lines.append(["compile", f"{row['compile_s']:.0f} s"])
    lines.append(["verdict", row["verdict"]])
    return io.format_table(lines, ["plan", row["what"]])


def expected_compile(prior: Any) -> str:
    import jax

    n = sum(int(getattr(x, "size", 0)) for x in jax.tree_util.tree_leaves(prior.params))
    if n > 1e8:
        return "a real-size prior: 10-25 minutes on 2 CPU cores, a few on a TPU VM's host"
    return "a small prior: seconds to a few minutes"


def plan(config: Any, topology: str = "", arch: str = "", quiet: bool = False) -> dict:
    """Builds, compiles and analyses the app's step; returns the plan's row (and prints it)."""
    from lmc_jax import parallel

    say = (lambda *a: None) if quiet else (lambda *a: print(*a, flush=True))
    devices, where = slice_devices(topology)
    say(f"devices: {where}")
    prior, source = plan_prior(config, arch)
    say(f"prior: {prior.name}, architecture from {source}; dtype {config.prior.dtype}")
    with tempfile.TemporaryDirectory() as tmp:
        swapped = untrained_bias(config, prior, os.path.join(tmp, "bias"))
        if swapped:
            say(f"b_psi: {swapped}")
        batch = parallel.config_batch(config) or 1  # edit: one image
        mesh = parallel.mesh_from_config(config, devices, batch)
        say(f"mesh: data={parallel.data_size(mesh)} x model={int(mesh.shape['model'])} "
            f"(parallel.model_axis={config.get('parallel', {}).get('model_axis', 1)}, "
            f"batch={batch})")
        t0 = time.time()
        lowered = lowered_step(config, prior, mesh)
    say(f"compiling the {config.app} step ({expected_compile(prior)}) ...")
    compiled = lowered.compile()
    chip = chip_figures(devices)
    row = analyse(compiled, chip)
    row.update(compile_s=time.time() - t0, hbm_gib=chip["hbm_gib"], topology=topology or "local",
               devices=len(devices), device_kind=devices[0].device_kind, app=config.app,
               data=parallel.data_size(mesh), model=int(mesh.shape["model"]), batch=batch,
               dtype=config.prior.dtype, prior=prior.name, method=config.guidance.method
               if "guidance" in config else None, chip_source=chip["source"])
    row["what"] = (f"{config.app} {row['method'] or ''} on {row['topology']} "
                   f"({row['devices']}x {row['device_kind']}), data={row['data']} "
                   f"model={row['model']}, {row['dtype']}")
    row["verdict"] = verdict(row, chip, config, mesh)
    say(format_plan(row))
    for kind, c in row["collectives"].items():
        say(f"  {kind} from: " + "; ".join(f"{n} x {k}" for k, n in c["sources"].items()))
    return row


# --- command line -------------------------------------------------------------------------

def main(argv: list[str]) -> None:
    from absl import flags

    from lmc_jax.main import _CONFIG

    if len(argv) > 1:
        raise UserError(f"unexpected arguments {argv[1:]}; pass config keys as --config.key=value")
    config = _CONFIG.value
    if config is None:
        raise UserError("pass --config=configs/<app>.py[:preset], e.g. --config=configs/t23d.py")
    row = plan(config, flags.FLAGS.topology, flags.FLAGS.arch)
    if flags.FLAGS.json:
        from lmc_jax import io

        io.write_json(flags.FLAGS.json, row)
        print(f"wrote {flags.FLAGS.json}")


def run() -> None:
    from absl import app, flags

    from lmc_jax.main import EXIT_USER_ERROR, _parse_flags

    flags.DEFINE_string("topology", "", f"a TPU slice as libtpu names it ({EXAMPLES}); empty: "
                        "this host's devices")
    flags.DEFINE_string("arch", "", "Stable Diffusion architecture when prior.path has no "
                        "config files: sd15 | sd21-base | sd21")
    flags.DEFINE_string("json", "", "also write the plan's figures to this JSON file")
    try:
        app.run(main, flags_parser=_parse_flags)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(EXIT_USER_ERROR)


if __name__ == "__main__":
    run()

