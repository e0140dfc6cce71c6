"""bench/ablation.py: the table reads the eval reports, and finished rows are reused, not retrained."""

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import ablation  # noqa: E402


def report(text_r10, colour):
    return {"kinds": {"text": {"recall@10": text_r10}}, "zero_shot": {"colour": {"accuracy": colour}}}


def test_table_has_one_row_per_run_and_a_dash_for_what_a_run_lacks():
    lines = ablation.table({"full": report(0.5, 0.25), "no FIRE": report(0.125, 0.0)}, steps=7).splitlines()
    assert lines[0].startswith("| row (7 steps) | text R@10 | image R@1 |")
    full, nofire = (line.split(" | ") for line in lines[2:])
    assert full[0] == "| full" and full[1] == "0.500" and full[2] == "-" and full[5] == "0.250"
    assert nofire[1] == "0.125" and nofire[5] == "0.000"


def test_finished_rows_are_reused(tmp_path, monkeypatch):
    for slug, value in (("full", 0.75), ("no-fire", 0.5)):
        (tmp_path / slug / "final").mkdir(parents=True)
        (tmp_path / slug / "final" / "model.safetensors").write_bytes(b"")
        (tmp_path / slug / "eval.json").write_text(json.dumps(report(value, 0.1)))
    monkeypatch.setattr(ablation, "run", lambda cmd: pytest.fail(f"ran {cmd}"))
    assert ablation.main(["--out", str(tmp_path), "--rows", "full,no FIRE", "--steps", "3"]) == 0
    saved = json.loads((tmp_path / "ablation.json").read_text())
    assert saved["steps"] == 3 and list(saved["rows"]) == ["full", "no FIRE"]
    assert "| no FIRE | 0.500 |" in (tmp_path / "ablation.md").read_text()


def test_unknown_row_is_refused(tmp_path):
    with pytest.raises(SystemExit):
        ablation.main(["--out", str(tmp_path), "--rows", "no such row"])


def test_rl_rows_reuse_finished_runs_and_read_reasoning_columns(tmp_path, monkeypatch):
    import rl_ablation

    def rl_report(direct, reasoning, colour):
        return {"kinds": {"text": {"recall@10": direct}},
                "reasoning": {"kinds": {"text": {"recall@10": reasoning}},
                              "attributes": {"colour": {"accuracy": colour}}}}

    for slug, values in (("sft", (0.5, 0.25, 0.75)), ("joint-rl", (0.625, 0.5, 0.875))):
        (tmp_path / slug).mkdir(parents=True)
        (tmp_path / slug / "eval.json").write_text(json.dumps(rl_report(*values)))
    (tmp_path / "joint-rl" / "final").mkdir()
    (tmp_path / "joint-rl" / "final" / "model.safetensors").write_bytes(b"")
    monkeypatch.setattr(ablation, "run", lambda cmd: pytest.fail(f"ran {cmd}"))  # trains and evaluates
    assert rl_ablation.main(["--sft", "unused", "--data", "unused", "--out", str(tmp_path),
                             "--rows", "SFT,joint RL", "--steps", "4"]) == 0
    lines = (tmp_path / "rl_ablation.md").read_text().splitlines()
    assert lines[0].startswith("| row (4 steps) | text R@10 | reasoning text R@10 |")
    assert lines[2].startswith("| SFT | 0.500 | 0.250 | - |") and "| 0.750 |" in lines[2]
    assert lines[3].startswith("| joint RL | 0.625 | 0.500 | - |") and "| 0.875 |" in lines[3]
    with pytest.raises(SystemExit):
        rl_ablation.main(["--sft", "x", "--data", "x", "--out", str(tmp_path), "--rows", "no such row"])
