"""The kernel benchmark's harness runs (CPU: interpreter smoke) and writes its JSON."""

import importlib.util
import json
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[1] / "bench" / "bench_kernels.py"


def test_kernel_benchmark_smoke(tmp_path):
    spec = importlib.util.spec_from_file_location("bench_kernels", BENCH)
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench_kernels"] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    assert module.main(["--smoke", "--only", "rms_norm,fusion,fire_inject", "--out-dir", str(tmp_path)]) == 0
    (path,) = tmp_path.glob("kernels-*.json")
    record = json.loads(path.read_text())
    ops = {r["op"] for r in record["results"]}
    assert ops == {"rms_norm+residual", "fusion_attention", "fire_inject"}
    for row in record["results"]:
        assert row["triton_ms"] > 0 and row["torch_ms"] > 0
        assert row["pct_limit"] >= 0
    assert record["commit"] and record["versions"]["triton"]
    # the memory-bound goals are marked, informational on a CPU (not the goals' setting)
    goals = {g["op"]: g for g in record["goals"]}
    assert set(goals) == {"rms_norm+residual", "fusion_attention"}
    assert all(g["status"] in ("met", "missed") and g["applies"] is False for g in goals.values())
    assert record["goals_verdict"]["total"] == 2 and not record["goals_verdict"]["applies"]
