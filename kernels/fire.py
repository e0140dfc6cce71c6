"""FIRE: fine-grained residual enhancement (DESIGN.md, "FIRE").

Prologue, once per forward, on the merger's grouped, normalised input Z (N x K,
K = 4 * d_v):
    R = SiLU(RMSNorm_fire(Z) @ W_down^T)                       (N x rank)
    RMSNorm_fire(z) = z * rsqrt(mean(z^2) + eps) * norm_weight (fp32 statistics)
Injection, after decoder layer l, on the image rows of the hidden states:
    H[rows] = (H[rows].float() + tanh(alpha_l) * (R @ U_l)).to(H.dtype)

`_fire_prologue_kernel`, grid (cdiv(N, BLOCK_M), cdiv(rank, BLOCK_R)): one pass over
Z. The RMS scale is one scalar per row, so RMSNorm(z) @ W^T equals
rsqrt(mean(z^2) + eps) * ((z * norm_weight) @ W^T); the K loop accumulates the sum of
squares and the GEMM together and the row scale and SiLU are applied in the epilogue.
This equals the reference in exact arithmetic and differs only by fp32 rounding order.

`_fire_inject_kernel`, grid (cdiv(N, BLOCK_M), cdiv(d, BLOCK_D)): acc = R @ U for
one tile (rank is small, usually one BLOCK_R step), then the epilogue gathers the
tile's hidden rows, adds tanh(alpha) * acc in fp32 and scatters them back, cast once:
no N x d temporary. `rows` must be unique (each output row has one writer).
tanh(alpha) is taken on the device by torch (one tiny op, no host sync): triton has no
portable tanh, and the exp form (1 - e^-2a) / (1 + e^-2a) loses relative precision for
the small alphas FIRE starts from.

Precision: fp32 arithmetic; dots use input_precision "ieee" when an operand is fp32
and "tf32" when both are fp16/bf16 (16-bit values are exact in TF32; in the prologue
only the fp32 product z * norm_weight is rounded to 10 mantissa bits). Strided inputs
are read through their strides; `hidden` is updated in place through its strides.
"""

import torch
import triton
import triton.language as tl


@triton.jit
def _fire_prologue_kernel(
    z_ptr, stride_zn, stride_zk,  # Z: (N, K)
    norm_ptr, stride_norm,  # RMSNorm weight: (K,)
    w_ptr, stride_wr, stride_wk,  # W_down: (RANK, K), nn.Linear layout
    out_ptr, stride_on, stride_or,  # R: (N, RANK), written
    N, K, RANK, eps,
    BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_r = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_r = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    mask_m = offs_m < N
    mask_r = offs_r < RANK
    z_rows = z_ptr + offs_m[:, None].to(tl.int64) * stride_zn
    acc = tl.zeros([BLOCK_M, BLOCK_R], tl.float32)
    sum_sq = tl.zeros([BLOCK_M], tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask_k = offs_k < K
        z = tl.load(z_rows + offs_k[None, :] * stride_zk, mask=mask_m[:, None] & mask_k[None, :], other=0.0)
        z = z.to(tl.float32)
        gain = tl.load(norm_ptr + offs_k * stride_norm, mask=mask_k, other=0.0).to(tl.float32)
        # W_down tile loaded transposed, (BLOCK_K, BLOCK_R), ready for z @ W^T
        w_t = tl.load(
            w_ptr + offs_r[None, :] * stride_wr + offs_k[:, None] * stride_wk,
            mask=mask_r[None, :] & mask_k[:, None], other=0.0,
        ).to(tl.float32)
        sum_sq += tl.sum(z * z, axis=1)
        acc = tl.dot(z * gain[None, :], w_t, acc, input_precision=DOT_PRECISION)
    inv_rms = 1.0 / tl.sqrt(sum_sq / K + eps)
    pre = acc * inv_rms[:, None]
    r = pre * tl.sigmoid(pre)  # SiLU
    tl.store(
        out_ptr + offs_m[:, None].to(tl.int64) * stride_on + offs_r[None, :] * stride_or,
        r.to(out_ptr.dtype.element_ty),
        mask=mask_m[:, None] & mask_r[None, :],
    )


@triton.jit
def _fire_inject_kernel(
    hidden_ptr, stride_ht, stride_hd,  # H: (T, DIM), updated in place
    rows_ptr,  # image row indices into H: (N,), unique
    r_ptr, stride_rn, stride_rk,  # R: (N, RANK)
    up_ptr, stride_uk, stride_ud,  # U_l: (RANK, DIM)
    scale_ptr,  # tanh(alpha_l): (1,) fp32
    N, RANK, DIM,
    BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_d = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    mask_m = offs_m < N
    mask_d = offs_d < DIM
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for k0 in range(0, RANK, BLOCK_R):
        offs_k = k0 + tl.arange(0, BLOCK_R)
        mask_k = offs_k < RANK
        r = tl.load(
            r_ptr + offs_m[:, None].to(tl.int64) * stride_rn + offs_k[None, :] * stride_rk,
            mask=mask_m[:, None] & mask_k[None, :], other=0.0,
        ).to(tl.float32)
        up = tl.load(
            up_ptr + offs_k[:, None] * stride_uk + offs_d[None, :] * stride_ud,
            mask=mask_k[:, None] & mask_d[None, :], other=0.0,
        ).to(tl.float32)
        acc = tl.dot(r, up, acc, input_precision=DOT_PRECISION)
    scale = tl.load(scale_ptr)
    rows = tl.load(rows_ptr + offs_m, mask=mask_m, other=0).to(tl.int64)
    h_ptrs = hidden_ptr + rows[:, None] * stride_ht + offs_d[None, :] * stride_hd
    mask = mask_m[:, None] & mask_d[None, :]
    h = tl.load(h_ptrs, mask=mask, other=0.0).to(tl.float32)
    tl.store(h_ptrs, (h + scale * acc).to(hidden_ptr.dtype.element_ty), mask=mask)


def _dot_precision(*tensors) -> str:
    return "ieee" if any(t.dtype == torch.float32 for t in tensors) else "tf32"


def _check_float(op, name, t, device):
    if t.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise TypeError(f"{op}: {name} must be fp32, fp16 or bf16, got {t.dtype}")
    if t.device != device:
        raise ValueError(f"{op}: {name} is on {t.device}, expected {device}")


def fire_prologue(z, norm_weight, w_down, eps) -> torch.Tensor:
    """R = SiLU(RMSNorm_fire(z) @ w_down^T), fused; z (N, K), norm_weight (K,),
    w_down (rank, K). Returns (N, rank) in z's dtype."""
    if z.dim() != 2:
        raise ValueError(f"fire_prologue: z must have shape (N, K), got {tuple(z.shape)}")
    n, k = z.shape
    if norm_weight.shape != (k,):
        raise ValueError(f"fire_prologue: norm_weight must have shape ({k},), got {tuple(norm_weight.shape)}")
    if w_down.dim() != 2 or w_down.shape[1] != k:
        raise ValueError(f"fire_prologue: w_down must have shape (rank, {k}), got {tuple(w_down.shape)}")
    for name, t in (("z", z), ("norm_weight", norm_weight), ("w_down", w_down)):
        _check_float("fire_prologue", name, t, z.device)
    rank = w_down.shape[0]
    out = torch.empty((n, rank), dtype=z.dtype, device=z.device)
    if n == 0 or rank == 0:
        return out
    if k == 0:
        raise ValueError("fire_prologue: z has no features (K = 0)")

    # spill-free on sm_90 with 8 warps up to BLOCK_R = 64 (ptxas -v); rank > 64 takes
    # more programs along the rank, each re-reading its Z rows (from L2)
    block_m, block_k = 64, 32
    block_r = min(64, max(16, triton.next_power_of_2(rank)))
    grid = (triton.cdiv(n, block_m), triton.cdiv(rank, block_r))
    _fire_prologue_kernel[grid](
        z, z.stride(0), z.stride(1),
        norm_weight, norm_weight.stride(0),
        w_down, w_down.stride(0), w_down.stride(1),
        out, out.stride(0), out.stride(1),
        n, k, rank, float(eps),
        BLOCK_M=block_m, BLOCK_R=block_r, BLOCK_K=block_k,
        DOT_PRECISION=_dot_precision(z, w_down), num_warps=8,
    )
    return out


def fire_inject_(hidden, rows, r, up, alpha) -> None:
    """In place: hidden[rows] = (hidden[rows].float() + tanh(alpha) * (r @ up)).to(hidden.dtype).

    hidden (T, d); rows (N,) unique int32/int64 indices into hidden; r (N, rank);
    up (rank, d); alpha a one-element tensor holding the raw alpha_l.
    """
    if hidden.dim() != 2:
        raise ValueError(f"fire_inject_: hidden must have shape (T, d), got {tuple(hidden.shape)}")
    dim = hidden.shape[1]
    device = hidden.device
    if rows.dim() != 1 or rows.dtype not in (torch.int32, torch.int64) or rows.device != device:
        raise ValueError(
            f"fire_inject_: rows must be a 1-D int32/int64 tensor on {device}, got {tuple(rows.shape)} "
            f"{rows.dtype} on {rows.device}"
        )
    n = rows.shape[0]
    if r.dim() != 2 or r.shape[0] != n:
        raise ValueError(f"fire_inject_: r must have shape ({n}, rank), got {tuple(r.shape)}")
    rank = r.shape[1]
    if up.shape != (rank, dim):
        raise ValueError(f"fire_inject_: up must have shape ({rank}, {dim}), got {tuple(up.shape)}")
    if not isinstance(alpha, torch.Tensor) or alpha.numel() != 1:
        raise TypeError("fire_inject_: alpha must be a one-element tensor (the raw alpha_l)")
    for name, t in (("hidden", hidden), ("r", r), ("up", up), ("alpha", alpha)):
        _check_float("fire_inject_", name, t, device)
    if n == 0 or dim == 0:
        return

    scale = torch.tanh(alpha.detach().reshape(1).float())
    rows = rows.contiguous()
    block_m, block_d = 64, 64  # spill-free on sm_90 with 8 warps (ptxas -v)
    block_r = min(64, max(16, triton.next_power_of_2(rank)))
    grid = (triton.cdiv(n, block_m), triton.cdiv(dim, block_d))
    _fire_inject_kernel[grid](
        hidden, hidden.stride(0), hidden.stride(1),
        rows,
        r, r.stride(0), r.stride(1),
        up, up.stride(0), up.stride(1),
        scale,
        n, rank, dim,
        BLOCK_M=block_m, BLOCK_R=block_r, BLOCK_D=block_d,
        DOT_PRECISION=_dot_precision(r, up), num_warps=8,
    )


def fire_prologue_ref(z, norm_weight, w_down, eps) -> torch.Tensor:
    """Plain-torch R = SiLU(RMSNorm_fire(z) @ w_down^T) in fp32, cast to z's dtype."""
    zf = z.float()
    zn = zf * torch.rsqrt(zf.pow(2).mean(dim=-1, keepdim=True) + eps)
    zn = zn * norm_weight.float()
    return torch.nn.functional.silu(zn @ w_down.float().T).to(z.dtype)


def fire_inject_ref(hidden, rows, r, up, alpha) -> None:
    """Plain-torch, in place: hidden[rows] = (hidden[rows].float() + tanh(alpha) * (r @ up)).to(dtype)."""
    update = torch.tanh(alpha.float()) * (r.float() @ up.float())
    hidden[rows] = (hidden[rows].float() + update).to(hidden.dtype)
