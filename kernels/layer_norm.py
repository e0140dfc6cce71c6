"""LayerNorm with weight and bias (the vision tower's norm1/norm2 and the merger's ln_q).

    h = x + residual                                 (optional; in x's dtype, as torch adds)
    y = (h - mean(h)) * rsqrt(var(h) + eps) * weight + bias

with the biased variance, as `torch.nn.functional.layer_norm`: statistics and the
affine in fp32, `y` cast once to x's dtype. The vision block's
`x = x + attn(...); norm2(x)` is the residual form: it returns `(y, h)`.

`_layer_norm_kernel`, grid (cdiv(M, BLOCK_M),): each program normalises BLOCK_M rows.
Rows up to `_MAX_FUSED_WIDTH` wide (1280 for the Qwen2-VL vision tower) are held in
registers in one tile, and the variance is the exact two-pass mean of squared
deviations; wider rows loop over BLOCK_N chunks three times (mean, variance,
normalise), re-reading the input instead of keeping it. On a GPU the knobs are
BLOCK_M and num_warps per width.
"""

import torch
import triton
import triton.language as tl

# Widest row normalised from registers in one tile; wider rows take the looped path.
_MAX_FUSED_WIDTH = 8192


@triton.jit
def _load_row_block(x_rows, stride_xn, r_rows, stride_rn, h_rows, stride_hn, cols, mask,
                    HAS_RESIDUAL: tl.constexpr, STORE_H: tl.constexpr):
    """One (BLOCK_M, BLOCK_N) tile of h = x (+ residual, rounded to x's dtype) in fp32."""
    h = tl.load(x_rows + cols[None, :] * stride_xn, mask=mask, other=0.0).to(tl.float32)
    if HAS_RESIDUAL:
        h += tl.load(r_rows + cols[None, :] * stride_rn, mask=mask, other=0.0).to(tl.float32)
        h = h.to(h_rows.dtype.element_ty)
        if STORE_H:
            tl.store(h_rows + cols[None, :] * stride_hn, h, mask=mask)
        h = h.to(tl.float32)
    return h


@triton.jit
def _layer_norm_kernel(
    x_ptr, stride_xm, stride_xn,  # x: (M, N)
    res_ptr, stride_rm, stride_rn,  # residual: (M, N), read only if HAS_RESIDUAL
    w_ptr, stride_w,  # weight: (N,)
    b_ptr, stride_b,  # bias: (N,), read only if HAS_BIAS
    y_ptr, stride_ym, stride_yn,  # y: (M, N), written
    h_ptr, stride_hm, stride_hn,  # h = x + residual: (M, N), written only if HAS_RESIDUAL
    M, N, eps,
    HAS_RESIDUAL: tl.constexpr, HAS_BIAS: tl.constexpr, SINGLE_TILE: tl.constexpr,
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
        mask_n = cols < N
        mask = mask_m[:, None] & mask_n[None, :]
        h = _load_row_block(x_rows, stride_xn, r_rows, stride_rn, h_rows, stride_hn, cols, mask,
                            HAS_RESIDUAL, True)
        mean = tl.sum(h, axis=1) / N
        dev = tl.where(mask, h - mean[:, None], 0.0)
        rstd = tl.rsqrt(tl.sum(dev * dev, axis=1) / N + eps)
        y = dev * rstd[:, None] * tl.load(w_ptr + cols * stride_w, mask=mask_n, other=0.0).to(tl.float32)[None, :]
        if HAS_BIAS:
            y += tl.load(b_ptr + cols * stride_b, mask=mask_n, other=0.0).to(tl.float32)[None, :]
        tl.store(y_rows + cols[None, :] * stride_yn, y.to(y_ptr.dtype.element_ty), mask=mask)
    else:
        total = tl.zeros([BLOCK_M], tl.float32)
        for n0 in range(0, N, BLOCK_N):
            cols = n0 + tl.arange(0, BLOCK_N)
            mask = mask_m[:, None] & (cols < N)[None, :]
            h = _load_row_block(x_rows, stride_xn, r_rows, stride_rn, h_rows, stride_hn, cols, mask,
                                HAS_RESIDUAL, True)
            total += tl.sum(h, axis=1)
        mean = total / N
        sq = tl.zeros([BLOCK_M], tl.float32)
        for n0 in range(0, N, BLOCK_N):
            cols = n0 + tl.arange(0, BLOCK_N)
            mask = mask_m[:, None] & (cols < N)[None, :]
            h = _load_row_block(x_rows, stride_xn, r_rows, stride_rn, h_rows, stride_hn, cols, mask,
                                HAS_RESIDUAL, False)
            dev = tl.where(mask, h - mean[:, None], 0.0)
            sq += tl.sum(dev * dev, axis=1)
        rstd = tl.rsqrt(sq / N + eps)
        for n0 in range(0, N, BLOCK_N):
            cols = n0 + tl.arange(0, BLOCK_N)
            mask_n = cols < N
            mask = mask_m[:, None] & mask_n[None, :]
            h = _load_row_block(x_rows, stride_xn, r_rows, stride_rn, h_rows, stride_hn, cols, mask,
                                HAS_RESIDUAL, False)
            w = tl.load(w_ptr + cols * stride_w, mask=mask_n, other=0.0).to(tl.float32)
            y = (h - mean[:, None]) * rstd[:, None] * w[None, :]
            if HAS_BIAS:
                y += tl.load(b_ptr + cols * stride_b, mask=mask_n, other=0.0).to(tl.float32)[None, :]
            tl.store(y_rows + cols[None, :] * stride_yn, y.to(y_ptr.dtype.element_ty), mask=mask)


def layer_norm(x, weight, bias, eps=1e-6, residual=None):
    """LayerNorm over the last dim of `x` (any leading dims), optionally after a residual add.

    weight (N,), bias (N,) or None. Returns `y` (x's dtype, shaped like x) when
    `residual` is None, else `(y, h)` with `h = x + residual`. Inputs may be strided;
    outputs are new contiguous tensors.
    """
    if x.dim() == 0:
        raise ValueError("layer_norm: x must have at least one dim (the normalised one)")
    n = x.shape[-1]
    named = [("x", x), ("weight", weight)]
    if weight.shape != (n,):
        raise ValueError(f"layer_norm: weight must have shape ({n},) to match x's last dim, got {tuple(weight.shape)}")
    if bias is not None:
        if bias.shape != (n,):
            raise ValueError(f"layer_norm: bias must have shape ({n},) to match x's last dim, got {tuple(bias.shape)}")
        named.append(("bias", bias))
    if residual is not None:
        if residual.shape != x.shape or residual.dtype != x.dtype:
            raise ValueError(
                f"layer_norm: residual must match x: expected {tuple(x.shape)} {x.dtype}, "
                f"got {tuple(residual.shape)} {residual.dtype}"
            )
        named.append(("residual", residual))
    for name, t in named:
        if t.dtype not in (torch.float32, torch.float16, torch.bfloat16):
            raise TypeError(f"layer_norm: {name} must be fp32, fp16 or bf16, got {t.dtype}")
        if t.device != x.device:
            raise ValueError(f"layer_norm: {name} is on {t.device}, expected {x.device} (x's device)")
    y = torch.empty_like(x, memory_format=torch.contiguous_format)
    h = torch.empty_like(x, memory_format=torch.contiguous_format) if residual is not None else None
    m = x.numel() // n if n else 0
    if m == 0 or n == 0:
        return y if residual is None else (y, h)

    x2 = x.reshape(m, n)  # a view whenever the leading dims collapse; strides travel with it
    r2 = residual.reshape(m, n) if residual is not None else x2
    y2 = y.view(m, n)
    h2 = h.view(m, n) if residual is not None else y2
    b = bias if bias is not None else weight
    block_n = triton.next_power_of_2(n)
    single = block_n <= _MAX_FUSED_WIDTH
    if not single:
        block_n = _MAX_FUSED_WIDTH // 2
    block_m = max(1, min(16, 2048 // block_n)) if single else 1
    num_warps = 4 if block_m * block_n <= 2048 else (8 if block_m * block_n <= 8192 else 16)
    _layer_norm_kernel[(triton.cdiv(m, block_m),)](
        x2, x2.stride(0), x2.stride(1),
        r2, r2.stride(0), r2.stride(1),
        weight, weight.stride(0),
        b, b.stride(0),
        y2, y2.stride(0), y2.stride(1),
        h2, h2.stride(0), h2.stride(1),
        m, n, float(eps),
        HAS_RESIDUAL=residual is not None, HAS_BIAS=bias is not None, SINGLE_TILE=single,
        BLOCK_M=block_m, BLOCK_N=block_n, num_warps=num_warps,
    )
    return y if residual is None else (y, h)


def layer_norm_ref(x, weight, bias, eps=1e-6, residual=None):
    """Plain torch: the layer_norm formula in fp32, cast once to x's dtype (F.layer_norm's convention)."""
    h = x if residual is None else x + residual
    hf = h.float()
    mean = hf.mean(-1, keepdim=True)
    var = (hf - mean).pow(2).mean(-1, keepdim=True)
    y = (hf - mean) * torch.rsqrt(var + eps) * weight.float()
    if bias is not None:
        y = y + bias.float()
    y = y.to(x.dtype)
    return y if residual is None else (y, h)
