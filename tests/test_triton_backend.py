"""backend="triton" (fused kernels) against backend="torch" on whole models."""

import numpy as np
import pytest
import torch
from PIL import Image

import moon3rt
from moon3rt.backends import create_backend
from moon3rt.backends.cuda_graphs import GraphCache
from moon3rt.batching import pack
from moon3rt.checkpoint import load_model, save_model


def items(seed=0, image_size=(64, 96)):
    rng = np.random.default_rng(seed)
    img = lambda h, w: Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))  # noqa: E731
    return [
        {"text": "Red cotton crew-neck t-shirt", "image": img(*image_size)},
        "brown leather shoes",
        {"images": [img(57, 83), img(100, 40)]},
        {"text": "green ceramic mug, 350 ml", "images": [img(70, 70)]},
        "a",
    ]


@pytest.fixture(scope="module")
def pair():
    device = "cuda" if torch.cuda.is_available() else "cpu"
    return (moon3rt.load("moon3-tiny-random", device=device, dtype="fp32"),
            moon3rt.load("moon3-tiny-random", device=device, dtype="fp32", backend="triton"))


def test_tiny_embeddings_match_torch_backend(pair):
    ref, fast = pair
    a, b = ref.encode(items()), fast.encode(items())
    assert np.abs(a - b).max() < 1e-5, np.abs(a - b).max()
    assert ((a * b).sum(1) > 0.99999).all()


def test_tiny_hidden_states_match(pair):
    ref, fast = pair
    batch = pack([ref.prepare(x, i) for i, x in enumerate(items(1))])
    with torch.no_grad():
        h_ref, v_ref = ref.model.hidden_states(batch.to(ref.device))
    h, v = fast.backend.hidden_states(batch)
    assert (h - h_ref).abs().max() < 1e-4
    assert (v - v_ref).abs().max() < 1e-4


def test_batch_invariance(pair):
    _, fast = pair
    objs = items(2)
    together = fast.encode(objs)
    alone = np.concatenate([fast.encode([x]) for x in objs])
    assert np.abs(together - alone).max() < 1e-5


def _eager_capture(forward, static, pool):
    """Stands in for a CUDA graph: replays the forward on the padded static inputs, eagerly."""
    return lambda: forward(static)


def test_padded_graph_inputs_give_the_same_embeddings(pair):
    # what a CUDA graph replays: each batch padded into its bucket (extra items, tokens, images,
    # patches); the real rows, and so the embeddings, must not change
    _, fast = pair
    objs = items(5)
    eager = fast.encode(objs)
    fast.backend.graphs = GraphCache(fast.backend.forward, min_uses=1, capture=_eager_capture)
    try:
        padded = fast.encode(objs)
        stats = fast.backend.graphs.stats
    finally:
        fast.backend.graphs = None
    assert stats["replays"] >= 1 and stats["eager"] == 0, stats
    assert np.abs(padded - eager).max() < 1e-5, np.abs(padded - eager).max()


def test_fused_weights_are_views_and_the_model_still_saves(pair, tmp_path):
    ref, fast = pair
    attn = fast.model.language_model.layers[0].self_attn
    fused, _ = fast.backend.qkv[0]
    assert attn.q_proj.weight.data_ptr() == fused.data_ptr(), "q/k/v must live in the fused GEMM weight"
    save_model(fast.model, tmp_path)
    reloaded = load_model(tmp_path)
    for name, p in fast.model.state_dict().items():
        assert torch.equal(reloaded.state_dict()[name].to(p.device), p), name


def test_refuses_cpu_without_interpreter(monkeypatch):
    if torch.cuda.is_available():
        pytest.skip("the refusal is about machines without CUDA")
    enc = moon3rt.load("moon3-tiny-random", device="cpu")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(ValueError, match="needs a CUDA device"):
        create_backend("triton", enc.model, torch.device("cpu"))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="GPU case: real moon3-2b shapes in bf16")
def test_moon3_2b_bf16_matches_torch_backend():
    ref = moon3rt.load("moon3-2b", device="cuda", dtype="bf16")
    fast = moon3rt.Encoder(ref.model, ref.prompt.tokenizer, ref.device, ref.dtype, backend="triton")
    objs = items(3, image_size=(448, 448))
    a = ref.encode(objs)
    b = fast.encode(objs)
    cos = (a * b).sum(1)
    assert (cos > 0.999).all(), cos


def test_fused_gemm_epilogues_match_torch_backend(pair):
    # fc1 + QuickGELU and gate/up + SwiGLU as Triton GEMMs with the activation in the epilogue
    ref, _ = pair
    fused = moon3rt.load("moon3-tiny-random", device=ref.device, dtype="fp32", backend="triton")
    fused.backend.gemm_epilogue = "fused"
    batch = pack([ref.prepare(x, i) for i, x in enumerate(items(4))])
    with torch.no_grad():
        h_ref, v_ref = ref.model.hidden_states(batch.to(ref.device))
    h, v = fused.backend.hidden_states(batch)
    assert (h - h_ref).abs().max() < 1e-4
    assert (v - v_ref).abs().max() < 1e-4
    with pytest.raises(ValueError, match="gemm_epilogue"):
        type(fused.backend)(fused.model, fused.device, gemm_epilogue="cutlass")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="GPU case: CUDA graph capture and replay")
@pytest.mark.parametrize("model, dtype, objs, cos_min", [
    ("moon3-tiny", "fp32", items(6), None),
    ("moon3-2b", "bf16", items(7, image_size=(448, 448))[:1], 0.9999),  # the single-item latency case
])
def test_cuda_graphs_match_eager(model, dtype, objs, cos_min):
    enc = moon3rt.load(model, device="cuda", dtype=dtype, backend="triton")
    graphs = enc.backend.graphs
    assert graphs is not None, "CUDA graphs are on by default on CUDA"
    enc.backend.graphs = None
    eager = enc.encode(objs)
    enc.backend.graphs = graphs
    runs = [enc.encode(objs) for _ in range(3)]  # eager, capture + replay, replay
    assert graphs.stats["captures"] >= 1 and graphs.stats["replays"] >= 2, graphs.stats
    for out in runs:
        if cos_min is None:
            assert np.abs(out - eager).max() < 1e-5, np.abs(out - eager).max()
        else:
            assert ((out * eager).sum(1) > cos_min).all()
