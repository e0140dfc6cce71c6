"""GEMMs with the activation in the epilogue vs nn.Linear + the reference activation (kernels/fused_gemm.py)."""

import pytest
import torch
from moon3rt.kernels.fused_gemm import (
    linear_quick_gelu,
    linear_quick_gelu_ref,
    linear_swiglu,
    linear_swiglu_ref,
)
from moon3rt.kernels.testing import assert_close, interpreter_or_cuda, kernel_dtypes

DEVICE = interpreter_or_cuda()
DTYPES = kernel_dtypes()

# (M, K, N): a single row, primes, K not a multiple of the interpreter's 16-wide K steps,
# N not a multiple of the tile
SHAPES = [(1, 16, 16), (33, 48, 40), (7, 40, 24), (18, 32, 5)]


def _inputs(m, k, n_rows, dtype, seed, bias=True):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=g).to(DEVICE, dtype)
    w = (torch.randn(n_rows, k, generator=g) / k**0.5).to(DEVICE, dtype)
    b = torch.randn(n_rows, generator=g).to(DEVICE, dtype) if bias else None
    return x, w, b


def _tolerance(dtype):
    # the GEMM's summation order differs from torch's; 16-bit outputs round it once more
    return {} if dtype == torch.float32 else {"atol": 2e-2, "rtol": 2e-2}


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("m, k, n", SHAPES)
def test_linear_quick_gelu(m, k, n, bias, dtype):
    x, w, b = _inputs(m, k, n, dtype, seed=m + k + n, bias=bias)
    out = linear_quick_gelu(x, w, b)
    assert out.shape == (m, n) and out.dtype == dtype
    assert_close(out, linear_quick_gelu_ref(x, w, b), name="quick_gelu(x w^T + b)", **_tolerance(dtype))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("m, k, n", SHAPES)
def test_linear_swiglu(m, k, n, dtype):
    x, w, _ = _inputs(m, k, 2 * n, dtype, seed=m * k + n, bias=False)
    out = linear_swiglu(x, w)
    assert out.shape == (m, n) and out.dtype == dtype
    assert_close(out, linear_swiglu_ref(x, w), name="silu(x w_g^T) * (x w_u^T)", **_tolerance(dtype))


def test_strided_input_and_leading_dims():
    # a non-contiguous x (every other column of a wider tensor) and a 3-D batch of rows
    g = torch.Generator().manual_seed(3)
    wide = torch.randn(2, 9, 64, generator=g).to(DEVICE)
    x = wide[..., ::2]
    w = (torch.randn(48, 32, generator=g) / 32**0.5).to(DEVICE)
    assert_close(linear_swiglu(x, w), linear_swiglu_ref(x, w), name="swiglu (strided x)")
    assert_close(linear_quick_gelu(x, w), linear_quick_gelu_ref(x, w), name="quick_gelu (strided x)")


def test_empty_rows_and_bad_inputs():
    x, w, b = _inputs(0, 16, 32, torch.float32, seed=0)
    assert linear_quick_gelu(x, w, b).shape == (0, 32)
    assert linear_swiglu(x, w).shape == (0, 16)
    x, w, b = _inputs(3, 16, 32, torch.float32, seed=0)
    with pytest.raises(ValueError, match="to match x's last dim"):
        linear_quick_gelu(x, w[:, :8])
    with pytest.raises(ValueError, match="even number of rows"):
        linear_swiglu(x, w[:31])
    with pytest.raises(ValueError, match="bias must be"):
        linear_quick_gelu(x, w, b[:4])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="GPU-size case: needs CUDA")
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("m", [1, 1000, 4096])
def test_fused_gemm_gpu_size(m, dtype):
    # moon3-2b: vision fc1 1280 -> 5120 (+ bias), decoder gate_up 1536 -> 2 x 8960
    x, w, b = _inputs(m, 1280, 5120, dtype, seed=m)
    assert_close(linear_quick_gelu(x, w, b), linear_quick_gelu_ref(x, w, b), name="fc1 + quick_gelu",
                 **_tolerance(dtype))
    x, w, _ = _inputs(m, 1536, 2 * 8960, dtype, seed=m + 1, bias=False)
    assert_close(linear_swiglu(x, w), linear_swiglu_ref(x, w), name="gate_up + swiglu", **_tolerance(dtype))
