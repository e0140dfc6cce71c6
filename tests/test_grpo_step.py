"""One RL step on the reference model: collected rollouts re-score to their own log-probs, a
step lowers the objective on a fixed batch, budget-exhausted rollouts still train, checkpoints
that cannot reason are refused, and a 2-process gloo step equals one process."""

from __future__ import annotations

import dataclasses
import os
import shutil
import socket
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp

import moon3rt
from moon3rt.api import TINY_TOKENIZER, Encoder
from moon3rt.batching import pack
from moon3rt.checkpoint import save_model
from moon3rt.config import Moon3Config
from moon3rt.generate import TorchDecoder
from moon3rt.model import random_model
from moon3rt.prompt import load_tokenizer
from moon3rt.train.grpo import GRPOConfig
from moon3rt.train.grpo_step import (
    RLConfig,
    Rescorer,
    SharedImages,
    check_rl_model,
    collect,
    continued,
    frozen_reference,
    objective,
    update,
)
from moon3rt.train.rewards import RewardConfig


def rgb(height: int, width: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


QUERIES = ["red cotton t-shirt", "navy striped tee", "black leather backpack", "white ceramic mug"]
PRODUCTS = [{"text": "Red tee", "image": rgb(56, 84, 1)}, {"text": "Navy striped t-shirt", "image": rgb(60, 60, 2)},
            {"text": "Backpack, black", "image": rgb(84, 56, 3)}, {"text": "Mug", "image": rgb(56, 56, 4)}]
TRUTHS = [{"category": "t-shirt"}, {"category": "t-shirt"}, {"category": "backpack"}, {"category": "mug"}]


def lively_encoder() -> Encoder:
    """moon3-tiny with an untied random LM head, so the drawn text depends on the context."""
    cfg = Moon3Config.from_name("moon3-tiny")
    cfg.text.tie_word_embeddings = False
    model = random_model(cfg, seed=0, lm_head=True)
    return Encoder(model, load_tokenizer(TINY_TOKENIZER), torch.device("cpu"), torch.float32)


def setup(pairs=slice(None), budget: int = 6, cfg: RLConfig | None = None):
    encoder = lively_encoder()
    cfg = cfg or RLConfig(rollouts=3, grpo=GRPOConfig(nce_weight=0.5, nce_temperature=0.1))
    plan = encoder.reasoning_plan(budget)
    queries = [encoder.prepare(q, i, reasoning=True) for i, q in enumerate(QUERIES[pairs])]
    products = [encoder.prepare(p, i, reasoning=True) for i, p in enumerate(PRODUCTS[pairs])]
    policy = encoder.model
    reference = frozen_reference(policy, cfg, plan.suppressed_ids)
    rescorer = Rescorer(policy, plan.suppressed_ids, cfg.temperature)
    return encoder, cfg, plan, queries, products, policy, reference, rescorer


def test_collected_rollouts_rescore_to_their_own_logprobs():
    encoder, cfg, plan, queries, products, policy, reference, rescorer = setup()
    rollouts = collect(policy, reference, encoder.prompt, queries, products, plan, cfg, seed=1)
    B, G = len(QUERIES), cfg.rollouts
    assert rollouts.rewards.shape == (2, B, G) and rollouts.advantages.shape == (2 * B * G,)
    assert rollouts.batch.num_items == 2 * B * G and len(rollouts.texts) == 2 * B * G
    assert rollouts.num_tokens == rollouts.targets.numel() > 0
    with torch.no_grad():
        logp, vectors = rescorer(rollouts.batch, rollouts.predict_index, rollouts.targets, rollouts.images)
    np.testing.assert_allclose(logp.numpy(), rollouts.old_logp.numpy(), atol=1e-4)  # rho = 1 before the update
    torch.testing.assert_close(rollouts.ref_logp, logp)  # pi_ref = pi_theta at the start: k3 = 0
    # the re-scored <emb> vectors are the draw's (rewards were computed from the draw's)
    terms = objective(rescorer, rollouts, cfg)
    assert abs(terms.kl.item()) < 1e-6 and terms.clip_fraction.item() == 0
    assert torch.isfinite(vectors).all()
    # the same seed draws the same rollouts; another seed others
    again = collect(policy, reference, encoder.prompt, queries, products, plan, cfg, seed=1)
    assert again.texts == rollouts.texts and torch.equal(again.rewards, rollouts.rewards)
    assert collect(policy, reference, encoder.prompt, queries, products, plan, cfg, seed=2).texts != rollouts.texts


def test_rollouts_drawn_by_another_decoder():
    """`decoder` draws the rollouts (e.g. the triton backend's, whose sampled rollouts equal the
    torch decoder's: tests/test_sampling.py); here a counting wrapper of the torch decoder."""
    encoder, cfg, plan, queries, products, policy, reference, rescorer = setup(pairs=slice(0, 2), budget=3)
    plain = collect(policy, reference, encoder.prompt, queries, products, plan, cfg, seed=8)
    steps = []

    class Counting(TorchDecoder):
        def decode_step(self, *args):
            steps.append(1)
            return super().decode_step(*args)

    counted = collect(policy, reference, encoder.prompt, queries, products, plan, cfg, seed=8,
                      decoder=Counting(policy, torch.device("cpu")))
    assert steps and counted.texts == plain.texts and torch.equal(counted.rewards, plain.rewards)


def test_shared_vision_pass_equals_repeated_images():
    """Re-scoring runs each prompt's images once for its G rollouts: same log-probs, vectors and
    gradients as a batch that repeats the pixels for every rollout."""
    encoder, cfg, plan, queries, products, policy, reference, rescorer = setup(pairs=slice(0, 2))
    prompts = [queries[0], products[0], products[1]]
    tails = [[40, 41], [42], [43, 44, 45], [46], [47, 48], []]
    owners = [0, 0, 1, 1, 2, 2]  # two rollouts per prompt
    rows = [continued(prompts[o], t + list(plan.close_ids)) for o, t in zip(owners, tails)]
    full = pack(rows)
    starts = full.cu_seqlens.tolist()
    predict = torch.tensor([starts[r] + prompts[o].num_tokens - 1 + j for r, (o, t) in enumerate(zip(owners, tails))
                            for j in range(len(t))])
    targets = torch.tensor([tok for t in tails for tok in t])
    unique = pack(prompts)
    cu = unique.cu_images.tolist()
    images = SharedImages(unique.pixel_values, unique.image_grid_thw,
                          torch.cat([torch.arange(cu[o], cu[o + 1]) for o in owners]), unique.pixel_norm)
    bare = dataclasses.replace(full, pixel_values=None, image_grid_thw=None)

    def run(batch, shared):
        policy.zero_grad()
        logp, vectors = rescorer(batch, predict, targets, shared)
        (logp.sum() + vectors.square().sum()).backward()
        return logp.detach(), vectors.detach(), {n: p.grad.clone() for n, p in policy.named_parameters()
                                                  if p.grad is not None}

    a, b = run(full, None), run(bare, images)
    with pytest.raises(ValueError, match="image tokens but no pixels"):
        rescorer(bare, predict, targets)
    torch.testing.assert_close(b[0], a[0], atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(b[1], a[1], atol=1e-6, rtol=1e-5)
    assert a[2].keys() == b[2].keys() and any(n.startswith("visual.") for n in a[2])
    for name in a[2]:
        torch.testing.assert_close(b[2][name], a[2][name], atol=1e-6, rtol=1e-4, msg=name)


def test_one_step_lowers_the_objective_on_a_fixed_batch():
    encoder, cfg, plan, queries, products, policy, reference, rescorer = setup()
    rollouts = collect(policy, reference, encoder.prompt, queries, products, plan, cfg, seed=3)
    assert rollouts.advantages.abs().sum() > 0, "the batch needs rollouts that differ in reward"
    optimizer = torch.optim.SGD(policy.parameters(), lr=0.05)
    before = update(rescorer, optimizer, rollouts, cfg)
    with torch.no_grad():
        after = objective(rescorer, rollouts, cfg)
    assert after.loss < before.loss, (before, after)
    assert after.surrogate > before.surrogate  # the policy moved towards the better rollouts
    assert after.nce < before.nce  # and the embeddings towards their pairs
    assert after.kl > 0  # it left the reference


def test_rollouts_that_never_close_still_train():
    """A budget too short for the end marker: every rollout is paid the format penalty, the
    retrieval term still ranks them, and the step is finite."""
    encoder, cfg, plan, queries, products, policy, reference, rescorer = setup(budget=2)
    rollouts = collect(policy, reference, encoder.prompt, queries, products, plan, cfg, seed=4)
    assert set(rollouts.stops) == {"budget"}
    fmt_only = RLConfig(rollouts=3, rewards=RewardConfig(retrieval_weight=0.0))
    penalised = collect(policy, reference, encoder.prompt, queries, products, plan, fmt_only, seed=4)
    assert torch.equal(penalised.rewards, torch.full_like(penalised.rewards, -1.0))
    assert torch.equal(penalised.advantages, torch.zeros_like(penalised.advantages))  # constant groups: 0, no NaN
    terms = update(rescorer, torch.optim.SGD(policy.parameters(), lr=0.01), rollouts, cfg)
    assert torch.isfinite(terms.loss)
    assert all(torch.isfinite(p).all() for p in policy.parameters())


def test_a_non_finite_objective_changes_nothing():
    encoder, cfg, plan, queries, products, policy, reference, rescorer = setup(pairs=slice(0, 2), budget=3)
    rollouts = collect(policy, reference, encoder.prompt, queries, products, plan, cfg, seed=6)
    rollouts.old_logp[0] = float("nan")
    before = {k: v.clone() for k, v in policy.state_dict().items()}
    with pytest.raises(FloatingPointError, match="the RL objective is nan .* not applied"):
        update(rescorer, torch.optim.SGD(policy.parameters(), lr=0.1), rollouts, cfg)
    assert all(torch.equal(v, before[k]) for k, v in policy.state_dict().items())


def test_ground_truth_reward_is_an_option():
    encoder, cfg, plan, queries, products, policy, reference, rescorer = setup(budget=3)
    ablation = RLConfig(rollouts=3, rewards=RewardConfig(attribute_weight=1.0))
    with_truth = collect(policy, reference, encoder.prompt, queries, products, plan, ablation, seed=5, truths=TRUTHS)
    plain = collect(policy, reference, encoder.prompt, queries, products, plan, RLConfig(rollouts=3), seed=5)
    # random weights write no "category: ..." field, so the ground-truth term adds 0 here
    torch.testing.assert_close(with_truth.rewards, plain.rewards)
    with pytest.raises(ValueError, match="needs each item's true attributes"):
        collect(policy, reference, encoder.prompt, queries, products, plan, ablation, seed=5)


def test_bad_configs_and_batches():
    with pytest.raises(ValueError, match="rollouts must be an integer >= 2"):
        RLConfig(rollouts=1)
    with pytest.raises(ValueError, match="temperature must be > 0"):
        RLConfig(temperature=0.0)
    with pytest.raises(ValueError, match="top_p"):
        RLConfig(top_p=0.0)
    encoder, cfg, plan, queries, products, policy, reference, rescorer = setup()
    with pytest.raises(ValueError, match="as many products as queries"):
        collect(policy, reference, encoder.prompt, queries, products[:2], plan, cfg, seed=0)


# ------------------------------------------------------------------- refused checkpoints
def checkpoint(model, directory: Path) -> Path:
    save_model(model, directory)
    shutil.copy(TINY_TOKENIZER, directory / "tokenizer.json")
    return directory


def test_checkpoints_without_emb_or_lm_head_are_refused(tmp_path):
    untied = Moon3Config.from_name("moon3-tiny")
    untied.text.tie_word_embeddings = False
    encoder = moon3rt.load(checkpoint(random_model(untied, seed=0), tmp_path / "no_head"))
    with pytest.raises(ValueError, match="no_head cannot be trained with --stage rl: .*no lm_head.weight"):
        check_rl_model(encoder.model, encoder.prompt, name=str(tmp_path / "no_head"))

    mean = Moon3Config.from_name("moon3-tiny")
    mean.moon3.pooling, mean.moon3.embed_token_id = "mean", None
    encoder = moon3rt.load(checkpoint(random_model(mean.validate(), seed=0), tmp_path / "no_emb"))
    with pytest.raises(ValueError, match="cannot be trained with --stage rl: .*<emb>.*embed_token_id is not set"):
        check_rl_model(encoder.model, encoder.prompt)

    plain = Moon3Config.from_name("moon3-tiny")
    plain.moon3, plain.flavour = None, "qwen2-vl"
    encoder = moon3rt.load(checkpoint(random_model(plain.validate(), seed=0), tmp_path / "plain"))
    with pytest.raises(ValueError, match="--stage rl: reasoning mode needs a MOON3 checkpoint"):
        check_rl_model(encoder.model, encoder.prompt)

    check_rl_model(lively_encoder().model, lively_encoder().prompt)  # an untied head that ships: accepted
    tied = moon3rt.load("moon3-tiny")
    check_rl_model(tied.model, tied.prompt)


# --------------------------------------------------------------------- 2 processes (gloo)
def one_step(pairs: slice, out: str, seed: int = 7) -> None:
    """One RL step on `pairs`; writes the updated weights and the step's terms to `out`."""
    torch.manual_seed(0)
    encoder, cfg, plan, queries, products, policy, reference, rescorer = setup(pairs)
    if torch.distributed.is_initialized():
        rescorer = torch.nn.parallel.DistributedDataParallel(rescorer, find_unused_parameters=True)
    rollouts = collect(policy, reference, encoder.prompt, queries, products, plan, cfg, seed=seed)
    terms = update(rescorer, torch.optim.SGD(policy.parameters(), lr=0.05), rollouts, cfg)
    torch.save({"state": policy.state_dict(), "nce": terms.nce, "texts": rollouts.texts,
                "rewards": rollouts.rewards, "tokens": rollouts.num_tokens}, out)


def _rank(rank: int, world: int, port: int, directory: str) -> None:
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                                         world_size=world)
    try:
        share = len(QUERIES) // world
        one_step(slice(rank * share, (rank + 1) * share), os.path.join(directory, f"rank{rank}.pt"))
    finally:
        torch.distributed.destroy_process_group()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_gloo_processes_equal_one(tmp_path):
    one_step(slice(None), str(tmp_path / "single.pt"))
    mp.spawn(_rank, args=(2, free_port(), str(tmp_path)), nprocs=2, join=True)
    single = torch.load(tmp_path / "single.pt")
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    assert ranks[0]["texts"][:6] + ranks[1]["texts"][:6] == single["texts"][:12]  # query rollouts, rank order
    torch.testing.assert_close(torch.cat([r["rewards"] for r in ranks], dim=1), single["rewards"])
    assert ranks[0]["tokens"] == ranks[1]["tokens"] == single["tokens"]
    torch.testing.assert_close(ranks[0]["nce"], single["nce"])
    start = lively_encoder().model.state_dict()
    moved = 0.0
    for name, value in single["state"].items():
        for r in ranks:
            torch.testing.assert_close(r["state"][name], value, atol=1e-6, rtol=1e-5, msg=name)
        moved = max(moved, (value - start[name]).abs().max().item())
    assert moved > 1e-4, "the step must change the weights for the comparison to mean anything"
