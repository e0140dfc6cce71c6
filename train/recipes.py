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
        world=WorldSpec(seed=0, train_products=3000, heldout_products=1200, image_queries=3, text_queries=3),
        train=TrainConfig(model="moon3-tiny-random", steps=5000, batch_size=32, lr=2e-3, warmup=100,
                          temperature=0.05, ntp_weight=0.5, ntp_items=8, ntp_from_image=0.5, save_every=500,
                          log_every=10, seed=0, max_minutes=45),
        note="about 40 minutes of one CPU thread (the world's rendering included); see docs/TRAINING.md",
    ),
}


def run_recipe(name: str, out: str | Path, **overrides) -> Path:
    """Render the recipe's training world under ``out/world`` (kept across runs) and train into ``out``.

    A ``data`` override names a directory that holds the recipe's world already (rendered
    there when it does not), so several runs of one recipe share one rendering.
    """
    if name not in RECIPES:
        raise ValueError(f"unknown recipe {name!r}; recipes are {sorted(RECIPES)}")
    recipe = RECIPES[name]
    out = Path(out)
    overrides = {k: v for k, v in overrides.items() if v is not None}
    data = Path(overrides.pop("data", out / "world" / "train"))  # --data: a world rendered already
    if not (data / "queries.jsonl").exists():
        write_split(recipe.world, "train", data, show_progress=overrides.get("show_progress", True))
    cfg = dataclasses.replace(recipe.train, data=str(data), out=str(out), **overrides)
    return train(cfg)
