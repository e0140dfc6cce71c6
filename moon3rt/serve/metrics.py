"""The server's Prometheus metrics (all named ``moon3rt_*``), in a registry of their own.

One registry per server, so that several servers in one process (tests) do not share
counts. Latencies are in seconds, as Prometheus names them.
"""

from __future__ import annotations

import collections
import threading
import time

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
TOKEN_BUCKETS = (64, 256, 1024, 2048, 4096, 8192, 16384, 32768, 65536)
RATE_WINDOW_S = 10.0


class Metrics:
    def __init__(self):
        self.registry = r = CollectorRegistry()
        self.queue_depth = Gauge("moon3rt_queue_depth", "Items waiting for a batch (prepared or being prepared)",
                                 registry=r)
        self.requests_in_flight = Gauge("moon3rt_requests_in_flight", "Embedding requests being handled",
                                        registry=r)
        self.batch_size = Histogram("moon3rt_batch_size", "Items per model batch", buckets=SIZE_BUCKETS, registry=r)
        self.batch_tokens = Histogram("moon3rt_batch_tokens", "Decoder tokens plus vision patches per model batch",
                                      buckets=TOKEN_BUCKETS, registry=r)
        self.requests = Counter("moon3rt_requests", "Embedding requests by outcome", ["outcome"], registry=r)
        self.items = Counter("moon3rt_items", "Items by outcome (ok, invalid, failed, dropped)", ["outcome"],
                             registry=r)
        self.queue_wait = Histogram("moon3rt_queue_wait_seconds", "Time an item waits between preparation and "
                                    "its batch", buckets=LATENCY_BUCKETS, registry=r)
        self.preprocess = Histogram("moon3rt_preprocess_seconds", "Decode, resize and tokenise, per request",
                                    buckets=LATENCY_BUCKETS, registry=r)
        self.model = Histogram("moon3rt_model_seconds", "Model time per batch", buckets=LATENCY_BUCKETS, registry=r)
        self.request_latency = Histogram("moon3rt_request_seconds", "End to end, body received to response ready",
                                         buckets=LATENCY_BUCKETS, registry=r)
        self.items_per_second = Gauge("moon3rt_items_per_second",
                                      f"Items embedded per second over the last {RATE_WINDOW_S:g} s", registry=r)
        self._done: collections.deque[tuple[float, int]] = collections.deque()
        self._lock = threading.Lock()
        self.items_per_second.set_function(self.rate)

    def embedded(self, n: int) -> None:
        """Count `n` items embedded now (for the items/s gauge and Retry-After)."""
        now = time.monotonic()
        with self._lock:
            self._done.append((now, n))
            self._trim(now)

    def rate(self) -> float:
        now = time.monotonic()
        with self._lock:
            self._trim(now)
            return sum(n for _, n in self._done) / RATE_WINDOW_S

    def _trim(self, now: float) -> None:
        while self._done and self._done[0][0] < now - RATE_WINDOW_S:
            self._done.popleft()

    def exposition(self) -> bytes:
        return generate_latest(self.registry)
