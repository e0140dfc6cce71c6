"""Bad items: each is named by index and reason, and costs only itself."""

from __future__ import annotations

import io
import json
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from crafted import png_header_only
from PIL import Image, ImageDraw

import moon3rt

ATOL = 1e-5


def rgb(height: int, width: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


def encoded(array: np.ndarray, fmt: str) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format=fmt)
    return buf.getvalue()


GOOD = ["red cotton t-shirt", {"text": "navy tee", "image": rgb(90, 120, seed=1)}, rgb(57, 61, seed=2)]


def bad_cases(directory: Path) -> dict[str, tuple[object, str]]:
    """name -> (item, a pattern its error must contain)."""
    for fmt in ("JPEG", "PNG"):
        data = encoded(rgb(64, 80, seed=3), fmt)
        (directory / f"cut.{fmt.lower()}").write_bytes(data[: len(data) // 2])
    return {
        "corrupt bytes": (b"\x89PNG but not really an image", "not a recognised image format"),
        "truncated jpeg": (directory / "cut.jpeg", "truncated"),
        "truncated png": ({"text": "cut", "image": directory / "cut.png"}, "truncated"),
        "0x0 array": (np.zeros((0, 0, 3), np.uint8), "no pixels"),
        "1x300 image": (np.full((1, 300, 3), 128, np.uint8), "aspect ratio"),
        "float array": (np.zeros((8, 8, 3), np.float32), "uint8"),
        "empty string": ("", "empty item"),
        "empty dict": ({}, "empty item"),
        "blank text": ({"text": "  "}, "empty item"),
        "int": (5, "unsupported item type int"),
        "None": (None, "unsupported item type NoneType"),
        "list": (["red", "tee"], "unsupported item type list"),
        "unknown key": ({"text": "tee", "title": "tee"}, r"unknown key\(s\) \['title'\]"),
        "text not a string": ({"text": 3}, "'text' must be a string, got int"),
        "image and images": ({"image": GOOD[2], "images": [GOOD[2]]}, "either 'image' or 'images'"),
        "images not a list": ({"images": "tee.jpg"}, "'images' must be a list"),
        "second image bad": ({"images": [GOOD[2], b"junk"]}, "image 1: not a recognised image format"),
        "one byte": (b"x", r"not a recognised image format \(corrupt or unsupported data, or not an image: "
                           r"it starts b'x'\)"),
        "list as 'image'": ({"image": [GOOD[2], GOOD[2]]}, r"'image' takes one image, got a list of 2; "
                                                        r"give several as 'images'"),
        "30000x100 jpeg": (encoded(np.zeros((100, 30000, 3), np.uint8), "JPEG"),
                           r"aspect ratio 300.0 \(30000x100\) is more than 200"),
        "missing file": ({"image": directory / "no_such.jpg"}, "file not found"),
        "decompression bomb": (png_header_only(100_000, 100_000), "decompression bomb"),
        "lone surrogate": ("tee \ud800", "not valid Unicode"),
        "Item.images not a list": (moon3rt.Item(text="x", images=5), "Item.images must be a list"),
    }


@pytest.fixture(scope="module")
def encoder() -> moon3rt.Encoder:
    return moon3rt.load("moon3-tiny", device="cpu")


@pytest.fixture(scope="module")
def cases(tmp_path_factory):
    return bad_cases(tmp_path_factory.mktemp("bad"))


@pytest.fixture(scope="module")
def clean(encoder) -> np.ndarray:
    return encoder.encode(GOOD)


CASE_NAMES = [
    "corrupt bytes", "truncated jpeg", "truncated png", "0x0 array", "1x300 image", "float array", "empty string",
    "empty dict", "blank text", "int", "None", "list", "unknown key", "text not a string", "image and images",
    "images not a list", "second image bad", "missing file", "decompression bomb",
    "lone surrogate", "Item.images not a list", "one byte", "list as 'image'", "30000x100 jpeg",
]


def test_case_names_cover_every_case(cases):
    assert sorted(cases) == sorted(CASE_NAMES)


@pytest.mark.parametrize("name", CASE_NAMES)
def test_bad_item(name, encoder, cases, clean):
    bad, pattern = cases[name]
    items = [GOOD[0], GOOD[1], bad, GOOD[2]]
    with pytest.raises(moon3rt.EncodeError) as info:
        encoder.encode(items)
    assert [f.index for f in info.value.failures] == [2]
    assert re.search("item 2: .*" + pattern, str(info.value)), str(info.value)

    report = encoder.encode_with_report(items)  # on_error="skip"
    assert [f.index for f in report.failures] == [2] and re.search(pattern, report.failures[0].reason)
    assert report.ok.tolist() == [True, True, False, True]
    assert np.isnan(report.embeddings[2]).all()
    np.testing.assert_array_equal(report.embeddings[[0, 1, 3]], clean)


def test_every_bad_index_named(encoder, cases, clean):
    items, bad_indices = [], []
    for k, (bad, _) in enumerate(cases.values()):
        items.append(GOOD[k % 3])
        bad_indices.append(len(items))
        items.append(bad)
    with pytest.raises(moon3rt.EncodeError) as info:
        encoder.encode(items)
    assert [f.index for f in info.value.failures] == bad_indices
    message = str(info.value)
    assert message.startswith(f"{len(bad_indices)} item(s) cannot be embedded")
    for i in bad_indices[:20]:
        assert f"item {i}: " in message
    if len(bad_indices) > 20:
        assert f"... and {len(bad_indices) - 20} more" in message

    with pytest.warns(UserWarning, match=f"{len(bad_indices)} item\\(s\\) skipped"):
        vectors = encoder.encode(items, on_error="skip")
    good = [i for i in range(len(items)) if i not in bad_indices]
    assert np.isnan(vectors[bad_indices]).all() and np.isfinite(vectors[good]).all()
    alone = np.concatenate([clean[[k % 3]] for k in range(len(good))])
    np.testing.assert_allclose(vectors[good], alone, atol=ATOL)


def test_raise_names_bad_items_in_later_windows_and_embeds_nothing(encoder, monkeypatch):
    items = [f"item number {i}" for i in range(150)]
    for i in (1, 70, 149):  # with batch_size=1 items are prepared 64 at a time
        items[i] = {"text": i}
    calls = []
    monkeypatch.setattr(encoder.backend, "embed", calls.append)
    with pytest.raises(moon3rt.EncodeError) as info:
        encoder.encode(items, batch_size=1)
    assert [f.index for f in info.value.failures] == [1, 70, 149]
    assert "item 149: 'text' must be a string" in str(info.value)
    assert calls == [], "nothing should be embedded once the request is known to fail"


def test_on_error_must_be_known(encoder):
    with pytest.raises(ValueError, match="on_error"):
        encoder.encode(GOOD, on_error="ignore")


# ---------------------------------------------------------------------------- model failures
POISON = rgb(84, 84, seed=9)  # the only item whose image is a 6x6 patch grid


@pytest.mark.parametrize("error", [RuntimeError("CUDA error: an illegal memory access"), ValueError("bad batch")])
def test_model_failure_costs_only_that_item(error, encoder, clean, monkeypatch):
    real = encoder.backend.embed
    sizes = []

    def embed(batch):
        sizes.append(batch.num_items)
        grids = [] if batch.image_grid_thw is None else [tuple(g) for g in batch.image_grid_thw.tolist()]
        if (1, 6, 6) in grids:
            raise error
        return real(batch)

    monkeypatch.setattr(encoder.backend, "embed", embed)
    items = [GOOD[0], GOOD[1], {"text": "poison", "image": POISON}, GOOD[2]]
    report = encoder.encode_with_report(items)
    assert [f.index for f in report.failures] == [2]
    assert report.failures[0].reason == f"model failed: {error}"
    np.testing.assert_allclose(report.embeddings[[0, 1, 3]], clean, atol=ATOL)
    assert sizes[0] == 4 and sorted(sizes[1:]) == [1, 1, 1, 1]  # the batch, then each item alone

    with pytest.raises(moon3rt.EncodeError, match=f"item 2: model failed: {re.escape(str(error))}"):
        encoder.encode(items)


# ------------------------------------------------------------------------------- big images
@pytest.fixture(scope="module")
def huge_jpeg(tmp_path_factory) -> Path:
    image = Image.new("RGB", (6000, 6000), (40, 120, 200))
    draw = ImageDraw.Draw(image)
    for k in range(12):
        draw.rectangle((k * 500, k * 400, k * 500 + 400, k * 400 + 900), fill=(20 * k, 255 - 20 * k, 90))
    path = tmp_path_factory.mktemp("huge") / "huge.jpg"
    image.save(path, format="JPEG", quality=85)
    return path


MEASURE = textwrap.dedent(
    """
    import json, resource, sys
    import numpy as np
    import moon3rt
    encoder = moon3rt.load("moon3-tiny", device="cpu")
    encoder.encode(["warm up", np.zeros((224, 224, 3), np.uint8)])
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    vectors = encoder.encode([{"text": "huge", "image": sys.argv[1]}])
    grown = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before
    print(json.dumps({"grown_mb": grown / 1024, "norm": float(np.linalg.norm(vectors[0])),
                      "grid": encoder.prepare({"image": sys.argv[1]}).images[0].grid_thw}))
    """
)


def test_huge_jpeg_embedded_with_bounded_memory(huge_jpeg):
    # A fresh process, so that the peak RSS it reports belongs to this image alone.
    run = subprocess.run([sys.executable, "-c", MEASURE, str(huge_jpeg)], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-2000:]
    result = json.loads(run.stdout.strip().splitlines()[-1])
    assert abs(result["norm"] - 1) < 1e-5
    _, gh, gw = result["grid"]
    assert gh * gw * 14 * 14 <= 28 * 28 * 64 and gh == gw  # scaled down to max_pixels, square kept
    # 6000 x 6000 RGB is 108 MB decoded in full; the JPEG decoder's draft mode avoids that
    assert result["grown_mb"] < 100, f"peak RSS grew by {result['grown_mb']:.0f} MB"


@pytest.mark.parametrize("shape", [(1, 5, 3), (1, 1, 3), (7, 1, 3)])
def test_one_pixel_wide_images_are_refused(encoder, shape):
    result = encoder.encode_with_report(["ok", np.full(shape, 100, np.uint8)])
    (failure,) = result.failures
    assert failure.index == 1 and "each side needs at least 2" in failure.reason
    assert np.isfinite(result.embeddings[0]).all()


def test_a_bare_array_is_not_taken_for_a_list_of_items(encoder):
    with pytest.raises(TypeError, match="wrap a single item in a list"):
        encoder.encode(np.zeros((60, 80, 3), np.uint8))


def test_non_finite_model_output_is_an_item_error(encoder, monkeypatch):
    real = encoder.backend.embed

    def poisoned(batch):
        y = real(batch).clone()  # out of inference mode: a normal tensor to edit
        y[0] = float("nan")
        return y

    monkeypatch.setattr(encoder.backend, "embed", poisoned)
    result = encoder.encode_with_report(["first", "second"], batch_size=2)
    assert [f.index for f in result.failures] == [0]
    assert "non-finite" in result.failures[0].reason
    assert np.isnan(result.embeddings[0]).all() and np.isfinite(result.embeddings[1]).all()
    with pytest.raises(moon3rt.EncodeError, match="item 0: model produced non-finite values"):
        encoder.encode(["first", "second"], batch_size=2)


# ------------------------------------------------------------------- memory of failed items
def reachable(root, limit: int = 200_000) -> list:
    """Every object reachable from `root` through gc referents (bytes included: they are leaves)."""
    import gc

    seen, stack, out = set(), [root], []
    while stack and len(out) < limit:
        obj = stack.pop()
        if id(obj) in seen or isinstance(obj, type):
            continue
        seen.add(id(obj))
        out.append(obj)
        stack.extend(gc.get_referents(obj))
    return out


def test_failed_items_keep_no_frames_or_data(encoder, tmp_path):
    """A failure in a report holds its index and reason, never a traceback: the frames of
    one would keep the file's bytes (and decoded pixels) alive as long as the report."""
    import types

    junk = tmp_path / "junk.jpg"
    junk.write_bytes(bytes.fromhex("ffd8ffe000104a464946000101") + np.random.default_rng(0).bytes(2_000_000))
    cut = encoded(rgb(600, 600, seed=4), "PNG")
    items = [junk, cut[: len(cut) // 2], {"images": [rgb(40, 40), b"x" * 2_000_000]}, {"text": 3}, "ok"]
    result = encoder.encode_with_report(items, num_workers=2)
    assert [f.index for f in result.failures] == [0, 1, 2, 3]
    for failure in result.failures:
        assert failure.__traceback__ is None and failure.__context__ is None and failure.__cause__ is None
    held = reachable(result)
    assert not [o for o in held if isinstance(o, (types.FrameType, types.TracebackType, BaseException))
                and o not in result.failures]
    big = [len(o) for o in held if isinstance(o, (bytes, bytearray)) and len(o) > 100_000]
    assert not big, f"the report holds {len(big)} large buffers"
    with pytest.raises(moon3rt.EncodeError) as info:
        encoder.encode(items)
    for failure in info.value.failures:
        assert failure.__traceback__ is None and failure.__context__ is None


def test_a_big_non_image_file_is_refused_after_its_header(tmp_path):
    """A file is read from its header on: 200 MB of zeros (a sparse file) is refused
    without reading it, so the memory allocated stays far below its size."""
    import tracemalloc

    from moon3rt.images import ImageError, load_image

    path = tmp_path / "big.bin"
    with open(path, "wb") as f:
        f.truncate(200 * 2**20)
    tracemalloc.start()
    try:
        with pytest.raises(ImageError, match="not a recognised image format"):
            load_image(path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 10 * 2**20, f"{peak / 2**20:.0f} MB allocated to refuse a non-image"


HUGE_PNG_PEAK = textwrap.dedent(
    """
    import json, sys
    import numpy as np
    import moon3rt, moon3rt.images as images
    from pathlib import Path
    images.LARGE_DECODE_PIXELS = 4_000_000  # the huge-image path, at a size a test can afford:
    if hasattr(images, "PixelBudget"):  # one 4000 x 4000 image at a time, as one 20000 x 20000 is
        images.LARGE_DECODE_BUDGET = images.PixelBudget(16_000_000)
    def rss(field):
        for line in open("/proc/self/status"):
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    encoder = moon3rt.load("moon3-tiny", device="cpu")
    encoder.encode(["warm up", np.zeros((224, 224, 3), np.uint8)])
    before = rss("VmRSS")
    result = encoder.encode_with_report([Path(sys.argv[1])] * 8, num_workers=int(sys.argv[2]))
    print(json.dumps({"grown_mb": rss("VmHWM") - before, "after_mb": rss("VmRSS") - before,
                      "failures": [str(f) for f in result.failures]}))
    """
)


def test_huge_png_peak_memory_does_not_grow_with_workers(tmp_path):
    """Full-size decodes of huge non-JPEG images are bounded process-wide (a pixel budget),
    and their freed buffers go back to the OS, so 4 worker threads hold about one image's
    worth, as one thread does. 4000 x 4000 RGB: 48 MB decoded."""
    ramp = np.linspace(0, 255, 4000).astype(np.uint8)
    pixels = np.stack(np.broadcast_arrays(ramp[None, :], ramp[:, None], np.uint8(90)), axis=-1)
    path = tmp_path / "huge.png"
    Image.fromarray(np.ascontiguousarray(pixels)).save(path, compress_level=1)
    grown = {}
    for workers in (1, 4):
        run = subprocess.run([sys.executable, "-c", HUGE_PNG_PEAK, str(path), str(workers)],
                             capture_output=True, text=True, timeout=300)
        assert run.returncode == 0, run.stderr[-2000:]
        result = json.loads(run.stdout.strip().splitlines()[-1])
        assert result["failures"] == []
        grown[workers] = result
    assert grown[4]["grown_mb"] < grown[1]["grown_mb"] + 48, grown
    assert grown[4]["after_mb"] < 48, grown


def test_numpy_integers_are_accepted_and_bad_numbers_named(encoder):
    full = encoder.encode(["red tee"])
    np.testing.assert_allclose(encoder.encode(["red tee"], dim=np.int64(32)), encoder.encode(["red tee"], dim=32))
    same = encoder.encode(["red tee"], batch_size=np.int32(2), max_batch_tokens=np.int64(4096), num_workers=np.int8(1))
    np.testing.assert_array_equal(same, full)
    for kwargs, message in (
        ({"num_workers": 1.5}, "num_workers must be a positive integer, got 1.5"),
        ({"num_workers": 0}, "num_workers must be a positive integer, got 0"),
        ({"dim": 0}, f"dim=0 is out of range: this model's vectors have {encoder.dim} dimensions; give an integer"),
        ({"dim": True}, "dim=True is out of range"),
        ({"dim": 2.0}, "dim=2.0 is out of range"),
        ({"dim": encoder.dim + 1}, f"dim={encoder.dim + 1} is out of range: this model's vectors have {encoder.dim}"),
        ({"batch_size": 2.0}, "batch_size must be a positive integer, got 2.0"),
    ):
        with pytest.raises(ValueError, match=re.escape(message)):
            encoder.encode(["red tee"], **kwargs)
