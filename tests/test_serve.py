"""The embedding server over real HTTP: vectors equal `Encoder.encode`, limits, errors, batching, shutdown."""

from __future__ import annotations

import base64
import io
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import openai
import pytest
import uvicorn
from PIL import Image

import moon3rt
from moon3rt.serve import ServeSettings, create_app

ATOL = 1e-5  # fp32: a vector may not depend on the batch (or the request) it travelled in
REPO = Path(__file__).resolve().parent.parent


def rgb(height: int, width: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


def png(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


def data_uri(data: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(data).decode()


def assert_same(got: np.ndarray, want: np.ndarray, what: str) -> None:
    assert got.shape == want.shape, f"{what}: shape {got.shape} != {want.shape}"
    diff = np.abs(got - want).max(axis=1)
    assert diff.max() <= ATOL, f"{what}: row {int(np.argmax(diff))} differs by {diff.max():.2e}"


def vectors(response: httpx.Response) -> np.ndarray:
    assert response.status_code == 200, response.text
    body = response.json()
    assert [d["index"] for d in body["data"]] == list(range(len(body["data"])))
    rows = []
    for d in body["data"]:
        e = d["embedding"]
        rows.append(np.frombuffer(base64.b64decode(e), dtype="<f4") if isinstance(e, str) else np.array(e, "f4"))
    return np.stack(rows)


def metric(client: httpx.Client, name: str) -> float:
    text = client.get("/metrics").text
    match = re.search(rf"^{re.escape(name)} (\S+)$", text, re.MULTILINE)
    return float(match.group(1)) if match else 0.0


class LiveServer:
    """uvicorn serving `create_app(encoder)` in a thread on a free loopback port."""

    def __init__(self, encoder, **settings):
        self.app = create_app(encoder, ServeSettings(**settings))
        config = uvicorn.Config(self.app, host="127.0.0.1", port=0, log_level="warning", lifespan="on",
                                timeout_graceful_shutdown=5)
        self.server = uvicorn.Server(config)
        self.app.state.server = self.server
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            assert self.thread.is_alive() and time.monotonic() < deadline, "server did not start"
            time.sleep(0.01)
        port = self.server.servers[0].sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"
        self.client = httpx.Client(base_url=self.url, timeout=60)

    def post(self, body, **kwargs) -> httpx.Response:
        return self.client.post("/v1/embeddings", json=body, **kwargs)

    def stop(self) -> None:
        self.client.close()
        self.server.should_exit = True
        self.thread.join(30)


class Gated:
    """An encoder whose model waits for `gate`; `entered` is set while a batch waits there."""

    def __init__(self, encoder):
        self._encoder = encoder
        self.gate, self.entered = threading.Event(), threading.Event()

    def __getattr__(self, name):
        return getattr(self._encoder, name)

    def embed_prepared(self, prepared, plan=None):
        self.entered.set()
        assert self.gate.wait(60), "gate never opened"
        return self._encoder.embed_prepared(prepared, plan)


def wait_for(condition, what: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


@pytest.fixture(scope="module")
def encoder():
    return moon3rt.load("moon3-tiny", device="cpu")


@pytest.fixture(scope="module")
def image_dir(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("allowed")
    (path / "tee.png").write_bytes(png(rgb(60, 80, seed=3)))
    return path


@pytest.fixture(scope="module")
def live(encoder, image_dir):
    server = LiveServer(encoder, allow_paths=[str(image_dir)], max_body_mb=1, max_items_per_request=16,
                        max_queue_items=64, max_image_pixels=200_000, workers=2)
    yield server
    server.stop()


# ------------------------------------------------------------------ same vectors as encode
def test_text_and_images_match_encode(live, encoder, image_dir):
    a, b = png(rgb(40, 56, seed=1)), png(rgb(70, 50, seed=2))
    inputs = [
        "red cotton t-shirt",
        {"text": "navy mug", "image": data_uri(a)},
        {"images": [data_uri(a), data_uri(b)], "text": "two views"},
        {"image": data_uri(b)},
        {"text": "from a file", "image": str(image_dir / "tee.png")},
    ]
    want = encoder.encode(["red cotton t-shirt", {"text": "navy mug", "image": a},
                           {"images": [a, b], "text": "two views"}, {"image": b},
                           {"text": "from a file", "image": image_dir / "tee.png"}])
    response = live.post({"input": inputs, "model": "moon3-tiny"})
    assert_same(vectors(response), want, "mixed items")
    body = response.json()
    assert body["object"] == "list" and body["model"] == "moon3-tiny"
    assert body["usage"]["prompt_tokens"] == body["usage"]["total_tokens"] > 0
    assert "model;dur=" in response.headers["server-timing"]
    assert_same(vectors(live.post({"input": "red cotton t-shirt"})), want[:1], "a bare string")


def test_dimensions_base64_and_normalize(live, encoder):
    texts = ["leather boots", "green ceramic mug"]
    got = vectors(live.post({"input": texts, "dimensions": 16, "encoding_format": "base64"}))
    assert got.dtype == np.dtype("<f4")
    assert_same(got, encoder.encode(texts, dim=16), "dimensions=16, base64")
    raw = vectors(live.post({"input": texts, "normalize": False}))
    assert_same(raw, encoder.encode(texts, normalize=False), "normalize=false")
    assert not np.allclose(np.linalg.norm(raw, axis=1), 1.0)


def test_reasoning(live, encoder):
    want, texts = encoder.encode(["red cotton t-shirt"], reasoning=True, return_reasoning=True)
    response = live.post({"input": ["red cotton t-shirt"], "reasoning": True})
    assert_same(vectors(response), want, "reasoning mode")
    assert response.json()["data"][0]["reasoning"] == texts[0]
    assert "reasoning" not in live.post({"input": ["red cotton t-shirt"]}).json()["data"][0]


def test_openai_client(live, encoder):
    client = openai.OpenAI(base_url=live.url + "/v1", api_key="unused", max_retries=0)
    texts = ["striped linen shirt", "canvas backpack"]
    result = client.embeddings.create(model="moon3-tiny", input=texts, dimensions=32)
    got = np.array([d.embedding for d in result.data], dtype=np.float32)
    assert_same(got, encoder.encode(texts, dim=32), "openai client")
    assert [m.id for m in client.models.list().data] == ["moon3-tiny"]


def test_concurrent_requests_get_their_own_vectors(live, encoder):
    requests = [[f"item {r}-{k} {'wool' if k % 2 else 'cotton'}" for k in range(r + 1)] for r in range(8)]
    requests[3] = [{"text": "image item", "image": data_uri(png(rgb(30 + 7 * k, 40, seed=k)))} for k in range(4)]
    with ThreadPoolExecutor(8) as pool:
        responses = list(pool.map(lambda items: live.post({"input": items}), requests))
    for r, (items, response) in enumerate(zip(requests, responses)):
        want = encoder.encode([dict(it, image=base64.b64decode(it["image"].split(",", 1)[1]))
                               if isinstance(it, dict) else it for it in items])
        assert_same(vectors(response), want, f"request {r}")


# ------------------------------------------------------------------------------- errors
def error(response: httpx.Response, status: int) -> dict:
    assert response.status_code == status, f"{response.status_code}: {response.text}"
    body = response.json()["error"]
    assert set(body) == {"message", "type", "param", "code"}
    return body


def test_bad_items_are_422_naming_the_index(live, image_dir, tmp_path):
    good = "plain text"
    cases = {
        "not a recognised image": {"image": "data:image/png;base64," + base64.b64encode(b"garbage").decode()},
        "URLs are not fetched": {"image": "https://example.com/a.png"},
        "outside the allowed directories": {"image": str(tmp_path / "x.png")},
        "must be absolute": {"image": "tee.png"},
        "invalid base64": {"image": "data:image/png;base64,@@@"},
        "not an image/* type": {"image": "data:text/plain;base64,aGVsbG8="},
        "pixels, more than max_image_pixels=200000": {"image": data_uri(png(np.zeros((500, 500, 3), np.uint8)))},
        "empty item": "",
        "unknown key": {"txt": "typo"},
        "expected a string or an object": 42,
    }
    for reason, bad in cases.items():
        body = error(live.post({"input": [good, bad]}), 422)
        assert body["param"] == "input[1]" and "input[1]" in body["message"] and reason in body["message"], body
    escape = str(image_dir / ".." / "outside.png")
    assert "outside the allowed" in error(live.post({"input": [{"image": escape}]}), 422)["message"]
    assert "at most 16 items" in error(live.post({"input": ["x"] * 17}), 422)["message"]
    assert "token-id arrays" in error(live.post({"input": [1, 2, 3]}), 422)["message"]


def test_request_errors(live):
    assert error(live.post({"input": "x", "dimensions": 49}), 422)["param"] == "dimensions"
    assert error(live.post({"input": "x", "encoding_format": "int8"}), 422)["param"] == "encoding_format"
    assert error(live.post({"input": "x", "dimension": 8}), 422)["param"] == "dimension"
    assert error(live.post({"model": "moon3-tiny"}), 422)["param"] == "input"
    assert error(live.post({"input": "x", "model": "gpt-4"}), 404)["code"] == "model_not_found"
    bad_json = live.client.post("/v1/embeddings", content=b"{not json", headers={"content-type": "application/json"})
    assert error(bad_json, 400)["type"] == "invalid_request_error"
    big = {"input": "x" * (1024 * 1024 + 1)}
    assert error(live.post(big), 413)["code"] == "request_too_large"
    chunked = live.client.post("/v1/embeddings", content=iter([b'{"input": "', b"x" * (1 << 20), b'"}']))
    assert error(chunked, 413)["code"] == "request_too_large"


def test_a_bad_request_costs_others_nothing(live, encoder):
    texts = [f"good request {i}" for i in range(6)]
    bad = {"input": ["fine", {"image": "data:image/png;base64,AAAA"}]}
    with ThreadPoolExecutor(8) as pool:
        goods = [pool.submit(live.post, {"input": [t]}) for t in texts]
        bads = [pool.submit(live.post, bad) for _ in range(3)]
        assert all(f.result().status_code == 422 for f in bads)
        got = np.concatenate([vectors(f.result()) for f in goods])
    assert_same(got, encoder.encode(texts), "good requests beside bad ones")


def test_api_key(encoder):
    server = LiveServer(encoder, api_key="s3cret")
    try:
        assert error(server.post({"input": "x"}), 401)["code"] == "invalid_api_key"
        assert error(server.post({"input": "x"}, headers={"Authorization": "Bearer wrong"}), 401)
        assert server.client.get("/v1/models").status_code == 401
        ok = server.post({"input": "x"}, headers={"Authorization": "Bearer s3cret"})
        assert_same(vectors(ok), encoder.encode(["x"]), "with the key")
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="s3cret", max_retries=0)
        assert len(client.embeddings.create(model="moon3-tiny", input="x").data[0].embedding) == encoder.dim
        assert server.client.get("/health").status_code == 200  # probes need no key
    finally:
        server.stop()


# ---------------------------------------------------------------------- the batcher
def test_queue_full_is_429_and_disconnected_clients_are_dropped(encoder):
    gated = Gated(encoder)
    server = LiveServer(gated, max_queue_items=4, max_items_per_request=4, max_wait_ms=0)
    try:
        with ThreadPoolExecutor(4) as pool:
            first = pool.submit(server.post, {"input": ["first"]})
            assert gated.entered.wait(30)  # the worker holds "first" inside the model
            queued = pool.submit(server.post, {"input": ["a", "b", "c"]})
            wait_for(lambda: metric(server.client, "moon3rt_queue_depth") == 3, "3 items queued")
            full = server.post({"input": ["d", "e"]})
            body = error(full, 429)
            assert body["type"] == "rate_limit_error" and int(full.headers["retry-after"]) >= 1
            # a client that gives up: its item leaves the queue before the model sees it
            with pytest.raises(httpx.ReadTimeout):
                httpx.post(server.url + "/v1/embeddings", json={"input": ["gone"]}, timeout=0.5)
            wait_for(lambda: metric(server.client, 'moon3rt_items_total{outcome="dropped"}') == 1, "the drop")
            assert metric(server.client, "moon3rt_queue_depth") == 3
            gated.gate.set()
            assert_same(vectors(first.result()), encoder.encode(["first"]), "first")
            assert_same(vectors(queued.result()), encoder.encode(["a", "b", "c"]), "queued")
        assert metric(server.client, 'moon3rt_requests_total{outcome="queue_full"}') == 1
        # "first" ran alone; the three queued items shared one batch; "gone" never ran
        assert metric(server.client, "moon3rt_batch_size_count") == 2
        assert metric(server.client, "moon3rt_batch_size_sum") == 4
    finally:
        gated.gate.set()
        server.stop()


def test_requests_share_batches_and_a_large_one_is_split(encoder):
    gated = Gated(encoder)
    server = LiveServer(gated, max_batch_items=3, max_wait_ms=0)
    try:
        with ThreadPoolExecutor(8) as pool:
            blocker = pool.submit(server.post, {"input": ["blocker"]})
            assert gated.entered.wait(30)
            singles = [pool.submit(server.post, {"input": [f"single {i}"]}) for i in range(3)]
            wait_for(lambda: metric(server.client, "moon3rt_queue_depth") == 3, "3 single items queued")
            large = pool.submit(server.post, {"input": [f"part {i}" for i in range(7)]})
            wait_for(lambda: metric(server.client, "moon3rt_queue_depth") == 10, "the large request queued")
            gated.gate.set()
            assert_same(vectors(blocker.result()), encoder.encode(["blocker"]), "blocker")
            for i, f in enumerate(singles):
                assert_same(vectors(f.result()), encoder.encode([f"single {i}"]), f"single {i}")
            assert_same(vectors(large.result()), encoder.encode([f"part {i}" for i in range(7)]), "large")
        # 1 (blocker) + 3 (the singles together) + 3 + 3 + 1 (the large request, split)
        assert metric(server.client, "moon3rt_batch_size_count") == 5
        assert metric(server.client, "moon3rt_batch_size_sum") == 11
        assert metric(server.client, 'moon3rt_items_total{outcome="ok"}') == 11
    finally:
        gated.gate.set()
        server.stop()


def test_one_encoder_per_device_share_the_queue(encoder):
    second = moon3rt.load("moon3-tiny", device="cpu")  # a second "device": same weights, its own worker
    seen = set()

    class Tracked(Gated):
        def embed_prepared(self, prepared, plan=None):
            seen.add(id(self))
            time.sleep(0.05)  # long enough for the other worker to take the next batch
            return self._encoder.embed_prepared(prepared, plan)

    server = LiveServer([Tracked(encoder), Tracked(second)], max_batch_items=2, max_wait_ms=0)
    try:
        requests = [[f"device item {r}-{k}" for k in range(r % 3 + 1)] for r in range(8)]
        with ThreadPoolExecutor(8) as pool:
            responses = list(pool.map(lambda items: server.post({"input": items}), requests))
        for r, (items, response) in enumerate(zip(requests, responses)):
            assert_same(vectors(response), encoder.encode(items), f"request {r}")
        assert len(seen) == 2, "both workers should have run batches"
    finally:
        server.stop()


class DeviceLost(Exception):
    pass


def test_health_turns_503_when_the_batcher_dies(encoder):
    class Broken(Gated):
        def embed_prepared(self, prepared, plan=None):
            raise DeviceLost("the device fell off the bus")

    server = LiveServer(Broken(encoder))
    try:
        health = server.client.get("/health")
        assert health.status_code == 200 and health.json()["status"] == "ok"
        assert "device fell off" in error(server.post({"input": "x"}), 503)["message"]
        health = server.client.get("/health")
        assert health.status_code == 503 and "device fell off" in health.json()["reason"]
        assert error(server.post({"input": "y"}), 503)["code"] == "unavailable"
    finally:
        server.stop()


def test_metrics_are_exposed(live):
    vectors(live.post({"input": ["metrics probe"]}))
    text = live.client.get("/metrics").text
    for name in ("moon3rt_queue_depth", "moon3rt_batch_size_bucket", "moon3rt_batch_tokens_bucket",
                 'moon3rt_requests_total{outcome="ok"}', 'moon3rt_items_total{outcome="ok"}',
                 "moon3rt_queue_wait_seconds_bucket", "moon3rt_model_seconds_bucket",
                 "moon3rt_request_seconds_bucket", "moon3rt_items_per_second"):
        assert name in text, name
    assert metric(live.client, "moon3rt_items_per_second") > 0


# ----------------------------------------------------------------------------- shutdown
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_sigterm_answers_queued_work_before_exit(encoder):
    port = free_port()
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    proc = subprocess.Popen([sys.executable, "-m", "moon3rt", "serve", "--model", "moon3-tiny", "--device", "cpu",
                             "--port", str(port), "--max-batch-items", "1", "--workers", "1",
                             "--shutdown-timeout", "60", "--log-level", "warning"],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    client = httpx.Client(base_url=url, timeout=120)
    try:
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None, proc.stdout.read().decode()
            assert time.monotonic() < deadline, "server did not start"
            try:
                if client.get("/health").status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.2)
        requests = [[f"request {r} item {k}" for k in range(32)] for r in range(4)]
        with ThreadPoolExecutor(4) as pool:
            futures = [pool.submit(httpx.post, url + "/v1/embeddings", json={"input": items}, timeout=120)
                       for items in requests]
            # one item per batch: 128 batches, so most are still queued when the signal comes
            wait_for(lambda: metric(client, "moon3rt_requests_in_flight") == 4, "4 requests in flight", 60)
            assert metric(client, "moon3rt_queue_depth") > 0
            proc.send_signal(signal.SIGTERM)
            for items, f in zip(requests, futures):
                assert_same(vectors(f.result()), encoder.encode(items), "answered during shutdown")
        assert proc.wait(60) in (0, -signal.SIGTERM)
        log = proc.stdout.read().decode()
        assert "Traceback" not in log, log
    finally:
        client.close()
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stdout.close()
