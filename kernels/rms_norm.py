"""Fused residual-add + RMSNorm, exactly as `moon3rt.model.RMSNorm` (Qwen2's RMSNorm).

    h  = x + residual                        (in x's dtype: rounded once, as torch adds)
    xn = h * rsqrt(mean(h^2) + eps)          (statistics and scaling in fp32)
    y  = weight * xn.to(h.dtype)             (xn rounded to h's dtype first, then scaled)

`y` has torch's promoted dtype of (weight, x), as in the reference. The rounding of
`xn` to x's dtype before the weight multiply is part of the spec (Qwen2 does it), so
the kernel rounds there too rather than computing `xn * weight` in fp32: in bf16 the
two differ by an ulp on a large share of the elements.

`_rms_norm_kernel`, grid (cdiv(M, BLOCK_M),): each program normalises BLOCK_M rows.
Rows up to `_MAX_FUSED_WIDTH` wide are held in registers in one BLOCK_N >= N tile
(one read of x and residual, one write of y and h); wider rows loop over BLOCK_N
chunks twice (sum of squares, then normalise), re-reading x and residual in the
second pass rather than the h just written by the same program. Short rows pack
several rows per program so that each program moves a few KiB.

On a GPU the knobs are BLOCK_M and num_warps per width (a 1536- or 3584-wide row
in bf16 wants 4-8 warps and one row per program; width 64 wants many rows).
"""

import torch
import triton
import triton.language as tl

# Widest row normalised from registers in one tile; wider rows take the two-pass loop.
_MAX_FUSED_WIDTH = 8192


@triton.jit
def _rms_norm_kernel(
    x_ptr, stride_xm, stride_xn,  # x: (M, N)
    res_ptr, stride_rm, stride_rn,  # residual: (M, N), read only if HAS_RESIDUAL
    w_ptr, stride_w,  # weight: (N,)
    y_ptr, stride_ym, stride_yn,  # y: (M, N), written
    h_ptr, stride_hm, stride_hn,  # h = x + residual: (M, N), written only if HAS_RESIDUAL
    M, N, eps,
    HAS_RESIDUAL: tl.constexpr, SINGLE_TILE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    pid = tl.program_id(0)
    rows = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    mask_m = rows < M
    rows = rows.to(tl.int64)
    x_rows = x_ptr + rows[:, None] * stride_xm
    r_rows = res_ptr + rows[:, None] * stride_rm
    h_rows = h_ptr + rows[:, None] * stride_hm
    y_rows = y_ptr + rows[:, None] * stride_ym
    if SINGLE_TILE:
        cols = tl.arange(0, BLOCK_N)
        mask = mask_m[:, None] & (cols < N)[None, :]
        h = tl.load(x_rows + cols[None, :] * stride_xn, mask=mask, other=0.0).to(tl.float32)
        if HAS_RESIDUAL:
            h += tl.load(r_rows + cols[None, :] * stride_rn, mask=mask, other=0.0).to(tl.float32)
            # the sum is rounded to x's dtype, as the reference's `x + residual` is
            h = h.to(h_ptr.dtype.element_ty)
            tl.store(h_rows + cols[None, :] * stride_hn, h, mask=mask)
            h = h.to(tl.float32)
        inv_rms = tl.rsqrt(tl.sum(h * h, axis=1) / N + eps)
        xn = (h * inv_rms[:, None]).to(x_ptr.dtype.element_ty).to(tl.float32)
        w = tl.load(w_ptr + cols * stride_w, mask=cols < N, other=0.0).to(tl.float32)
        tl.store(y_rows + cols[None, :] * stride_yn, (w[None, :] * xn).to(y_ptr.dtype.element_ty), mask=mask)
    else:
        sum_sq = tl.zeros([BLOCK_M], tl.float32)
        for n0 in range(0, N, BLOCK_N):
            cols = n0 + tl.arange(0, BLOCK_N)
            mask = mask_m[:, None] & (cols < N)[None, :]
            h = tl.load(x_rows + cols[None, :] * stride_xn, mask=mask, other=0.0).to(tl.float32)
            if HAS_RESIDUAL:
                h += tl.load(r_rows + cols[None, :] * stride_rn, mask=mask, other=0.0).to(tl.float32)
                h = h.to(h_ptr.dtype.element_ty)
                tl.store(h_rows + cols[None, :] * stride_hn, h, mask=mask)
                h = h.to(tl.float32)
            sum_sq += tl.sum(h * h, axis=1)
        inv_rms = tl.rsqrt(sum_sq / N + eps)
        for n0 in range(0, N, BLOCK_N):
            cols = n0 + tl.arange(0, BLOCK_N)
            mask = mask_m[:, None] & (cols < N)[None, :]
            h = tl.load(x_rows + cols[None, :] * stride_xn, mask=mask, other=0.0).to(tl.float32)
            if HAS_RESIDUAL:
                h += tl.load(r_rows + cols[None, :] * stride_rn, mask=mask, other=0.0).to(tl.float32)
                h = h.to(h_ptr.dtype.element_ty).to(tl.float32)
            xn = (h * inv_rms[:, None]).to(x_ptr.dtype.element_ty).to(tl.float32)
            w = tl.load(w_ptr + cols * stride_w, mask=cols < N, other=0.0).to(tl.float32)
            tl.store(y_rows + cols[None, :] * stride_yn, (w[None, :] * xn).to(y_ptr.dtype.element_ty), mask=mask)


def rms_norm(x, weight, eps, residual=None):
    """RMSNorm over the last dim of `x` (any leading dims), optionally after a residual add.

    Returns `y` when `residual` is None, else `(y, h)` with `h = x + residual` (the new
    residual stream, x's dtype). `y` = weight * (h * rsqrt(mean(h^2) + eps)).to(x.dtype),
    in torch's promoted dtype of (weight, x). Inputs may be strided; outputs are new
    contiguous tensors shaped like x.
    """
    if x.dim() == 0:
        raise ValueError("rms_norm: x must have at least one dim (the normalised one)")
    n = x.shape[-1]
    if weight.shape != (n,):
        raise ValueError(f"rms_norm: weight must have shape ({n},) to match x's last dim, got {tuple(weight.shape)}")
    for name, t in (("x", x), ("weight", weight)) + ((("residual", residual),) if residual is not None else ()):
        if t.dtype not in (torch.float32, torch.float16, torch.bfloat16):
            raise TypeError(f"rms_norm: {name} must be fp32, fp16 or bf16, got {t.dtype}")
        if t.device != x.device:
            raise ValueError(f"rms_norm: {name} is on {t.device}, expected {x.device} (x's device)")
    if residual is not None and (residual.shape != x.shape or residual.dtype != x.dtype):
        raise ValueError(
            f"rms_norm: residual must match x: expected {tuple(x.shape)} {x.dtype}, "
            f"got {tuple(residual.shape)} {residual.dtype}"
        )
    y = torch.empty(x.shape, dtype=torch.promote_types(weight.dtype, x.dtype), device=x.device)
    h = torch.empty_like(x, memory_format=torch.contiguous_format) if residual is not None else None
    m = x.numel() // n if n else 0
    if m == 0 or n == 0:
        return y if residual is None else (y, h)

    x2 = x.reshape(m, n)  # a view whenever the leading dims collapse; strides travel with it
    r2 = residual.reshape(m, n) if residual is not None else x2
    y2 = y.view(m, n)
    h2 = h.view(m, n) if residual is not None else y2
    block_n = triton.next_power_of_2(n)
    single = block_n <= _MAX_FUSED_WIDTH
    if not single:
        block_n = _MAX_FUSED_WIDTH // 2
    block_m = max(1, min(16, 2048 // block_n)) if single else 1
    num_warps = 4 if block_m * block_n <= 2048 else (8 if block_m * block_n <= 8192 else 16)
    _rms_norm_kernel[(triton.cdiv(m, block_m),)](
        x2, x2.stride(0), x2.stride(1),
        r2, r2.stride(0), r2.stride(1),
        weight, weight.stride(0),
        y2, y2.stride(0), y2.stride(1),
        h2, h2.stride(0), h2.stride(1),
        m, n, float(eps),
        HAS_RESIDUAL=residual is not None, SINGLE_TILE=single,
        BLOCK_M=block_m, BLOCK_N=block_n, num_warps=num_warps,
    )
    return y if residual is None else (y, h)


def rms_norm_ref(x, weight, eps, residual=None):
    """Plain torch, the same expression as `moon3rt.model.RMSNorm` after `h = x + residual`."""
    h = x if residual is None else x + residual
    hf = h.float()
    hf = hf * torch.rsqrt(hf.pow(2).mean(-1, keepdim=True) + eps)
    y = weight * hf.to(h.dtype)
    return y if residual is None else (y, h)
