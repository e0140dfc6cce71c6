"""moon3rt eval: metrics on hand-built rankings, chunked search, zero-shot accuracy, the CLI end to end."""

import json
import math

import numpy as np
import pytest
import torch

from moon3rt.cli import main
from moon3rt.eval import retrieval_metrics, search, zero_shot_accuracy
from moon3rt.world import WorldSpec, write_split


def test_metrics_equal_hand_computed_values():
    ranked = [[3, 1, 2, 0, 4, 5, 6, 7, 8, 9],  # relevant {1}: found at rank 2
              [0, 1, 2, 3, 4, 5, 6, 7, 8, 9],  # relevant {0, 5}: ranks 1 and 6
              [9, 8, 7, 6, 5, 4, 3, 2, 1, 0]]  # relevant {11}: never found
    relevant = [{1}, {0, 5}, {11}]
    m = retrieval_metrics(ranked, relevant)
    assert m["recall@1"] == pytest.approx((0 + 0.5 + 0) / 3)
    assert m["recall@5"] == pytest.approx((1 + 0.5 + 0) / 3)
    assert m["recall@10"] == pytest.approx((1 + 1 + 0) / 3)
    assert m["mrr@10"] == pytest.approx((1 / 2 + 1 + 0) / 3)
    ndcg_1 = (1 / math.log2(3)) / 1.0
    ndcg_2 = (1 + 1 / math.log2(7)) / (1 + 1 / math.log2(3))
    assert m["ndcg@10"] == pytest.approx((ndcg_1 + ndcg_2 + 0) / 3)


def test_chunked_search_equals_full_sort():
    g = torch.Generator().manual_seed(0)
    q = torch.nn.functional.normalize(torch.randn(37, 16, generator=g), dim=-1)
    p = torch.nn.functional.normalize(torch.randn(101, 16, generator=g), dim=-1)
    scores, index = search(q, p, k=10, query_chunk=7, product_chunk=13)
    full = (q @ p.t()).topk(10, dim=1)
    assert torch.equal(index, full.indices)
    assert torch.allclose(scores, full.values)


def test_zero_shot_accuracy_counts_the_best_prompt():
    products = np.array([[1.0, 0.0], [0.0, 1.0], [0.8, 0.6], [np.nan, np.nan]], np.float32)
    attributes = [{"colour": "red"}, {"colour": "blue"}, {"colour": "blue"}, {"colour": "red"}]
    prompts = {"colour": (["blue", "red"], np.array([[0.0, 1.0], [1.0, 0.0]], np.float32))}
    z = zero_shot_accuracy(products, attributes, prompts)["colour"]
    assert z["products"] == 3 and z["accuracy"] == pytest.approx(2 / 3) and z["chance"] == 0.5


def test_eval_cli_reports_table_json_and_missing_ids(tmp_path, capsys):
    directory = write_split(WorldSpec(seed=1, heldout_products=8, size=56), "heldout", tmp_path / "w",
                            show_progress=False)
    queries = directory / "queries.jsonl"
    with open(queries, "a") as f:
        f.write(json.dumps({"id": "ghost", "text": "navy tee", "relevant": ["no-such-product"]}) + "\n")
        f.write("{not json\n")
    out = tmp_path / "report.json"
    assert main(["eval", "--model", "moon3-tiny-random", "--products", str(directory / "products.jsonl"),
                 "--queries", str(queries), "--output", str(out), "--no-progress"]) == 0
    captured = capsys.readouterr()
    assert "recall@10" in captured.out and "zero-shot attribute" in captured.out
    assert "no-such-product" in captured.err and "not valid JSON" in captured.err
    report = json.loads(out.read_text())
    assert report["products"] == 8 and set(report["kinds"]) == {"text", "title", "image", "product"}
    assert report["kinds"]["image"]["queries"] == 8
    assert 0.0 <= report["zero_shot"]["colour"]["accuracy"] <= 1.0
    assert out.with_suffix(".png").exists()
