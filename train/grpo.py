"""The joint GRPO + InfoNCE objective of the RL stage, one testable function per term (docs/RL.md).

For each item i of a batch the policy pi_theta writes G reasoning rollouts o_{i,1..G}
(drawn by pi_old, the weights that sampled them), each closed by ``<emb>``, whose state
gives the rollout's embedding. With a reward r_{i,g} per rollout (`train.rewards`):

    A_{i,g}       = (r_{i,g} - mean_g r_{i,.}) / (std_g r_{i,.} + eps)         group advantage
                    (0 when the group's rewards are all equal; std without Bessel's correction)
    rho_{i,g,t}   = pi_theta(o_t | prefix) / pi_old(o_t | prefix)              policy ratio
    S_{i,g,t}     = min(rho A, clip(rho, 1 - eps_low, 1 + eps_high) A)         clipped surrogate
    K_{i,g,t}     = pi_ref / pi_theta - log(pi_ref / pi_theta) - 1             k3 KL estimator
    J_GRPO        = (1 / N_tok) sum_{i,g,t} (S_{i,g,t} - beta K_{i,g,t})       token-level mean
    L             = -J_GRPO + lambda L_InfoNCE(rollout embeddings)

N_tok counts the drawn tokens of every rollout of the batch (across ranks in a
distributed run), so a long rollout weighs in per token, not per sequence (DAPO's
token-level normalisation). Asymmetric clipping (eps_low 0.2, eps_high 0.28, DAPO)
leaves more room to raise an unlikely token than to suppress one. k3 (Schulman's
estimator, as DeepSeekMath's GRPO) is non-negative, zero when pi_theta = pi_ref, and
unbiased for KL(pi_theta || pi_ref) under tokens drawn from pi_theta.

Tokens are packed: a batch's drawn tokens form flat (N_tok,) tensors and `token_rows`
(N_tok,) names the rollout (row b*G + g) each token belongs to, as moon3rt packs items.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class GRPOConfig:
    """The objective's coefficients (defaults: DAPO's clip range, UME-R1's InfoNCE temperature)."""

    eps_low: float = 0.2
    eps_high: float = 0.28
    beta: float = 0.04  # weight of the k3 KL to the frozen reference
    nce_weight: float = 1.0  # lambda: weight of InfoNCE on the rollouts' embeddings
    nce_temperature: float = 0.02
    advantage_eps: float = 1e-4

    def __post_init__(self):
        for name in ("eps_low", "eps_high", "beta", "nce_weight", "advantage_eps"):
            if not getattr(self, name) >= 0:
                raise ValueError(f"GRPOConfig.{name} must be >= 0, got {getattr(self, name)!r}")
        if not 0 <= self.eps_low < 1:
            raise ValueError(f"GRPOConfig.eps_low must be in [0, 1), got {self.eps_low!r}")
        if not self.nce_temperature > 0:
            raise ValueError(f"GRPOConfig.nce_temperature must be > 0, got {self.nce_temperature!r}")


def group_advantages(rewards: torch.Tensor, eps: float = 1e-4) -> torch.Tensor:
    """A = (r - mean_g r) / (std_g r + eps) within each group; rewards (B, G) -> (B, G) fp32.

    A group whose rewards are all equal (every rollout as good as the others) gets exactly
    zero advantage: it teaches nothing, and nothing is divided by zero.
    """
    if rewards.dim() != 2:
        raise ValueError(f"rewards must be (items, rollouts), got shape {tuple(rewards.shape)}")
    r = rewards.float()
    if not torch.isfinite(r).all():
        bad = torch.nonzero(~torch.isfinite(r).all(dim=1)).flatten().tolist()
        raise ValueError(f"non-finite rewards in the groups of items {bad}")
    centred = r - r.mean(dim=1, keepdim=True)
    std = r.std(dim=1, keepdim=True, correction=0)
    constant = (r.amax(dim=1, keepdim=True) == r.amin(dim=1, keepdim=True))
    return torch.where(constant, torch.zeros_like(r), centred / (std + eps))


def policy_ratio(logp: torch.Tensor, old_logp: torch.Tensor) -> torch.Tensor:
    """rho = exp(log pi_theta - log pi_old), per token."""
    return torch.exp(logp - old_logp)


def clipped_surrogate(ratio: torch.Tensor, advantages: torch.Tensor, eps_low: float = 0.2,
                      eps_high: float = 0.28) -> torch.Tensor:
    """S = min(rho A, clip(rho, 1 - eps_low, 1 + eps_high) A), per token (advantages per token)."""
    return torch.minimum(ratio * advantages, ratio.clamp(1 - eps_low, 1 + eps_high) * advantages)


def k3_kl(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """K = pi_ref / pi_theta - log(pi_ref / pi_theta) - 1, per token (>= 0)."""
    log_ratio = ref_logp - logp
    return torch.exp(log_ratio) - log_ratio - 1


def token_mean(values: torch.Tensor, num_tokens: float | torch.Tensor | None = None) -> torch.Tensor:
    """sum of per-token values / N_tok; N_tok defaults to this batch's tokens (0 tokens give 0)."""
    n = values.numel() if num_tokens is None else num_tokens
    return values.sum() / max(float(n), 1.0)


def info_nce(queries: torch.Tensor, products: torch.Tensor, temperature: float = 0.02) -> torch.Tensor:
    """Symmetric InfoNCE with in-batch negatives: row i of each side is the other's positive.

    L = (CE(Q P^T / tau, i) + CE(P Q^T / tau, i)) / 2 over L2-normalised rows, (B, d) each.
    """
    q, p = F.normalize(queries.float(), dim=-1), F.normalize(products.float(), dim=-1)
    logits = q @ p.t() / temperature
    target = torch.arange(q.shape[0], device=q.device)
    return (F.cross_entropy(logits, target) + F.cross_entropy(logits.t(), target)) / 2


def rollout_info_nce(queries: torch.Tensor, products: torch.Tensor, temperature: float = 0.02) -> torch.Tensor:
    """InfoNCE on rollout embeddings (B, G, d) per side: rollout g of every query against rollout
    g of every product (B candidates, the item's own the positive), averaged over g."""
    if queries.shape != products.shape or queries.dim() != 3:
        raise ValueError(f"query and product rollouts must both be (items, rollouts, dim), got "
                         f"{tuple(queries.shape)} and {tuple(products.shape)}")
    return torch.stack([info_nce(queries[:, g], products[:, g], temperature) for g in range(queries.shape[1])]).mean()


@dataclass
class Objective:
    """The terms of one step's objective; `loss` is what is minimised (the rest is detached)."""

    loss: torch.Tensor
    surrogate: torch.Tensor  # token mean of S
    kl: torch.Tensor  # token mean of K
    nce: torch.Tensor  # L_InfoNCE (0 without embeddings)
    clip_fraction: torch.Tensor  # share of tokens whose ratio left the clip range


def grpo_objective(logp: torch.Tensor, old_logp: torch.Tensor, ref_logp: torch.Tensor, advantages: torch.Tensor,
                   token_rows: torch.Tensor, cfg: GRPOConfig = GRPOConfig(), num_tokens=None,
                   query_embeddings: torch.Tensor | None = None,
                   product_embeddings: torch.Tensor | None = None) -> Objective:
    """L = -(1/N_tok) sum (S - beta K) + lambda L_InfoNCE (module docstring).

    logp (N_tok,) carries gradients (re-scored by pi_theta); old_logp and ref_logp (N_tok,)
    do not; advantages (rows,) per rollout, token_rows (N_tok,) int64. The embeddings,
    (B, G, d) per side, add the InfoNCE term when both are given and lambda > 0.
    """
    if not (logp.shape == old_logp.shape == ref_logp.shape == token_rows.shape) or logp.dim() != 1:
        raise ValueError(f"per-token tensors must share one (N_tok,) shape, got {tuple(logp.shape)}, "
                         f"{tuple(old_logp.shape)}, {tuple(ref_logp.shape)}, {tuple(token_rows.shape)}")
    ratio = policy_ratio(logp, old_logp.detach())
    adv = advantages.detach().float()[token_rows]
    surrogate = token_mean(clipped_surrogate(ratio, adv, cfg.eps_low, cfg.eps_high), num_tokens)
    kl = token_mean(k3_kl(logp, ref_logp.detach()), num_tokens)
    loss = -(surrogate - cfg.beta * kl)
    nce = loss.new_zeros(())
    if query_embeddings is not None and product_embeddings is not None and cfg.nce_weight > 0:
        nce = rollout_info_nce(query_embeddings, product_embeddings, cfg.nce_temperature)
        loss = loss + cfg.nce_weight * nce
    with torch.no_grad():
        clipped = (ratio < 1 - cfg.eps_low) | (ratio > 1 + cfg.eps_high)
        clip_fraction = clipped.float().mean() if clipped.numel() else ratio.new_zeros(())
    return Objective(loss, surrogate.detach(), kl.detach(), nce.detach(), clip_fraction)
