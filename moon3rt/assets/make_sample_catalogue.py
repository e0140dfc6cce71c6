"""Draw the small synthetic sample catalogue shipped in ``moon3rt/assets/catalogue``.

Eight flat product drawings (t-shirts, a dress, shoes, sneakers, a backpack, a denim
jacket, a mug) are rendered with PIL at twice their size and downscaled for smooth
edges, then saved as JPEG (quality 90) or PNG next to ``items.jsonl`` (one product
per line: ``{"id", "text", "image"}``, image paths relative to the jsonl file) and
``queries.txt`` (one text search query per line).

Everything is drawn from fixed coordinates, so the output is reproducible.

Usage::

    python moon3rt/assets/make_sample_catalogue.py            # writes the shipped catalogue
    python moon3rt/assets/make_sample_catalogue.py -o out_dir
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple, Union

from PIL import Image, ImageDraw

DEFAULT_OUTPUT_DIR = Path(__file__).resolve().parent / "catalogue"

SS = 2  # supersampling factor

Color = Tuple[int, int, int]
Point = Tuple[float, float]


# --------------------------------------------------------------------------------------
# Drawing helpers (coordinates are in final-image pixels; the canvas is SS times larger)
# --------------------------------------------------------------------------------------


class Canvas:
    def __init__(self, w: int, h: int, bg: Color):
        self.w, self.h = w, h
        self.img = Image.new("RGB", (w * SS, h * SS), bg)
        self.d = ImageDraw.Draw(self.img)

    @staticmethod
    def _p(pts: Sequence[Point]) -> List[Tuple[float, float]]:
        return [(x * SS, y * SS) for x, y in pts]

    @staticmethod
    def _b(box: Sequence[float]) -> List[float]:
        return [v * SS for v in box]

    def polygon(self, pts: Sequence[Point], fill: Color, outline: Optional[Color] = None, width: float = 2) -> None:
        self.d.polygon(self._p(pts), fill=fill, outline=outline, width=int(width * SS) if outline else 0)

    def ellipse(self, box: Sequence[float], fill: Optional[Color], outline: Optional[Color] = None, width: float = 2) -> None:
        self.d.ellipse(self._b(box), fill=fill, outline=outline, width=int(width * SS) if outline else 0)

    def rrect(self, box: Sequence[float], r: float, fill: Optional[Color], outline: Optional[Color] = None, width: float = 2) -> None:
        self.d.rounded_rectangle(self._b(box), radius=r * SS, fill=fill, outline=outline, width=int(width * SS) if outline else 0)

    def line(self, pts: Sequence[Point], fill: Color, width: float = 2) -> None:
        self.d.line(self._p(pts), fill=fill, width=max(1, int(width * SS)), joint="curve")

    def arc(self, box: Sequence[float], start: float, end: float, fill: Color, width: float = 2) -> None:
        self.d.arc(self._b(box), start, end, fill=fill, width=max(1, int(width * SS)))

    def dashed(self, pts: Sequence[Point], fill: Color, width: float = 1.2, dash: float = 4, gap: float = 3) -> None:
        """Stitching: a dashed polyline."""
        for (x0, y0), (x1, y1) in zip(pts[:-1], pts[1:]):
            seg = math.hypot(x1 - x0, y1 - y0)
            if seg == 0:
                continue
            ux, uy = (x1 - x0) / seg, (y1 - y0) / seg
            t = 0.0
            while t < seg:
                t1 = min(t + dash, seg)
                self.line([(x0 + ux * t, y0 + uy * t), (x0 + ux * t1, y0 + uy * t1)], fill, width)
                t += dash + gap

    def shadow(self, cx: float, cy: float, rx: float, ry: float, color: Color) -> None:
        self.ellipse([cx - rx, cy - ry, cx + rx, cy + ry], fill=color)

    def finish(self) -> Image.Image:
        return self.img.resize((self.w, self.h), Image.Resampling.LANCZOS)


def _shade(c: Color, f: float) -> Color:
    """Darken (f < 1) or lighten (f > 1) a colour."""
    if f <= 1:
        return tuple(int(round(v * f)) for v in c)  # type: ignore[return-value]
    return tuple(int(round(v + (255 - v) * (f - 1))) for v in c)  # type: ignore[return-value]


def _moon_logo(cv: Canvas, cx: float, cy: float, r: float, fg: Color, bg: Color) -> None:
    """The brand mark: a crescent moon in a ring."""
    cv.ellipse([cx - r, cy - r, cx + r, cy + r], fill=None, outline=fg, width=max(1.0, r / 6))
    ri = r * 0.62
    cv.ellipse([cx - ri, cy - ri, cx + ri, cy + ri], fill=fg)
    o = ri * 0.45
    cv.ellipse([cx - ri + o, cy - ri - o * 0.3, cx + ri + o, cy + ri - o * 0.3], fill=bg)


# --------------------------------------------------------------------------------------
# Products
# --------------------------------------------------------------------------------------


def _tshirt(w: int, h: int, body: Color, logo: Color, bg: Color) -> Image.Image:
    cv = Canvas(w, h, bg)
    sx, sy = w / 256, h / 256

    def P(pts):
        return [(x * sx, y * sy) for x, y in pts]

    edge = _shade(body, 0.7)
    cv.shadow(128 * sx, 228 * sy, 80 * sx, 9 * sy, _shade(bg, 0.9))
    shirt = P([(104, 38), (74, 48), (30, 86), (50, 120), (80, 104), (80, 222), (176, 222),
               (176, 104), (206, 120), (226, 86), (182, 48), (152, 38)])
    cv.polygon(shirt, fill=body, outline=edge, width=2)
    # neckline (crew neck): inner back of the collar and a ribbed band
    cv.ellipse([104 * sx, 28 * sy, 152 * sx, 62 * sy], fill=_shade(body, 0.6))
    cv.arc([100 * sx, 24 * sy, 156 * sx, 66 * sy], 0, 180, fill=_shade(body, 0.85), width=5 * sy)
    # sleeve seams and cuff stitching
    stitch = _shade(body, 1.35)
    cv.line(P([(74, 48), (80, 104)]), edge, 1.2)
    cv.line(P([(182, 48), (176, 104)]), edge, 1.2)
    cv.dashed(P([(35, 95), (55, 112)]), stitch)
    cv.dashed(P([(221, 95), (201, 112)]), stitch)
    cv.dashed(P([(84, 213), (172, 213)]), stitch)
    _moon_logo(cv, 150 * sx, 92 * sy, 13 * sx, logo, body)
    return cv.finish()


def red_tshirt() -> Image.Image:
    return _tshirt(256, 256, (200, 30, 38), (250, 245, 235), (244, 242, 238))


def navy_tshirt() -> Image.Image:
    return _tshirt(240, 240, (28, 40, 84), (235, 235, 240), (236, 238, 242))


def red_dress() -> Image.Image:
    w, h = 224, 300
    bg = (246, 240, 236)
    cv = Canvas(w, h, bg)
    red, edge = (196, 26, 46), (130, 14, 28)
    cv.shadow(112, 284, 86, 8, _shade(bg, 0.9))
    # straps
    cv.line([(86, 22), (90, 62)], edge, 4)
    cv.line([(138, 22), (134, 62)], edge, 4)
    # bodice
    bodice = [(84, 58), (98, 70), (112, 74), (126, 70), (140, 58), (146, 118), (78, 118)]
    cv.polygon(bodice, fill=red, outline=edge, width=2)
    # flared skirt with a wavy hem
    hem = [(28 + i * 8, 272 + (5 if i % 2 else 0)) for i in range(22)]
    skirt = [(80, 124), (144, 124)] + [(196, 272)] + hem[::-1][1:-1] + [(28, 272)]
    cv.polygon(skirt, fill=red, outline=edge, width=2)
    # waist band with a bow
    cv.rrect([76, 114, 148, 128], 3, fill=_shade(red, 0.75), outline=edge, width=1)
    cv.polygon([(112, 121), (98, 112), (98, 130)], fill=(250, 238, 238))
    cv.polygon([(112, 121), (126, 112), (126, 130)], fill=(250, 238, 238))
    cv.ellipse([108, 117, 116, 125], fill=(250, 238, 238))
    # folds
    for x0, x1 in ((100, 80), (112, 112), (124, 144)):
        cv.line([(x0, 134), (x1, 262)], _shade(red, 0.82), 1.5)
    # white flowers on a fixed grid
    for j, y in enumerate(range(146, 262, 26)):
        for i in range(7):
            x = 46 + i * 22 + (11 if j % 2 else 0)
            half = 18 + (y - 124) * 0.62  # skirt half-width at height y
            if abs(x - 112) > half - 8:
                continue
            for k in range(5):
                a = 2 * math.pi * k / 5
                px, py = x + 4 * math.cos(a), y + 4 * math.sin(a)
                cv.ellipse([px - 2.6, py - 2.6, px + 2.6, py + 2.6], fill=(252, 246, 240))
            cv.ellipse([x - 1.8, y - 1.8, x + 1.8, y + 1.8], fill=(244, 196, 48))
    cv.dashed([(36, 264), (188, 264)], _shade(red, 1.4), 1.0)
    return cv.finish()


def _oxford(cv: Canvas, ox: float, oy: float, s: float, leather: Color) -> None:
    def P(pts):
        return [(ox + x * s, oy + y * s) for x, y in pts]

    edge = _shade(leather, 0.55)
    sole = (52, 34, 22)
    # sole + heel
    cv.polygon(P([(6, 96), (250, 96), (262, 88), (262, 104), (240, 112), (30, 112), (6, 110)]), fill=sole)
    cv.polygon(P([(6, 96), (52, 96), (52, 118), (10, 118)]), fill=_shade(sole, 0.8))
    # upper
    upper = P([(6, 96), (4, 62), (8, 38), (22, 30), (50, 36), (80, 44), (104, 44), (140, 50), (180, 56),
               (214, 61), (240, 68), (255, 77), (262, 87), (262, 96)])
    cv.polygon(upper, fill=leather, outline=edge, width=1.6)
    # collar opening (lining visible) and heel counter
    cv.polygon(P([(12, 36), (24, 31), (52, 37), (82, 44), (104, 45), (80, 48), (48, 43), (20, 40)]),
               fill=(70, 40, 22))
    cv.line(P([(40, 42), (46, 70), (40, 96)]), edge, 1.4)
    # toe cap and quarter seams
    cv.line(P([(214, 62), (206, 78), (212, 96)]), edge, 1.6)
    cv.dashed(P([(208, 62), (200, 79), (206, 94)]), _shade(leather, 1.5), 1.0, 3, 2.5)
    cv.line(P([(100, 50), (120, 78), (110, 96)]), edge, 1.4)
    # lacing area with eyelets and laces
    cv.polygon(P([(110, 52), (166, 57), (150, 70), (120, 76)]), fill=_shade(leather, 0.8), outline=edge, width=1)
    for i in range(4):
        ex, ey = 120 + i * 12, 58 + i * 1.4
        cv.ellipse([ox + (ex - 2) * s, oy + (ey - 2) * s, ox + (ex + 2) * s, oy + (ey + 2) * s], fill=(230, 220, 200))
    for i in range(3):
        cv.line(P([(120 + i * 12, 58 + i * 1.4), (132 + i * 12, 60 + i * 1.4)]), (235, 225, 205), 1.6)
    # heel counter stitching and collar
    cv.dashed(P([(10, 44), (22, 40), (58, 46), (96, 56)]), _shade(leather, 1.5), 1.0, 3, 2.5)
    cv.dashed(P([(10, 90), (250, 90)]), _shade(leather, 1.6), 1.0, 3, 2.5)
    # shine
    cv.arc([ox + 150 * s, oy + 62 * s, ox + 250 * s, oy + 100 * s], 250, 300, fill=_shade(leather, 1.5), width=2)


def brown_shoes() -> Image.Image:
    w, h = 320, 224
    bg = (240, 236, 228)
    cv = Canvas(w, h, bg)
    cv.shadow(160, 190, 140, 10, _shade(bg, 0.88))
    _oxford(cv, 40, 28, 1.02, (118, 70, 38))
    _oxford(cv, 14, 76, 1.08, (138, 82, 44))
    return cv.finish()


def white_sneakers() -> Image.Image:
    w, h = 320, 240
    bg = (214, 226, 238)
    cv = Canvas(w, h, bg)
    white, line = (250, 250, 250), (150, 156, 166)
    cv.shadow(160, 196, 140, 10, _shade(bg, 0.86))
    # outsole (gum) + midsole
    cv.rrect([22, 168, 302, 192], 10, fill=(186, 140, 86), outline=(150, 110, 66), width=1.2)
    cv.rrect([20, 150, 300, 178], 12, fill=(244, 244, 244), outline=line, width=1.6)
    cv.dashed([(30, 160), (292, 160)], (170, 176, 186), 1.0)
    # upper
    upper = [(26, 152), (30, 100), (46, 82), (82, 78), (120, 92), (170, 104), (228, 112), (274, 124),
             (296, 140), (298, 152)]
    cv.polygon(upper, fill=white, outline=line, width=1.6)
    # toe cap, heel tab and collar
    cv.polygon([(240, 114), (274, 124), (296, 140), (298, 152), (236, 152), (230, 132)], fill=(236, 238, 240),
               outline=line, width=1.2)
    cv.polygon([(26, 152), (30, 100), (46, 84), (52, 120), (50, 152)], fill=(40, 84, 160), outline=line, width=1)
    cv.ellipse([44, 76, 92, 92], fill=(205, 208, 214), outline=line, width=1.2)
    # side logo mark (a swoosh-like curve)
    cv.line([(90, 140), (130, 132), (180, 116), (210, 106)], (40, 84, 160), 5)
    cv.line([(90, 140), (100, 126)], (40, 84, 160), 4)
    # laces and eyelets
    for i in range(5):
        x = 112 + i * 16
        y = 92 + i * 3.5
        cv.ellipse([x - 2.2, y - 2.2 + 6, x + 2.2, y + 2.2 + 6], fill=line)
        cv.line([(x - 5, y), (x + 9, y + 9)], (120, 126, 136), 2)
    cv.dashed([(54, 146), (120, 146), (236, 146)], (176, 182, 192), 1.0)
    cv.dashed([(236, 116), (232, 148)], (176, 182, 192), 1.0)
    return cv.finish()


def black_backpack() -> Image.Image:
    w, h = 240, 288
    bg = (238, 238, 234)
    cv = Canvas(w, h, bg)
    body, edge = (34, 34, 38), (10, 10, 12)
    cv.shadow(120, 272, 92, 8, _shade(bg, 0.88))
    # shoulder straps peeking out at the sides
    cv.rrect([34, 70, 52, 230], 8, fill=(22, 22, 26))
    cv.rrect([188, 70, 206, 230], 8, fill=(22, 22, 26))
    # top grab handle
    cv.arc([96, 12, 144, 52], 180, 360, fill=(22, 22, 26), width=6)
    # main body
    cv.rrect([44, 32, 196, 268], 40, fill=body, outline=edge, width=2)
    # main zip
    cv.arc([54, 42, 186, 170], 190, 350, fill=(80, 80, 86), width=2.5)
    cv.rrect([60, 64, 72, 78], 2, fill=(170, 170, 176))
    # front pocket with its zip and stitching
    cv.rrect([64, 146, 176, 250], 18, fill=(48, 48, 54), outline=edge, width=2)
    cv.line([(74, 162), (166, 162)], (96, 96, 102), 2.5)
    cv.rrect([150, 164, 158, 180], 2, fill=(170, 170, 176))
    cv.dashed([(72, 170), (72, 236), (168, 236), (168, 170)], (112, 112, 120), 1.0)
    cv.dashed([(56, 48), (184, 48)], (90, 90, 98), 1.0)
    # logo patch
    cv.rrect([100, 192, 140, 222], 5, fill=(196, 40, 40))
    _moon_logo(cv, 120, 207, 10, (250, 250, 250), (196, 40, 40))
    # side compression straps
    cv.line([(46, 120), (60, 120)], (70, 70, 76), 4)
    cv.line([(180, 120), (194, 120)], (70, 70, 76), 4)
    return cv.finish()


def denim_jacket() -> Image.Image:
    w, h = 288, 288
    bg = (244, 242, 236)
    cv = Canvas(w, h, bg)
    denim, edge = (62, 98, 156), (34, 58, 100)
    gold = (214, 150, 60)
    cv.shadow(144, 272, 100, 8, _shade(bg, 0.9))
    # long sleeves
    cv.polygon([(84, 52), (48, 78), (22, 236), (52, 242), (86, 120)], fill=_shade(denim, 0.92), outline=edge, width=2)
    cv.polygon([(204, 52), (240, 78), (266, 236), (236, 242), (202, 120)], fill=_shade(denim, 0.92), outline=edge, width=2)
    # body
    cv.polygon([(84, 52), (118, 40), (170, 40), (204, 52), (206, 258), (82, 258)], fill=denim, outline=edge, width=2)
    # waistband and cuffs
    cv.rrect([82, 236, 206, 258], 2, fill=_shade(denim, 0.85), outline=edge, width=1.2)
    cv.polygon([(22, 236), (24, 222), (54, 228), (52, 242)], fill=_shade(denim, 0.85), outline=edge, width=1)
    cv.polygon([(266, 236), (264, 222), (234, 228), (236, 242)], fill=_shade(denim, 0.85), outline=edge, width=1)
    # collar (two flaps) and inner neck
    cv.polygon([(118, 40), (170, 40), (158, 56), (130, 56)], fill=(40, 62, 108))
    cv.polygon([(118, 40), (104, 46), (112, 84), (140, 62)], fill=_shade(denim, 1.12), outline=edge, width=1.4)
    cv.polygon([(170, 40), (184, 46), (176, 84), (148, 62)], fill=_shade(denim, 1.12), outline=edge, width=1.4)
    # front placket and buttons
    cv.line([(144, 62), (144, 258)], edge, 1.6)
    cv.dashed([(150, 66), (150, 236)], gold, 1.1)
    for y in (80, 116, 152, 188, 222, 247):
        cv.ellipse([139, y - 4, 149, y + 4], fill=(196, 170, 112), outline=(120, 96, 50), width=1)
    # chest pockets with flaps
    for x0 in (100, 160):
        cv.rrect([x0, 104, x0 + 30, 140], 3, fill=_shade(denim, 0.95), outline=edge, width=1)
        cv.polygon([(x0 - 2, 98), (x0 + 32, 98), (x0 + 32, 110), (x0 + 15, 118), (x0 - 2, 110)],
                   fill=_shade(denim, 1.06), outline=edge, width=1.2)
        cv.dashed([(x0 + 2, 106), (x0 + 15, 114), (x0 + 28, 106)], gold, 1.0, 3, 2)
        cv.ellipse([x0 + 12, 108, x0 + 18, 114], fill=(196, 170, 112))
    # yoke and contrast stitching
    cv.dashed([(86, 90), (202, 90)], gold, 1.1)
    cv.dashed([(86, 230), (202, 230)], gold, 1.1)
    cv.dashed([(112, 150), (112, 228)], gold, 1.0)
    cv.dashed([(176, 150), (176, 228)], gold, 1.0)
    return cv.finish()


def green_mug() -> Image.Image:
    w, h = 256, 224
    bg = (246, 244, 238)
    cv = Canvas(w, h, bg)
    green, edge = (46, 138, 84), (26, 88, 50)
    cv.shadow(118, 200, 84, 10, _shade(bg, 0.88))
    # handle (thick ring on the right)
    cv.ellipse([150, 72, 214, 160], fill=None, outline=green, width=14)
    cv.ellipse([150, 72, 214, 160], fill=None, outline=edge, width=1.5)
    # body: rectangle with an elliptical bottom
    cv.ellipse([48, 180, 188, 204], fill=green, outline=edge, width=1.5)
    cv.polygon([(48, 48), (188, 48), (188, 192), (48, 192)], fill=green)
    cv.line([(48, 48), (48, 192)], edge, 1.5)
    cv.line([(188, 48), (188, 192)], edge, 1.5)
    # glossy highlight
    cv.rrect([62, 64, 76, 176], 7, fill=_shade(green, 1.35))
    cv.rrect([82, 70, 87, 150], 2.5, fill=_shade(green, 1.2))
    # rim with coffee inside
    cv.ellipse([48, 36, 188, 62], fill=_shade(green, 1.25), outline=edge, width=1.5)
    cv.ellipse([56, 40, 180, 58], fill=(92, 56, 34))
    cv.ellipse([96, 44, 132, 52], fill=(150, 104, 66))
    # glaze line and logo
    cv.dashed([(50, 170), (186, 170)], _shade(green, 1.45), 1.1)
    _moon_logo(cv, 130, 112, 16, (250, 250, 244), green)
    # steam
    for x in (96, 118, 140):
        cv.line([(x, 30), (x - 5, 22), (x + 1, 13), (x - 4, 4)], (200, 200, 196), 2)
    return cv.finish()


# --------------------------------------------------------------------------------------
# Catalogue
# --------------------------------------------------------------------------------------

#: (sku, product text, image file name, drawing function)
ITEMS: List[Tuple[str, str, str, Callable[[], Image.Image]]] = [
    ("sku-001", "Red cotton crew-neck t-shirt", "red_tshirt.jpg", red_tshirt),
    ("sku-002", "Navy blue cotton t-shirt with a small white logo", "navy_tshirt.jpg", navy_tshirt),
    ("sku-003", "Red floral summer dress with a waist bow", "red_dress.jpg", red_dress),
    ("sku-004", "Brown leather oxford shoes", "brown_shoes.jpg", brown_shoes),
    ("sku-005", "White canvas low-top sneakers with a blue logo", "white_sneakers.png", white_sneakers),
    ("sku-006", "Black nylon backpack with front pocket", "black_backpack.jpg", black_backpack),
    ("sku-007", "Blue denim jacket with metal buttons", "denim_jacket.jpg", denim_jacket),
    ("sku-008", "Green ceramic coffee mug, 350 ml", "green_mug.png", green_mug),
]

QUERIES: List[str] = [
    "red cotton t-shirt",
    "leather shoes",
    "coffee mug",
    "denim jacket",
]


def _save(img: Image.Image, path: Path) -> None:
    if path.suffix.lower() in (".jpg", ".jpeg"):
        img.save(path, format="JPEG", quality=90)
    else:
        img.save(path, format="PNG", optimize=True)


def build(output_dir: Union[str, Path] = DEFAULT_OUTPUT_DIR) -> Dict[str, Path]:
    """Draw the images and write ``items.jsonl`` and ``queries.txt`` into ``output_dir``."""
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    written: Dict[str, Path] = {}
    lines = []
    for sku, text, fname, draw in ITEMS:
        path = out / fname
        _save(draw(), path)
        written[fname] = path
        lines.append(json.dumps({"id": sku, "text": text, "image": fname}, ensure_ascii=False))
    items = out / "items.jsonl"
    items.write_text("\n".join(lines) + "\n", encoding="utf-8")
    queries = out / "queries.txt"
    queries.write_text("\n".join(QUERIES) + "\n", encoding="utf-8")
    written["items.jsonl"] = items
    written["queries.txt"] = queries
    return written


def main(argv: Optional[Sequence[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-o", "--output-dir", type=Path, default=DEFAULT_OUTPUT_DIR, help="catalogue folder")
    args = parser.parse_args(argv)
    written = build(args.output_dir)
    total = sum(p.stat().st_size for p in written.values())
    for name, p in written.items():
        print(f"{p}  {p.stat().st_size} bytes")
    print(f"total {total} bytes")


if __name__ == "__main__":
    main()
