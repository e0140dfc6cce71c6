"""Crafted image files for bad-input tests."""

import struct
import zlib


def png_header_only(width: int, height: int) -> bytes:
    """A PNG that claims width x height RGB but holds almost no data (a decompression bomb's shape)."""

    def chunk(kind, body):
        crc = struct.pack(">I", zlib.crc32(kind + body))
        return struct.pack(">I", len(body)) + kind + body + crc

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)  # 8-bit RGB
    idat = zlib.compress(b"\0" * 4)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def noise_image(h: int, w: int, seed: int):
    """A seeded h x w noise image, preprocessed for moon3-tiny's pixel limits."""
    import numpy as np
    from PIL import Image

    from moon3rt.images import preprocess_image

    pixels = np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)
    return preprocess_image(Image.fromarray(pixels), min_pixels=56 * 56, max_pixels=28 * 28 * 64)


def prepared(builder, spec):
    """Items from (title, [(height, width) of each image]) specs, each image its own seed."""
    return [builder.build(title, [noise_image(h, w, 7 * i + j) for j, (h, w) in enumerate(sizes)])
            for i, (title, sizes) in enumerate(spec)]


def packed(builder, spec):
    from moon3rt.batching import pack

    return pack(prepared(builder, spec))
