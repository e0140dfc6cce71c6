"""MHMF pooling in absorbed form (DESIGN.md, "MHMF: multi-head modality fusion").

For item b, head h and modality m in {image, text} (packed varlen, item b owns rows
cu_m[b]:cu_m[b+1] of x_m):
    a_i^{h,m}    = softmax_{i in m}(q~_h . x_i)          q~_h = W_k^{hT} q_h / sqrt(d_f)
    xbar^{h,m}   = sum_i a_i^{h,m} x_i
    g^h          = softmax over the PRESENT (non-empty) modalities of gate_logits[b, h]
    x_mix[b, h]  = sum_m g^{h,m} xbar^{h,m}              (0 when both segments are empty)
The caller finishes the head with o^h = W_v^h x_mix + b_v (rows of the attention
weights sum to one, so the V projection commutes with the pooling).

Kernel design: two launches, each reading every raw token once for all heads.
  1. `_fusion_scores_kernel`, grid (B, 2): one program per (item, modality) walks the
     segment in BLOCK_N tiles, computes the H x BLOCK_N score tile q~ @ x^T by
     accumulating over D in BLOCK_D chunks, writes the raw scores (H x N fp32, tiny)
     and keeps an online row max / row sum-of-exp, stored once at the end.
  2. `_fusion_pool_kernel`, grid (cdiv(D, BLOCK_D), B): one program per (D-block,
     item) turns the scores into weights exp(s - max) / sum and accumulates
     weights @ x[:, D-block] for both modalities, then mixes them with the gate.
Why not one kernel: the output accumulator is H x D (16 x 1536 fp32 = 96 KiB at real
sizes), far above a program's registers, so the pooling must be split over D-blocks;
recomputing the scores in every D-block would redo the H x N x D score GEMM
cdiv(D, BLOCK_D) times (24x at D=1536) and make the op compute-bound. Two passes
cost one extra launch and H x N x 4 bytes of scratch, and the register footprint
stays bounded by the block sizes for any D (3584 included).

Precision: all arithmetic is fp32. Dots run on fp32 operands with input_precision
"ieee" for fp32 inputs and "tf32" for fp16/bf16 inputs (16-bit values are exact in
TF32, so only the fp32 softmax weights and queries are rounded, to 10 mantissa bits).
The result is cast once, to x's dtype, on store.

Strided inputs: x_img/x_txt, q and gate_logits are read through their strides (any
row and column stride), so views need no copy; cu_img/cu_txt are made contiguous.
cu values are trusted, as in other varlen kernels: checking them would need a sync.
"""

import torch
import triton
import triton.language as tl


@triton.jit
def _segment_scores(
    q_ptr, stride_qh, stride_qd,  # q~ of one item: (H, D)
    x_ptr, stride_xn, stride_xd,  # packed tokens of one modality: (N_m, D)
    s_ptr, stride_sh,  # scores of the same modality: (H, N_m) fp32, written
    max_ptr, sum_ptr,  # row max / row sum-of-exp of this (item, modality): (H,) fp32, written
    start, end, H, D,
    H_PAD: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    offs_h = tl.arange(0, H_PAD)
    mask_h = offs_h < H
    row_max = tl.full([H_PAD], float("-inf"), tl.float32)
    row_sum = tl.zeros([H_PAD], tl.float32)
    for n0 in range(start, end, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        mask_n = offs_n < end
        scores = tl.zeros([H_PAD, BLOCK_N], tl.float32)
        for d0 in range(0, D, BLOCK_D):
            offs_d = d0 + tl.arange(0, BLOCK_D)
            mask_d = offs_d < D
            q = tl.load(
                q_ptr + offs_h[:, None] * stride_qh + offs_d[None, :] * stride_qd,
                mask=mask_h[:, None] & mask_d[None, :], other=0.0,
            ).to(tl.float32)
            # the token tile is loaded transposed, (BLOCK_D, BLOCK_N), ready for q @ x^T
            x_t = tl.load(
                x_ptr + offs_n[None, :].to(tl.int64) * stride_xn + offs_d[:, None] * stride_xd,
                mask=mask_n[None, :] & mask_d[:, None], other=0.0,
            ).to(tl.float32)
            scores = tl.dot(q, x_t, scores, input_precision=DOT_PRECISION)
        tl.store(
            s_ptr + offs_h[:, None] * stride_sh + offs_n[None, :], scores,
            mask=mask_h[:, None] & mask_n[None, :],
        )
        # online softmax statistics; every tile holds at least one real token, so the
        # new max is finite and exp(-inf - max) = 0 removes the padded columns
        scores = tl.where(mask_n[None, :], scores, float("-inf"))
        new_max = tl.maximum(row_max, tl.max(scores, axis=1))
        row_sum = row_sum * tl.exp(row_max - new_max) + tl.sum(tl.exp(scores - new_max[:, None]), axis=1)
        row_max = new_max
    tl.store(max_ptr + offs_h, row_max, mask=mask_h)
    tl.store(sum_ptr + offs_h, row_sum, mask=mask_h)


@triton.jit
def _fusion_scores_kernel(
    q_ptr, stride_qb, stride_qh, stride_qd,  # q~: (B, H, D)
    x_img_ptr, stride_img_n, stride_img_d,  # image tokens: (N_img, D)
    cu_img_ptr,  # image cumulative lengths: (B + 1,)
    s_img_ptr,  # image scores: (H, N_img) fp32, written
    x_txt_ptr, stride_txt_n, stride_txt_d,  # text tokens: (N_txt, D)
    cu_txt_ptr,  # text cumulative lengths: (B + 1,)
    s_txt_ptr,  # text scores: (H, N_txt) fp32, written
    max_ptr, sum_ptr,  # softmax statistics: (B, 2, H) fp32, written
    H, D, N_img, N_txt,
    H_PAD: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    b = tl.program_id(0)
    modality = tl.program_id(1)  # 0 image, 1 text
    q_item = q_ptr + b * stride_qb
    stat = (b * 2 + modality) * H
    if modality == 0:
        _segment_scores(
            q_item, stride_qh, stride_qd, x_img_ptr, stride_img_n, stride_img_d,
            s_img_ptr, N_img, max_ptr + stat, sum_ptr + stat,
            tl.load(cu_img_ptr + b), tl.load(cu_img_ptr + b + 1), H, D,
            H_PAD, BLOCK_N, BLOCK_D, DOT_PRECISION,
        )
    else:
        _segment_scores(
            q_item, stride_qh, stride_qd, x_txt_ptr, stride_txt_n, stride_txt_d,
            s_txt_ptr, N_txt, max_ptr + stat, sum_ptr + stat,
            tl.load(cu_txt_ptr + b), tl.load(cu_txt_ptr + b + 1), H, D,
            H_PAD, BLOCK_N, BLOCK_D, DOT_PRECISION,
        )


@triton.jit
def _segment_pool(
    x_ptr, stride_xn, stride_xd,  # packed tokens of one modality: (N_m, D)
    s_ptr, stride_sh,  # scores of the same modality: (H, N_m) fp32
    max_ptr, sum_ptr,  # row max / row sum-of-exp of this (item, modality): (H,) fp32
    start, end, H, D, d_start,
    H_PAD: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """xbar[:, d_start:d_start + BLOCK_D] of one (item, modality); 0 for an empty segment."""
    offs_h = tl.arange(0, H_PAD)
    mask_h = offs_h < H
    offs_d = d_start + tl.arange(0, BLOCK_D)
    mask_d = offs_d < D
    row_max = tl.load(max_ptr + offs_h, mask=mask_h, other=0.0)
    row_sum = tl.load(sum_ptr + offs_h, mask=mask_h, other=0.0)
    acc = tl.zeros([H_PAD, BLOCK_D], tl.float32)
    for n0 in range(start, end, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        mask_n = offs_n < end
        scores = tl.load(
            s_ptr + offs_h[:, None] * stride_sh + offs_n[None, :],
            mask=mask_h[:, None] & mask_n[None, :], other=float("-inf"),
        )
        weights = tl.exp(scores - row_max[:, None])  # padded heads / tokens -> 0
        x = tl.load(
            x_ptr + offs_n[:, None].to(tl.int64) * stride_xn + offs_d[None, :] * stride_xd,
            mask=mask_n[:, None] & mask_d[None, :], other=0.0,
        ).to(tl.float32)
        acc = tl.dot(weights, x, acc, input_precision=DOT_PRECISION)
    # an empty segment has row_sum 0 and acc 0: give 0 rather than 0 / 0
    inv_sum = tl.where(row_sum > 0, 1.0 / tl.where(row_sum > 0, row_sum, 1.0), 0.0)
    return acc * inv_sum[:, None]


@triton.jit
def _fusion_pool_kernel(
    x_img_ptr, stride_img_n, stride_img_d,  # image tokens: (N_img, D)
    cu_img_ptr,  # image cumulative lengths: (B + 1,)
    s_img_ptr,  # image scores: (H, N_img) fp32
    x_txt_ptr, stride_txt_n, stride_txt_d,  # text tokens: (N_txt, D)
    cu_txt_ptr,  # text cumulative lengths: (B + 1,)
    s_txt_ptr,  # text scores: (H, N_txt) fp32
    max_ptr, sum_ptr,  # softmax statistics: (B, 2, H) fp32
    gate_ptr, stride_gb, stride_gh, stride_gm,  # gate logits: (B, H, 2)
    out_ptr, stride_ob, stride_oh,  # x_mix: (B, H, D), unit stride along D
    H, D, N_img, N_txt,
    H_PAD: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    pid_d = tl.program_id(0)
    b = tl.program_id(1)
    d_start = pid_d * BLOCK_D
    img_start = tl.load(cu_img_ptr + b)
    img_end = tl.load(cu_img_ptr + b + 1)
    txt_start = tl.load(cu_txt_ptr + b)
    txt_end = tl.load(cu_txt_ptr + b + 1)
    stat = b * 2 * H
    xbar_img = _segment_pool(
        x_img_ptr, stride_img_n, stride_img_d, s_img_ptr, N_img,
        max_ptr + stat, sum_ptr + stat, img_start, img_end, H, D, d_start,
        H_PAD, BLOCK_N, BLOCK_D, DOT_PRECISION,
    )
    xbar_txt = _segment_pool(
        x_txt_ptr, stride_txt_n, stride_txt_d, s_txt_ptr, N_txt,
        max_ptr + stat + H, sum_ptr + stat + H, txt_start, txt_end, H, D, d_start,
        H_PAD, BLOCK_N, BLOCK_D, DOT_PRECISION,
    )

    # gate: softmax over the present modalities only; an absent one gets weight 0
    offs_h = tl.arange(0, H_PAD)
    mask_h = offs_h < H
    has_img = img_end > img_start
    has_txt = txt_end > txt_start
    gate_row = gate_ptr + b * stride_gb + offs_h * stride_gh
    logit_img = tl.load(gate_row, mask=mask_h, other=0.0).to(tl.float32)
    logit_txt = tl.load(gate_row + stride_gm, mask=mask_h, other=0.0).to(tl.float32)
    logit_img = tl.where(has_img, logit_img, float("-inf"))
    logit_txt = tl.where(has_txt, logit_txt, float("-inf"))
    top = tl.where(has_img | has_txt, tl.maximum(logit_img, logit_txt), 0.0)
    e_img = tl.exp(logit_img - top)
    e_txt = tl.exp(logit_txt - top)
    denom = e_img + e_txt
    denom = tl.where(denom > 0, denom, 1.0)  # both empty: weights 0, result 0
    mix = (e_img / denom)[:, None] * xbar_img + (e_txt / denom)[:, None] * xbar_txt

    offs_d = d_start + tl.arange(0, BLOCK_D)
    tl.store(
        out_ptr + b * stride_ob + offs_h[:, None] * stride_oh + offs_d[None, :],
        mix.to(out_ptr.dtype.element_ty),
        mask=mask_h[:, None] & (offs_d[None, :] < D),
    )


def _check_cu(name, cu, batch, device):
    if cu.dim() != 1 or cu.shape[0] != batch + 1:
        raise ValueError(f"fusion_attention: {name} must have shape ({batch + 1},), got {tuple(cu.shape)}")
    if cu.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"fusion_attention: {name} must be int32 or int64, got {cu.dtype}")
    if cu.device != device:
        raise ValueError(f"fusion_attention: {name} is on {cu.device}, expected {device}")
    return cu.contiguous()


def _check_tokens(name, x, dim, device):
    if x.dim() != 2 or x.shape[1] != dim:
        raise ValueError(f"fusion_attention: {name} must have shape (N, {dim}), got {tuple(x.shape)}")
    if x.device != device:
        raise ValueError(f"fusion_attention: {name} is on {x.device}, expected {device}")
    if x.shape[0] == 0:
        # never read (every segment is empty); a real 1-row buffer keeps the pointer valid
        return x.new_zeros((1, dim))
    return x


def fusion_attention(q, x_img, cu_img, x_txt, cu_txt, gate_logits, out_dtype=None, precision=None) -> torch.Tensor:
    """Gated per-modality attention pooling of raw tokens, all heads at once.

    q (B, H, D) absorbed, pre-scaled queries; x_img (N_img, D) and x_txt (N_txt, D)
    packed raw tokens with cumulative lengths cu_img, cu_txt (B + 1,); gate_logits
    (B, H, 2), [..., 0] image and [..., 1] text. Returns x_mix (B, H, D) in `out_dtype`
    (default x's dtype). precision: tl.dot's input precision, "ieee" (exact fp32) or
    "tf32"; default "ieee" for fp32 tokens and "tf32" for 16-bit ones (exact for the
    16-bit tokens, rounding only the fp32 queries and softmax weights). A caller that
    wants fp32 accuracy from 16-bit tokens passes out_dtype=torch.float32, precision="ieee"
    instead of upcasting the tokens in memory.
    """
    if q.dim() != 3:
        raise ValueError(f"fusion_attention: q must have shape (B, H, D), got {tuple(q.shape)}")
    batch, heads, dim = q.shape
    device = q.device
    if not q.is_floating_point() or not gate_logits.is_floating_point():
        raise TypeError(
            f"fusion_attention: q and gate_logits must be floating point, got {q.dtype} and {gate_logits.dtype}"
        )
    if gate_logits.device != device:
        raise ValueError(f"fusion_attention: gate_logits is on {gate_logits.device}, expected {device}")
    if x_img.dtype != x_txt.dtype or x_img.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise TypeError(
            "fusion_attention: x_img and x_txt must share one dtype of fp32/fp16/bf16, "
            f"got {x_img.dtype} and {x_txt.dtype}"
        )
    if gate_logits.shape != (batch, heads, 2):
        raise ValueError(
            f"fusion_attention: gate_logits must have shape ({batch}, {heads}, 2), "
            f"got {tuple(gate_logits.shape)}"
        )
    x_img = _check_tokens("x_img", x_img, dim, device)
    x_txt = _check_tokens("x_txt", x_txt, dim, device)
    cu_img = _check_cu("cu_img", cu_img, batch, device)
    cu_txt = _check_cu("cu_txt", cu_txt, batch, device)

    if precision not in (None, "ieee", "tf32"):
        raise ValueError(f"fusion_attention: precision must be 'ieee' or 'tf32', got {precision!r}")
    if batch > 65535:
        raise ValueError(f"fusion_attention: at most 65535 items per launch, got {batch}")
    out = torch.empty((batch, heads, dim), dtype=out_dtype or x_img.dtype, device=device)
    if batch == 0 or heads == 0 or dim == 0:
        return out.zero_()
    n_img, n_txt = x_img.shape[0], x_txt.shape[0]
    scores_img = torch.empty((heads, n_img), dtype=torch.float32, device=device)
    scores_txt = torch.empty((heads, n_txt), dtype=torch.float32, device=device)
    row_max = torch.empty((batch, 2, heads), dtype=torch.float32, device=device)
    row_sum = torch.empty((batch, 2, heads), dtype=torch.float32, device=device)

    # tl.dot needs every block dimension >= 16; heads are padded to a power of two.
    # Block sizes and warps keep both kernels free of register spills on sm_90 at
    # H <= 16 (checked with ptxas -v): 64 tokens x 32 features per score step, 64 x 64
    # per pooling step, 8 warps.
    h_pad = max(16, triton.next_power_of_2(heads))
    score_block_d = min(32, max(16, triton.next_power_of_2(dim)))
    pool_block_d = min(64, max(16, triton.next_power_of_2(dim)))
    block_n = 64
    dot_precision = precision or ("ieee" if x_img.dtype == torch.float32 else "tf32")

    _fusion_scores_kernel[(batch, 2)](
        q, q.stride(0), q.stride(1), q.stride(2),
        x_img, x_img.stride(0), x_img.stride(1), cu_img, scores_img,
        x_txt, x_txt.stride(0), x_txt.stride(1), cu_txt, scores_txt,
        row_max, row_sum,
        heads, dim, n_img, n_txt,
        H_PAD=h_pad, BLOCK_N=block_n, BLOCK_D=score_block_d, DOT_PRECISION=dot_precision,
        num_warps=8,
    )
    _fusion_pool_kernel[(triton.cdiv(dim, pool_block_d), batch)](
        x_img, x_img.stride(0), x_img.stride(1), cu_img, scores_img,
        x_txt, x_txt.stride(0), x_txt.stride(1), cu_txt, scores_txt,
        row_max, row_sum,
        gate_logits, gate_logits.stride(0), gate_logits.stride(1), gate_logits.stride(2),
        out, out.stride(0), out.stride(1),
        heads, dim, n_img, n_txt,
        H_PAD=h_pad, BLOCK_N=block_n, BLOCK_D=pool_block_d, DOT_PRECISION=dot_precision,
        num_warps=8,
    )
    return out


def fusion_attention_ref(q, x_img, cu_img, x_txt, cu_txt, gate_logits, upcast=True) -> torch.Tensor:
    """Plain-torch x_mix (the spec in code), looping over items.

    upcast=True computes in fp32 (the reference); upcast=False computes in x's dtype,
    the "plain torch in the same dtype" baseline for attention-like tolerances.
    """
    dtype = x_img.dtype
    compute = torch.float32 if upcast else dtype
    batch, heads, dim = q.shape
    out = torch.zeros((batch, heads, dim), dtype=compute, device=q.device)
    segments = ((x_img, cu_img.tolist()), (x_txt, cu_txt.tolist()))
    for b in range(batch):
        pooled, logits = [], []
        for modality, (x, cu) in enumerate(segments):
            if cu[b + 1] == cu[b]:
                continue  # absent modality: no attention, no gate weight
            tokens = x[cu[b]:cu[b + 1]].to(compute)  # (n, D)
            weights = torch.softmax(q[b].to(compute) @ tokens.T, dim=-1)  # (H, n)
            pooled.append(weights @ tokens)  # (H, D)
            logits.append(gate_logits[b, :, modality].to(compute))
        if pooled:
            gate = torch.softmax(torch.stack(logits, dim=-1), dim=-1)  # (H, present)
            out[b] = sum(gate[:, j, None] * pooled[j] for j in range(len(pooled)))
    return out.to(dtype)
