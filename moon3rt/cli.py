"""Command line: ``python -m moon3rt {demo,encode,info}``."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

CATALOGUE = Path(__file__).resolve().parent / "assets" / "catalogue"


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="moon3-tiny", help="preset name or checkpoint directory (default: moon3-tiny)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if present)")
    p.add_argument("--dtype", default=None, help="fp32, bf16 or fp16 (default: bf16 on cuda, fp32 on cpu)")
    p.add_argument("--backend", default="torch", help="torch (default), triton (CUDA), onnxruntime or tensorrt (CUDA)")
    p.add_argument("--flavour", default=None, choices=["moon3", "gme", "ume-r1", "qwen2-vl"],
                   help="override the checkpoint's detected recipe")


def read_jsonl(path: Path) -> tuple[list, list]:
    """Items and ids from a JSON-lines file; image paths are relative to the file.

    A line is an object with ``text`` and/or ``image``/``images`` (and an optional ``id``),
    or a JSON string (a text item). A line that is not valid JSON becomes a ValueError in
    the list, which `encode` reports with its index like any bad item.
    """
    items, ids = [], []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines()):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as err:
            items.append(ValueError(f"line {n + 1} is not valid JSON: {err.msg}"))
            ids.append(f"line {n + 1}")
            continue
        if isinstance(obj, dict):
            obj = dict(obj)
            ids.append(obj.pop("id", len(ids)))
            for key in ("image", "images"):
                if key in obj:
                    obj[key] = _resolve(obj[key], path.parent)
        else:
            ids.append(len(ids))
        items.append(obj)
    return items, ids


def _resolve(value, base: Path):
    if isinstance(value, str):
        return base / value
    if isinstance(value, list):
        return [base / v if isinstance(v, str) else v for v in value]
    return value


def cmd_encode(args) -> int:
    import moon3rt

    inp, out = Path(args.input), Path(args.output)
    if not inp.exists():
        print(f"error: input file {inp} does not exist", file=sys.stderr)
        return 2
    if out.suffix not in (".npy", ".parquet"):
        print(f"error: --output must end in .npy or .parquet, got {out.name}", file=sys.stderr)
        return 2
    items, ids = read_jsonl(inp)
    encoder = moon3rt.load(args.model, device=args.device, dtype=args.dtype, backend=args.backend,
                           flavour=args.flavour)
    start = time.perf_counter()
    result = encoder.encode_with_report(
        items, batch_size=args.batch_size, max_batch_tokens=args.max_batch_tokens, dim=args.dim,
        show_progress=not args.no_progress, on_error="raise" if args.strict else "skip",
        reasoning=args.reasoning, max_reasoning_tokens=args.max_reasoning_tokens,
    )
    seconds = time.perf_counter() - start
    for failure in result.failures:
        print(f"failed: {failure}", file=sys.stderr)
    out.parent.mkdir(parents=True, exist_ok=True)
    if out.suffix == ".npy":
        np.save(out, result.embeddings)
        if result.reasoning is not None:  # the texts go beside the vectors, one JSON line per row
            with open(out.with_suffix(".reasoning.jsonl"), "w", encoding="utf-8") as f:
                for id_, text in zip(ids, result.reasoning):
                    f.write(json.dumps({"id": id_, "reasoning": text}, ensure_ascii=False) + "\n")
    else:
        _write_parquet(out, ids, result)
    n = len(items)
    print(f"encoded {n - len(result.failures)}/{n} items ({len(result.failures)} failures) in {seconds:.2f} s, "
          f"{n / max(seconds, 1e-9):.1f} items/s, dim {result.embeddings.shape[1]} -> {out}")
    return 1 if result.failures and n == len(result.failures) else 0


def _write_parquet(path: Path, ids: list, result) -> None:
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        raise SystemExit("error: .parquet output needs pyarrow: pip install 'moon3rt[parquet]'") from None
    errors = {f.index: f.reason for f in result.failures}
    rows = [None if i in errors else row.tolist() for i, row in enumerate(result.embeddings)]
    columns = {
        "id": [str(i) for i in ids],
        "embedding": pa.array(rows, type=pa.list_(pa.float32())),
        "error": [errors.get(i) for i in range(len(ids))],
    }
    if result.reasoning is not None:
        columns["reasoning"] = pa.array(result.reasoning, type=pa.string())
    pq.write_table(pa.table(columns), path)


def cmd_info(args) -> int:
    import moon3rt

    from moon3rt.config import PRESETS

    # A preset's random weights are not needed to describe it: its shapes suffice (moon3-2b
    # would otherwise draw 2.2 B numbers). A checkpoint is loaded, which checks its tensors.
    device = args.device or ("meta" if args.model in PRESETS and not Path(args.model).is_dir() else "cpu")
    encoder = moon3rt.load(args.model, device=device, dtype=args.dtype or "fp32", flavour=args.flavour)
    cfg, model = encoder.config, encoder.model
    count = lambda m: sum(p.numel() for p in m.parameters()) if m is not None else 0  # noqa: E731
    print(json.dumps(cfg.to_dict(), indent=2))
    print(f"model:       {args.model}")
    print(f"flavour:     {cfg.flavour} (positions: {'M-RoPE' if cfg.uses_mrope else 'sequential 1-D'}, "
          f"pooling: {cfg.pooling})")
    print(f"parameters:  {count(model) / 1e6:.2f} M total")
    print(f"  vision tower   {count(model.visual) / 1e6:10.2f} M  ({cfg.vision.depth} blocks)")
    print(f"  decoder        {count(model.language_model) / 1e6:10.2f} M  ({cfg.text.num_hidden_layers} layers)")
    fire = model.fire
    print(f"  FIRE           {count(fire) / 1e6:10.2f} M  "
          + (f"(layers {fire.layers}, rank {cfg.moon3.fire.rank})" if fire is not None else "absent"))
    fusion = model.fusion
    print(f"  MHMF fusion    {count(fusion) / 1e6:10.2f} M  "
          + (f"({fusion.num_heads} heads x {fusion.head_dim})" if fusion is not None else "absent"))
    proj = model.projection
    print(f"  projection     {count(proj) / 1e6:10.2f} M  "
          + (f"(-> {cfg.moon3.projection_dim})" if proj is not None else "absent"))
    dims = cfg.moon3.matryoshka_dims if cfg.moon3 is not None else []
    print(f"output dim:  {cfg.output_dim}" + (f" (Matryoshka: {dims})" if dims else ""))
    print(f"images:      {cfg.min_pixels}..{cfg.max_pixels} pixels after resize; titles up to "
          f"{cfg.max_text_tokens} tokens")
    try:
        plan = encoder.reasoning_plan()
        print(f"reasoning:   {'on' if encoder.reasoning else 'off'} by default; up to {plan.max_tokens} tokens, "
              f"ends at {cfg.reasoning.end_marker!r}")
    except ValueError as err:
        print(f"reasoning:   unavailable ({err})")
    return 0


def cmd_demo(args) -> int:
    import moon3rt

    items, ids = read_jsonl(CATALOGUE / "items.jsonl")
    queries = [q for q in (CATALOGUE / "queries.txt").read_text().splitlines() if q.strip()]
    encoder = moon3rt.load(args.model, device=args.device, dtype=args.dtype, backend=args.backend,
                           flavour=args.flavour)
    print(f"{encoder}")
    if args.model in ("moon3-tiny", "moon3-2b", "qwen2-vl-2b"):
        print("note: presets have deterministic RANDOM weights; the scores below show the pipeline "
              "working, not retrieval quality. Pass --model PATH for a real checkpoint.")
    start = time.perf_counter()
    products = encoder.encode(items)
    query_vecs = encoder.encode(queries)
    seconds = time.perf_counter() - start
    titles = {i: obj.get("text", "") for i, obj in zip(ids, items)}
    scores = query_vecs @ products.T
    width = max(len(q) for q in queries)
    print(f"\ncosine similarity, queries x products ({len(items)} products with image + title, dim "
          f"{products.shape[1]}):\n")
    print(" " * width + "  " + " ".join(f"{str(i)[-7:]:>7}" for i in ids))
    for q, row in zip(queries, scores):
        print(f"{q:<{width}}  " + " ".join(f"{s:7.3f}" for s in row))
    print()
    for q, row in zip(queries, scores):
        best = int(np.argmax(row))
        print(f"best match for {q!r}: {ids[best]} {titles[ids[best]]!r} ({row[best]:.3f})")
    n = len(items) + len(queries)
    print(f"\nembedded {n} items in {seconds:.2f} s ({n / seconds:.1f} items/s) on {encoder.device}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m moon3rt", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser("demo", help="embed the shipped sample catalogue and print a similarity table")
    _add_model_args(demo)
    demo.set_defaults(func=cmd_demo)

    enc = sub.add_parser("encode", help="embed items from a JSON-lines file")
    _add_model_args(enc)
    enc.add_argument("--input", required=True, help="items.jsonl: {id, text, image|images} per line")
    enc.add_argument("--output", required=True, help="vectors.npy (rows in input order; NaN rows for "
                     "failed items) or vectors.parquet (id, embedding, error)")
    enc.add_argument("--batch-size", type=int, default=64)
    enc.add_argument("--max-batch-tokens", type=int, default=16384)
    enc.add_argument("--dim", type=int, default=None, help="Matryoshka truncation (default: full)")
    enc.add_argument("--strict", action="store_true",
                     help="embed nothing if any item is bad (every bad item is named) instead of skipping bad items")
    enc.add_argument("--reasoning", action=argparse.BooleanOptionalAction, default=None,
                     help="generate the product's attributes before embedding (default: the checkpoint's "
                     "moon3.reasoning.enabled); the texts go to a .reasoning.jsonl sidecar beside a .npy "
                     "or a 'reasoning' column of a .parquet")
    enc.add_argument("--max-reasoning-tokens", type=int, default=None,
                     help="reasoning budget per item (default: the checkpoint's moon3.reasoning.max_tokens)")
    enc.add_argument("--no-progress", action="store_true")
    enc.set_defaults(func=cmd_encode)

    info = sub.add_parser("info", help="print the config, parameter count and modules present")
    _add_model_args(info)
    info.set_defaults(func=cmd_info)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except Exception as err:  # a CLI user gets one clear line, not a traceback
        from moon3rt.api import EncodeError

        if isinstance(err, (EncodeError, ValueError, OSError)):
            print(f"error: {err}", file=sys.stderr)
            return 2
        raise
