"""Bias + QuickGELU vs its reference and the vision MLP's formula (kernels/quick_gelu.py)."""

import pytest
import torch
from moon3rt.kernels.quick_gelu import bias_quick_gelu, bias_quick_gelu_ref
from moon3rt.kernels.testing import assert_close, interpreter_or_cuda, kernel_dtypes

DEVICE = interpreter_or_cuda()
DTYPES = kernel_dtypes()

# leading dims x width: 1, primes, non-powers of two, wider than one column block
SHAPES = [(1, 1), (3, 24), (2, 3, 64), (1, 1023), (7, 37), (3, 2100), (33, 80)]


def _inputs(shape, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    x = 3.0 * torch.randn(shape, generator=g)
    bias = 0.5 * torch.randn(shape[-1], generator=g)
    return x.to(DEVICE, dtype), bias.to(DEVICE, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("with_bias", [True, False])
@pytest.mark.parametrize("shape", SHAPES)
def test_bias_quick_gelu(shape, with_bias, dtype):
    x, bias = _inputs(shape, dtype, seed=sum(shape))
    bias = bias if with_bias else None
    out = bias_quick_gelu(x, bias)
    assert out.shape == x.shape and out.dtype == dtype
    assert_close(out, bias_quick_gelu_ref(x, bias), name="out")


@pytest.mark.parametrize("dtype", DTYPES)
def test_matches_vision_mlp_fc1(dtype):
    # fc1 without its bias + this kernel == VisionMLP's `h = fc1(x); h * sigmoid(1.702 h)`
    g = torch.Generator().manual_seed(0)
    fc1 = torch.nn.Linear(24, 40).to(DEVICE, dtype)
    with torch.no_grad():
        fc1.weight.copy_(torch.randn(40, 24, generator=g) / 5)
        fc1.bias.copy_(torch.randn(40, generator=g))
        x = torch.randn(7, 24, generator=g).to(DEVICE, dtype)
        h = fc1(x)
        expected = h * torch.sigmoid(1.702 * h)
        out = bias_quick_gelu(x @ fc1.weight.T, fc1.bias)
    assert_close(out, expected, name="out vs VisionMLP")


@pytest.mark.parametrize("dtype", DTYPES)
def test_bias_quick_gelu_strided(dtype):
    x, bias = _inputs((9, 40), dtype, seed=3)
    x_view = torch.zeros(40, 9, device=DEVICE, dtype=dtype).T  # column-major
    x_view.copy_(x)
    b_view = torch.zeros(80, device=DEVICE, dtype=dtype)[::2]
    b_view.copy_(bias)
    assert not (x_view.is_contiguous() or b_view.is_contiguous())
    assert_close(bias_quick_gelu(x_view, b_view), bias_quick_gelu_ref(x, bias), name="out (strided)")


@pytest.mark.filterwarnings("ignore:overflow encountered in exp")  # the interpreter's exp(100) = inf: fine
def test_bias_quick_gelu_extremes():
    x = torch.tensor([[-100.0, -20.0, -1e-3, 0.0, 1e-3, 20.0, 100.0]], device=DEVICE)
    out = bias_quick_gelu(x)
    assert torch.isfinite(out).all()
    assert_close(out, bias_quick_gelu_ref(x), name="out (extremes)")


def test_bias_quick_gelu_empty_and_bad_shapes():
    assert bias_quick_gelu(torch.empty(0, 8, device=DEVICE), torch.zeros(8, device=DEVICE)).shape == (0, 8)
    with pytest.raises(ValueError, match="bias"):
        bias_quick_gelu(torch.randn(2, 8, device=DEVICE), torch.zeros(7, device=DEVICE))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="GPU-size case: needs CUDA")
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(16384, 5120), (1024, 5120)])
def test_bias_quick_gelu_gpu_size(shape, dtype):
    test_bias_quick_gelu(shape, True, dtype)
