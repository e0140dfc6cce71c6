"""Progress for long jobs: a tqdm bar on a terminal, a plain line every so often in a log.

tqdm redraws with ``\\r``, which a log file keeps as one ever-growing line; when stderr
is not a terminal the job prints ``encode: 12000/100000 rows (12%), 310.2 items/s, ETA 4m12s``
lines instead, at most one per `interval` seconds.
"""

from __future__ import annotations

import sys
import time

from tqdm.auto import tqdm


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    if seconds >= 3600:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    return f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"


class Progress:
    def __init__(self, total: int | None, enabled: bool = True, interval: float = 30.0, stream=None):
        self.stream = stream or sys.stderr
        self.total, self.count, self.interval = total, 0, interval
        self.start = self.last = time.perf_counter()
        self.enabled = enabled
        tty = enabled and hasattr(self.stream, "isatty") and self.stream.isatty()
        self.bar = tqdm(total=total, unit="item", desc="encode", file=self.stream, smoothing=0.1) if tty else None

    def update(self, n: int) -> None:
        self.count += n
        if self.bar is not None:
            self.bar.update(n)
            return
        now = time.perf_counter()
        if self.enabled and now - self.last >= self.interval:
            self.last = now
            print(self.line(now), file=self.stream, flush=True)

    def line(self, now: float) -> str:
        rate = self.count / max(now - self.start, 1e-9)
        if self.total:
            eta = (self.total - self.count) / rate if rate > 0 else float("inf")
            return (f"encode: {self.count}/{self.total} rows ({100 * self.count / self.total:.0f}%), {rate:.1f} items/s, "
                    f"ETA {_duration(eta) if eta != float('inf') else '?'}")
        return f"encode: {self.count} rows, {rate:.1f} items/s"

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
