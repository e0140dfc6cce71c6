"""GEMMs with the MLP activation in their epilogue: fc1 + QuickGELU, gate_up + SwiGLU.

    linear_quick_gelu(x, w, b) = quick_gelu(x @ w^T + b),   quick_gelu(h) = h * sigmoid(1.702 h)
    linear_swiglu(x, w)        = silu(x @ w_gate^T) * (x @ w_up^T),   w = [w_gate | w_up] (2I, K)

Unfused, the activation kernel re-reads the GEMM's whole output (for moon3-2b at 64
items: fc1's 65536 x 5120 and gate_up's ~19k x 17920, ~1.3 GB and ~1 GB per layer) and
writes its result; here the activation runs on the accumulator tile while it is still in
registers, and SwiGLU writes only its I columns (half of gate_up's output).

`_gemm_act_kernel`, grid (cdiv(M, BLOCK_M) * cdiv(N, BLOCK_N),), programs ordered in
groups of GROUP_M row blocks (neighbouring programs share weight tiles in L2). A
program accumulates x @ w^T for one BLOCK_M x BLOCK_N tile in fp32 over K; for SwiGLU
it keeps two accumulators, the gate rows n and the up rows I + n of the packed weight,
so the fused [gate | up] weight of the triton backend is used as it is.

Rounding follows the reference model: the GEMM's output is rounded to the activations'
dtype once (bias included, as nn.Linear's addmm does), then the activation rounds at the
same points as `kernels/quick_gelu.py` and `kernels/swiglu.py`. The result differs from
cuBLAS + the activation kernel only by the GEMM's summation order. fp32 inputs use
"ieee" dots (no TF32).

Whether this beats cuBLAS + the activation kernel depends on the card and the shapes
(cuBLAS' GEMMs are hard to match; the fusion saves a read and a write of the output):
`bench/bench_kernels.py` times both, and the triton backend takes this path only when
asked (``MOON3RT_GEMM_EPILOGUE=fused``).
"""

import torch
import triton
import triton.language as tl

ACTIVATIONS = ("quick_gelu", "swiglu")


@triton.jit
def _gemm_act_kernel(
    x_ptr, stride_xm, stride_xk,  # x: (M, K)
    w_ptr, stride_wn, stride_wk,  # w: (N, K) for quick_gelu, (2N, K) = [gate | up] for swiglu; nn.Linear layout
    bias_ptr,  # bias: (N,), read only if HAS_BIAS
    out_ptr, stride_om, stride_on,  # out: (M, N), written
    M, N, K, up_offset,  # up_offset = N * stride_wn: swiglu's up rows follow the N gate rows
    ACTIVATION: tl.constexpr, HAS_BIAS: tl.constexpr, EVEN_K: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    pid = tl.program_id(0)
    blocks_m = tl.cdiv(M, BLOCK_M)
    blocks_n = tl.cdiv(N, BLOCK_N)
    # grouped order: GROUP_M row blocks walk the column blocks together (weight tiles reused in L2)
    per_group = GROUP_M * blocks_n
    first_m = (pid // per_group) * GROUP_M
    group_rows = tl.minimum(blocks_m - first_m, GROUP_M)
    pid_m = first_m + (pid % per_group) % group_rows
    pid_n = (pid % per_group) // group_rows

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    mask_m = offs_m < M
    mask_n = offs_n < N
    x_tile = x_ptr + offs_m[:, None].to(tl.int64) * stride_xm + offs_k[None, :] * stride_xk
    # the weight tile loaded as (BLOCK_K, BLOCK_N), ready for x @ w^T
    w_tile = w_ptr + offs_n[None, :].to(tl.int64) * stride_wn + offs_k[:, None] * stride_wk
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    acc_up = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for k0 in range(0, K, BLOCK_K):
        if EVEN_K:
            x_mask = mask_m[:, None]
            w_mask = mask_n[None, :]
        else:
            k_ok = (k0 + offs_k) < K
            x_mask = mask_m[:, None] & k_ok[None, :]
            w_mask = mask_n[None, :] & k_ok[:, None]
        x = tl.load(x_tile, mask=x_mask, other=0.0)
        w = tl.load(w_tile, mask=w_mask, other=0.0)
        acc = tl.dot(x, w, acc, input_precision=DOT_PRECISION)
        if ACTIVATION == "swiglu":
            w_up = tl.load(w_tile + up_offset, mask=w_mask, other=0.0)
            acc_up = tl.dot(x, w_up, acc_up, input_precision=DOT_PRECISION)
        x_tile += BLOCK_K * stride_xk
        w_tile += BLOCK_K * stride_wk

    dtype = out_ptr.dtype.element_ty
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    h = acc.to(dtype).to(tl.float32)  # the GEMM's output, rounded once as nn.Linear's
    if ACTIVATION == "quick_gelu":
        z = (1.702 * h).to(dtype).to(tl.float32)
        gate = (1.0 / (1.0 + tl.exp(-z))).to(dtype).to(tl.float32)
        out = h * gate
    else:
        up = acc_up.to(dtype).to(tl.float32)
        act = (h / (1.0 + tl.exp(-h))).to(dtype).to(tl.float32)  # silu, rounded as torch's
        out = act * up
    out_ptrs = out_ptr + offs_m[:, None].to(tl.int64) * stride_om + offs_n[None, :] * stride_on
    tl.store(out_ptrs, out.to(dtype), mask=mask_m[:, None] & mask_n[None, :])


def _launch_config(device: torch.device, dtype: torch.dtype, activation: str) -> dict:
    """Tiles: small under the interpreter; on a GPU 128-row tiles, BLOCK_N halved for SwiGLU's two
    accumulators, fp32 tiles halved again (4-byte operands, "ieee" dots)."""
    if device.type != "cuda":
        return {"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": 16, "GROUP_M": 4, "num_warps": 4, "num_stages": 1}
    block_n = 128 if activation == "quick_gelu" else 64
    if dtype == torch.float32:
        return {"BLOCK_M": 64, "BLOCK_N": block_n // 2, "BLOCK_K": 32, "GROUP_M": 8, "num_warps": 8, "num_stages": 2}
    return {"BLOCK_M": 128, "BLOCK_N": block_n, "BLOCK_K": 64, "GROUP_M": 8, "num_warps": 8, "num_stages": 3}


def _gemm_act(x, w, bias, activation, config=None):
    op = f"linear_{activation}"
    if x.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise TypeError(f"{op}: x must be fp32, fp16 or bf16, got {x.dtype}")
    if w.dim() != 2 or w.dtype != x.dtype or w.device != x.device:
        raise ValueError(f"{op}: w must be a 2-D {x.dtype} tensor on {x.device}, got {tuple(w.shape)} "
                         f"{w.dtype} on {w.device}")
    k = x.shape[-1] if x.dim() else 0
    if w.shape[1] != k:
        raise ValueError(f"{op}: w must be (N, {k}) to match x's last dim {k}, got {tuple(w.shape)}")
    if activation == "swiglu" and w.shape[0] % 2:
        raise ValueError(f"{op}: w must be [w_gate | w_up] with an even number of rows, got {tuple(w.shape)}")
    n = w.shape[0] // 2 if activation == "swiglu" else w.shape[0]
    if bias is not None and (bias.shape != (n,) or bias.dtype != x.dtype or bias.device != x.device):
        raise ValueError(f"{op}: bias must be ({n},) {x.dtype} on {x.device}, got {tuple(bias.shape)} "
                         f"{bias.dtype} on {bias.device}")
    out = torch.empty((*x.shape[:-1], n), dtype=x.dtype, device=x.device)
    m = x.numel() // k if k else 0
    if m == 0 or n == 0:
        return out
    if k == 0:
        raise ValueError(f"{op}: x has an empty last dim")
    x2, o2 = x.reshape(m, k), out.view(m, n)
    cfg = _launch_config(x.device, x.dtype, activation)
    cfg.update(config or {})
    grid = (triton.cdiv(m, cfg["BLOCK_M"]) * triton.cdiv(n, cfg["BLOCK_N"]),)
    _gemm_act_kernel[grid](
        x2, x2.stride(0), x2.stride(1),
        w, w.stride(0), w.stride(1),
        bias if bias is not None else w,
        o2, o2.stride(0), o2.stride(1),
        m, n, k, n * w.stride(0),
        ACTIVATION=activation, HAS_BIAS=bias is not None, EVEN_K=k % cfg["BLOCK_K"] == 0,
        DOT_PRECISION="ieee" if x.dtype == torch.float32 else "tf32",
        **cfg,
    )
    return out


def linear_quick_gelu(x, w, bias=None, config=None):
    """quick_gelu(x @ w^T + bias): x (..., K) may be strided, w (N, K) as nn.Linear's weight, bias (N,)
    or None; returns (..., N). `config` overrides the launch configuration (benchmarks)."""
    return _gemm_act(x, w, bias, "quick_gelu", config)


def linear_swiglu(x, w_gate_up, config=None):
    """silu(x @ w_gate^T) * (x @ w_up^T) for the packed weight [w_gate | w_up] (2I, K); returns (..., I)."""
    return _gemm_act(x, w_gate_up, None, "swiglu", config)


def linear_quick_gelu_ref(x, w, bias=None):
    """Plain torch, as `VisionMLP.forward` up to fc2: h = fc1(x); h * sigmoid(1.702 h)."""
    h = torch.nn.functional.linear(x, w, bias)
    return h * torch.sigmoid(1.702 * h)


def linear_swiglu_ref(x, w_gate_up):
    """Plain torch, as the reference decoder MLP up to down_proj: silu(gate_proj(x)) * up_proj(x)."""
    gate, up = torch.nn.functional.linear(x, w_gate_up).chunk(2, dim=-1)
    return torch.nn.functional.silu(gate) * up
