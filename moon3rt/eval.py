"""Retrieval and zero-shot evaluation: ``python -m moon3rt eval --model M --products P --queries Q``.

Products are encode-input JSON lines (``id``, ``text``, ``image``/``images``) with an
optional ``attributes`` object; queries are JSON lines with ``id``, ``text`` and/or
``image``/``images``, ``relevant`` (product ids) and an optional ``kind``. Reported, per
query kind (``text``, ``title``, ``image``, ``product``; inferred from the fields when
absent), and for ``text/detail``, the text queries whose ``attributes`` name a fine detail
(`DETAIL_FIELDS`, a value other than "none" or "0"), as MBE-style benchmarks do:

- Recall@K = |top K  ∩  relevant| / |relevant|, K in 1, 5, 10;
- MRR@10 = 1 / rank of the first relevant product within the top 10 (0 if none);
- nDCG@10 with binary gains, ideal ranking = every relevant product first;
- zero-shot accuracy per attribute: each product's vector against one prompt per value of
  that attribute seen in the pool ("colour: navy"), the best-scoring value counted.

``--reasoning`` runs the retrieval twice, in direct mode (the zero-shot prompts too) and in
reasoning mode (products and queries generate their attributes before ``<emb>``), and adds
the accuracy of the generated ``field: value`` pairs (`moon3rt.train.rewards.parse_attributes`)
against each product's ground-truth ``attributes``, per field.

Search is exact cosine similarity, computed in chunks with torch matmuls and a running
top-K, so memory stays bounded by the chunk sizes however large the pool.
"""

from __future__ import annotations

import json
import math
import os
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from .jsonl import decode_line, json_lines

KS = (1, 5, 10)
# fine details a query can name (the world's held-out text queries name one half of the time)
DETAIL_FIELDS = ("logo", "logo colour", "buttons", "stitching", "strap")
DETAIL_KIND = "text/detail"
PROMPT = "{attribute}: {value}"


# ------------------------------------------------------------------------------ search
def search(queries: np.ndarray | torch.Tensor, products: np.ndarray | torch.Tensor, k: int = 10,
           query_chunk: int = 1024, product_chunk: int = 65536) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k products per query by inner product (cosine for normalised vectors): (scores, indices).

    Memory: one (query_chunk x product_chunk) score block plus the running top-k.
    """
    q = torch.as_tensor(queries, dtype=torch.float32)
    p = torch.as_tensor(products, dtype=torch.float32)
    k = min(k, p.shape[0])
    all_scores, all_index = [], []
    for qs in range(0, q.shape[0], query_chunk):
        qc = q[qs:qs + query_chunk]
        best_s = torch.full((qc.shape[0], 0), float("-inf"))
        best_i = torch.zeros((qc.shape[0], 0), dtype=torch.int64)
        for ps in range(0, p.shape[0], product_chunk):
            s = qc @ p[ps:ps + product_chunk].t()
            top = s.topk(min(k, s.shape[1]), dim=1)
            cand_s = torch.cat([best_s, top.values], 1)
            cand_i = torch.cat([best_i, top.indices + ps], 1)
            keep = cand_s.topk(min(k, cand_s.shape[1]), dim=1)
            best_s, best_i = keep.values, cand_i.gather(1, keep.indices)
        all_scores.append(best_s)
        all_index.append(best_i)
    return torch.cat(all_scores), torch.cat(all_index)


# ----------------------------------------------------------------------------- metrics
def retrieval_metrics(ranked: Sequence[Sequence[int]], relevant: Sequence[set], ks: Sequence[int] = KS,
                      cutoff: int = 10) -> dict[str, float]:
    """Mean Recall@K, MRR@cutoff and nDCG@cutoff over queries; `ranked` best first."""
    out = {f"recall@{k}": 0.0 for k in ks}
    out[f"mrr@{cutoff}"] = 0.0
    out[f"ndcg@{cutoff}"] = 0.0
    n = len(ranked)
    for rank_list, rel in zip(ranked, relevant):
        hits = [int(i) in rel for i in rank_list]
        for k in ks:
            out[f"recall@{k}"] += sum(hits[:k]) / len(rel)
        first = next((r for r, h in enumerate(hits[:cutoff]) if h), None)
        out[f"mrr@{cutoff}"] += 0.0 if first is None else 1.0 / (first + 1)
        dcg = sum(1.0 / math.log2(r + 2) for r, h in enumerate(hits[:cutoff]) if h)
        ideal = sum(1.0 / math.log2(r + 2) for r in range(min(len(rel), cutoff)))
        out[f"ndcg@{cutoff}"] += dcg / ideal
    return {key: value / max(n, 1) for key, value in out.items()}


def zero_shot_accuracy(product_vectors: np.ndarray, attributes: Sequence[dict | None],
                       prompt_vectors: dict[str, tuple[list[str], np.ndarray]]) -> dict[str, dict]:
    """Per attribute: accuracy of argmax over its value prompts, with the counts behind it."""
    out = {}
    for name, (values, vecs) in prompt_vectors.items():
        rows = [i for i, a in enumerate(attributes) if a and name in a and np.isfinite(product_vectors[i]).all()]
        if not rows:
            continue
        pred = (product_vectors[rows] @ vecs.T).argmax(1)
        correct = sum(values[p] == attributes[i][name] for i, p in zip(rows, pred))
        out[name] = {"accuracy": correct / len(rows), "products": len(rows), "values": len(values),
                     "chance": 1.0 / len(values)}
    return out


def generated_attribute_accuracy(texts: Sequence[str | None], attributes: Sequence[dict | None]) -> dict[str, dict]:
    """Per ground-truth field: the share of products whose generated text states the true value
    (case-insensitive, `parse_attributes`), the share that states the field at all, and how many
    products have the field. Products without attributes or without a text (failed) are left out."""
    from moon3rt.train.rewards import parse_attributes

    counts: dict[str, list[int]] = {}  # field -> [correct, stated, products]
    for text, truth in zip(texts, attributes):
        if not truth or text is None:
            continue
        said = parse_attributes(text)
        for name, value in truth.items():
            c = counts.setdefault(name, [0, 0, 0])
            got = said.get(name.strip().lower())
            c[0] += got is not None and got.lower() == str(value).strip().lower()
            c[1] += got is not None
            c[2] += 1
    return {name: {"accuracy": counts[name][0] / counts[name][2], "stated": counts[name][1] / counts[name][2],
                   "products": counts[name][2]} for name in _attribute_order([counts])}


# ------------------------------------------------------------------------------- files
def _item(obj: dict, base: Path) -> dict:
    item = {k: obj[k] for k in ("text", "image", "images") if obj.get(k) is not None}
    for key in ("image", "images"):
        if isinstance(item.get(key), str):
            item[key] = base / item[key]
        elif isinstance(item.get(key), list):
            item[key] = [base / x if isinstance(x, str) else x for x in item[key]]
    return item


def _lines(path: Path, problems: list[str]):
    for n, raw in json_lines(path):
        try:
            obj = decode_line(raw)
        except ValueError as err:
            problems.append(f"{path}:{n}: {err}")
            continue
        if not isinstance(obj, dict) or "id" not in obj:
            problems.append(f"{path}:{n}: expected an object with an 'id'")
            continue
        yield n, obj


def read_products(path: Path, problems: list[str]) -> tuple[list[str], list[dict], list[dict | None]]:
    ids, items, attributes, seen = [], [], [], set()
    for n, obj in _lines(path, problems):
        if str(obj["id"]) in seen:
            problems.append(f"{path}:{n}: duplicate product id {obj['id']!r} (first one kept)")
            continue
        seen.add(str(obj["id"]))
        ids.append(str(obj["id"]))
        items.append(_item(obj, path.parent))
        attributes.append(obj.get("attributes") if isinstance(obj.get("attributes"), dict) else None)
    return ids, items, attributes


def query_kind(obj: dict) -> str:
    if obj.get("kind"):
        return str(obj["kind"])
    has_image = obj.get("image") is not None or bool(obj.get("images"))
    if has_image and obj.get("text"):
        return "product"
    return "image" if has_image else "text"


def names_detail(obj: dict) -> bool:
    """A text query whose attributes name a fine detail the product has."""
    attributes = obj.get("attributes")
    return (query_kind(obj) == "text" and isinstance(attributes, dict)
            and any(str(attributes.get(f, "none")).strip().lower() not in ("none", "0") for f in DETAIL_FIELDS))


def read_queries(path: Path, product_index: dict[str, int], problems: list[str]) -> list[dict]:
    """Queries with their relevant products as pool indices; ids missing from the pool are reported."""
    out = []
    for n, obj in _lines(path, problems):
        relevant = obj.get("relevant")
        if not isinstance(relevant, list) or not relevant:
            problems.append(f"{path}:{n}: query {obj['id']!r} has no 'relevant' list")
            continue
        missing = [r for r in relevant if str(r) not in product_index]
        if missing:
            problems.append(f"{path}:{n}: query {obj['id']!r}: relevant id(s) not in the products file: "
                            f"{missing[:5]}{' ...' if len(missing) > 5 else ''}")
        rel = {product_index[str(r)] for r in relevant if str(r) in product_index}
        if not rel:
            continue
        out.append({"id": str(obj["id"]), "kind": query_kind(obj), "item": _item(obj, path.parent), "relevant": rel,
                    "detail": names_detail(obj)})
    return out


# ------------------------------------------------------------------------------ report
def evaluate(encoder, products_path: str | os.PathLike, queries_path: str | os.PathLike, dim: int | None = None,
             batch_size: int = 64, prompt: str = PROMPT, show_progress: bool = True, reasoning: bool | None = None,
             max_reasoning_tokens: int | None = None, zero_shot_by_input: bool = False) -> dict:
    """Encode the pool and the queries with `encoder` (a `moon3rt.Encoder`) and score them.

    reasoning=None encodes in the encoder's default mode; True reports direct mode and, under
    ``"reasoning"``, reasoning mode (budget `max_reasoning_tokens`) with the accuracy of the
    generated attributes; False is direct mode alone. zero_shot_by_input: also classify the
    products that have both text and image(s) from their image(s) alone and from their text
    alone (``"zero_shot_by_input"``: ``both``, ``image``, ``text``, over those products), which
    tells whether an attribute the vector misses is lost from the picture or from the words.
    """
    products_path, queries_path = Path(products_path), Path(queries_path)
    plan = encoder.reasoning_plan(max_reasoning_tokens) if reasoning else None  # why it cannot reason, up front
    problems: list[str] = []
    ids, items, attributes = read_products(products_path, problems)
    if not ids:
        raise ValueError(f"{products_path}: no products")
    index = {pid: i for i, pid in enumerate(ids)}
    queries = read_queries(queries_path, index, problems)
    start = time.perf_counter()
    mode = {} if reasoning is None else {"reasoning": False}
    direct = _retrieval(encoder, ids, items, queries, products_path, queries_path, problems, dim, batch_size,
                        show_progress, mode)
    report = {"model": encoder.name, "products": direct["products"], "dim": direct["dim"], "kinds": direct["kinds"],
              "zero_shot": {}}
    names = [a for a in _attribute_order(attributes)]
    prompt_vectors = {}
    for name in names:
        values = sorted({a[name] for a in attributes if a and name in a})
        if len(values) < 2:
            continue
        texts = [prompt.format(attribute=name, value=v) for v in values]
        prompt_vectors[name] = (values, encoder.encode(texts, batch_size=batch_size, dim=dim, **mode))
    report["zero_shot"] = zero_shot_accuracy(direct["pool"], attributes, prompt_vectors)
    if zero_shot_by_input:
        report["zero_shot_by_input"] = _zero_shot_by_input(encoder, items, attributes, direct["pool"], prompt_vectors,
                                                           dim, batch_size, show_progress, mode)
    if plan is not None:
        found: list[str] = []
        run = _retrieval(encoder, ids, items, queries, products_path, queries_path, found, dim, batch_size,
                         show_progress, {"reasoning": True, "max_reasoning_tokens": plan.max_tokens})
        problems += [f"reasoning mode: {p}" for p in found]
        report["reasoning"] = {"max_tokens": plan.max_tokens, "products": run["products"], "kinds": run["kinds"],
                               "attributes": generated_attribute_accuracy(run["texts"], attributes)}
    report["seconds"] = round(time.perf_counter() - start, 2)
    report["problems"] = problems
    return report


def _zero_shot_by_input(encoder, items, attributes, pool, prompt_vectors, dim, batch_size, show_progress,
                        mode: dict) -> dict:
    """Zero-shot accuracy of the products with text and image(s): as listed, image(s) alone, text alone."""
    rows = [i for i, it in enumerate(items) if it.get("text") and (it.get("image") is not None or it.get("images"))]
    if not rows:
        return {}
    truth = [attributes[i] for i in rows]
    out = {"products": len(rows), "both": zero_shot_accuracy(pool[rows], truth, prompt_vectors)}
    views = {"image": [{k: items[i][k] for k in ("image", "images") if k in items[i]} for i in rows],
             "text": [items[i]["text"] for i in rows]}
    for view, view_items in views.items():
        vectors = encoder.encode_with_report(view_items, batch_size=batch_size, dim=dim, show_progress=show_progress,
                                             **mode).embeddings
        out[view] = zero_shot_accuracy(vectors, truth, prompt_vectors)
    return out


def _retrieval(encoder, ids, items, queries, products_path, queries_path, problems, dim, batch_size, show_progress,
               mode: dict) -> dict:
    """The pool's and the queries' vectors in one mode (`mode`: encode's reasoning arguments), the
    metrics per query kind, the pool (NaN rows for failed products) and the products' texts."""
    prod = encoder.encode_with_report(items, batch_size=batch_size, dim=dim, show_progress=show_progress, **mode)
    problems += [f"{products_path}: product {ids[f.index]!r}: {f.reason}" for f in prod.failures]
    qres = encoder.encode_with_report([q["item"] for q in queries], batch_size=batch_size, dim=dim,
                                      show_progress=show_progress, **mode)
    problems += [f"{queries_path}: query {queries[f.index]['id']!r}: {f.reason}" for f in qres.failures]
    pool_ok = np.isfinite(prod.embeddings).all(1)
    pool = np.where(pool_ok[:, None], prod.embeddings, 0.0)  # a failed product can be found by nobody
    pool[~pool_ok] = np.nan
    search_pool = np.nan_to_num(pool, nan=-1e3) * pool_ok[:, None]
    q_ok = np.isfinite(qres.embeddings).all(1)
    kinds = {}
    groups = {kind: [i for i, q in enumerate(queries) if q["kind"] == kind and q_ok[i]]
              for kind in sorted({q["kind"] for q in queries})}
    groups[DETAIL_KIND] = [i for i, q in enumerate(queries) if q["detail"] and q_ok[i]]
    for kind, rows in groups.items():
        if not rows:
            continue
        _, top = search(qres.embeddings[rows], search_pool, k=max(KS))
        metrics = retrieval_metrics(top.tolist(), [queries[i]["relevant"] for i in rows])
        kinds[kind] = {"queries": len(rows), **metrics}
    return {"products": int(pool_ok.sum()), "dim": int(prod.embeddings.shape[1]), "kinds": kinds, "pool": pool,
            "texts": prod.reasoning}


def _attribute_order(attributes: Sequence[dict | None]) -> list[str]:
    from moon3rt.world.attributes import ATTRIBUTES

    seen = {k for a in attributes if a for k in a}
    return [k for k in ATTRIBUTES if k in seen] + sorted(seen - set(ATTRIBUTES))


METRICS = ["recall@1", "recall@5", "recall@10", "mrr@10", "ndcg@10"]


def _kind_lines(kinds: dict) -> list[str]:
    lines = [f"{'query kind':<12} {'queries':>8} " + " ".join(f"{m:>10}" for m in METRICS)]
    for kind, m in kinds.items():
        lines.append(f"{kind:<12} {m['queries']:>8} " + " ".join(f"{m[k]:>10.3f}" for k in METRICS))
    return lines


def format_table(report: dict) -> str:
    lines = [f"model {report['model']}: {report['products']} products, dim {report['dim']}", ""]
    if "reasoning" in report:
        lines.append("Direct mode")
    lines += _kind_lines(report["kinds"])
    if report["zero_shot"]:
        lines += ["", f"{'zero-shot attribute':<20} {'accuracy':>9} {'chance':>7} {'products':>9}"]
        for name, z in report["zero_shot"].items():
            lines.append(f"{name:<20} {z['accuracy']:>9.3f} {z['chance']:>7.3f} {z['products']:>9}")
    by_input = report.get("zero_shot_by_input")
    if by_input:
        lines += ["", f"zero-shot from one input ({by_input['products']} products with text and image)",
                  f"{'attribute':<20} {'both':>9} {'image':>9} {'text':>9}"]
        for name in by_input["both"]:
            lines.append(f"{name:<20} " + " ".join(f"{by_input[v][name]['accuracy']:>9.3f}"
                                                   for v in ("both", "image", "text")))
    if "reasoning" in report:
        r = report["reasoning"]
        lines += ["", f"Reasoning mode (up to {r['max_tokens']} tokens): {r['products']} products",
                  *_kind_lines(r["kinds"])]
        if r["attributes"]:
            lines += ["", f"{'generated attribute':<20} {'accuracy':>9} {'stated':>7} {'products':>9}"]
            for name, a in r["attributes"].items():
                lines.append(f"{name:<20} {a['accuracy']:>9.3f} {a['stated']:>7.3f} {a['products']:>9}")
    return "\n".join(lines)


def plot(report: dict, png: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    kinds = list(report["kinds"])
    metrics = ["recall@1", "recall@5", "recall@10", "mrr@10", "ndcg@10"]
    width = 0.8 / max(len(kinds), 1)
    for j, kind in enumerate(kinds):
        a.bar(np.arange(len(metrics)) + j * width, [report["kinds"][kind][m] for m in metrics], width, label=kind)
    a.set_xticks(np.arange(len(metrics)) + width * (len(kinds) - 1) / 2, metrics)
    a.set_ylim(0, 1)
    a.legend()
    a.set_title(f"retrieval, {report['products']} products")
    names = list(report["zero_shot"])
    b.bar(names, [report["zero_shot"][n]["accuracy"] for n in names], label="accuracy")
    b.scatter(names, [report["zero_shot"][n]["chance"] for n in names], color="k", marker="_", s=200, label="chance")
    b.set_ylim(0, 1)
    b.tick_params(axis="x", rotation=45)
    b.set_title("zero-shot attribute accuracy")
    b.legend()
    fig.suptitle(report["model"])
    fig.tight_layout()
    fig.savefig(png, dpi=100)
    plt.close(fig)
    return True


# --------------------------------------------------------------------------------- CLI
def add_arguments(p) -> None:
    p.add_argument("--products", default=None, help="products.jsonl (id, text, image|images, attributes)")
    p.add_argument("--queries", default=None, help="queries.jsonl (id, text and/or image|images, relevant)")
    p.add_argument("--world", action="store_true", help="generate the held-out product world and evaluate on it")
    p.add_argument("--world-seed", type=int, default=0, help="seed of the world (default 0, the training world's)")
    p.add_argument("--world-products", type=int, default=1200, help="held-out products in the pool (default 1200)")
    p.add_argument("--world-dir", default=None, help="keep the rendered world here (default: a temporary directory)")
    p.add_argument("--dim", type=int, default=None, help="Matryoshka truncation (default: full)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--prompt", default=PROMPT, help=f"zero-shot prompt template (default {PROMPT!r})")
    p.add_argument("--zero-shot-by-input", action="store_true", help="also classify products with text and "
                   "image from the image(s) alone and from the text alone (two more passes over them)")
    p.add_argument("--reasoning", action="store_true", help="also evaluate reasoning mode, and the accuracy of "
                   "the generated attributes against the products' ground truth, per field")
    p.add_argument("--max-reasoning-tokens", type=int, default=None,
                   help="reasoning budget per item (default: the checkpoint's moon3.reasoning.max_tokens)")
    p.add_argument("--output", default="eval.json", help="report JSON (a PNG beside it); default eval.json")
    p.add_argument("--no-progress", action="store_true")


def main(args) -> int:
    import moon3rt

    if args.world == bool(args.products or args.queries) or (not args.world and not (args.products and args.queries)):
        print("error: give --products and --queries, or --world", file=sys.stderr)
        return 2
    encoder = moon3rt.load(args.model, device=args.device, dtype=args.dtype, backend=args.backend,
                           flavour=args.flavour)
    if args.reasoning:
        try:
            encoder.reasoning_plan(args.max_reasoning_tokens)
        except ValueError as err:
            print(f"error: --reasoning: {err}", file=sys.stderr)
            return 2
    with tempfile.TemporaryDirectory(prefix="moon3rt-world-") as tmp:
        if args.world:
            from moon3rt.world import WorldSpec, write_split

            spec = WorldSpec(seed=args.world_seed, heldout_products=args.world_products)
            directory = write_split(spec, "heldout", Path(args.world_dir or tmp) / "heldout",
                                    show_progress=not args.no_progress)
            products, queries = directory / "products.jsonl", directory / "queries.jsonl"
        else:
            products, queries = Path(args.products), Path(args.queries)
            for path in (products, queries):
                if not path.is_file():
                    print(f"error: {path} does not exist", file=sys.stderr)
                    return 2
        report = evaluate(encoder, products, queries, dim=args.dim, batch_size=args.batch_size, prompt=args.prompt,
                          show_progress=not args.no_progress, reasoning=True if args.reasoning else None,
                          max_reasoning_tokens=args.max_reasoning_tokens, zero_shot_by_input=args.zero_shot_by_input)
    if args.world:
        report["world"] = {"seed": args.world_seed, "split": "heldout", "products": args.world_products}
    for problem in report["problems"][:20]:
        print(f"warning: {problem}", file=sys.stderr)
    if len(report["problems"]) > 20:
        print(f"warning: ... and {len(report['problems']) - 20} more (all in the JSON report)", file=sys.stderr)
    print(format_table(report))
    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp_path = out.with_name(out.name + ".tmp")
    tmp_path.write_text(json.dumps(report, indent=2) + "\n")
    os.replace(tmp_path, out)
    png = out.with_suffix(".png")
    print(f"\nreport: {out}" + (f", {png}" if plot(report, png) else ""))
    return 0
