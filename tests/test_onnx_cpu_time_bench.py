"""bench/onnx_cpu_time.py runs end to end on the tiny model and records what it timed."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

BENCH = Path(__file__).resolve().parent.parent / "bench" / "onnx_cpu_time.py"


def test_onnx_cpu_time_smoke(tmp_path, monkeypatch):
    monkeypatch.setenv("MOON3RT_CACHE", str(tmp_path / "cache"))
    spec = importlib.util.spec_from_file_location("bench_onnx_cpu_time", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    report = module.main(["--model", "moon3-tiny", "--batch-sizes", "1,2", "--repeats", "1",
                          "--out-dir", str(tmp_path / "out")])
    (path,) = (tmp_path / "out").glob("onnx-cpu-time-*.json")
    assert json.loads(path.read_text()) == report
    assert [(r["backend"], r["batch_size"]) for r in report["results"]] == [
        (name, size) for size in (1, 2) for name in ("torch", "onnxruntime[ops]", "onnxruntime[onnx]")]
    assert all(r["cpu_ms_per_item"] > 0 for r in report["results"])
    graphs = {r["backend"]: r["settings"] for r in report["results"] if r["backend"] != "torch"}
    assert graphs["onnxruntime[ops]"]["attention"] == "ops" and graphs["onnxruntime[onnx]"]["attention"] == "onnx"
    assert all(s["intra_op_num_threads"] == 1 and s["allow_spinning"] is False for s in graphs.values())
    assert report["environment"]["git_commit"] and report["threads"] == 1
