"""The RL stage's loop: GRPO + InfoNCE steps from a data directory (docs/RL.md).

    python -m moon3rt train --stage rl --model runs/sft/final --data runs/world/train --out runs/rl
    torchrun --nproc-per-node 2 -m moon3rt train --stage rl ...        # DDP (gloo on CPUs, NCCL on GPUs)

Each step draws its B pairs from (seed, step) alone (`data.sample_pairs`), every rank takes
its contiguous share, both sides get reasoning prompts, and `grpo_step.collect` draws G
rollouts per item with a seed made from (seed, step); `grpo_step.update` then runs
`updates` optimiser steps on them. The reference pi_ref is the `--model` checkpoint as
loaded, made once, also when a run resumes. Checkpoints, ``--resume`` and the stop on a
non-finite objective are the contrastive loop's (`loop.resume`, `loop.save_step`, `loop.save_final`,
`loop.TrainingStopped`).
"""

from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from moon3rt.prompt import PromptBuilder, load_tokenizer

from . import distributed
from .data import Preparer, read_dataset, sample_pairs
from .grpo import GRPOConfig
from .grpo_step import RLConfig, Rescorer, check_rl_model, collect, frozen_reference, update
from .loop import TrainingStopped, base_model, make_optimizer, plot_losses, resume, save_final, save_step, \
    tokenizer_path
from .rewards import RewardConfig

CURVES = ("reward", "objective", "kl", "nce")  # what rl.png plots


class RLRefused(ValueError):
    """The model or the options cannot run the RL stage; the message names every reason."""


@dataclass
class RLTrainConfig:
    """The RL stage's run: base checkpoint, data, the step's knobs (`RLConfig`) and the schedule."""

    model: str = ""  # the SFT checkpoint directory (a preset starts from random weights)
    data: str = ""
    out: str = ""
    steps: int = 200
    batch_size: int = 8  # query-product pairs per step, over all ranks
    rollouts: int = 8  # G per item and side
    temperature: float = 1.0  # sampling temperature of the rollouts
    top_p: float = 1.0
    max_reasoning_tokens: int | None = None  # None: the checkpoint's moon3.reasoning.max_tokens
    eps_low: float = 0.2
    eps_high: float = 0.28
    beta: float = 0.04  # weight of the k3 KL to the reference
    nce_weight: float = 1.0  # lambda (0: no joint InfoNCE term)
    nce_temperature: float = 0.02
    attribute_weight: float = 0.0  # ablation only: reward stating the ground-truth attributes
    updates: int = 1  # optimiser steps per collected batch
    lr: float = 1e-5
    warmup: int = 0
    min_lr_ratio: float = 1.0  # 1: constant learning rate after the warm-up
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    hard_negatives: bool = True
    seed: int = 0
    save_every: int = 50
    keep: int = 2
    log_every: int = 1
    max_minutes: float | None = None  # stop (and save) once this much wall time has passed
    strict: bool = False
    resume: bool = False
    show_progress: bool = True

    def rl_config(self) -> RLConfig:
        """The step's settings; `RLRefused` naming the option when one is out of range."""
        try:
            if isinstance(self.updates, bool) or not isinstance(self.updates, int) or self.updates < 1:
                raise ValueError(f"updates must be an integer >= 1, got {self.updates!r}")
            return RLConfig(rollouts=self.rollouts, temperature=self.temperature, top_p=self.top_p,
                            max_grad_norm=self.max_grad_norm,
                            grpo=GRPOConfig(eps_low=self.eps_low, eps_high=self.eps_high, beta=self.beta,
                                            nce_weight=self.nce_weight, nce_temperature=self.nce_temperature),
                            rewards=RewardConfig(attribute_weight=self.attribute_weight))
        except ValueError as err:
            raise RLRefused(f"--stage rl: {err}") from None


def step_seed(seed: int, step: int) -> int:
    """The rollouts' seed of step `step`: a function of (seed, step) alone, so a run resumes exactly."""
    return int(np.random.SeedSequence([seed, step]).generate_state(1)[0])


def train_rl(cfg: RLTrainConfig) -> Path:
    """Run the RL stage; returns ``out/final``. Raises `RLRefused` before any work for a model
    that cannot reason, `TrainingStopped` on a non-finite objective."""
    rank, world, device = distributed.setup()
    try:
        return _train_rl(cfg, rank, world, device)
    finally:
        distributed.teardown()


def _train_rl(cfg: RLTrainConfig, rank: int, world: int, device: torch.device) -> Path:
    if not (cfg.model and cfg.data and cfg.out):
        raise RLRefused("--stage rl needs --model (the SFT checkpoint), --data and --out")
    rl = cfg.rl_config()
    out = Path(cfg.out)
    policy = base_model(cfg.model, device, cfg.seed)
    tok_path = tokenizer_path(cfg.model)
    prompt = PromptBuilder(policy.cfg, load_tokenizer(tok_path))
    try:
        check_rl_model(policy, prompt, name=cfg.model)
        plan = prompt.reasoning_plan()
        if cfg.max_reasoning_tokens is not None:
            plan = plan.with_budget(cfg.max_reasoning_tokens)
    except ValueError as err:
        raise RLRefused(str(err)) from None
    problem = prompt.budget_problem(plan)
    if problem is not None:
        raise RLRefused(f"--stage rl with {cfg.model}: {problem} (--max-reasoning-tokens)")
    data = read_dataset(cfg.data, strict=cfg.strict)
    pairs = min(cfg.batch_size, len(data.trainable))
    if pairs < 2 or pairs % world:
        raise RLRefused(f"--stage rl: a step needs at least 2 pairs (the others are the retrieval reward's "
                        f"negatives), a multiple of the number of processes ({world}); --batch-size "
                        f"{cfg.batch_size} with {len(data.trainable)} products that have queries gives {pairs}")
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        for problem in data.problems:
            print(f"skipped: {problem}")
        (out / "train_config.json").write_text(json.dumps({"stage": "rl", **dataclasses.asdict(cfg)}, indent=2)
                                               + "\n")
    preparer = Preparer(prompt)
    reference = frozen_reference(policy, rl, plan.suppressed_ids)  # the model as loaded, also on resume
    optimizer, scheduler = make_optimizer(policy, cfg)
    start, last_good = 0, None
    if cfg.resume:
        try:
            start, last_good = resume(out, policy, optimizer, scheduler, device, stage="rl")
        except ValueError as err:
            raise RLRefused(str(err)) from None
    if rank == 0 and last_good is not None:
        print(f"resumed from {last_good} (step {start})")
    rescorer: nn.Module = Rescorer(policy, plan.suppressed_ids, rl.temperature)
    if world > 1:
        rescorer = nn.parallel.DistributedDataParallel(rescorer, device_ids=[device.index] if device.type == "cuda"
                                                       else None, find_unused_parameters=True)
    log_path, began = out / "log.jsonl", time.perf_counter()
    plot = lambda: _plot(log_path, out)  # noqa: E731
    bar = tqdm(total=cfg.steps, initial=start, disable=not (cfg.show_progress and rank == 0), desc="rl",
               unit="step")
    share = pairs // world
    step = start
    while step < cfg.steps:
        t0 = time.perf_counter()
        chosen = sample_pairs(data, pairs, cfg.seed, step, cfg.hard_negatives)
        mine = slice(rank * share, (rank + 1) * share)
        queries = [preparer.item(data.queries[i], reasoning=True) for i in chosen.queries[mine]]
        products = [data.products[i] for i in chosen.products[mine]]
        truths = [p.attributes or {} for p in products] if cfg.attribute_weight else None
        rollouts = collect(policy, reference, prompt, queries, [preparer.item(p, reasoning=True) for p in products],
                           plan, rl, step_seed(cfg.seed, step), truths)
        for u in range(cfg.updates):
            try:
                terms = update(rescorer, optimizer, rollouts, rl)
            except FloatingPointError as err:
                bar.close()
                where = f"the last good checkpoint is {last_good}" if last_good else "no checkpoint was saved yet"
                raise TrainingStopped(f"non-finite objective at step {step} (update {u}): {err}; {where}") from None
            if u == 0:
                first = terms  # the objective of the step's rollouts before it
        lr = scheduler.get_last_lr()[0]
        scheduler.step()
        step += 1
        row = {"step": step, **_log_row(rollouts, first, world), "lr": lr,
               "step_s": round(time.perf_counter() - t0, 3), "elapsed_s": round(time.perf_counter() - began, 1)}
        bar.set_postfix(reward=f"{row['reward']:.3f}", objective=f"{row['objective']:.3f}", kl=f"{row['kl']:.2e}",
                        tok_s=f"{row['rollout_tokens_per_s']:.0f}")
        bar.update(1)
        if rank == 0 and (step % cfg.log_every == 0 or step == cfg.steps or step == start + 1):
            with open(log_path, "a", encoding="utf-8") as f:
                f.write(json.dumps(row) + "\n")
        out_of_time = cfg.max_minutes is not None and (time.perf_counter() - began) / 60 > cfg.max_minutes
        if step % cfg.save_every == 0 or step == cfg.steps or out_of_time:
            state = {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "step": step,
                     "config": {"stage": "rl", **dataclasses.asdict(cfg)}}
            last_good = save_step(policy, out, step, tok_path, state, cfg.keep, rank, world, plot)
        if out_of_time:
            if rank == 0:
                print(f"stopping at step {step}: --max-minutes {cfg.max_minutes} reached")
            break
    bar.close()
    return save_final(policy, out, tok_path, rank, world, plot)


def _log_row(rollouts, terms, world: int) -> dict:
    """The step's figures over every rank: mean rewards per side, the objective's terms, rollout speed."""
    r = rollouts.rewards.detach().float().cpu()
    n = distributed.all_sum(r[0].numel())
    sums = {"reward_query": distributed.all_sum(r[0].sum().item()) / n,
            "reward_product": distributed.all_sum(r[1].sum().item()) / n}
    closed = distributed.all_sum(sum(s == "end_marker" for s in rollouts.stops)) / (2 * n)
    per_rank = {"objective": terms.loss, "surrogate": terms.surrogate, "kl": terms.kl, "nce": terms.nce,
                "clip_fraction": terms.clip_fraction}
    means = {k: distributed.all_sum(v.item()) / world for k, v in per_rank.items()}  # the batch's, as in DDP
    tokens = distributed.all_sum(rollouts.drawn_tokens)
    seconds = distributed.all_sum(rollouts.seconds) / world
    sums["reward"] = (sums["reward_query"] + sums["reward_product"]) / 2  # both sides have n rollouts
    return {**{k: round(v, 6) for k, v in sums.items()},
            **{k: round(v, 6) for k, v in means.items()}, "closed": round(closed, 4),
            "rollout_tokens": int(tokens), "rollout_tokens_per_s": round(tokens / max(seconds, 1e-9), 1)}


def _plot(log: Path, out: Path) -> None:
    if log.exists():
        plot_losses(log, out / "rl.png", CURVES, ylabel="value", log_scale=False, title="moon3rt RL stage")
