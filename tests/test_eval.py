"""moon3rt eval: metrics on hand-built rankings, chunked search, zero-shot accuracy, the CLI end to end,
reasoning mode beside direct mode with the generated attributes scored by hand."""

import json
import math

import numpy as np
import pytest
import torch

import moon3rt
from moon3rt.api import Encoder
from moon3rt.cli import main
from moon3rt.eval import generated_attribute_accuracy, retrieval_metrics, search, zero_shot_accuracy
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
    lines = [json.loads(line) for line in (directory / "queries.jsonl").read_text().splitlines()[:-2]]
    detail = [q for q in lines if q["kind"] == "text" and any(
        q["attributes"].get(f, "none") not in ("none", "0") for f in ("logo", "buttons", "stitching", "strap"))]
    assert detail, "the held-out world's text queries name fine details"
    assert report["products"] == 8 and set(report["kinds"]) == {"text", "title", "image", "product", "text/detail"}
    assert report["kinds"]["image"]["queries"] == 8
    assert report["kinds"]["text/detail"]["queries"] == len(detail) < report["kinds"]["text"]["queries"]
    assert 0.0 <= report["zero_shot"]["colour"]["accuracy"] <= 1.0
    assert out.with_suffix(".png").exists()


def test_eval_zero_shot_by_input_classifies_each_input_alone(tmp_path, capsys):
    directory = write_split(WorldSpec(seed=1, heldout_products=8, size=56), "heldout", tmp_path / "w",
                            show_progress=False)
    out = tmp_path / "report.json"
    assert main(["eval", "--model", "moon3-tiny-random", "--products", str(directory / "products.jsonl"),
                 "--queries", str(directory / "queries.jsonl"), "--output", str(out), "--no-progress",
                 "--zero-shot-by-input"]) == 0
    assert "zero-shot from one input (8 products" in capsys.readouterr().out
    by_input = json.loads(out.read_text())["zero_shot_by_input"]
    # the same figures computed here from the model's vectors of each input alone
    encoder = moon3rt.load("moon3-tiny-random")
    products = [json.loads(line) for line in (directory / "products.jsonl").read_text().splitlines()]
    truth = [p["attributes"] for p in products]
    colours = sorted({a["colour"] for a in truth})
    prompts = {"colour": (colours, encoder.encode([f"colour: {c}" for c in colours]))}
    views = {"both": [{"text": p["text"], "image": directory / p["image"]} for p in products],
             "image": [{"image": directory / p["image"]} for p in products],
             "text": [p["text"] for p in products]}
    for view, items in views.items():
        want = zero_shot_accuracy(encoder.encode(items), truth, prompts)["colour"]
        assert by_input[view]["colour"] == pytest.approx(want), view
    assert by_input["products"] == 8
    assert by_input["both"]["colour"] == json.loads(out.read_text())["zero_shot"]["colour"]


# ------------------------------------------------------------------------ --reasoning
PRODUCTS = [  # title, ground truth, the reasoning text the model is made to write
    ("Navy tee", {"category": "t-shirt", "colour": "navy"}, "category: T-Shirt; colour: red"),
    ("White mug", {"category": "mug", "colour": "white", "material": "ceramic"},
     "category: mug\ncolour: white; material: glass"),
    ("Black backpack", {"category": "backpack", "colour": "Black"}, "colour: black; category: bag; colour: red"),
    ("Gift card", None, "category: mug"),  # no ground truth: not counted
]


def test_generated_attribute_accuracy_by_hand():
    texts = [t for _, _, t in PRODUCTS] + [None]  # a failed product has no text: not counted
    truths = [a for _, a, _ in PRODUCTS] + [{"category": "mug"}]
    acc = generated_attribute_accuracy(texts, truths)
    assert list(acc) == ["category", "colour", "material"]
    assert acc["category"] == {"accuracy": pytest.approx(2 / 3), "stated": 1.0, "products": 3}
    assert acc["colour"] == {"accuracy": pytest.approx(2 / 3), "stated": 1.0, "products": 3}  # first value wins
    assert acc["material"] == {"accuracy": 0.0, "stated": 1.0, "products": 1}


def test_eval_cli_reasoning_reports_both_modes_and_generated_attributes(tmp_path, capsys, monkeypatch):
    products, queries = tmp_path / "products.jsonl", tmp_path / "queries.jsonl"
    products.write_text("".join(json.dumps({"id": f"p{i}", "text": t, **({"attributes": a} if a else {})}) + "\n"
                                for i, (t, a, _) in enumerate(PRODUCTS)))
    queries.write_text("".join(json.dumps({"id": f"q{i}", "text": t.lower(), "relevant": [f"p{i}"]}) + "\n"
                               for i, (t, _, _) in enumerate(PRODUCTS)))
    written = {title: text for title, _, text in PRODUCTS}
    calls = []
    real = Encoder.encode_with_report

    def encode_with_report(self, items, *args, **kwargs):
        items = list(items)
        calls.append((kwargs.get("reasoning"), kwargs.get("max_reasoning_tokens"), len(items)))
        result = real(self, items, *args, **kwargs)
        if kwargs.get("reasoning"):
            assert all(isinstance(t, str) for t in result.reasoning)  # the model's own texts, replaced below
            result.reasoning = [written.get(item["text"], t) for item, t in zip(items, result.reasoning)]
        return result

    monkeypatch.setattr(Encoder, "encode_with_report", encode_with_report)
    out = tmp_path / "report.json"
    assert main(["eval", "--model", "moon3-tiny-random", "--products", str(products), "--queries", str(queries),
                 "--reasoning", "--max-reasoning-tokens", "2", "--output", str(out), "--no-progress"]) == 0
    assert calls == [(False, None, 4), (False, None, 4), (True, 2, 4), (True, 2, 4)]  # direct, then reasoning
    table = capsys.readouterr().out
    assert "Direct mode" in table and "Reasoning mode (up to 2 tokens)" in table and "generated attribute" in table
    report = json.loads(out.read_text())
    r = report["reasoning"]
    assert r["max_tokens"] == 2 and r["products"] == 4 and r["kinds"]["text"]["queries"] == 4
    assert set(report["kinds"]) == set(r["kinds"]) == {"text"}
    acc = r["attributes"]
    assert acc["category"]["accuracy"] == pytest.approx(2 / 3) and acc["category"]["products"] == 3
    assert acc["colour"]["accuracy"] == pytest.approx(2 / 3) and acc["material"]["accuracy"] == 0.0


def test_eval_cli_reasoning_refuses_a_model_that_cannot_reason(tmp_path, capsys):
    from moon3rt.api import TINY_TOKENIZER
    from moon3rt.config import Moon3Config
    from moon3rt.model import random_model
    from moon3rt.train.loop import save_checkpoint

    cfg = Moon3Config.from_name("moon3-tiny-random")
    cfg.moon3.pooling, cfg.moon3.embed_token_id = "mean", None
    model = save_checkpoint(random_model(cfg.validate()), tmp_path / "no_emb", TINY_TOKENIZER)
    (tmp_path / "p.jsonl").write_text(json.dumps({"id": "p", "text": "mug"}) + "\n")
    (tmp_path / "q.jsonl").write_text(json.dumps({"id": "q", "text": "mug", "relevant": ["p"]}) + "\n")
    assert main(["eval", "--model", str(model), "--products", str(tmp_path / "p.jsonl"), "--queries",
                 str(tmp_path / "q.jsonl"), "--reasoning", "--output", str(tmp_path / "r.json")]) == 2
    assert "error: --reasoning: this model cannot run reasoning mode" in capsys.readouterr().err
    assert not (tmp_path / "r.json").exists()
