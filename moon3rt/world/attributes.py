"""The product world's vocabulary: categories, colours, materials, patterns, fine details.

Every product is one combination of attribute values. Which attributes a category has
(buttons only on garments, a strap only on bags and watches, ...) is fixed here, and so
are the words titles and queries use for each value (synonyms included).
"""

from __future__ import annotations

# Colour name -> sRGB. Near shades sit side by side on purpose (navy/blue, burgundy/red,
# beige/white, olive/green): MOON3's claim is that they stay apart.
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (205, 32, 38),
    "burgundy": (112, 22, 44),
    "pink": (236, 132, 172),
    "orange": (240, 128, 28),
    "yellow": (238, 206, 42),
    "green": (42, 152, 62),
    "olive": (112, 118, 38),
    "blue": (40, 102, 222),
    "navy": (22, 32, 92),
    "white": (246, 246, 242),
    "beige": (222, 198, 156),
    "grey": (132, 132, 132),
    "black": (24, 24, 26),
    "brown": (122, 72, 36),
}

COLOUR_WORDS: dict[str, tuple[str, ...]] = {
    "red": ("red", "scarlet"),
    "burgundy": ("burgundy", "maroon", "wine red"),
    "pink": ("pink", "rose"),
    "orange": ("orange",),
    "yellow": ("yellow", "mustard"),
    "green": ("green", "kelly green"),
    "olive": ("olive", "olive green", "khaki green"),
    "blue": ("blue", "royal blue"),
    "navy": ("navy", "navy blue", "dark blue"),
    "white": ("white", "off-white"),
    "beige": ("beige", "sand", "camel"),
    "grey": ("grey", "gray", "charcoal"),
    "black": ("black", "jet black"),
    "brown": ("brown", "chocolate", "tan brown"),
}

CATEGORY_WORDS: dict[str, tuple[str, ...]] = {
    "t-shirt": ("t-shirt", "tee", "tshirt"),
    "dress": ("dress", "midi dress"),
    "jacket": ("jacket", "coat"),
    "jeans": ("jeans", "trousers", "pants"),
    "sneaker": ("sneakers", "trainers"),
    "oxford shoe": ("oxford shoes", "oxfords", "lace-up shoes"),
    "backpack": ("backpack", "rucksack"),
    "tote": ("tote bag", "tote", "shopper bag"),
    "mug": ("mug", "coffee mug", "cup"),
    "cap": ("cap", "baseball cap"),
    "watch": ("watch", "wristwatch"),
    "lamp": ("lamp", "desk lamp"),
}
CATEGORIES = tuple(CATEGORY_WORDS)

MATERIAL_WORDS: dict[str, tuple[str, ...]] = {
    "cotton": ("cotton", "pure cotton"),
    "denim": ("denim", "jean"),
    "leather": ("leather", "genuine leather"),
    "knit": ("knit", "knitted"),
    "canvas": ("canvas",),
    "ceramic": ("ceramic", "stoneware"),
    "metal": ("metal", "steel"),
}

PATTERN_WORDS: dict[str, tuple[str, ...]] = {
    "plain": ("plain", "solid"),
    "striped": ("striped", "stripe"),
    "checked": ("checked", "plaid", "check"),
    "dotted": ("dotted", "polka dot"),
    "floral": ("floral", "flower print"),
}
PATTERNS = tuple(PATTERN_WORDS)

LOGO_POSITIONS = ("none", "top left", "centre", "bottom right")
LOGO_COLOURS = ("white", "black", "gold", "red")
LOGO_RGB = {"white": (250, 250, 250), "black": (15, 15, 15), "gold": (212, 170, 40), "red": (220, 20, 30)}
BUTTON_COUNTS = ("0", "2", "3", "4")
STITCHING = ("none", "white", "yellow", "red")
STITCH_RGB = {"white": (250, 250, 250), "yellow": (250, 220, 30), "red": (230, 25, 30)}
STRAPS = ("short", "long")

MATERIALS_BY_CATEGORY: dict[str, tuple[str, ...]] = {
    "t-shirt": ("cotton", "knit"),
    "dress": ("cotton", "knit", "denim"),
    "jacket": ("denim", "leather", "cotton", "knit"),
    "jeans": ("denim", "cotton"),
    "sneaker": ("canvas", "leather", "knit"),
    "oxford shoe": ("leather", "canvas"),
    "backpack": ("canvas", "leather", "denim"),
    "tote": ("canvas", "leather", "cotton", "denim"),
    "mug": ("ceramic", "metal"),
    "cap": ("cotton", "denim", "knit", "canvas"),
    "watch": ("metal", "leather"),
    "lamp": ("metal", "ceramic"),
}
HAS_BUTTONS = {"t-shirt", "dress", "jacket"}
HAS_STITCHING = {"t-shirt", "dress", "jacket", "jeans", "sneaker", "oxford shoe", "backpack", "tote", "cap"}
HAS_STRAP = {"backpack", "tote", "watch"}

# Attribute order: the order of the attribute text written before <emb>, and of eval tables.
ATTRIBUTES = ("category", "colour", "material", "pattern", "logo", "logo colour", "buttons", "stitching", "strap")
FINE_DETAILS = ("logo", "logo colour", "buttons", "stitching", "strap", "pattern")


def attribute_values(category: str) -> dict[str, tuple[str, ...]]:
    """Every attribute a product of `category` has, with its possible values."""
    values = {
        "category": (category,),
        "colour": tuple(COLOURS),
        "material": MATERIALS_BY_CATEGORY[category],
        "pattern": PATTERNS,
        "logo": LOGO_POSITIONS,
        "logo colour": LOGO_COLOURS,
    }
    if category in HAS_BUTTONS:
        values["buttons"] = BUTTON_COUNTS
    if category in HAS_STITCHING:
        values["stitching"] = STITCHING
    if category in HAS_STRAP:
        values["strap"] = STRAPS
    return values


def attribute_text(attributes: dict[str, str]) -> str:
    """The structured attribute text a MOON3 model writes before <emb> ("category: t-shirt; colour: navy; ...")."""
    return "; ".join(f"{k}: {attributes[k]}" for k in ATTRIBUTES if k in attributes)


def matches(query: dict[str, str], product: dict[str, str]) -> bool:
    """Whether a product has every attribute value the query asks for."""
    return all(product.get(k) == v for k, v in query.items())
