"""bench/summary.py marks each goal met / missed / not measured, and says whether the run is the goals' setting."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import summary  # noqa: E402


def _report(device="NVIDIA H200", dtype="bfloat16", model="moon3-2b"):
    results = [{"backend": "triton", "batch_size": 64, "items_per_s": 250.0},
               {"backend": "transformers", "batch_size": 64, "items_per_s": 100.0},
               {"backend": "triton", "batch_size": 16, "items_per_s": 999.0}]
    return {"environment": {"device_name": device}, "config": {"dtype": dtype, "model": model},
            "results": results, "single_item": {"triton": {"p50_ms": 12.5}}}


def test_throughput_goals_are_marked():
    rows = {g["goal"]: g for g in summary.goals(_report())}
    assert rows["items/s at batch 64"]["status"] == "met" and rows["items/s at batch 64"]["measured"] == 250.0
    assert rows["x transformers at batch 64"]["status"] == "met"  # 2.5x >= 2x
    assert rows["x torch.compile at batch 64"]["status"] == "not measured"
    assert rows["single-item p50 ms"]["status"] == "missed"  # 12.5 ms, not < 10 ms
    assert all(g["applies"] and g["backend"] == "triton" for g in rows.values())
    v = summary.verdict(list(rows.values()), True)
    assert (v["met"], v["missed"], v["not measured"], v["total"]) == (2, 1, 1, 4)
    assert "in the goals' setting" in v["text"]


def test_other_settings_are_informational():
    for report in (_report(device="NVIDIA A100"), _report(dtype="float32"), _report(model="moon3-tiny")):
        assert not any(g["applies"] for g in summary.goals(report))


def test_kernel_goals():
    record = {"device": "NVIDIA H100 80GB HBM3", "dtype": "bfloat16", "model": "moon3-2b", "results": [
        {"op": "rms_norm+residual", "flops": 0, "pct_limit": 85.0, "triton_ms": 0.1},
        {"op": "swiglu", "flops": 0, "pct_limit": 60.0, "triton_ms": 0.1},
        {"op": "varlen_attention vision", "flops": 1e12, "triton_ms": 1.2, "sdpa_padded_ms": 1.0},
        {"op": "fire_inject", "flops": 0, "error": "RuntimeError: boom"},
    ]}
    rows = {g["goal"]: g for g in summary.kernel_goals(record)}
    assert rows["rms_norm+residual: % of copy bandwidth"]["status"] == "met"
    assert rows["swiglu: % of copy bandwidth"]["status"] == "missed"
    assert rows["varlen_attention vision: time / SDPA flash"]["status"] == "missed"  # 1.2x > 1.15x
    assert len(rows) == 3 and all(g["applies"] for g in rows.values())
