"""Decode attention: one new query token per item against that item's KV cache (GQA).

Reasoning mode (`moon3rt.generate`) decodes all unfinished items of a batch together.
Item a has one query token q[a] (Hq, D) and a cache of lengths[a] keys and values in
slot slots[a] of k_cache / v_cache (N, L, Hk, D):
    o[a, h] = sum_j softmax_j(scale * q[a, h] . k_j) v_j,   k_j = k_cache[slots[a], j, h // G]
over j < lengths[a], with G = Hq // Hk query heads per kv head. The cache is
preallocated, one slot of L positions per item of the batch; `slots` names the slots of
the items still decoding, so items leave the batch without moving anyone's cache, and
every shape depends on (A, N, L) only (nothing is sized from the lengths on the host).
scale defaults to 1/sqrt(D), as `torch.nn.functional.scaled_dot_product_attention`.

`_decode_attention_kernel`, grid (A, Hk, n_chunks): one program per (item, kv head, key
chunk) takes the G query heads of its kv head together as the rows of one
(BLOCK_G, BLOCK_D) tile, so each K/V block is read once per group rather than once per
query head (6x less cache traffic at Qwen2-VL-2B's 12/2 heads), and walks its keys in
BLOCK_N blocks with the online softmax in fp32 (running max m, sum l; scores carry
scale * log2(e) so exp2 is used), exactly like `varlen_attention` with one query row.
BLOCK_G is at least 16, the smallest M of `tl.dot`; rows past G are zeros, never stored.

Split-K (`kv_chunk` = C): chunk c takes keys [c*C, (c+1)*C) of the item, so a short batch
of long caches still fills the GPU; each program writes its unnormalised accumulator
and its (m, l) to fp32 workspaces and `_decode_combine_kernel`, grid (A, Hq), merges
    o = sum_c 2^(m_c - M) acc_c / sum_c 2^(m_c - M) l_c,    M = max_c m_c.
Chunks are fixed key ranges, never sized from the batch, so an item's output depends on
its own cache alone (batch invariance); chunks past an item's length are empty (m = -inf,
l = 0) and add exactly zero. Without `kv_chunk` one program per (item, kv head) walks all
keys and stores the normalised output directly.

Precision: scores, softmax, accumulator and the merge are fp32; in fp16/bf16 the
probabilities are rounded to v's dtype for the P @ V dot, as flash attention does; fp32
inputs use "ieee" dots. lengths must be >= 1 (the decoded token's own key is always in
the cache) and <= L; slots and lengths are trusted (checking them would sync).
"""

import math

import torch
import triton
import triton.language as tl

_LOG2E = 1.4426950408889634


@triton.jit
def _decode_attention_kernel(
    q_ptr, stride_qa, stride_qh, stride_qd,  # q: (A, HQ, D), one query token per item
    k_ptr, stride_kn, stride_kl, stride_kh, stride_kd,  # k_cache: (N, L, HK, D)
    v_ptr, stride_vn, stride_vl, stride_vh, stride_vd,  # v_cache: (N, L, HK, D)
    o_ptr, stride_oa, stride_oh, stride_od,  # o: (A, HQ, D), written when not SPLIT
    acc_ptr, m_ptr, l_ptr,  # SPLIT workspaces, contiguous fp32: acc (A, HQ, C, D); m, l (A, HQ, C)
    slots_ptr, lengths_ptr,  # (A,) int32/int64: each item's cache slot and its number of keys
    D, GROUP, HQ, qk_scale, CHUNK, NUM_CHUNKS,
    SPLIT: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    item = tl.program_id(0)
    kv_head = tl.program_id(1)
    chunk = tl.program_id(2)
    slot = tl.load(slots_ptr + item).to(tl.int64)
    length = tl.load(lengths_ptr + item).to(tl.int32)

    offs_g = tl.arange(0, BLOCK_G)
    offs_d = tl.arange(0, BLOCK_D)
    mask_g = offs_g < GROUP
    mask_d = offs_d < D
    heads = kv_head * GROUP + offs_g
    q = tl.load(q_ptr + item * stride_qa + heads[:, None] * stride_qh + offs_d[None, :] * stride_qd,
                mask=mask_g[:, None] & mask_d[None, :], other=0.0)
    k_base = k_ptr + slot * stride_kn + kv_head * stride_kh
    v_base = v_ptr + slot * stride_vn + kv_head * stride_vh
    if SPLIT:
        lo = chunk * CHUNK
        hi = tl.minimum(length, lo + CHUNK)
    else:
        lo = 0
        hi = length

    acc = tl.zeros([BLOCK_G, BLOCK_D], tl.float32)
    m_i = tl.full([BLOCK_G], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_G], tl.float32)
    for start in range(lo, hi, BLOCK_N):
        offs_n = start + tl.arange(0, BLOCK_N)
        mask_n = offs_n < hi
        kv_mask = mask_n[:, None] & mask_d[None, :]
        # offsets within one segment (or cache) fit int32; the base pointer carries the int64
        # part, and 32-bit per-element offsets keep the tile's address registers (no spills)
        rows = offs_n[:, None]
        k = tl.load(k_base + rows * stride_kl + offs_d[None, :] * stride_kd, mask=kv_mask, other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale
        s = tl.where(mask_n[None, :], s, float("-inf"))  # the first block holds key `start` < hi: m stays finite
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        v = tl.load(v_base + rows * stride_vl + offs_d[None, :] * stride_vd, mask=kv_mask, other=0.0)
        acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision=DOT_PRECISION)
        m_i = m_new

    row_mask = mask_g[:, None] & mask_d[None, :]
    if SPLIT:
        part = (item * HQ + heads).to(tl.int64) * NUM_CHUNKS + chunk  # (BLOCK_G,) index into (A, HQ, C)
        tl.store(acc_ptr + part[:, None] * D + offs_d[None, :], acc, mask=row_mask)
        tl.store(m_ptr + part, m_i, mask=mask_g)
        tl.store(l_ptr + part, l_i, mask=mask_g)
    else:
        o = acc / l_i[:, None]
        tl.store(o_ptr + item * stride_oa + heads[:, None] * stride_oh + offs_d[None, :] * stride_od,
                 o.to(o_ptr.dtype.element_ty), mask=row_mask)


@triton.jit
def _decode_combine_kernel(
    acc_ptr, m_ptr, l_ptr,  # fp32 workspaces: acc (A, HQ, C, D); m, l (A, HQ, C)
    o_ptr, stride_oa, stride_oh, stride_od,  # o: (A, HQ, D), written
    D, HQ, NUM_CHUNKS,
    BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr,
):
    item = tl.program_id(0)
    head = tl.program_id(1)
    row = (item * HQ + head).to(tl.int64) * NUM_CHUNKS
    offs_c = tl.arange(0, BLOCK_C)
    offs_d = tl.arange(0, BLOCK_D)
    mask_c = offs_c < NUM_CHUNKS
    mask_d = offs_d < D
    m = tl.load(m_ptr + row + offs_c, mask=mask_c, other=float("-inf"))
    l = tl.load(l_ptr + row + offs_c, mask=mask_c, other=0.0)
    acc = tl.load(acc_ptr + (row + offs_c)[:, None] * D + offs_d[None, :],
                  mask=mask_c[:, None] & mask_d[None, :], other=0.0)
    m_max = tl.max(m, axis=0)  # finite: chunk 0 always holds key 0
    w = tl.exp2(m - m_max)  # empty chunks: exp2(-inf) = 0
    o = tl.sum(w[:, None] * acc, axis=0) / tl.sum(w * l, axis=0)
    tl.store(o_ptr + item * stride_oa + head * stride_oh + offs_d * stride_od,
             o.to(o_ptr.dtype.element_ty), mask=mask_d)


def _launch_config(device: torch.device, dtype: torch.dtype) -> dict:
    """Block sizes: small under the interpreter, K/V blocks of 4-8 KiB per stage on a GPU."""
    if device.type != "cuda":
        return dict(BLOCK_N=16, num_warps=4, num_stages=1)
    if dtype == torch.float32:
        return dict(BLOCK_N=32, num_warps=4, num_stages=2)
    return dict(BLOCK_N=64, num_warps=4, num_stages=3)


def decode_attention(q, k_cache, v_cache, slots, lengths, scale=None, kv_chunk=None):
    """One decode step's attention; returns o (A, Hq, D) in q's dtype.

    q (A, Hq, D) (may be a strided view); k_cache, v_cache (N, L, Hk, D) with Hq a
    multiple of Hk (may be views, e.g. one layer of a (layers, N, L, Hk, D) cache);
    slots (A,) int32/int64 cache slot of each item; lengths (A,) int32/int64 keys per
    item, 1 <= lengths <= L; scale defaults to 1/sqrt(D); kv_chunk: split each item's
    keys into chunks of this many (split-K with a merge kernel), or None for one pass.
    """
    if q.dim() != 3 or k_cache.dim() != 4 or v_cache.dim() != 4:
        raise ValueError(
            f"decode_attention: q must be (A, Hq, D) and k_cache, v_cache (N, L, Hk, D), got "
            f"{tuple(q.shape)}, {tuple(k_cache.shape)}, {tuple(v_cache.shape)}"
        )
    a, hq, d = q.shape
    n, length, hk, dk = k_cache.shape
    if dk != d or v_cache.shape != k_cache.shape:
        raise ValueError(
            f"decode_attention: k_cache and v_cache must both be (N, L, Hk, {d}), got "
            f"{tuple(k_cache.shape)} and {tuple(v_cache.shape)}"
        )
    if hk == 0 or hq % hk:
        raise ValueError(f"decode_attention: Hq = {hq} must be a multiple of Hk = {hk}")
    if not (q.dtype == k_cache.dtype == v_cache.dtype) or q.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise TypeError(
            f"decode_attention: q and the caches must share one of fp32/fp16/bf16, got "
            f"{q.dtype}, {k_cache.dtype}, {v_cache.dtype}"
        )
    for name, t in (("slots", slots), ("lengths", lengths)):
        if t.shape != (a,) or t.dtype not in (torch.int32, torch.int64):
            raise ValueError(f"decode_attention: {name} must be ({a},) int32/int64, got {tuple(t.shape)} {t.dtype}")
    if any(t.device != q.device for t in (k_cache, v_cache, slots, lengths)):
        raise ValueError(f"decode_attention: the caches, slots and lengths must be on q's device {q.device}")
    if kv_chunk is not None and int(kv_chunk) <= 0:
        raise ValueError(f"decode_attention: kv_chunk must be positive or None, got {kv_chunk}")
    out = torch.empty((a, hq, d), dtype=q.dtype, device=q.device)
    if a == 0 or hq == 0 or d == 0 or length == 0:
        return out

    scale = 1.0 / math.sqrt(d) if scale is None else float(scale)
    group = hq // hk
    block_g = max(16, triton.next_power_of_2(group))
    block_d = max(16, triton.next_power_of_2(d))
    cfg = _launch_config(q.device, q.dtype)
    split = kv_chunk is not None
    chunk = int(kv_chunk) if split else length
    num_chunks = triton.cdiv(length, chunk)
    if split:
        cfg["BLOCK_N"] = min(cfg["BLOCK_N"], max(16, triton.next_power_of_2(chunk)))
        acc = torch.empty((a, hq, num_chunks, d), dtype=torch.float32, device=q.device)
        m = torch.empty((a, hq, num_chunks), dtype=torch.float32, device=q.device)
        l = torch.empty_like(m)
    else:
        acc = m = l = out  # unused pointers
    _decode_attention_kernel[(a, hk, num_chunks if split else 1)](
        q, q.stride(0), q.stride(1), q.stride(2),
        k_cache, *k_cache.stride(),
        v_cache, *v_cache.stride(),
        out, out.stride(0), out.stride(1), out.stride(2),
        acc, m, l,
        slots.contiguous(), lengths.contiguous(),
        d, group, hq, scale * _LOG2E, chunk, num_chunks,
        SPLIT=split, BLOCK_G=block_g, BLOCK_D=block_d,
        DOT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
        **cfg,
    )
    if split:
        _decode_combine_kernel[(a, hq)](
            acc, m, l,
            out, out.stride(0), out.stride(1), out.stride(2),
            d, hq, num_chunks,
            BLOCK_C=triton.next_power_of_2(num_chunks), BLOCK_D=block_d, num_warps=4,
        )
    return out


def decode_attention_ref(q, k_cache, v_cache, slots, lengths, scale=None, kv_chunk=None):
    """Plain torch, one item at a time with SDPA over its cache. `kv_chunk` is unused."""
    groups = q.shape[1] // k_cache.shape[2]
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    for a, (slot, length) in enumerate(zip(slots.tolist(), lengths.tolist())):
        k = k_cache[slot, :length].transpose(0, 1).repeat_interleave(groups, dim=0)  # (Hq, length, D)
        v = v_cache[slot, :length].transpose(0, 1).repeat_interleave(groups, dim=0)
        o = torch.nn.functional.scaled_dot_product_attention(q[a].unsqueeze(1), k, v, scale=scale)
        out[a] = o.squeeze(1)
    return out
