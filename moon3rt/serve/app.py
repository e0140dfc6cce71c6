"""The HTTP layer: OpenAI's ``/v1/embeddings`` and ``/v1/models``, ``/health``, ``/metrics``.

Thin on purpose: a handler checks the key, reads the body within its limit, validates the
fields, hands the items to the `Batcher` and writes the response. Errors are the typed
`ServeError`s of `errors.py`, turned into OpenAI-style bodies by one exception handler.
"""

from __future__ import annotations

import asyncio
import base64
import hmac
import json
import time
from collections.abc import Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
from fastapi import FastAPI, Request, Response
from prometheus_client import CONTENT_TYPE_LATEST
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from ..api import Encoder
from .batcher import Batcher
from .errors import (
    BodyTooLarge,
    InvalidRequest,
    ItemsRejected,
    MalformedRequest,
    ModelNotFound,
    ServeError,
    Unauthorized,
    Unavailable,
)
from .inputs import ImagePolicy, to_encoder_item
from .metrics import Metrics

JSON = "application/json"


@dataclass
class ServeSettings:
    """Everything `moon3rt serve` can be told (CLI flags of the same names)."""

    host: str = "127.0.0.1"
    port: int = 8000
    served_model_name: str | None = None  # default: the model's name (a preset, or the directory's name)
    api_key: str | None = None
    max_batch_tokens: int = 16384
    max_batch_items: int = 64
    max_wait_ms: float = 5.0
    max_queue_items: int = 1024
    workers: int = 4
    max_items_per_request: int = 256
    max_body_mb: float = 32.0
    max_image_pixels: int = 40_000_000
    allow_paths: Sequence[str] = field(default_factory=tuple)
    shutdown_timeout: float = 30.0
    access_log: bool = False
    log_level: str = "info"

    @property
    def max_body_bytes(self) -> int:
        return int(self.max_body_mb * 2**20)


class EmbeddingRequest(BaseModel):
    """OpenAI's embeddings request, plus moon3rt's `normalize` and `reasoning`."""

    model_config = ConfigDict(extra="forbid")

    input: Any  # str | list[str | {text, image, images}]: checked item by item, naming the index
    model: str | None = None
    dimensions: int | None = Field(None, strict=True)
    encoding_format: Literal["float", "base64"] = "float"
    user: str | None = None
    normalize: bool = Field(True, strict=True)
    reasoning: bool | None = Field(None, strict=True)


def create_app(encoders: Encoder | Sequence[Encoder], settings: ServeSettings | None = None) -> FastAPI:
    """The FastAPI app serving one model, one `Encoder` per device; the batcher starts and stops
    with the app's lifespan."""
    settings = settings or ServeSettings()
    if settings.max_items_per_request > settings.max_queue_items:
        raise ValueError(f"max_items_per_request ({settings.max_items_per_request}) must not exceed "
                         f"max_queue_items ({settings.max_queue_items}): such requests could never be queued")
    metrics = Metrics()
    batcher = Batcher(encoders, metrics, max_batch_tokens=settings.max_batch_tokens,
                      max_batch_items=settings.max_batch_items, max_wait_ms=settings.max_wait_ms,
                      max_queue_items=settings.max_queue_items, workers=settings.workers,
                      max_image_pixels=settings.max_image_pixels)
    encoder = batcher.encoder
    policy = ImagePolicy.create(settings.allow_paths, settings.max_body_bytes)
    served = settings.served_model_name or Path(encoder.name).name or "moon3rt"
    names = {served, encoder.name}
    created = int(time.time())
    cfg = encoder.config
    matryoshka_dims = list(cfg.moon3.matryoshka_dims) if cfg.moon3 is not None else []

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        batcher.start()
        yield
        # uvicorn has already waited (up to --shutdown-timeout) for requests in flight
        await asyncio.to_thread(batcher.close, settings.shutdown_timeout)

    app = FastAPI(title="moon3rt", summary="OpenAI-compatible embeddings for MOON3-style product embedders",
                  lifespan=lifespan)
    app.state.batcher, app.state.metrics, app.state.server = batcher, metrics, None

    @app.exception_handler(ServeError)
    async def serve_error(request: Request, err: ServeError) -> Response:
        return error_response(err)

    @app.exception_handler(Exception)
    async def internal_error(request: Request, err: Exception) -> Response:
        return error_response(ServeError(f"internal error: {type(err).__name__}: {err}"))

    def authorize(request: Request) -> None:
        if settings.api_key is None:
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), settings.api_key.encode()):
            raise Unauthorized()

    def stopping() -> bool:
        server = app.state.server
        return server is not None and server.should_exit

    @app.get("/health")
    async def health() -> Response:
        problem = batcher.problem() or ("the server is shutting down" if stopping() else None)
        if problem is None:
            body = {"status": "ok", "model": served, "queued_items": batcher.queued_items}
            return Response(json.dumps(body), 200, media_type=JSON)
        return Response(json.dumps({"status": "unavailable", "reason": problem}), 503, media_type=JSON)

    @app.get("/metrics")
    async def prometheus() -> Response:
        return Response(metrics.exposition(), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models")
    async def models(request: Request) -> Response:
        authorize(request)
        model = {"id": served, "object": "model", "created": created, "owned_by": "moon3rt",
                 "dimensions": encoder.dim, "matryoshka_dimensions": matryoshka_dims}
        return Response(json.dumps({"object": "list", "data": [model]}), media_type=JSON)

    @app.post("/v1/embeddings")
    async def embeddings(request: Request) -> Response:
        start = time.perf_counter()
        metrics.requests_in_flight.inc()
        outcome = "error"
        try:
            response = await embed(request, start)
            outcome = "ok"
            return response
        except ServeError as err:
            outcome = err.outcome
            raise
        except asyncio.CancelledError:
            outcome = "cancelled"
            raise
        finally:
            metrics.requests.labels(outcome).inc()
            metrics.requests_in_flight.dec()
            metrics.request_latency.observe(time.perf_counter() - start)

    async def embed(request: Request, start: float) -> Response:
        authorize(request)
        body = await read_body(request, settings.max_body_bytes)
        req = parse(body)
        if req.model is not None and req.model not in names:
            raise ModelNotFound(req.model, served)
        check_dimensions(req.dimensions, encoder.dim, matryoshka_dims)
        plan = reasoning_plan(encoder, req.reasoning)
        raw = input_items(req.input, settings.max_items_per_request)
        job = await run_job(request, batcher, raw, lambda obj, i: to_encoder_item(obj, i, policy), plan)
        if job.failures:
            metrics.items.labels("failed").inc(len(job.failures))
            metrics.items.labels("ok").inc(job.n - len(job.failures))
            raise ItemsRejected(job.failures)
        metrics.items.labels("ok").inc(job.n)
        vectors = shorten(job.rows, req.dimensions, req.normalize)
        data = []
        for i, row in enumerate(vectors):
            vector = (base64.b64encode(row.astype("<f4").tobytes()).decode() if req.encoding_format == "base64"
                      else row.tolist())
            entry = {"object": "embedding", "index": i, "embedding": vector}
            if job.texts is not None:
                entry["reasoning"] = job.texts[i]
            data.append(entry)
        usage = {"prompt_tokens": job.prompt_tokens, "total_tokens": job.prompt_tokens}
        payload = json.dumps({"object": "list", "data": data, "model": served, "usage": usage})
        total_ms = (time.perf_counter() - start) * 1000
        timing = (f"prepare;dur={job.prepare_s * 1000:.3f}, queue;dur={(job.queue_s or 0) * 1000:.3f}, "
                  f"model;dur={job.model_s * 1000:.3f}, total;dur={total_ms:.3f}")
        return Response(payload, media_type=JSON, headers={"Server-Timing": timing})

    return app


def error_response(err: ServeError) -> Response:
    return Response(err.body(), err.status, headers=err.headers, media_type=JSON)


async def read_body(request: Request, limit: int) -> bytes:
    """The request body, refused with 413 as soon as it passes `limit` bytes."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise BodyTooLarge(limit)
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise BodyTooLarge(limit)
        chunks.append(chunk)
    return b"".join(chunks)


def parse(body: bytes) -> EmbeddingRequest:
    try:
        return EmbeddingRequest.model_validate_json(body)
    except ValidationError as err:
        errors = err.errors(include_url=False)
        if any(e["type"] == "json_invalid" for e in errors):
            raise MalformedRequest(f"request body is not valid JSON: {errors[0]['msg']}") from None
        first = errors[0]
        where = ".".join(str(p) for p in first["loc"]) or "body"
        if first["type"] == "missing":
            raise InvalidRequest(f"'{where}' is required", param=where) from None
        if first["type"] == "extra_forbidden":
            raise InvalidRequest(f"unknown field '{where}'", param=where) from None
        raise InvalidRequest(f"'{where}': {first['msg']}", param=where) from None


def shorten(rows: np.ndarray, dim: int | None, normalize: bool) -> np.ndarray:
    """`model.matryoshka` on a request's few rows, in numpy: a torch op's dispatch costs more
    than the arithmetic here."""
    if dim is not None:
        rows = rows[:, :dim]
    if not normalize:
        return rows
    norms = np.sqrt(np.einsum("ij,ij->i", rows, rows, dtype=np.float32))[:, None]
    return rows / np.maximum(norms, np.float32(1e-12))  # F.normalize's eps


def check_dimensions(dimensions: int | None, full: int, matryoshka_dims: list[int]) -> None:
    if dimensions is None:
        return
    if not 0 < dimensions <= full:
        raise InvalidRequest(f"dimensions={dimensions} is out of range: this model's vectors have {full} "
                             "dimensions", param="dimensions")
    if not matryoshka_dims and dimensions != full:
        raise InvalidRequest(f"this model has no Matryoshka projection, so its vectors cannot be shortened; "
                             f"omit dimensions or pass {full}", param="dimensions")


def reasoning_plan(encoder: Encoder, reasoning: bool | None):
    if not (encoder.reasoning if reasoning is None else reasoning):
        return None
    try:
        return encoder.reasoning_plan()
    except ValueError as err:
        raise InvalidRequest(str(err), param="reasoning") from None


def input_items(value: Any, max_items: int) -> list:
    """``input`` as a list of items; each item is checked later, in the pool, by its index."""
    if isinstance(value, str):
        return [value]
    if not isinstance(value, list):
        raise InvalidRequest("'input' must be a string or an array of strings or item objects", param="input")
    if not value:
        raise InvalidRequest("'input' is empty", param="input")
    if all(isinstance(v, int) and not isinstance(v, bool) for v in value) or \
            any(isinstance(v, list) for v in value):
        raise InvalidRequest("token-id arrays are not accepted: send text, and images as item objects",
                             param="input")
    if len(value) > max_items:
        raise InvalidRequest(f"input[{max_items}]: a request holds at most {max_items} items "
                             f"(--max-items-per-request); this one has {len(value)}", param="input")
    return value


async def run_job(request: Request, batcher: Batcher, raw: list, resolve, plan):
    """Submit a request's items and wait for them; drops them if the client goes away first."""
    job = batcher.submit(raw, resolve, plan)
    watch = asyncio.ensure_future(_disconnect(request))
    # the watcher cancels the job's future rather than both being awaited together: the
    # handler then wakes straight from the batcher's result (one loop iteration, not three)
    watch.add_done_callback(lambda w: w.cancelled() or job.future.cancel())
    try:
        await job.future  # raises ItemsRejected / Unavailable
        return job
    except asyncio.CancelledError:
        if watch.done() and not watch.cancelled():
            raise Unavailable("client disconnected") from None  # nobody reads this; the items are dropped
        raise
    finally:
        watch.cancel()
        if not job.future.done() or job.future.cancelled():
            batcher.cancel(job)


async def _disconnect(request: Request) -> None:
    """Returns when the client disconnects (the body has been read, so receive() waits for that)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


def run(settings: ServeSettings, encoders: Encoder | Sequence[Encoder]) -> None:
    """Serve with uvicorn until SIGINT/SIGTERM; then finish queued work and exit."""
    import uvicorn

    app = create_app(encoders, settings)
    config = uvicorn.Config(app, host=settings.host, port=settings.port, log_level=settings.log_level,
                            access_log=settings.access_log, timeout_graceful_shutdown=settings.shutdown_timeout,
                            lifespan="on")
    server = uvicorn.Server(config)
    app.state.server = server
    server.run()
