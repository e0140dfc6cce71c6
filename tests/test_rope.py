"""Rotary embedding kernels vs the reference model's formulas (kernels/rope.py)."""

import pytest
import torch
from moon3rt.kernels.rope import (
    apply_mrope_,
    apply_mrope_ref,
    apply_rope_,
    apply_vision_rope_,
    apply_vision_rope_ref,
    head_block,
    mrope_cos_sin_ref,
    rope_ref,
)
from moon3rt.kernels.testing import assert_close, interpreter_or_cuda, kernel_dtypes

from moon3rt.config import TextConfig, VisionConfig
from moon3rt.model import LanguageModel, VisionTower, rotate_half, vision_positions

DEVICE = interpreter_or_cuda()
DTYPES = kernel_dtypes()

# (T, Hq, Hk, D): a single token, primes, GQA ratios 1 and 6, D = 80 (vision) is not a power of 2
SHAPES = [(1, 1, 1, 16), (7, 6, 1, 64), (13, 12, 2, 80), (5, 3, 3, 2), (19, 4, 2, 128), (3, 28, 4, 16)]


@pytest.mark.parametrize("h, block", [(1, 1), (2, 2), (3, 4), (6, 8), (12, 4), (16, 16), (28, 4), (32, 16), (40, 8)])
def test_head_block(h, block):
    # each tensor's heads per step: no masked lanes where a power of two >= 4 divides h
    assert head_block(h) == block


def _qk(t, hq, hk, d, dtype, seed, fused=False):
    """q, k as the model produces them: views into one fused projection output when `fused`."""
    g = torch.Generator().manual_seed(seed)
    if fused:  # the vision tower's qkv.view(n, 3, H, D).unbind(1): strided, non-contiguous views
        qkv = torch.randn(t, 3, hq, d, generator=g).to(DEVICE, dtype)
        q, k, _ = qkv.unbind(1)
        return q, k
    return (torch.randn(t, hq, d, generator=g).to(DEVICE, dtype), torch.randn(t, hk, d, generator=g).to(DEVICE, dtype))


def _mrope_inputs(t, d, seed, max_pos=60):
    g = torch.Generator().manual_seed(seed)
    position_ids = torch.randint(0, max_pos, (3, t), generator=g).to(DEVICE)
    inv_freq = 1.0 / 1e6 ** (torch.arange(0, d, 2, dtype=torch.float) / d)
    half = d // 2
    section = [half // 4, (half - half // 4) // 2]
    section.append(half - sum(section))
    return position_ids, inv_freq.to(DEVICE), section


def _text_cfg(d, section):
    return TextConfig(hidden_size=d, num_attention_heads=1, num_key_value_heads=1, mrope_section=section)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("t, hq, hk, d", SHAPES)
def test_apply_rope_decoder(t, hq, hk, d, dtype):
    # the decoder convention: cos/sin in the activations' dtype, math in that dtype
    q, k = _qk(t, hq, hk, d, dtype, seed=t * 31 + d)
    position_ids, inv_freq, section = _mrope_inputs(t, d, seed=t)
    cos, sin = mrope_cos_sin_ref(position_ids, inv_freq, section, dtype)
    q_ref, k_ref = rope_ref(q, k, cos, sin)
    out = apply_rope_(q, k, cos, sin)
    assert out[0] is q and out[1] is k
    assert_close(q, q_ref, name="q")
    assert_close(k, k_ref, name="k")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("t, hq, hk, d", SHAPES)
def test_apply_mrope_matches_model(t, hq, hk, d, dtype):
    q, k = _qk(t, hq, hk, d, dtype, seed=t * 17 + d)
    position_ids, _, section = _mrope_inputs(t, d, seed=t + 1)
    cfg = _text_cfg(d, section)
    lm = LanguageModel.__new__(LanguageModel)  # only rotary() is used: no weights
    lm.cfg = cfg
    cos, sin = lm.rotary(position_ids, dtype)
    c, s = cos.unsqueeze(1), sin.unsqueeze(1)
    q_model, k_model = q * c + rotate_half(q) * s, k * c + rotate_half(k) * s  # Attention.forward's lines
    inv_freq = 1.0 / cfg.rope_theta ** (torch.arange(0, d, 2, dtype=torch.float, device=DEVICE) / d)
    apply_mrope_(q, k, position_ids, inv_freq, section)
    assert_close(q, q_model, name="q vs model")
    assert_close(k, k_model, name="k vs model")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "grids, h, d",
    [([[1, 2, 2]], 1, 16), ([[1, 4, 4]], 3, 80), ([[1, 2, 2], [1, 4, 8]], 2, 32), ([[2, 2, 6]], 1, 80)],
)
def test_apply_vision_rope_matches_model(grids, h, d, dtype):
    # positions from real (t, h, w) patch grids, merge windows grouped as the processor orders them
    grid_thw = torch.tensor(grids, device=DEVICE)
    n = int((grid_thw[:, 0] * grid_thw[:, 1] * grid_thw[:, 2]).sum())
    cfg = VisionConfig(embed_dim=d * h, num_heads=h)
    tower = VisionTower.__new__(VisionTower)
    tower.cfg = cfg
    cos, sin = tower.rotary(grid_thw)
    q, k = _qk(n, h, h, d, dtype, seed=n + d, fused=True)
    c, s = cos.unsqueeze(1), sin.unsqueeze(1)  # VisionAttention.forward's lines
    q_model = (q.float() * c + rotate_half(q.float()) * s).to(dtype)
    k_model = (k.float() * c + rotate_half(k.float()) * s).to(dtype)
    positions = vision_positions(grid_thw, cfg.spatial_merge_size)
    inv_freq = 1.0 / cfg.rope_theta ** (torch.arange(0, d // 2, 2, dtype=torch.float, device=DEVICE) / (d // 2))
    assert not q.is_contiguous()
    apply_vision_rope_(q, k, positions, inv_freq)
    assert_close(q, q_model, name="q vs model")
    assert_close(k, k_model, name="k vs model")
    q2, k2 = _qk(n, h, h, d, dtype, seed=n + d, fused=True)
    apply_rope_(q2, k2, cos, sin)  # the same through fp32 cos/sin tensors
    assert_close(q2, q_model, name="q (cos/sin form) vs model")


# with cos/sin given there is no transcendental in the kernel: it must round exactly as the
# reference's torch ops. fp16 joins on the CPU (the interpreter rounds fp16 exactly, but it
# truncates to bf16, so bf16 is checked on a GPU only).
EXACT_DTYPES = DTYPES if torch.cuda.is_available() else [torch.float32, torch.float16]


@pytest.mark.parametrize("dtype", EXACT_DTYPES)
@pytest.mark.parametrize("trig_dtype", ["same", "fp32"])
@pytest.mark.parametrize("t, hq, hk, d", SHAPES[1:3])
def test_apply_rope_bit_exact(t, hq, hk, d, trig_dtype, dtype):
    q, k = _qk(t, hq, hk, d, dtype, seed=t + d)
    position_ids, inv_freq, section = _mrope_inputs(t, d, seed=t, max_pos=30000)
    cos, sin = mrope_cos_sin_ref(position_ids, inv_freq, section, dtype if trig_dtype == "same" else torch.float32)
    q_ref, k_ref = rope_ref(q, k, cos, sin)
    apply_rope_(q, k, cos, sin)
    for name, got, want in (("q", q, q_ref), ("k", k, k_ref)):
        if not torch.equal(got, want):
            assert_close(got, want, atol=0.0, rtol=0.0, name=f"{name} (must be bit-exact)")


@pytest.mark.parametrize("dtype", DTYPES)
def test_apply_rope_strided_fused_qkv(dtype):
    # q and k as views into one (T, Hq + 2 Hk, D) projection output, cos/sin as strided views
    t, hq, hk, d = 11, 6, 1, 64
    g = torch.Generator().manual_seed(0)
    qkv = torch.randn(t, hq + 2 * hk, d, generator=g).to(DEVICE, dtype)
    q, k, v = qkv.split([hq, hk, hk], dim=1)
    position_ids, inv_freq, section = _mrope_inputs(t, d, seed=3)
    cos, sin = mrope_cos_sin_ref(position_ids, inv_freq, section, dtype)
    cos_view = torch.zeros(t, 2 * d, device=DEVICE, dtype=dtype)[:, ::2]
    cos_view.copy_(cos)
    q_ref, k_ref = rope_ref(q, k, cos, sin)
    v_before = v.clone()
    apply_rope_(q, k, cos_view, sin)
    assert_close(q, q_ref, name="q (strided)")
    assert_close(k, k_ref, name="k (strided)")
    assert torch.equal(v, v_before), "v (the rest of the fused buffer) changed"


@pytest.mark.parametrize("dtype", DTYPES)
def test_apply_mrope_large_positions(dtype):
    # decoder positions reach tens of thousands: angles of ~3e4 rad need the range reduction
    t, hq, hk, d = 9, 2, 1, 128
    q, k = _qk(t, hq, hk, d, dtype, seed=99)
    position_ids = torch.tensor([[0, 1, 2, 4095, 8191, 16384, 25000, 30001, 32767]] * 3, device=DEVICE)
    position_ids[1] = position_ids[1].flip(0)
    inv_freq = 1.0 / 1e6 ** (torch.arange(0, d, 2, dtype=torch.float) / d)
    section = [16, 24, 24]
    q_ref, k_ref = apply_mrope_ref(q, k, position_ids, inv_freq.to(DEVICE), section)
    apply_mrope_(q, k, position_ids, inv_freq.to(DEVICE), section)
    assert_close(q, q_ref, name="q")
    assert_close(k, k_ref, name="k")


def test_rope_empty_and_bad_shapes():
    q, k = torch.empty(0, 2, 16, device=DEVICE), torch.empty(0, 1, 16, device=DEVICE)
    apply_rope_(q, k, torch.empty(0, 16, device=DEVICE), torch.empty(0, 16, device=DEVICE))
    q, k = torch.randn(3, 2, 16, device=DEVICE), torch.randn(3, 1, 16, device=DEVICE)
    with pytest.raises(ValueError, match="cos"):
        apply_rope_(q, k, torch.randn(3, 15, device=DEVICE), torch.randn(3, 16, device=DEVICE))
    with pytest.raises(ValueError, match="mrope_section"):
        apply_mrope_(q, k, torch.zeros(3, 3, dtype=torch.long, device=DEVICE), torch.ones(8, device=DEVICE), [2, 2, 2])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="GPU-size case: needs CUDA")
@pytest.mark.parametrize("dtype", DTYPES)
def test_rope_gpu_size(dtype):
    # Qwen2-VL-2B decoder: 12 q heads, 2 kv heads, D 128, mrope [16, 24, 24]
    t, hq, hk, d = 4096, 12, 2, 128
    q, k = _qk(t, hq, hk, d, dtype, seed=1)
    position_ids = torch.randint(0, 32768, (3, t), device=DEVICE)
    inv_freq = (1.0 / 1e6 ** (torch.arange(0, d, 2, dtype=torch.float) / d)).to(DEVICE)
    q_ref, k_ref = apply_mrope_ref(q, k, position_ids, inv_freq, [16, 24, 24])
    apply_mrope_(q, k, position_ids, inv_freq, [16, 24, 24])
    assert_close(q, q_ref, name="q")
    assert_close(k, k_ref, name="k")
    # vision tower: 16 heads of 80, 2-D positions of a 64 x 64 patch grid
    n, h, d = 4096, 16, 80
    q, k = _qk(n, h, h, d, dtype, seed=2, fused=True)
    positions = torch.stack(torch.meshgrid(torch.arange(64), torch.arange(64), indexing="ij"), -1).reshape(-1, 2)
    positions = positions.to(DEVICE)
    inv_freq = (1.0 / 1e4 ** (torch.arange(0, d // 2, 2, dtype=torch.float) / (d // 2))).to(DEVICE)
    q_ref, k_ref = apply_vision_rope_ref(q, k, positions, inv_freq)
    apply_vision_rope_(q, k, positions, inv_freq)
    assert_close(q, q_ref, name="q (vision)")
    assert_close(k, k_ref, name="k (vision)")
