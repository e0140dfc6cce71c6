"""Varlen flash attention over packed sequences (FlashAttention-2, Dao 2023, Alg. 1).

Segment b owns tokens cu_seqlens[b]:cu_seqlens[b+1] of q (T, Hq, D), k and v
(T, Hk, D); attention never crosses a segment and nothing is padded:
    o_i = sum_j softmax_j(scale * q_i . k_j) v_j      over j in i's segment
          (j <= i within the segment when causal: the decoder, one item a segment;
           all j when not: the vision tower, one image a segment)
GQA: query head h reads kv head h // (Hq // Hk). scale defaults to 1/sqrt(D), as
`torch.nn.functional.scaled_dot_product_attention`.

`_varlen_attention_kernel`, grid (cdiv(max_seqlen, BLOCK_M), Hq, B): one program per
(query block, query head, segment); blocks past their segment's end exit at once, so
empty segments and segments shorter than max_seqlen cost a launch slot only. A
program keeps its BLOCK_M x D queries in registers and walks the segment's keys in
BLOCK_N blocks with the online softmax in fp32 (running row max m, row sum l, the
accumulator rescaled by exp2(m_old - m_new); scores carry scale * log2(e) so exp2 is
used). The key range is split in two: blocks that need no mask (fully inside the
segment and, when causal, fully below the diagonal) and the few boundary blocks that
do; causal programs stop at their diagonal. Every query row sees key 0 of its
segment in the first block, so the running max is finite from then on and masked
scores can be -inf.

Precision: scores, softmax and the accumulator are fp32. In fp16/bf16 the
probabilities are rounded to v's dtype for the P @ V dot, as flash attention does;
fp32 inputs use input_precision "ieee" dots (no TF32), so fp32 matches torch's
math to rounding. D need not be a power of two: it is split into a power-of-two
main part and a power-of-two tail (`head_dim_split`: 80 = 64 + 16 for the Qwen2-VL
vision tower, 128 = 128 + 0), each with its own dots and accumulator, so a D = 80
head does 80/80 of the useful tensor-core work instead of 128/80 when padded.

Strided inputs: q, k and v are read through their (token, head, dim) strides, so
views into a fused qkv projection (`qkv.view(T, 3, H, D).unbind(1)`) need no copy.
The output is a new contiguous (T, Hq, D) tensor. cu_seqlens values are trusted
(checking them would need a device sync): they must be non-decreasing, end at most
at T, and `max_seqlen` must be at least the longest segment. Rows of tokens outside
every segment are left unwritten.

On a GPU the knobs are BLOCK_M / BLOCK_N / num_warps / num_stages per (D, dtype)
(`_launch_config`; `config=` overrides them for benchmarks); worth trying: processing
the Hq // Hk query heads of one kv head in one program (K/V read once per group instead
of once per query head), and ordering causal blocks longest-first.
"""

import math

import torch
import triton
import triton.language as tl

_LOG2E = 1.4426950408889634


@triton.jit
def _attend_kv_blocks(
    acc, acc_t, m_i, l_i,  # running (BLOCK_M, BLOCK_D) and (BLOCK_M, BLOCK_DT) outputs, (BLOCK_M,) max and sum
    q, q_t,  # (BLOCK_M, BLOCK_D) and (BLOCK_M, BLOCK_DT) queries of this program: head dims [0, BLOCK_D), the tail
    k_seg, stride_kt, stride_kd,  # k of this segment and kv head: (L, D)
    v_seg, stride_vt, stride_vd,  # v of this segment and kv head: (L, D)
    offs_m, offs_d, mask_d, offs_dt, mask_dt, lo, hi, seq_len, qk_scale,
    MASK_KEYS: tl.constexpr, CAUSAL: tl.constexpr, BLOCK_N: tl.constexpr, HAS_TAIL: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        if MASK_KEYS:
            key_ok = (offs_n < seq_len)[:, None]
            kv_mask = key_ok & mask_d[None, :]
            kv_mask_t = key_ok & mask_dt[None, :]
        else:
            kv_mask = mask_d[None, :]
            kv_mask_t = mask_dt[None, :]
        # offsets within one segment (or cache) fit int32; the base pointer carries the int64
        # part, and 32-bit per-element offsets keep the tile's address registers (no spills)
        rows = offs_n[:, None]
        k = tl.load(k_seg + rows * stride_kt + offs_d[None, :] * stride_kd, mask=kv_mask, other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION)
        if HAS_TAIL:  # D = BLOCK_D + tail: the scores are the sum of the two partial dots
            k_t = tl.load(k_seg + rows * stride_kt + offs_dt[None, :] * stride_kd, mask=kv_mask_t, other=0.0)
            s = tl.dot(q_t, tl.trans(k_t), s, input_precision=DOT_PRECISION)
        s = s * qk_scale
        if MASK_KEYS:
            valid = (offs_n < seq_len)[None, :]
            if CAUSAL:
                valid = valid & (offs_n[None, :] <= offs_m[:, None])
            s = tl.where(valid, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        v = tl.load(v_seg + rows * stride_vt + offs_d[None, :] * stride_vd, mask=kv_mask, other=0.0)
        p = p.to(v.dtype)
        acc = tl.dot(p, v, acc * alpha[:, None], input_precision=DOT_PRECISION)
        if HAS_TAIL:
            v_t = tl.load(v_seg + rows * stride_vt + offs_dt[None, :] * stride_vd, mask=kv_mask_t, other=0.0)
            acc_t = tl.dot(p, v_t, acc_t * alpha[:, None], input_precision=DOT_PRECISION)
        m_i = m_new
    return acc, acc_t, m_i, l_i


@triton.jit
def _varlen_attention_kernel(
    q_ptr, stride_qt, stride_qh, stride_qd,  # q: (T, HQ, D)
    k_ptr, stride_kt, stride_kh, stride_kd,  # k: (T, HK, D)
    v_ptr, stride_vt, stride_vh, stride_vd,  # v: (T, HK, D)
    o_ptr, stride_ot, stride_oh, stride_od,  # o: (T, HQ, D), written
    cu_ptr,  # segment offsets: (B + 1,) int32/int64
    GROUP, qk_scale,
    D: tl.constexpr, CAUSAL: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_DT: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    HAS_TAIL: tl.constexpr = D > BLOCK_D
    pid_m = tl.program_id(0)
    head = tl.program_id(1)
    seg = tl.program_id(2)
    start = tl.load(cu_ptr + seg).to(tl.int64)
    seq_len = (tl.load(cu_ptr + seg + 1).to(tl.int64) - start).to(tl.int32)
    m0 = pid_m * BLOCK_M
    if m0 < seq_len:
        kv_head = head // GROUP
        offs_m = m0 + tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, BLOCK_D)
        mask_d = offs_d < D
        offs_dt = BLOCK_D + tl.arange(0, BLOCK_DT)  # the tail's head dims (unused unless HAS_TAIL)
        mask_dt = offs_dt < D
        mask_row = (offs_m < seq_len)[:, None]
        rows = (start + offs_m)[:, None]
        q_rows = q_ptr + rows * stride_qt + head * stride_qh
        q = tl.load(q_rows + offs_d[None, :] * stride_qd, mask=mask_row & mask_d[None, :], other=0.0)
        q_t = tl.zeros([BLOCK_M, BLOCK_DT], q.dtype)
        if HAS_TAIL:
            q_t = tl.load(q_rows + offs_dt[None, :] * stride_qd, mask=mask_row & mask_dt[None, :], other=0.0)
        k_seg = k_ptr + start * stride_kt + kv_head * stride_kh
        v_seg = v_ptr + start * stride_vt + kv_head * stride_vh

        acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
        acc_t = tl.zeros([BLOCK_M, BLOCK_DT], tl.float32)
        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
        if CAUSAL:
            hi = tl.minimum(seq_len, m0 + BLOCK_M)  # keys past the block's last row are never seen
            unmasked_end = (tl.minimum(seq_len, m0 + 1) // BLOCK_N) * BLOCK_N  # all keys <= first row
        else:
            hi = seq_len
            unmasked_end = (seq_len // BLOCK_N) * BLOCK_N
        acc, acc_t, m_i, l_i = _attend_kv_blocks(
            acc, acc_t, m_i, l_i, q, q_t, k_seg, stride_kt, stride_kd, v_seg, stride_vt, stride_vd,
            offs_m, offs_d, mask_d, offs_dt, mask_dt, 0, unmasked_end, seq_len, qk_scale,
            False, CAUSAL, BLOCK_N, HAS_TAIL, DOT_PRECISION,
        )
        acc, acc_t, m_i, l_i = _attend_kv_blocks(
            acc, acc_t, m_i, l_i, q, q_t, k_seg, stride_kt, stride_kd, v_seg, stride_vt, stride_vd,
            offs_m, offs_d, mask_d, offs_dt, mask_dt, unmasked_end, hi, seq_len, qk_scale,
            True, CAUSAL, BLOCK_N, HAS_TAIL, DOT_PRECISION,
        )
        o_rows = o_ptr + rows * stride_ot + head * stride_oh
        tl.store(o_rows + offs_d[None, :] * stride_od, (acc / l_i[:, None]).to(o_ptr.dtype.element_ty),
                 mask=mask_row & mask_d[None, :])
        if HAS_TAIL:
            tl.store(o_rows + offs_dt[None, :] * stride_od, (acc_t / l_i[:, None]).to(o_ptr.dtype.element_ty),
                     mask=mask_row & mask_dt[None, :])


def head_dim_split(d: int) -> tuple[int, int]:
    """(BLOCK_D, BLOCK_DT): D as a power-of-two main part plus a power-of-two tail (>= 16, the
    smallest dot), e.g. 80 = 64 + 16, 128 = 128 + 0; the tail is 0 when one power of two fits
    with at most 1/8 padding. D = 80 padded to 128 would do 1.6x the useful tensor-core work."""
    full = max(16, triton.next_power_of_2(d))
    main = max(16, full // 2) if full > d else full
    if d <= main or full - d <= full // 8:
        return full, 0
    return main, max(16, triton.next_power_of_2(d - main))


def _launch_config(device: torch.device, dtype: torch.dtype, block_d: int, block_dt: int = 0) -> dict:
    """Block sizes: small under the interpreter (many cheap programs, short test segments).

    On sm_90a (`bench/ptxas_report.py`, figures in docs/KERNELS.md):
    - fp32: 64 x 32 blocks with 4 warps spilled ~31 KB per thread; 8 warps with 32-key
      blocks (D = 80) or 16-key blocks (D = 128) keep everything in registers.
    - 16-bit, D = 80 as 64 + 16: 64-row blocks on one warpgroup (4 warps), 164 registers
      and 70 KiB of shared memory, so three blocks fit per SM (128 x 64 with 8 warps: one).
    - 16-bit, D = 128: 128 x 64 with 8 warps, 185 registers, no spills.
    """
    if device.type != "cuda":
        return dict(BLOCK_M=16, BLOCK_N=16, num_warps=4, num_stages=1)
    width = block_d + block_dt
    if dtype == torch.float32:  # 4-byte tiles: keep Q + 2 stages of K, V under ~100 KiB of shared memory
        return dict(BLOCK_M=64, BLOCK_N=16 if width >= 128 else 32, num_warps=8, num_stages=2)
    if width >= 128:
        return dict(BLOCK_M=128, BLOCK_N=64, num_warps=8, num_stages=2)
    return dict(BLOCK_M=64, BLOCK_N=64, num_warps=4, num_stages=3)


def varlen_attention(q, k, v, cu_seqlens, max_seqlen, causal, scale=None, config=None):
    """Attention within each packed segment; returns o (T, Hq, D) in q's dtype.

    q (T, Hq, D), k and v (T, Hk, D) with Hq a multiple of Hk (may be strided views);
    cu_seqlens (B+1,) int32/int64 offsets; max_seqlen an int >= the longest segment;
    causal: decoder (True) or vision tower (False); scale defaults to 1/sqrt(D).
    config: overrides of the launch configuration (BLOCK_M, BLOCK_N, num_warps, num_stages,
    maxnreg), for benchmarks comparing block shapes; None uses `_launch_config`.
    """
    if q.dim() != 3 or k.dim() != 3 or v.dim() != 3:
        raise ValueError(
            f"varlen_attention: q, k, v must be (T, H, D), got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}"
        )
    t, hq, d = q.shape
    hk = k.shape[1]
    if k.shape != (t, hk, d) or v.shape != (t, hk, d):
        raise ValueError(
            f"varlen_attention: k and v must both be ({t}, Hk, {d}) like q, got {tuple(k.shape)} and {tuple(v.shape)}"
        )
    if hk == 0 or hq % hk:
        raise ValueError(f"varlen_attention: Hq = {hq} must be a multiple of Hk = {hk}")
    if not (q.dtype == k.dtype == v.dtype) or q.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise TypeError(
            f"varlen_attention: q, k, v must share one of fp32/fp16/bf16, got {q.dtype}, {k.dtype}, {v.dtype}"
        )
    if k.device != q.device or v.device != q.device or cu_seqlens.device != q.device:
        raise ValueError(f"varlen_attention: k, v and cu_seqlens must be on q's device {q.device}")
    if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 1 or cu_seqlens.dtype not in (torch.int32, torch.int64):
        raise ValueError(
            f"varlen_attention: cu_seqlens must be a 1-D int32/int64 tensor of B+1 offsets, "
            f"got {tuple(cu_seqlens.shape)} {cu_seqlens.dtype}"
        )
    num_segments = cu_seqlens.numel() - 1
    if num_segments > 65535:
        raise ValueError(f"varlen_attention: at most 65535 segments per launch (grid dim 2), got {num_segments}")
    out = torch.empty((t, hq, d), dtype=q.dtype, device=q.device)
    max_seqlen = int(max_seqlen)
    if t == 0 or hq == 0 or d == 0 or num_segments == 0 or max_seqlen <= 0:
        return out

    scale = 1.0 / math.sqrt(d) if scale is None else float(scale)
    block_d, block_dt = head_dim_split(d)
    cfg = _launch_config(q.device, q.dtype, block_d, block_dt)
    cfg.update(config or {})
    grid = (triton.cdiv(max_seqlen, cfg["BLOCK_M"]), hq, num_segments)
    _varlen_attention_kernel[grid](
        q, q.stride(0), q.stride(1), q.stride(2),
        k, k.stride(0), k.stride(1), k.stride(2),
        v, v.stride(0), v.stride(1), v.stride(2),
        out, out.stride(0), out.stride(1), out.stride(2),
        cu_seqlens.contiguous(),
        hq // hk, scale * _LOG2E,
        D=d, CAUSAL=bool(causal), BLOCK_D=block_d, BLOCK_DT=max(block_dt, 16),
        DOT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
        **cfg,
    )
    return out


def varlen_attention_ref(q, k, v, cu_seqlens, max_seqlen, causal, scale=None):
    """Plain torch, one segment at a time with SDPA, as `moon3rt.model` does. `max_seqlen` is unused."""
    groups = q.shape[1] // k.shape[1]
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    bounds = cu_seqlens.tolist()
    for start, end in zip(bounds[:-1], bounds[1:]):
        if end == start:
            continue
        qi = q[start:end].transpose(0, 1)
        ki = k[start:end].transpose(0, 1).repeat_interleave(groups, dim=0)
        vi = v[start:end].transpose(0, 1).repeat_interleave(groups, dim=0)
        oi = torch.nn.functional.scaled_dot_product_attention(qi, ki, vi, is_causal=causal, scale=scale)
        out[start:end] = oi.transpose(0, 1)
    return out
