"""Bias + QuickGELU, the vision MLP's fc1 epilogue (Qwen2-VL / CLIP's QuickGELU):

    h   = x + bias
    out = h * sigmoid(1.702 * h)

for an fc1 GEMM run without its bias. The reference (`VisionMLP.forward`) evaluates
`h * torch.sigmoid(1.702 * h)` as three torch ops in the activations' dtype, each
rounding its result; the kernel rounds at the same points (a no-op in fp32), so in
fp16/bf16 it agrees with the reference up to the last bit of exp. `h = x + bias` is
rounded to x's dtype too, as `x + bias` in torch is.

`_bias_quick_gelu_kernel`, grid (cdiv(M, BLOCK_M), cdiv(N, BLOCK_N)) over the
flattened (M, N) rows: memory-bound (read 1, write 1). On a GPU the knobs are the
tile and num_warps; the real win is running it as the fc1 GEMM's epilogue.
"""

import torch
import triton
import triton.language as tl


@triton.jit
def _bias_quick_gelu_kernel(
    x_ptr, stride_xm, stride_xn,  # x: (M, N), fc1's output before the bias
    bias_ptr, stride_b,  # bias: (N,), read only if HAS_BIAS
    out_ptr, stride_om, stride_on,  # out: (M, N), written
    M, N,
    HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = cols < N
    mask = (rows < M)[:, None] & mask_n[None, :]
    rows = rows.to(tl.int64)
    dtype = out_ptr.dtype.element_ty
    h = tl.load(x_ptr + rows[:, None] * stride_xm + cols[None, :] * stride_xn, mask=mask, other=0.0).to(tl.float32)
    if HAS_BIAS:
        h += tl.load(bias_ptr + cols * stride_b, mask=mask_n, other=0.0).to(tl.float32)[None, :]
        h = h.to(dtype).to(tl.float32)
    z = (1.702 * h).to(dtype).to(tl.float32)
    gate = (1.0 / (1.0 + tl.exp(-z))).to(dtype).to(tl.float32)
    tl.store(out_ptr + rows[:, None] * stride_om + cols[None, :] * stride_on, (h * gate).to(dtype), mask=mask)


def bias_quick_gelu(x, bias=None):
    """(x + bias) * sigmoid(1.702 * (x + bias)); x (..., N) may be strided, bias (N,) or None."""
    if x.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise TypeError(f"bias_quick_gelu: x must be fp32, fp16 or bf16, got {x.dtype}")
    n = x.shape[-1] if x.dim() else 1
    if bias is not None:
        if bias.shape != (n,):
            raise ValueError(
                f"bias_quick_gelu: bias must have shape ({n},) to match x's last dim, got {tuple(bias.shape)}"
            )
        if bias.device != x.device or bias.dtype != x.dtype:
            raise ValueError(
                f"bias_quick_gelu: bias must be {x.dtype} on {x.device} (x's), got {bias.dtype} on {bias.device}"
            )
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    if x.numel() == 0:
        return out
    m = x.numel() // n
    x2, o2 = x.reshape(m, n), out.view(m, n)  # a view when the leading dims collapse
    b = bias if bias is not None else x2
    block_n = min(triton.next_power_of_2(n), 1024)
    block_m = max(1, min(64, 4096 // block_n))
    grid = (triton.cdiv(m, block_m), triton.cdiv(n, block_n))
    _bias_quick_gelu_kernel[grid](
        x2, x2.stride(0), x2.stride(1),
        b, b.stride(0),
        o2, o2.stride(0), o2.stride(1),
        m, n,
        HAS_BIAS=bias is not None, BLOCK_M=block_m, BLOCK_N=block_n, num_warps=4,
    )
    return out


def bias_quick_gelu_ref(x, bias=None):
    """Plain torch, as `VisionMLP.forward` on fc1's output `h = x + bias`."""
    h = x if bias is None else x + bias
    return h * torch.sigmoid(1.702 * h)
