"""The world's products, splits and files: who exists, what they are called, how they look.

A product is one full attribute combination. The held-out split owns a fixed share of the
(category, colour, pattern) triples: no training product has one of them, so held-out
products are combinations a model has never seen (every single value it has seen).
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from .attributes import CATEGORIES, COLOURS, PATTERNS, attribute_values, matches
from .render import render
from .text import attribute_prompt, short_query, title

SPLITS = {"train": 0, "heldout": 1}
DETAIL_KEYS = ("logo", "buttons", "stitching", "strap")


@dataclass(frozen=True)
class WorldSpec:
    """How big the world is; the seed fixes everything else."""

    seed: int = 0
    train_products: int = 3000
    heldout_products: int = 1200
    heldout_fraction: float = 0.2  # share of (category, colour, pattern) triples held out
    image_queries: int = 2  # re-renderings per training product used as image queries
    text_queries: int = 3  # short attribute queries per training product
    size: int = 112  # image side in pixels


def heldout_triples(seed: int, fraction: float) -> set[tuple[str, str, str]]:
    triples = [(c, k, p) for c in CATEGORIES for k in COLOURS for p in PATTERNS]
    order = np.random.default_rng([seed, 7]).permutation(len(triples))
    return {triples[i] for i in order[: int(round(fraction * len(triples)))]}


def _draw_attributes(rng: np.random.Generator, triple: tuple[str, str, str]) -> dict[str, str]:
    category, colour, pattern = triple
    values = attribute_values(category)
    a = {"category": category, "colour": colour, "pattern": pattern}
    for key, options in values.items():
        if key not in a:
            a[key] = options[int(rng.integers(len(options)))]
    if a["logo"] == "none":
        del a["logo colour"]
    return a


def products(spec: WorldSpec, split: str) -> list[dict]:
    """The split's products: ``{"id", "attributes"}``, distinct attribute combinations, in id order."""
    held = heldout_triples(spec.seed, spec.heldout_fraction)
    pool = sorted(held) if split == "heldout" else sorted(
        (c, k, p) for c in CATEGORIES for k in COLOURS for p in PATTERNS if (c, k, p) not in held)
    count = spec.heldout_products if split == "heldout" else spec.train_products
    rng = np.random.default_rng([spec.seed, SPLITS[split], 1])
    seen, out = set(), []
    for _ in range(count * 20):
        if len(out) == count:
            break
        a = _draw_attributes(rng, pool[int(rng.integers(len(pool)))])
        key = tuple(sorted(a.items()))
        if key not in seen:
            seen.add(key)
            out.append({"id": f"{split}-{len(out):05d}", "attributes": a})
    return out


def _informative(a: dict[str, str]) -> list[str]:
    """Attributes a query can name: details only when present (no "logo: none" queries)."""
    keys = ["category", "colour", "material", "pattern"]
    keys += [k for k in DETAIL_KEYS if k in a and a[k] not in ("none", "0")]
    return keys


def _query_attributes(a: dict[str, str], keys: list[str]) -> dict[str, str]:
    q = {k: a[k] for k in keys}
    if "logo" in keys and "logo colour" in a:
        q["logo colour"] = a["logo colour"]
    return q


def _text_queries(product: dict, rng: np.random.Generator, count: int, heldout: bool) -> list[dict]:
    a = product["attributes"]
    keys = _informative(a)
    out = []
    for _ in range(count):
        if heldout:  # specific enough that a few products at most match
            chosen = ["category", "colour", "pattern", "material"]
            details = [k for k in keys if k in DETAIL_KEYS]
            if details and rng.random() < 0.5:
                chosen.append(details[int(rng.integers(len(details)))])
        elif rng.random() < 0.25:  # the zero-shot prompt form, one attribute
            key = keys[int(rng.integers(len(keys)))] if rng.random() < 0.5 else list(a)[int(rng.integers(len(a)))]
            out.append({"text": attribute_prompt(key, a[key]), "attributes": {key: a[key]}})
            continue
        else:
            n = int(rng.integers(1, min(5, len(keys)) + 1))
            chosen = [keys[i] for i in sorted(rng.choice(len(keys), n, replace=False))]
        q = _query_attributes(a, chosen)
        out.append({"text": short_query(a, chosen, rng), "attributes": q})
    return out


def _write_jsonl(path: Path, rows) -> None:
    """Atomically: a crash never leaves a half-written file under the final name."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    os.replace(tmp, path)


def write_split(spec: WorldSpec, split: str, directory: str | os.PathLike, show_progress: bool = True) -> Path:
    """Render the split into ``directory``: products.jsonl, queries.jsonl and images/.

    products.jsonl: ``{"id", "text", "image", "attributes"}`` (encode input plus ground truth).
    queries.jsonl: ``{"id", "kind", "text" | "image" | both, "relevant", "attributes"?}``; kinds are
    ``text`` (short attribute query), ``title`` (another title of the product), ``image`` (the
    product drawn again) and, held out only, ``product`` (image and title, product to product).
    """
    directory = Path(directory)
    (directory / "images").mkdir(parents=True, exist_ok=True)
    heldout = split == "heldout"
    items = products(spec, split)
    rows, queries = [], []
    for n, product in enumerate(tqdm(items, desc=f"world {split}", disable=not show_progress, unit="product")):
        pid, a = product["id"], product["attributes"]
        rng = np.random.default_rng([spec.seed, SPLITS[split], 2, n])
        views = spec.image_queries if not heldout else 2  # held out: one image query, one product query
        for v in range(views + 1):
            path = directory / "images" / f"{pid}-{v}.jpg"
            if not path.exists():
                render(a, [spec.seed, SPLITS[split], 3, n, v], size=spec.size).save(path, quality=95)
        rows.append({"id": pid, "text": title(a, rng), "image": f"images/{pid}-0.jpg", "attributes": a})
        texts = _text_queries(product, rng, 1 if heldout else spec.text_queries, heldout)
        for k, q in enumerate(texts):
            queries.append({"id": f"{pid}-q{k}", "kind": "text", **q, "relevant": [pid]})
        queries.append({"id": f"{pid}-title", "kind": "title", "text": title(a, rng), "relevant": [pid],
                        "attributes": a})
        queries.append({"id": f"{pid}-image", "kind": "image", "image": f"images/{pid}-1.jpg", "relevant": [pid],
                        "attributes": a})
        if heldout:
            queries.append({"id": f"{pid}-product", "kind": "product", "text": title(a, rng),
                            "image": f"images/{pid}-2.jpg", "relevant": [pid], "attributes": a})
        else:
            for v in range(2, views + 1):
                queries.append({"id": f"{pid}-image{v}", "kind": "image", "image": f"images/{pid}-{v}.jpg",
                                "relevant": [pid], "attributes": a})
    if heldout:  # every product matching a text query's attributes is relevant to it
        by_category: dict[str, list[dict]] = {}
        for row in rows:
            by_category.setdefault(row["attributes"]["category"], []).append(row)
        for q in queries:
            if q["kind"] == "text":
                pool = by_category.get(q["attributes"].get("category"), rows)
                q["relevant"] = [r["id"] for r in pool if matches(q["attributes"], r["attributes"])]
    _write_jsonl(directory / "products.jsonl", rows)
    _write_jsonl(directory / "queries.jsonl", queries)
    return directory


def write_world(spec: WorldSpec, directory: str | os.PathLike, splits=("train", "heldout"),
                show_progress: bool = True) -> dict[str, Path]:
    """Write each split under ``directory/<split>/``; returns the split directories."""
    directory = Path(directory)
    return {s: write_split(spec, s, directory / s, show_progress) for s in splits}
