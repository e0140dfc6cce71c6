"""Titles and text queries for world products: templates, synonyms and noise words."""

from __future__ import annotations

import numpy as np

from .attributes import CATEGORY_WORDS, COLOUR_WORDS, MATERIAL_WORDS, PATTERN_WORDS

NOISE = ("new", "premium", "classic", "2026 collection", "sale", "free shipping", "unisex", "everyday",
         "best seller", "limited edition", "gift idea", "modern")
NUMBER_WORDS = {"2": ("2", "two"), "3": ("3", "three"), "4": ("4", "four")}


def _pick(rng: np.random.Generator, words) -> str:
    return words[int(rng.integers(len(words)))]


def detail_phrases(attributes: dict[str, str], rng: np.random.Generator) -> list[str]:
    """Phrases naming the product's fine details, one per detail it has."""
    out = []
    logo = attributes.get("logo", "none")
    if logo != "none":
        colour = attributes.get("logo colour", "white")
        out.append(_pick(rng, (f"{colour} logo on the {logo}", f"{logo} {colour} logo", f"{colour} logo at the {logo}")))
    buttons = attributes.get("buttons")
    if buttons and buttons != "0":
        out.append(f"{_pick(rng, NUMBER_WORDS[buttons])} buttons")
    stitching = attributes.get("stitching", "none")
    if stitching != "none":
        out.append(_pick(rng, (f"{stitching} stitching", f"contrast {stitching} stitches")))
    strap = attributes.get("strap")
    if strap:
        word = "handle" if attributes["category"] == "tote" else "strap"
        out.append(f"{strap} {word}")
    return out


def title(attributes: dict[str, str], rng: np.random.Generator) -> str:
    """A catalogue title: one of several templates, synonyms drawn per call, noise words sprinkled in."""
    a = attributes
    colour, material = _pick(rng, COLOUR_WORDS[a["colour"]]), _pick(rng, MATERIAL_WORDS[a["material"]])
    category, pattern = _pick(rng, CATEGORY_WORDS[a["category"]]), _pick(rng, PATTERN_WORDS[a["pattern"]])
    details = detail_phrases(a, rng)
    order = rng.permutation(len(details))
    details = [details[i] for i in order]
    kind = int(rng.integers(4))
    if kind == 0:
        text = f"{colour} {pattern} {material} {category}"
        if details:
            text += ", " + ", ".join(details)
    elif kind == 1:
        text = f"{category} in {colour}, {pattern}, {material}"
        if details:
            text += " - " + " - ".join(details)
    elif kind == 2:
        text = f"{material} {category} {colour} {pattern}"
        if details:
            text += " with " + " and ".join(details)
    else:
        text = f"{pattern} {colour} {category} ({material})"
        if details:
            text += "; " + "; ".join(details)
    if rng.random() < 0.5:
        noise = _pick(rng, NOISE)
        text = f"{noise} {text}" if rng.random() < 0.5 else f"{text} | {noise}"
    return text[0].upper() + text[1:] if rng.random() < 0.7 else text


def short_query(attributes: dict[str, str], keys: list[str], rng: np.random.Generator) -> str:
    """A shopper's short query naming the given attributes ("navy striped t-shirt")."""
    a = attributes
    words = []
    for key in ("colour", "pattern", "material"):
        if key in keys:
            table = {"colour": COLOUR_WORDS, "pattern": PATTERN_WORDS, "material": MATERIAL_WORDS}[key]
            words.append(table[a[key]][0] if rng.random() < 0.7 else _pick(rng, table[a[key]]))
    if "category" in keys:
        words.append(_pick(rng, CATEGORY_WORDS[a["category"]]))
    text = " ".join(words)
    extra = detail_phrases({k: v for k, v in a.items() if k in keys or k in ("category", "logo colour")}, rng)
    if extra:
        text = (text + " with " if text else "") + " and ".join(extra)
    return text


def attribute_prompt(attribute: str, value: str) -> str:
    """The zero-shot classification prompt for one attribute value ("colour: navy")."""
    return f"{attribute}: {value}"
