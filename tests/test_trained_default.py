"""The embedded default: `load("moon3-tiny")` is the trained checkpoint shipped in the package."""

import json
from pathlib import Path

import numpy as np

import moon3rt
from moon3rt.api import TRAINED_DEFAULT

CATALOGUE = Path(moon3rt.__file__).parent / "assets" / "catalogue"
# Every sample query of the demo; "red cotton t-shirt" must beat the navy cotton t-shirt
# (sku-002), which the previous default ranked first.
RIGHT = {"red cotton t-shirt": "sku-001", "leather shoes": "sku-004", "coffee mug": "sku-008",
         "denim jacket": "sku-007"}


def test_default_is_the_shipped_trained_checkpoint():
    assert (TRAINED_DEFAULT / "model.safetensors").stat().st_size <= 20 * 2**20
    trained, random = moon3rt.load("moon3-tiny"), moon3rt.load("moon3-tiny-random")
    assert trained.name == "moon3-tiny" and trained.config.moon3 is not None
    assert trained.config.to_dict()["text_config"] == random.config.to_dict()["text_config"]
    a, b = trained.model.state_dict(), random.model.state_dict()
    assert a.keys() == b.keys() and any(not np.allclose(a[k], b[k]) for k in a)


def best_matches(queries):
    encoder = moon3rt.load("moon3-tiny")
    rows = [json.loads(line) for line in (CATALOGUE / "items.jsonl").read_text().splitlines() if line.strip()]
    products = encoder.encode([{"text": r["text"], "image": CATALOGUE / r["image"]} for r in rows])
    best = (encoder.encode(list(queries)) @ products.T).argmax(1)
    return {q: rows[i]["id"] for q, i in zip(queries, best)}


def test_sample_queries_find_their_products():
    assert best_matches(RIGHT) == RIGHT
