"""The loss terms of the contrastive cold start (DESIGN.md section 5), each testable alone.

- `info_nce`: symmetric InfoNCE between query and product vectors with in-batch negatives,
  several positives allowed per row (``-log sum_pos exp(s/t) / sum_all exp(s/t)``);
- `matryoshka_info_nce`: the same over each Matryoshka prefix of the vectors;
- `next_token_loss`: cross-entropy of the attribute text written before ``<emb>``.

Rows may be a shard of the global batch (``row_offset``): each rank scores its own queries
against every gathered product and its own products against every gathered query, and the
sums are divided by the global counts, so the ranks' losses add up to the global loss.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _multi_positive_nce(scores: torch.Tensor, positives: torch.Tensor) -> torch.Tensor:
    """Per-row ``logsumexp(all) - logsumexp(positives)``; scores and positives (n, m)."""
    masked = scores.masked_fill(~positives, float("-inf"))
    return torch.logsumexp(scores, dim=-1) - torch.logsumexp(masked, dim=-1)


def info_nce(q_local: torch.Tensor, p_local: torch.Tensor, q_all: torch.Tensor, p_all: torch.Tensor,
             positives: torch.Tensor, temperature: float, row_offset: int = 0) -> torch.Tensor:
    """Symmetric InfoNCE, summed over local rows and divided by the global row count.

    q_local/p_local (n, D) this rank's L2-normalised vectors; q_all/p_all (N, D) every rank's;
    positives (N, N) bool, global; row_offset: where the local rows start in the global batch.
    On one process pass the same tensors as local and all: the result is the usual mean.
    """
    n, total = q_local.shape[0], q_all.shape[0]
    rows = positives[row_offset:row_offset + n]  # local queries vs all products
    cols = positives[:, row_offset:row_offset + n].t()  # local products vs all queries
    q_to_p = _multi_positive_nce(q_local @ p_all.t() / temperature, rows)
    p_to_q = _multi_positive_nce(p_local @ q_all.t() / temperature, cols)
    return 0.5 * (q_to_p.sum() + p_to_q.sum()) / total


def matryoshka_info_nce(q_local, p_local, q_all, p_all, positives, temperature, dims, row_offset=0):
    """Mean of `info_nce` over the Matryoshka prefixes `dims` (each truncated, then renormalised)."""
    losses = []
    for d in dims:
        f = lambda x, d=d: F.normalize(x[:, :d], dim=-1)  # noqa: E731
        losses.append(info_nce(f(q_local), f(p_local), f(q_all), f(p_all), positives, temperature, row_offset))
    return torch.stack(losses).mean()


def next_token_loss(logits: torch.Tensor, targets: torch.Tensor, total_tokens: int) -> torch.Tensor:
    """Cross-entropy of the attribute-text tokens, summed and divided by the global token count.

    logits (N, vocab): final-norm states at the positions before each target, times the
    output embeddings (the tied input embeddings or lm_head); targets (N,) token ids.
    """
    if targets.numel() == 0:
        return logits.new_zeros(())
    return F.cross_entropy(logits.float(), targets, reduction="sum") / max(total_tokens, 1)
