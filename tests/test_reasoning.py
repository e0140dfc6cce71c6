"""Reasoning mode: batched KV-cache generation vs a rerun-everything loop, batch invariance,
budgets, early and late finishers, configs that cannot reason, the API and the CLI."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

import moon3rt
import moon3rt.generate as generate_module
from moon3rt import cli
from moon3rt.api import TINY_TOKENIZER, Encoder
from moon3rt.batching import pack
from moon3rt.checkpoint import save_model
from moon3rt.config import TINY_SPECIAL_IDS, ConfigError, Moon3Config
from moon3rt.generate import decoder_for, generate, generate_naive
from moon3rt.model import random_model
from moon3rt.prompt import load_tokenizer

ATOL = 1e-5  # fp32: the cache path and the rerun loop agree to rounding
END, EMB, EOS = TINY_SPECIAL_IDS["</think>"], TINY_SPECIAL_IDS["<emb>"], TINY_SPECIAL_IDS["<|im_end|>"]


def rgb(height: int, width: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


# five mixed items: text only, image + title, image only, two images + title, a long title
ITEMS = [
    "red cotton t-shirt",
    {"text": "navy tee", "image": rgb(60, 90, seed=1)},
    rgb(57, 61, seed=2),
    {"text": "two views", "images": [rgb(57, 83, seed=3), rgb(95, 73, seed=4)]},
    "brown leather oxford shoes with waxed laces and a stacked heel",
]


def untied_config() -> Moon3Config:
    cfg = Moon3Config.from_name("moon3-tiny")
    cfg.text.tie_word_embeddings = False
    return cfg


def lively_encoder(backend: str = "torch") -> Encoder:
    """moon3-tiny with an untied random LM head. With tied random weights every state is
    closest to its own input token, so the tiny preset repeats one token; a random head
    makes the greedy text depend on the context, which is what these tests need."""
    model = random_model(untied_config(), seed=0, lm_head=True)
    return Encoder(model, load_tokenizer(TINY_TOKENIZER), torch.device("cpu"), torch.float32, backend=backend)


@pytest.fixture(scope="module")
def tiny() -> Encoder:
    return moon3rt.load("moon3-tiny", device="cpu")


@pytest.fixture(scope="module")
def lively() -> Encoder:
    return lively_encoder()


def prepared(encoder: Encoder, items=ITEMS) -> list:
    return [encoder.prepare(item, i, reasoning=True) for i, item in enumerate(items)]


def assert_matches_naive(encoder: Encoder, items, plan, what: str):
    """Batched KV-cache generation == the rerun-everything loop, item by item."""
    prep = prepared(encoder, items)
    result = generate(encoder._decoder, pack(prep), plan, encoder.model.output_embeddings())
    for i, item in enumerate(prep):
        tokens, stop, vector = generate_naive(encoder.model, pack([item]), plan)
        assert result.tokens[i] == tokens, f"{what}, item {i}: cache {result.tokens[i]} vs rerun {tokens}"
        assert result.stops[i] == stop, f"{what}, item {i}"
        err = (result.vectors[i] - vector).abs().max().item()
        assert err <= ATOL, f"{what}, item {i}: vectors differ by {err:.2e}"
    return result


def unit_rows(vectors: np.ndarray) -> None:
    assert vectors.dtype == np.float32 and np.isfinite(vectors).all()
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)


# ---------------------------------------------------------------------------- prompt
def test_reasoning_prompt(tiny):
    title = "navy tee"
    direct = tiny.prepare({"text": title, "image": rgb(60, 90, seed=1)})
    item = tiny.prepare({"text": title, "image": rgb(60, 90, seed=1)}, reasoning=True)
    tok = tiny.prompt.tokenizer
    text = tok.decode(item.input_ids.tolist(), skip_special_tokens=False)
    request = tiny.config.reasoning.prompt
    assert text.endswith(f"{title}{request}<|im_end|>\n<|im_start|>assistant\n<think>\n"), text[-120:]
    # the title tokens (MHMF's text modality) are the title alone, as in direct mode
    assert tok.decode(item.input_ids[item.title_positions].tolist()) == title
    np.testing.assert_array_equal(item.title_positions, direct.title_positions)
    assert direct.input_ids[-1] == EMB  # direct mode keeps its prompt
    plan = tiny.reasoning_plan()
    assert plan.close_ids == (END, *tok.encode("\n").ids, EMB)
    assert plan.stop_ids[0] == END and EOS in plan.stop_ids
    assert plan.max_tokens == 64 and tiny.reasoning is False


# ------------------------------------------------------------------- cache == rerun loop
def test_cache_matches_rerun_loop_torch(tiny, lively):
    result = assert_matches_naive(lively, ITEMS, lively.reasoning_plan(10), "lively")
    assert len({tuple(t) for t in result.tokens}) >= 3, "the test needs items that generate different text"
    assert_matches_naive(tiny, ITEMS[:3], tiny.reasoning_plan(4), "moon3-tiny (tied LM head)")


def test_cache_matches_rerun_loop_1d_positions():
    # GME-style sequential positions continue the same way (1-D, max + 1)
    cfg = untied_config()
    cfg.flavour = "gme"
    model = random_model(cfg, seed=0, lm_head=True)
    encoder = Encoder(model, load_tokenizer(TINY_TOKENIZER), torch.device("cpu"), torch.float32)
    assert not encoder.config.uses_mrope
    assert_matches_naive(encoder, ITEMS[1:4], encoder.reasoning_plan(6), "1-D positions")


def test_cache_matches_rerun_loop_triton(monkeypatch):
    import moon3rt.backends.triton_backend as triton_backend

    fast = lively_encoder("triton")  # the reference loop runs on the same (fused-view) weights
    calls = []
    kernel = triton_backend.decode_attention
    monkeypatch.setattr(triton_backend, "decode_attention", lambda *a, **k: calls.append(1) or kernel(*a, **k))
    result = assert_matches_naive(fast, ITEMS[:4], fast.reasoning_plan(5), "triton")
    assert any(result.tokens)
    assert len(calls) == result.steps * fast.config.text.num_hidden_layers  # the decode kernel ran every step


# --------------------------------------------------------------------- batch invariance
def test_batch_invariance(lively):
    alone = [lively.encode([item], reasoning=True, max_reasoning_tokens=8, return_reasoning=True) for item in ITEMS]
    vectors = np.concatenate([v for v, _ in alone])
    texts = [t[0] for _, t in alone]
    unit_rows(vectors)
    order = [3, 0, 4, 2, 1]
    for kwargs, perm in (({}, list(range(5))), ({"batch_size": 2}, list(range(5))),
                         ({"batch_size": 3}, list(range(5))), ({}, order)):
        v, t = lively.encode([ITEMS[i] for i in perm], reasoning=True, max_reasoning_tokens=8,
                             return_reasoning=True, **kwargs)
        assert t == [texts[i] for i in perm], kwargs
        np.testing.assert_allclose(v, vectors[perm], atol=ATOL, err_msg=str(kwargs))


# --------------------------------------------------------------------------- budgets
def test_budget_is_respected_exactly(lively):
    plan = lively.reasoning_plan(3)
    result = generate(lively._decoder, pack(prepared(lively)), plan, lively.model.output_embeddings())
    for tokens, stop in zip(result.tokens, result.stops):
        assert len(tokens) <= 3
        assert (stop == "budget") == (len(tokens) == 3)
    assert "budget" in result.stops
    assert result.steps <= 3 + len(plan.close_ids)
    vectors, texts = lively.encode(ITEMS, reasoning=True, max_reasoning_tokens=3, return_reasoning=True)
    unit_rows(vectors)  # an item that hits the budget still embeds
    assert texts == [lively.prompt.tokenizer.decode(t) for t in result.tokens]

    # a zero budget closes at once: prompt + "</think>\n<emb>"
    zero = assert_matches_naive(lively, ITEMS[:2], lively.reasoning_plan(0), "budget 0")
    assert zero.tokens == [[], []] and zero.steps == len(plan.close_ids)
    with pytest.raises(ValueError, match="max_reasoning_tokens"):
        lively.encode(ITEMS[:1], reasoning=True, max_reasoning_tokens=-1)


def test_budget_must_fit_the_positions_and_the_cache(monkeypatch):
    """A budget the model's positions cannot hold is refused up front with the limit (a
    10**6 budget once decoded for minutes); a prompt too long for the budget fails alone."""
    cfg = untied_config()
    cfg.text.max_position_embeddings = 90
    enc = Encoder(random_model(cfg, seed=0, lm_head=True), load_tokenizer(TINY_TOKENIZER), torch.device("cpu"),
                  torch.float32)
    shortest, closing = enc.prompt.shortest_prompt(reasoning=True), 3
    most = 90 - shortest - closing
    assert enc.reasoning_plan(most).max_tokens == most
    for budget in (most + 1, 10**6):
        with pytest.raises(ValueError, match=f"max_reasoning_tokens={budget} cannot fit .* "
                                             f"max_position_embeddings=90 leaves at most {most} tokens"):
            enc.encode(["tee"], reasoning=True, max_reasoning_tokens=budget)
    long_title = "brown leather oxford shoes with waxed laces and a stacked heel, size 44"
    used = int(enc.prepare(long_title, reasoning=True).position_ids.max()) + 1
    budget = 90 - used - closing + 1  # one position too many for the long title, enough for "tee"
    result = enc.encode_with_report(["tee", long_title], reasoning=True, max_reasoning_tokens=budget)
    assert [f.index for f in result.failures] == [1]
    assert f"the prompt takes {used} positions" in result.failures[0].reason
    assert "more than max_position_embeddings=90" in result.failures[0].reason
    assert np.isfinite(result.embeddings[0]).all() and result.reasoning[1] is None

    # the KV cache of one item must fit the device's free memory
    monkeypatch.setattr(moon3rt.api, "free_memory", lambda device: 1000)
    with pytest.raises(ValueError, match=r"cannot fit in memory: one item's KV cache needs .* GiB .* free on cpu"):
        enc.encode(["tee"], reasoning=True, max_reasoning_tokens=4)


# ------------------------------------------------------------- early and late finishers
def test_early_and_late_finishers(lively, monkeypatch):
    plan = lively.reasoning_plan(9)
    free = generate(lively._decoder, pack(prepared(lively)), plan, lively.model.output_embeddings())
    assert all(len(t) == 9 for t in free.tokens)  # nobody stops by itself within 9 tokens

    # item 1 emits </think> as its first token (a forced logit), the others reason on
    real = generate_module.greedy_tokens
    calls = []

    def forced(weight, h, plan, row=1):
        tokens = real(weight, h, plan)
        calls.append(None)
        if len(calls) == 1:
            tokens[row] = END
        return tokens

    monkeypatch.setattr(generate_module, "greedy_tokens", forced)
    result = generate(lively._decoder, pack(prepared(lively)), plan, lively.model.output_embeddings())
    assert result.tokens[1] == [] and result.stops[1] == "end_marker"
    for i in (0, 2, 3, 4):
        assert result.tokens[i] == free.tokens[i] and result.stops[i] == "budget"
        assert (result.vectors[i] - free.vectors[i]).abs().max().item() <= ATOL, f"item {i}"
    calls.clear()
    monkeypatch.setattr(generate_module, "greedy_tokens", lambda w, h, p: forced(w, h, p, row=0))
    tokens, stop, vector = generate_naive(lively.model, pack(prepared(lively)[1:2]), plan)
    assert tokens == [] and stop == "end_marker"
    assert (result.vectors[1] - vector).abs().max().item() <= ATOL
    monkeypatch.setattr(generate_module, "greedy_tokens", real)

    # a stop id that item 2 writes as its third token: it (and whoever writes it) stops
    # early while the rest decode on; reported as "eos" (an end-of-text stop)
    stop_token = free.tokens[2][2]
    early = dataclasses.replace(plan, stop_ids=plan.stop_ids + (stop_token,))
    result = assert_matches_naive(lively, ITEMS, early, "extra stop id")
    assert len(result.tokens[2]) <= 2 and result.stops[2] == "eos"
    assert "budget" in result.stops, "the batch should mix early and late finishers"


# ------------------------------------------------------------------ direct mode intact
def test_reasoning_false_is_direct_mode(tiny):
    direct = tiny.encode(ITEMS)
    np.testing.assert_array_equal(tiny.encode(ITEMS, reasoning=False), direct)
    reasoner = moon3rt.load("moon3-tiny", device="cpu", reasoning=True)
    assert reasoner.reasoning is True
    np.testing.assert_array_equal(reasoner.encode(ITEMS, reasoning=False), direct)
    assert tiny.encode_with_report(ITEMS).reasoning is None
    with pytest.raises(ValueError, match="return_reasoning=True needs reasoning"):
        tiny.encode(ITEMS, return_reasoning=True)
    # reasoning changes the vector (the <emb> state follows the generated text)
    reasoned = reasoner.encode(ITEMS, max_reasoning_tokens=2)
    unit_rows(reasoned)
    assert np.abs(reasoned - direct).max() > 1e-3


def test_return_reasoning_and_report(lively):
    items = ITEMS[:2] + [{"text": "bad", "image": b"not an image"}]
    report = lively.encode_with_report(items, reasoning=True, max_reasoning_tokens=4)
    assert [f.index for f in report.failures] == [2]
    assert isinstance(report.reasoning[0], str) and isinstance(report.reasoning[1], str)
    assert report.reasoning[0] and report.reasoning[2] is None
    assert np.isnan(report.embeddings[2]).all()
    with pytest.warns(UserWarning, match="skipped"):
        vectors, texts = lively.encode(items, reasoning=True, max_reasoning_tokens=4, return_reasoning=True,
                                       on_error="skip")
    assert texts == report.reasoning
    np.testing.assert_allclose(vectors[:2], report.embeddings[:2], atol=ATOL)


# ------------------------------------------------------------------- what cannot reason
def encoder_for(cfg: Moon3Config, **kwargs) -> Encoder:
    model = random_model(cfg, seed=0, **kwargs)
    return Encoder(model, load_tokenizer(TINY_TOKENIZER), torch.device("cpu"), torch.float32)


@pytest.mark.parametrize(
    "edit, match",
    [
        (lambda m: setattr(m, "pooling", "last"), "needs moon3.pooling='emb_token'.*'last'"),
        (lambda m: (setattr(m, "pooling", "mean"), setattr(m, "embed_token_id", None)),
         "moon3.embed_token_id is not set"),
        (lambda m: setattr(m.reasoning, "end_marker", "</reason>"), "end_marker='</reason>' is not one token"),
    ],
)
def test_configs_that_cannot_reason(edit, match):
    cfg = Moon3Config.from_name("moon3-tiny")
    edit(cfg.moon3)
    encoder = encoder_for(cfg.validate())
    unit_rows(encoder.encode(ITEMS[:2]))  # direct mode is unaffected
    with pytest.raises(ValueError, match="cannot run reasoning mode: .*" + match):
        encoder.encode(ITEMS[:2], reasoning=True)


def test_plain_backbone_cannot_reason():
    cfg = Moon3Config.from_name("moon3-tiny")
    cfg.moon3, cfg.flavour = None, "qwen2-vl"
    encoder = encoder_for(cfg.validate())
    with pytest.raises(ValueError, match="needs a MOON3 checkpoint"):
        encoder.encode(ITEMS[:1], reasoning=True)


def test_backend_without_decode_path():
    with pytest.raises(ValueError, match="backend 'onnxruntime' has no decode path"):
        decoder_for(SimpleNamespace(name="onnxruntime"))


# ------------------------------------------------------------------------ checkpoints
def checkpoint(model, directory: Path) -> Path:
    save_model(model, directory)
    shutil.copy(TINY_TOKENIZER, directory / "tokenizer.json")
    return directory


def test_untied_checkpoint_without_lm_head(tmp_path):
    directory = checkpoint(random_model(untied_config(), seed=0), tmp_path)
    encoder = moon3rt.load(directory)  # loads: direct mode needs no logits
    assert getattr(encoder.model, "lm_head", None) is None
    unit_rows(encoder.encode(ITEMS[:2]))
    with pytest.raises(ValueError, match="untied word embeddings .* no lm_head.weight"):
        encoder.encode(ITEMS[:2], reasoning=True)


def test_untied_checkpoint_with_lm_head_loads_it(tmp_path, lively):
    directory = checkpoint(lively.model, tmp_path)
    assert "lm_head.weight" in load_file(str(directory / "model.safetensors"))
    encoder = moon3rt.load(directory)
    assert torch.equal(encoder.model.lm_head.weight, lively.model.lm_head.weight)
    assert encoder.model.output_embeddings() is encoder.model.lm_head.weight
    a = encoder.encode(ITEMS[:2], reasoning=True, max_reasoning_tokens=4, return_reasoning=True)
    b = lively.encode(ITEMS[:2], reasoning=True, max_reasoning_tokens=4, return_reasoning=True)
    assert a[1] == b[1]
    np.testing.assert_allclose(a[0], b[0], atol=ATOL)


def test_tied_checkpoint_ignores_lm_head(tmp_path, tiny):
    directory = checkpoint(tiny.model, tmp_path)
    state = load_file(str(directory / "model.safetensors"))
    state["lm_head.weight"] = torch.randn_like(state["model.language_model.embed_tokens.weight"])
    save_file(state, str(directory / "model.safetensors"))
    encoder = moon3rt.load(directory)
    assert getattr(encoder.model, "lm_head", None) is None
    assert encoder.model.output_embeddings() is encoder.model.language_model.embed_tokens.weight


def test_config_block_sets_the_defaults(tmp_path, tiny):
    directory = checkpoint(tiny.model, tmp_path)
    raw = json.loads((directory / "config.json").read_text())
    assert raw["moon3"]["reasoning"] == {
        "enabled": False, "prompt": tiny.config.reasoning.prompt, "start_marker": "<think>",
        "end_marker": "</think>", "max_tokens": 64,
    }
    raw["moon3"]["reasoning"].update(enabled=True, max_tokens=2)
    (directory / "config.json").write_text(json.dumps(raw))
    encoder = moon3rt.load(directory)
    assert encoder.reasoning is True and encoder.reasoning_plan().max_tokens == 2
    vectors, texts = encoder.encode(ITEMS[:2], return_reasoning=True)
    unit_rows(vectors)
    assert texts == ["\n\n", "\n\n"]  # moon3-tiny's tied random weights repeat the newline
    assert moon3rt.load(directory, reasoning=False).encode_with_report(ITEMS[:1]).reasoning is None

    for edit, match in (({"max_tokens": -1}, "max_tokens"), ({"stop": "x"}, "unknown keys \\['stop'\\]")):
        bad = json.loads(json.dumps(raw))
        bad["moon3"]["reasoning"].update(edit)
        (directory / "config.json").write_text(json.dumps(bad))
        with pytest.raises(ConfigError, match=match):
            moon3rt.load(directory)


# ------------------------------------------------------------------------------ CLI
def cli_input(directory: Path) -> Path:
    path = directory / "items.jsonl"
    path.write_text(json.dumps({"id": "a", "text": "red tee"}) + "\n" + json.dumps({"id": "b", "text": "green mug"})
                    + "\nnot json\n")
    return path


def test_cli_writes_the_reasoning(tmp_path, capsys):
    out = tmp_path / "vectors.npy"
    args = ["encode", "--input", str(cli_input(tmp_path)), "--output", str(out), "--device", "cpu", "--no-progress"]
    assert cli.main(args + ["--reasoning", "--max-reasoning-tokens", "2"]) == 0, capsys.readouterr().err
    rows = [json.loads(line) for line in (tmp_path / "vectors.reasoning.jsonl").read_text().splitlines()]
    assert [r["id"] for r in rows] == ["a", "b", "line 3"]
    assert rows[0]["reasoning"] == "\n\n" and rows[2]["reasoning"] is None
    vectors = np.load(out)
    assert vectors.shape == (3, 48) and np.isnan(vectors[2]).all()
    (tmp_path / "vectors.reasoning.jsonl").unlink()
    assert cli.main(args) == 0  # direct mode writes no sidecar
    assert not (tmp_path / "vectors.reasoning.jsonl").exists()


def test_cli_parquet_has_a_reasoning_column(tmp_path):
    pq = pytest.importorskip("pyarrow.parquet", reason="the parquet extra (CI installs it: tests/test_environment.py)")
    out = tmp_path / "vectors.parquet"
    assert cli.main(["encode", "--input", str(cli_input(tmp_path)), "--output", str(out), "--device", "cpu",
                     "--reasoning", "--max-reasoning-tokens", "2", "--no-progress"]) == 0
    table = pq.read_table(out).to_pydict()
    assert table["reasoning"] == ["\n\n", "\n\n", None]
