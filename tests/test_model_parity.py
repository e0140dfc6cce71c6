"""The reference model against transformers' Qwen2VLModel on tiny random configs (fp32)."""

import numpy as np
import pytest
import torch
from crafted import noise_image
from oracle import hf_last_hidden, random_hf_model

from moon3rt.batching import pack
from moon3rt.checkpoint import load_model
from moon3rt.config import Moon3Config
from moon3rt.prompt import PromptBuilder, load_tokenizer

TOKENIZER = "moon3rt/assets/moon3-tiny/tokenizer.json"
ATOL = 1e-4


def backbone_config(flavour: str) -> Moon3Config:
    cfg = Moon3Config.from_name("moon3-tiny-random")
    cfg.moon3 = None
    cfg.flavour = flavour
    return cfg.validate()


@pytest.fixture(scope="module", params=["qwen2-vl", "gme"])
def pair(request, tmp_path_factory):
    """(transformers model, our model loaded from its save_pretrained, prompt builder)."""
    cfg = backbone_config(request.param)
    hf = random_hf_model(cfg, seed=1)
    path = tmp_path_factory.mktemp(request.param)
    hf.save_pretrained(path)
    ours = load_model(path, flavour=request.param)
    assert ours.cfg.flavour == request.param
    from pathlib import Path

    builder = PromptBuilder(ours.cfg, load_tokenizer(Path(__file__).parents[1] / TOKENIZER))
    return hf, ours, builder


CASES = {
    "image+text": lambda b: b.build("Red cotton crew-neck t-shirt", [noise_image(60, 90, 0)]),
    "two-odd-images": lambda b: b.build("two views", [noise_image(37, 101, 1), noise_image(113, 47, 2)]),
    "text-only": lambda b: b.build("navy linen shirt, size M", []),
    "image-only": lambda b: b.build(None, [noise_image(75, 75, 3)]),
}


def check(hf, ours, items):
    batch = pack(items)
    with torch.no_grad():
        hidden, _ = ours.hidden_states(batch)
    bounds = batch.cu_seqlens.tolist()
    for i, item in enumerate(items):
        ref = hf_last_hidden(hf, item, ours.cfg.image_token_id, mrope=ours.cfg.uses_mrope)
        got = hidden[bounds[i] : bounds[i + 1]]
        err = (got - ref).abs().max().item()
        assert err <= ATOL, f"item {i}: max abs error {err:.3g} > {ATOL}"


@pytest.mark.parametrize("case", list(CASES))
def test_single_item_matches_transformers(pair, case):
    hf, ours, builder = pair
    check(hf, ours, [CASES[case](builder)])


def test_mixed_packed_batch_matches_transformers(pair):
    hf, ours, builder = pair
    items = [make(builder) for make in CASES.values()] + [CASES["image+text"](builder)]
    check(hf, ours, items)


def test_positions_follow_flavour(pair):
    _, ours, builder = pair
    item = CASES["two-odd-images"](builder)
    pos = item.position_ids
    if ours.cfg.flavour == "gme":
        assert (pos == np.arange(item.num_tokens)).all(), "GME uses sequential 1-D positions"
    else:
        assert not (pos[1] == pos[2]).all(), "M-RoPE gives image tokens distinct h/w positions"
        assert pos.max() < item.num_tokens - 1, "M-RoPE compresses image positions"
