"""Rewards of the RL stage on hand-built texts and embeddings (train/rewards.py, docs/RL.md)."""

from __future__ import annotations

import pytest
import torch

from moon3rt.train.grpo import group_advantages
from moon3rt.train.rewards import (
    RewardConfig,
    attribute_reward,
    format_reward,
    parse_attributes,
    retrieval_reward,
    rollout_rewards,
)

FULL = "category: t-shirt; colour: navy; material: cotton; pattern: striped"


def test_parse_attributes():
    assert parse_attributes(FULL) == {"category": "t-shirt", "colour": "navy", "material": "cotton",
                                      "pattern": "striped"}
    assert parse_attributes("Category: Mug\ncolour:\n: red; logo: left: chest; colour: red; colour: blue") == {
        "category": "Mug", "logo": "left: chest", "colour": "red"}
    assert parse_attributes("") == {}


def test_format_reward_by_hand():
    texts = [FULL, "category: mug; colour: red", FULL, "no fields at all", FULL, ""]
    stops = ["end_marker", "end_marker", "eos", "end_marker", "budget", "budget"]
    r = format_reward(texts, stops, fields=("category", "colour", "material"), budget_penalty=-1.0)
    torch.testing.assert_close(r, torch.tensor([1.0, (1 + 2 / 3) / 2, 0.5, 0.5, -1.0, -1.0]))
    assert torch.isfinite(r).all()
    # a rollout that never reached the end marker is paid the penalty, whatever it wrote
    assert format_reward([FULL], ["budget"], budget_penalty=-0.5).item() == -0.5
    with pytest.raises(ValueError, match="rollout 1: unknown stop reason 'timeout'"):
        format_reward([FULL, FULL], ["eos", "timeout"])
    with pytest.raises(ValueError, match="2 texts but 1 stop"):
        format_reward([FULL, FULL], ["eos"])


def test_retrieval_reward_by_hand():
    # 2 items, 2 rollouts a side, 2-D unit vectors
    others = torch.tensor([[[1.0, 0.0], [0.6, 0.8]], [[0.0, 1.0], [0.8, 0.6]]])
    anchors = torch.tensor([[[1.0, 0.0], [0.0, 1.0]], [[0.6, 0.8], [2.0, 0.0]]])  # length does not count
    r = retrieval_reward(anchors, others)
    # (0,0) = (1,0): sims [1, .6 | 0, .8] -> top-2 {1, .8}: rank 1/2; margin .8 - .4 = .4 -> .2
    # (0,1) = (0,1): sims [0, .8 | 1, .6] -> top-2 {1, .8}: rank 1/2; margin .4 - .8 = -.4 -> -.2
    # (1,0) = (.6,.8): sims [.6, 1 | .8, .96] -> top-2 {1, .96}: rank 1/2; margin .88 - .8 -> .04
    # (1,1) = (1,0): sims [1, .6 | 0, .8] -> top-2 {1, .8}: rank 1/2; margin .4 - .8 -> -.2
    torch.testing.assert_close(r, torch.tensor([[0.2, -0.2], [0.04, -0.2]]))

    # a perfect match gets rank 1 and the whole margin
    perfect = retrieval_reward(torch.tensor([[[1.0, 0.0]], [[0.0, 1.0]]]), torch.tensor([[[1.0, 0.0]], [[0.0, 1.0]]]))
    torch.testing.assert_close(perfect, torch.ones(2, 1))
    with pytest.raises(ValueError, match="at least 2 items"):
        retrieval_reward(anchors[:1], others[:1])
    # a share of the anchors (a rank's items) scored against the whole other side
    torch.testing.assert_close(retrieval_reward(anchors[1:], others, first=1), r[1:])
    torch.testing.assert_close(retrieval_reward(anchors[:1], others, first=0), r[:1])
    with pytest.raises(ValueError, match="from item 2 on"):
        retrieval_reward(anchors[1:], others, first=2)
    with pytest.raises(ValueError, match="same dim"):
        retrieval_reward(anchors, others[:, :, :1])


def test_perfect_group_outranks_a_shuffled_one():
    """Item 0's rollouts all sit on item 0's products; item 1's are shuffled onto the others."""
    g = torch.Generator().manual_seed(0)
    B, G, d = 4, 6, 16
    centres = torch.nn.functional.normalize(torch.randn(B, d, generator=g), dim=-1)
    products = centres[:, None] + 0.05 * torch.randn(B, G, d, generator=g)
    queries = centres[:, None] + 0.05 * torch.randn(B, G, d, generator=g)
    queries[1] = centres[torch.tensor([2, 3, 0, 2, 3, 1])] + 0.05 * torch.randn(G, d, generator=g)
    r = retrieval_reward(queries, products)
    assert (r[0] > 0.5).all() and r[0].mean() > r[1].mean() + 0.5, r
    assert (r[1, :5] <= 0).all() and r[1, 5] > 0.5  # the one rollout of item 1 that landed on item 1
    a = group_advantages(r)
    assert a[1, 5] > 0 and (a[1, :5] < 0).all()
    # the other side scores the same way (products as anchors)
    back = retrieval_reward(products, queries)
    assert back[0].mean() > back[1].mean()


def test_attribute_reward_is_an_ablation():
    truth = {"category": "t-shirt", "colour": "Navy", "material": "denim"}
    r = attribute_reward([FULL, "category: mug", ""], [truth, truth, truth])
    torch.testing.assert_close(r, torch.tensor([2 / 3, 0.0, 0.0]))
    assert RewardConfig().attribute_weight == 0.0  # never the default
    with pytest.raises(ValueError, match="rollout 0: no ground-truth"):
        attribute_reward([FULL], [{}])


def test_rollout_rewards_combine_the_terms():
    anchors = torch.tensor([[[1.0, 0.0], [0.0, 1.0]], [[0.6, 0.8], [1.0, 0.0]]])
    others = torch.tensor([[[1.0, 0.0], [0.6, 0.8]], [[0.0, 1.0], [0.8, 0.6]]])
    texts, stops = [FULL, "colour: red", FULL, FULL], ["end_marker", "end_marker", "budget", "eos"]
    cfg = RewardConfig(format_weight=0.5, retrieval_weight=2.0)
    r = rollout_rewards(cfg, texts, stops, anchors, others)
    fmt = format_reward(texts, stops).view(2, 2)
    torch.testing.assert_close(r, 0.5 * fmt + 2.0 * retrieval_reward(anchors, others))
    truths = [{"category": "t-shirt"}, {"category": "jeans"}]
    ablation = rollout_rewards(RewardConfig(attribute_weight=1.0), texts, stops, anchors, others, truths)
    torch.testing.assert_close(ablation - rollout_rewards(RewardConfig(), texts, stops, anchors, others),
                               torch.tensor([[1.0, 0.0], [0.0, 0.0]]))
    with pytest.raises(ValueError, match="needs each item's true attributes"):
        rollout_rewards(RewardConfig(attribute_weight=1.0), texts, stops, anchors, others)
    with pytest.raises(ValueError, match="3 rollout texts for 2 items x 2"):
        rollout_rewards(cfg, texts[:3], stops[:3], anchors, others)
