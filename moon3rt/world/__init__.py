"""The product world: a seeded generator of products with ground-truth attributes (DESIGN.md section 5).

    from moon3rt.world import WorldSpec, write_world
    write_world(WorldSpec(seed=0), "runs/world")   # train/ and heldout/: products.jsonl, queries.jsonl, images/

Every product is an attribute combination (category, colour incl. near shades, material,
pattern, logo position and colour, button count, stitching colour, strap), drawn many ways;
held-out products use (category, colour, pattern) triples no training product has.
"""

from .attributes import ATTRIBUTES, CATEGORIES, COLOURS, FINE_DETAILS, attribute_text, matches
from .build import WorldSpec, heldout_triples, products, write_split, write_world
from .render import render
from .text import attribute_prompt, title

__all__ = ["ATTRIBUTES", "CATEGORIES", "COLOURS", "FINE_DETAILS", "WorldSpec", "attribute_prompt",
           "attribute_text", "heldout_triples", "matches", "products", "render", "title", "write_split",
           "write_world"]
