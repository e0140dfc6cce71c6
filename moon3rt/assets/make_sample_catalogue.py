"""Draw the small sample catalogue shipped in ``moon3rt/assets/catalogue`` with the product world's renderer.

Eight products of `moon3rt.world` (attribute combinations with catalogue titles) are drawn
in the world's canonical view (centred, plain background, no jitter) at the 112 x 112 pixels
the world trains on, upscaled to 224 x 224 (bilinear),
saved as JPEG (quality 90) or PNG next to ``items.jsonl`` (one product per line:
``{"id", "text", "image"}``, image paths relative to the jsonl file) and ``queries.txt`` (one
text search query per line). The drawing is deterministic, so the output is reproducible.

Usage::

    python moon3rt/assets/make_sample_catalogue.py            # writes the shipped catalogue
    python moon3rt/assets/make_sample_catalogue.py -o out_dir
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from moon3rt.world import render

DEFAULT_OUTPUT_DIR = Path(__file__).resolve().parent / "catalogue"
SIZE = 224

#: (sku, title, image file name, world attributes)
ITEMS = [
    ("sku-001", "Red cotton t-shirt, crew neck", "red_tshirt.jpg",
     {"category": "t-shirt", "colour": "red", "material": "cotton", "pattern": "plain", "logo": "none",
      "buttons": "0", "stitching": "none"}),
    ("sku-002", "Navy blue cotton t-shirt with a small white logo", "navy_tshirt.jpg",
     {"category": "t-shirt", "colour": "navy", "material": "cotton", "pattern": "plain", "logo": "top left",
      "logo colour": "white", "buttons": "0", "stitching": "none"}),
    ("sku-003", "Red floral summer dress with two buttons", "red_dress.jpg",
     {"category": "dress", "colour": "red", "material": "cotton", "pattern": "floral", "logo": "none",
      "buttons": "2", "stitching": "none"}),
    ("sku-004", "Brown leather oxford shoes", "brown_shoes.jpg",
     {"category": "oxford shoe", "colour": "brown", "material": "leather", "pattern": "plain", "logo": "none",
      "stitching": "none"}),
    ("sku-005", "White canvas low-top sneakers with a red logo", "white_sneakers.png",
     {"category": "sneaker", "colour": "white", "material": "canvas", "pattern": "plain", "logo": "bottom right",
      "logo colour": "red", "stitching": "none"}),
    ("sku-006", "Black canvas backpack with front pocket", "black_backpack.jpg",
     {"category": "backpack", "colour": "black", "material": "canvas", "pattern": "plain", "logo": "none",
      "stitching": "none", "strap": "short"}),
    ("sku-007", "Blue denim jacket with four buttons and yellow stitching", "denim_jacket.jpg",
     {"category": "jacket", "colour": "blue", "material": "denim", "pattern": "plain", "logo": "none",
      "buttons": "4", "stitching": "yellow"}),
    ("sku-008", "Green ceramic coffee mug, 350 ml", "green_mug.png",
     {"category": "mug", "colour": "green", "material": "ceramic", "pattern": "plain", "logo": "centre",
      "logo colour": "white"}),
]

QUERIES = ["red cotton t-shirt", "leather shoes", "coffee mug", "denim jacket"]


def build(output_dir: str | Path = DEFAULT_OUTPUT_DIR) -> dict[str, Path]:
    """Draw the images and write ``items.jsonl`` and ``queries.txt`` into ``output_dir``."""
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    written: dict[str, Path] = {}
    lines = []
    for n, (sku, text, fname, attributes) in enumerate(ITEMS):
        path = out / fname
        image = render(attributes, [0, n], size=SIZE // 2, jitter=False, jpeg_quality=0).resize((SIZE, SIZE))
        if path.suffix == ".jpg":
            image.save(path, format="JPEG", quality=90)
        else:
            image.save(path, format="PNG", optimize=True)
        written[fname] = path
        lines.append(json.dumps({"id": sku, "text": text, "image": fname}, ensure_ascii=False))
    (out / "items.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    (out / "queries.txt").write_text("\n".join(QUERIES) + "\n", encoding="utf-8")
    written["items.jsonl"], written["queries.txt"] = out / "items.jsonl", out / "queries.txt"
    return written


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-o", "--output-dir", type=Path, default=DEFAULT_OUTPUT_DIR, help="catalogue folder")
    args = parser.parse_args(argv)
    written = build(args.output_dir)
    total = sum(p.stat().st_size for p in written.values())
    print(f"wrote {len(written)} files ({total / 1024:.1f} KiB) to {args.output_dir}")


if __name__ == "__main__":
    main()
