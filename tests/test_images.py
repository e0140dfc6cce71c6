"""moon3rt.images against transformers' Qwen2-VL image processor, plus decoding edge cases.

Every test image is made here, in memory or under tmp_path.
"""

import inspect
import io
import math
import os
import subprocess
import sys
import time

import numpy as np
import pytest
from crafted import png_header_only
from oracle import ReferenceProcessor
from PIL import Image

from moon3rt import images
from moon3rt.images import (
    CLIP_MEAN,
    CLIP_STD,
    MAX_ASPECT_RATIO,
    ImageError,
    PatchifiedImage,
    gme_pre_resize,
    load_image,
    preprocess_image,
    smart_resize,
)

try:  # transformers >= 5 with the PIL backend as its own module
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize as ref_smart_resize
except ImportError:  # the older layout; if this is missing too, collection fails loudly
    from transformers.models.qwen2_vl.image_processing_qwen2_vl import smart_resize as ref_smart_resize

from transformers.image_transforms import convert_to_rgb as ref_convert_to_rgb


def random_pixels(*shape):
    """Noise seeded by its shape, so each test sees the same image however it is run."""
    return np.random.default_rng(shape).integers(0, 256, shape, dtype=np.uint8)


def random_rgb(height, width):
    return Image.fromarray(random_pixels(height, width, 3))


def encode(image, fmt, **kwargs):
    buf = io.BytesIO()
    image.save(buf, fmt, **kwargs)
    return buf.getvalue()


def assert_same_preprocessing(image, min_pixels, max_pixels, size_kwarg=False):
    if size_kwarg:
        size = {"shortest_edge": min_pixels, "longest_edge": max_pixels}
        processor = ReferenceProcessor(size=size)
    else:
        processor = ReferenceProcessor(min_pixels=min_pixels, max_pixels=max_pixels)
    ref = processor(images=[image], return_tensors="np")
    ours = preprocess_image(image, min_pixels=min_pixels, max_pixels=max_pixels)
    assert isinstance(ours, PatchifiedImage)
    assert ours.grid_thw == tuple(int(v) for v in ref["image_grid_thw"][0])
    ref_values = np.asarray(ref["pixel_values"])
    assert ours.pixel_values.dtype == np.float32
    assert ours.pixel_values.shape == ref_values.shape
    diff = np.abs(ours.pixel_values - ref_values)
    if diff.max() > 1e-6:
        row, col = np.unravel_index(diff.argmax(), diff.shape)
        pytest.fail(
            f"{image.size} {image.mode}: max abs diff {diff.max()} at patch {row}, element {col}: "
            f"ours {ours.pixel_values[row, col]}, transformers {ref_values[row, col]}"
        )


# ---------------------------------------------------------------------------------------
# Parity with transformers


@pytest.mark.parametrize(
    "height, width, min_pixels, max_pixels",
    [
        (37, 91, 56 * 56, 28 * 28 * 1280),  # odd sizes, slight upscale
        (300, 200, 56 * 56, 28 * 28 * 1280),
        (29, 57, 56 * 56, 28 * 28 * 1280),
        (28, 28, 56 * 56, 28 * 28 * 1280),  # below min_pixels: upscaled
        (56, 84, 56 * 56, 28 * 28 * 1280),  # already a multiple of 28: size kept
        (13, 400, 56 * 56, 28 * 28 * 1280),  # thin
        (997, 631, 56 * 56, 28 * 28 * 64),  # prime sides, strong downscale
        (45, 61, 28 * 28 * 16, 28 * 28 * 1280),  # custom min: upscale
        (1024, 768, 4 * 28 * 28, 28 * 28 * 256),  # custom max: downscale
        (1080, 1920, 56 * 56, 28 * 28 * 1280),  # a full-HD photo at the default range
    ],
)
def test_preprocess_matches_transformers(height, width, min_pixels, max_pixels):
    assert_same_preprocessing(random_rgb(height, width), min_pixels, max_pixels)


def test_preprocess_matches_transformers_with_size_dict():
    assert_same_preprocessing(random_rgb(123, 77), 56 * 56, 28 * 28 * 100, size_kwarg=True)


def reference_rgb(image):
    """transformers' own RGB conversion, as an array (newer versions take return_numpy)."""
    if "return_numpy" in inspect.signature(ref_convert_to_rgb).parameters:
        return ref_convert_to_rgb(image, return_numpy=True)
    return np.asarray(ref_convert_to_rgb(image))


def make_mode_images():
    rgb = random_rgb(45, 67)
    rgba = Image.fromarray(random_pixels(45, 67, 4))
    palette = rgb.quantize(32)
    palette_transparent = palette.copy()
    palette_transparent.info["transparency"] = 5
    rgb_transparent = rgb.copy()  # as a PNG tRNS chunk gives: one colour is transparent
    rgb_transparent.info["transparency"] = tuple(int(v) for v in np.asarray(rgb)[0, 0])
    return {
        "RGBA": rgba,
        "LA": rgba.convert("LA"),
        "PA": palette.convert("PA"),
        "P": palette,
        "P+transparency": palette_transparent,
        "L": rgb.convert("L"),
        "1": rgb.convert("1"),
        "CMYK": rgb.convert("CMYK"),
        "YCbCr": rgb.convert("YCbCr"),
        "RGBX": rgb.convert("RGBX"),
        "RGB+transparency": rgb_transparent,
    }


TRANSPARENT = {"RGBA", "LA", "PA", "P+transparency", "RGB+transparency"}


def on_white(image):
    """Our rule for transparency, stated independently: composite on an opaque white background."""
    white = Image.new("RGBA", image.size, (255, 255, 255, 255))
    return np.asarray(Image.alpha_composite(white, image.convert("RGBA")).convert("RGB"))


@pytest.mark.parametrize("mode", list(make_mode_images()))
def test_mode_conversion_matches_transformers(mode):
    """Opaque modes convert as transformers converts them. Transparent ones are composited on
    white: newer transformers releases do the same, 5.17 (the GPU machine's) drops alpha, so
    for those the rule is checked on its own and the processor is fed our RGB image."""
    image = make_mode_images()[mode]
    ours = load_image(image)
    assert ours.mode == "RGB" and ours.size == image.size
    expected = on_white(image) if mode in TRANSPARENT else reference_rgb(image)
    np.testing.assert_array_equal(np.asarray(ours), expected)
    processor = ReferenceProcessor(min_pixels=56 * 56, max_pixels=28 * 28 * 64)
    ref = processor(images=[ours if mode in TRANSPARENT else image], return_tensors="np")
    ours_values = preprocess_image(ours, max_pixels=28 * 28 * 64).pixel_values
    np.testing.assert_array_equal(ours_values, ref["pixel_values"])


def test_rgba_composites_on_white():
    rgba = np.zeros((4, 4, 4), np.uint8)
    rgba[..., 0] = 200
    rgba[0, 0, 3] = 255  # one opaque red pixel, the rest fully transparent
    rgb = np.asarray(load_image(rgba))
    assert tuple(rgb[0, 0]) == (200, 0, 0)
    assert (rgb[1:] == 255).all()


@pytest.mark.parametrize("mode", ["I;16", "I"])
def test_sixteen_bit_grey_is_scaled_not_clipped(mode):
    values = np.array([[0, 255, 256, 1000], [32767, 32768, 65279, 65535]], dtype=np.uint16)
    image = Image.fromarray(values) if mode == "I;16" else Image.fromarray(values.astype(np.int32))
    assert image.mode == mode
    expected = np.round(values / 257).astype(np.uint8)
    for source in (image, encode(image, "PNG" if mode == "I;16" else "TIFF")):
        rgb = np.asarray(load_image(source))
        np.testing.assert_array_equal(rgb, np.repeat(expected[..., None], 3, axis=2))


def test_preprocess_accepts_non_rgb_image():
    grey = random_rgb(40, 50).convert("L")
    np.testing.assert_array_equal(
        preprocess_image(grey).pixel_values, preprocess_image(grey.convert("RGB")).pixel_values
    )


def test_patch_layout():
    """Patch vectors are (C, T, P, P) with the frame repeated, patches grouped per 2x2 window."""
    image = random_rgb(56, 84)  # kept as is: 4 x 6 patches
    out = preprocess_image(image, mean=(0, 0, 0), std=(1, 1, 1))
    assert out.grid_thw == (1, 4, 6)
    pixels = np.asarray(image, dtype=np.float32) / 255
    vectors = out.pixel_values.reshape(24, 3, 2, 14, 14)
    np.testing.assert_array_equal(vectors[:, :, 0], vectors[:, :, 1])
    # third patch is window (0, 0), row 1, col 0 -> pixels rows 14..27, cols 0..13
    np.testing.assert_allclose(vectors[2, :, 0], pixels[14:28, 0:14].transpose(2, 0, 1), atol=1e-6)
    # fifth patch is window (0, 1), row 0, col 0 -> pixels rows 0..13, cols 28..41
    np.testing.assert_allclose(vectors[4, :, 0], pixels[0:14, 28:42].transpose(2, 0, 1), atol=1e-6)


def test_clip_constants_match_transformers():
    from transformers.image_utils import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD

    assert CLIP_MEAN == tuple(OPENAI_CLIP_MEAN) and CLIP_STD == tuple(OPENAI_CLIP_STD)


# ---------------------------------------------------------------------------------------
# smart_resize

SIDES = [1, 2, 3, 13, 14, 27, 28, 29, 41, 55, 56, 57, 99, 100, 111, 223, 224, 500, 999, 1000,
         1023, 1920, 4000, 12345]  # fmt: skip
PIXEL_RANGES = [
    (56 * 56, 28 * 28 * 1280),  # Qwen2-VL defaults
    (4 * 28 * 28, 16384 * 28 * 28),  # GME's range
    (256 * 28 * 28, 1280 * 28 * 28),
    (56 * 56, 28 * 28 * 64),
]


@pytest.mark.parametrize("min_pixels, max_pixels", PIXEL_RANGES)
@pytest.mark.parametrize("factor", [28, 32])
def test_smart_resize_matches_transformers(factor, min_pixels, max_pixels):
    checked = 0
    for height in SIDES:
        for width in SIDES:
            args = (height, width, factor, min_pixels, max_pixels)
            if max(height, width) / min(height, width) > MAX_ASPECT_RATIO:
                with pytest.raises(ValueError):
                    ref_smart_resize(*args)
                with pytest.raises(ImageError, match="aspect ratio"):
                    smart_resize(*args)
                continue
            assert smart_resize(*args) == ref_smart_resize(*args), args
            checked += 1
    assert checked > 400


def test_smart_resize_refuses_bad_sizes():
    with pytest.raises(ImageError, match="aspect ratio"):
        smart_resize(1, 300)
    with pytest.raises(ImageError, match="aspect ratio"):
        smart_resize(201, 1)
    assert smart_resize(1, 200)  # exactly 200 is allowed
    for height, width in [(0, 10), (10, 0), (0, 0)]:
        with pytest.raises(ImageError, match="no pixels"):
            smart_resize(height, width)


# ---------------------------------------------------------------------------------------
# Loading


def test_sources_agree(tmp_path):
    image = random_rgb(33, 47)
    data = encode(image, "PNG")
    path = tmp_path / "item.png"
    path.write_bytes(data)
    expected = np.asarray(image)
    for source in (path, str(path), data, bytearray(data), memoryview(data), image, expected):
        loaded = load_image(source)
        assert loaded.mode == "RGB", type(source)
        np.testing.assert_array_equal(np.asarray(loaded), expected, err_msg=str(type(source)))


def test_numpy_grey_and_copy():
    grey = random_pixels(5, 6)
    for array in (grey, grey[..., None]):
        expected = np.repeat(grey[..., None], 3, axis=2)
        np.testing.assert_array_equal(np.asarray(load_image(array)), expected)
    rgb = random_pixels(5, 6, 3)
    loaded = load_image(rgb[:, ::-1])  # non-contiguous view
    rgb[:] = 0  # the loaded image must not alias the caller's array
    assert np.asarray(loaded).any()


def test_exif_orientation_applied(tmp_path):
    image = random_rgb(20, 40)  # stored 40 wide, 20 high
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: rotate 90 degrees clockwise to display
    data = encode(image, "JPEG", exif=exif)
    plain = load_image(encode(image, "JPEG"))
    assert plain.size == (40, 20)
    for source in (data, Image.open(io.BytesIO(data))):
        rotated = load_image(source)
        assert rotated.size == (20, 40)
        expected = plain.transpose(Image.Transpose.ROTATE_270)
        np.testing.assert_array_equal(np.asarray(rotated), np.asarray(expected))


def test_caller_image_untouched():
    image = random_rgb(10, 12)
    before = np.asarray(image).copy()
    loaded = load_image(image)
    assert loaded is not image
    np.testing.assert_array_equal(np.asarray(image), before)


def test_one_by_n_loads_but_extreme_aspect_refused_by_resize():
    image = load_image(np.full((1, 300, 3), 128, np.uint8))
    assert image.size == (300, 1)
    with pytest.raises(ImageError, match="aspect ratio"):
        preprocess_image(image)


@pytest.mark.parametrize(
    "source, match",
    [
        (b"this is not an image at all", "not a recognised image format"),
        (b"", "empty"),
        (np.zeros((0, 0, 3), np.uint8), "no pixels"),
        (np.zeros((4, 0), np.uint8), "no pixels"),
        (np.zeros((4, 4, 3), np.float64), "uint8"),
        (np.zeros((4, 4, 5), np.uint8), "shape"),
        (np.zeros((2, 4, 4, 3), np.uint8), "shape"),
        (5, "unsupported image type int"),
        ([1, 2, 3], "unsupported image type list"),
        (None, "unsupported image type NoneType"),
    ],
)
def test_bad_inputs(source, match):
    with pytest.raises(ImageError, match=match):
        load_image(source)


def test_missing_path_and_directory(tmp_path):
    with pytest.raises(ImageError, match="not found"):
        load_image(tmp_path / "missing.jpg")
    with pytest.raises(ImageError, match="cannot read"):
        load_image(tmp_path)


@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
def test_truncated_file(fmt, tmp_path):
    data = encode(random_rgb(64, 80), fmt)
    path = tmp_path / f"cut.{fmt.lower()}"
    path.write_bytes(data[: len(data) // 2])
    lazy = Image.open(io.BytesIO(data[: len(data) // 2]))  # PIL opens fine, decodes later
    for source in (data[: len(data) // 2], path, lazy):
        with pytest.raises(ImageError, match="truncated"):
            load_image(source)


def test_decompression_bomb_refused_from_header():
    data = png_header_only(100_000, 100_000)
    start = time.perf_counter()
    with pytest.raises(ImageError, match="decompression bomb"):
        load_image(data)
    assert time.perf_counter() - start < 0.5
    with pytest.raises(ImageError, match="decompression bomb"):
        load_image(random_rgb(30, 30), max_image_pixels=899)


@pytest.mark.parametrize("fmt", ["PNG", "TIFF", "GIF", "BMP", "WEBP", "JPEG"])
def test_one_pixel_limit_for_every_format(fmt, monkeypatch):
    """max_image_pixels is the only limit, whatever the format: PIL's process-wide one (which
    its TIFF and GIF plugins check again while reading tiles and frames) neither refuses
    first nor changes, and still applies to everyone else's PIL calls."""
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # refuses above 2000 pixels
    data = encode(random_rgb(100, 100), fmt)
    assert load_image(data).size == (100, 100)
    with pytest.raises(ImageError, match="max_image_pixels=9999; refused as a possible decompression bomb"):
        load_image(data, max_image_pixels=9_999)
    with pytest.raises(Image.DecompressionBombError):
        Image.open(io.BytesIO(data)).load()
    assert Image.MAX_IMAGE_PIXELS == 1000


def test_own_limit_replaces_pils_global(monkeypatch):
    """PIL's process-wide limit neither applies nor changes; max_image_pixels decides."""
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    data = encode(random_rgb(100, 100), "PNG")  # 10k pixels: PIL alone would refuse it
    with pytest.raises(Image.DecompressionBombError):
        Image.open(io.BytesIO(data))
    assert load_image(data).size == (100, 100)
    with pytest.raises(ImageError, match="decompression bomb"):
        load_image(data, max_image_pixels=9_999)
    assert Image.MAX_IMAGE_PIXELS == 1000


def big_solid_jpeg():
    return encode(Image.new("RGB", (6000, 6000), (40, 120, 200)), "JPEG", quality=90)


def test_jpeg_draft_for_large_images():
    small = load_image(big_solid_jpeg(), target_pixels=100_000)
    assert small.size == (750, 750)  # decoded at 1/8 scale, still >= 2x the target per side
    assert small.width >= 2 * math.isqrt(100_000)
    assert np.abs(np.asarray(small).astype(int) - (40, 120, 200)).max() <= 3

    # no draft unless the processor would shrink the image at least 4x per side
    photo = encode(random_rgb(300, 400), "JPEG")
    np.testing.assert_array_equal(
        np.asarray(load_image(photo, target_pixels=28 * 28 * 64)), np.asarray(load_image(photo))
    )


PEAK_MEMORY_SCRIPT = """
import importlib.util, sys
spec = importlib.util.spec_from_file_location("images_under_test", sys.argv[1])
images = importlib.util.module_from_spec(spec)
sys.modules[spec.name] = images
spec.loader.exec_module(images)
image = images.load_image(sys.argv[2], target_pixels=int(sys.argv[3]) or None)
status = open("/proc/self/status").read().splitlines()
peak_kib = next(int(line.split()[1]) for line in status if line.startswith("VmHWM"))
print(image.width, peak_kib)
"""


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="reads Linux VmHWM")
def test_jpeg_draft_peak_memory(tmp_path):
    """Each load in a fresh process: with a small target the full 6000 x 6000 image
    (108 MB) is never held."""
    path = tmp_path / "big.jpg"
    path.write_bytes(big_solid_jpeg())
    peaks = {}
    for target in (100_000, 0):
        run = subprocess.run(
            [sys.executable, "-c", PEAK_MEMORY_SCRIPT, images.__file__, str(path), str(target)],
            capture_output=True, text=True, check=True,
        )
        width, peaks[target] = map(int, run.stdout.split())
        assert width == (750 if target else 6000)
    assert peaks[0] - peaks[100_000] > 80_000, f"peak KiB with / without draft: {peaks}"


# ---------------------------------------------------------------------------------------
# GME pre-resize


def gme_size(height, width):
    """The published GME fetch_image rule, restated: factor 28, area in [4, 16384] * 784."""
    factor, lo, hi = 28, 4 * 28 * 28, 16384 * 28 * 28
    h = max(factor, round(height / factor) * factor)
    w = max(factor, round(width / factor) * factor)
    if h * w > hi:
        beta = math.sqrt(height * width / hi)
        h = math.floor(height / beta / factor) * factor
        w = math.floor(width / beta / factor) * factor
    elif h * w < lo:
        beta = math.sqrt(lo / (height * width))
        h = math.ceil(height * beta / factor) * factor
        w = math.ceil(width * beta / factor) * factor
    if max(h, w) / min(h, w) > 200:
        h, w = (w * 200, w) if h > w else (h, h * 200)
    return h, w


@pytest.mark.parametrize(
    "height, width",
    [(100, 100), (20, 30), (37, 91), (1, 1), (5, 9000), (9000, 5), (4000, 3500), (60, 10)],
)
def test_gme_pre_resize(height, width):
    h, w = gme_size(height, width)
    if height * width < 1_000_000:
        image = random_rgb(height, width)
        out = gme_pre_resize(image)
        assert out.size == (w, h)
        # PIL's default resample for RGB is what the published code relies on
        np.testing.assert_array_equal(np.asarray(out), np.asarray(image.resize((w, h))))
    else:  # sizes only: skip allocating big random images
        out = gme_pre_resize(Image.new("RGB", (width, height)))
        assert out.size == (w, h)
    assert h % 28 == 0 and w % 28 == 0


def test_gme_known_sizes():
    assert gme_size(100, 100) == (112, 112)
    assert gme_size(20, 30) == (56, 84)  # area 784 < 4 * 784: scaled up
    assert gme_size(5, 9000) == (28, 5600)  # ratio clamped to 200
    assert gme_pre_resize(Image.new("RGB", (84, 56))).size == (84, 56)


def test_alpha_dropped_for_gme_composited_otherwise():
    """GME's own code converts with PIL (alpha dropped); transformers composites on white."""
    rgba = Image.new("RGBA", (30, 20), (200, 10, 10, 0))  # fully transparent red
    assert load_image(rgba).getpixel((0, 0)) == (255, 255, 255)
    assert load_image(rgba, composite_alpha=False).getpixel((0, 0)) == (200, 10, 10)


def test_huge_non_jpeg_is_reduced_right_after_decoding(monkeypatch):
    """Past LARGE_DECODE_PIXELS a PNG is box-reduced to >= 2x the target per side before any
    conversion, one such decode at a time; the result stays close to the full-size path."""
    import moon3rt.images as images

    rgba = np.zeros((200, 300, 4), np.uint8)
    rgba[..., 0] = 180
    rgba[:100, :, 3] = 255  # top half opaque red, bottom half transparent
    buf = io.BytesIO()
    Image.fromarray(rgba, "RGBA").save(buf, format="PNG")
    target = 28 * 28 * 4
    full = load_image(buf.getvalue(), target_pixels=target)
    monkeypatch.setattr(images, "LARGE_DECODE_PIXELS", 1000)
    small = load_image(buf.getvalue(), target_pixels=target)
    assert full.size == (300, 200) and small.size == (150, 100)  # factor int(sqrt(60000 / (4 * 3136))) = 2
    assert small.mode == "RGB"
    assert small.getpixel((5, 2)) == (180, 0, 0) and small.getpixel((5, 90)) == (255, 255, 255)
    a = preprocess_image(full, max_pixels=target).pixel_values
    b = preprocess_image(small, max_pixels=target).pixel_values
    assert a.shape == b.shape and np.abs(a - b).mean() < 0.05


# ------------------------------------------------------------------------ uint8 patches
@pytest.mark.parametrize("mean, std", [(CLIP_MEAN, CLIP_STD), ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))])
def test_uint8_patches_embed_as_the_processor_floats(mean, std):
    """The patch embedding of uint8 patches (normalisation and the temporal copies folded into
    its weights) equals the float path on the processor's patches; gradients reach the weight."""
    import torch

    from moon3rt.config import PRESETS
    from moon3rt.model import PatchEmbed

    rng = np.random.default_rng(0)
    out = preprocess_image(Image.fromarray(rng.integers(0, 256, (56, 84, 3), dtype=np.uint8)), mean=mean, std=std)
    assert out.levels.dtype == np.uint8 and out.levels.shape == (24, 3 * 14 * 14)
    assert out.num_patches == 24 and out.pixel_values.shape == (24, 3 * 2 * 14 * 14)
    torch.manual_seed(0)
    embed = PatchEmbed(PRESETS["moon3-tiny"].vision).double()
    want = embed(torch.from_numpy(out.pixel_values).double())
    with torch.no_grad():
        got = embed(torch.from_numpy(out.levels), out.norm)
        again = embed(torch.from_numpy(out.levels), out.norm)  # the cached fold
    # the processor's patches are float32-rounded; the fold works on the exact levels
    torch.testing.assert_close(got, want.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(again, got, rtol=0, atol=0)
    (grad_float,) = torch.autograd.grad(want.square().sum(), embed.proj.weight)
    (grad_uint8,) = torch.autograd.grad(embed(torch.from_numpy(out.levels), out.norm).square().sum(),
                                        embed.proj.weight)
    torch.testing.assert_close(grad_uint8, grad_float, rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        embed.proj.weight.mul_(2)  # a changed weight is folded again, not served from the cache
        torch.testing.assert_close(embed(torch.from_numpy(out.levels), out.norm), 2 * got, rtol=1e-9, atol=1e-9)
    with pytest.raises(ValueError, match="normalisation"):
        embed(torch.from_numpy(out.levels))


def test_pack_refuses_two_normalisations_in_one_batch():
    from moon3rt.batching import pack
    from moon3rt.prompt import PreparedItem

    image = Image.fromarray(np.full((56, 56, 3), 90, np.uint8))
    a, b = preprocess_image(image), preprocess_image(image, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))

    def item(img):
        ids = np.full(img.num_patches // 4 + 1, 5, dtype=np.int64)
        return PreparedItem(input_ids=ids, position_ids=np.zeros((3, ids.size), np.int64), pool_position=ids.size - 1,
                            title_positions=np.zeros(0, np.int64), images=[img])

    assert pack([item(a), item(a)]).pixel_norm == a.norm
    with pytest.raises(ValueError, match="one batch takes one normalisation"):
        pack([item(a), item(b)])
