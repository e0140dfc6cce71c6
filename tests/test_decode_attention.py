"""Decode attention (one query per item over its KV cache) vs per-item SDPA (kernels/decode_attention.py)."""

import pytest
import torch
from moon3rt.kernels.decode_attention import decode_attention, decode_attention_ref
from moon3rt.kernels.testing import (
    assert_close,
    assert_within_baseline,
    interpreter_or_cuda,
    kernel_dtypes,
)

DEVICE = interpreter_or_cuda()
DTYPES = kernel_dtypes()

# (Hq, Hk, D): MHA (GQA ratio 1); ratio 6 at Qwen2-VL-2B's 12/2 heads; ratio 6 with one kv
# head; D = 24 is not a power of two
HEADS = [(2, 2, 16), (12, 2, 32), (6, 1, 24)]
# cache lengths per item: 1, primes, the interpreter's 16-key blocks +-1, a full slot (L = 40)
LENGTHS = [[1], [7, 1, 13], [16, 17, 15, 40, 31]]
CHUNKS = [None, 16, 5, 64]  # one pass; split-K on block boundaries; odd chunks that cut blocks; one chunk


def _case(lengths, hq, hk, d, dtype, seed, slots_total=6, max_len=40):
    """q for len(lengths) items and a cache of `slots_total` slots; items use scattered slots."""
    g = torch.Generator().manual_seed(seed)
    a = len(lengths)
    q = torch.randn(a, hq, d, generator=g).to(DEVICE, dtype)
    k = torch.randn(slots_total, max_len, hk, d, generator=g).to(DEVICE, dtype)
    v = torch.randn(slots_total, max_len, hk, d, generator=g).to(DEVICE, dtype)
    slots = torch.randperm(slots_total, generator=g)[:a].to(DEVICE, torch.int32)
    lengths = torch.tensor(lengths, dtype=torch.int32, device=DEVICE)
    return q, k, v, slots, lengths


def _check(out, q, k, v, slots, lengths, scale=None, name="o"):
    """fp32: the table's tolerance; fp16/bf16: at most twice plain torch's error, both vs fp32."""
    if out.dtype == torch.float32:
        assert_close(out, decode_attention_ref(q, k, v, slots, lengths, scale), name=name)
        return
    expected = decode_attention_ref(q.float(), k.float(), v.float(), slots, lengths, scale)
    baseline = decode_attention_ref(q, k, v, slots, lengths, scale)
    assert_within_baseline(out, expected, baseline, factor=2.0, name=name)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kv_chunk", CHUNKS)
@pytest.mark.parametrize("lengths", LENGTHS)
@pytest.mark.parametrize("hq, hk, d", HEADS)
def test_decode_attention(hq, hk, d, lengths, kv_chunk, dtype):
    q, k, v, slots, lens = _case(lengths, hq, hk, d, dtype, seed=hq * 10 + d + len(lengths))
    out = decode_attention(q, k, v, slots, lens, kv_chunk=kv_chunk)
    assert out.shape == q.shape and out.dtype == dtype and out.is_contiguous()
    _check(out, q, k, v, slots, lens, name=f"o (kv_chunk={kv_chunk})")


@pytest.mark.parametrize("dtype", DTYPES)
def test_views_of_a_layered_cache_and_fused_projection(dtype):
    # as the decode step calls it: q a strided view into the fused [q | k | v] projection,
    # the caches one layer of a (layers, N, L, Hk, D) tensor, int64 slots and lengths
    hq, hk, d, layers = 6, 2, 32, 3
    g = torch.Generator().manual_seed(3)
    qkv = torch.randn(4, (hq + 2 * hk) * d, generator=g).to(DEVICE, dtype)
    q = qkv[:, : hq * d].view(4, hq, d)
    cache_k = torch.randn(layers, 5, 23, hk, d, generator=g).to(DEVICE, dtype)
    cache_v = torch.randn(layers, 5, 23, hk, d, generator=g).to(DEVICE, dtype)
    slots = torch.tensor([4, 0, 2, 3], device=DEVICE)
    lengths = torch.tensor([23, 1, 11, 2], device=DEVICE)
    assert not q.is_contiguous()
    for kv_chunk in (None, 8):
        out = decode_attention(q, cache_k[1], cache_v[1], slots, lengths, kv_chunk=kv_chunk)
        _check(out, q, cache_k[1], cache_v[1], slots, lengths, name=f"o (views, kv_chunk={kv_chunk})")


def test_custom_scale_and_large_scores():
    q, k, v, slots, lens = _case([9, 30], 4, 2, 16, torch.float32, seed=4)
    q = 30.0 * q
    for kv_chunk in (None, 7):
        out = decode_attention(q, k, v, slots, lens, scale=0.3, kv_chunk=kv_chunk)
        assert torch.isfinite(out).all()
        _check(out, q, k, v, slots, lens, scale=0.3, name=f"o (scale 0.3, kv_chunk={kv_chunk})")


def test_items_are_independent_of_the_batch():
    # an item's output is bit-identical alone and in a batch, split or not: chunks are fixed
    # key ranges, and an item that fits one chunk gets exactly the one-pass result
    q, k, v, slots, lens = _case([5, 33, 12], 4, 2, 16, torch.float32, seed=5)
    for kv_chunk in (None, 16):
        together = decode_attention(q, k, v, slots, lens, kv_chunk=kv_chunk)
        for i in range(3):
            alone = decode_attention(q[i : i + 1], k, v, slots[i : i + 1], lens[i : i + 1], kv_chunk=kv_chunk)
            assert torch.equal(together[i : i + 1], alone), f"item {i}, kv_chunk={kv_chunk}"
    short = lens < 16
    one_pass = decode_attention(q, k, v, slots, lens)
    split = decode_attention(q, k, v, slots, lens, kv_chunk=16)
    assert torch.equal(one_pass[short], split[short])


def test_empty_and_bad_inputs():
    q, k, v, slots, lens = _case([], 2, 1, 16, torch.float32, seed=0)
    assert decode_attention(q, k, v, slots, lens).shape == (0, 2, 16)
    q, k, v, slots, lens = _case([3], 3, 2, 16, torch.float32, seed=0)
    with pytest.raises(ValueError, match="multiple of Hk"):
        decode_attention(q, k, v, slots, lens)
    q, k, v, slots, lens = _case([3], 2, 1, 16, torch.float32, seed=0)
    with pytest.raises(ValueError, match="lengths must be"):
        decode_attention(q, k, v, slots, lens.float())
    with pytest.raises(ValueError, match="kv_chunk"):
        decode_attention(q, k, v, slots, lens, kv_chunk=0)
    with pytest.raises(TypeError, match="share"):
        decode_attention(q, k.double(), v, slots, lens)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="GPU-size case: needs CUDA")
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kv_chunk", [None, 256])
@pytest.mark.parametrize(
    "hq, hk, d, lengths, max_len",
    [
        (12, 2, 128, [1, 300, 361, 97, 419] * 13, 420),  # 2B decoder: 65 items of image + title + reasoning
        (28, 4, 128, [290, 1, 1031, 2048], 2048),  # 7B decoder, long caches
        (16, 16, 64, [4097, 63, 65], 4100),
    ],
)
def test_decode_attention_gpu_size(hq, hk, d, lengths, max_len, kv_chunk, dtype):
    q, k, v, slots, lens = _case(lengths, hq, hk, d, dtype, seed=7, slots_total=len(lengths) + 3, max_len=max_len)
    _check(decode_attention(q, k, v, slots, lens, kv_chunk=kv_chunk), q, k, v, slots, lens)
