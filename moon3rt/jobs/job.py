"""A catalogue job: input rows -> `Encoder.encode_with_report`, one chunk at a time -> output.

Memory holds one chunk of rows (plus the output's current row group), whatever the
input's length. Chunks never cross a shard boundary, so a resumed job embeds exactly
the chunks an uninterrupted one would, batch for batch, and writes the same vectors.
"""

from __future__ import annotations

import json
import sys
import time
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..api import EncodeError
from .idset import IdSet
from .progress import Progress
from .sinks import atomic_write
from .sources import Columns, Row, check_input, read_rows

MAX_REPORTED = 100  # failure lines printed and kept in the JSON summary; every one is in the error column


class JobError(ValueError):
    """--strict found bad rows: each named by file, line/row and id."""


@dataclass
class JobSummary:
    output: str
    items: int = 0             # rows embedded or failed in this run
    failures: int = 0
    truncated: int = 0
    skipped_existing: int = 0  # --only-new: ids already in --existing
    resumed_rows: int = 0      # rows already done by an earlier run (--resume)
    seconds: float = 0.0
    read_seconds: float = 0.0  # reading and parsing the input
    encode_seconds: float = 0.0
    output_rows: int = 0
    shards: int = 0
    failure_samples: list[dict] = field(default_factory=list)

    @property
    def items_per_s(self) -> float:
        return self.items / max(self.seconds, 1e-9)

    def line(self, dim: int) -> str:
        extra = [f"{self.failures} failures"]
        if self.truncated:
            extra.append(f"{self.truncated} titles truncated")
        if self.skipped_existing:
            extra.append(f"{self.skipped_existing} already in --existing")
        if self.resumed_rows:
            extra.append(f"{self.resumed_rows} done before")
        where = f"{self.output_rows} rows in {self.shards} shards" if self.shards else f"{self.output_rows} rows"
        return (f"encoded {self.items - self.failures}/{self.items} items ({', '.join(extra)}) in {self.seconds:.2f} s, "
                f"{self.items_per_s:.1f} items/s, dim {dim}; {where} -> {self.output}")

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "items_per_s": round(self.items_per_s, 3)}


def _default_id(row: Row, single_input: bool) -> str:
    """Rows without an id are named by position: 'k' for one input file, 'name:k' for several."""
    return str(row.row) if single_input else f"{Path(row.source).name}:{row.row}"


def check_inputs(files: Sequence[Path], columns: Columns, done: dict[str, list], count_lines: bool = True) -> int | None:
    """Refuse unusable inputs (Parquet schemas) before any embedding; the rows left to read, for
    the progress bar's ETA (None when unknown: a .gz input, or `count_lines` off)."""
    total: int | None = 0
    for f in files:
        n = check_input(f, columns, count_lines)
        if n is None or total is None:
            total = None
            continue
        total += n - sum(b - a for a, b in done.get(str(f), ()))
    return total


def run(encoder, files: Sequence[Path], out, done: dict[str, list], *, columns: Columns | None = None,
        chunk_rows: int = 1024, existing: IdSet | None = None, strict: bool = False,
        progress: Progress | None = None, log=None, encode_kwargs: dict | None = None) -> JobSummary:
    """Embed every row of `files` not in `done` into `out` (a `sinks` output already opened)."""
    columns, log = columns or Columns(), log or sys.stderr
    kwargs = dict(encode_kwargs or {}, show_progress=False, on_error="raise" if strict else "skip")
    summary = JobSummary(output=str(out.path), resumed_rows=sum(b - a for spans in done.values() for a, b in spans))
    single = len(files) == 1
    start = time.perf_counter()
    rows = _all_rows(files, columns, done)
    dim = kwargs.get("dim") or encoder.dim
    try:
        while True:
            t0 = time.perf_counter()
            target = min(chunk_rows, out.room() or chunk_rows)
            chunk, consumed = _take(rows, target, existing, single, summary)
            summary.read_seconds += time.perf_counter() - t0
            if not chunk:
                out.add([], np.zeros((0, dim), np.float32), [], None, consumed)
                break
            t0 = time.perf_counter()
            try:
                with warnings.catch_warnings():  # counted in the summary instead of one warning per chunk
                    warnings.filterwarnings("ignore", message=r".*title\(s\) truncated", category=UserWarning)
                    result = encoder.encode_with_report([r.item for r in chunk], **kwargs)
            except EncodeError as err:
                lines = [_failure_line(chunk[f.index], f.reason) for f in err.failures]
                raise JobError(f"{len(lines)} row(s) cannot be embedded (--strict):\n  " + "\n  ".join(lines)) from None
            summary.encode_seconds += time.perf_counter() - t0
            errors: list[str | None] = [None] * len(chunk)
            for f in result.failures:
                row = chunk[f.index]
                errors[f.index] = f"{row.where()}: {f.reason}"
                summary.failures += 1
                if summary.failures <= MAX_REPORTED:
                    print(f"failed: {_failure_line(row, f.reason)}", file=log)
                    summary.failure_samples.append({"source": row.source, "row": row.row, "line": row.line,
                                                    "id": row.id, "reason": f.reason})
                elif summary.failures == MAX_REPORTED + 1:
                    print("failed: ... more failures; each is in the output's error column", file=log)
            summary.truncated += len(result.truncated)
            summary.items += len(chunk)
            out.add([r.id for r in chunk], result.embeddings, errors, result.reasoning, consumed)
            if progress is not None:
                progress.update(len(chunk))
        out.finish(dim)
    except BaseException:  # Ctrl-C, a crash or --strict: nothing half-written stays under a final name
        out.abort()
        raise
    finally:
        if progress is not None:
            progress.close()
    summary.seconds = time.perf_counter() - start
    summary.output_rows, summary.shards = out.rows, out.shards()
    atomic_write(out.summary_path(), json.dumps(summary.to_dict(), indent=1).encode())
    return summary


def _all_rows(files, columns, done) -> Iterator[Row]:
    for f in files:
        yield from read_rows(f, columns, done.get(str(f), ()))


def _take(rows: Iterator[Row], n: int, existing: IdSet | None, single: bool, summary: JobSummary):
    chunk, consumed = [], []
    for row in rows:
        consumed.append((row.source, row.row))
        if row.id is None:
            row.id = _default_id(row, single)
        if existing is not None and existing.contains([row.id])[0]:
            summary.skipped_existing += 1
            continue
        chunk.append(row)
        if len(chunk) == n:
            break
    return chunk, consumed


def _failure_line(row: Row, reason: str) -> str:
    return f"{row.where()} (id {row.id}): {reason}"
