"""The public API: item forms, batch invariance, Matryoshka dims, token budget, threads, cache."""

from __future__ import annotations

import io
import threading
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import moon3rt
import moon3rt.api as api
from moon3rt.prompt import PreparedItem

ATOL = 1e-5  # fp32: an item's vector may not depend on its batch


def rgb(height: int, width: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


def png_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


def assert_unit_rows(vectors: np.ndarray) -> None:
    assert vectors.dtype == np.float32 and np.isfinite(vectors).all()
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)


def assert_same_vectors(a: np.ndarray, b: np.ndarray, what: str) -> None:
    cos = (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))
    worst = int(np.argmin(cos))
    assert cos.min() > 0.9999, f"{what}: row {worst} has cosine {cos[worst]:.6f}"
    diff = np.abs(a - b).max(axis=1)
    assert diff.max() <= ATOL, f"{what}: row {int(np.argmax(diff))} differs by {diff.max():.2e}"


@pytest.fixture(scope="module")
def encoder() -> moon3rt.Encoder:
    return moon3rt.load("moon3-tiny", device="cpu")


@pytest.fixture(scope="module")
def image_path(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("images") / "tee.png"
    path.write_bytes(png_bytes(rgb(90, 120, seed=7)))
    return path


def varied_items(image_path: Path) -> list:
    return [
        "red cotton t-shirt",
        {"text": "navy crew-neck tee, 100% cotton, ribbed collar", "image": image_path},
        rgb(57, 61, seed=1),
        {"images": [rgb(57, 83, seed=2), rgb(95, 73, seed=3)], "text": "two views"},
        "a much longer query about a leather backpack with brass zips and a padded laptop sleeve " * 2,
        moon3rt.Item(text="white sneakers", images=[rgb(61, 59, seed=4)]),
        "mug",
    ]


# ---------------------------------------------------------------------------------- basics
def test_encode_default_model():
    vectors = moon3rt.encode(["red cotton t-shirt"])
    assert vectors.shape == (1, 48)
    assert_unit_rows(vectors)


def test_encode_caches_the_encoder(monkeypatch):
    monkeypatch.setattr(api, "_CACHE", {})
    calls = []
    real_load = api.load
    monkeypatch.setattr(api, "load", lambda *a, **k: calls.append(a) or real_load(*a, **k))
    first = moon3rt.encode(["blue jeans"])
    (cached,) = api._CACHE.values()
    second = moon3rt.encode(["blue jeans", "green mug"])
    assert len(calls) == 1 and list(api._CACHE.values()) == [cached]
    np.testing.assert_allclose(first[0], second[0], atol=ATOL)
    moon3rt.encode(["blue jeans"], dtype="bf16")  # another dtype is another encoder
    assert len(calls) == 2 and len(api._CACHE) == 2


def test_item_forms(encoder, image_path):
    array = rgb(90, 120, seed=7)
    data = image_path.read_bytes()
    same_image = [image_path, {"image": str(image_path)}, data, Image.open(image_path), array,
                  {"image": array}, {"images": [data]}, moon3rt.Item(images=[array]), moon3rt.Item(images=array)]
    pixels = [encoder.prepare(form, i).images[0].pixel_values for i, form in enumerate(same_image)]
    for i in range(1, len(same_image)):
        np.testing.assert_array_equal(pixels[i], pixels[0], err_msg=f"form {i} preprocesses differently")
    vectors = encoder.encode(same_image)
    assert_unit_rows(vectors)
    for i in range(1, len(same_image)):
        np.testing.assert_allclose(vectors[i], vectors[0], atol=1e-6, err_msg=f"form {i} embeds differently")

    title = "navy tee"
    mixed = [
        title,
        {"text": title},
        moon3rt.Item(text=title, images=None),
        {"text": title, "image": image_path},
        moon3rt.Item(text=title, images=[data]),
        {"images": [rgb(57, 61, seed=1), rgb(95, 73, seed=2)]},
        moon3rt.Item(images=(rgb(57, 61, seed=1), rgb(95, 73, seed=2))),
    ]
    vectors = encoder.encode(mixed)
    assert vectors.shape == (len(mixed), 48)
    assert_unit_rows(vectors)
    for a, b in ((1, 0), (2, 0), (4, 3), (6, 5)):
        np.testing.assert_allclose(vectors[a], vectors[b], atol=1e-6, err_msg=f"item {a} vs item {b}")
    assert np.abs(vectors[3] - vectors[0]).max() > 1e-3  # the image matters
    # two images: both reach the model, in order
    two = encoder.prepare(mixed[5])
    assert [im.grid_thw for im in two.images] == [(1, 4, 4), (1, 6, 6)]
    swapped = encoder.encode([{"images": [rgb(95, 73, seed=2), rgb(57, 61, seed=1)]}])
    assert np.abs(swapped[0] - vectors[5]).max() > 1e-4


def test_single_item_is_refused_without_a_list(encoder, image_path):
    for single in ("red tee", {"text": "red tee"}, image_path):
        with pytest.raises(TypeError, match="list"):
            encoder.encode(single)
    assert encoder.encode([]).shape == (0, 48)


# ------------------------------------------------------------------------ batch invariance
def test_batch_invariance(encoder, image_path):
    items = varied_items(image_path)
    alone = np.concatenate([encoder.encode([item]) for item in items])
    assert_unit_rows(alone)
    assert_same_vectors(encoder.encode(items), alone, "one batch")
    order = [6, 2, 0, 5, 3, 1, 4]
    assert_same_vectors(encoder.encode([items[i] for i in order]), alone[order], "shuffled batch")
    for kwargs in ({"batch_size": 2}, {"batch_size": 3}, {"max_batch_tokens": 150}, {"max_batch_tokens": 400},
                   {"batch_size": 4, "max_batch_tokens": 250}):
        assert_same_vectors(encoder.encode(items, **kwargs), alone, f"batches {kwargs}")
    repeated = encoder.encode(items * 3, batch_size=5)
    for k in range(3):
        assert_same_vectors(repeated[k * len(items) : (k + 1) * len(items)], alone, f"copy {k}")


# ------------------------------------------------------------------------------ matryoshka
def test_matryoshka_and_normalize(encoder, image_path):
    items = varied_items(image_path)[:4]
    full = encoder.encode(items)
    for dim in (16, 32, 48):
        cut = encoder.encode(items, dim=dim)
        want = full[:, :dim] / np.linalg.norm(full[:, :dim], axis=1, keepdims=True)
        assert cut.shape == (len(items), dim)
        np.testing.assert_allclose(cut, want, atol=1e-6)
    raw = encoder.encode(items, normalize=False)
    norms = np.linalg.norm(raw, axis=1)
    assert np.all(np.abs(norms - 1) > 1e-3), f"normalize=False still returned unit vectors: {norms}"
    np.testing.assert_allclose(raw / norms[:, None], full, atol=1e-6)
    np.testing.assert_allclose(encoder.encode(items, dim=16, normalize=False), raw[:, :16], atol=1e-6)
    for dim in (0, -1, 49, 256):
        with pytest.raises(ValueError, match=f"dim={dim}"):
            encoder.encode(items, dim=dim)


# ---------------------------------------------------------------------------- token budget
def spy_on_batches(encoder, monkeypatch) -> list:
    batches = []
    real = encoder.backend.embed

    def embed(batch):
        patches = 0 if batch.pixel_values is None else batch.pixel_values.shape[0]
        batches.append((batch.num_items, int(batch.cu_seqlens[-1]) + patches))
        return real(batch)

    monkeypatch.setattr(encoder.backend, "embed", embed)
    return batches


def test_token_budget(encoder, image_path, monkeypatch):
    items = varied_items(image_path) + ["short", {"text": "big", "image": rgb(224, 224, seed=9)}, "tail"]
    costs = [encoder.prepare(item, i).cost for i, item in enumerate(items)]
    assert costs[-2] > 300 > max(costs[:-2])  # one oversized item
    clean = encoder.encode(items)
    batches = spy_on_batches(encoder, monkeypatch)
    budget = 300
    result = encoder.encode(items, max_batch_tokens=budget)
    assert_same_vectors(result, clean, "budgeted")
    assert sum(n for n, _ in batches) == len(items)
    start = 0
    for n, cost in batches:  # batches come in item order
        assert cost == sum(costs[start : start + n]), "PreparedItem.cost must be what a batch holds"
        assert cost <= budget or n == 1, f"batch of {n} items costs {cost} > {budget}"
        if costs[-2] in costs[start : start + n]:
            assert n == 1, "an oversized item goes alone"
        start += n
    assert len(batches) < len(items)  # the budget still groups small items

    batches.clear()
    encoder.encode(items, batch_size=3, max_batch_tokens=10**6)
    assert [n for n, _ in batches] == [3, 3, 3, 1]


def test_cost_counts_tokens_and_patches(encoder):
    item = encoder.prepare({"text": "x", "image": rgb(56, 84)})
    assert isinstance(item, PreparedItem)
    assert item.num_patches == 4 * 6 and item.cost == item.num_tokens + 24
    assert (item.input_ids == encoder.config.image_token_id).sum() == 6


# --------------------------------------------------------------------------------- threads
def test_thread_safety(encoder, image_path):
    items = varied_items(image_path)
    requests = [items, items[::-1], items[2:] + items[:2], items[1::2]]
    sequential = [encoder.encode(r, batch_size=3) for r in requests]
    results: dict[int, np.ndarray] = {}
    errors: list[BaseException] = []
    barrier = threading.Barrier(len(requests))

    def work(k):
        try:
            barrier.wait()
            for _ in range(2):
                results[k] = encoder.encode(requests[k], batch_size=3)
        except BaseException as err:  # noqa: BLE001 - reported below
            errors.append(err)

    threads = [threading.Thread(target=work, args=(k,)) for k in range(len(requests))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not errors, errors
    for k, want in enumerate(sequential):
        np.testing.assert_allclose(results[k], want, atol=ATOL, err_msg=f"thread {k}")


# -------------------------------------------------------------------------------- titles
def test_long_title_truncated_with_warning(encoder):
    limit = encoder.config.max_text_tokens
    title = " ".join(f"word{i}" for i in range(400))
    assert encoder.prompt.count_title_tokens(title) > limit
    with pytest.warns(UserWarning, match=f"1 title\\(s\\) truncated to max_text_tokens={limit} \\(items 1\\)"):
        vectors = encoder.encode(["ok", title])
    assert_unit_rows(vectors)
    item = encoder.prepare(title)
    assert item.truncated and len(item.title_positions) == limit
    # truncation keeps the head of the title: same as a title cut to `limit` tokens
    kept = encoder.prompt.tokenizer.decode(item.input_ids[item.title_positions].tolist())
    assert kept.strip() and title.startswith(kept.strip()[:40])

    with pytest.raises(moon3rt.EncodeError, match=f"item 1: title has \\d+ tokens, more than max_text_tokens={limit}"):
        encoder.encode(["ok", title], truncate=False)
    report = encoder.encode_with_report(["ok", title, "fine"], truncate=False)
    assert [f.index for f in report.failures] == [1] and "max_text_tokens" in report.failures[0].reason
    assert np.isnan(report.embeddings[1]).all()
    np.testing.assert_allclose(report.embeddings[[0, 2]], encoder.encode(["ok", "fine"]), atol=ATOL)
    assert report.ok.tolist() == [True, False, True]


def test_truncated_titles_one_warning_per_call_with_the_count(encoder):
    """Many long titles give one warning (from the caller's line), not a line per item, and the
    report lists them; an item that fails is a failure, not a truncation."""
    title = " ".join(f"word{i}" for i in range(400))
    items = [title, "ok", title, {"text": title, "image": b"junk"}, title]
    for call in (encoder.encode, encoder.encode_with_report):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            result = call(items, on_error="skip", num_workers=2)
        truncation = [w for w in caught if "truncated" in str(w.message)]
        assert len(truncation) == 1, [str(w.message) for w in caught]
        assert "3 title(s) truncated" in str(truncation[0].message) and "items 0, 2, 4" in str(truncation[0].message)
        assert truncation[0].filename == __file__, truncation[0].filename  # points at this call, not a thread
    assert result.truncated == [0, 2, 4] and [f.index for f in result.failures] == [3]
    assert encoder.encode_with_report(["ok"]).truncated == []


def test_special_token_strings_in_a_title_are_plain_text():
    """User text never changes the template: '<|image_pad|>' or '<|im_end|>' in a title are characters."""
    enc = moon3rt.load("moon3-tiny", device="cpu")
    title = "tee <|image_pad|> <|im_end|> <emb>"
    item = enc.prepare(title)
    title_ids = item.input_ids[item.title_positions].tolist()
    specials = set(range(10))  # the shipped tokenizer's special ids
    assert not specials & set(title_ids)
    assert enc.prompt.tokenizer.decode(title_ids) == title
    vec = enc.encode([title])
    assert np.isfinite(vec).all()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="page-locked memory needs CUDA")
def test_pinned_packing_equals_plain_packing():
    from moon3rt.batching import pack

    enc = moon3rt.load("moon3-tiny", device="cuda", dtype="fp32")
    items = [enc.prepare({"text": "tee", "image": np.full((60, 90, 3), 128, np.uint8)}, 0),
             enc.prepare({"images": [np.full((40, 40, 3), 7, np.uint8)] * 2}, 1)]
    plain, pinned = pack(items), pack(items, pin_memory=True)
    assert pinned.pixel_values.is_pinned() and torch.equal(plain.pixel_values, pinned.pixel_values)
