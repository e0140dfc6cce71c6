"""Ray Data: the catalogue job across a cluster, one `Encoder` per GPU actor.

    import moon3rt.ray
    moon3rt.ray.embed(["s3-mounted/catalogue/"], "out/", model="path/to/checkpoint")

The job is read -> parse (CPU tasks) -> embed (an actor pool, each actor holding one
Encoder; `num_gpus=1` per actor when the cluster has GPUs) -> `write_parquet`. Parquet
inputs are read with `ray.data.read_parquet`; JSON lines with `read_binary_files`
and the same line parser as the single-process job (``\\n`` only, BOM, one error per
bad line), because `read_text` splits on U+2028 and `read_json` fails a whole block on
one bad line. A bad row becomes an `error` value, never a failed block. Image decoding
and resizing run in each actor's preprocessing threads (`cpus_per_actor`), overlapped
with the model by `Encoder.encode_with_report`, which does all embedding.

Reruns: each run writes ``run-RRR/part-TTTTTT-i.parquet`` (run number, write task,
file), names that depend on nothing else; a rerun into the same directory reads the ids
already embedded there, skips those rows, and removes files a killed run left
unreadable, so each id ends up in the output once. `pyarrow.parquet.read_table(output)`
and `ray.data.read_parquet(output)` read all runs together.
"""

from __future__ import annotations

import gzip
import json
import re
import time
from pathlib import Path
from typing import Any

import numpy as np

from .jobs.idset import IdSet, existing_ids
from .jobs.sinks import SUMMARY, OutputError, atomic_write
from .jobs.sources import Columns, InputError, input_files, input_kind, parquet_row, parse_json_line
from .jsonl import numbered_lines

RUN = re.compile(r"^run-(\d{3})$")


def _ray():
    try:
        import ray
        import ray.data
    except ImportError:
        raise ImportError("Ray jobs need Ray Data: pip install 'moon3rt[ray]'") from None
    return ray


# ---------------------------------------------------------------------------- CPU stage: rows
def _row_dict(row, single: bool) -> dict[str, Any]:
    """A parsed Row as flat columns the actors read: text, image paths or bytes, where, error."""
    item = row.item
    rid = row.id if row.id is not None else (str(row.row) if single else f"{Path(row.source).name}:{row.row}")
    out = {"id": rid, "text": None, "image_paths": None, "image_bytes": None, "where": row.where(), "error": None}
    if isinstance(item, Exception):
        out["error"] = str(item)
    elif isinstance(item, str):
        out["text"] = item
    else:
        out["text"] = item.get("text") if isinstance(item.get("text"), str) else None
        if "text" in item and not isinstance(item["text"], str):
            out["error"] = f"'text' must be a string, got {type(item['text']).__name__}"
        images = item.get("images") or []
        if images and all(isinstance(v, Path) for v in images):
            out["image_paths"] = [str(v) for v in images]
        elif images and all(isinstance(v, (bytes, bytearray)) for v in images):
            out["image_bytes"] = [bytes(v) for v in images]
        elif images:
            out["error"] = "images must be all paths or all encoded bytes, got " + \
                ", ".join(sorted({type(v).__name__ for v in images}))
    return out


def _parse_jsonl_file(record: dict, columns: Columns, single: bool) -> list[dict]:
    path = Path(record["path"])
    data = record["bytes"]
    if path.name.lower().endswith(".gz"):
        data = gzip.decompress(data)
    return [_row_dict(parse_json_line(raw, str(path), n, number, columns, path.parent), single)
            for n, (number, raw) in enumerate(numbered_lines(data.split(b"\n")))]


def _parse_parquet_batch(batch, columns: Columns, single: bool):
    """A pyarrow batch from read_parquet (with its 'path' column) -> actor rows."""
    cols = {name: batch.column(name).to_pylist() for name in batch.column_names}
    paths = cols.pop("path")
    rows = []
    for k in range(batch.num_rows):
        source = Path(paths[k])
        row = parquet_row(cols, k, str(source), -1, columns, source.parent)
        d = _row_dict(row, single)
        d["where"] = f"{source} id {d['id']}"  # read_parquet does not number rows; ids are required
        rows.append(d)
    return _to_table(rows)


def _to_table(rows: list[dict]):
    import pyarrow as pa

    schema = pa.schema([("id", pa.string()), ("text", pa.string()), ("image_paths", pa.list_(pa.string())),
                        ("image_bytes", pa.list_(pa.binary())), ("where", pa.string()), ("error", pa.string())])
    return pa.Table.from_pylist(rows, schema=schema)


def _drop_existing(batch, digests: np.ndarray):
    import pyarrow as pa

    seen = IdSet(digests).contains(batch.column("id").to_pylist())
    return batch.filter(pa.array(~seen)) if seen.any() else batch


# ---------------------------------------------------------------------------- GPU stage: embed
class EmbedActor:
    """One Encoder per actor; `__call__` embeds a batch of rows through `encode_with_report`."""

    def __init__(self, model: str, device: str | None, dtype: str | None, backend: str, dim: int | None,
                 output_dtype: str, batch_size: int, max_batch_tokens: int, num_workers: int):
        import moon3rt

        self.encoder = moon3rt.load(model, device=device, dtype=dtype, backend=backend)
        self.kwargs = {"dim": dim, "batch_size": batch_size, "max_batch_tokens": max_batch_tokens,
                       "num_workers": num_workers}
        self.output_dtype = output_dtype

    def __call__(self, batch):
        from .jobs.sinks import arrow_table

        cols = batch.to_pydict()
        items: list[Any] = []
        for k in range(batch.num_rows):
            if cols["error"][k] is not None:
                items.append(ValueError(cols["error"][k]))  # reported by encode like any bad item
                continue
            images = [Path(p) for p in cols["image_paths"][k] or []] + list(cols["image_bytes"][k] or [])
            item = {"text": cols["text"][k]} if cols["text"][k] is not None else {}
            if images:
                item["images"] = images
            items.append(item)
        result = self.encoder.encode_with_report(items, on_error="skip", **self.kwargs)
        errors: list[str | None] = [None] * len(items)
        for f in result.failures:
            errors[f.index] = f"{cols['where'][f.index]}: {f.reason}"
        return arrow_table(cols["id"], result.embeddings, errors, None, self.output_dtype)


# ---------------------------------------------------------------------------- the job
def _names():
    from ray.data.datasource import FilenameProvider

    class RunNames(FilenameProvider):
        """part-TTTTTT: the write task, the same for the same task (each run has its own directory)."""

        def get_filename_for_task(self, write_uuid: str, task_index: int) -> str:
            return f"part-{task_index:06d}.parquet"

    return RunNames()


def _earlier_runs(output: Path) -> tuple[int, list[Path]]:
    """The next run number and the readable part files of earlier runs (unreadable ones are removed)."""
    import pyarrow.parquet as pq

    runs, kept = [0], []
    for run_dir in sorted(p for p in output.iterdir() if RUN.match(p.name)) if output.is_dir() else []:
        runs.append(int(RUN.match(run_dir.name).group(1)))
        for path in sorted(run_dir.glob("*.parquet")):
            try:
                pq.ParquetFile(path)
            except (OSError, ValueError):  # cut off by a killed run: its rows are redone
                path.unlink()
                continue
            kept.append(path)
    return max(runs) + 1, kept


def embed(inputs, output, *, model: str = "moon3-tiny", columns: Columns | None = None, dim: int | None = None,
          output_dtype: str = "float32", device: str | None = None, dtype: str | None = None,
          backend: str = "torch", batch_size: int = 64, max_batch_tokens: int = 16384, rows_per_call: int = 256,
          actors: int | None = None, cpus_per_actor: float | None = None, existing=None,
          address: str | None = None) -> dict:
    """Embed every row of `inputs` (files or directories, as `moon3rt encode`) into Parquet files under `output`.

    actors: size of the actor pool (default: one per GPU in the cluster, or 1). existing: an
    earlier output (directory or file) whose embedded ids are skipped (the daily delta).
    Rows already embedded in `output` by an earlier run are skipped as well. Returns the
    summary also written to ``output/_summary.json``.
    """
    ray = _ray()
    columns = columns or Columns()
    files = input_files(inputs)
    output = Path(output)
    try:
        output.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise OutputError(f"output {output}: cannot create the directory ({err})") from None
    if not ray.is_initialized():
        ray.init(address=address, include_dashboard=False, **({} if address else {"_node_ip_address": "127.0.0.1"}))
    start = time.perf_counter()
    run, done_files = _earlier_runs(output)
    skip = existing_ids(done_files)
    if existing is not None:
        from .jobs.idset import output_files

        skip = IdSet(np.concatenate([skip.digests, existing_ids(output_files(Path(existing))).digests]))
    single = len(files) == 1
    jsonl = [str(f) for f in files if input_kind(f) == "jsonl"]
    parquet = [str(f) for f in files if input_kind(f) == "parquet"]
    parts = []
    if jsonl:
        parts.append(ray.data.read_binary_files(jsonl, include_paths=True)
                     .flat_map(_parse_jsonl_file, fn_kwargs={"columns": columns, "single": single}))
    if parquet:
        import pyarrow.parquet as pq

        for f in parquet:
            names = pq.ParquetFile(f).schema_arrow.names
            if columns.id not in names:
                raise InputError(f"input {f}: no {columns.id!r} column; Ray jobs need ids in Parquet inputs "
                                 "(name it with --id-column)")
        wanted = [c for c in (columns.id, columns.text, columns.image)
                  if c in pq.ParquetFile(parquet[0]).schema_arrow.names]
        parts.append(ray.data.read_parquet(parquet, include_paths=True).select_columns([*wanted, "path"])
                     .map_batches(_parse_parquet_batch, batch_format="pyarrow",
                                  fn_kwargs={"columns": columns, "single": single}))
    ds = parts[0] if len(parts) == 1 else parts[0].union(*parts[1:])
    if len(skip):
        ds = ds.map_batches(_drop_existing, batch_format="pyarrow", fn_kwargs={"digests": skip.digests})
    gpus = int(ray.cluster_resources().get("GPU", 0))
    pool = actors or max(1, gpus)
    cpus = cpus_per_actor if cpus_per_actor is not None else (4.0 if gpus else 1.0)
    ds = ds.map_batches(
        EmbedActor, batch_size=rows_per_call, batch_format="pyarrow",
        compute=ray.data.ActorPoolStrategy(size=pool),
        num_gpus=1 if gpus else 0, num_cpus=cpus,
        fn_constructor_kwargs={"model": str(model), "device": device, "dtype": dtype, "backend": backend,
                               "dim": dim, "output_dtype": output_dtype, "batch_size": batch_size,
                               "max_batch_tokens": max_batch_tokens, "num_workers": max(1, int(cpus))},
    )
    from ray.data import SaveMode

    ds.write_parquet(str(output / f"run-{run:03d}"), filename_provider=_names(), mode=SaveMode.OVERWRITE)
    seconds = time.perf_counter() - start
    summary = _summarise(output, run, seconds, skipped=len(skip))
    atomic_write(output / SUMMARY, json.dumps(summary, indent=1).encode())
    return summary


def _summarise(output: Path, run: int, seconds: float, skipped: int) -> dict:
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    items = failures = rows = files = 0
    for path in sorted(output.glob("run-*/*.parquet")):
        errors = pq.read_table(path, columns=["error"]).column("error")
        rows += len(errors)
        files += 1
        if path.parent.name == f"run-{run:03d}":
            items += len(errors)
            failures += len(errors) - pc.sum(pc.is_null(errors)).as_py() if len(errors) else 0
    return {"output": str(output), "run": run, "items": items, "failures": failures, "seconds": round(seconds, 3),
            "items_per_s": round(items / max(seconds, 1e-9), 3), "output_rows": rows, "shards": files,
            "skipped_existing": skipped}


def cmd_encode_ray(args) -> int:
    """`moon3rt encode --ray`: the CLI's options mapped onto `embed`."""
    if args.resume or args.output.endswith((".npy", ".parquet")):
        raise OutputError("--ray writes a directory of Parquet files and resumes by itself (rerun the same "
                          "command); drop --resume and give a directory as --output")
    summary = embed(args.input, args.output, model=args.model, columns=Columns(args.id_column, args.text_column,
                                                                                 args.image_column),
                    dim=args.dim, output_dtype=args.output_dtype, device=args.device, dtype=args.dtype,
                    backend=args.backend, batch_size=args.batch_size, max_batch_tokens=args.max_batch_tokens,
                    rows_per_call=args.chunk_rows, actors=args.actors, cpus_per_actor=args.cpus_per_actor,
                    existing=args.existing, address=args.address)
    print(f"encoded {summary['items'] - summary['failures']}/{summary['items']} items ({summary['failures']} failures"
          f", {summary['skipped_existing']} skipped as done) in {summary['seconds']:.2f} s, "
          f"{summary['items_per_s']:.1f} items/s; {summary['output_rows']} rows in {summary['shards']} files "
          f"-> {summary['output']}")
    return 0
