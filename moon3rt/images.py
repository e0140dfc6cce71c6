"""Image preprocessing for Qwen2-VL: decode, convert to RGB, smart resize, patchify.

`preprocess_image` gives the same `pixel_values` and `image_grid_thw` as
transformers' Qwen2-VL image processor (its PIL backend): PIL BICUBIC resize of the
uint8 RGB image to multiples of patch_size * merge_size, x / 255 in float64 then
float32, (x - mean) / std in float32, and the patch order that groups each
merge_size x merge_size window. It keeps the patches as uint8 (`PatchifiedImage.levels`,
what the runtime sends to the model, whose patch embedding normalises them); the float
`pixel_values` are computed from them on request.
"""

from __future__ import annotations

import contextlib
import functools
import io
import math
import os
import struct
import threading
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageOps

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
MAX_ASPECT_RATIO = 200
MIN_IMAGE_SIDE = 2
# The one pixel limit, for every format and every kind of source: an image (encoded file,
# PIL image or array) with more pixels is refused before it is decoded. It is above PIL's
# own process-wide limit (MAX_IMAGE_PIXELS, about 179 M pixels for an error), which
# load_image does not apply, so that a 20000 x 20000 photo (400 M pixels) is accepted.
DEFAULT_MAX_IMAGE_PIXELS = 500_000_000

# Errors PIL and its plugins raise for corrupt, truncated or unsupported data.
_DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, IndexError, TypeError, struct.error)
# A file's first bytes, enough for every PIL plugin's signature check.
_PREFIX_BYTES = 16


class ImageError(ValueError):
    """An image that cannot be used; the message says why (no item index: the caller adds it)."""


# ---------------------------------------------------------------------------------------
# Decoding

# Several PIL plugins (TIFF, GIF, ICO, MPO, ...) check PIL's process-wide MAX_IMAGE_PIXELS
# again while they read frames or tiles, so a 225 M pixel TIFF would be refused below our
# documented limit while the same PNG is accepted. Inside load_image, after its own check
# against the header's size, that second check is skipped for this thread only; every other
# caller of PIL, and other threads, keep PIL's limit exactly as configured.
_OWN_LIMIT = threading.local()
_pil_bomb_check = Image._decompression_bomb_check


def _bomb_check(size, *args, **kwargs):
    if getattr(_OWN_LIMIT, "checked", None) is not None:
        _check_pixels(*size, _OWN_LIMIT.checked)  # a frame larger than the header said is still refused
        return None
    return _pil_bomb_check(size, *args, **kwargs)


Image._decompression_bomb_check = _bomb_check


@contextlib.contextmanager
def _own_pixel_limit(max_image_pixels: int):
    previous = getattr(_OWN_LIMIT, "checked", None)
    _OWN_LIMIT.checked = max_image_pixels
    try:
        yield
    finally:
        _OWN_LIMIT.checked = previous


def _open_header(fp) -> Image.Image:
    """Identify the format from a binary file object and parse the header only (PIL opens
    lazily, reading pixel data at `load`), so a non-image is refused after its first bytes.

    This is `PIL.Image.open` without its process-wide MAX_IMAGE_PIXELS check, so that
    `load_image` can apply its own per-call limit without touching PIL's global (which
    would race with other threads).
    """
    prefix = fp.read(_PREFIX_BYTES)
    if not prefix:
        raise ImageError("empty image data (0 bytes)")
    tried = set()
    for load_plugins in (Image.preinit, Image.init):  # common formats first, as PIL does
        load_plugins()
        for fmt in [f for f in Image.ID if f not in tried]:
            tried.add(fmt)
            factory, accept = Image.OPEN[fmt]
            try:
                accepted = accept(prefix) if accept else True
            except _DECODE_ERRORS:  # a signature check that cannot read a prefix this short
                continue
            if not accepted or isinstance(accepted, str):  # a str is a reason for refusal
                continue
            fp.seek(0)
            try:
                return factory(fp, None)
            except (SyntaxError, IndexError, TypeError, struct.error, EOFError):
                continue  # not this format after all; PIL.Image.open moves on the same way
    shown = repr(prefix[:8]) + ("..." if len(prefix) > 8 else "")
    raise ImageError(f"not a recognised image format (corrupt or unsupported data, or not an image: "
                     f"it starts {shown})")


def _check_pixels(width: int, height: int, max_image_pixels: int) -> None:
    if width <= 0 or height <= 0:
        raise ImageError(f"image has no pixels ({width}x{height})")
    if width * height > max_image_pixels:
        raise ImageError(
            f"image claims {width}x{height} = {width * height} pixels, more than "
            f"max_image_pixels={max_image_pixels}; refused as a possible decompression bomb"
        )


def _check_aspect_ratio(width: int, height: int, max_aspect_ratio: float | None) -> None:
    if max_aspect_ratio is not None and width > 0 and height > 0:
        ratio = max(height, width) / min(height, width)
        if ratio > max_aspect_ratio:
            raise ImageError(f"aspect ratio {ratio:.1f} ({width}x{height}) is more than {max_aspect_ratio}")


@contextlib.contextmanager
def _decode_errors():
    """PIL's many exception types for bad data, as one ImageError with PIL's reason.

    Its __context__ still holds PIL's error and that traceback's frames (with the file's
    data): `ItemError.detached` drops them before an error is kept in a report.
    """
    try:
        yield
    except Image.DecompressionBombError as e:
        raise ImageError(f"refused as a decompression bomb by PIL: {e}") from None
    except ImageError:
        raise
    except _DECODE_ERRORS as e:
        raise ImageError(f"cannot decode image: {e}") from None


class PixelBudget:
    """A process-wide counting semaphore in pixels for the decodes of huge images.

    A decode takes its image's pixels from the budget and waits while they do not fit;
    an image larger than the whole budget runs alone. With encode's worker threads, the
    full-size pixels held at once stay within the budget (plus one image), whatever the
    number of threads.
    """

    def __init__(self, pixels: int):
        self.pixels, self.in_use = pixels, 0
        self._cond = threading.Condition()

    @contextlib.contextmanager
    def take(self, pixels: int):
        with self._cond:
            self._cond.wait_for(lambda: self.in_use == 0 or self.in_use + pixels <= self.pixels)
            self.in_use += pixels
        try:
            yield
        finally:
            with self._cond:
                self.in_use -= pixels
                self._cond.notify_all()


# A non-JPEG file (PNG, TIFF, ...) past LARGE_DECODE_PIXELS is decoded at full size once
# (its format has no reduced decode in PIL), box-reduced at once and the full image freed.
# LARGE_DECODE_BUDGET bounds how many such pixels are decoded at once across threads: one
# 20000 x 20000 RGB image (1.2 GB) at a time.
LARGE_DECODE_PIXELS = 64_000_000
LARGE_DECODE_BUDGET = PixelBudget(400_000_000)


def _release_freed_memory() -> None:
    """Hand freed heap pages back to the OS. glibc keeps a freed buffer in the arena of the
    thread that freed it, so a huge decode in each of n worker threads would otherwise hold
    n images' worth of memory after the images are gone."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


@functools.lru_cache(maxsize=1)
def _malloc_trim():
    try:
        import ctypes

        return ctypes.CDLL(None).malloc_trim  # glibc; absent on macOS, Windows, musl
    except (OSError, AttributeError):
        return None


def _decode(fp, max_image_pixels: int, target_pixels: int | None,
            max_aspect_ratio: float | None = None) -> Image.Image:
    """Decode an open binary file: header first (format, size, limits), pixels after."""
    with _decode_errors(), _own_pixel_limit(max_image_pixels):
        img = _open_header(fp)
        _check_pixels(*img.size, max_image_pixels)
        _check_aspect_ratio(*img.size, max_aspect_ratio)  # the file's own size, before any reduced decode
        if target_pixels is not None and img.format == "JPEG":
            _draft_jpeg(img, target_pixels)
        pixels = img.size[0] * img.size[1]
        if pixels > LARGE_DECODE_PIXELS and img.format != "JPEG" and target_pixels is not None:
            with LARGE_DECODE_BUDGET.take(pixels):
                try:
                    img.load()
                    small = _reduce_large(img, target_pixels)
                finally:
                    img.close()  # frees the full-size pixels now, not when the frame goes
                    del img
                    _release_freed_memory()
            return small
        img.load()  # full decode now, so truncation is reported here, not later
    return img


def _reduce_large(img: Image.Image, target_pixels: int) -> Image.Image:
    """Shrink a huge decoded image by an integer box factor, keeping at least 2x the
    target size per side (as the JPEG draft does), so that mode conversion, transparency
    and the final BICUBIC resize work on a small copy. Used only past LARGE_DECODE_PIXELS,
    where the processor shrinks the image many times anyway. Always a new image."""
    factor = int(math.sqrt(img.size[0] * img.size[1] / (4 * max(target_pixels, 1))))
    if factor < 2:
        return img.copy()
    if img.mode.startswith("I;16"):
        img = img.convert("I")  # keeps the 16-bit values, which _to_rgb scales later
    elif img.mode not in ("RGB", "RGBA", "L", "LA", "I", "F"):
        img = img.convert("RGBA" if "A" in img.getbands() or img.info.get("transparency") is not None else "RGB")
    return img.reduce(factor)


def _draft_jpeg(img: Image.Image, target_pixels: int) -> None:
    """Let the JPEG decoder scale down by 2, 4 or 8 (DCT scaling) for very large files.

    Draft changes the pixels compared with a full decode, so it is used only when the
    processor will shrink the image at least 4x per side anyway, and the decode keeps at
    least 2x the target size per side; the final BICUBIC resize does the rest.
    """
    width, height = img.size
    shrink = math.sqrt(width * height / max(target_pixels, 1))
    if shrink >= 4:
        img.draft(None, (math.ceil(2 * width / shrink), math.ceil(2 * height / shrink)))


def _to_rgb(img: Image.Image, composite_alpha: bool = True) -> Image.Image:
    """Any PIL mode to RGB, as transformers' `convert_to_rgb` does, except for 16-bit grey.

    Transparency (an "A" band, or a `transparency` entry as in P or tRNS images) is
    composited on white, like recent transformers releases (5.17 still dropped alpha: a
    transparent product shot then shows whatever colour its invisible pixels hold). 16-bit
    grey (I;16*, and I, which older Pillow uses for 16-bit PNGs) is scaled to 8 bits as
    round(v * 255 / 65535); PIL's convert (and so transformers) clips at 255 instead, which
    turns most 16-bit photos white. Everything else (L, 1, P, CMYK, YCbCr, F clipped to 0..255, ...) uses PIL's
    convert. With `composite_alpha=False` transparency is dropped (PIL's plain convert),
    which is what GME's published code does before its processor.
    """
    if img.mode == "I" or img.mode.startswith("I;16"):
        values = np.clip(np.asarray(img).astype(np.int64), 0, 65535)
        grey = ((values * 255 + 32767) // 65535).astype(np.uint8)
        return Image.fromarray(grey).convert("RGB")
    try:
        if composite_alpha and ("A" in img.getbands() or img.info.get("transparency") is not None):
            white = Image.new("RGBA", img.size, (255, 255, 255, 255))
            return Image.alpha_composite(white, img.convert("RGBA")).convert("RGB")
        return img if img.mode == "RGB" else img.convert("RGB")
    except ValueError as e:
        raise ImageError(f"cannot convert mode {img.mode} to RGB: {e}") from None


def _transpose_by_exif(img: Image.Image, in_place: bool) -> Image.Image:
    try:
        if in_place:
            ImageOps.exif_transpose(img, in_place=True)
            return img
        return ImageOps.exif_transpose(img)
    except (SyntaxError, ValueError, KeyError, struct.error):
        # Broken EXIF does not make the pixels unusable: keep the stored orientation.
        return img if in_place else img.copy()


def _from_array(array: np.ndarray, max_image_pixels: int) -> Image.Image:
    if array.dtype != np.uint8:
        raise ImageError(f"numpy image must be uint8, got dtype {array.dtype}")
    channels = array.shape[2] if array.ndim == 3 else 1 if array.ndim == 2 else None
    modes = {1: "L", 3: "RGB", 4: "RGBA"}
    if channels not in modes:
        raise ImageError(f"numpy image must be HxW, HxWx1, HxWx3 or HxWx4, got shape {array.shape}")
    height, width = array.shape[:2]
    _check_pixels(width, height, max_image_pixels)
    # frombytes copies once, so the image never aliases the caller's array
    return Image.frombytes(modes[channels], (width, height), np.ascontiguousarray(array).tobytes())


def load_image(
    source,
    *,
    max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
    target_pixels: int | None = None,
    composite_alpha: bool = True,
    max_aspect_ratio: float | None = None,
) -> Image.Image:
    """Decode `source` into an RGB PIL image with its EXIF orientation applied.

    source: a path (str or os.PathLike), the bytes of an encoded file (bytes, bytearray,
    memoryview), a PIL image, or a uint8 numpy array HxW (grey), HxWx3 (RGB) or HxWx4
    (RGBA). An image with more than `max_image_pixels` pixels (for a file: as its header
    claims, in any format) is refused before decoding. A file is read from its header on:
    a non-image is refused after its first bytes. `target_pixels` (the processor's
    max_pixels) lets large JPEGs decode at a reduced size and huge other files shrink
    right after decoding; left at None, the decode is PIL's full one. `max_aspect_ratio`:
    refuse a longer side more than this many times the shorter (checked on the file's
    own size, before decoding). `composite_alpha`: composite transparency on white
    (transformers) or drop it (GME). Truncated files are errors unless
    PIL.ImageFile.LOAD_TRUNCATED_IMAGES is set.
    """
    if isinstance(source, np.ndarray):
        image = _from_array(source, max_image_pixels)
        _check_aspect_ratio(*image.size, max_aspect_ratio)
        return _to_rgb(image, composite_alpha)
    if isinstance(source, Image.Image):
        _check_pixels(*source.size, max_image_pixels)
        _check_aspect_ratio(*source.size, max_aspect_ratio)
        with _decode_errors(), _own_pixel_limit(max_image_pixels):
            source.load()
        # a transposed copy: the caller's image stays as is
        return _to_rgb(_transpose_by_exif(source, in_place=False), composite_alpha)
    if isinstance(source, (str, os.PathLike)):
        path = os.fspath(source)
        try:
            f = open(path, "rb")  # noqa: SIM115 - closed below, once the pixels are decoded
        except FileNotFoundError:
            raise ImageError(f"file not found: {path!r}") from None
        except OSError as e:
            raise ImageError(f"cannot read {path!r}: {e.strerror or e}") from None
        with f:
            img = _decode(f, max_image_pixels, target_pixels, max_aspect_ratio)
    elif isinstance(source, (bytes, bytearray, memoryview)):
        img = _decode(io.BytesIO(source), max_image_pixels, target_pixels, max_aspect_ratio)
    else:
        raise ImageError(
            f"unsupported image type {type(source).__name__}; expected a path, bytes, "
            "a PIL image or a uint8 numpy array"
        )
    return _to_rgb(_transpose_by_exif(img, in_place=True), composite_alpha)


# ---------------------------------------------------------------------------------------
# Resizing


def fit_area(height, width, h_bar, w_bar, factor, min_pixels, max_pixels) -> tuple[int, int]:
    """Bring the rounded sides (h_bar, w_bar) into [min_pixels, max_pixels], keeping the
    aspect ratio of height x width: above the max both sides scale by
    beta = sqrt(h * w / max_pixels) and round down to multiples of `factor` (never below
    `factor`); below the min they scale by sqrt(min_pixels / (h * w)) and round up."""
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt(height * width / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


def smart_resize(
    height: int,
    width: int,
    factor: int = 28,
    min_pixels: int = 56 * 56,
    max_pixels: int = 28 * 28 * 1280,
) -> tuple[int, int]:
    """Qwen2-VL's target size: both sides multiples of `factor`, area within
    [min_pixels, max_pixels], aspect ratio kept as closely as possible.

    Each side rounds to the nearest multiple of `factor`, then `fit_area` applies. An
    aspect ratio (of the original sides) over MAX_ASPECT_RATIO is refused.
    """
    if height <= 0 or width <= 0:
        raise ImageError(f"image has no pixels ({width}x{height})")
    if min_pixels < 1:
        raise ValueError(f"min_pixels must be at least 1, got {min_pixels}")
    ratio = max(height, width) / min(height, width)
    if ratio > MAX_ASPECT_RATIO:
        raise ImageError(
            f"aspect ratio {ratio:.1f} ({width}x{height}) is more than {MAX_ASPECT_RATIO}"
        )
    h_bar = round(height / factor) * factor
    w_bar = round(width / factor) * factor
    return fit_area(height, width, h_bar, w_bar, factor, min_pixels, max_pixels)


def gme_pre_resize(image: Image.Image) -> Image.Image:
    """The resize GME-Qwen2-VL's published inference code (`fetch_image`) applies before
    its processor, so GME checkpoints see the pixels their authors' code gives them.

    Its own smart-resize variant: factor 28, area within [4, 16384] * 28 * 28, each side
    rounded to at least 28, and an aspect ratio over 200 clamped (the longer side set to
    200x the shorter) instead of refused. The resize is PIL's default for RGB, BICUBIC.
    (Past a ratio of 16384 the published code divides by zero; here sides stay >= 28.)
    Returns `image` itself when the size is already right.
    """
    factor = 28
    width, height = image.size
    if height <= 0 or width <= 0:
        raise ImageError(f"image has no pixels ({width}x{height})")
    h_bar = max(factor, round(height / factor) * factor)
    w_bar = max(factor, round(width / factor) * factor)
    h_bar, w_bar = fit_area(height, width, h_bar, w_bar, factor, 4 * 28 * 28, 16384 * 28 * 28)
    if h_bar > MAX_ASPECT_RATIO * w_bar:
        h_bar = MAX_ASPECT_RATIO * w_bar
    elif w_bar > MAX_ASPECT_RATIO * h_bar:
        w_bar = MAX_ASPECT_RATIO * h_bar
    if (w_bar, h_bar) == image.size:
        return image
    return image.resize((w_bar, h_bar), Image.Resampling.BICUBIC)


# ---------------------------------------------------------------------------------------
# Patchifying


@dataclass
class PatchifiedImage:
    """One image ready for the vision tower; merged tokens = grid_h * grid_w / merge_size**2.

    The patches stay uint8 (`levels`): the vision tower's patch embedding normalises them
    itself (`moon3rt.model.PatchEmbed`), with the temporal copies of the still frame folded
    into its weights, so a patch costs 3 * patch_size**2 bytes instead of 4 * T times that.
    `pixel_values` gives the Qwen2-VL processor's float32 patches (the exported graphs'
    input, and the oracle's).
    """

    levels: np.ndarray  # (grid_h * grid_w, 3 * patch_size**2) uint8: each patch's (C, P, P) pixels
    grid_thw: tuple[int, int, int]  # (1, grid_h, grid_w), in patches of patch_size pixels
    mean: tuple[float, ...] = CLIP_MEAN
    std: tuple[float, ...] = CLIP_STD
    temporal_patch_size: int = 2

    @property
    def num_patches(self) -> int:
        return int(self.levels.shape[0])

    @property
    def norm(self) -> tuple[tuple[float, ...], tuple[float, ...]]:
        return self.mean, self.std

    @property
    def pixel_values(self) -> np.ndarray:
        """(grid_h * grid_w, 3 * T * patch_size**2) float32, laid out (C, T, P, P) as the processor does."""
        return expand_levels(self.levels, self.mean, self.std, self.temporal_patch_size)


def expand_levels(levels: np.ndarray, mean, std, temporal_patch_size: int = 2) -> np.ndarray:
    """uint8 patches (N, C*P*P) -> the processor's normalised float32 patches (N, C*T*P*P), the
    frame repeated T times; exact (one table lookup per channel)."""
    n, channels = levels.shape[0], len(mean)
    per = levels.shape[1] // channels
    table = _normalise_table(tuple(map(float, mean)), tuple(map(float, std)))
    out = np.empty((n, channels, temporal_patch_size, per), dtype=np.float32)
    by_channel = levels.reshape(n, channels, per)
    for c in range(channels):
        out[:, c] = table[c].take(by_channel[:, c])[:, None, :]
    return out.reshape(n, channels * temporal_patch_size * per)


@functools.lru_cache(maxsize=8)
def _normalise_table(mean: tuple[float, ...], std: tuple[float, ...]) -> np.ndarray:
    """(3, 256) float32: the normalised value of each uint8 level per channel, computed
    with the processor's arithmetic (x * (1/255) in float64, cast to float32, then
    (x - mean) / std in float32), so a lookup is exact."""
    levels = (np.arange(256, dtype=np.float64) * (1 / 255)).astype(np.float32)
    mean32 = np.asarray(mean, dtype=np.float32)[:, None]
    std32 = np.asarray(std, dtype=np.float32)[:, None]
    return (levels[None, :] - mean32) / std32


def preprocess_image(
    image: Image.Image,
    *,
    min_pixels: int = 56 * 56,
    max_pixels: int = 28 * 28 * 1280,
    patch_size: int = 14,
    merge_size: int = 2,
    temporal_patch_size: int = 2,
    mean=CLIP_MEAN,
    std=CLIP_STD,
) -> PatchifiedImage:
    """Resize and patchify one image for the Qwen2-VL vision tower.

    Patches are ordered row-major over merge windows, and row-major within each
    merge_size x merge_size window; each is kept as its uint8 (C, P, P) pixels with the
    `mean`/`std` that normalise them. `.pixel_values` is the processor's float32 form:
    laid out (C, T, P, P), the single frame repeated T = temporal_patch_size times.
    """
    if image.mode != "RGB":
        image = _to_rgb(image)
    height, width = smart_resize(
        image.height, image.width, patch_size * merge_size, min_pixels, max_pixels
    )
    if min(image.size) < MIN_IMAGE_SIDE:  # a line of pixels is no product photo: refuse, do not blow it up
        raise ImageError(
            f"image is {image.width}x{image.height} pixels; each side needs at least {MIN_IMAGE_SIDE}"
        )
    if (width, height) != image.size:
        image = image.resize((width, height), Image.Resampling.BICUBIC)
    pixels = np.asarray(image)  # (H, W, 3) uint8

    grid_h, grid_w = height // patch_size, width // patch_size
    m, p = merge_size, patch_size
    # (H, W, C) -> (gh/m, m, p, gw/m, m, p, C) -> (gh/m, gw/m, m, m, C, p, p): patches in the
    # processor's order, each (C, p, p), still uint8
    levels = np.ascontiguousarray(
        pixels.reshape(grid_h // m, m, p, grid_w // m, m, p, 3).transpose(0, 3, 1, 4, 6, 2, 5)
    )
    return PatchifiedImage(
        levels=levels.reshape(grid_h * grid_w, 3 * p * p),
        mean=tuple(map(float, mean)),
        std=tuple(map(float, std)),
        temporal_patch_size=temporal_patch_size,
        grid_thw=(1, grid_h, grid_w),
    )
