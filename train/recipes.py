"""Named training recipes: a world, a base model and the training settings, reproducible by name.

``python -m moon3rt train --recipe moon3-tiny`` renders the world (seed 0) under
``--out``/world and trains the embedded default from random initialisation; the final
checkpoint is ``--out``/final, the directory shipped in moon3rt/assets/moon3-tiny/.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

from moon3rt.world import WorldSpec, write_split

from .loop import TrainConfig, train


@dataclass(frozen=True)
class Recipe:
    world: WorldSpec
    train: TrainConfig
    note: str = ""


RECIPES: dict[str, Recipe] = {
    "moon3-tiny": Recipe(
        world=WorldSpec(seed=0, train_products=1500, heldout_products=1200, image_queries=2, text_queries=3),
        train=TrainConfig(model="moon3-tiny-random", steps=1000, batch_size=24, lr=1e-3, warmup=50,
                          temperature=0.05, ntp_weight=0.2, ntp_items=4, save_every=100, log_every=10, seed=0,
                          max_minutes=45),
        note="fits 45 minutes of one CPU core shared with other jobs; see docs/TRAINING.md",
    ),
}


def run_recipe(name: str, out: str | Path, **overrides) -> Path:
    """Render the recipe's training world under ``out/world`` (kept across runs) and train into ``out``."""
    if name not in RECIPES:
        raise ValueError(f"unknown recipe {name!r}; recipes are {sorted(RECIPES)}")
    recipe = RECIPES[name]
    out = Path(out)
    data = out / "world" / "train"
    if not (data / "queries.jsonl").exists():
        write_split(recipe.world, "train", data)
    cfg = dataclasses.replace(recipe.train, data=str(data), out=str(out),
                              **{k: v for k, v in overrides.items() if v is not None})
    return train(cfg)
