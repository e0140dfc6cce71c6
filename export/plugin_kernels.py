"""The plugin graph's kernels in TensorRT's ahead-of-time calling convention.

A TensorRT AOT plugin (``tensorrt.plugin.aot_impl``) launches one kernel with the
arguments (input pointers..., extra int32 scalars..., output pointers...). Each adapter
here takes exactly that list for one `PluginSpec` (export/plugins.py) and calls the
moon3rt kernel (kernels/fire.py, kernels/fusion_attention.py) inline with the strides of
contiguous tensors, so the compiled kernel is the moon3rt kernel itself. Float
parameters that TensorRT cannot pass (FIRE's eps) become constexprs, fixed per node.

`plugin_launch` gives the constexprs, warps and grid of an adapter from its input
shapes; the grid is plain arithmetic, so it works on ints and on TensorRT's symbolic
dims alike. The block sizes are those of the kernels' own launchers.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass

import triton
import triton.language as tl

from ..kernels.fire import _fire_inject_kernel, _fire_prologue_kernel
from ..kernels.fusion_attention import _fusion_pool_kernel, _fusion_scores_kernel
from .plugins import PLUGINS, output_shapes


@triton.jit
def fire_prologue_plugin(
    z_ptr, norm_weight_ptr, w_down_ptr,  # inputs: Z (N, K), RMSNorm weight (K,), W_down (RANK, K)
    N, K, RANK,  # extra args
    r_ptr,  # output: R (N, RANK)
    EPS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    _fire_prologue_kernel(
        z_ptr, K, 1, norm_weight_ptr, 1, w_down_ptr, K, 1, r_ptr, RANK, 1, N, K, RANK, EPS,
        BLOCK_M, BLOCK_R, BLOCK_K, DOT_PRECISION,
    )


@triton.jit
def fire_inject_plugin(
    hidden_ptr, rows_ptr, r_ptr, up_ptr, scale_ptr,  # inputs: H (T, DIM), rows (N,) i32, R (N, RANK), U (RANK, DIM), tanh(alpha) (1,)
    N, RANK, DIM,  # extra args
    hidden_out_ptr,  # output: H after injection (T, DIM); TensorRT aliases it to hidden_ptr: updated in place
    BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    _fire_inject_kernel(
        hidden_out_ptr, DIM, 1, rows_ptr, r_ptr, RANK, 1, up_ptr, DIM, 1, scale_ptr, N, RANK, DIM,
        BLOCK_M, BLOCK_R, BLOCK_D, DOT_PRECISION,
    )


@triton.jit
def fusion_scores_plugin(
    q_ptr, x_img_ptr, cu_img_ptr, x_txt_ptr, cu_txt_ptr,  # inputs: q~ (B, H, D), tokens (N_m, D), offsets (B + 1,) i32
    H, D, N_img, N_txt,  # extra args
    s_img_ptr, s_txt_ptr, row_max_ptr, row_sum_ptr,  # outputs: scores (H, N_m), softmax statistics (B, 2, H)
    H_PAD: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    _fusion_scores_kernel(
        q_ptr, H * D, D, 1, x_img_ptr, D, 1, cu_img_ptr, s_img_ptr, x_txt_ptr, D, 1, cu_txt_ptr, s_txt_ptr,
        row_max_ptr, row_sum_ptr, H, D, N_img, N_txt, H_PAD, BLOCK_N, BLOCK_D, DOT_PRECISION,
    )


@triton.jit
def fusion_pool_plugin(
    x_img_ptr, cu_img_ptr, s_img_ptr, x_txt_ptr, cu_txt_ptr, s_txt_ptr,  # inputs: as FusionScores' plus its outputs
    row_max_ptr, row_sum_ptr, gate_logits_ptr,  # softmax statistics (B, 2, H), gate logits (B, H, 2)
    H, D, N_img, N_txt,  # extra args
    x_mix_ptr,  # output: x_mix (B, H, D)
    H_PAD: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    _fusion_pool_kernel(
        x_img_ptr, D, 1, cu_img_ptr, s_img_ptr, x_txt_ptr, D, 1, cu_txt_ptr, s_txt_ptr, row_max_ptr, row_sum_ptr,
        gate_logits_ptr, 2 * H, 2, 1, x_mix_ptr, H * D, D, H, D, N_img, N_txt,
        H_PAD, BLOCK_N, BLOCK_D, DOT_PRECISION,
    )


ADAPTERS = {
    "fire_prologue_plugin": fire_prologue_plugin,
    "fire_inject_plugin": fire_inject_plugin,
    "fusion_scores_plugin": fusion_scores_plugin,
    "fusion_pool_plugin": fusion_pool_plugin,
}
POINTER_TYPES = {"float32": "*fp32", "int32": "*i32"}


@dataclass(frozen=True)
class PluginLaunch:
    """How one plugin node launches its kernel: adapter name, Triton signature (its
    non-constexpr parameters, in order), constexprs, warps and grid (x, y, z)."""

    kernel: str
    signature: dict
    constexprs: dict
    num_warps: int
    grid: tuple


def runtime_parameters(fn) -> list[str]:
    """The non-constexpr parameters of a @triton.jit function (compiled or interpreted), in order."""
    params = inspect.signature(fn.fn).parameters.values()
    return [p.name for p in params if "constexpr" not in str(p.annotation)]


def cdiv(a, b: int):
    """ceil(a / b) for an int or a symbolic dim (only +, // and ints are used)."""
    return (a + (b - 1)) // b


def _static(size, what: str) -> int:
    """A size that fixes a constexpr: an int, or a TensorRT dim that is a build-time constant."""
    if isinstance(size, int):
        return size
    if hasattr(size, "is_constant") and size.is_constant:
        return int(size.constant_value())
    raise ValueError(f"{what} must be fixed when the engine is built, got a dynamic size")


def _block(size: int, cap: int) -> int:
    return min(cap, max(16, triton.next_power_of_2(size)))


def plugin_launch(op_type: str, shapes: list, attrs: dict) -> PluginLaunch:
    """The launch of `op_type`'s adapter for input `shapes` (ints or symbolic dims) and node
    attributes. Plugin tensors are fp32 (the graph is; see export/precision.py)."""
    spec = PLUGINS[op_type]
    fn = ADAPTERS[spec.kernel]
    signature = {f"{t.name}_ptr": POINTER_TYPES[t.dtype] for t in spec.inputs}
    signature.update({name: "i32" for name, _, _ in spec.extra_args})
    signature.update({f"{t.name}_ptr": POINTER_TYPES[t.dtype] for t in spec.outputs})
    if op_type == "FirePrologue":
        n, rank = shapes[0][0], _static(shapes[2][0], "FIRE rank")
        constexprs = {"EPS": float(attrs["eps"]), "BLOCK_M": 64, "BLOCK_R": _block(rank, 64), "BLOCK_K": 32}
        grid = (cdiv(n, 64), cdiv(rank, constexprs["BLOCK_R"]), 1)
    elif op_type == "FireInject":
        n, rank, dim = shapes[1][0], _static(shapes[2][1], "FIRE rank"), _static(shapes[0][1], "hidden size")
        constexprs = {"BLOCK_M": 64, "BLOCK_R": _block(rank, 64), "BLOCK_D": 64}
        grid = (cdiv(n, 64), cdiv(dim, 64), 1)
    elif op_type in ("FusionScores", "FusionPool"):
        gate_or_q = shapes[0] if op_type == "FusionScores" else shapes[8]
        batch, heads = gate_or_q[0], _static(gate_or_q[1], "MHMF heads")
        dim = _static(shapes[0][2] if op_type == "FusionScores" else shapes[0][1], "hidden size")
        if heads != attrs["num_heads"]:
            raise ValueError(f"{op_type}: num_heads={attrs['num_heads']} but its inputs have {heads} heads")
        block_d = _block(dim, 32 if op_type == "FusionScores" else 64)
        constexprs = {"H_PAD": max(16, triton.next_power_of_2(heads)), "BLOCK_N": 64, "BLOCK_D": block_d}
        grid = (batch, 2, 1) if op_type == "FusionScores" else (cdiv(dim, block_d), batch, 1)
    else:
        raise KeyError(op_type)
    constexprs["DOT_PRECISION"] = "ieee"  # fp32 operands, as the kernels' launchers choose
    expected = runtime_parameters(fn)
    if list(signature) != expected:  # the spec and the adapter must list the same parameters
        raise AssertionError(f"{spec.kernel} takes {expected}, the {op_type} spec gives {list(signature)}")
    return PluginLaunch(spec.kernel, signature, constexprs, 8, grid)


def run_plugin(op_type: str, inputs: list, attrs: dict):
    """Launch `op_type`'s adapter on torch tensors (CUDA, or CPU under TRITON_INTERPRET=1),
    as TensorRT would: contiguous tensors, outputs allocated here (FireInject updates
    inputs[0] in place and returns it). Returns the outputs as a tuple."""
    import torch

    spec = PLUGINS[op_type]
    inputs = [x.contiguous() for x in inputs]
    launch = plugin_launch(op_type, [tuple(x.shape) for x in inputs], attrs)
    sizes = {name: inputs[i].shape[d] for name, i, d in spec.extra_args}
    if spec.aliases:
        outputs = [inputs[spec.aliases[0]]]
    else:
        shapes = output_shapes(op_type, [tuple(x.shape) for x in inputs])
        dtypes = [getattr(torch, t.dtype) for t in spec.outputs]
        outputs = [torch.empty(s, dtype=dt, device=inputs[0].device) for s, dt in zip(shapes, dtypes)]
    ADAPTERS[launch.kernel][launch.grid](*inputs, *sizes.values(), *outputs, **launch.constexprs,
                                         num_warps=launch.num_warps)
    return tuple(outputs)

