"""The dynamic batcher: one queue and one worker thread that owns the `Encoder`.

Requests' items are prepared (`Encoder.prepare`: decode, resize, tokenise) in a thread
pool, then queued. The worker takes items in arrival order into a batch under the same
`TokenBudget` as `Encoder.encode`, runs `Encoder.embed_prepared` (which retries a failing
batch item by item, as `encode` does) and hands each request its rows. Many one-item
requests share a batch; a request with many items spans several.

When to run: as soon as the queue holds a full batch, or nothing more is being prepared,
or the oldest queued item has waited `max_wait_ms`. So a lone request runs at once, and
under load items gather while the model is busy with the batch before.

Items that need reasoning (one `ReasoningPlan`) and items that do not are batched apart.
An exception that `embed_prepared` does not turn into an item failure (a bug, or a broken
device, which a batch whose every item failed is checked for) stops the worker: every
waiting request gets 503 and `/health` turns 503.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import math
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from ..api import Encoder
from ..batching import TokenBudget
from ..items import ItemError
from ..prompt import PreparedItem, ReasoningPlan
from .errors import ItemsRejected, QueueFull, Unavailable
from .metrics import Metrics

log = logging.getLogger("moon3rt.serve")


@dataclass(eq=False)
class Job:
    """One request's items on their way through the batcher; `future` resolves when all are done."""

    n: int
    plan: ReasoningPlan | None
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future
    rows: np.ndarray | None = None  # (n, full dim) raw model outputs
    texts: list[str | None] | None = None
    failures: list[ItemError] = field(default_factory=list)
    prompt_tokens: int = 0
    remaining: int = 0
    queued_at: float = 0.0
    prepared: list = field(default_factory=list)  # per item while preparing: PreparedItem | ItemError | None
    unprepared: int = 0
    submitted_at: float = 0.0
    prepare_s: float = 0.0  # decode, resize, tokenise (all items, in the pool)
    queue_s: float | None = None  # until its first batch started
    model_s: float = 0.0  # summed over the batches it took part in
    cancelled: bool = False


@dataclass(eq=False)
class _Entry:
    job: Job
    index: int  # position in the request's input
    prepared: PreparedItem
    cost: int


class Batcher:
    """Queue, admission limits and one batching worker per `Encoder` (one Encoder per device).

    Workers take batches from the one shared queue; preparation uses the first encoder's
    `prepare` (it runs on the host, the same for every device).
    """

    def __init__(self, encoders: Encoder | Sequence[Encoder], metrics: Metrics, *, max_batch_tokens: int = 16384,
                 max_batch_items: int = 64, max_wait_ms: float = 5.0, max_queue_items: int = 1024,
                 workers: int = 4, max_image_pixels: int = 40_000_000):
        for name, value in (("max_batch_tokens", max_batch_tokens), ("max_batch_items", max_batch_items),
                            ("max_queue_items", max_queue_items), ("workers", workers),
                            ("max_image_pixels", max_image_pixels)):
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if max_wait_ms < 0:
            raise ValueError(f"max_wait_ms must be >= 0, got {max_wait_ms!r}")
        self.encoders = [encoders] if isinstance(encoders, Encoder) or not isinstance(encoders, Sequence) \
            else list(encoders)
        if not self.encoders:
            raise ValueError("the batcher needs at least one Encoder")
        self.encoder, self.metrics = self.encoders[0], metrics
        self.max_batch_tokens, self.max_batch_items = max_batch_tokens, max_batch_items
        self.max_wait_s, self.max_queue_items = max_wait_ms / 1000, max_queue_items
        self.max_image_pixels = max_image_pixels
        self.pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="moon3rt-prepare")
        self._cond = threading.Condition()
        # one lane per reasoning plan (None: direct mode); each lane is FIFO
        self._lanes: dict[ReasoningPlan | None, collections.deque[_Entry]] = {}
        self._lane_cost: dict[ReasoningPlan | None, int] = {}
        self._admitted = 0  # items admitted and not yet in a batch: preparing or queued
        self._preparing = 0
        self._running: dict[int, list[_Entry]] = {}  # per worker, the batch in the model
        self._closing = False
        self.error: str | None = None  # why the worker stopped, once it has
        self._threads = [threading.Thread(target=self._work, args=(k,), name=f"moon3rt-batcher-{k}", daemon=True)
                         for k in range(len(self.encoders))]

    # ------------------------------------------------------------------ state
    def start(self) -> None:
        for thread in self._threads:
            thread.start()

    def problem(self) -> str | None:
        """Why the batcher cannot serve right now, or None."""
        if self.error is not None:
            return f"the batcher stopped: {self.error}"
        if self._closing:
            return "the server is shutting down"
        if not all(thread.is_alive() for thread in self._threads):
            return "the batcher is not running"
        return None

    @property
    def queued_items(self) -> int:
        return self._admitted

    # ------------------------------------------------- admission and preparation
    def submit(self, raw: Sequence[Any], resolve: Callable[[Any, int], Any], plan: ReasoningPlan | None) -> Job:
        """Admit a request and prepare its items in the pool; the last one prepared queues them all.

        resolve(obj, index): an HTTP input as an `Encoder.prepare` item (raises `ItemError`).
        Raises `QueueFull` (429) or `Unavailable` (503) when the request cannot be admitted.
        `job.future` then resolves once every item is embedded, or fails with `ItemsRejected`
        (422, naming every bad item) or `Unavailable`.
        """
        n = len(raw)
        loop = asyncio.get_running_loop()
        job = Job(n=n, plan=plan, loop=loop, future=loop.create_future(), remaining=n,
                  prepared=[None] * n, unprepared=n, submitted_at=time.perf_counter())
        with self._cond:
            problem = self.problem()
            if problem is not None:
                raise Unavailable(problem)
            if self._admitted + n > self.max_queue_items:
                raise QueueFull(self._admitted, self.max_queue_items, self._retry_after())
            self._admitted += n
            self._preparing += n
            self.metrics.queue_depth.set(self._admitted)
        for i in range(n):
            self.pool.submit(self._prepare_one, job, raw, resolve, i)
        return job

    def _retry_after(self) -> int:
        """Seconds until the queue has drained at the recent rate (at least 1)."""
        rate = self.metrics.rate()
        return max(1, math.ceil(self._admitted / rate)) if rate > 0 else 1

    def _prepare_one(self, job: Job, raw: Sequence[Any], resolve, i: int) -> None:
        result: PreparedItem | ItemError | None = None
        if not job.cancelled:
            try:
                result = self.encoder.prepare(resolve(raw[i], i), i, reasoning=job.plan is not None,
                                              max_image_pixels=self.max_image_pixels)
            except ItemError as err:
                result = err.detached()  # a kept traceback would hold the item's bytes
            except Exception as err:  # noqa: BLE001 - fails this item, never the pool or other requests
                result = ItemError(i, f"preprocessing failed: {type(err).__name__}: {err}")
        error = None
        with self._cond:
            job.prepared[i] = result
            job.unprepared -= 1
            if job.unprepared:
                return
            self._preparing -= job.n
            job.prepare_s = time.perf_counter() - job.submitted_at
            failures = [r for r in job.prepared if isinstance(r, ItemError)]
            if job.cancelled:  # its room was given back when it was cancelled
                self._cond.notify_all()
                return
            if failures or self.error is not None:
                self._admitted -= job.n
                self.metrics.queue_depth.set(self._admitted)
                self.metrics.items.labels("invalid").inc(len(failures))
                error = ItemsRejected(failures) if failures else Unavailable(f"the batcher stopped: {self.error}")
            else:
                job.prompt_tokens = sum(p.num_tokens for p in job.prepared)
                job.queued_at = time.perf_counter()
                lane = self._lanes.setdefault(job.plan, collections.deque())
                for k, p in enumerate(job.prepared):
                    cost = Encoder.batch_cost(p, job.plan)
                    lane.append(_Entry(job, k, p, cost))
                    self._lane_cost[job.plan] = self._lane_cost.get(job.plan, 0) + cost
            job.prepared = []  # the entries hold the items now
            self._cond.notify_all()
        self.metrics.preprocess.observe(job.prepare_s)
        if error is not None:
            _resolve(job, error)

    def cancel(self, job: Job) -> None:
        """Drop a request whose client has gone: its items leave the queue (or are never prepared);
        items already in a running batch finish unseen."""
        with self._cond:
            if job.cancelled:
                return
            job.cancelled = True
            if job.unprepared:
                dropped = job.n
            else:
                lane = self._lanes.get(job.plan, collections.deque())
                kept = collections.deque(e for e in lane if e.job is not job)
                dropped = len(lane) - len(kept)
                if dropped:
                    self._lanes[job.plan] = kept
                    self._lane_cost[job.plan] = sum(e.cost for e in kept)
            if dropped:
                self._admitted -= dropped
                self.metrics.queue_depth.set(self._admitted)
                self.metrics.items.labels("dropped").inc(dropped)
            self._cond.notify_all()

    # --------------------------------------------------------------- worker
    def _oldest_lane(self) -> ReasoningPlan | None | bool:
        """The lane whose head item has waited longest; False when all are empty."""
        heads = [(lane[0].job.queued_at, key) for key, lane in self._lanes.items() if lane]
        return min(heads, key=lambda h: h[0])[1] if heads else False

    def _full(self, key) -> bool:
        return (len(self._lanes[key]) >= self.max_batch_items
                or self._lane_cost[key] >= self.max_batch_tokens)

    def _next_batch(self, worker: int) -> list[_Entry] | None:
        with self._cond:
            while True:
                key = self._oldest_lane()
                if key is False:
                    if self._closing and self._preparing == 0:
                        return None
                    self._cond.wait(0.5 if self._closing else None)
                    continue
                deadline = self._lanes[key][0].job.queued_at + self.max_wait_s
                while self._preparing and self._lanes[key] and not self._full(key):
                    left = deadline - time.perf_counter()
                    if left <= 0:
                        break
                    self._cond.wait(left)
                lane = self._lanes[key]
                if not lane:  # its requests were cancelled meanwhile
                    continue
                budget, batch = TokenBudget(self.max_batch_tokens, self.max_batch_items), []
                while lane and budget.add(len(batch), lane[0].cost) is None:
                    batch.append(lane.popleft())
                self._lane_cost[key] -= sum(e.cost for e in batch)
                self._admitted -= len(batch)
                self.metrics.queue_depth.set(self._admitted)
                self._running[worker] = batch
                return batch

    def _work(self, worker: int) -> None:
        try:
            while (batch := self._next_batch(worker)) is not None:
                self._run(batch, self.encoders[worker])
                self._running.pop(worker, None)
        except BaseException as err:
            log.exception("the batcher stopped; /health now answers 503")
            self._stop(f"{type(err).__name__}: {err}")

    def _run(self, batch: list[_Entry], encoder: Encoder) -> None:
        start = time.perf_counter()
        for e in batch:
            if e.job.queue_s is None:
                e.job.queue_s = start - e.job.queued_at
            self.metrics.queue_wait.observe(start - e.job.queued_at)
        result = encoder.embed_prepared([e.prepared for e in batch], batch[0].job.plan)
        seconds = time.perf_counter() - start
        self.metrics.model.observe(seconds)
        self.metrics.batch_size.observe(len(batch))
        self.metrics.batch_tokens.observe(sum(e.prepared.cost for e in batch))
        failed = {f.index: f.reason for f in result.failures}
        if failed and len(failed) == len(batch) and encoder.device.type == "cuda":
            # every item failed alone: if the device itself is broken (a sticky CUDA error), this
            # raises and stops the worker, so /health reports it instead of failing items forever
            torch.cuda.synchronize(encoder.device)
        self.metrics.embedded(len(batch) - len(failed))
        for job in {e.job: None for e in batch}:
            job.model_s += seconds
        for pos, e in enumerate(batch):
            job = e.job
            if job.rows is None:
                job.rows = np.full((job.n, result.embeddings.shape[1]), np.nan, dtype=np.float32)
                job.texts = [None] * job.n if result.reasoning is not None else None
            if pos in failed:
                job.failures.append(ItemError(e.index, failed[pos]))
            else:
                job.rows[e.index] = result.embeddings[pos]
                if job.texts is not None:
                    job.texts[e.index] = result.reasoning[pos]
            job.remaining -= 1
            if job.remaining == 0:
                _resolve(job, None)

    def _stop(self, error: str) -> None:
        """The worker is gone: fail every request still waiting on it."""
        with self._cond:
            self.error = error
            waiting = [e for batch in self._running.values() for e in batch]
            waiting += [e for lane in self._lanes.values() for e in lane]
            for lane in self._lanes.values():
                lane.clear()
            self._admitted = self._preparing
            self.metrics.queue_depth.set(self._admitted)
        for job in {e.job: None for e in waiting}:
            _resolve(job, Unavailable(f"the batcher stopped: {error}"))

    # -------------------------------------------------------------- shutdown
    def close(self, timeout: float) -> None:
        """Finish queued work for up to `timeout` seconds, then fail what is left and stop."""
        with self._cond:
            self._closing = True
            self._cond.notify_all()
        deadline = time.monotonic() + timeout
        for thread in self._threads:
            if thread.is_alive():
                thread.join(max(0.0, deadline - time.monotonic()))
        if any(thread.is_alive() for thread in self._threads):
            self._stop(f"shut down with work left after {timeout:g} s (--shutdown-timeout)")
        self.pool.shutdown(wait=False, cancel_futures=True)


def _resolve(job: Job, error: Exception | None) -> None:
    def settle() -> None:
        if not job.future.done():
            job.future.set_exception(error) if error is not None else job.future.set_result(None)

    try:
        job.loop.call_soon_threadsafe(settle)
    except RuntimeError:  # the event loop is closed: nobody is waiting any more
        pass
