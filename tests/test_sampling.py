"""Sampled reasoning rollouts: the nucleus and the draw on hand-checked distributions, seeded
reproducibility, G rollouts sharing a prefill == G separate generations, temperature 0 ==
greedy, log-probs == the re-scored policy, bad arguments."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from moon3rt.api import TINY_TOKENIZER, Encoder
from moon3rt.batching import pack
from moon3rt.config import Moon3Config
from moon3rt.generate import _extend, generate
from moon3rt.model import random_model
from moon3rt.prompt import load_tokenizer
from moon3rt.sampling import Sampler, Sampling, masked_logits, nucleus_mask

ATOL = 1e-5


def rgb(height: int, width: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


ITEMS = [
    "red cotton t-shirt",
    {"text": "navy tee", "image": rgb(60, 90, seed=1)},
    rgb(57, 61, seed=2),
    "brown leather oxford shoes with waxed laces",
]


def lively_encoder(backend: str = "torch") -> Encoder:
    """moon3-tiny with an untied random LM head, so the text depends on the context."""
    cfg = Moon3Config.from_name("moon3-tiny")
    cfg.text.tie_word_embeddings = False
    model = random_model(cfg, seed=0, lm_head=True)
    return Encoder(model, load_tokenizer(TINY_TOKENIZER), torch.device("cpu"), torch.float32, backend=backend)


@pytest.fixture(scope="module")
def lively() -> Encoder:
    return lively_encoder()


def run(encoder: Encoder, items, max_tokens: int, sampling=None, rollouts: int = 1):
    plan = encoder.reasoning_plan(max_tokens)  # also picks the backend's decoder
    prep = [encoder.prepare(item, i, reasoning=True) for i, item in enumerate(items)]
    return generate(encoder._decoder, pack(prep), plan, encoder.model.output_embeddings(), sampling, rollouts)


# ------------------------------------------------------------------- the draw itself
def test_nucleus_by_hand():
    probs = torch.tensor([[0.10, 0.50, 0.15, 0.25]])  # ranked: 1 (0.5), 3 (0.25), 2 (0.15), 0 (0.1)
    expect = {0.3: [1], 0.5: [1], 0.6: [1, 3], 0.75: [1, 3], 0.8: [1, 2, 3], 0.95: [0, 1, 2, 3], 1.0: [0, 1, 2, 3]}
    for top_p, kept in expect.items():
        got = torch.nonzero(nucleus_mask(probs, top_p)[0]).flatten().tolist()
        assert got == kept, f"top_p={top_p}: kept {got}, expected {kept}"
    # ties rank by index; a zero-probability token never enters
    probs = torch.tensor([[0.25, 0.25, 0.25, 0.25, 0.0]])
    assert nucleus_mask(probs, 0.3)[0].tolist() == [True, True, False, False, False]
    assert nucleus_mask(probs, 1.0)[0].tolist() == [True, True, True, True, False]


def test_draw_follows_the_renormalised_nucleus():
    rows = 6000
    logits = torch.log(torch.tensor([0.10, 0.50, 0.15, 0.25])).expand(rows, -1).contiguous()
    sampler = Sampler(Sampling(temperature=1.0, top_p=0.6, seed=11), rows, "cpu")
    tokens, logp = sampler(logits, list(range(rows)))
    counts = torch.bincount(tokens, minlength=4).float() / rows
    assert counts[0] == 0 and counts[2] == 0, f"outside the nucleus: {counts.tolist()}"
    # nucleus {1, 3} renormalised: 2/3 and 1/3; 6000 draws give a standard error of ~0.006
    assert abs(counts[1].item() - 2 / 3) < 0.03 and abs(counts[3].item() - 1 / 3) < 0.03, counts.tolist()
    # the log-prob is the policy's (whole vocabulary), not the nucleus' renormalised one
    np.testing.assert_allclose(logp.numpy(), torch.log(torch.tensor([0.10, 0.50, 0.15, 0.25]))[tokens].numpy(),
                               rtol=1e-6)

    # temperature 2 without a nucleus: frequencies follow softmax(z / 2)
    sampler = Sampler(Sampling(temperature=2.0, seed=12), rows, "cpu")
    tokens, logp = sampler(logits, list(range(rows)))
    expect = torch.softmax(logits[0] / 2, dim=-1)
    counts = torch.bincount(tokens, minlength=4).float() / rows
    assert (counts - expect).abs().max() < 0.03, (counts.tolist(), expect.tolist())
    np.testing.assert_allclose(logp.numpy(), torch.log(expect)[tokens].numpy(), rtol=1e-5)


def test_suppressed_ids_are_never_drawn():
    # -inf logits (what masked_logits gives suppressed ids) stay out even at high temperature
    logits = torch.tensor([[0.0, float("-inf"), 0.0, float("-inf")]]).expand(500, -1).contiguous()
    tokens, logp = Sampler(Sampling(temperature=50.0, seed=1), 500, "cpu")(logits, list(range(500)))
    assert set(tokens.tolist()) == {0, 2} and torch.isfinite(logp).all()


def test_row_noise_depends_on_its_seed_alone():
    logits = torch.randn(3, 50, generator=torch.Generator().manual_seed(0))
    sampler = Sampler(Sampling(seed=5), 3, "cpu")
    together = [sampler(logits, [0, 1, 2])[0] for _ in range(4)]
    seeds = Sampling(seed=5).seeds(3)
    for row in range(3):  # the same row alone, from a sampler pinned to its seed
        alone = Sampler(Sampling(row_seeds=(seeds[row],)), 1, "cpu")
        for step in range(4):
            assert alone(logits[row : row + 1], [0])[0].item() == together[step][row].item(), (row, step)
    assert len(set(seeds)) == 3 and Sampling(seed=6).seeds(3) != seeds


# --------------------------------------------------------------- rollouts in generation
def test_seeded_rollouts_are_reproducible(lively):
    a = run(lively, ITEMS, 8, Sampling(temperature=1.0, seed=3), rollouts=3)
    b = run(lively, ITEMS, 8, Sampling(temperature=1.0, seed=3), rollouts=3)
    assert len(a.tokens) == len(ITEMS) * 3 and a.vectors.shape[0] == len(ITEMS) * 3
    assert a.tokens == b.tokens and a.stops == b.stops and a.logprobs == b.logprobs
    assert torch.equal(a.vectors, b.vectors)
    c = run(lively, ITEMS, 8, Sampling(temperature=1.0, seed=4), rollouts=3)
    assert c.tokens != a.tokens
    # rollouts of one item differ (that is what exploration needs)
    for b_ in range(len(ITEMS)):
        assert len({tuple(t) for t in a.tokens[3 * b_ : 3 * b_ + 3]}) > 1, f"item {b_}: rollouts all equal"
    for row in range(len(a.tokens)):
        assert len(a.logprobs[row]) == len(a.sampled[row]) == len(a.tokens[row]) + (a.stops[row] != "budget")
        assert all(lp <= 0 for lp in a.logprobs[row])


def test_rollouts_share_one_prefill_and_equal_separate_generations(lively, monkeypatch):
    G, sampling = 3, Sampling(temperature=0.8, top_p=0.9, seed=21)
    decoder = lively._decoder
    prefills = []
    real = type(decoder).hidden_states

    def counting(self, batch, kv_sink=None):
        prefills.append(batch.num_items)
        return real(self, batch, kv_sink)

    monkeypatch.setattr(type(decoder), "hidden_states", counting)
    shared = run(lively, ITEMS, 10, sampling, rollouts=G)
    assert prefills == [len(ITEMS)], "the G rollouts must share one prefill of the B prompts"
    seeds = sampling.seeds(len(ITEMS) * G)
    for b in range(len(ITEMS)):
        for g in range(G):
            row = b * G + g
            alone = run(lively, ITEMS[b : b + 1], 10, Sampling(temperature=0.8, top_p=0.9, row_seeds=(seeds[row],)))
            assert alone.tokens[0] == shared.tokens[row], f"item {b} rollout {g}"
            assert alone.stops[0] == shared.stops[row]
            np.testing.assert_allclose(alone.logprobs[0], shared.logprobs[row], atol=1e-5)
            err = (alone.vectors[0] - shared.vectors[row]).abs().max().item()
            assert err <= ATOL, f"item {b} rollout {g}: vectors differ by {err:.2e}"


def test_temperature_zero_is_greedy(lively):
    greedy = run(lively, ITEMS, 8)
    assert greedy.logprobs is None
    for drawn, tokens, stop in zip(greedy.sampled, greedy.tokens, greedy.stops):
        assert drawn[: len(tokens)] == tokens and len(drawn) == len(tokens) + (stop != "budget")
    zero = run(lively, ITEMS, 8, Sampling(temperature=0.0, seed=9))
    assert zero.tokens == greedy.tokens and zero.stops == greedy.stops
    assert torch.equal(zero.vectors, greedy.vectors)
    cold = run(lively, ITEMS, 8, Sampling(temperature=1e-4, seed=9), rollouts=2)  # T -> 0: the argmax wins
    assert cold.tokens == [t for t in greedy.tokens for _ in range(2)]
    hot = run(lively, ITEMS, 8, Sampling(temperature=1.0, seed=9))
    assert hot.tokens != greedy.tokens


def test_logprobs_equal_the_rescored_policy(lively):
    """The draw's log-probs are log softmax(z / T) of a forward over the finished sequence:
    GRPO's ratio pi_theta / pi_old is exactly 1 before the first update."""
    T = 0.7
    result = run(lively, ITEMS[:2], 6, Sampling(temperature=T, seed=2), rollouts=2)
    model, weight = lively.model, lively.model.output_embeddings()
    suppressed = lively.reasoning_plan().suppressed_ids  # the policy never writes image placeholders
    for row in range(4):
        item = lively.prepare(ITEMS[row // 2], 0, reasoning=True)
        batch = pack([item])
        drawn = result.sampled[row]
        start = int(batch.input_ids.numel())
        with torch.inference_mode():
            h, _ = model.hidden_states(_extend(batch, drawn[:-1], int(batch.position_ids.max()) + 1))
            logp = torch.log_softmax(masked_logits(weight, h, suppressed) / T, dim=-1)
        rescored = logp[start - 1 : start - 1 + len(drawn)].gather(-1, torch.tensor(drawn)[:, None]).squeeze(1)
        np.testing.assert_allclose(rescored.numpy(), result.logprobs[row], atol=1e-4, err_msg=f"row {row}")


def test_rollouts_on_the_triton_decoder(lively):
    fast = lively_encoder("triton")
    sampling = Sampling(temperature=1.0, seed=7)
    a = run(fast, ITEMS[:2], 4, sampling, rollouts=2)
    b = run(lively, ITEMS[:2], 4, sampling, rollouts=2)
    assert a.tokens == b.tokens
    np.testing.assert_allclose(a.logprobs, b.logprobs, atol=1e-4)
    assert (a.vectors - b.vectors).abs().max().item() <= 1e-4


def test_bad_sampling_arguments(lively):
    for kwargs, match in (({"temperature": -1.0}, "temperature"), ({"temperature": float("nan")}, "temperature"),
                          ({"top_p": 0.0}, "top_p"), ({"top_p": 1.5}, "top_p"), ({"seed": -3}, "seed")):
        with pytest.raises(ValueError, match=match):
            Sampling(**kwargs)
    with pytest.raises(ValueError, match="row_seeds has 1 seeds for 2"):
        Sampling(row_seeds=(1,)).seeds(2)
    with pytest.raises(ValueError, match="rollouts must be an integer >= 1"):
        run(lively, ITEMS[:1], 2, Sampling(), rollouts=0)
    with pytest.raises(ValueError, match="rollouts > 1 needs a Sampling"):
        run(lively, ITEMS[:1], 2, None, rollouts=2)
