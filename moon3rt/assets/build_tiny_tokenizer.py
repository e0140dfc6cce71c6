"""Build the tiny byte-level BPE tokenizer shipped in ``moon3rt/assets/moon3-tiny``.

The tokenizer mirrors the layout of the Qwen2 / Qwen2-VL tokenizer at a toy scale:

* byte-level BPE (``ByteLevel`` pre-tokenizer with the GPT-2 split regex, no prefix
  space; ``ByteLevel`` decoder), no normalizer, no BOS/EOS added on encode;
* the full 256-symbol byte alphabet is in the vocabulary, so every unicode string
  encodes without unknown tokens;
* the chat / vision special tokens are registered as special added tokens, so a
  marker such as ``<|image_pad|>`` inside a text always encodes to one id;
* exactly :data:`VOCAB_SIZE` ids in total.

The BPE merges are learned from a small built-in e-commerce corpus (see
:func:`corpus`), so the file is fully reproducible: running the script twice writes
byte-identical output.

Usage::

    python moon3rt/assets/build_tiny_tokenizer.py            # writes the shipped asset
    python moon3rt/assets/build_tiny_tokenizer.py -o out.json
"""

from __future__ import annotations

import argparse
import itertools
import os
from pathlib import Path
from typing import Iterator, List, Optional, Sequence, Union

# The BPE trainer may use several threads; word counts are merged exactly, so the
# result does not depend on it, but one thread keeps the build light.
os.environ.setdefault("RAYON_NUM_THREADS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors, trainers  # noqa: E402

VOCAB_SIZE = 1024

#: Special tokens, in id order (id 0 .. 9).
SPECIAL_TOKENS: List[str] = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|image_pad|>",
    "<|video_pad|>",
    "<emb>",
    "<think>",
    "</think>",
]

DEFAULT_OUTPUT = Path(__file__).resolve().parent / "moon3-tiny" / "tokenizer.json"

# --------------------------------------------------------------------------------------
# Built-in training corpus
# --------------------------------------------------------------------------------------

_FIXED_LINES = """\
system
user
assistant
You are a helpful assistant.
You are a helpful assistant. Represent the product for retrieval.
Represent the user's input.
Represent this product image and title for search.
Summarize the product in one word.
Find products that match the query.
Given a search query, retrieve relevant products.
Given a product image, retrieve the matching title.
Describe the main item in the picture.
What is the category of this product?
What colour is this item?
What material is this item made of?
Which design features does this product have?
The answer is:
category: clothing
category: footwear
category: bags and luggage
category: home and kitchen
category: electronics
category: beauty and personal care
category: sports and outdoors
category: toys and games
category: jewellery and watches
category: furniture
colour: red
colour: navy blue
colour: black
colour: white
colour: green
colour: brown
material: cotton
material: leather
material: denim
material: ceramic
material: polyester
material: stainless steel
design: crew neck, short sleeves, printed logo
design: slim fit, button front, two chest pockets
design: lace-up, rubber sole, padded collar
design: zip closure, adjustable straps, laptop sleeve
design: matte glaze, ergonomic handle, dishwasher safe
title: Red cotton crew-neck t-shirt
title: Navy blue cotton t-shirt with small logo
title: Red floral summer dress
title: Brown leather oxford shoes
title: White canvas low-top sneakers
title: Black nylon backpack with laptop compartment
title: Blue denim jacket with button front
title: Green ceramic coffee mug, 350 ml
brand: Moonlight
brand: Northwind
brand: Urban Trail
brand: Casa Verde
price: 19.99 USD
price: 24.50 EUR
price: 129.00 GBP
price: 5,999 JPY
size: XS, S, M, L, XL, XXL
size: EU 38, EU 39, EU 40, EU 41, EU 42, EU 43, EU 44
size: US 7, US 8, US 9, US 10, US 11
size: 30x40x12 cm
capacity: 350 ml
capacity: 20 L
weight: 0.8 kg
Free shipping on orders over 50 dollars.
Machine washable at 30 degrees. Do not tumble dry.
Hand wash only. Dry flat in the shade.
Made from 100% organic cotton.
Genuine leather upper with a breathable lining.
Water-resistant fabric with reinforced seams.
Microwave and dishwasher safe.
Comes in a gift box.
Available in multiple colours and sizes.
Regular fit. The model is 185 cm tall and wears size M.
Customers also bought: matching socks, cotton scarf, leather belt.
Best seller in men's fashion.
New arrival: spring / summer collection.
Limited edition, only a few items left in stock.
Rated 4.5 out of 5 stars by 1,204 customers.
Great quality, fits perfectly, fast delivery.
The colour is slightly darker than in the photo.
Comfortable for all-day wear, true to size.
Returns accepted within 30 days.
Query: red cotton t-shirt
Query: leather shoes for men
Query: coffee mug
Query: denim jacket
Query: white sneakers size 42
Query: black backpack for school
Query: summer dress with flowers
Query: cheap wireless headphones
Query: running shoes for women
Query: kitchen knife set
Positive: Red cotton crew-neck t-shirt
Negative: Blue polyester running shorts
Instruct: Given an e-commerce search query, retrieve the product that best matches it.
Instruct: Given a product image and title, produce an embedding for retrieval.
<image> A photo of a product on a white background.
A flat illustration of a t-shirt with a round logo on the chest.
Stitching lines along the hem and the sleeves.
An oval toe cap and a thick rubber outsole.
A rectangular backpack with two shoulder straps and a front pocket.
A denim jacket with metal buttons and contrast stitching.
A ceramic mug with a curved handle and a glossy glaze.
Colours: red, orange, yellow, green, blue, navy, purple, pink, brown, black, white, grey, beige.
Materials: cotton, linen, wool, silk, cashmere, denim, leather, suede, nylon, polyester, canvas, ceramic, glass, wood, bamboo, steel, aluminium, plastic, rubber.
Patterns: solid, striped, checked, plaid, floral, polka dot, camouflage, graphic print.
Occasions: casual, formal, office, party, wedding, travel, outdoor, sports, beach.
Seasons: spring, summer, autumn, winter, all season.
Audience: men, women, kids, boys, girls, baby, unisex.
Numbers: 0 1 2 3 4 5 6 7 8 9 10 12 15 20 25 30 40 50 100 250 500 1000
SKU-001 SKU-002 SKU-003 SKU-004 SKU-005 SKU-006 SKU-007 SKU-008
https://shop.example.com/products/sku-001?colour=red&size=M
{"id": "sku-001", "text": "Red cotton crew-neck t-shirt", "image": "red_tshirt.jpg"}
Café crème, naïve façade, Größe, años, été, señora.
T恤 连衣裙 皮鞋 运动鞋 背包 牛仔夹克 陶瓷杯 红色 蓝色 黑色 白色
Tシャツ ワンピース スニーカー バッグ マグカップ
Футболка, платье, кроссовки, рюкзак.
"""

_COLOURS = [
    "red", "navy", "black", "white", "green", "brown", "blue", "grey",
    "beige", "pink", "yellow", "purple", "orange", "olive", "burgundy", "cream",
]
_MATERIALS = [
    "cotton", "leather", "denim", "ceramic", "wool", "linen", "polyester", "nylon",
    "canvas", "suede", "silk", "stainless steel", "bamboo", "glass",
]
_PRODUCTS = [
    ("clothing", "crew-neck t-shirt"),
    ("clothing", "v-neck t-shirt"),
    ("clothing", "polo shirt"),
    ("clothing", "hoodie"),
    ("clothing", "sweater"),
    ("clothing", "dress"),
    ("clothing", "maxi skirt"),
    ("clothing", "jeans"),
    ("clothing", "chino trousers"),
    ("clothing", "jacket"),
    ("clothing", "winter coat"),
    ("clothing", "scarf"),
    ("footwear", "oxford shoes"),
    ("footwear", "sneakers"),
    ("footwear", "running shoes"),
    ("footwear", "ankle boots"),
    ("footwear", "sandals"),
    ("footwear", "loafers"),
    ("bags", "backpack"),
    ("bags", "tote bag"),
    ("bags", "wallet"),
    ("bags", "crossbody bag"),
    ("home and kitchen", "coffee mug"),
    ("home and kitchen", "tea cup"),
    ("home and kitchen", "dinner plate"),
    ("home and kitchen", "water bottle"),
    ("home and kitchen", "cushion cover"),
    ("accessories", "baseball cap"),
    ("accessories", "belt"),
    ("accessories", "watch strap"),
]
_DESIGNS = [
    "short sleeves", "long sleeves", "slim fit", "relaxed fit", "round collar",
    "zip closure", "button front", "embroidered logo", "printed pattern", "side pockets",
    "contrast stitching", "padded straps", "rubber sole", "lace-up front", "glossy finish",
    "matte finish", "adjustable strap", "reinforced seams",
]
_SIZES = ["XS", "S", "M", "L", "XL", "XXL", "EU 40", "EU 42", "US 9", "one size", "350 ml", "20 L"]
_AUDIENCES = ["men", "women", "kids", "unisex"]


def _generated_lines() -> Iterator[str]:
    """Product listings from fixed word lists (no randomness: index arithmetic only)."""
    n_c, n_m, n_d, n_s, n_a = len(_COLOURS), len(_MATERIALS), len(_DESIGNS), len(_SIZES), len(_AUDIENCES)
    for i, (category, product) in enumerate(_PRODUCTS):
        for j in range(8):
            colour = _COLOURS[(3 * i + 5 * j) % n_c]
            material = _MATERIALS[(i + 3 * j) % n_m]
            design = _DESIGNS[(2 * i + 7 * j) % n_d]
            size = _SIZES[(i + j) % n_s]
            audience = _AUDIENCES[(i * 3 + j) % n_a]
            title = f"{colour.capitalize()} {material} {product} for {audience}"
            if j % 4 == 0:
                yield title
            elif j % 4 == 1:
                yield f"{title}, {design}, size {size}"
            elif j % 4 == 2:
                yield (
                    f"title: {title}\tcategory: {category}\tcolour: {colour}\t"
                    f"material: {material}\tdesign: {design}"
                )
            else:
                yield f"{colour} {product} {material} {design}"
    # Chat-formatted turns (the special markers themselves are not part of the corpus).
    for i, (category, product) in enumerate(_PRODUCTS):
        colour = _COLOURS[i % n_c]
        material = _MATERIALS[i % n_m]
        yield "system"
        yield "You are a helpful assistant."
        yield "user"
        yield f"{colour.capitalize()} {material} {product}. What is the category of this product?"
        yield "assistant"
        yield f"The category is {category}."
    # Short query-style lines: colour x product pairs on a fixed stride.
    for k, (c, (_, p)) in enumerate(itertools.product(_COLOURS, _PRODUCTS)):
        if k % 7 == 0:
            yield f"{c} {p}"


def corpus() -> List[str]:
    """The training corpus: fixed hand-written lines followed by generated listings."""
    return _FIXED_LINES.splitlines() + list(_generated_lines())


# --------------------------------------------------------------------------------------
# Build
# --------------------------------------------------------------------------------------


def build_tokenizer(vocab_size: int = VOCAB_SIZE) -> Tokenizer:
    """Train and return the tiny tokenizer (in memory)."""
    tok = Tokenizer(
        models.BPE(
            dropout=None,
            unk_token=None,
            continuing_subword_prefix="",
            end_of_word_suffix="",
            fuse_unk=False,
            byte_fallback=False,
        )
    )
    tok.normalizer = None
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    # ByteLevel post-processing only fixes offsets; it adds no BOS/EOS (same as Qwen2).
    tok.post_processor = processors.ByteLevel(add_prefix_space=False, trim_offsets=False)

    specials = [AddedToken(t, special=True, normalized=False, lstrip=False, rstrip=False) for t in SPECIAL_TOKENS]
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=1,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus(), trainer=trainer, length=None)
    # Make sure the specials are registered as special added tokens (idempotent).
    tok.add_special_tokens(specials)

    # Sanity checks on the layout the runtime relies on.
    for i, t in enumerate(SPECIAL_TOKENS):
        got = tok.token_to_id(t)
        if got != i:
            raise RuntimeError(f"special token {t!r} has id {got}, expected {i}")
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    missing = [c for c in alphabet if tok.token_to_id(c) is None]
    if missing:
        raise RuntimeError(f"{len(missing)} byte-level symbols missing from the vocabulary")
    if tok.get_vocab_size(with_added_tokens=True) != vocab_size:
        raise RuntimeError(
            f"vocabulary has {tok.get_vocab_size(with_added_tokens=True)} ids, expected {vocab_size} "
            "(corpus too small for the requested number of merges?)"
        )
    return tok


def build(output_path: Union[str, Path] = DEFAULT_OUTPUT) -> Path:
    """Train the tokenizer and write it as ``tokenizer.json`` to ``output_path``."""
    output_path = Path(output_path)
    output_path.parent.mkdir(parents=True, exist_ok=True)
    text = build_tokenizer().to_str(pretty=True)
    with open(output_path, "w", encoding="utf-8", newline="\n") as f:
        f.write(text)
        f.write("\n")
    return output_path


def main(argv: Optional[Sequence[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-o", "--output", type=Path, default=DEFAULT_OUTPUT, help="where to write tokenizer.json")
    args = parser.parse_args(argv)
    path = build(args.output)
    tok = Tokenizer.from_file(str(path))
    print(f"wrote {path} ({path.stat().st_size} bytes, vocab {tok.get_vocab_size()})")


if __name__ == "__main__":
    main()
