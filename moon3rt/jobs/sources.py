"""Input rows for catalogue jobs: JSON lines (plain or .gz) and Parquet, read as a stream.

Every row knows where it came from (file, row number and, for JSON lines, line number),
so a bad row is reported where a user can find it and a job can resume by row range.

JSON lines are split on ``\\n`` only (``\\r\\n`` works too): ``json.dumps(...,
ensure_ascii=False)`` writes U+2028, U+2029 and U+0085 unescaped, and splitting on them
would cut one record in two and shift every later row. A UTF-8 byte-order mark is
accepted; a line that is not UTF-8 or not JSON becomes an error for that row alone.
Blank lines are skipped and are not rows: row k is the k-th non-blank line.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..jsonl import decode_line, json_lines

JSONL_SUFFIXES = (".jsonl", ".ndjson", ".json", ".jsonl.gz", ".ndjson.gz", ".json.gz")
PARQUET_SUFFIXES = (".parquet", ".pq")
READ_BATCH = 256  # Parquet rows decoded at a time


@dataclass(frozen=True)
class Columns:
    """Which field holds what. `image` may hold a path (relative to the input file), a
    ``file://`` URI, encoded image bytes, a list of those, or a ``{bytes, path}`` struct
    (the Hugging Face datasets image layout). JSON lines also accept ``images`` (a list)."""

    id: str = "id"
    text: str = "text"
    image: str = "image"


@dataclass
class Row:
    """One input row: where it is, its id (None: not given), and the item for `encode`
    (a dict) or the error that makes it unusable."""

    source: str
    row: int
    line: int | None
    id: str | None
    item: Any

    def where(self) -> str:
        place = f"line {self.line}" if self.line is not None else f"row {self.row}"
        return f"{self.source} {place}"


class InputError(ValueError):
    """An input that cannot be read at all (missing, unknown format, missing columns)."""


def input_files(paths: Sequence[str | os.PathLike]) -> list[Path]:
    """The files a job reads, in order: each path, or a directory's JSONL/Parquet files sorted by name."""
    files: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            found = sorted(f for f in p.rglob("*") if f.is_file() and input_kind(f) is not None)
            if not found:
                raise InputError(f"input directory {p} holds no .jsonl, .jsonl.gz or .parquet files")
            files.extend(found)
        elif p.is_file():
            if input_kind(p) is None:
                raise InputError(f"input {p}: unknown format; expected one of "
                                 f"{', '.join(JSONL_SUFFIXES + PARQUET_SUFFIXES)}")
            files.append(p)
        else:
            raise InputError(f"input {p} does not exist")
    return files


def input_kind(path: Path) -> str | None:
    name = path.name.lower()
    if name.endswith(PARQUET_SUFFIXES):
        return "parquet"
    if name.endswith(JSONL_SUFFIXES):
        return "jsonl"
    return None


def check_input(path: Path, columns: Columns, count_lines: bool = True) -> int | None:
    """Open `path` far enough to refuse it early (Parquet: its schema); its row count if cheap to know."""
    if input_kind(path) == "parquet":
        pf = _parquet_file(path)
        _parquet_columns(path, pf.schema_arrow, columns)
        return pf.metadata.num_rows
    if not count_lines or path.name.lower().endswith(".gz"):
        return None
    with open(path, "rb") as f:  # a quick pass: counting lines costs far less than embedding them
        return sum(1 for line in f if line.strip())


def read_rows(path: Path, columns: Columns, skip: Sequence[tuple[int, int]] = ()) -> Iterator[Row]:
    """Rows of one file in order, leaving out those in the half-open ranges `skip` (already done)."""
    done = _Ranges(skip)
    if input_kind(path) == "parquet":
        yield from _parquet_rows(path, columns, done)
    else:
        yield from _jsonl_rows(path, columns, done)


class _Ranges:
    def __init__(self, ranges: Sequence[tuple[int, int]]):
        self.ranges = sorted((int(a), int(b)) for a, b in ranges if b > a)

    def __contains__(self, row: int) -> bool:
        # rows arrive in increasing order, so drop ranges already passed
        while self.ranges and self.ranges[0][1] <= row:
            self.ranges.pop(0)
        return bool(self.ranges) and self.ranges[0][0] <= row

    def covers(self, start: int, stop: int) -> bool:
        return any(a <= start and stop <= b for a, b in self.ranges)


# ---------------------------------------------------------------------------- JSON lines
def _jsonl_rows(path: Path, columns: Columns, done: _Ranges) -> Iterator[Row]:
    source = str(path)
    row = 0
    for number, raw in json_lines(path):
        if row not in done:
            yield parse_json_line(raw, source, row, number, columns, path.parent)
        row += 1


def parse_json_line(raw: bytes, source: str, row: int, line: int, columns: Columns, base: Path | None) -> Row:
    """One JSON line as a Row; an undecodable or malformed line becomes that row's error."""
    try:
        obj = decode_line(raw)
    except ValueError as err:
        return Row(source, row, line, None, err)
    if isinstance(obj, str):  # a bare JSON string is a text item
        return Row(source, row, line, None, obj)
    if not isinstance(obj, dict):
        return Row(source, row, line, None,
                   ValueError(f"a JSON {type(obj).__name__}; expected an object or a string"))
    images = obj.get(columns.image)
    if images is None and columns.image == "image":
        images = obj.get("images")
    return _item_row(source, row, line, obj.get(columns.id), obj.get(columns.text), images, base,
                     lambda: f"no {columns.text!r} or {columns.image!r} field (keys: {sorted(str(k) for k in obj)})")


def _item_row(source: str, row: int, line: int | None, id_, text, images, base: Path | None,
              empty: Callable[[], str]) -> Row:
    """The Row of one record's id, text and image value(s); `empty()` says why when both are absent."""
    item: dict[str, Any] = {}
    if text is not None:
        item["text"] = text
    if images is not None:
        item["images"] = [_image_source(v, base) for v in (images if isinstance(images, list) else [images])]
        refused = [v for v in item["images"] if isinstance(v, Exception)]
        if refused:
            return Row(source, row, line, _id(id_), refused[0])
    return Row(source, row, line, _id(id_), item if item else ValueError(empty()))


def _id(value) -> str | None:
    return None if value is None else str(value)


def _image_source(value, base: Path | None):
    """A path (relative to the input file), a file:// URI or bytes; other URIs are refused by name."""
    if isinstance(value, dict) and ("bytes" in value or "path" in value):  # {bytes, path} struct
        value = value.get("bytes") or value.get("path")
    if isinstance(value, str):
        if value.startswith("file://"):
            return Path(value[len("file://"):])
        if "://" in value:
            return ValueError(f"image {value!r}: only local paths and file:// URIs are read "
                              "(images are never fetched from the network)")
        return Path(value) if base is None else base / value
    return value  # bytes; anything else is refused by encode with its type


# ---------------------------------------------------------------------------- Parquet
def _parquet_file(path: Path):
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise InputError("Parquet input needs pyarrow: pip install 'moon3rt[parquet]'") from None
    try:
        return pq.ParquetFile(path)
    except (OSError, ValueError) as err:  # ArrowInvalid is a ValueError
        raise InputError(f"input {path}: not a readable Parquet file ({err})") from None


def _parquet_columns(path: Path, schema, columns: Columns) -> list[str]:
    import pyarrow as pa

    names = set(schema.names)
    wanted = [c for c in (columns.id, columns.text, columns.image) if c in names]
    if columns.text not in names and columns.image not in names:
        raise InputError(f"input {path}: no {columns.text!r} or {columns.image!r} column "
                         f"(columns: {sorted(names)}); name them with --text-column/--image-column")
    if columns.text in names:
        t = schema.field(columns.text).type
        if not (pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_null(t)):
            raise InputError(f"input {path}: column {columns.text!r} is {t}, expected strings")
    return wanted


def _parquet_rows(path: Path, columns: Columns, done: _Ranges) -> Iterator[Row]:
    pf = _parquet_file(path)
    wanted = _parquet_columns(path, pf.schema_arrow, columns)
    source, base = str(path), path.parent
    start = 0
    for g in range(pf.metadata.num_row_groups):
        n = pf.metadata.row_group(g).num_rows
        if done.covers(start, start + n):  # a finished row group is never decoded
            start += n
            continue
        row = start
        for batch in pf.iter_batches(batch_size=READ_BATCH, row_groups=[g], columns=wanted, use_threads=False):
            cols = {name: batch.column(name).to_pylist() for name in wanted}
            for k in range(batch.num_rows):
                if row + k not in done:
                    yield parquet_row(cols, k, source, row + k, columns, base)
            row += batch.num_rows
        start += n


def parquet_row(cols: dict, k: int, source: str, row: int, columns: Columns, base: Path) -> Row:
    def value(name: str):
        return cols[name][k] if name in cols else None

    return _item_row(source, row, None, value(columns.id), value(columns.text), value(columns.image), base,
                     lambda: f"{columns.text!r} and {columns.image!r} are both null")
