"""One GRPO step of the RL stage on the reference model, joint with InfoNCE (docs/RL.md).

A step takes B (query, product) pairs; each side is a reasoning prompt
(`PromptBuilder.build(..., reasoning=True)`).

1. `collect`: G sampled reasoning rollouts per item and side (`moon3rt.generate` with a
   `Sampling`; an item's G rollouts share its prefill), each closed by
   ``{end_marker}\\n<emb>``, give G embeddings and the log-prob of every drawn token under
   pi_old (the weights that drew them). Rewards (`train.rewards`): format + rank x margin
   of each query rollout against the batch's product rollouts and of each product rollout
   against the query rollouts; advantages normalised within each item's group. Every
   rollout (prompt + reasoning + closing tokens) is packed for re-scoring, and the frozen
   reference scores its drawn tokens once, without gradients.
2. `objective`: the policy re-scores the packed rollouts with gradients (`Rescorer`: log
   pi_theta of each drawn token, log softmax(z / T) with the suppressed ids masked exactly
   as they were drawn, and the embedding at ``<emb>``; each prompt's images go through the
   vision tower once, shared by its G rollouts), and `train.grpo.grpo_objective`
   gives -J_GRPO over both sides' tokens + lambda InfoNCE(query rollouts, product rollouts).
3. `update`: backward, optional gradient clipping, one optimiser step.

pi_old's log-probs are the ones the draw reported: they agree with a full forward to
~1e-5 in fp32 (tests/test_sampling.py), so rho starts at 1 and several updates may reuse
one collected batch.

Distributed (torch.distributed, any backend): each rank holds an equal, contiguous share
of the batch's pairs (rank 0 the first), and passes its `Rescorer` wrapped in
`DistributedDataParallel`, which averages gradients. A step then equals one process on
the whole batch: the rows' seeds are those of their global rows, the rewards see the
whole other side (embeddings gathered), N_tok is summed over ranks while each rank's
token share is scaled by the world size, and InfoNCE runs on the whole batch gathered
with torch's autograd-aware all-gather, which hands every rank's gradient
back to the rank that owns the rollout.
"""

from __future__ import annotations

import copy
import dataclasses
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from moon3rt.batching import pack
from moon3rt.generate import Reasoned, TorchDecoder, generate
from moon3rt.model import Moon3Model, PackedBatch
from moon3rt.prompt import PreparedItem, PromptBuilder, ReasoningPlan
from moon3rt.sampling import Sampling, masked_logits

from .grpo import GRPOConfig, Objective, grpo_objective, group_advantages
from .rewards import RewardConfig, rollout_rewards


@dataclass(frozen=True)
class RLConfig:
    """The RL stage's knobs: rollouts per item, how they are drawn, the objective and the reward."""

    rollouts: int = 8  # G (UME-R1 uses 8)
    temperature: float = 1.0
    top_p: float = 1.0
    max_grad_norm: float | None = 1.0
    grpo: GRPOConfig = field(default_factory=GRPOConfig)
    rewards: RewardConfig = field(default_factory=RewardConfig)

    def __post_init__(self):
        if isinstance(self.rollouts, bool) or not isinstance(self.rollouts, int) or self.rollouts < 2:
            raise ValueError(f"RLConfig.rollouts must be an integer >= 2 (advantages compare rollouts), "
                             f"got {self.rollouts!r}")
        if not self.temperature > 0:
            raise ValueError(f"RLConfig.temperature must be > 0 (rollouts are sampled), got {self.temperature!r}")
        Sampling(self.temperature, self.top_p)  # checks top_p


def rl_problems(model: Moon3Model, prompt: PromptBuilder) -> list[str]:
    """Why this model cannot be trained by the RL stage (empty when it can)."""
    problems = prompt.reasoning_problems()  # no moon3 block, no <emb>, <emb> not pooled, no end marker
    if model.output_embeddings() is None:
        problems.append("the checkpoint has untied word embeddings but no lm_head.weight, so there are no "
                        "logits to sample reasoning from")
    return problems


def check_rl_model(model: Moon3Model, prompt: PromptBuilder, name: str = "the model") -> None:
    """Refuse, naming every reason, a checkpoint the RL stage cannot train."""
    problems = rl_problems(model, prompt)
    if problems:
        raise ValueError(f"{name} cannot be trained with --stage rl: " + "; ".join(problems))


@dataclass
class SharedImages:
    """Each prompt's images once; `index` (N_img,) maps every merged image token of the packed
    rollouts to its row of the vision tower's output on these pixels."""

    pixel_values: torch.Tensor  # (P, ...) patches of every prompt's images, prompt order (see PackedBatch)
    image_grid_thw: torch.Tensor  # (n_images, 3)
    index: torch.Tensor  # (N_img,) int64
    pixel_norm: tuple | None = None  # (mean, std) of uint8 pixel_values


class Rescorer(nn.Module):
    """Teacher-forced pass over packed rollouts: log-probs of the drawn tokens and the <emb> vectors."""

    def __init__(self, model: Moon3Model, suppressed_ids: Sequence[int], temperature: float):
        super().__init__()
        self.model, self.suppressed_ids, self.temperature = model, tuple(suppressed_ids), temperature

    def forward(self, batch: PackedBatch, predict_index: torch.Tensor, targets: torch.Tensor,
                images: SharedImages | None = None):
        """predict_index (N_tok,): packed index of the state that drew each target (N_tok,).
        `images`: the rollouts' images, each run once through the vision tower and shared by
        the rollouts that repeat it (then `batch` carries no pixels).
        Returns (log-probs (N_tok,) fp32, vectors (rows, out) fp32 un-normalised)."""
        vision = None
        if images is None and batch.pixel_values is None and int(batch.cu_images[-1]) > 0:
            raise ValueError("the batch has image tokens but no pixels: pass its `images` (RolloutBatch.images)")
        if images is not None:
            z, v = self.model.visual(images.pixel_values, images.image_grid_thw, images.pixel_norm)
            vision = (z[images.index], v[images.index])
        h, v = self.model.hidden_states(batch, vision=vision)
        logits = masked_logits(self.model.output_embeddings(), h[predict_index], self.suppressed_ids)
        logp = torch.log_softmax(logits / self.temperature, dim=-1).gather(-1, targets[:, None]).squeeze(1)
        return logp, self.model.heads(self.model.pool(h, batch), v, batch)


def continued(item: PreparedItem, tokens: Sequence[int]) -> PreparedItem:
    """The prompt with `tokens` appended at consecutive positions, pooled at its last token."""
    start = int(item.position_ids.max()) + 1 if item.num_tokens else 0
    positions = np.broadcast_to(np.arange(start, start + len(tokens), dtype=np.int64), (3, len(tokens)))
    return PreparedItem(
        input_ids=np.concatenate([item.input_ids, np.asarray(tokens, dtype=np.int64)]),
        position_ids=np.concatenate([item.position_ids, positions], axis=1),
        title_positions=item.title_positions, pool_position=item.num_tokens + len(tokens) - 1,
        images=item.images, truncated=item.truncated,
    )


@dataclass
class RolloutBatch:
    """One step's collected rollouts, ready to be re-scored: rows are the B*G query rollouts,
    then the B*G product rollouts."""

    batch: PackedBatch  # every rollout: prompt + reasoning + {end_marker}\n<emb> (pixels in `images`)
    images: SharedImages | None  # the prompts' images, once each (None: text only)
    predict_index: torch.Tensor  # (N_tok,) packed index of the state that drew each token
    targets: torch.Tensor  # (N_tok,) the drawn tokens
    token_rows: torch.Tensor  # (N_tok,) the row each token belongs to
    old_logp: torch.Tensor  # (N_tok,) log pi_old, as drawn
    ref_logp: torch.Tensor  # (N_tok,) log pi_ref
    advantages: torch.Tensor  # (2*B*G,)
    rewards: torch.Tensor  # (2, B, G): query side, product side
    num_tokens: int  # N_tok over every rank
    items: int  # B on this rank
    rollouts: int  # G
    texts: list[str]  # per row
    stops: list[str]  # per row
    seconds: float  # time spent drawing the rollouts
    drawn_tokens: int  # tokens drawn on this rank


def _world() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_world_size(), torch.distributed.get_rank()
    return 1, 0


def _gather(t: torch.Tensor) -> torch.Tensor:
    """Every rank's `t`, concatenated in rank order along dim 0 (no gradient)."""
    world, _ = _world()
    if world == 1:
        return t
    parts = [torch.empty_like(t) for _ in range(world)]
    torch.distributed.all_gather(parts, t.contiguous())
    return torch.cat(parts)


def _gather_with_grad(t: torch.Tensor) -> torch.Tensor:
    """`_gather` whose backward sums every rank's gradient into the owner's share."""
    world, _ = _world()
    if world == 1:
        return t
    from torch.distributed import _functional_collectives as collectives  # torch's autograd-aware gather

    gather = getattr(collectives, "all_gather_single_autograd", None) or collectives.all_gather_tensor_autograd
    return gather(t.contiguous(), 0, torch.distributed.group.WORLD)


def _rows(result: Reasoned, plan: ReasoningPlan):
    """Each row's re-scored sequence tail (reasoning + closing tokens) and drawn tokens."""
    return [(tokens + list(plan.close_ids), drawn) for tokens, drawn in zip(result.tokens, result.sampled)]


@torch.no_grad()
def collect(policy: Moon3Model, reference: Rescorer, prompt: PromptBuilder, queries: Sequence[PreparedItem],
            products: Sequence[PreparedItem], plan: ReasoningPlan, cfg: RLConfig, seed: int,
            truths: Sequence[Mapping[str, str]] | None = None, decoder=None) -> RolloutBatch:
    """Draw, reward and package one step's rollouts (module docstring, step 1).

    queries[b] and products[b] are pair b; `seed` makes the draw reproducible (one per
    step); `truths` (one attribute mapping per pair) only feeds the ground-truth ablation;
    `decoder` draws the rollouts (default: the policy's plain-torch `TorchDecoder`; a
    `TritonBackend` over the same weights decodes with the fused kernels).
    """
    world, rank = _world()
    B, G = len(queries), cfg.rollouts
    if B == 0 or len(products) != B:
        raise ValueError(f"a step needs as many products as queries (at least one), got {len(queries)} queries "
                         f"and {len(products)} products")
    device = next(policy.parameters()).device
    shares = _gather(torch.tensor([B], device=device)).tolist()  # on the device: NCCL gathers nothing else
    if len(set(shares)) != 1:
        raise ValueError(f"every rank needs the same number of pairs per step, got {shares}")
    total, first = B * world, B * rank
    seeds = Sampling(cfg.temperature, cfg.top_p, seed).seeds(2 * total * G)
    decoder, weight = decoder or TorchDecoder(policy, device), policy.output_embeddings()
    started = time.perf_counter()
    sides = []
    for side, prepared in enumerate((queries, products)):
        lo = side * total * G + first * G
        sampling = Sampling(cfg.temperature, cfg.top_p, row_seeds=seeds[lo : lo + B * G])
        sides.append(generate(decoder, pack(list(prepared), policy.cfg.vision.spatial_merge_size), plan, weight,
                              sampling, G))
    seconds = time.perf_counter() - started

    texts = [[prompt.tokenizer.decode(t, skip_special_tokens=True) for t in r.tokens] for r in sides]
    vectors = [r.vectors.view(B, G, -1) for r in sides]
    everyone = [_gather(v) for v in vectors]
    rewards = torch.stack([
        rollout_rewards(cfg.rewards, texts[s], sides[s].stops, vectors[s], everyone[1 - s], truths, first)
        for s in (0, 1)
    ])
    advantages = torch.cat([group_advantages(rewards[0]).flatten(), group_advantages(rewards[1]).flatten()])

    items, predict, targets, rows, old = [], [], [], [], []
    start = 0
    for s, prepared in enumerate((queries, products)):
        for r, (tail, drawn) in enumerate(_rows(sides[s], plan)):
            item = prepared[r // G]
            row = s * B * G + r
            predict.extend(range(start + item.num_tokens - 1, start + item.num_tokens - 1 + len(drawn)))
            targets.extend(drawn)
            rows.extend([row] * len(drawn))
            old.extend(sides[s].logprobs[r])
            items.append(continued(item, tail))
            start += items[-1].num_tokens
    merge = policy.cfg.vision.spatial_merge_size
    batch, images = pack(items, merge), None
    prompts = pack(list(queries) + list(products), merge)  # each prompt's images once
    if prompts.pixel_values is not None:
        cu = prompts.cu_images.tolist()
        owners = [s * B + r // G for s in (0, 1) for r in range(B * G)]  # the prompt of every row
        index = torch.cat([torch.arange(cu[i], cu[i + 1]) for i in owners])
        images = SharedImages(prompts.pixel_values.to(device), prompts.image_grid_thw.to(device), index.to(device),
                              prompts.pixel_norm)
        batch = dataclasses.replace(batch, pixel_values=None, image_grid_thw=None, pixel_norm=None)
    batch = batch.to(device)
    as_long = {"dtype": torch.int64, "device": device}
    predict_index, targets = torch.tensor(predict, **as_long), torch.tensor(targets, **as_long)
    ref_logp, _ = reference(batch, predict_index, targets, images)
    num_tokens = int(_gather(torch.tensor([len(targets)], device=device)).sum())
    return RolloutBatch(
        batch, images, predict_index, targets, torch.tensor(rows, **as_long),
        torch.tensor(old, dtype=torch.float32, device=device), ref_logp.float(), advantages.to(device), rewards,
        num_tokens, B, G, texts[0] + texts[1], sides[0].stops + sides[1].stops, seconds, len(targets),
    )


def objective(rescorer: nn.Module, rollouts: RolloutBatch, cfg: RLConfig) -> Objective:
    """The joint objective of the collected rollouts under the current policy (step 2)."""
    world, _ = _world()
    logp, vectors = rescorer(rollouts.batch, rollouts.predict_index, rollouts.targets, rollouts.images)
    B, G = rollouts.items, rollouts.rollouts
    queries = _gather_with_grad(vectors[: B * G].view(B, G, -1))
    products = _gather_with_grad(vectors[B * G :].view(B, G, -1))
    # this rank's token share times the world size: DDP's gradient average then sums the shares
    return grpo_objective(logp, rollouts.old_logp, rollouts.ref_logp, rollouts.advantages, rollouts.token_rows,
                          cfg.grpo, num_tokens=rollouts.num_tokens / world, query_embeddings=queries,
                          product_embeddings=products)


def update(rescorer: nn.Module, optimizer: torch.optim.Optimizer, rollouts: RolloutBatch, cfg: RLConfig) -> Objective:
    """One optimiser step on the collected rollouts (step 3); the terms are this step's, before it.

    A non-finite objective on any rank raises `FloatingPointError` on every rank before any
    weight changes."""
    optimizer.zero_grad(set_to_none=True)
    terms = objective(rescorer, rollouts, cfg)
    bad = torch.tensor([0.0 if torch.isfinite(terms.loss) else 1.0], device=terms.loss.device)
    if _world()[0] > 1:  # every rank stops, or the others would wait in backward's all-reduce
        torch.distributed.all_reduce(bad)
    if bad.item():
        where = "" if not torch.isfinite(terms.loss) else " on this rank, non-finite on another"
        raise FloatingPointError(f"the RL objective is {terms.loss.item()}{where} (surrogate "
                                 f"{terms.surrogate.item()}, kl {terms.kl.item()}, nce {terms.nce.item()}): "
                                 f"the step is not applied")
    terms.loss.backward()
    if cfg.max_grad_norm is not None:
        torch.nn.utils.clip_grad_norm_(rescorer.parameters(), cfg.max_grad_norm)
    optimizer.step()
    return terms


def frozen_reference(policy: Moon3Model, cfg: RLConfig, suppressed_ids: Sequence[int]) -> Rescorer:
    """pi_ref: a copy of the policy as the RL stage starts, never updated."""
    reference = copy.deepcopy(policy).eval().requires_grad_(False)
    return Rescorer(reference, suppressed_ids, cfg.temperature)
