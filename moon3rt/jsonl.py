"""JSON lines as moon3rt reads them everywhere (encode, eval, training data).

A record ends at b"\\n" only: `str.splitlines()` also splits on U+2028, U+0085 and other
separators that `json.dumps(ensure_ascii=False)` writes unescaped inside strings, which
would cut one record in two. A UTF-8 byte-order mark on line 1 is dropped, blank lines are
skipped, and each line is decoded on its own, so one bad line never costs the others.
"""

from __future__ import annotations

import gzip
import json
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

BOM = b"\xef\xbb\xbf"


def numbered_lines(lines: Iterable[bytes]) -> Iterator[tuple[int, bytes]]:
    """(1-based line number, raw bytes) of every non-blank line, the BOM dropped from line 1."""
    for number, raw in enumerate(lines, start=1):
        if number == 1 and raw.startswith(BOM):
            raw = raw[len(BOM):]
        if raw.strip():
            yield number, raw


def json_lines(path: Path) -> Iterator[tuple[int, bytes]]:
    """`numbered_lines` of a .jsonl or .jsonl.gz file, read as a stream (binary lines end at b"\n")."""
    opener = gzip.open if path.name.lower().endswith(".gz") else open
    with opener(path, "rb") as f:
        yield from numbered_lines(f)


def decode_line(raw: bytes) -> Any:
    """The JSON value of one line; ValueError saying why not (bad UTF-8 or bad JSON)."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise ValueError(f"not valid UTF-8 (byte 0x{raw[err.start]:02x} at column {err.start + 1})") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        raise ValueError(f"not valid JSON: {err.msg} (column {err.colno})") from None
