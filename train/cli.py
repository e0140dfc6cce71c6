"""``python -m moon3rt train``: arguments and entry point (the CLI module only registers them).

``--stage contrastive`` (the default) runs `loop.train`, ``--stage rl`` runs
`rl_loop.train_rl`; an option of the other stage is refused.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys

from .loop import TrainConfig, TrainingStopped, train
from .rl_loop import RLRefused, RLTrainConfig, train_rl

STAGES = {"contrastive": TrainConfig, "rl": RLTrainConfig}


def add_arguments(p: argparse.ArgumentParser) -> None:
    d, r = TrainConfig(), RLTrainConfig()
    p.add_argument("--stage", choices=sorted(STAGES), default="contrastive",
                   help="contrastive: the cold start (default); rl: GRPO + InfoNCE from an SFT checkpoint "
                   "(docs/RL.md)")
    p.add_argument("--recipe", default=None, help="a named recipe (moon3-tiny: the embedded default); "
                   "renders its world under --out/world and trains; other options override it")
    p.add_argument("--model", default=None, help=f"base: a preset (random init) or checkpoint dir (default {d.model}; "
                   "--stage rl: required, the SFT checkpoint)")
    p.add_argument("--data", default=None, help="directory with products.jsonl and queries.jsonl")
    p.add_argument("--out", default=None, help="output directory: checkpoints/, final/, log.jsonl, loss.png "
                   "(--stage rl: rl.png)")

    def option(name, typ, help_, defaults):
        p.add_argument("--" + name.replace("_", "-"), dest=name, type=typ, default=None, help=f"{help_} ({defaults})")

    both = lambda name: f"default {getattr(d, name)}; rl {getattr(r, name)}"
    for name, typ, help_ in (
        ("steps", int, "optimizer steps (rl: collect + update steps)"),
        ("batch_size", int, "query-product pairs per micro-batch (rl: per step), all ranks"),
        ("lr", float, "peak learning rate"), ("warmup", int, "linear warm-up steps before the cosine decay"),
        ("temperature", float, "InfoNCE temperature; rl: sampling temperature of the rollouts"),
        ("seed", int, "seed of the initialisation and of the batch order (rl: and of the rollouts)"),
        ("save_every", int, "checkpoint every N steps"), ("max_minutes", float, "stop and save after this long"),
        ("weight_decay", float, "AdamW weight decay"), ("max_grad_norm", float, "gradient clipping norm"),
        ("log_every", int, "write log.jsonl every N steps"), ("keep", int, "step checkpoints kept"),
        ("min_lr_ratio", float, "learning rate at the end of the cosine decay, over --lr"),
    ):
        option(name, typ, help_, both(name))
    for name, typ, help_ in (
        ("grad_accum", int, "micro-batches per optimizer step"),
        ("ntp_weight", float, "weight of the next-token loss on the attribute text"),
        ("ntp_items", int, "products per rank per micro-batch that learn their attribute text"),
    ):
        option(name, typ, help_, f"default {getattr(d, name)}")
    rl = p.add_argument_group("--stage rl (docs/RL.md)")
    for name, typ, help_ in (
        ("rollouts", int, "G: reasoning rollouts per item and side"),
        ("top_p", float, "nucleus mass of the rollouts' draw"),
        ("max_reasoning_tokens", int, "reasoning budget per rollout"),
        ("eps_low", float, "clip range below 1"), ("eps_high", float, "clip range above 1"),
        ("beta", float, "weight of the k3 KL to the frozen reference"),
        ("nce_weight", float, "lambda: weight of InfoNCE on the rollouts' embeddings (0: off)"),
        ("nce_temperature", float, "InfoNCE temperature"),
        ("attribute_weight", float, "ablation: reward for stating the ground-truth attributes"),
        ("updates", int, "optimizer steps per collected batch"),
    ):
        rl.add_argument("--" + name.replace("_", "-"), dest=name, type=typ, default=None,
                        help=f"{help_} (default {getattr(r, name)})" if getattr(r, name) is not None
                        else f"{help_} (default: the checkpoint's moon3.reasoning.max_tokens)")
    for name, help_ in (("freeze_vision", "do not train the vision tower"),
                        ("grad_checkpointing", "recompute decoder layers and vision blocks in backward"),
                        ("strict", "stop at the first bad data line instead of skipping bad lines"),
                        ("resume", "continue from the newest checkpoint under --out"),
                        ("no_fire", "ablation: drop FIRE"), ("no_fusion", "ablation: drop MHMF")):
        p.add_argument("--" + name.replace("_", "-"), dest=name, action="store_true", default=None, help=help_)
    p.add_argument("--ntp-from-image", dest="ntp_from_image", type=float, nargs="?", const=1.0, default=None,
                   metavar="SHARE", help="learn the attribute text from a rendering with no title: all of "
                   "the --ntp-items, or this share of them (the rest from the product as listed)")
    p.add_argument("--no-matryoshka", dest="matryoshka", action="store_false", default=None,
                   help="InfoNCE on the full vector only")
    p.add_argument("--no-hard-negatives", dest="hard_negatives", action="store_false", default=None)
    p.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=None,
                   help="bf16 autocast (default: on CUDA)")
    p.add_argument("--pooling", choices=["emb_token", "last", "mean"], default=None, help="ablation: pooling")
    p.add_argument("--no-progress", dest="show_progress", action="store_false", default=None)


def main(args: argparse.Namespace) -> int:
    stage = getattr(args, "stage", "contrastive")
    known = {f.name for c in STAGES.values() for f in dataclasses.fields(c)}
    fields = {f.name for f in dataclasses.fields(STAGES[stage])}
    given = {k: v for k, v in vars(args).items() if k in known and v is not None}
    foreign = sorted(k for k in given if k not in fields)
    if foreign or (stage == "rl" and args.recipe):
        names = ", ".join("--" + k.replace("_", "-") for k in foreign + (["recipe"] if args.recipe else []))
        print(f"error: {names} not used by --stage {stage}", file=sys.stderr)
        return 2
    try:
        if stage == "rl":
            final = train_rl(dataclasses.replace(RLTrainConfig(), **given))
        elif args.recipe:
            from .recipes import run_recipe

            out = given.pop("out", None) or f"runs/{args.recipe}"
            final = run_recipe(args.recipe, out, **given)
        else:
            missing = [k for k in ("data", "out") if k not in given]
            if missing:
                print(f"error: --{' and --'.join(missing)} required (or --recipe NAME)", file=sys.stderr)
                return 2
            final = train(dataclasses.replace(TrainConfig(), **given))
    except RLRefused as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except TrainingStopped as err:
        print(f"error: training stopped: {err}", file=sys.stderr)
        return 3
    print(f"trained checkpoint: {final}")
    return 0
