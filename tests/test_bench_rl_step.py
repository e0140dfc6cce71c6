"""bench/rl_step.py runs one RL step end to end on the tiny model and reports consistent figures."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

RL_STEP = Path(__file__).resolve().parent.parent / "bench" / "rl_step.py"


def test_rl_step_benchmark_smoke(tmp_path):
    spec = importlib.util.spec_from_file_location("bench_rl_step", RL_STEP)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    out = tmp_path / "rl.json"
    module.main(["--device", "cpu", "--pairs", "2", "--rollouts", "2", "--max-tokens", "3", "--steps", "1",
                 "--out", str(out)])
    report = json.loads(out.read_text())
    assert report["config"]["model"] == "moon3-tiny" and report["config"]["dtype"] == "float32"
    for key in ("device_name", "torch", "git_commit", "load_average"):
        assert key in report["environment"], key
    (step,) = report["steps"]
    assert sum(step["stops"].values()) == 2 * 2 * 2  # both sides, 2 pairs, 2 rollouts
    assert 0 < step["drawn_tokens"] <= 2 * 2 * 2 * 3
    assert step["draw_s"] <= step["collect_s"] <= step["step_s"]
    assert report["items_per_s"] == 2 * report["pairs_per_s"] > 0
    assert report["rollout_tokens_per_s"] > 0
