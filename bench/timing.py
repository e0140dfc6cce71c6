"""Timing primitives: a warmed-up, synchronised loop, peak memory, the matmul ceiling.

Every timed call is bracketed by a device synchronisation, so a batch's latency is
the wall time from handing its host tensors over to having its vectors on the device
(work queued asynchronously cannot leak into the next measurement).
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

MIB = 1024 * 1024


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ------------------------------------------------------------------------------ memory
def _proc_status_kib(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            match = re.search(rf"^{field}:\s+(\d+) kB", f.read(), re.MULTILINE)
    except OSError:
        return None
    return int(match.group(1)) if match else None


class PeakMemory:
    """Peak device memory over a region: `torch.cuda.max_memory_allocated` on a GPU, the
    process's peak resident set (VmHWM, reset through /proc/self/clear_refs) on the CPU."""

    def __init__(self, device: torch.device):
        self.device = device
        self.kind = "cuda max_memory_allocated" if device.type == "cuda" else "process peak RSS"
        self.start_mib = self.peak_mib = float("nan")

    def __enter__(self) -> "PeakMemory":
        if self.device.type == "cuda":
            synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.start_mib = torch.cuda.memory_allocated(self.device) / MIB
        else:
            try:
                with open("/proc/self/clear_refs", "w") as f:
                    f.write("5")  # resets VmHWM to the current RSS
            except OSError:
                self.kind = "process peak RSS since start (no reset)"
            rss = _proc_status_kib("VmRSS")
            self.start_mib = rss / 1024 if rss is not None else float("nan")
        return self

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            synchronize(self.device)
            self.peak_mib = torch.cuda.max_memory_allocated(self.device) / MIB
        else:
            hwm = _proc_status_kib("VmHWM")
            self.peak_mib = hwm / 1024 if hwm is not None else float("nan")


# ------------------------------------------------------------------------------- timing
@dataclass
class Timing:
    latencies_s: list[float]  # one per timed call
    warmup_s: float  # wall time of the warm-up, compilation included

    def percentile_ms(self, q: float) -> float:
        return float(np.percentile(self.latencies_s, q) * 1e3)

    @property
    def total_s(self) -> float:
        return float(sum(self.latencies_s))


def time_calls(run: Callable, inputs: Sequence, device: torch.device, duration_s: float,
               warmup_s: float, min_calls: int = 3) -> Timing:
    """Warm up (every input once, then until `warmup_s`), then time calls cycling over `inputs`
    until `duration_s` of timed work and at least `min_calls` calls."""
    start = time.perf_counter()
    calls = 0
    while calls < len(inputs) or time.perf_counter() - start < warmup_s:
        run(inputs[calls % len(inputs)])
        calls += 1
    synchronize(device)
    warmup = time.perf_counter() - start
    latencies: list[float] = []
    while len(latencies) < min_calls or sum(latencies) < duration_s:
        x = inputs[len(latencies) % len(inputs)]
        synchronize(device)
        t0 = time.perf_counter()
        run(x)
        synchronize(device)
        latencies.append(time.perf_counter() - t0)
    return Timing(latencies, warmup)


def copy_bandwidth(device: torch.device) -> float:
    """Device memory bandwidth (GB/s) from a large device-to-device copy (read + write counted)."""
    n = (1 << 28) if device.type == "cuda" else (1 << 24)
    a = torch.empty(n, dtype=torch.uint8, device=device)
    b = torch.empty_like(a)
    for _ in range(3):
        b.copy_(a)
    synchronize(device)
    t0 = time.perf_counter()
    for _ in range(10):
        b.copy_(a)
    synchronize(device)
    return 2 * n * 10 / (time.perf_counter() - t0) / 1e9


def matmul_ceiling(device: torch.device, dtype: torch.dtype, budget_s: float = 1.0) -> dict:
    """Measured dense GEMM rate (TFLOP/s): the roofline the model's FLOP rate is compared with.

    A large square product in the run's dtype on random data (zeros run faster than real
    data on some GPUs), over three operand pairs so that no pair stays in cache; median of
    the timed products.
    """
    n = 8192 if device.type == "cuda" else 1024
    gen = torch.Generator(device=device).manual_seed(0)
    pairs = [(torch.randn(n, n, generator=gen, device=device).to(dtype),
              torch.randn(n, n, generator=gen, device=device).to(dtype)) for _ in range(3)]
    for a, b in pairs:  # warm-up: library handles, clocks
        a @ b
    synchronize(device)
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < 5 or (time.perf_counter() - start < budget_s and len(times) < 50):
        a, b = pairs[len(times) % 3]
        synchronize(device)
        t0 = time.perf_counter()
        a @ b
        synchronize(device)
        times.append(time.perf_counter() - t0)
    seconds = float(np.median(times))
    del pairs
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return {"tflops": 2 * n**3 / seconds / 1e12, "shape": [n, n, n], "dtype": str(dtype).replace("torch.", ""),
            "median_ms": seconds * 1e3, "repeats": len(times)}
