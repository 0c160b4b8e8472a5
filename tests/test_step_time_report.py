"""benchmarks/step_time_report.py: medians over processes and ratios paired within a process,
checked on hand-made timings."""

from _bench import load_benchmark

report = load_benchmark("step_time_report")


def _worker(ms: dict[tuple[str, str], float]) -> dict:
    return {"rows": [{"framework": fw, "method": m, "batch": 1, "median": v}
                     for (fw, m), v in ms.items()]}


def test_ratios_are_paired_within_each_process_then_the_median_is_taken():
    # Process 2 is uniformly twice as slow: paired ratios stay the same, medians do not.
    ms1 = {("jax", "sds"): 10.0, ("jax", "lmc"): 10.5, ("torch", "sds"): 15.0,
           ("torch", "lmc"): 18.0}
    w1, w2 = _worker(ms1), _worker({k: 2 * v for k, v in ms1.items()})
    w3 = _worker({("jax", "sds"): 12.0, ("jax", "lmc"): 13.2, ("torch", "sds"): 12.0,
                  ("torch", "lmc"): 26.4})
    rows = {(r["framework"], r["method"]): r for r in report.aggregate([w1, w2, w3], None)}
    jl = rows[("jax", "lmc")]
    assert jl["median_ms"] == 13.2 and jl["process_medians_ms"] == [10.5, 21.0, 13.2]
    assert abs(jl["over_sds"] - 1.05) < 1e-12  # median of 1.05, 1.05, 1.1
    assert abs(jl["torch_over_this"] - 18.0 / 10.5) < 1e-12  # median of 1.714, 1.714, 2.0
    assert rows[("torch", "sds")]["torch_over_this"] == 1.0
    assert [(r["method"], r["framework"]) for r in report.aggregate([w1], None)] == [
        ("sds", "jax"), ("sds", "torch"), ("lmc", "jax"), ("lmc", "torch")]
