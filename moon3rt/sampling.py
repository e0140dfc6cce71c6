"""Sampled decoding for reasoning rollouts: temperature, nucleus (top-p), one seed per row.

Inference reasons greedily (`moon3rt.generate.greedy_tokens`). Reinforcement learning
(docs/RL.md) needs G different reasoning texts per item instead, drawn from the policy,
reproducibly, together with the log-probability of every drawn token. For one row with
logits z (V,) (suppressed ids at -inf), temperature T > 0 and nucleus mass top_p:

    p = softmax(z / T)
    N = the most probable tokens, in descending order of p, while the mass before a
        token is < top_p (the smallest set that reaches top_p; the first token always)
    token = argmax_{i in N} (log p_i - log E_i),   E_i ~ Exp(1) from the row's generator

The exponential race picks i with probability p_i / sum_{j in N} p_j (the Gumbel-max
trick: -log E is Gumbel noise), so no renormalisation is needed. T = 0 is greedy: the
argmax of z (ties: the first index), as inference does. The returned log-probability is
log softmax(z / T)[token] over the whole vocabulary (T = 1 when T = 0): the policy's
probability, which GRPO's ratio compares with the re-scored one; top-p filters the draw,
it is not part of the policy (the common convention).

Every row owns a `torch.Generator` seeded from (seed, row) through NumPy's
`SeedSequence`, so its noise depends on the seed and its row alone: the same rollout
comes out whatever else is in the batch, and rows get independent streams. Each drawn
token consumes V exponentials of its row's stream, so a rollout replays exactly when
re-run with the same seed. `Sampling.row_seeds` pins the seeds of the rows explicitly.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class Sampling:
    """How rollouts are drawn: temperature (0 = greedy), nucleus mass top_p, seed."""

    temperature: float = 1.0
    top_p: float = 1.0
    seed: int = 0
    row_seeds: tuple[int, ...] | None = None  # one seed per output row, overriding `seed`

    def __post_init__(self):
        t, p = self.temperature, self.top_p
        if isinstance(t, bool) or not isinstance(t, (int, float)) or not math.isfinite(t) or t < 0:
            raise ValueError(f"temperature must be a finite number >= 0 (0 is greedy), got {t!r}")
        if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0 < p <= 1:
            raise ValueError(f"top_p must be a number in (0, 1], got {p!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise ValueError(f"seed must be an integer >= 0, got {self.seed!r}")
        if self.row_seeds is not None:
            object.__setattr__(self, "row_seeds", tuple(int(s) for s in self.row_seeds))

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def seeds(self, rows: int) -> list[int]:
        """The generator seed of each of `rows` output rows."""
        if self.row_seeds is not None:
            if len(self.row_seeds) != rows:
                raise ValueError(f"row_seeds has {len(self.row_seeds)} seeds for {rows} rollout rows")
            return list(self.row_seeds)
        return [int(np.random.SeedSequence([self.seed, row]).generate_state(1, np.uint64)[0]) for row in range(rows)]


def masked_logits(lm_weight: torch.Tensor, h: torch.Tensor, suppressed_ids: Sequence[int]) -> torch.Tensor:
    """fp32 logits h @ W^T (the product in h's dtype, as greedy decoding), suppressed ids at -inf. (n, V)."""
    logits = F.linear(h, lm_weight).float()
    if suppressed_ids:
        logits[:, list(suppressed_ids)] = float("-inf")
    return logits


def nucleus_mask(probs: torch.Tensor, top_p: float) -> torch.Tensor:
    """Boolean (n, V): the smallest set of most probable tokens whose mass reaches top_p.

    A token is kept when the mass of the tokens ranked before it is < top_p; the most
    probable token always is. Equal probabilities rank by index (a stable sort).
    """
    if top_p >= 1:
        return probs > 0
    order = torch.sort(probs, dim=-1, descending=True, stable=True).indices
    sorted_probs = probs.gather(-1, order)
    before = torch.cumsum(sorted_probs, dim=-1) - sorted_probs
    keep_sorted = before < top_p
    keep_sorted[:, 0] = True
    return torch.zeros_like(keep_sorted).scatter(-1, order, keep_sorted) & (probs > 0)


class Sampler:
    """Draws one token per active row from its logits, each row from its own generator."""

    def __init__(self, sampling: Sampling, rows: int, device: torch.device | str):
        self.sampling = sampling
        self.generators = [torch.Generator(device=device).manual_seed(s) for s in sampling.seeds(rows)]

    def __call__(self, logits: torch.Tensor, rows: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """logits (A, V) fp32 of rows `rows` -> (tokens (A,) int64, log-probs (A,) fp32)."""
        s = self.sampling
        if s.greedy:
            tokens = logits.argmax(dim=-1)
            return tokens, torch.log_softmax(logits, dim=-1).gather(-1, tokens[:, None]).squeeze(1)
        logp = torch.log_softmax(logits / s.temperature, dim=-1)
        noise = torch.empty_like(logp)
        for a, row in enumerate(rows):
            noise[a].exponential_(generator=self.generators[row])
        keep = nucleus_mask(logp.exp(), s.top_p)
        race = torch.where(keep, logp - noise.log(), float("-inf"))
        tokens = race.argmax(dim=-1)
        return tokens, logp.gather(-1, tokens[:, None]).squeeze(1)
