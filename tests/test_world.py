"""The product world: deterministic per seed, held-out combinations never in training, files as documented."""

import json

import numpy as np
import pytest

from moon3rt.world import CATEGORIES, COLOURS, WorldSpec, heldout_triples, matches, products, render, write_split
from moon3rt.world.attributes import attribute_values

SPEC = WorldSpec(seed=3, train_products=40, heldout_products=24, size=56)


def test_vocabulary_is_as_wide_as_promised():
    assert len(CATEGORIES) >= 12 and len(COLOURS) >= 12
    for near in (("navy", "blue"), ("burgundy", "red"), ("beige", "white")):
        assert set(near) <= set(COLOURS)


@pytest.mark.parametrize("category", CATEGORIES)
def test_every_category_renders_deterministically(category):
    a = {k: v[-1] for k, v in attribute_values(category).items()}
    one, again, other = (np.asarray(render(a, seed, size=56)) for seed in (1, 1, 2))
    assert one.shape == (56, 56, 3)
    assert (one == again).all()
    assert (one != other).any()  # another rendering of the same product differs


def test_products_are_deterministic_per_seed_and_distinct():
    a, b = products(SPEC, "train"), products(SPEC, "train")
    assert a == b
    assert products(WorldSpec(seed=4, train_products=40), "train") != a
    combos = [tuple(sorted(p["attributes"].items())) for p in a]
    assert len(set(combos)) == len(combos)


def test_heldout_triples_never_appear_in_training():
    held = heldout_triples(SPEC.seed, SPEC.heldout_fraction)
    train = products(WorldSpec(seed=SPEC.seed, train_products=2000), "train")
    triple = lambda p: (p["attributes"]["category"], p["attributes"]["colour"], p["attributes"]["pattern"])
    assert not any(triple(p) in held for p in train)
    assert all(triple(p) in held for p in products(SPEC, "heldout"))
    seen = {v for p in train for v in p["attributes"].values()}
    assert {c for c, _, _ in held} <= seen and {k for _, k, _ in held} <= seen  # values seen, combos not


def test_split_files_are_identical_per_seed(tmp_path):
    first = write_split(SPEC, "heldout", tmp_path / "a", show_progress=False)
    second = write_split(SPEC, "heldout", tmp_path / "b", show_progress=False)
    for name in ("products.jsonl", "queries.jsonl"):
        assert (first / name).read_bytes() == (second / name).read_bytes()
    images = sorted(p.name for p in (first / "images").iterdir())
    assert images and images == sorted(p.name for p in (second / "images").iterdir())
    assert all((first / "images" / n).read_bytes() == (second / "images" / n).read_bytes() for n in images[:10])

    rows = [json.loads(line) for line in (first / "products.jsonl").read_text().splitlines()]
    assert {"id", "text", "image", "attributes"} <= set(rows[0])
    queries = [json.loads(line) for line in (first / "queries.jsonl").read_text().splitlines()]
    assert {q["kind"] for q in queries} == {"text", "title", "image", "product"}
    by_id = {r["id"]: r["attributes"] for r in rows}
    for q in queries:
        if q["kind"] == "text":  # every matching product, and only those, is relevant
            assert set(q["relevant"]) == {pid for pid, a in by_id.items() if matches(q["attributes"], a)}
        assert q["relevant"] and all(pid in by_id for pid in q["relevant"])
