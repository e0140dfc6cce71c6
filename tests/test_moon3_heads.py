"""FIRE, MHMF, pooling, projection and Matryoshka truncation of the reference model."""

import copy
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import moon3rt
from moon3rt.batching import pack
from moon3rt.config import Moon3Config
from moon3rt.model import embed, random_model


@pytest.fixture(scope="module")
def encoder():
    return moon3rt.load("moon3-tiny-random", device="cpu", dtype="fp32")


def items():
    rng = np.random.default_rng(0)
    img = lambda h, w: Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))  # noqa: E731
    return [
        {"text": "Red cotton crew-neck t-shirt", "image": img(64, 96)},
        "brown leather shoes",
        {"images": [img(57, 83), img(100, 40)]},
        {"text": "green mug", "images": [img(70, 70)]},
    ]


def batch_for(encoder, objs):
    return pack([encoder.prepare(o, i) for i, o in enumerate(objs)])


def plain_hidden_states(model, batch):
    """Hidden states with FIRE taken out of the model (and put back)."""
    fire = model.moon3.fire
    del model.moon3.fire
    try:
        return model.hidden_states(batch)[0]
    finally:
        model.moon3.fire = fire


def test_fire_with_zero_alpha_is_the_plain_backbone(encoder):
    batch = batch_for(encoder, items())
    model = encoder.model
    with torch.no_grad():
        with_fire, _ = model.hidden_states(batch)
        saved = model.moon3.fire.alpha.detach().clone()
        model.moon3.fire.alpha.zero_()
        zero_alpha, _ = model.hidden_states(batch)
        model.moon3.fire.alpha.copy_(saved)
        plain = plain_hidden_states(model, batch)
    assert torch.equal(zero_alpha, plain), "alpha = 0 must leave every hidden state bit-identical"
    assert (with_fire - plain).abs().max() > 1e-4, "alpha != 0 must change the image-token states"


def test_fire_only_touches_image_rows_directly(encoder):
    """After the first FIRE layer the text rows before any image are unchanged (causal)."""
    model = encoder.model
    batch = batch_for(encoder, [items()[0]])
    first_image = int(torch.nonzero(batch.input_ids == encoder.config.image_token_id)[0])
    with torch.no_grad():
        h_fire, _ = model.hidden_states(batch)
        h_plain = plain_hidden_states(model, batch)
    assert torch.equal(h_fire[:first_image], h_plain[:first_image])


def mhmf_loop(fusion, e, x_img, cu_img, x_txt, cu_txt):
    """DESIGN.md's MHMF written out head by head and modality by modality."""
    W = {n: p.detach().double() for n, p in fusion.named_parameters()}
    H, Df = fusion.num_heads, fusion.head_dim
    out = []
    for b in range(e.shape[0]):
        eb = e[b].double()
        heads = []
        for h in range(H):
            rows = slice(h * Df, (h + 1) * Df)
            q = W["q_proj.weight"][rows] @ eb + W["q_proj.bias"][rows]
            gate = W["gate.weight"][h * 2 : h * 2 + 2] @ eb + W["gate.bias"][h * 2 : h * 2 + 2]
            outs, logits = [], []
            for m, (x, cu) in enumerate(((x_img, cu_img), (x_txt, cu_txt))):
                xs = x[int(cu[b]) : int(cu[b + 1])].double()
                if len(xs) == 0:
                    continue
                k = xs @ W["k_proj.weight"][rows].T + W["k_proj.bias"][rows]
                v = xs @ W["v_proj.weight"][rows].T + W["v_proj.bias"][rows]
                a = torch.softmax(k @ q / math.sqrt(Df), dim=0)
                outs.append(a @ v)
                logits.append(gate[m])
            g = torch.softmax(torch.stack(logits), dim=0)
            heads.append(sum(gi * oi for gi, oi in zip(g, outs)))
        o = torch.cat(heads)
        out.append(eb + W["o_proj.weight"] @ o)
    return torch.stack(out)


def test_mhmf_matches_per_head_loop(encoder):
    fusion = encoder.model.moon3.fusion
    g = torch.Generator().manual_seed(0)
    d = encoder.config.text.hidden_size
    e = torch.randn(4, d, generator=g)
    x_img, cu_img = torch.randn(9, d, generator=g), torch.tensor([0, 4, 4, 9, 9])  # items 1, 3: no image
    x_txt, cu_txt = torch.randn(6, d, generator=g), torch.tensor([0, 1, 4, 4, 6])  # item 2: no title
    with torch.no_grad():
        got = fusion(e, x_img, cu_img, x_txt, cu_txt)
    ref = mhmf_loop(fusion, e, x_img, cu_img, x_txt, cu_txt)
    assert (got.double() - ref).abs().max() < 1e-5


def test_mhmf_single_modality_ignores_the_gate(encoder):
    """With one modality present, the gate's softmax is over that modality alone (weight 1)."""
    fusion = copy.deepcopy(encoder.model.moon3.fusion)
    d = encoder.config.text.hidden_size
    e, x = torch.randn(1, d), torch.randn(3, d)
    empty, cu = torch.zeros(0, d), torch.tensor([0, 3])
    with torch.no_grad():
        before = fusion(e, x, cu, empty, torch.tensor([0, 0]))
        fusion.gate.bias.add_(5.0)
        after = fusion(e, x, cu, empty, torch.tensor([0, 0]))
    assert torch.allclose(before, after, atol=1e-6)


def test_matryoshka_truncates_then_normalises(encoder):
    batch = batch_for(encoder, items())
    with torch.no_grad():
        full = embed(encoder.model, batch, normalize=False)
        for dim in encoder.config.moon3.matryoshka_dims:
            got = embed(encoder.model, batch, dim=dim)
            assert got.shape == (4, dim)
            assert torch.allclose(got, F.normalize(full[:, :dim], dim=-1), atol=1e-6)
            assert torch.allclose(got.norm(dim=-1), torch.ones(4), atol=1e-6)


@pytest.mark.parametrize("pooling", ["emb_token", "last", "mean"])
def test_pooling_reads_the_right_states(pooling):
    cfg = Moon3Config.from_name("moon3-tiny-random")
    cfg.moon3.pooling = pooling
    cfg.moon3.fusion = None
    cfg.moon3.projection_dim = None
    cfg.moon3.matryoshka_dims = []
    enc = moon3rt.Encoder(random_model(cfg.validate()), moon3rt.load().prompt.tokenizer, torch.device("cpu"),
                          torch.float32)
    objs = ["white canvas sneakers", {"text": "black backpack", "image": np.full((56, 84, 3), 90, np.uint8)}]
    batch = batch_for(enc, objs)
    with torch.no_grad():
        hidden, _ = enc.model.hidden_states(batch)
        y = enc.model(batch)
    bounds = batch.cu_seqlens.tolist()
    for i in range(2):
        seg = hidden[bounds[i] : bounds[i + 1]]
        expected = seg.mean(0) if pooling == "mean" else seg[-1]
        assert torch.allclose(y[i], expected, atol=1e-6)
    last_token = batch.input_ids[bounds[1] - 1].item()
    token = enc.prompt.tokenizer.id_to_token(last_token)
    assert token == ("<emb>" if pooling == "emb_token" else "<|endoftext|>")
