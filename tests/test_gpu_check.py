"""bench/gpu_check.sh parses, and its JSON record says what ran, even for a stage cut short.

The whole script is checked on a CPU with ``DRY_RUN=1 OUT=/tmp/gc bash bench/gpu_check.sh``
(a few minutes: too slow for every CI run); here, its syntax and its report writer.
"""

import importlib.util
import json
import shutil
import subprocess
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench"


def _report_module():
    spec = importlib.util.spec_from_file_location("gpu_check_report", BENCH / "gpu_check_report.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
def test_script_parses():
    subprocess.run(["bash", "-n", str(BENCH / "gpu_check.sh")], check=True)


def test_record_of_a_run_cut_short(tmp_path):
    raw = tmp_path / "raw"
    raw.mkdir()
    (raw / "meta.json").write_text(json.dumps({"budget_s": 420, "model": "moon3-2b"}))
    (raw / "stages.tsv").write_text("preflight\t0\t3\t30\t\n"
                                    "gpu-tests-kernels\t124\t120\t120\ttimed out after 120 s\n"
                                    "bench-kernels\t-\t-\t-\tskipped: no time left\n")
    (raw / "gpu-tests-kernels.log").write_text(
        "============ test session starts ============\n"
        "tests/test_rope.py::test_rope_gpu_size[dtype0] PASSED                    [  2%]\n"
        "tests/test_varlen_attention.py::test_edge_cases_gpu[False-lengths0-dtype0] FAILED [  4%]\n"
        "tests/test_fused_gemm.py::test_fused_gemm_gpu_size[dtype0-1] SKIPPED (needs CUDA) [  6%]\n"
        "tests/test_fused_gemm.py::test_fused_gemm_gpu_size[dtype0-1000] ")  # killed mid-test
    (tmp_path / "summary.txt").write_text("")
    assert _report_module().main([str(tmp_path)]) == 0
    record = json.loads((tmp_path / "gpu_check.json").read_text())
    assert record["budget_s"] == 420
    assert [s["stage"] for s in record["stages"]] == ["preflight", "gpu-tests-kernels", "bench-kernels"]
    assert record["stages"][1]["timed_out"] and record["stages"][2]["rc"] is None
    tests = record["tests"]["gpu-tests-kernels"]
    assert tests["counts"] == {"passed": 1, "failed": 1, "skipped": 1}
    assert tests["unfinished"] == "tests/test_fused_gemm.py::test_fused_gemm_gpu_size[dtype0-1000]"
    assert tests["results"][1] == {"test": "tests/test_varlen_attention.py::test_edge_cases_gpu[False-lengths0-dtype0]",
                                   "outcome": "failed"}
    assert "gpu_check.json" in record["files"] and not (tmp_path / "gpu_check.json.tmp").exists()
