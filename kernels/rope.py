"""Rotary position embedding on q and k in one launch, in place (Su et al., RoFormer).

For a head vector x = [x1 | x2] (two halves of D/2) and one token's cos/sin rows:
    rope(x) = x * cos + rotate_half(x) * sin,    rotate_half(x) = [-x2 | x1]
i.e. out1 = x1 * cos1 - x2 * sin1,  out2 = x2 * cos2 + x1 * sin2.

Three entry points, one kernel:
- `apply_rope_(q, k, cos, sin)`: cos/sin (T, D) already laid out (as
  `LanguageModel.rotary` / `VisionTower.rotary` return them).
- `apply_mrope_(q, k, position_ids, inv_freq, mrope_section)`: the decoder's M-RoPE
  with the angles computed in the kernel from the (3, T) t/h/w positions: frequency
  column j turns with position row (band of j in `mrope_section`) mod 3.
- `apply_vision_rope_(q, k, positions, inv_freq)`: the vision tower's 2-D RoPE from
  (N, 2) row/column positions: the first D/4 columns turn with the row, the next D/4
  with the column.
The fused forms skip the (T, D) cos/sin tensors (two reads of T x D per layer) and the
torch ops that build them; the angle is pos * inv_freq in fp32, the same product the
reference rounds, then reduced to [-pi, pi] in three parts of 2*pi (each k * part
exact in an fma) before tl.cos/tl.sin. Decoder angles reach ~3e4 rad, and whether
tl.cos lowers to a libm-accurate routine or a hardware approximation (accurate near
zero only) depends on the backend; after the reduction either is fine. The
reduction is exact for |angle| < 4e5.

In place: q and k are usually strided views into the fused qkv projection output
(`qkv.view(n, 3, H, D).unbind(1)`); rotating them where they lie keeps that layout for
the attention kernel and allocates nothing. The functions return (q, k) for chaining.

Dtype conventions follow the reference model exactly:
- The decoder computes rope in x's dtype with cos/sin cast to it: each product and
  the sum are rounded to x's dtype (torch's elementwise ops round once each). With
  `apply_rope_` that happens when torch's promoted dtype of (q, cos) is q's dtype;
  `apply_mrope_` also rounds its fp32 cos/sin to q's dtype first, as
  `LanguageModel.rotary` does. The kernel rounds at the same points, so in bf16 it
  agrees with the reference up to the last bit of cos/sin. The launch disables fp
  fusion: with it, the compiler folds the rounded product and the add into one
  bf16 fma (one rounding instead of the reference's two).
- The vision tower computes rope in fp32 (fp32 cos/sin) and casts back once:
  `apply_rope_` with fp32 cos/sin, and `apply_vision_rope_`, do the same (with
  fusion off, each fp32 op rounds as torch's does).

`_rope_kernel`, grid (cdiv(T, BLOCK_T),): a program takes BLOCK_T tokens, forms their
cos/sin once and rotates every q head, BLOCK_HQ at a time, then every k head (GQA: any
Hk), BLOCK_HK at a time (`head_block`: each tensor its own, so the 2B decoder's 2 kv
heads do not run on 16 lanes). D may be any even size; BLOCK_HALF is D/2 rounded up to
a power of two with masks. The head counts and D/2 are constexpr: D/2 = 40 in the
vision tower is not a multiple of 16 as a runtime int would have to be for Triton to
know the second half's alignment, so with a runtime D/2 every load was a scalar 2-byte
load. On a GPU the knobs are BLOCK_T x BLOCK_H (`TILE_ELEMENTS` per step) and num_warps.
"""

import functools

import torch
import triton
import triton.language as tl


@triton.jit
def _reduce_angle(a):
    """a - k * 2pi with k = round(a / 2pi), so |result| <= pi; 2pi split in three parts."""
    k = tl.floor(a * 0.15915494309189535 + 0.5)
    r = tl.fma(k, -6.28125, a)  # 6.28125 has 8 significant bits: k * it is exact for k < 2^16
    r = tl.fma(k, -1.9353071693331003e-3, r)  # fp32 nearest to 2pi - 6.28125
    r = tl.fma(k, -1.0253376273028358e-11, r)  # fp32 nearest to the rest
    return r


@triton.jit
def _rotate_heads(
    x_ptr, stride_t, stride_h, stride_d,  # x: (T, H, D), rotated in place
    offs_t, mask_t,
    cos1, sin1, cos2, sin2,  # (BLOCK_T, BLOCK_HALF) fp32 each: first / second half
    H: tl.constexpr, HALF: tl.constexpr,
    ROUND_TO_INPUT: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_HALF: tl.constexpr,
):
    dtype = x_ptr.dtype.element_ty
    offs_j = tl.arange(0, BLOCK_HALF)
    rows = x_ptr + offs_t[:, None, None].to(tl.int64) * stride_t + offs_j[None, None, :] * stride_d
    c1, s1 = cos1[:, None, :], sin1[:, None, :]
    c2, s2 = cos2[:, None, :], sin2[:, None, :]
    # H and HALF are constexpr: the loop unrolls, the head mask folds away when BLOCK_H divides H,
    # and the second half's offset HALF * stride_d is a known multiple of 16 bytes (vector loads)
    for h0 in tl.static_range(0, H, BLOCK_H):
        offs_h = h0 + tl.arange(0, BLOCK_H)
        mask = mask_t[:, None, None] & (offs_j < HALF)[None, None, :]
        if H % BLOCK_H != 0:
            mask = mask & (offs_h < H)[None, :, None]
        p1 = rows + offs_h[None, :, None] * stride_h
        p2 = p1 + HALF * stride_d
        x1 = tl.load(p1, mask=mask, other=0.0).to(tl.float32)
        x2 = tl.load(p2, mask=mask, other=0.0).to(tl.float32)
        if ROUND_TO_INPUT:
            # the reference's q * cos + rotate_half(q) * sin in q's dtype: round each op
            out1 = (x1 * c1).to(dtype).to(tl.float32) - (x2 * s1).to(dtype).to(tl.float32)
            out2 = (x2 * c2).to(dtype).to(tl.float32) + (x1 * s2).to(dtype).to(tl.float32)
        else:
            out1 = x1 * c1 - x2 * s1
            out2 = x2 * c2 + x1 * s2
        tl.store(p1, out1.to(dtype), mask=mask)
        tl.store(p2, out2.to(dtype), mask=mask)


@triton.jit
def _rope_kernel(
    q_ptr, stride_qt, stride_qh, stride_qd,  # q: (T, HQ, D), rotated in place
    k_ptr, stride_kt, stride_kh, stride_kd,  # k: (T, HK, D), rotated in place
    cos_ptr, stride_ct, stride_cd,  # cos: (T, D); read only if not FROM_POSITIONS
    sin_ptr, stride_st, stride_sd,  # sin: (T, D); read only if not FROM_POSITIONS
    pos_ptr, stride_pa, stride_pt,  # positions: (AXES, T); read only if FROM_POSITIONS
    axis_ptr,  # position row that turns each frequency column: (HALF,) int32
    freq_ptr,  # inverse frequencies: (N_FREQ,) fp32; column j uses freq[j % N_FREQ]
    T,
    HQ: tl.constexpr, HK: tl.constexpr, HALF: tl.constexpr, N_FREQ: tl.constexpr,
    FROM_POSITIONS: tl.constexpr, ROUND_TO_INPUT: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_HQ: tl.constexpr, BLOCK_HK: tl.constexpr, BLOCK_HALF: tl.constexpr,
):
    pid = tl.program_id(0)
    offs_t = pid * BLOCK_T + tl.arange(0, BLOCK_T)
    offs_j = tl.arange(0, BLOCK_HALF)
    mask_t = offs_t < T
    mask_j = offs_j < HALF
    mask = mask_t[:, None] & mask_j[None, :]
    if FROM_POSITIONS:
        axis = tl.load(axis_ptr + offs_j, mask=mask_j, other=0)
        freq = tl.load(freq_ptr + offs_j % N_FREQ, mask=mask_j, other=0.0)
        pos = tl.load(pos_ptr + axis[None, :] * stride_pa + offs_t[:, None].to(tl.int64) * stride_pt,
                      mask=mask, other=0).to(tl.float32)
        angle = _reduce_angle(pos * freq[None, :])
        cos1 = tl.cos(angle)
        sin1 = tl.sin(angle)
        if ROUND_TO_INPUT:  # LanguageModel.rotary casts cos/sin to the activations' dtype
            cos1 = cos1.to(q_ptr.dtype.element_ty).to(tl.float32)
            sin1 = sin1.to(q_ptr.dtype.element_ty).to(tl.float32)
        cos2, sin2 = cos1, sin1  # the reference lays the angles out as [freqs | freqs]
    else:
        c_rows = cos_ptr + offs_t[:, None].to(tl.int64) * stride_ct + offs_j[None, :] * stride_cd
        s_rows = sin_ptr + offs_t[:, None].to(tl.int64) * stride_st + offs_j[None, :] * stride_sd
        cos1 = tl.load(c_rows, mask=mask, other=0.0).to(tl.float32)
        sin1 = tl.load(s_rows, mask=mask, other=0.0).to(tl.float32)
        cos2 = tl.load(c_rows + HALF * stride_cd, mask=mask, other=0.0).to(tl.float32)
        sin2 = tl.load(s_rows + HALF * stride_sd, mask=mask, other=0.0).to(tl.float32)
    _rotate_heads(q_ptr, stride_qt, stride_qh, stride_qd, offs_t, mask_t,
                  cos1, sin1, cos2, sin2, HQ, HALF, ROUND_TO_INPUT, BLOCK_HQ, BLOCK_HALF)
    _rotate_heads(k_ptr, stride_kt, stride_kh, stride_kd, offs_t, mask_t,
                  cos1, sin1, cos2, sin2, HK, HALF, ROUND_TO_INPUT, BLOCK_HK, BLOCK_HALF)


def head_block(h: int) -> int:
    """Heads rotated per step for a tensor of `h` heads: all of them when a power of two up to 16
    (vision: 16; decoder k: 2), else the largest power of two dividing h if at least 4 (decoder
    q: 12 -> 4, no masked lanes), else h rounded up to a power of two (at most 16)."""
    if h & (h - 1) == 0 and h <= 16:
        return max(h, 1)
    divisor = h & -h
    if divisor >= 4:
        return min(divisor, 16)
    return min(triton.next_power_of_2(h), 16)


TILE_ELEMENTS, NUM_WARPS = 4096, 4  # per half-tile of one step; see docs/KERNELS.md for sm_90a figures


@functools.lru_cache(maxsize=64)
def _axis_table(axes: tuple, device: torch.device) -> torch.Tensor:
    return torch.tensor(axes, dtype=torch.int32, device=device)


def _check_qk(op, q, k):
    if q.dim() != 3 or k.dim() != 3 or q.shape[0] != k.shape[0] or q.shape[2] != k.shape[2]:
        raise ValueError(f"{op}: q must be (T, Hq, D) and k (T, Hk, D), got {tuple(q.shape)} and {tuple(k.shape)}")
    if q.shape[2] % 2:
        raise ValueError(f"{op}: head dim D must be even, got {q.shape[2]}")
    if q.dtype != k.dtype or q.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise TypeError(f"{op}: q and k must share one of fp32/fp16/bf16, got {q.dtype} and {k.dtype}")
    if k.device != q.device:
        raise ValueError(f"{op}: k is on {k.device}, expected {q.device} (q's device)")


def _launch(q, k, cos=None, sin=None, positions=None, axes=None, inv_freq=None, round_to_input=True):
    t, hq, d = q.shape
    hk, half = k.shape[1], d // 2
    if t == 0 or half == 0:
        return q, k
    from_positions = positions is not None
    if from_positions:
        pos, axis = positions, _axis_table(axes, q.device)
        freq = inv_freq.float().contiguous()
        cos = sin = q  # unused pointers
    else:
        pos, axis, freq = cos, cos, cos  # unused pointers
    block_half = triton.next_power_of_2(half)
    block_hq, block_hk = head_block(hq), head_block(hk)
    block_t = max(1, min(64, TILE_ELEMENTS // (max(block_hq, block_hk) * block_half)))
    _rope_kernel[(triton.cdiv(t, block_t),)](
        q, q.stride(0), q.stride(1), q.stride(2),
        k, k.stride(0), k.stride(1), k.stride(2),
        cos, cos.stride(0), cos.stride(-1),
        sin, sin.stride(0), sin.stride(-1),
        pos, pos.stride(0), pos.stride(-1),
        axis, freq,
        t, HQ=hq, HK=hk, HALF=half, N_FREQ=freq.numel(),
        FROM_POSITIONS=from_positions, ROUND_TO_INPUT=round_to_input,
        BLOCK_T=block_t, BLOCK_HQ=block_hq, BLOCK_HK=block_hk, BLOCK_HALF=block_half, num_warps=NUM_WARPS,
        enable_fp_fusion=False,  # keep each product rounded before the sum, as torch's separate ops
    )
    return q, k


def apply_rope_(q, k, cos, sin):
    """In place: x = x * cos + rotate_half(x) * sin for x in (q, k); returns (q, k).

    q (T, Hq, D), k (T, Hk, D), cos/sin (T, D); all may be strided. The arithmetic is
    in torch's promoted dtype of (q, cos), rounded to it after each op (a no-op in
    fp32), and the result is cast to q's dtype: the decoder passes cos/sin in the
    activations' dtype, the vision tower fp32 cos/sin.
    """
    _check_qk("apply_rope_", q, k)
    t, _, d = q.shape
    for name, c in (("cos", cos), ("sin", sin)):
        if c.shape != (t, d):
            raise ValueError(f"apply_rope_: {name} must have shape ({t}, {d}), got {tuple(c.shape)}")
        if c.device != q.device or c.dtype not in (torch.float32, torch.float16, torch.bfloat16):
            raise ValueError(f"apply_rope_: {name} must be a float tensor on {q.device}, got {c.dtype} on {c.device}")
    if cos.dtype != sin.dtype:
        raise TypeError(f"apply_rope_: cos and sin must share a dtype, got {cos.dtype} and {sin.dtype}")
    return _launch(q, k, cos=cos, sin=sin, round_to_input=torch.promote_types(q.dtype, cos.dtype) == q.dtype)


def apply_mrope_(q, k, position_ids, inv_freq, mrope_section):
    """In place, the decoder's M-RoPE from (3, T) t/h/w positions; returns (q, k).

    inv_freq (D/2,) fp32, as `LanguageModel.rotary` builds it; `mrope_section` splits
    the D/2 frequency columns into bands, band i turning with position row i mod 3.
    Equals `apply_rope_(q, k, *mrope_cos_sin_ref(position_ids, inv_freq, mrope_section, q.dtype))`.
    """
    _check_qk("apply_mrope_", q, k)
    t, _, d = q.shape
    half = d // 2
    if position_ids.dim() != 2 or position_ids.shape[1] != t or position_ids.device != q.device:
        raise ValueError(
            f"apply_mrope_: position_ids must be (3, {t}) on {q.device}, got {tuple(position_ids.shape)} "
            f"on {position_ids.device}"
        )
    if inv_freq.shape != (half,):
        raise ValueError(f"apply_mrope_: inv_freq must have shape ({half},) (D/2), got {tuple(inv_freq.shape)}")
    if sum(mrope_section) != half or min(mrope_section, default=0) < 0:
        raise ValueError(f"apply_mrope_: mrope_section {list(mrope_section)} must sum to D/2 = {half}")
    axes = tuple(band % 3 for band, width in enumerate(mrope_section) for _ in range(width))
    if max(axes, default=0) >= position_ids.shape[0]:
        raise ValueError(f"apply_mrope_: {len(mrope_section)} bands need 3 position rows, got {position_ids.shape[0]}")
    return _launch(q, k, positions=position_ids, axes=axes, inv_freq=inv_freq, round_to_input=True)


def apply_vision_rope_(q, k, positions, inv_freq):
    """In place, the vision tower's 2-D RoPE from (N, 2) row/column positions; returns (q, k).

    inv_freq (D/4,) fp32, as `VisionTower.rotary` builds it. Computed in fp32 and cast
    back once. Equals `apply_rope_(q, k, *vision_cos_sin_ref(positions, inv_freq))`.
    """
    _check_qk("apply_vision_rope_", q, k)
    t, _, d = q.shape
    n_freq = inv_freq.numel()
    if positions.shape != (t, 2) or positions.device != q.device:
        raise ValueError(
            f"apply_vision_rope_: positions must be ({t}, 2) on {q.device}, got {tuple(positions.shape)} "
            f"on {positions.device}"
        )
    if inv_freq.dim() != 1 or 2 * n_freq != d // 2:
        raise ValueError(f"apply_vision_rope_: inv_freq must have shape ({d // 4},) (D/4), got {tuple(inv_freq.shape)}")
    axes = (0,) * n_freq + (1,) * n_freq
    return _launch(q, k, positions=positions.T, axes=axes, inv_freq=inv_freq, round_to_input=False)


# ------------------------------------------------------------------ plain-torch references
def _rotate_half(x):
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def rope_ref(q, k, cos, sin):
    """New (q, k): x * cos + rotate_half(x) * sin in torch's promoted dtype, cast to x's dtype."""
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    return tuple((x * cos + _rotate_half(x) * sin).to(x.dtype) for x in (q, k))


def mrope_cos_sin_ref(position_ids, inv_freq, mrope_section, dtype):
    """cos/sin (T, D) of the decoder's M-RoPE, cast to `dtype` (as `LanguageModel.rotary`)."""
    freqs = position_ids[..., None].float() * inv_freq.float()  # (3, T, D/2)
    bands = freqs.split(list(mrope_section), dim=-1)
    freqs = torch.cat([band[i % 3] for i, band in enumerate(bands)], dim=-1)
    freqs = torch.cat([freqs, freqs], dim=-1)
    return freqs.cos().to(dtype), freqs.sin().to(dtype)


def vision_cos_sin_ref(positions, inv_freq):
    """fp32 cos/sin (N, D) of the vision tower's 2-D RoPE (as `VisionTower.rotary`)."""
    freqs = (positions.float()[:, :, None] * inv_freq.float()).flatten(1)  # rows then columns
    freqs = torch.cat([freqs, freqs], dim=-1)
    return freqs.cos(), freqs.sin()


def apply_mrope_ref(q, k, position_ids, inv_freq, mrope_section):
    return rope_ref(q, k, *mrope_cos_sin_ref(position_ids, inv_freq, mrope_section, q.dtype))


def apply_vision_rope_ref(q, k, positions, inv_freq):
    return rope_ref(q, k, *vision_cos_sin_ref(positions, inv_freq))
