"""SwiGLU, the Qwen2 decoder MLP's activation (Shazeer 2020, "GLU Variants", eq. 6):

    out = silu(gate) * up,    silu(g) = g / (1 + exp(-g))

exactly as the reference `F.silu(gate_proj(x)) * up_proj(x)`: silu is evaluated in
fp32 and rounded to the input dtype (torch's silu rounds its output), then multiplied
by `up` and rounded again. Rounding in between costs nothing and keeps the fast path
bit-compatible with the reference in fp16/bf16 up to the last bit of exp.

`swiglu(gate, up)` takes two tensors; `swiglu_packed(gate_up)` takes the output of a
fused [gate | up] projection (..., 2I) and reads both halves through strided views,
so the fused GEMM's output needs no split copy.

`_swiglu_kernel`, grid (cdiv(M, BLOCK_M), cdiv(N, BLOCK_N)) over the flattened
(M, N) rows: a memory-bound elementwise op (read 2, write 1). On a GPU the knobs are
the tile (a few thousand elements) and num_warps; the real win is fusing it into the
down projection's prologue or the gate/up GEMM's epilogue.
"""

import torch
import triton
import triton.language as tl


@triton.jit
def _swiglu_kernel(
    gate_ptr, stride_gm, stride_gn,  # gate: (M, N)
    up_ptr, stride_um, stride_un,  # up: (M, N)
    out_ptr, stride_om, stride_on,  # out: (M, N), written
    M, N,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = (rows < M)[:, None] & (cols < N)[None, :]
    rows = rows.to(tl.int64)
    g = tl.load(gate_ptr + rows[:, None] * stride_gm + cols[None, :] * stride_gn, mask=mask, other=0.0)
    u = tl.load(up_ptr + rows[:, None] * stride_um + cols[None, :] * stride_un, mask=mask, other=0.0)
    g = g.to(tl.float32)
    act = (g / (1.0 + tl.exp(-g))).to(out_ptr.dtype.element_ty).to(tl.float32)  # silu, rounded as torch's
    out = act * u.to(tl.float32)
    out_ptrs = out_ptr + rows[:, None] * stride_om + cols[None, :] * stride_on
    tl.store(out_ptrs, out.to(out_ptr.dtype.element_ty), mask=mask)


def swiglu(gate, up):
    """silu(gate) * up for gate, up of one shape (any leading dims, may be strided); new tensor."""
    if gate.shape != up.shape or gate.dtype != up.dtype:
        raise ValueError(
            f"swiglu: gate and up must match, got {tuple(gate.shape)} {gate.dtype} and {tuple(up.shape)} {up.dtype}"
        )
    if gate.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise TypeError(f"swiglu: gate must be fp32, fp16 or bf16, got {gate.dtype}")
    if up.device != gate.device:
        raise ValueError(f"swiglu: up is on {up.device}, expected {gate.device} (gate's device)")
    out = torch.empty(gate.shape, dtype=gate.dtype, device=gate.device)
    if gate.numel() == 0:
        return out
    n = gate.shape[-1] if gate.dim() else 1
    m = gate.numel() // n
    g2, u2, o2 = gate.reshape(m, n), up.reshape(m, n), out.view(m, n)  # views when the leading dims collapse
    block_n = min(triton.next_power_of_2(n), 1024)
    block_m = max(1, min(64, 4096 // block_n))
    grid = (triton.cdiv(m, block_m), triton.cdiv(n, block_n))
    _swiglu_kernel[grid](
        g2, g2.stride(0), g2.stride(1),
        u2, u2.stride(0), u2.stride(1),
        o2, o2.stride(0), o2.stride(1),
        m, n,
        BLOCK_M=block_m, BLOCK_N=block_n, num_warps=4,
    )
    return out


def swiglu_packed(gate_up):
    """silu(gate) * up from a fused projection output gate_up (..., 2I) = [gate | up]; returns (..., I)."""
    if gate_up.dim() == 0 or gate_up.shape[-1] % 2:
        raise ValueError(f"swiglu_packed: gate_up must have an even last dim [gate | up], got {tuple(gate_up.shape)}")
    gate, up = gate_up.chunk(2, dim=-1)  # strided views, no copy
    return swiglu(gate, up)


def swiglu_ref(gate, up):
    """Plain torch, as the reference decoder MLP: F.silu(gate) * up in the input dtype."""
    return torch.nn.functional.silu(gate) * up


def swiglu_packed_ref(gate_up):
    gate, up = gate_up.chunk(2, dim=-1)
    return swiglu_ref(gate, up)
