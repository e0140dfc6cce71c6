"""Command line: `python -m moon3rt {demo,encode,info}`."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

DESCRIPTION = "moon3rt: embed products (images + title) and queries with MOON3-style models."
CATALOGUE = Path(__file__).resolve().parent / "assets" / "catalogue"


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="moon3-tiny", help="preset name or checkpoint directory (default: moon3-tiny)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if present)")
    p.add_argument("--dtype", default=None, help="fp32, bf16 or fp16 (default: bf16 on cuda, fp32 on cpu)")
    p.add_argument("--backend", default="torch", help="torch (default), triton (CUDA), onnxruntime or tensorrt (CUDA)")
    p.add_argument("--flavour", default=None, choices=["moon3", "gme", "ume-r1", "qwen2-vl"],
                   help="override the checkpoint's detected recipe")


def read_jsonl(path: Path) -> tuple[list, list]:
    """Items and ids of a small JSON-lines file (the demo catalogue), read as `encode` reads it."""
    from moon3rt.jobs import Columns, read_rows

    rows = list(read_rows(path, Columns()))
    return ([r.item for r in rows], [r.id if r.id is not None else str(r.row) for r in rows])


def _positive(name: str, value: int) -> None:
    if value is not None and value <= 0:
        raise ValueError(f"{name} must be a positive integer, got {value}")


def cmd_encode(args) -> int:
    import moon3rt
    from moon3rt.jobs import Columns, input_files, output_for, run
    from moon3rt.jobs.idset import existing_ids, output_files
    from moon3rt.jobs.job import check_inputs
    from moon3rt.jobs.progress import Progress

    for name in ("batch_size", "max_batch_tokens", "dim", "shard_rows", "chunk_rows"):
        _positive("--" + name.replace("_", "-"), getattr(args, name))
    if args.only_new != (args.existing is not None):
        raise ValueError("--only-new and --existing DIR go together: embed only ids absent from DIR")
    if args.ray:
        from moon3rt.ray import cmd_encode_ray

        return cmd_encode_ray(args)
    columns = Columns(args.id_column, args.text_column, args.image_column)
    files = input_files(args.input)  # existence and format only: nothing is read yet
    out = output_for(Path(args.output), args.output_dtype, args.shard_rows, args.resume)
    job = {"inputs": [str(f) for f in files], "model": str(args.model), "dim": args.dim, "flavour": args.flavour,
           "reasoning": args.reasoning, "max_reasoning_tokens": args.max_reasoning_tokens,
           "output_dtype": args.output_dtype, "shard_rows": args.shard_rows, "chunk_rows": args.chunk_rows,
           "batch_size": args.batch_size, "max_batch_tokens": args.max_batch_tokens, "columns": list(columns.__dict__.values())}
    done = out.open(job)  # the output is checked (and a resumed job's manifest read) before any work
    try:
        encoder = moon3rt.load(args.model, device=args.device, dtype=args.dtype, backend=args.backend,
                               flavour=args.flavour)
        existing = existing_ids(output_files(Path(args.existing))) if args.only_new else None
        total = check_inputs(files, columns, done, count_lines=not args.no_progress)
    except BaseException:
        out.abort()
        raise
    progress = Progress(total, enabled=not args.no_progress, interval=args.progress_interval)
    summary = run(encoder, files, out, done, columns=columns, chunk_rows=args.chunk_rows, existing=existing,
                  strict=args.strict, progress=progress,
                  encode_kwargs={"batch_size": args.batch_size, "max_batch_tokens": args.max_batch_tokens,
                                 "dim": args.dim, "reasoning": args.reasoning,
                                 "max_reasoning_tokens": args.max_reasoning_tokens})
    print(summary.line(args.dim or encoder.dim))
    return 1 if summary.items and summary.failures == summary.items else 0


def cmd_info(args) -> int:
    import moon3rt
    from moon3rt.config import PRESETS

    # A preset's random weights are not needed to describe it: its shapes suffice (moon3-2b
    # would otherwise draw 2.2 B numbers). A checkpoint is loaded, which checks its tensors.
    device = args.device or ("meta" if args.model in PRESETS and not Path(args.model).is_dir() else "cpu")
    encoder = moon3rt.load(args.model, device=device, dtype=args.dtype or "fp32", flavour=args.flavour)
    cfg, model = encoder.config, encoder.model
    count = lambda m: sum(p.numel() for p in m.parameters()) if m is not None else 0
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
    if args.json:
        print(json.dumps(cfg.to_dict(), indent=2))
    return 0


def cmd_demo(args) -> int:
    import moon3rt
    from moon3rt.config import PRESETS

    items, ids = read_jsonl(CATALOGUE / "items.jsonl")
    queries = [q for q in (CATALOGUE / "queries.txt").read_text().splitlines() if q.strip()]
    encoder = moon3rt.load(args.model, device=args.device, dtype=args.dtype, backend=args.backend,
                           flavour=args.flavour)
    print(f"{encoder}")
    if args.model in PRESETS and args.model != "moon3-tiny":  # every preset but the shipped default
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


def _add_eval_args(p: argparse.ArgumentParser) -> None:
    from moon3rt.eval import add_arguments

    add_arguments(p)


def cmd_eval(args) -> int:
    from moon3rt.eval import main as eval_main

    return eval_main(args)


def _add_train_args(p: argparse.ArgumentParser) -> None:
    from moon3rt.train.cli import add_arguments

    add_arguments(p)


def cmd_train(args) -> int:
    from moon3rt.train.cli import main as train_main

    return train_main(args)

def _add_encode_args(enc: argparse.ArgumentParser) -> None:
    enc.add_argument("--input", required=True, nargs="+", metavar="PATH",
                     help="JSON lines (.jsonl, .jsonl.gz: {id, text, image|images} per line; blank lines are "
                     "skipped) or Parquet files, or directories of them, read in name order")
    enc.add_argument("--output", required=True,
                     help="a directory: Parquet shards part-00000.parquet ... with _manifest.json (resumable); "
                     "vectors.parquet: one file (id, embedding, error); vectors.npy: row k = the k-th row "
                     "(non-blank line) of the input, NaN for a failed row (small jobs: held in memory)")
    enc.add_argument("--id-column", default="id", help="field holding the id (default: id; absent: the row number)")
    enc.add_argument("--text-column", default="text", help="field holding the title/query (default: text)")
    enc.add_argument("--image-column", default="image",
                     help="field holding image paths (relative to the input file), file:// URIs, encoded bytes "
                     "or lists of them (default: image)")
    enc.add_argument("--output-dtype", default="float32", choices=["float32", "float16"])
    enc.add_argument("--shard-rows", type=int, default=100_000, help="rows per output shard (default: 100000)")
    enc.add_argument("--chunk-rows", type=int, default=1024,
                     help="rows read and embedded at a time; bounds memory (default: 1024)")
    enc.add_argument("--resume", action="store_true",
                     help="continue a job in the --output directory: finished shards are kept, the rest redone")
    enc.add_argument("--only-new", action="store_true", help="embed only ids absent from --existing")
    enc.add_argument("--existing", default=None, metavar="DIR", help="an earlier output (directory or .parquet)")
    enc.add_argument("--batch-size", type=int, default=64)
    enc.add_argument("--max-batch-tokens", type=int, default=16384)
    enc.add_argument("--dim", type=int, default=None, help="Matryoshka truncation (default: full)")
    enc.add_argument("--strict", action="store_true",
                     help="stop at the first chunk holding a bad row, naming its bad rows, instead of recording "
                     "them in the error column and going on")
    enc.add_argument("--reasoning", action=argparse.BooleanOptionalAction, default=None,
                     help="generate the product's attributes before embedding (default: the checkpoint's "
                     "moon3.reasoning.enabled); the texts go to a 'reasoning' column, or a .reasoning.jsonl "
                     "sidecar beside a .npy")
    enc.add_argument("--max-reasoning-tokens", type=int, default=None,
                     help="reasoning budget per item (default: the checkpoint's moon3.reasoning.max_tokens)")
    enc.add_argument("--no-progress", action="store_true")
    enc.add_argument("--progress-interval", type=float, default=30.0,
                     help="seconds between progress lines when stderr is not a terminal (default: 30)")
    ray = enc.add_argument_group("Ray Data (pip install 'moon3rt[ray]')")
    ray.add_argument("--ray", action="store_true", help="run the job on a Ray cluster: one Encoder per GPU actor")
    ray.add_argument("--address", default=None, help="Ray cluster address (default: start a local one, or RAY_ADDRESS)")
    ray.add_argument("--actors", type=int, default=None,
                     help="embedding actors (default: one per GPU in the cluster, or 1 without GPUs)")
    ray.add_argument("--cpus-per-actor", type=float, default=None,
                     help="CPUs reserved per actor for its image decoding threads (default: 4 with GPUs, else 1)")
def cmd_serve(args) -> int:
    try:
        from moon3rt.serve import ServeSettings, run
    except ImportError as err:
        raise SystemExit(f"error: serve needs the serve extra ({err.name} is missing): "
                         "pip install 'moon3rt[serve]'") from None
    import os

    import moon3rt

    fields = set(ServeSettings.__dataclass_fields__)
    settings = ServeSettings(**{k: v for k, v in vars(args).items() if k in fields})
    settings.api_key = settings.api_key or os.environ.get("MOON3RT_API_KEY") or None
    devices = args.devices.split(",") if args.devices else [args.device]
    encoders = [moon3rt.load(args.model, device=d, dtype=args.dtype, backend=args.backend, flavour=args.flavour,
                             reasoning=args.reasoning) for d in devices]
    run(settings, encoders)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m moon3rt", description=DESCRIPTION)
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser("demo", help="embed the shipped sample catalogue and print a similarity table")
    _add_model_args(demo)
    demo.set_defaults(func=cmd_demo)

    enc = sub.add_parser("encode", help="embed a catalogue: JSON lines or Parquet in, vectors out (streamed, resumable)",
                         description="Embed every row of the input. Rows stream through in chunks, so memory does "
                         "not grow with the input; a bad row is reported by file, line/row and id and never "
                         "costs the other rows their vectors.")
    _add_model_args(enc)
    _add_encode_args(enc)
    enc.set_defaults(func=cmd_encode)

    info = sub.add_parser("info", help="print a summary of the model: parameters, modules present, limits")
    _add_model_args(info)
    info.add_argument("--json", action="store_true", help="also print the full config as JSON")
    info.set_defaults(func=cmd_info)

    evaluate = sub.add_parser("eval", help="retrieval (Recall@K, MRR, nDCG) and zero-shot attribute accuracy; "
                              "--reasoning adds reasoning mode")
    _add_model_args(evaluate)
    _add_eval_args(evaluate)
    evaluate.set_defaults(func=cmd_eval)

    train = sub.add_parser("train", help="train a MOON3 model: the contrastive cold start (docs/TRAINING.md) or, "
                           "with --stage rl, GRPO + InfoNCE (docs/RL.md)")
    _add_train_args(train)
    train.set_defaults(func=cmd_train)

    srv = sub.add_parser("serve", help="OpenAI-compatible embedding server (POST /v1/embeddings), requests "
                         "batched together; needs pip install 'moon3rt[serve]'")
    _add_model_args(srv)
    srv.add_argument("--devices", default=None, help="one Encoder per device, sharing one queue: cuda:0,cuda:1 "
                     "(overrides --device)")
    srv.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1; 0.0.0.0 for all)")
    srv.add_argument("--port", type=int, default=8000)
    srv.add_argument("--served-model-name", default=None, help="the model's name in the API (default: the "
                     "preset, or the checkpoint directory's name)")
    srv.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' on /v1/* (default: "
                     "$MOON3RT_API_KEY; none: open)")
    srv.add_argument("--max-batch-tokens", type=int, default=16384, help="decoder tokens + vision patches per batch")
    srv.add_argument("--max-batch-items", type=int, default=64, help="items per batch")
    srv.add_argument("--max-wait-ms", type=float, default=5.0, help="longest an item waits for a batch to fill "
                     "while more items are being prepared (default 5)")
    srv.add_argument("--max-queue-items", type=int, default=1024, help="items waiting at most; beyond: 429")
    srv.add_argument("--workers", type=int, default=4, help="preprocessing threads (decode, resize, tokenise)")
    srv.add_argument("--max-items-per-request", type=int, default=256)
    srv.add_argument("--max-body-mb", type=float, default=32.0, help="request body limit in MiB; beyond: 413")
    srv.add_argument("--max-image-pixels", type=int, default=40_000_000, help="per image, from its header; "
                     "beyond: 422")
    srv.add_argument("--allow-path", dest="allow_paths", action="append", default=[], metavar="DIR",
                     help="accept absolute image file paths under DIR (repeatable; default: data: URIs only)")
    srv.add_argument("--shutdown-timeout", type=float, default=30.0, help="seconds to finish queued work after "
                     "SIGTERM/SIGINT (default 30)")
    srv.add_argument("--reasoning", action=argparse.BooleanOptionalAction, default=None,
                     help="reason before embedding unless a request says otherwise (default: the checkpoint's)")
    srv.add_argument("--access-log", action="store_true", help="log every request (uvicorn's access log)")
    srv.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    srv.set_defaults(func=cmd_serve)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except KeyboardInterrupt:
        print("interrupted: no partial output was left (finished shards of a directory output are kept; "
              "continue with --resume)", file=sys.stderr)
        return 130
    except Exception as err:  # a CLI user gets one clear line, not a traceback
        from moon3rt.api import EncodeError

        if isinstance(err, (EncodeError, ValueError, OSError)):
            print(f"error: {err}", file=sys.stderr)
            return 2
        raise
