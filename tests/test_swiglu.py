"""SwiGLU vs its reference, the decoder MLP's activation (kernels/swiglu.py)."""

import pytest
import torch
from moon3rt.kernels.swiglu import swiglu, swiglu_packed, swiglu_packed_ref, swiglu_ref
from moon3rt.kernels.testing import assert_close, interpreter_or_cuda, kernel_dtypes

DEVICE = interpreter_or_cuda()
DTYPES = kernel_dtypes()

# leading dims x intermediate width: 1, primes, non-powers of two, wider than one column block
SHAPES = [(1, 1), (3, 24), (2, 3, 64), (1, 1023), (7, 37), (3, 2100), (33, 80)]


def _rand(shape, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    return (3.0 * torch.randn(shape, generator=g)).to(DEVICE, dtype)  # wide range: both silu tails


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_swiglu(shape, dtype):
    gate, up = _rand(shape, dtype, seed=sum(shape)), _rand(shape, dtype, seed=sum(shape) + 1)
    out = swiglu(gate, up)
    assert out.shape == gate.shape and out.dtype == dtype
    assert_close(out, swiglu_ref(gate, up), name="out")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 2), (5, 74), (2, 3, 160)])
def test_swiglu_packed(shape, dtype):
    gate_up = _rand(shape, dtype, seed=sum(shape))
    out = swiglu_packed(gate_up)
    assert out.shape == shape[:-1] + (shape[-1] // 2,)
    assert_close(out, swiglu_packed_ref(gate_up), name="out (packed)")


@pytest.mark.parametrize("dtype", DTYPES)
def test_swiglu_strided(dtype):
    gate = _rand((40, 9), dtype, seed=1).T  # (9, 40), column-major
    up = _rand((9, 50), dtype, seed=2)[:, 5:45]  # row stride 50
    assert not (gate.is_contiguous() or up.is_contiguous())
    assert_close(swiglu(gate, up), swiglu_ref(gate, up), name="out (strided)")


@pytest.mark.filterwarnings("ignore:overflow encountered in exp")  # the interpreter's exp(100) = inf: fine
def test_swiglu_extremes():
    gate = torch.tensor([[-100.0, -20.0, -1e-3, 0.0, 1e-3, 20.0, 100.0]], device=DEVICE)
    up = torch.full_like(gate, 2.0)
    out = swiglu(gate, up)
    assert torch.isfinite(out).all()
    assert_close(out, swiglu_ref(gate, up), name="out (extremes)")


def test_swiglu_empty_and_bad_shapes():
    assert swiglu(torch.empty(0, 8, device=DEVICE), torch.empty(0, 8, device=DEVICE)).shape == (0, 8)
    with pytest.raises(ValueError, match="gate and up"):
        swiglu(torch.randn(2, 8, device=DEVICE), torch.randn(2, 7, device=DEVICE))
    with pytest.raises(ValueError, match="even"):
        swiglu_packed(torch.randn(2, 7, device=DEVICE))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="GPU-size case: needs CUDA")
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(4096, 8960), (2048, 18944)])
def test_swiglu_gpu_size(shape, dtype):
    test_swiglu(shape, dtype)
    test_swiglu_packed((shape[0], 2 * shape[1]), dtype)
