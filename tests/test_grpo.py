"""The GRPO objective term by term against hand-computed values (train/grpo.py, docs/RL.md)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from moon3rt.train.grpo import (
    GRPOConfig,
    clipped_surrogate,
    grpo_objective,
    group_advantages,
    info_nce,
    k3_kl,
    policy_ratio,
    rollout_info_nce,
    token_mean,
)


def test_group_advantages_by_hand():
    rewards = torch.tensor([[1.0, 2.0, 3.0], [5.0, 5.0, 5.0], [0.0, 0.0, 1.0]])
    a = group_advantages(rewards, eps=1e-4)
    std0 = math.sqrt(2 / 3)  # population std of 1, 2, 3
    torch.testing.assert_close(a[0], torch.tensor([-1 / (std0 + 1e-4), 0.0, 1 / (std0 + 1e-4)]))
    assert torch.equal(a[1], torch.zeros(3)), "a constant group must give exactly zero advantage"
    std2 = math.sqrt(2 / 9)  # 0, 0, 1: mean 1/3
    torch.testing.assert_close(a[2], torch.tensor([-1 / 3, -1 / 3, 2 / 3]) / (std2 + 1e-4))
    # one rollout per group and a constant reward of any size: zero, finite, no division by zero
    assert torch.equal(group_advantages(torch.tensor([[7.0], [-2.0]])), torch.zeros(2, 1))
    assert torch.equal(group_advantages(torch.full((2, 4), 0.1)), torch.zeros(2, 4))
    with pytest.raises(ValueError, match="non-finite rewards in the groups of items \\[1\\]"):
        group_advantages(torch.tensor([[1.0, 2.0], [float("nan"), 0.0]]))
    with pytest.raises(ValueError, match="items, rollouts"):
        group_advantages(torch.ones(4))


def test_clipped_surrogate_by_hand():
    ratio = torch.tensor([0.5, 0.9, 1.0, 1.2, 1.5], requires_grad=True)
    pos = clipped_surrogate(ratio, torch.ones(5), 0.2, 0.28)
    neg = clipped_surrogate(ratio, -torch.ones(5), 0.2, 0.28)
    # A > 0: min(rho, clip(rho, 0.8, 1.28)); A < 0: -max(rho, clip(rho, 0.8, 1.28))
    torch.testing.assert_close(pos, torch.tensor([0.5, 0.9, 1.0, 1.2, 1.28]))
    torch.testing.assert_close(neg, torch.tensor([-0.8, -0.9, -1.0, -1.2, -1.5]))
    (grad_pos,) = torch.autograd.grad(pos.sum(), ratio)
    (grad_neg,) = torch.autograd.grad(neg.sum(), ratio)
    # the clip stops the gradient only on the side it guards (asymmetric: 0.8 vs 1.28)
    torch.testing.assert_close(grad_pos, torch.tensor([1.0, 1.0, 1.0, 1.0, 0.0]))
    torch.testing.assert_close(grad_neg, torch.tensor([0.0, -1.0, -1.0, -1.0, -1.0]))
    torch.testing.assert_close(policy_ratio(torch.log(torch.tensor([0.3])), torch.log(torch.tensor([0.2]))),
                               torch.tensor([1.5]))


def test_k3_by_hand_and_unbiased():
    logp, ref = torch.log(torch.tensor([0.5, 0.25, 0.4])), torch.log(torch.tensor([0.25, 0.5, 0.4]))
    expect = torch.tensor([0.5 - math.log(0.5) - 1, 2.0 - math.log(2.0) - 1, 0.0])
    torch.testing.assert_close(k3_kl(logp, ref), expect)
    # E_{x ~ pi_theta}[k3] = KL(pi_theta || pi_ref) on a small categorical
    p, q = torch.tensor([0.6, 0.3, 0.1]), torch.tensor([0.2, 0.5, 0.3])
    x = torch.multinomial(p, 200_000, replacement=True, generator=torch.Generator().manual_seed(0))
    estimate = k3_kl(p.log()[x], q.log()[x]).mean().item()
    exact = (p * (p / q).log()).sum().item()
    assert abs(estimate - exact) < 0.01, (estimate, exact)
    assert (k3_kl(p.log()[x], q.log()[x]) >= 0).all()


def test_token_level_normalisation():
    # rollout 0 has 1 token of value 4, rollout 1 has 3 tokens of value 0: per token, not per sequence
    values = torch.tensor([4.0, 0.0, 0.0, 0.0])
    assert token_mean(values).item() == 1.0  # a sequence mean would give (4 + 0) / 2 = 2
    assert token_mean(values, num_tokens=8).item() == 0.5  # across ranks: the global count
    assert token_mean(torch.zeros(0)).item() == 0.0  # no tokens at all (budget 0): no NaN


def test_objective_by_hand():
    # two rollouts of one item: 2 tokens and 1 token; advantages +1 and -1; beta 0.1
    old = torch.log(torch.tensor([0.5, 0.5, 0.5]))
    logp = torch.log(torch.tensor([0.75, 0.5, 0.25])).requires_grad_()  # ratios 1.5, 1.0, 0.5
    ref = torch.log(torch.tensor([0.5, 0.25, 0.25]))
    rows, adv = torch.tensor([0, 0, 1]), torch.tensor([1.0, -1.0])
    cfg = GRPOConfig(beta=0.1, nce_weight=0.0)
    obj = grpo_objective(logp, old, ref, adv, rows, cfg)
    s = [1.28, 1.0, -0.8]  # clipped at 1.28; 1.0; A < 0 and rho 0.5 < 0.8: -0.8
    k = [r - math.log(r) - 1 for r in (0.5 / 0.75, 0.25 / 0.5, 1.0)]
    torch.testing.assert_close(obj.surrogate, torch.tensor(sum(s) / 3))
    torch.testing.assert_close(obj.kl, torch.tensor(sum(k) / 3))
    torch.testing.assert_close(obj.loss, torch.tensor(-(sum(s) - 0.1 * sum(k)) / 3))
    torch.testing.assert_close(obj.clip_fraction, torch.tensor(2 / 3))
    obj.loss.backward()
    # d/dlogp of -(S - beta K)/3: S' = rho A where unclipped (0 where clipped), K' = 1 - pi_ref/pi_theta
    expect = [-(0 - 0.1 * (1 - 0.5 / 0.75)) / 3, -(1.0 - 0.1 * (1 - 0.5)) / 3, -(0 - 0.1 * 0) / 3]
    torch.testing.assert_close(logp.grad, torch.tensor(expect))

    # on-policy (rho = 1) and pi_theta = pi_ref: the loss is minus the token mean of A
    on = grpo_objective(old.clone(), old, old, adv, rows, cfg)
    torch.testing.assert_close(on.loss, torch.tensor(-(1 + 1 - 1) / 3))
    with pytest.raises(ValueError, match="share one"):
        grpo_objective(logp, old[:2], ref, adv, rows, cfg)


def test_info_nce_and_the_joint_term():
    g = torch.Generator().manual_seed(0)
    q, p = torch.randn(4, 3, 8, generator=g), torch.randn(4, 3, 8, generator=g)
    # InfoNCE by its definition: -log softmax of the positive, both directions
    qn, pn = F.normalize(q[:, 0], dim=-1), F.normalize(p[:, 0], dim=-1)
    s = qn @ pn.t() / 0.05
    by_hand = (-(s.diag() - s.logsumexp(1)).mean() - (s.diag() - s.logsumexp(0)).mean()) / 2
    torch.testing.assert_close(info_nce(q[:, 0], p[:, 0], 0.05), by_hand)
    torch.testing.assert_close(rollout_info_nce(q, p, 0.05),
                               sum(info_nce(q[:, k], p[:, k], 0.05) for k in range(3)) / 3)
    # aligned pairs give a smaller loss than shuffled ones
    assert info_nce(p[:, 0], p[:, 0]) < info_nce(p[:, 0], p[[1, 2, 3, 0], 0])

    old = torch.log(torch.full((5,), 0.5))
    rows, adv = torch.tensor([0, 0, 1, 2, 3]), torch.tensor([1.0, -1.0, 0.5, 0.0])
    qe, pe = q.clone().requires_grad_(), p.clone().requires_grad_()
    cfg = GRPOConfig(nce_weight=0.3, nce_temperature=0.05)
    joint = grpo_objective(old, old, old, adv, rows, cfg, query_embeddings=qe, product_embeddings=pe)
    alone = grpo_objective(old, old, old, adv, rows, cfg)
    torch.testing.assert_close(joint.loss, alone.loss + 0.3 * rollout_info_nce(q, p, 0.05))
    joint.loss.backward()
    assert qe.grad.abs().sum() > 0 and pe.grad.abs().sum() > 0  # the embeddings learn from the same step
    off = grpo_objective(old, old, old, adv, rows, GRPOConfig(nce_weight=0.0), query_embeddings=q,
                         product_embeddings=p)
    torch.testing.assert_close(off.loss, alone.loss)
    with pytest.raises(ValueError, match="items, rollouts, dim"):
        rollout_info_nce(q, p[:, :2])


def test_config_is_checked():
    assert (GRPOConfig().eps_low, GRPOConfig().eps_high) == (0.2, 0.28)
    for kwargs in ({"eps_low": -0.1}, {"eps_low": 1.0}, {"beta": -1.0}, {"nce_temperature": 0.0}):
        with pytest.raises(ValueError, match="GRPOConfig"):
            GRPOConfig(**kwargs)
