"""The standard benchmark workload: synthetic product images and titles, drawn deterministically.

One item is one square product photo (a flat drawing of a t-shirt, mug, sneaker or
backpack on a soft gradient, with a stripe, a logo and sensor-like noise, so JPEG and
PNG cost what they cost on real photos) plus a title of about `text_tokens` tokens.
Item `i` is the same picture and title on every machine.
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image, ImageDraw

COLOURS = {
    "red": (200, 40, 45), "navy": (30, 45, 95), "forest green": (35, 95, 55), "mustard": (210, 165, 40),
    "black": (25, 25, 28), "white": (235, 235, 232), "sky blue": (110, 170, 220), "burgundy": (120, 25, 45),
    "beige": (215, 195, 160), "charcoal": (60, 62, 66),
}
MATERIALS = ("cotton", "linen", "wool blend", "leather", "canvas", "ceramic", "recycled polyester", "suede")
DETAILS = (
    "contrast stitching", "embroidered logo", "ribbed cuffs", "relaxed fit", "matte finish", "reinforced seams",
    "padded straps", "rubber outsole", "gift box", "dishwasher safe", "breathable", "water resistant",
)
BRANDS = ("Northfield", "Kobo & Lane", "Atelier Nine", "Urbanic", "Fjordline", "Maison Rue")


# Outlines in unit coordinates (x right, y down), one per product category.
SHAPES = {
    "t-shirt": [(0.30, 0.18), (0.42, 0.15), (0.50, 0.22), (0.58, 0.15), (0.70, 0.18), (0.88, 0.34), (0.78, 0.44),
                (0.72, 0.38), (0.72, 0.85), (0.28, 0.85), (0.28, 0.38), (0.22, 0.44), (0.12, 0.34)],
    "mug": [(0.25, 0.25), (0.65, 0.25), (0.65, 0.80), (0.25, 0.80)],
    "sneaker": [(0.10, 0.62), (0.18, 0.40), (0.40, 0.36), (0.55, 0.48), (0.85, 0.55), (0.90, 0.70), (0.10, 0.72)],
    "backpack": [(0.30, 0.22), (0.70, 0.22), (0.76, 0.32), (0.76, 0.86), (0.24, 0.86), (0.24, 0.32)],
}


def _product(index: int) -> tuple[str, str]:
    """(category, colour name) of item `index`: the picture and the title agree."""
    rng = np.random.default_rng(index)
    return list(SHAPES)[index % len(SHAPES)], list(COLOURS)[int(rng.integers(len(COLOURS)))]


def product_image(index: int, size: int) -> Image.Image:
    """A `size` x `size` RGB product photo, the same for a given index on every machine."""
    rng = np.random.default_rng(1000 + index)
    category, colour_name = _product(index)
    colour = COLOURS[colour_name]
    # Soft vertical gradient background, as on a studio backdrop.
    top, bottom = rng.integers(215, 250, 3), rng.integers(180, 225, 3)
    ramp = np.linspace(0, 1, size)[:, None, None]
    canvas = (top * (1 - ramp) + bottom * ramp) * np.ones((1, size, 1))
    img = Image.fromarray(canvas.astype(np.uint8), "RGB")
    draw = ImageDraw.Draw(img)
    shift = rng.uniform(-0.04, 0.04, 2)
    points = [((x + shift[0]) * size, (y + shift[1]) * size) for x, y in SHAPES[category]]
    draw.polygon(points, fill=colour, outline=tuple(int(c * 0.6) for c in colour), width=max(1, size // 150))
    if category == "mug":  # the handle
        draw.ellipse([0.60 * size, 0.38 * size, 0.80 * size, 0.65 * size], outline=colour, width=max(2, size // 30))
    accent = tuple(int(v) for v in rng.integers(0, 256, 3))
    y = rng.uniform(0.5, 0.65) * size
    draw.rectangle([0.30 * size, y, 0.70 * size, y + 0.03 * size], fill=accent)  # a stripe
    cx, cy, r = 0.5 * size, 0.40 * size, 0.04 * size
    draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=tuple(255 - c for c in accent))  # a logo
    pixels = np.asarray(img, dtype=np.float32) + rng.normal(0, 6, (size, size, 3))  # sensor noise
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8), "RGB")


def encode_image(image: Image.Image, fmt: str) -> bytes:
    """The image as a file's bytes: "JPEG" (quality 90, as product photos are served) or "PNG"."""
    buf = io.BytesIO()
    image.save(buf, format=fmt, **({"quality": 90} if fmt == "JPEG" else {}))
    return buf.getvalue()


def product_title(index: int, tokenizer, text_tokens: int) -> str:
    """A product title cut to about `text_tokens` tokens of `tokenizer` (whole words kept)."""
    rng = np.random.default_rng(5000 + index)
    category, colour = _product(index)
    words = [BRANDS[int(rng.integers(len(BRANDS)))], colour, MATERIALS[int(rng.integers(len(MATERIALS)))], category]
    def count(ws: list[str]) -> int:
        return len(tokenizer.encode(" ".join(ws).rstrip(","), add_special_tokens=False).ids)

    while count(words) < text_tokens:
        words.append(DETAILS[int(rng.integers(len(DETAILS)))] + ",")
    if len(words) > 4 and abs(count(words[:-1]) - text_tokens) < abs(count(words) - text_tokens):
        words.pop()  # whichever cut lands nearer the target
    return " ".join(words).rstrip(",")


def make_items(n: int, image_size: int, tokenizer, text_tokens: int, fmt: str = "JPEG") -> list[dict]:
    """`n` items ``{"text", "image"}`` with the image as encoded file bytes."""
    return [
        {"text": product_title(i, tokenizer, text_tokens), "image": encode_image(product_image(i, image_size), fmt)}
        for i in range(n)
    ]
