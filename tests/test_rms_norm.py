"""Fused residual-add + RMSNorm vs its reference and moon3rt.model.RMSNorm (kernels/rms_norm.py)."""

import pytest
import torch
from moon3rt.kernels import rms_norm as rms_norm_module
from moon3rt.kernels.rms_norm import rms_norm, rms_norm_ref
from moon3rt.kernels.testing import assert_close, interpreter_or_cuda, kernel_dtypes

from moon3rt.model import RMSNorm

DEVICE = interpreter_or_cuda()
DTYPES = kernel_dtypes()

# leading dims x width: widths 1, primes, non-powers of two, the model's 64 / 1536 / 3584
SHAPES = [(1, 1), (3, 24), (2, 3, 64), (1, 1023), (7, 37), (5, 1536), (2, 3584), (33, 80)]


def _inputs(shape, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    x = 2.0 * torch.randn(shape, generator=g)
    residual = torch.randn(shape, generator=g)
    weight = 1.0 + 0.2 * torch.randn(shape[-1], generator=g)
    return x.to(DEVICE, dtype), residual.to(DEVICE, dtype), weight.to(DEVICE, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_rms_norm(shape, dtype):
    x, _, weight = _inputs(shape, dtype, seed=sum(shape))
    y = rms_norm(x, weight, 1e-6)
    assert y.shape == x.shape and y.dtype == dtype
    assert_close(y, rms_norm_ref(x, weight, 1e-6), name="y")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_rms_norm_residual(shape, dtype):
    x, residual, weight = _inputs(shape, dtype, seed=sum(shape) + 1)
    y, h = rms_norm(x, weight, 1e-5, residual=residual)
    y_ref, h_ref = rms_norm_ref(x, weight, 1e-5, residual=residual)
    assert h.dtype == dtype and y.dtype == dtype
    assert torch.equal(h, h_ref), "h = x + residual must round exactly as torch's add"
    assert_close(y, y_ref, name="y")


@pytest.mark.parametrize("dtype", DTYPES)
def test_rms_norm_matches_model_module(dtype):
    x, _, weight = _inputs((4, 9, 48), dtype, seed=5)
    module = RMSNorm(48, 1e-6).to(DEVICE, dtype)
    with torch.no_grad():
        module.weight.copy_(weight)
        expected = module(x)
    assert_close(rms_norm(x, module.weight.detach(), module.eps), expected, name="y vs model.RMSNorm")


def test_rms_norm_fp32_weight_promotes():
    # an fp32 weight on 16-bit activations gives an fp32 output, as `weight * xn.to(dtype)` does
    dtype = torch.bfloat16 if torch.cuda.is_available() else torch.float16
    x, _, weight = _inputs((3, 40), dtype, seed=9)
    y = rms_norm(x, weight.float(), 1e-6)
    assert y.dtype == torch.float32
    assert_close(y, rms_norm_ref(x, weight.float(), 1e-6), dtype=torch.float32, name="y")


@pytest.mark.parametrize("dtype", DTYPES)
def test_rms_norm_strided(dtype):
    x, residual, weight = _inputs((6, 40), dtype, seed=13)
    x_view = torch.zeros(6, 47, device=DEVICE, dtype=dtype)[:, 3:43]  # row stride 47
    x_view.copy_(x)
    r_view = residual.T.contiguous().T  # column-major
    w_view = torch.zeros(80, device=DEVICE, dtype=dtype)[::2]
    w_view.copy_(weight)
    assert not (x_view.is_contiguous() or r_view.is_contiguous() or w_view.is_contiguous())
    y, h = rms_norm(x_view, w_view, 1e-6, residual=r_view)
    y_ref, h_ref = rms_norm_ref(x, weight, 1e-6, residual=residual)
    assert_close(h, h_ref, name="h (strided)")
    assert_close(y, y_ref, name="y (strided)")


@pytest.mark.parametrize("residual", [False, True])
def test_rms_norm_wide_rows_loop(monkeypatch, residual):
    # force the two-pass path on small widths: 1023 is not a multiple of the chunk
    monkeypatch.setattr(rms_norm_module, "_MAX_FUSED_WIDTH", 64)
    x, r, weight = _inputs((3, 1023), torch.float32, seed=17)
    if residual:
        y, h = rms_norm(x, weight, 1e-6, residual=r)
        y_ref, h_ref = rms_norm_ref(x, weight, 1e-6, residual=r)
        assert_close(h, h_ref, name="h (looped)")
    else:
        y, y_ref = rms_norm(x, weight, 1e-6), rms_norm_ref(x, weight, 1e-6)
    assert_close(y, y_ref, name="y (looped)")


def test_rms_norm_empty_and_bad_shapes():
    w = torch.ones(16, device=DEVICE)
    assert rms_norm(torch.empty(0, 16, device=DEVICE), w, 1e-6).shape == (0, 16)
    with pytest.raises(ValueError, match="weight"):
        rms_norm(torch.randn(2, 16, device=DEVICE), torch.ones(15, device=DEVICE), 1e-6)
    with pytest.raises(ValueError, match="residual"):
        rms_norm(torch.randn(2, 16, device=DEVICE), w, 1e-6, residual=torch.randn(2, 15, device=DEVICE))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="GPU-size case: needs CUDA")
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(4096, 1536), (2048, 3584), (1024, 5120), (300, 1280), (8, 16384)])
def test_rms_norm_gpu_size(shape, dtype):
    test_rms_norm_residual(shape, dtype)
    test_rms_norm(shape, dtype)
