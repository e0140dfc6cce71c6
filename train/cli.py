"""``python -m moon3rt train``: arguments and entry point (the CLI module only registers them)."""

from __future__ import annotations

import argparse
import dataclasses
import sys

from .loop import TrainConfig, TrainingStopped, train


def add_arguments(p: argparse.ArgumentParser) -> None:
    d = TrainConfig()
    p.add_argument("--recipe", default=None, help="a named recipe (moon3-tiny: the embedded default); "
                   "renders its world under --out/world and trains; other options override it")
    p.add_argument("--model", default=None, help=f"base: a preset (random init) or checkpoint dir (default {d.model})")
    p.add_argument("--data", default=None, help="directory with products.jsonl and queries.jsonl")
    p.add_argument("--out", default=None, help="output directory: checkpoints/, final/, log.jsonl, loss.png")
    for name, typ, help_ in (
        ("steps", int, "optimizer steps"), ("batch_size", int, "query-product pairs per micro-batch, all ranks"),
        ("grad_accum", int, "micro-batches per optimizer step"), ("lr", float, "peak learning rate"),
        ("warmup", int, "linear warm-up steps before the cosine decay"), ("temperature", float, "InfoNCE temperature"),
        ("ntp_weight", float, "weight of the next-token loss on the attribute text"),
        ("ntp_items", int, "products per rank per micro-batch that learn their attribute text"),
        ("seed", int, "seed of the initialisation and of the batch order"),
        ("save_every", int, "checkpoint every N steps"), ("max_minutes", float, "stop and save after this long"),
        ("weight_decay", float, "AdamW weight decay"),
    ):
        p.add_argument("--" + name.replace("_", "-"), dest=name, type=typ, default=None,
                       help=f"{help_} (default {getattr(d, name)})")
    for name, help_ in (("freeze_vision", "do not train the vision tower"),
                        ("grad_checkpointing", "recompute decoder layers and vision blocks in backward"),
                        ("strict", "stop at the first bad data line instead of skipping bad lines"),
                        ("resume", "continue from the newest checkpoint under --out"),
                        ("ntp_from_image", "learn the attribute text from a rendering with no title"),
                        ("no_fire", "ablation: drop FIRE"), ("no_fusion", "ablation: drop MHMF")):
        p.add_argument("--" + name.replace("_", "-"), dest=name, action="store_true", default=None, help=help_)
    p.add_argument("--no-matryoshka", dest="matryoshka", action="store_false", default=None,
                   help="InfoNCE on the full vector only")
    p.add_argument("--no-hard-negatives", dest="hard_negatives", action="store_false", default=None)
    p.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=None,
                   help="bf16 autocast (default: on CUDA)")
    p.add_argument("--pooling", choices=["emb_token", "last", "mean"], default=None, help="ablation: pooling")
    p.add_argument("--no-progress", dest="show_progress", action="store_false", default=None)


def main(args: argparse.Namespace) -> int:
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    overrides = {k: v for k, v in vars(args).items() if k in fields and v is not None}
    try:
        if args.recipe:
            from .recipes import run_recipe

            out = overrides.pop("out", None) or f"runs/{args.recipe}"
            final = run_recipe(args.recipe, out, **overrides)
        else:
            missing = [k for k in ("data", "out") if k not in overrides]
            if missing:
                print(f"error: --{' and --'.join(missing)} required (or --recipe NAME)", file=sys.stderr)
                return 2
            final = train(dataclasses.replace(TrainConfig(), **overrides))
    except TrainingStopped as err:
        print(f"error: training stopped: {err}", file=sys.stderr)
        return 3
    print(f"trained checkpoint: {final}")
    return 0
