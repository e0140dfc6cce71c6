"""Training data: products and queries from JSON lines, batches with hard negatives, packing.

A data directory holds ``products.jsonl`` (``id``, ``text``, ``image``/``images``, optional
``attributes``) and ``queries.jsonl`` (``id``, ``text`` and/or ``image``/``images``,
``relevant``: product ids, optional ``attributes``), the layout `moon3rt.world` writes and
`moon3rt eval` reads. Image paths are relative to the file. Each query's first relevant
product is its positive; a product is also a positive for a query whose ``attributes``
it has (so "navy t-shirt" is not pushed away from every other navy t-shirt in the batch).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from moon3rt.batching import pack
from moon3rt.images import ImageError, load_image, preprocess_image
from moon3rt.jsonl import decode_line, json_lines
from moon3rt.model import PackedBatch
from moon3rt.prompt import PreparedItem, PromptBuilder
from moon3rt.world.attributes import attribute_text, matches


class DataError(ValueError):
    """Training data that cannot be used; names the file, line and reason."""


@dataclass
class Record:
    """One product or query: its text, image paths and ground-truth attributes."""

    id: str
    text: str | None
    images: list[Path]
    attributes: dict[str, str] | None = None
    positive: int = -1  # queries: index of the positive product


@dataclass
class Dataset:
    products: list[Record]
    queries: list[Record]
    problems: list[str] = field(default_factory=list)  # "file:line: reason" of every skipped line

    def __post_init__(self):
        self.by_category: dict[str, list[int]] = {}
        self.by_category_colour: dict[tuple[str, str], list[int]] = {}
        self.queries_of: list[list[int]] = [[] for _ in self.products]
        self.views_of: list[list[Path]] = [list(p.images[:1]) for p in self.products]  # renderings per product
        for i, p in enumerate(self.products):
            a = p.attributes or {}
            if "category" in a:
                self.by_category.setdefault(a["category"], []).append(i)
                if "colour" in a:
                    self.by_category_colour.setdefault((a["category"], a["colour"]), []).append(i)
        for qi, q in enumerate(self.queries):
            self.queries_of[q.positive].append(qi)
            if q.images and not (q.text and q.text.strip()) and self.views_of[q.positive]:
                self.views_of[q.positive].append(q.images[0])  # an image query: the product drawn again
        self.trainable = [i for i, qs in enumerate(self.queries_of) if qs]


def _images(obj: dict, base: Path) -> list[Path]:
    if "image" in obj and "images" in obj:
        raise ValueError("give either 'image' or 'images', not both")
    raw = obj.get("images", [obj["image"]] if obj.get("image") is not None else [])
    if not isinstance(raw, list) or not all(isinstance(x, str) for x in raw):
        raise ValueError("'image' must be a path string and 'images' a list of them")
    paths = [base / x for x in raw]
    for p in paths:
        if not p.is_file():
            raise ValueError(f"image file {p} does not exist")
    return paths


def _record(obj, base: Path) -> Record:
    if not isinstance(obj, dict):
        raise ValueError(f"expected a JSON object, got {type(obj).__name__}")
    if "id" not in obj:
        raise ValueError("no 'id'")
    text = obj.get("text")
    if text is not None and not isinstance(text, str):
        raise ValueError("'text' must be a string")
    images = _images(obj, base)
    if not images and not (text and text.strip()):
        raise ValueError("no text and no image")
    attributes = obj.get("attributes")
    if attributes is not None and not (isinstance(attributes, dict)
                                       and all(isinstance(v, str) for v in attributes.values())):
        raise ValueError("'attributes' must be an object of strings")
    return Record(str(obj["id"]), text, images, attributes)


def _read(path: Path, problems: list[str]):
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    for n, raw in json_lines(path):
        try:
            obj = decode_line(raw)
        except ValueError as err:
            problems.append(f"{path}:{n}: {err}")
            continue
        try:
            yield n, obj, _record(obj, path.parent)
        except ValueError as err:
            problems.append(f"{path}:{n}: {err}")


def read_dataset(directory: str | Path, strict: bool = False) -> Dataset:
    """Products and queries of a data directory; bad lines are listed in `problems` and skipped.

    strict: raise `DataError` naming every bad line instead. A directory with no usable
    query-product pair raises `DataError` either way.
    """
    directory = Path(directory)
    problems: list[str] = []
    products, index = [], {}
    for _, _, rec in _read(directory / "products.jsonl", problems):
        index[rec.id] = len(products)
        products.append(rec)
    queries = []
    qpath = directory / "queries.jsonl"
    for n, obj, rec in _read(qpath, problems):
        relevant = obj.get("relevant")
        if not isinstance(relevant, list) or not relevant:
            problems.append(f"{qpath}:{n}: 'relevant' must be a non-empty list of product ids")
            continue
        if str(relevant[0]) not in index:
            problems.append(f"{qpath}:{n}: relevant product {relevant[0]!r} is not in products.jsonl")
            continue
        rec.positive = index[str(relevant[0])]
        queries.append(rec)
    if strict and problems:
        raise DataError(f"{len(problems)} bad data line(s):\n  " + "\n  ".join(problems[:50]))
    if not queries:
        raise DataError(f"{directory}: no usable query-product pairs ({len(problems)} bad lines)"
                        + ("".join(f"\n  {p}" for p in problems[:20])))
    return Dataset(products, queries, problems)


# ------------------------------------------------------------------------------ batches
@dataclass
class Pairs:
    """A global batch: query indices and their positive products (distinct products)."""

    queries: list[int]
    products: list[int]
    views: list[int] = field(default_factory=list)  # per product: which rendering its attribute text is read from


def sample_pairs(data: Dataset, size: int, seed: int, step: int, hard_negatives: bool = True) -> Pairs:
    """The batch of optimizer step `step`: a function of (seed, step) alone, so a run resumes exactly.

    Hard negatives from the world: a quarter of the products are anchors, each joined by a
    product of the same category in another colour and one of the same category and colour
    that differs in material, pattern or a detail; the rest are drawn at random.
    """
    rng = np.random.default_rng([seed, step])
    pool = data.trainable
    size = min(size, len(pool))
    chosen: list[int] = []
    taken: set[int] = set()

    def take(i: int) -> None:
        if i not in taken and len(chosen) < size and data.queries_of[i]:
            taken.add(i)
            chosen.append(i)

    if hard_negatives:
        for _ in range(size // 4):
            a = pool[int(rng.integers(len(pool)))]
            take(a)
            attrs = data.products[a].attributes or {}
            if "category" not in attrs:
                continue
            same_cat = data.by_category.get(attrs["category"], [])
            other_colour = [i for i in same_cat[:: max(1, len(same_cat) // 64)]
                            if data.products[i].attributes.get("colour") != attrs.get("colour")]
            if other_colour:
                take(other_colour[int(rng.integers(len(other_colour)))])
            siblings = data.by_category_colour.get((attrs["category"], attrs.get("colour")), [])
            if len(siblings) > 1:
                take(siblings[int(rng.integers(len(siblings)))])
    while len(chosen) < size:
        take(pool[int(rng.integers(len(pool)))])
    queries = [data.queries_of[p][int(rng.integers(len(data.queries_of[p])))] for p in chosen]
    views = [int(rng.integers(max(len(data.views_of[p]), 1))) for p in chosen]
    return Pairs(queries, chosen, views)


def positive_mask(data: Dataset, pairs: Pairs) -> torch.Tensor:
    """(B, B) bool: query i and product j belong together (its own product, or one with its attributes)."""
    n = len(pairs.queries)
    mask = torch.eye(n, dtype=torch.bool)
    for i, qi in enumerate(pairs.queries):
        qa = data.queries[qi].attributes
        if not qa:
            continue
        for j, pj in enumerate(pairs.products):
            pa = data.products[pj].attributes
            if pa and matches(qa, pa):
                mask[i, j] = True
    return mask


class Preparer:
    """Records to `PreparedItem`s for one model: images resized and patchified as the runtime does."""

    def __init__(self, prompt: PromptBuilder):
        self.prompt, self.cfg = prompt, prompt.cfg
        self.plan = prompt.reasoning_plan() if not prompt.reasoning_problems() else None

    def _images(self, rec: Record):
        cfg, v = self.cfg, self.cfg.vision
        out = []
        for path in rec.images:
            try:
                image = load_image(path, target_pixels=cfg.max_pixels)
            except ImageError as err:
                raise DataError(f"{rec.id}: image {path}: {err}") from None
            out.append(preprocess_image(image, min_pixels=cfg.min_pixels, max_pixels=cfg.max_pixels,
                                        patch_size=v.patch_size, merge_size=v.spatial_merge_size,
                                        temporal_patch_size=v.temporal_patch_size))
        return out

    def item(self, rec: Record, reasoning: bool = False) -> PreparedItem:
        """The record's prompt; `reasoning`: reasoning mode's (the prefix generation continues)."""
        return self.prompt.build(rec.text, self._images(rec), reasoning=reasoning)

    def reasoning_item(self, rec: Record) -> tuple[PreparedItem, np.ndarray]:
        """The product's reasoning sequence: prompt, attribute text, ``</think>\\n<emb>``.

        Returns the item and the local positions of the tokens the next-token loss predicts
        (the attribute text and the end marker; ``\\n<emb>`` are appended by the runtime).
        """
        if self.plan is None:
            raise DataError("the model cannot run reasoning mode, so it has no attribute text to learn: "
                            + "; ".join(self.prompt.reasoning_problems()))
        prefix = self.prompt.build(rec.text, self._images(rec), reasoning=True)
        target = self.prompt.tokenizer.encode(attribute_text(rec.attributes or {}), add_special_tokens=False).ids
        tail = list(target) + list(self.plan.close_ids)
        start = int(prefix.position_ids[:, -1].max()) + 1
        positions = np.broadcast_to(np.arange(start, start + len(tail), dtype=np.int64), (3, len(tail)))
        item = PreparedItem(
            input_ids=np.concatenate([prefix.input_ids, np.asarray(tail, np.int64)]),
            position_ids=np.concatenate([prefix.position_ids, positions], axis=1),
            title_positions=prefix.title_positions,
            pool_position=prefix.num_tokens + len(tail) - 1,
            images=prefix.images,
        )
        predicted = np.arange(prefix.num_tokens, prefix.num_tokens + len(target) + 1)  # + the end marker
        return item, predicted


@dataclass
class StepBatch:
    """One rank's share of a step, packed: queries, then products, then reasoning sequences."""

    batch: PackedBatch
    num_pairs: int
    ntp_inputs: torch.Tensor  # (N,) packed positions whose next token is predicted
    ntp_targets: torch.Tensor  # (N,) the token ids there


def reasoning_source(data: Dataset, product: int, view: int, from_image: bool) -> Record:
    """What a product's attribute text is learned from: the product as listed, or (from_image)
    one of its renderings with no title, so the text can only be read off the pixels."""
    rec = data.products[product]
    views = data.views_of[product]
    if not from_image or not views:
        return rec
    return Record(rec.id, None, [views[view % len(views)]], rec.attributes)


def build_step(preparer: Preparer, data: Dataset, pairs: Pairs, rank: int, world: int,
               ntp_items: int, ntp_from_image: float = 0.0) -> StepBatch:
    """This rank's contiguous shard of the global pairs, plus `ntp_items` reasoning sequences:
    the first round(ntp_from_image * ntp_items) learned from a rendering alone, the rest from
    the product as listed (the pairs are drawn at random, so which products is random too)."""
    n = len(pairs.queries) // world
    lo = rank * n
    queries = [data.queries[i] for i in pairs.queries[lo:lo + n]]
    products = [data.products[i] for i in pairs.products[lo:lo + n]]
    items = [preparer.item(r) for r in queries] + [preparer.item(r) for r in products]
    views = pairs.views[lo:lo + n] if pairs.views else [0] * n
    from_image = round(float(ntp_from_image) * ntp_items)
    sources = [reasoning_source(data, i, v, k < from_image)
               for k, (i, v) in enumerate(zip(pairs.products[lo:lo + n], views))]
    reasoning = [preparer.reasoning_item(r) for r in sources[:ntp_items] if r.attributes]
    offset = sum(it.num_tokens for it in items)
    inputs, targets = [], []
    for item, predicted in reasoning:
        inputs.append(offset + predicted - 1)
        targets.append(item.input_ids[predicted])
        offset += item.num_tokens
    items += [it for it, _ in reasoning]
    empty = np.zeros(0, np.int64)
    return StepBatch(
        batch=pack(items, preparer.cfg.vision.spatial_merge_size),
        num_pairs=n,
        ntp_inputs=torch.from_numpy(np.concatenate(inputs) if inputs else empty),
        ntp_targets=torch.from_numpy(np.concatenate(targets) if targets else empty),
    )
