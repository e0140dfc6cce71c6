"""The ids an earlier output already holds, for daily deltas (`--only-new --existing DIR`).

Ids are kept as sorted 16-byte BLAKE2b digests, 16 bytes per id whatever its length
(10^7 ids: 160 MB), with a collision chance far below one in 10^18 even at 10^9 ids.
Only rows that were embedded count: an id whose earlier row failed is tried again.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from pathlib import Path

import numpy as np


def digest(ids: Iterable[str]) -> np.ndarray:
    return np.array([hashlib.blake2b(i.encode("utf-8", "surrogatepass"), digest_size=16).digest() for i in ids],
                    dtype="S16")


class IdSet:
    def __init__(self, digests: np.ndarray):
        self.digests = np.unique(digests) if len(digests) else np.zeros(0, dtype="S16")

    def __len__(self) -> int:
        return len(self.digests)

    def contains(self, ids: list[str]) -> np.ndarray:
        if not len(self.digests) or not ids:
            return np.zeros(len(ids), dtype=bool)
        q = digest(ids)
        at = np.searchsorted(self.digests, q).clip(max=len(self.digests) - 1)
        return self.digests[at] == q


def output_files(path: Path) -> list[Path]:
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise ValueError(f"--existing {path} does not exist")
    return sorted(path.glob("part-*.parquet")) + sorted(p for p in path.glob("*.parquet") if not p.name.startswith("part-"))


def existing_ids(paths: Iterable[Path], skip_unreadable: bool = False) -> IdSet:
    """Ids of embedded rows (error null) in Parquet outputs, read one row group at a time."""
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    parts = []
    for path in paths:
        try:
            pf = pq.ParquetFile(path)
            for batch in pf.iter_batches(columns=["id", "error"], batch_size=65536):
                ok = pc.is_null(batch.column("error"))
                parts.append(digest(pc.filter(batch.column("id"), ok).to_pylist()))
        except Exception as err:  # noqa: BLE001 - a cut-off file from a crashed run
            if skip_unreadable:
                continue
            raise ValueError(f"--existing: cannot read ids from {path} ({err})") from None
    return IdSet(np.concatenate(parts) if parts else np.zeros(0, dtype="S16"))
