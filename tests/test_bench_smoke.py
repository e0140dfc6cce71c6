"""bench/throughput.py runs end to end on the tiny model, and its FLOP count matches a hand count."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from moon3rt.config import FireConfig, FusionConfig, Moon3Config, Moon3HeadConfig, TextConfig, VisionConfig

THROUGHPUT = Path(__file__).resolve().parent.parent / "bench" / "throughput.py"


@pytest.fixture(scope="module")
def throughput():
    spec = importlib.util.spec_from_file_location("bench_throughput", THROUGHPUT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_throughput_smoke(throughput, tmp_path):
    report = throughput.main([
        "--model", "moon3-tiny-random", "--device", "cpu", "--dtype", "fp32", "--batch-sizes", "2",
        "--duration", "0.2", "--warmup", "0.05", "--items", "4", "--backends", "torch,transformers",
        "--out-dir", str(tmp_path),
    ])
    files = list(tmp_path.glob("throughput-cpu-*.json"))
    assert len(files) == 1
    saved = json.loads(files[0].read_text())
    for key in ("schema", "timestamp", "environment", "config", "workload", "flops", "ceiling", "preprocess",
                "checks", "results", "single_item", "end_to_end", "skipped", "goals", "files"):
        assert key in saved, key
    for key in ("device_name", "driver", "cuda", "torch", "triton", "transformers", "git_commit"):
        assert key in saved["environment"], key
    assert saved["config"]["batch_sizes"] == [2] and saved["config"]["model"] == "moon3-tiny-random"
    assert saved["ceiling"]["tflops"] > 0
    assert saved["flops"]["per_item"] > 0

    assert {c["backend"] for c in saved["checks"] if c["passed"]} == {"torch", "transformers"}
    rows = {r["backend"]: r for r in saved["results"]}
    assert set(rows) == {"torch", "transformers"}
    for row in rows.values():
        assert row["batch_size"] == 2
        for key in ("items_per_s", "tokens_per_s", "tflops", "pct_roofline", "peak_memory_mib"):
            assert row[key] > 0, key
        assert 0 < row["latency_ms"]["p50"] <= row["latency_ms"]["p99"]
    assert saved["single_item"]["torch"]["p50_ms"] > 0
    assert saved["end_to_end"][0]["items_per_s"] > 0
    assert saved["preprocess"]["jpeg"]["images_per_s_per_core"] > 0
    assert saved["preprocess"]["png"]["images_per_s_per_core"] > 0
    assert Path(saved["files"]["png"]).is_file() and Path(saved["files"]["png"]).stat().st_size > 0
    assert report["results"] == saved["results"]


def _config(depth=0, layers=0, moon3=None) -> Moon3Config:
    return Moon3Config(
        vision=VisionConfig(depth=depth, embed_dim=8, hidden_size=16, mlp_ratio=4.0, num_heads=2),
        text=TextConfig(vocab_size=32, hidden_size=16, intermediate_size=24, num_hidden_layers=layers,
                        num_attention_heads=2, num_key_value_heads=1, mrope_section=[1, 1, 2]),
        moon3=moon3, image_token_id=1, video_token_id=2, vision_start_token_id=3, vision_end_token_id=4,
    )


def test_flops_one_gemm(throughput):
    """No image, no layers: only the projection, one (1 x 16) @ (16 x 4) GEMM = 2*1*4*16."""
    cfg = _config(moon3=Moon3HeadConfig(embed_token_id=5, fire=None, fusion=None, projection_dim=4))
    assert throughput.flops_per_item(cfg, [], n_tokens=0) == 2 * 1 * 4 * 16


def test_flops_one_decoder_layer(throughput):
    """L=5 tokens, d=16, one KV head of width 8, I=24."""
    hand = (
        2 * 5 * 16 * 16  # q
        + 2 * 5 * 16 * 8 * 2  # k, v
        + 2 * 5 * 16 * 16  # o
        + 3 * 2 * 5 * 16 * 24  # gate, up, down
        + 2 * (5 * 6 // 2) * 16 * 2  # causal Q K^T and A V: 15 query-key pairs, 2*16 each
    )
    assert throughput.flops_per_item(_config(layers=1), [], n_tokens=5) == hand == 20160


def test_flops_vision_block_and_merger(throughput):
    """One 2x2-patch image (N=4, one merged token), one vision block, d_v=8, mlp 32, d=16."""
    patch = 2 * 4 * (3 * 2 * 14 * 14) * 8
    block = 2 * 4 * 8 * 24 + 2 * 4 * 8 * 8 + 2 * 4 * 8 * 32 * 2 + 2 * (4 * 4) * 8 * 2
    merger = 2 * 1 * 32 * 32 + 2 * 1 * 32 * 16
    parts = throughput.flop_breakdown(_config(depth=1), 4, n_tokens=0)
    assert parts["vision"] == patch + block and parts["merger"] == merger
    assert throughput.flops_per_item(_config(depth=1), [4], 0) == patch + block + merger


def test_flops_moon3_heads(throughput):
    """FIRE (rank 2, one layer) and MHMF (2 heads of 4) on one merged token plus 3 title tokens."""
    heads = Moon3HeadConfig(embed_token_id=5, fire=FireConfig(layers=[0], rank=2),
                            fusion=FusionConfig(num_heads=2, head_dim=4), projection_dim=None)
    parts = throughput.flop_breakdown(_config(layers=1, moon3=heads), 4, n_tokens=6, n_title=3)
    assert parts["fire"] == 2 * 1 * 32 * 2 + 2 * 1 * 2 * 16
    n_x = 1 + 3
    assert parts["fusion"] == (2 * 16 * 8 + 2 * 16 * 4 + 2 * 2 * n_x * 16 * 8 + 2 * 2 * n_x * 8 + 2 * 8 * 16)
    assert parts["projection"] == 0


def test_flops_2b_reference_item(throughput):
    """DESIGN.md section 4: about 2.3 TFLOP per 448x448 item + ~32 title tokens, ~65% in the vision tower."""
    cfg = Moon3Config.from_name("moon3-2b")
    parts = throughput.flop_breakdown(cfg, 1024, n_tokens=256 + 22 + 32, n_title=32)
    total = sum(parts.values())
    assert 2.2e12 < total < 2.4e12
    assert 0.6 < (parts["vision"] + parts["merger"]) / total < 0.7


def test_reasoning_smoke(throughput, tmp_path):
    report = throughput.main([
        "--model", "moon3-tiny-random", "--device", "cpu", "--dtype", "fp32", "--batch-sizes", "2", "--items", "4",
        "--backends", "torch", "--skip-peers", "--reasoning-only", "--reasoning-tokens", "3", "--no-plot",
        "--out-dir", str(tmp_path),
    ])
    assert report["results"] == [], "--reasoning-only times reasoning mode alone"
    (row,) = report["reasoning"]
    assert row["backend"] == "torch" and row["batch_size"] == 2 and row["items"] == 4
    assert 0 < row["generated_tokens"] <= 4 * 3, "the budget bounds what is generated"
    assert row["items_per_s"] > 0 and row["generated_tokens_per_s"] > 0 and row["decode_steps"] > 0
    assert report["bandwidth_gbs"] > 0 and row["decode_pct_bandwidth"] > 0
