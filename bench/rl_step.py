"""Throughput of the RL stage's step (train/grpo_step.py): rollout tokens/s and items/s.

One step on B (query, product) pairs: G sampled rollouts per item and side with a shared
prefill (`collect`: the draw, the rewards, the reference's scoring), then the policy's
re-scoring with gradients and one optimiser step (`update`). Products are the standard
workload's items (bench/workload.py: one photo + a title), queries short attribute
texts. Timed after one warm-up step; reported per phase: seconds, drawn tokens/s during
the draw, items/s (queries + products), pairs/s and rollouts/s for the whole step, peak
memory on CUDA.

Default: ``moon3-tiny`` in fp32 on the CPU (224 px images, 1 torch thread: per-core
figures); ``moon3-2b`` in bf16 on CUDA (448 px, the real shapes). The tiny preset gets an
untied random LM head, so its rollouts are not one repeated token; a checkpoint path is
used as it is (it must be able to reason: `check_rl_model`).

    python bench/rl_step.py                                # moon3-tiny, CPU
    python bench/rl_step.py --model moon3-2b --device cuda --pairs 8 --rollouts 8 --max-tokens 64
"""

from __future__ import annotations

import argparse
import datetime as dt
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # sibling modules, however this file is loaded

import reporting  # noqa: E402
import workload  # noqa: E402

import moon3rt  # noqa: E402
from moon3rt.api import TINY_TOKENIZER, Encoder, resolve_device, resolve_dtype  # noqa: E402
from moon3rt.config import PRESETS, Moon3Config  # noqa: E402
from moon3rt.model import random_model  # noqa: E402
from moon3rt.prompt import load_tokenizer  # noqa: E402
from moon3rt.train.grpo_step import RLConfig, Rescorer, check_rl_model, collect, frozen_reference, update  # noqa: E402

QUERY_WORDS = ("red cotton t-shirt", "navy ceramic mug", "black leather sneaker", "beige canvas backpack",
               "burgundy wool t-shirt", "white ceramic mug", "sky blue suede sneaker", "charcoal linen backpack")


def build_encoder(name: str, device: torch.device, dtype: torch.dtype) -> Encoder:
    if name in PRESETS:
        cfg = Moon3Config.from_name(name)
        cfg.text.tie_word_embeddings = False
        model = random_model(cfg, seed=0, device=device, dtype=dtype, lm_head=True)
        return Encoder(model, load_tokenizer(TINY_TOKENIZER), device, dtype)
    return moon3rt.load(name, device=device, dtype=dtype)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=None, help="preset or checkpoint (default: moon3-2b on CUDA, moon3-tiny on CPU)")
    p.add_argument("--device", default=None)
    p.add_argument("--dtype", default=None)
    p.add_argument("--pairs", type=int, default=4, help="B (query, product) pairs per step")
    p.add_argument("--rollouts", type=int, default=8, help="G rollouts per item and side")
    p.add_argument("--max-tokens", type=int, default=32, help="reasoning budget per rollout")
    p.add_argument("--image-size", type=int, default=None)
    p.add_argument("--steps", type=int, default=2, help="timed steps (after one warm-up)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", type=Path, default=None, help="write the JSON report here")
    args = p.parse_args(argv)

    device = resolve_device(args.device)
    cuda = device.type == "cuda"
    if not cuda:
        torch.set_num_threads(args.threads)
    dtype = resolve_dtype(args.dtype, device)
    name = args.model or ("moon3-2b" if cuda else "moon3-tiny")
    image_size = args.image_size or (448 if cuda else 224)
    encoder = build_encoder(name, device, dtype)
    check_rl_model(encoder.model, encoder.prompt, name)
    cfg = RLConfig(rollouts=args.rollouts)
    plan = encoder.reasoning_plan(args.max_tokens)
    products = workload.make_items(args.pairs, image_size, encoder.prompt.tokenizer, 32)
    queries = [encoder.prepare(QUERY_WORDS[i % len(QUERY_WORDS)], i, reasoning=True) for i in range(args.pairs)]
    products = [encoder.prepare(item, i, reasoning=True) for i, item in enumerate(products)]
    policy = encoder.model
    reference = frozen_reference(policy, cfg, plan.suppressed_ids)
    rescorer = Rescorer(policy, plan.suppressed_ids, cfg.temperature)
    optimizer = torch.optim.AdamW(policy.parameters(), lr=1e-6)

    def sync():
        if cuda:
            torch.cuda.synchronize(device)

    runs = []
    for step in range(args.steps + 1):
        sync()
        t0 = time.perf_counter()
        rollouts = collect(policy, reference, encoder.prompt, queries, products, plan, cfg, seed=step)
        sync()
        t1 = time.perf_counter()
        update(rescorer, optimizer, rollouts, cfg)
        sync()
        t2 = time.perf_counter()
        if step:  # the first step warms up
            runs.append({"draw_s": rollouts.seconds, "collect_s": t1 - t0, "update_s": t2 - t1, "step_s": t2 - t0,
                         "drawn_tokens": rollouts.drawn_tokens,
                         "rescored_tokens": int(rollouts.batch.input_ids.numel()),
                         "stops": {s: rollouts.stops.count(s) for s in set(rollouts.stops)}})
    mean = {k: sum(r[k] for r in runs) / len(runs) for k in ("draw_s", "collect_s", "update_s", "step_s",
                                                              "drawn_tokens", "rescored_tokens")}
    rows = 2 * args.pairs * args.rollouts
    report = {
        "schema": "moon3rt-bench-rl-step/1",
        "timestamp": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "environment": reporting.environment(device),
        "config": {"model": name, "dtype": str(dtype).removeprefix("torch."), "pairs": args.pairs,
                   "rollouts": args.rollouts, "max_tokens": args.max_tokens, "image_size": image_size,
                   "steps": args.steps, "threads": torch.get_num_threads() if not cuda else None},
        "mean": mean,
        "rollout_tokens_per_s": mean["drawn_tokens"] / mean["draw_s"],
        "pairs_per_s": args.pairs / mean["step_s"],
        "items_per_s": 2 * args.pairs / mean["step_s"],  # queries and products: each rolls out G times
        "rollouts_per_s": rows / mean["step_s"],
        "peak_memory_mib": torch.cuda.max_memory_allocated(device) / 2**20 if cuda else None,
        "steps": runs,
    }
    env = report["environment"]
    print(f"RL step: {name} {report['config']['dtype']} on {env['device_name']} ({env['device']}), "
          f"torch {env['torch']}, commit {env['git_commit']}")
    print(f"  B={args.pairs} pairs x 2 sides x G={args.rollouts} rollouts, budget {args.max_tokens} tokens, "
          f"{image_size}px product images")
    print(reporting.table(
        ["phase", "seconds", "per step"],
        [["draw (generate)", f"{mean['draw_s']:.3f}", f"{mean['drawn_tokens']:.0f} drawn tokens"],
         ["collect (draw + rewards + reference)", f"{mean['collect_s']:.3f}", ""],
         ["update (re-score + backward + step)", f"{mean['update_s']:.3f}", f"{mean['rescored_tokens']:.0f} tokens"],
         ["step", f"{mean['step_s']:.3f}", f"{rows} rollouts"]]))
    print(f"  rollout tokens/s (draw): {report['rollout_tokens_per_s']:.1f}   items/s: {report['items_per_s']:.3f} "
          f"({report['pairs_per_s']:.3f} pairs/s)   rollouts/s: {report['rollouts_per_s']:.2f}")
    if args.out:
        reporting.write_json(args.out, report)
    return report


if __name__ == "__main__":
    main()
