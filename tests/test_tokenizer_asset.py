"""Checks on the assets shipped with the package: the tiny tokenizer and the sample catalogue."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
from tokenizers import Tokenizer

from moon3rt.config import TINY_SPECIAL_IDS

ASSETS = Path(__file__).resolve().parents[1] / "moon3rt" / "assets"
TOKENIZER_JSON = ASSETS / "moon3-tiny" / "tokenizer.json"
CATALOGUE = ASSETS / "catalogue"

SPECIALS = list(TINY_SPECIAL_IDS)  # the ids the presets are built on


def _load_script(name: str):
    path = ASSETS / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"_moon3rt_assets_{name}", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return Tokenizer.from_file(str(TOKENIZER_JSON))


def test_vocab_size(tok):
    assert tok.get_vocab_size(with_added_tokens=True) == 1024
    assert len(tok.get_vocab(with_added_tokens=True)) == 1024
    assert sorted(tok.get_vocab(with_added_tokens=True).values()) == list(range(1024))


def test_special_ids(tok):
    for i, t in enumerate(SPECIALS):
        assert tok.token_to_id(t) == i
        assert tok.id_to_token(i) == t
    added = tok.get_added_tokens_decoder()
    assert sorted(added) == list(range(10))
    for i, t in added.items():
        assert t.content == SPECIALS[i]
        assert t.special


def test_layout_matches_qwen2_style():
    cfg = json.loads(TOKENIZER_JSON.read_text(encoding="utf-8"))
    assert cfg["normalizer"] is None
    assert cfg["pre_tokenizer"]["type"] == "ByteLevel"
    assert cfg["pre_tokenizer"]["add_prefix_space"] is False
    assert cfg["pre_tokenizer"]["use_regex"] is True
    assert cfg["decoder"]["type"] == "ByteLevel"
    assert cfg["model"]["type"] == "BPE"
    # A post-processor, if any, must not add tokens.
    assert cfg["post_processor"] is None or cfg["post_processor"]["type"] == "ByteLevel"


def test_no_bos_eos_added(tok):
    ids = tok.encode("red t-shirt").ids
    assert ids == tok.encode("red t-shirt", add_special_tokens=False).ids
    assert not set(ids) & set(range(10))


def test_specials_atomic_in_text(tok):
    assert tok.encode("a<|vision_start|><|image_pad|><|vision_end|>b").ids[1:4] == [3, 5, 4]
    enc = tok.encode("a<|vision_start|><|image_pad|><|vision_end|>b")
    assert enc.tokens == ["a", "<|vision_start|>", "<|image_pad|>", "<|vision_end|>", "b"]
    text = "<|im_start|>user\n<|vision_start|>" + "<|image_pad|>" * 7 + "<|vision_end|>Red dress<|im_end|>\n<emb>"
    ids = tok.encode(text).ids
    assert ids.count(5) == 7
    assert ids[0] == 1 and ids[-1] == 7 and ids.count(2) == 1
    assert tok.decode(ids, skip_special_tokens=False) == text


def test_byte_alphabet_covered(tok):
    from tokenizers import pre_tokenizers

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    assert len(alphabet) == 256
    assert all(tok.token_to_id(c) is not None for c in alphabet)


@pytest.mark.parametrize(
    "text",
    [
        "Red cotton crew-neck t-shirt, size M",
        "Café crème — naïve façade, Größe 42, años",
        "红色纯棉T恤 连衣裙 陶瓷杯",
        "emoji 👍🏽🛍️👟 and ZWJ 👩‍💻",
        "tabs\tand\nnewlines  double  spaces ",
        "".join(chr(c) for c in range(1, 128)),
        "\u0000\u00ff\u0100\U0010ffff",
    ],
)
def test_unicode_round_trip(tok, text):
    enc = tok.encode(text)
    assert all(0 <= i < 1024 for i in enc.ids)
    assert tok.decode(enc.ids, skip_special_tokens=False) == text


def test_rebuild_is_identical(tmp_path):
    mod = _load_script("build_tiny_tokenizer")
    out = mod.build(tmp_path / "tokenizer.json")
    assert Path(out).read_bytes() == TOKENIZER_JSON.read_bytes()


def test_sample_catalogue():
    from PIL import Image

    items_path = CATALOGUE / "items.jsonl"
    lines = [ln for ln in items_path.read_text(encoding="utf-8").splitlines() if ln.strip()]
    assert len(lines) >= 8
    ids = set()
    for ln in lines:
        item = json.loads(ln)
        assert set(item) >= {"id", "text", "image"}
        assert item["id"] not in ids
        ids.add(item["id"])
        assert item["text"].strip()
        img_path = (items_path.parent / item["image"]).resolve()
        assert img_path.is_file(), img_path
        with Image.open(img_path) as im:
            im.load()
            assert im.mode == "RGB"
            assert 200 <= min(im.size) and max(im.size) <= 320
    queries = [q for q in (CATALOGUE / "queries.txt").read_text(encoding="utf-8").splitlines() if q.strip()]
    assert len(queries) >= 4
