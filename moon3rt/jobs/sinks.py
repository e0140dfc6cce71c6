"""Where a job's vectors go: one .npy or .parquet file, or a directory of Parquet shards.

Nothing half-written is ever visible under a final name. A file output is written to a
temporary file in the target directory and renamed at the end. A shard directory gets
``part-00000.parquet``, ``part-00001.parquet``, ... each written under a temporary name
and renamed when complete, then recorded in ``_manifest.json`` (itself replaced
atomically) with the input row ranges it covers. A shard on disk but missing from the
manifest (a crash between the two renames) is removed on resume and redone, so every
input row ends up in exactly one recorded shard.
"""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path
from typing import Any

import numpy as np

MANIFEST = "_manifest.json"  # a leading _ keeps pyarrow and Ray from reading it as data
SUMMARY = "_summary.json"
FORMAT = "moon3rt-embeddings"
OUTPUT_DTYPES = {"float32": np.float32, "float16": np.float16}


class OutputError(ValueError):
    """An output that cannot be written or resumed; raised before any input is read."""


def atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _prepare_dir(path: Path) -> None:
    try:
        path.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        raise OutputError(f"output {path}: a parent is a file, not a directory") from None
    except OSError as err:
        raise OutputError(f"output {path}: cannot create the directory ({err.strerror})") from None
    if not os.access(path, os.W_OK | os.X_OK):
        raise OutputError(f"output {path}: directory is not writable")


def arrow_table(ids: list[str], vectors: np.ndarray, errors: list[str | None],
                reasoning: list[str | None] | None, dtype: str):
    """id, embedding (fixed-size list, null for a failed row), error[, reasoning]."""
    import pyarrow as pa

    dim = vectors.shape[1]
    flat = pa.array(np.ascontiguousarray(vectors, dtype=OUTPUT_DTYPES[dtype]).reshape(-1))
    failed = np.array([e is not None for e in errors], dtype=bool)
    embedding = pa.FixedSizeListArray.from_arrays(flat, dim, mask=pa.array(failed) if failed.any() else None)
    columns = {"id": pa.array(ids, pa.string()), "embedding": embedding, "error": pa.array(errors, pa.string())}
    if reasoning is not None:
        columns["reasoning"] = pa.array(reasoning, pa.string())
    return pa.table(columns)


def _pyarrow():
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        raise OutputError("Parquet output needs pyarrow: pip install 'moon3rt[parquet]'") from None
    return pa, pq


class NpyOutput:
    """vectors.npy (rows in input order, NaN for failed rows) plus, in reasoning mode, a
    ``.reasoning.jsonl`` sidecar. Held in memory until the end: for small jobs."""

    resumable = False

    def __init__(self, path: Path, dtype: str = "float32"):
        self.path, self.dtype = path, dtype
        self.parts: list[np.ndarray] = []
        self.reasoning: list[tuple[str, str | None]] | None = None
        self.rows = 0

    def open(self, job: dict) -> dict[str, list]:
        _prepare_dir(self.path.parent)
        self.tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        try:
            self.tmp.open("wb").close()  # proves the directory takes a new file before any work
        except OSError as err:
            raise OutputError(f"output {self.path}: cannot write there ({err.strerror})") from None
        return {}

    def room(self) -> int | None:
        return None

    def add(self, ids, vectors, errors, reasoning, consumed) -> None:
        self.parts.append(vectors.astype(OUTPUT_DTYPES[self.dtype]))
        if reasoning is not None:
            if self.reasoning is None:
                self.reasoning = []
            self.reasoning.extend(zip(ids, reasoning))
        self.rows += len(ids)

    def finish(self, dim: int) -> None:
        vectors = np.concatenate(self.parts) if self.parts else np.zeros((0, dim), OUTPUT_DTYPES[self.dtype])
        with open(self.tmp, "wb") as f:
            np.save(f, vectors)
        if self.reasoning is not None:
            lines = "".join(json.dumps({"id": i, "reasoning": t}, ensure_ascii=False) + "\n" for i, t in self.reasoning)
            atomic_write(self.path.with_suffix(".reasoning.jsonl"), lines.encode("utf-8"))
        os.replace(self.tmp, self.path)

    def abort(self) -> None:
        self.tmp.unlink(missing_ok=True)

    def summary_path(self) -> Path:
        return self.path.with_suffix(".summary.json")

    def shards(self) -> int:
        return 0


class ParquetFileOutput(NpyOutput):
    """vectors.parquet, streamed one row group per chunk into a temporary file, renamed at the end."""

    def open(self, job: dict) -> dict[str, list]:
        _pyarrow()
        super().open(job)
        self.writer = None
        return {}

    def add(self, ids, vectors, errors, reasoning, consumed) -> None:
        _, pq = _pyarrow()
        if not ids:  # the end of the input (or rows all skipped): nothing to write
            return
        table = arrow_table(ids, vectors, errors, reasoning, self.dtype)
        if self.writer is None:
            self.writer = pq.ParquetWriter(self.tmp, table.schema)
        self.writer.write_table(table)
        self.rows += len(ids)

    def finish(self, dim: int) -> None:
        _, pq = _pyarrow()
        if self.writer is None:  # no rows: an empty file with the schema
            self.writer = pq.ParquetWriter(self.tmp, arrow_table([], np.zeros((0, dim)), [], None, self.dtype).schema)
        self.writer.close()
        os.replace(self.tmp, self.path)

    def abort(self) -> None:
        if getattr(self, "writer", None) is not None:
            with contextlib.suppress(Exception):  # closing only to release the file; it is deleted next
                self.writer.close()
        super().abort()


class ShardedOutput:
    """A directory of Parquet shards with a manifest: resumable, and the only output for big jobs."""

    resumable = True

    def __init__(self, path: Path, dtype: str = "float32", shard_rows: int = 100_000, resume: bool = False):
        self.path, self.dtype, self.shard_rows, self.resume = path, dtype, shard_rows, resume
        self.writer = None
        self.rows = 0
        self.pending: dict[str, list[list[int]]] = {}  # input ranges consumed since the last shard

    # -- set-up, before any input is read
    def open(self, job: dict) -> dict[str, list]:
        _pyarrow()
        _prepare_dir(self.path)
        manifest_path = self.path / MANIFEST
        if manifest_path.exists():
            try:
                manifest = json.loads(manifest_path.read_text())
            except (OSError, ValueError) as err:
                raise OutputError(f"output {self.path}: unreadable {MANIFEST} ({err})") from None
            if not self.resume:
                raise OutputError(f"output {self.path} already holds a job ({len(manifest['shards'])} shards); "
                                  "pass --resume to continue it, or choose another directory")
            for key, value in job.items():
                if manifest["job"].get(key) != value:
                    raise OutputError(f"cannot resume {self.path}: it was started with {key}={manifest['job'].get(key)!r}, "
                                      f"this run has {key}={value!r}")
        else:
            leftovers = [p.name for p in self.path.glob("part-*.parquet")]
            if leftovers and not self.resume:
                raise OutputError(f"output {self.path} holds shards ({leftovers[0]}, ...) but no {MANIFEST}; "
                                  "choose an empty directory")
            manifest = {"format": FORMAT, "version": 1, "job": job, "shards": [], "complete": False}
        recorded = {s["file"] for s in manifest["shards"]}
        for stale in list(self.path.glob(".part-*.tmp")) + [p for p in self.path.glob("part-*.parquet")
                                                             if p.name not in recorded]:
            stale.unlink()  # a shard cut off by a crash, or renamed but never recorded: redone below
        probe = self.path / f".probe.{os.getpid()}.tmp"
        try:
            probe.open("wb").close()
            probe.unlink()
        except OSError as err:
            raise OutputError(f"output {self.path}: cannot write there ({err.strerror})") from None
        manifest["complete"] = False
        self.manifest = manifest
        self._save_manifest()  # from now on the directory is this job's: a rerun must say --resume
        self.rows = sum(s["rows"] for s in manifest["shards"])
        done: dict[str, list] = {}
        for shard in manifest["shards"]:
            for source, start, stop in shard["ranges"]:
                done.setdefault(source, []).append((start, stop))
        return done

    # -- writing
    def room(self) -> int:
        return self.shard_rows - (self.writer_rows if self.writer is not None else 0)

    def add(self, ids, vectors, errors, reasoning, consumed) -> None:
        _, pq = _pyarrow()
        self._consume(consumed)
        if not ids:
            return
        table = arrow_table(ids, vectors, errors, reasoning, self.dtype)
        if self.writer is None:
            self.index = len(self.manifest["shards"])
            self.name = f"part-{self.index:05d}.parquet"
            self.tmp = self.path / f".{self.name}.tmp"
            self.writer = pq.ParquetWriter(self.tmp, table.schema)
            self.writer_rows = self.writer_failures = 0
        self.writer.write_table(table)
        self.writer_rows += len(ids)
        self.writer_failures += sum(e is not None for e in errors)
        self.rows += len(ids)
        if self.writer_rows >= self.shard_rows:
            self._close_shard()

    def _consume(self, consumed) -> None:
        for source, row in consumed:
            spans = self.pending.setdefault(source, [])
            if spans and spans[-1][1] == row:
                spans[-1][1] = row + 1
            else:
                spans.append([row, row + 1])

    def _close_shard(self) -> None:
        self.writer.close()
        with open(self.tmp, "rb+") as f:
            os.fsync(f.fileno())
        final = self.path / self.name
        os.replace(self.tmp, final)
        ranges = [[source, a, b] for source, spans in self.pending.items() for a, b in spans]
        self.manifest["shards"].append({"file": self.name, "rows": self.writer_rows,
                                        "failures": self.writer_failures, "ranges": ranges})
        self._save_manifest()
        self.writer, self.pending = None, {}

    def _save_manifest(self) -> None:
        atomic_write(self.path / MANIFEST, json.dumps(self.manifest, indent=1).encode())
        _fsync_dir(self.path)

    def finish(self, dim: int) -> None:
        if self.writer is not None:
            self._close_shard()
        self.manifest["complete"] = True
        self._save_manifest()

    def abort(self) -> None:
        if self.writer is not None:
            with contextlib.suppress(Exception):  # closing only to release the file; it is deleted next
                self.writer.close()
            self.tmp.unlink(missing_ok=True)
            self.writer = None

    def summary_path(self) -> Path:
        return self.path / SUMMARY

    def shards(self) -> int:
        return len(self.manifest["shards"])


def output_for(path: Path, dtype: str, shard_rows: int, resume: bool) -> Any:
    """.npy or .parquet: one file; a path without a suffix (or an existing directory): a shard directory."""
    if path.suffix not in ("", ".npy", ".parquet") and not path.is_dir():
        raise OutputError(f"--output must end in .npy or .parquet, or name a directory for Parquet shards; "
                          f"got {path.name}")
    if path.suffix == ".npy":
        out = NpyOutput(path, dtype)
    elif path.suffix == ".parquet":
        out = ParquetFileOutput(path, dtype)
    else:
        return ShardedOutput(path, dtype, shard_rows, resume)
    if resume:
        raise OutputError(f"--resume needs a shard directory as --output (got the file {path.name}); "
                          "a .npy or .parquet file is written whole at the end")
    return out
