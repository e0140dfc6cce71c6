"""Varlen flash attention vs per-segment SDPA, the reference model's loop (kernels/varlen_attention.py)."""

import pytest
import torch
from moon3rt.kernels.testing import (
    assert_close,
    assert_within_baseline,
    interpreter_or_cuda,
    kernel_dtypes,
)
from moon3rt.kernels.varlen_attention import head_dim_split, varlen_attention, varlen_attention_ref

DEVICE = interpreter_or_cuda()
DTYPES = kernel_dtypes()

# (Hq, Hk, D): MHA; GQA ratio 6 (Hq=6, Hk=1) and 6 again at the 2B's head counts (12, 2);
# D = 80 (the vision tower's) is not a power of two; 128 is the decoder's
HEADS = [(1, 1, 16), (6, 1, 64), (12, 2, 80), (4, 2, 128)]
# segment lengths: empty segments first, last and between, single tokens, lengths around
# the interpreter's 16-token blocks (15, 16, 17, 33) and primes
SEGMENTS = [[0, 1, 17, 0, 5, 0], [16, 33, 1], [1, 1, 1], [29]]


def _cu(lengths):
    return torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), dtype=torch.int32, device=DEVICE)


def _qkv(t, hq, hk, d, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(t, h, d, generator=g).to(DEVICE, dtype) for h in (hq, hk, hk)]


def _check(out, q, k, v, cu, causal, scale=None, name="o"):
    """fp32: the table's tolerance; fp16/bf16: at most twice plain torch's error, both vs fp32."""
    if out.dtype == torch.float32:
        assert_close(out, varlen_attention_ref(q, k, v, cu, 0, causal, scale), name=name)
        return
    expected = varlen_attention_ref(q.float(), k.float(), v.float(), cu, 0, causal, scale)
    baseline = varlen_attention_ref(q, k, v, cu, 0, causal, scale)
    assert_within_baseline(out, expected, baseline, factor=2.0, name=name)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("lengths", SEGMENTS)
@pytest.mark.parametrize("hq, hk, d", HEADS)
def test_varlen_attention(hq, hk, d, lengths, causal, dtype):
    cu = _cu(lengths)
    q, k, v = _qkv(sum(lengths), hq, hk, d, dtype, seed=hq * 100 + d + len(lengths))
    out = varlen_attention(q, k, v, cu, max(lengths), causal)
    assert out.shape == q.shape and out.dtype == dtype and out.is_contiguous()
    _check(out, q, k, v, cu, causal)


@pytest.mark.parametrize("d, split", [(24, (16, 16)), (48, (32, 16)), (72, (64, 16)), (80, (64, 16)),
                                      (96, (64, 32)), (112, (128, 0)), (128, (128, 0))])
def test_head_dim_split(d, split):
    assert head_dim_split(d) == split


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("hq, hk, d", [(2, 1, 24), (2, 2, 72), (3, 1, 96)])
def test_head_dim_with_tail(hq, hk, d, causal, dtype):
    # a main power-of-two part plus a tail (16 or 32 wide, partly masked for 24 and 72)
    lengths = [17, 0, 33]
    cu = _cu(lengths)
    q, k, v = _qkv(sum(lengths), hq, hk, d, dtype, seed=d)
    _check(varlen_attention(q, k, v, cu, max(lengths), causal), q, k, v, cu, causal)


@pytest.mark.parametrize("dtype", DTYPES)
def test_vision_fused_qkv_views(dtype):
    # the vision tower's q, k, v: qkv.view(n, 3, H, D).unbind(1), strided and non-contiguous
    lengths, h, d = [16, 4, 0, 9], 2, 80
    n = sum(lengths)
    qkv = torch.randn(n, 3 * h * d, generator=torch.Generator().manual_seed(1)).to(DEVICE, dtype)
    q, k, v = qkv.view(n, 3, h, d).unbind(1)
    assert not q.is_contiguous()
    cu = _cu(lengths)
    _check(varlen_attention(q, k, v, cu, max(lengths), causal=False), q, k, v, cu, False, name="o (qkv views)")


@pytest.mark.parametrize("dtype", DTYPES)
def test_decoder_gqa_packed_projection(dtype):
    # a fused [q | k | v] decoder projection split by heads: GQA 6, every input strided
    lengths, hq, hk, d = [7, 0, 20], 6, 1, 64
    t = sum(lengths)
    qkv = torch.randn(t, hq + 2 * hk, d, generator=torch.Generator().manual_seed(2)).to(DEVICE, dtype)
    q, k, v = qkv.split([hq, hk, hk], dim=1)
    cu = _cu(lengths)
    _check(varlen_attention(q, k, v, cu, max(lengths), causal=True), q, k, v, cu, True, name="o (split views)")


@pytest.mark.parametrize("dtype", DTYPES)
def test_custom_scale_and_int64_offsets(dtype):
    lengths = [3, 18]
    q, k, v = _qkv(sum(lengths), 2, 2, 16, dtype, seed=3)
    cu = _cu(lengths).long()
    out = varlen_attention(q, k, v, cu, max(lengths), causal=True, scale=0.3)
    _check(out, q, k, v, cu, True, scale=0.3, name="o (scale 0.3)")


def test_max_seqlen_larger_than_needed_and_large_scores():
    # an over-estimated max_seqlen only adds idle programs; large logits stay finite
    lengths = [5, 12]
    q, k, v = _qkv(sum(lengths), 2, 1, 16, torch.float32, seed=4)
    q = 30.0 * q
    cu = _cu(lengths)
    out = varlen_attention(q, k, v, cu, 64, causal=False)
    assert torch.isfinite(out).all()
    _check(out, q, k, v, cu, False)


def test_segments_are_independent():
    # an item's output is the same alone and packed with others (DESIGN: batch-invariance)
    q, k, v = _qkv(30, 4, 2, 16, torch.float32, seed=5)
    packed = varlen_attention(q, k, v, _cu([10, 20]), 20, causal=True)
    alone = varlen_attention(q[10:], k[10:], v[10:], _cu([20]), 20, causal=True)
    assert_close(packed[10:], alone, name="o (packed vs alone)")


def test_empty_and_bad_inputs():
    q, k, v = _qkv(0, 2, 1, 16, torch.float32, seed=0)
    assert varlen_attention(q, k, v, _cu([0, 0]), 0, causal=True).shape == (0, 2, 16)
    q, k, v = _qkv(4, 3, 2, 16, torch.float32, seed=0)
    with pytest.raises(ValueError, match="multiple of Hk"):
        varlen_attention(q, k, v, _cu([4]), 4, causal=True)
    q, k, v = _qkv(4, 2, 1, 16, torch.float32, seed=0)
    with pytest.raises(ValueError, match="cu_seqlens"):
        varlen_attention(q, k, v, _cu([4]).float(), 4, causal=True)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="GPU-size case: needs CUDA")
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "hq, hk, d, lengths, causal",
    [
        (16, 16, 80, [1024, 1024, 256, 4096], False),  # Qwen2-VL vision tower: 448^2 and 896^2 images
        (12, 2, 128, [300, 1500, 2048, 1, 700], True),  # 2B decoder
        (28, 4, 128, [290, 0, 1031], True),  # 7B decoder
        (8, 8, 64, [4097, 63, 65], True),
    ],
)
def test_varlen_attention_gpu_size(hq, hk, d, lengths, causal, dtype):
    cu = _cu(lengths)
    q, k, v = _qkv(sum(lengths), hq, hk, d, dtype, seed=7)
    _check(varlen_attention(q, k, v, cu, max(lengths), causal), q, k, v, cu, causal)


# The CPU runs above use the interpreter's 16 x 16 blocks; on a GPU the same edge cases meet
# the real block shapes (64 or 128 rows, the 64 + 16 head-dim split) in 16-bit dtypes.
GPU_EDGE_SEGMENTS = [[0, 1, 0, 1], [1, 129, 0, 64, 65, 0], [1000, 1, 0]]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="GPU case: real block shapes in bf16/fp16")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("lengths", GPU_EDGE_SEGMENTS)
@pytest.mark.parametrize("causal", [True, False])
def test_edge_cases_gpu(lengths, causal, dtype):
    cu = _cu(lengths)
    n = sum(lengths)
    g = torch.Generator().manual_seed(len(lengths))
    # the vision tower's fused qkv views (D = 80, strided)
    qkv = torch.randn(n, 3 * 16 * 80, generator=g).to(DEVICE, dtype)
    q, k, v = qkv.view(n, 3, 16, 80).unbind(1)
    _check(varlen_attention(q, k, v, cu, max(lengths), causal), q, k, v, cu, causal, name="o (vision views)")
    # the 2B decoder's [q | k | v] projection split by heads: GQA 6 (12 query heads, 2 kv heads), D = 128
    packed = torch.randn(n, 16, 128, generator=g).to(DEVICE, dtype)
    q, k, v = packed.split([12, 2, 2], dim=1)
    _check(varlen_attention(q, k, v, cu, max(lengths), causal), q, k, v, cu, causal, name="o (GQA split views)")
