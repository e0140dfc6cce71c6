"""Drawing a product: shape per category, material texture, pattern, fine details, and
a rendering (pose, scale, background, lighting, occlusion, JPEG quality) drawn from a seed.

Shapes are polygons in a unit box; one affine transform per rendering places them on the
canvas, and the details (logo, buttons, stitching, straps) go through the same
transform, so every rendering of a product shows the same product.
"""

from __future__ import annotations

import io
import math

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from .attributes import COLOURS, LOGO_RGB, STITCH_RGB

SS = 1  # supersampling factor of the world's images (2 draws at twice the size: smoother, 4x slower)

Poly = list[tuple[float, float]]


# ------------------------------------------------------------------------- shapes
def _shape(category: str, strap: str | None) -> dict:
    """Unit-box geometry: `body` polygons (textured), `trim` (polygon, rgb) parts, `lines`
    (polyline, rgb, width) such as straps, the `panel` box (x0, y0, x1, y1) where the logo and
    buttons sit, and the `seam` polygon that stitching follows."""
    long = strap == "long"
    dark, light, steel = (40, 40, 40), (238, 238, 232), (150, 152, 158)
    if category == "t-shirt":
        body = [(0.30, 0.18), (0.42, 0.14), (0.58, 0.14), (0.70, 0.18), (0.90, 0.34), (0.80, 0.44), (0.72, 0.38),
                (0.72, 0.86), (0.28, 0.86), (0.28, 0.38), (0.20, 0.44), (0.10, 0.34)]
        return dict(body=[body], trim=[], lines=[], panel=(0.32, 0.24, 0.68, 0.80), seam=body)
    if category == "dress":
        body = [(0.38, 0.12), (0.62, 0.12), (0.64, 0.40), (0.82, 0.88), (0.18, 0.88), (0.36, 0.40)]
        return dict(body=[body], trim=[], lines=[], panel=(0.38, 0.16, 0.62, 0.70), seam=body)
    if category == "jacket":
        body = [(0.32, 0.14), (0.68, 0.14), (0.92, 0.30), (0.92, 0.84), (0.80, 0.84), (0.78, 0.40), (0.76, 0.86),
                (0.24, 0.86), (0.22, 0.40), (0.20, 0.84), (0.08, 0.84), (0.08, 0.30)]
        collar = [(0.40, 0.14), (0.50, 0.34), (0.60, 0.14)]
        return dict(body=[body], trim=[(collar, light)], lines=[([(0.5, 0.34), (0.5, 0.86)], dark, 0.008)],
                    panel=(0.28, 0.22, 0.72, 0.82), seam=body)
    if category == "jeans":
        body = [(0.26, 0.10), (0.74, 0.10), (0.80, 0.90), (0.56, 0.90), (0.50, 0.36), (0.44, 0.90), (0.20, 0.90)]
        return dict(body=[body], trim=[([(0.26, 0.10), (0.74, 0.10), (0.745, 0.16), (0.255, 0.16)], dark)],
                    lines=[], panel=(0.28, 0.18, 0.72, 0.60), seam=body)
    if category == "sneaker":
        upper = [(0.10, 0.62), (0.14, 0.44), (0.36, 0.38), (0.56, 0.30), (0.70, 0.34), (0.90, 0.56), (0.92, 0.66),
                 (0.10, 0.66)]
        sole = [(0.08, 0.66), (0.94, 0.66), (0.94, 0.74), (0.08, 0.74)]
        laces = [([(0.40 + 0.06 * i, 0.38 + 0.02 * i), (0.46 + 0.06 * i, 0.46 + 0.02 * i)], light, 0.012)
                 for i in range(3)]
        return dict(body=[upper], trim=[(sole, light)], lines=laces, panel=(0.18, 0.44, 0.86, 0.64), seam=upper)
    if category == "oxford shoe":
        upper = [(0.08, 0.64), (0.12, 0.48), (0.40, 0.44), (0.62, 0.38), (0.86, 0.50), (0.94, 0.62), (0.08, 0.66)]
        sole = [(0.06, 0.66), (0.96, 0.62), (0.96, 0.68), (0.06, 0.72)]
        heel = [(0.08, 0.66), (0.20, 0.66), (0.20, 0.76), (0.08, 0.76)]
        laces = [([(0.52 + 0.05 * i, 0.42), (0.54 + 0.05 * i, 0.50)], dark, 0.010) for i in range(3)]
        return dict(body=[upper], trim=[(sole, dark), (heel, dark)], lines=laces, panel=(0.20, 0.48, 0.84, 0.62),
                    seam=upper)
    if category == "backpack":
        body = [(0.24, 0.24), (0.76, 0.24), (0.80, 0.32), (0.80, 0.88), (0.20, 0.88), (0.20, 0.32)]
        pocket = [(0.30, 0.58), (0.70, 0.58), (0.70, 0.82), (0.30, 0.82)]
        top = 0.02 if long else 0.14
        handle = [(0.40, 0.24), (0.42, top), (0.58, top), (0.60, 0.24)]
        return dict(body=[body, pocket], trim=[], lines=[(handle, dark, 0.02)], panel=(0.26, 0.30, 0.74, 0.56),
                    seam=body)
    if category == "tote":
        body = [(0.18, 0.38), (0.82, 0.38), (0.76, 0.90), (0.24, 0.90)]
        top = 0.04 if long else 0.22
        handles = [([(0.32, 0.38), (0.36, top), (0.64, top), (0.68, 0.38)], dark, 0.018)]
        return dict(body=[body], trim=[], lines=handles, panel=(0.26, 0.42, 0.74, 0.86), seam=body)
    if category == "mug":
        body = [(0.22, 0.26), (0.70, 0.26), (0.70, 0.84), (0.22, 0.84)]
        handle = [(0.70, 0.38), (0.86, 0.40), (0.88, 0.60), (0.70, 0.70)]
        rim = [(0.22, 0.24), (0.70, 0.24), (0.70, 0.29), (0.22, 0.29)]
        return dict(body=[body], trim=[(rim, light)], lines=[(handle, (90, 90, 90), 0.035)],
                    panel=(0.26, 0.32, 0.66, 0.80), seam=body)
    if category == "cap":
        crown = [(0.18 + 0.32 * (1 - math.cos(t)), 0.62 - 0.42 * math.sin(t)) for t in np.linspace(0, math.pi, 18)]
        brim = [(0.70, 0.58), (0.96, 0.66), (0.94, 0.72), (0.70, 0.66)]
        band = [(0.18, 0.60), (0.82, 0.60), (0.82, 0.66), (0.18, 0.66)]
        return dict(body=[crown, brim], trim=[(band, (60, 60, 60))], lines=[], panel=(0.26, 0.28, 0.74, 0.58),
                    seam=crown)
    if category == "watch":
        reach = 0.02 if long else 0.16
        strap_top = [(0.40, reach), (0.60, reach), (0.60, 0.34), (0.40, 0.34)]
        strap_bottom = [(0.40, 0.66), (0.60, 0.66), (0.60, 1.0 - reach), (0.40, 1.0 - reach)]
        face = [(0.5 + 0.22 * math.cos(t), 0.5 + 0.22 * math.sin(t)) for t in np.linspace(0, 2 * math.pi, 28)[:-1]]
        dial = [(0.5 + 0.17 * math.cos(t), 0.5 + 0.17 * math.sin(t)) for t in np.linspace(0, 2 * math.pi, 24)[:-1]]
        hands = [([(0.5, 0.5), (0.5, 0.38)], dark, 0.012), ([(0.5, 0.5), (0.59, 0.52)], dark, 0.012)]
        return dict(body=[strap_top, strap_bottom, face], trim=[(dial, light)], lines=hands,
                    panel=(0.34, 0.34, 0.66, 0.66), seam=face)
    if category == "lamp":
        shade = [(0.34, 0.14), (0.66, 0.14), (0.80, 0.44), (0.20, 0.44)]
        base = [(0.30, 0.84), (0.70, 0.84), (0.74, 0.90), (0.26, 0.90)]
        return dict(body=[shade, base], trim=[], lines=[([(0.5, 0.44), (0.5, 0.84)], steel, 0.03)],
                    panel=(0.28, 0.18, 0.72, 0.42), seam=shade)
    raise ValueError(f"no drawing for category {category!r}")


# ------------------------------------------------------------------------ textures
def _luma(rgb) -> float:
    return 0.299 * rgb[0] + 0.587 * rgb[1] + 0.114 * rgb[2]


def contrast_colour(rgb) -> tuple[int, int, int]:
    """The colour patterns are printed in: near-white on dark products, near-black on light ones."""
    return (238, 236, 228) if _luma(rgb) < 128 else (30, 30, 34)


def _material(material: str, size: int, rng: np.random.Generator) -> np.ndarray:
    """(size, size) brightness modulation around 1 that reads as the material."""
    y, x = np.mgrid[0:size, 0:size].astype(np.float32)
    phase = rng.uniform(0, 2 * np.pi)
    noise = rng.standard_normal((size, size)).astype(np.float32)
    if material == "cotton":
        m = 0.05 * noise
    elif material == "denim":
        m = 0.16 * np.sin((x + y) * (2 * np.pi / 5.0) + phase) + 0.06 * noise
    elif material == "leather":
        coarse = np.asarray(Image.fromarray(((noise * 40) + 128).clip(0, 255).astype(np.uint8))
                            .filter(ImageFilter.GaussianBlur(3)), np.float32) / 128 - 1
        m = 0.5 * coarse + 0.20 * np.exp(-((x / size - 0.35) ** 2) * 40)  # mottling and a sheen
    elif material == "knit":
        m = 0.18 * np.sin(2 * np.pi * (y / 7.0 + np.abs((x % 8) - 4) / 8.0) + phase) + 0.04 * noise
    elif material == "canvas":
        m = 0.12 * np.sin(x * (2 * np.pi / 4.0) + phase) * np.sin(y * (2 * np.pi / 4.0)) + 0.04 * noise
    elif material == "ceramic":
        m = 0.35 * np.exp(-((x / size - 0.32) ** 2) * 60) - 0.08 * (x / size)  # glossy highlight
    elif material == "metal":
        streaks = rng.standard_normal((size, 1)).astype(np.float32)
        m = 0.10 * np.repeat(streaks, size, 1) + 0.35 * np.sin(np.pi * x / size) - 0.15
    else:
        raise ValueError(f"no texture for material {material!r}")
    return 1.0 + m


def _pattern(pattern: str, size: int, box, rng: np.random.Generator) -> np.ndarray:
    """(size, size) bool mask of where the pattern's ink sits, scaled to the product's box."""
    x0, y0, x1, y1 = box
    scale = max(x1 - x0, y1 - y0)
    y, x = np.mgrid[0:size, 0:size].astype(np.float32)
    if pattern == "plain":
        return np.zeros((size, size), bool)
    period = scale / 7.0
    off = rng.uniform(0, period)
    if pattern == "striped":
        return ((y - y0 + off) % period) < period * 0.38
    if pattern == "checked":
        return (((y - y0 + off) % period) < period * 0.22) | (((x - x0 + off) % period) < period * 0.22)
    if pattern == "dotted":
        cy = (y - y0 + off) % period - period / 2
        cx = (x - x0 + off) % period - period / 2
        return cx * cx + cy * cy < (period * 0.22) ** 2
    if pattern == "floral":  # five petals round each point of a lattice
        step = period * 1.6
        r = step * 0.16
        out = np.zeros((size, size), bool)
        for k in range(5):
            a = 2 * np.pi * k / 5
            cy = (y - y0 + off - 1.6 * r * np.sin(a)) % step - step / 2
            cx = (x - x0 + off - 1.6 * r * np.cos(a)) % step - step / 2
            out |= cx * cx + cy * cy < r * r
        return out
    raise ValueError(f"no drawing for pattern {pattern!r}")


# ----------------------------------------------------------------------- rendering
def _affine(rng: np.random.Generator, size: int, jitter: bool):
    if not jitter:
        return lambda p: (p[0] * size, p[1] * size)
    scale = rng.uniform(0.72, 1.0) * size
    angle = math.radians(rng.uniform(-9, 9))
    cx, cy = size / 2 + rng.uniform(-0.08, 0.08) * size, size / 2 + rng.uniform(-0.08, 0.08) * size
    ca, sa = math.cos(angle), math.sin(angle)

    def f(p):
        u, v = (p[0] - 0.5) * scale, (p[1] - 0.5) * scale
        return (cx + ca * u - sa * v, cy + sa * u + ca * v)

    return f


def render(attributes: dict[str, str], seed, size: int = 112, jitter: bool = True,
           jpeg_quality: int | None = None, supersample: int = SS) -> Image.Image:
    """One rendering of the product with these attributes; `seed` fixes pose, scene and noise.

    jitter=False draws the canonical view (centred, full size, plain light background).
    jpeg_quality: None draws it from the seed (55..95) when jittering; 0 leaves the image lossless.
    """
    rng = np.random.default_rng(seed)
    category = attributes["category"]
    geo = _shape(category, attributes.get("strap"))
    big = size * supersample
    place = _affine(rng, big, jitter)
    pts = lambda poly: [place(p) for p in poly]

    # background
    if jitter:
        kind = rng.integers(4)
        base = (rng.uniform(170, 250, 3) if kind < 3 else rng.uniform(60, 120, 3)).astype(np.float32)
        y = np.linspace(0, 1, big, dtype=np.float32)[:, None, None]
        bg = base[None, None, :] * (1 + np.float32(rng.uniform(-0.12, 0.12)) * (y - 0.5)) * np.ones((1, big, 1), np.float32)
        if kind == 2:
            bg = bg + rng.normal(0, 6, (big, big, 1)).astype(np.float32)
    else:
        bg = np.full((big, big, 3), 244.0, np.float32)

    # the product's body: colour x material texture, pattern ink on top
    colour = np.asarray(COLOURS[attributes["colour"]], np.float32)
    mask_img = Image.new("L", (big, big), 0)
    draw = ImageDraw.Draw(mask_img)
    for poly in geo["body"]:
        draw.polygon(pts(poly), fill=255)
    mask = np.asarray(mask_img, np.float32)[..., None] / 255.0
    ys, xs = np.nonzero(mask[..., 0] > 0.5)
    box = (xs.min(), ys.min(), xs.max(), ys.max()) if xs.size else (0, 0, big, big)
    tex = _material(attributes["material"], big, rng)[..., None]
    body = np.clip(colour[None, None, :] * tex, 0, 255)
    ink = _pattern(attributes["pattern"], big, box, rng)
    body = np.where(ink[..., None], np.asarray(contrast_colour(colour), np.float32), body)
    canvas = bg * (1 - mask) + body * mask
    img = Image.fromarray(canvas.clip(0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(img)

    # trim, straps and other fixed-colour parts
    for poly, rgb in geo["trim"]:
        draw.polygon(pts(poly), fill=rgb)
    for line, rgb, width in geo["lines"]:
        draw.line(pts(line), fill=rgb, width=max(1, int(width * big)), joint="curve")

    # fine details
    px0, py0, px1, py1 = geo["panel"]
    unit = big * 0.01
    stitching = attributes.get("stitching", "none")
    if stitching != "none":
        seam = geo["seam"]
        cxs, cys = sum(p[0] for p in seam) / len(seam), sum(p[1] for p in seam) / len(seam)
        inset = [(cxs + 0.88 * (x - cxs), cys + 0.88 * (y - cys)) for x, y in seam]
        ring = pts(inset + inset[:1])
        for (ax, ay), (bx, by) in zip(ring[:-1], ring[1:]):
            n = max(1, int(math.hypot(bx - ax, by - ay) / (3.2 * unit)))
            for k in range(n):  # dashes: every other piece of the seam
                t0, t1 = k / n, (k + 0.55) / n
                draw.line([(ax + (bx - ax) * t0, ay + (by - ay) * t0), (ax + (bx - ax) * t1, ay + (by - ay) * t1)],
                          fill=STITCH_RGB[stitching], width=max(1, int(0.9 * unit)))
    buttons = int(attributes.get("buttons", "0"))
    for k in range(buttons):
        y = py0 + (py1 - py0) * (0.25 + 0.5 * (k + 0.5) / buttons)
        bx, by = place((0.5, y))
        r = 2.4 * unit
        draw.ellipse([bx - r, by - r, bx + r, by + r], fill=(235, 225, 200), outline=(40, 40, 40),
                     width=max(1, int(0.6 * unit)))
    logo = attributes.get("logo", "none")
    if logo != "none":
        fx, fy = {"top left": (0.22, 0.20), "centre": (0.5, 0.5), "bottom right": (0.78, 0.80)}[logo]
        lx, ly = place((px0 + (px1 - px0) * fx, py0 + (py1 - py0) * fy))
        r = 4.5 * unit
        rgb = LOGO_RGB[attributes.get("logo colour", "white")]
        draw.ellipse([lx - r, ly - r, lx + r, ly + r], fill=rgb)  # a crescent: the mark of the house
        draw.ellipse([lx - r * 0.35, ly - r * 1.05, lx + r * 1.2, ly + r * 0.6], fill=tuple(int(c) for c in colour))

    # lighting, occlusion, then down to size and through JPEG
    out = np.asarray(img, np.float32)
    if jitter:
        gain = np.float32(rng.uniform(0.88, 1.12))
        tint = rng.uniform(0.96, 1.04, 3).astype(np.float32)
        ramp = 1 + rng.uniform(-0.08, 0.08) * (np.linspace(-1, 1, big, dtype=np.float32)[None, :, None])
        out = out * gain * tint * ramp
        if rng.random() < 0.3:  # a small object in front: at most ~6% of the image, near an edge
            w, h = (rng.uniform(0.12, 0.24, 2) * big).astype(int)
            x0 = int(rng.choice([rng.uniform(0, 0.15), rng.uniform(0.7, 0.85)]) * big)
            y0 = int(rng.uniform(0, 1 - h / big) * big)
            out[y0:y0 + h, x0:x0 + w] = rng.uniform(40, 220, 3)
    img = Image.fromarray(out.clip(0, 255).astype(np.uint8))
    if supersample != 1:
        img = img.resize((size, size), Image.BILINEAR)
    quality = jpeg_quality if jpeg_quality is not None else (int(rng.integers(55, 96)) if jitter else 0)
    if quality:
        buf = io.BytesIO()
        img.save(buf, format="JPEG", quality=quality)
        buf.seek(0)
        img = Image.open(buf).convert("RGB")
    return img
