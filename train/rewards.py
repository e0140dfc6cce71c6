"""Rewards of the RL stage: a format term and a retrieval term per rollout (docs/RL.md).

Neither needs labels: real catalogues have none. For rollout g of item i,

    r_{i,g} = w_fmt r_fmt + w_ret r_ret (+ w_attr r_attr, ablation only; w_attr = 0 by default)

Format (`format_reward`): the reasoning text is ``field: value`` pairs separated by
``;`` or new lines ("category: t-shirt; colour: navy; ..."), followed by the end marker.

    r_fmt = budget_penalty                               if the budget ran out first
          = (1[end marker written] + n_present / n_fields) / 2   otherwise, in [0, 1]

A rollout that never writes the end marker within its budget was closed with
``{end_marker}\\n<emb>`` by the generator, so it still has an embedding and still trains;
it is just paid the penalty. Stopping on an end-of-text token instead of the marker
earns no marker half.

Retrieval (`retrieval_reward`, UME-R1's rank x margin): each rollout's embedding is
scored against the other side's rollouts in the batch (query rollouts against product
rollouts and back). With K rollouts per item on the other side, cosine similarities s,
own group P_i (the K rollouts of item i) and the others N_i:

    rank_{i,g}   = |top-K neighbours of (i, g) among all B*K  intersect  P_i| / K
    margin_{i,g} = mean_{c in P_i} s(c) - mean_{c in N_i} s(c)
    r_ret        = rank x margin

Ground truth (`attribute_reward`, ablation only): the fraction of the world's attributes
the text states correctly. Never part of the default reward.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

DEFAULT_FIELDS = ("category", "colour", "material")  # what the reasoning prompt asks for
STOPS = ("end_marker", "eos", "budget")  # moon3rt.generate's stop reasons


def parse_attributes(text: str) -> dict[str, str]:
    """``field: value`` pairs of a reasoning text (fields lower-cased; the first value wins)."""
    fields: dict[str, str] = {}
    for part in re.split(r"[;\n]", text):
        key, sep, value = part.partition(":")
        key, value = key.strip().lower(), value.strip()
        if sep and key and value and key not in fields:
            fields[key] = value
    return fields


def format_reward(texts: Sequence[str], stops: Sequence[str], fields: Sequence[str] = DEFAULT_FIELDS,
                  budget_penalty: float = -1.0) -> torch.Tensor:
    """r_fmt per rollout (module docstring): (N,) fp32 from N texts and stop reasons."""
    if len(texts) != len(stops):
        raise ValueError(f"{len(texts)} texts but {len(stops)} stop reasons")
    if not fields:
        raise ValueError("format_reward needs at least one field")
    wanted = [f.lower() for f in fields]
    out = []
    for row, (text, stop) in enumerate(zip(texts, stops)):
        if stop not in STOPS:
            raise ValueError(f"rollout {row}: unknown stop reason {stop!r} (expected one of {STOPS})")
        if stop == "budget":
            out.append(budget_penalty)
            continue
        present = parse_attributes(text)
        out.append(((stop == "end_marker") + sum(f in present for f in wanted) / len(wanted)) / 2)
    return torch.tensor(out, dtype=torch.float32)


def retrieval_reward(anchors: torch.Tensor, others: torch.Tensor, first: int = 0) -> torch.Tensor:
    """rank x margin of every anchor rollout against the other side: (B_a, G, d), (B, K, d) -> (B_a, G).

    Anchor item b is the other side's item `first + b` (a rank's share of a batch gathered
    across ranks; by default the two sides are the same items). No gradient flows through a reward.
    """
    if anchors.dim() != 3 or others.dim() != 3 or anchors.shape[2] != others.shape[2] \
            or not 0 <= first <= others.shape[0] - anchors.shape[0]:
        raise ValueError(f"rollout embeddings must be (items, rollouts, dim) on both sides, the anchors' items "
                         f"among the others' from item {first} on, with the same dim; got {tuple(anchors.shape)} "
                         f"and {tuple(others.shape)}")
    Ba, G, _ = anchors.shape
    B, K = others.shape[:2]
    if B < 2:
        raise ValueError("the retrieval reward needs at least 2 items in the batch (the others are its negatives)")
    with torch.no_grad():
        a = F.normalize(anchors.float(), dim=-1).reshape(Ba * G, -1)
        c = F.normalize(others.float(), dim=-1).reshape(B * K, -1)
        sim = a @ c.t()  # (Ba*G, B*K)
        mine = (first + torch.arange(Ba, device=sim.device)).repeat_interleave(G)
        owner = torch.arange(B, device=sim.device).repeat_interleave(K)
        own = mine[:, None] == owner[None, :]  # (Ba*G, B*K)
        top = sim.topk(K, dim=1).indices
        rank = own.gather(1, top).float().mean(dim=1)
        margin = (sim * own).sum(1) / K - (sim * ~own).sum(1) / ((B - 1) * K)
        return (rank * margin).reshape(Ba, G)


def attribute_reward(texts: Sequence[str], truths: Sequence[Mapping[str, str]]) -> torch.Tensor:
    """Ablation only: the fraction of each item's true attributes its text states (case-insensitive). (N,)."""
    if len(texts) != len(truths):
        raise ValueError(f"{len(texts)} texts but {len(truths)} ground-truth attribute sets")
    out = []
    for row, (text, truth) in enumerate(zip(texts, truths)):
        if not truth:
            raise ValueError(f"rollout {row}: no ground-truth attributes to compare with")
        said = parse_attributes(text)
        out.append(sum(said.get(k.lower(), "").lower() == str(v).lower() for k, v in truth.items()) / len(truth))
    return torch.tensor(out, dtype=torch.float32)


@dataclass(frozen=True)
class RewardConfig:
    """Weights of the reward's terms; the ground-truth term stays 0 unless an ablation asks."""

    format_weight: float = 1.0
    retrieval_weight: float = 1.0
    attribute_weight: float = 0.0  # ablation only: real catalogues have no ground truth
    fields: tuple[str, ...] = DEFAULT_FIELDS
    budget_penalty: float = -1.0


def rollout_rewards(cfg: RewardConfig, texts: Sequence[str], stops: Sequence[str], anchors: torch.Tensor,
                    others: torch.Tensor, truths: Sequence[Mapping[str, str]] | None = None,
                    first: int = 0) -> torch.Tensor:
    """r = w_fmt r_fmt + w_ret r_ret (+ w_attr r_attr) for one side's rollouts: (B_a, G).

    texts and stops are the B_a*G rollouts in row order (item b's at b*G .. b*G+G-1);
    anchors (B_a, G, d) their embeddings, others (B, K, d) the other side's, whose item
    `first + b` is anchor item b (`retrieval_reward`); truths one mapping per anchor item.
    """
    B, G = anchors.shape[:2]
    if len(texts) != B * G:
        raise ValueError(f"{len(texts)} rollout texts for {B} items x {G} rollouts")
    r = cfg.format_weight * format_reward(texts, stops, cfg.fields, cfg.budget_penalty).to(anchors.device).view(B, G)
    r = r + cfg.retrieval_weight * retrieval_reward(anchors, others, first)
    if cfg.attribute_weight:
        if truths is None or len(truths) != B:
            raise ValueError("attribute_weight > 0 (the ground-truth ablation) needs each item's true attributes")
        per_row = [t for t in truths for _ in range(G)]
        r = r + cfg.attribute_weight * attribute_reward(texts, per_row).to(anchors.device).view(B, G)
    return r
