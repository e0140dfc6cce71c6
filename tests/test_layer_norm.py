"""LayerNorm (+ optional residual add) vs its reference and torch's layer_norm (kernels/layer_norm.py)."""

import pytest
import torch
import torch.nn.functional as F
from moon3rt.kernels import layer_norm as layer_norm_module
from moon3rt.kernels.layer_norm import layer_norm, layer_norm_ref
from moon3rt.kernels.testing import assert_close, interpreter_or_cuda, kernel_dtypes

DEVICE = interpreter_or_cuda()
DTYPES = kernel_dtypes()

# leading dims x width: 1, primes, non-powers of two, the vision tower's 1280
SHAPES = [(1, 1), (3, 24), (2, 3, 64), (1, 1023), (7, 37), (4, 1280), (33, 80)]


def _inputs(shape, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    x = 1.5 + 2.0 * torch.randn(shape, generator=g)  # a non-zero mean, so centring matters
    residual = torch.randn(shape, generator=g)
    weight = 1.0 + 0.2 * torch.randn(shape[-1], generator=g)
    bias = 0.1 * torch.randn(shape[-1], generator=g)
    return [t.to(DEVICE, dtype) for t in (x, residual, weight, bias)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_layer_norm(shape, dtype):
    x, _, weight, bias = _inputs(shape, dtype, seed=sum(shape))
    y = layer_norm(x, weight, bias, 1e-6)
    assert y.shape == x.shape and y.dtype == dtype
    assert_close(y, layer_norm_ref(x, weight, bias, 1e-6), name="y")
    assert_close(y, F.layer_norm(x, (shape[-1],), weight, bias, 1e-6), name="y vs F.layer_norm")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_layer_norm_residual(shape, dtype):
    x, residual, weight, bias = _inputs(shape, dtype, seed=sum(shape) + 1)
    y, h = layer_norm(x, weight, bias, 1e-6, residual=residual)
    y_ref, h_ref = layer_norm_ref(x, weight, bias, 1e-6, residual=residual)
    assert torch.equal(h, h_ref), "h = x + residual must round exactly as torch's add"
    assert_close(y, y_ref, name="y")


@pytest.mark.parametrize("dtype", DTYPES)
def test_layer_norm_matches_module_without_bias(dtype):
    x, _, weight, _ = _inputs((5, 9, 40), dtype, seed=3)
    module = torch.nn.LayerNorm(40, eps=1e-6, bias=False).to(DEVICE, dtype)
    with torch.no_grad():
        module.weight.copy_(weight)
        expected = module(x)
    assert_close(layer_norm(x, module.weight.detach(), None, 1e-6), expected, name="y (no bias)")


@pytest.mark.parametrize("dtype", DTYPES)
def test_layer_norm_strided(dtype):
    x, residual, weight, bias = _inputs((6, 40), dtype, seed=13)
    x_view = torch.zeros(6, 47, device=DEVICE, dtype=dtype)[:, 3:43]  # row stride 47
    x_view.copy_(x)
    r_view = residual.T.contiguous().T  # column-major
    b_view = torch.zeros(80, device=DEVICE, dtype=dtype)[1::2]
    b_view.copy_(bias)
    assert not (x_view.is_contiguous() or r_view.is_contiguous() or b_view.is_contiguous())
    y, h = layer_norm(x_view, weight, b_view, 1e-6, residual=r_view)
    y_ref, h_ref = layer_norm_ref(x, weight, bias, 1e-6, residual=residual)
    assert_close(h, h_ref, name="h (strided)")
    assert_close(y, y_ref, name="y (strided)")


@pytest.mark.parametrize("residual", [False, True])
def test_layer_norm_wide_rows_loop(monkeypatch, residual):
    # force the three-pass path on small widths: 1023 is not a multiple of the chunk
    monkeypatch.setattr(layer_norm_module, "_MAX_FUSED_WIDTH", 64)
    x, r, weight, bias = _inputs((3, 1023), torch.float32, seed=17)
    r = r if residual else None
    out = layer_norm(x, weight, bias, 1e-6, residual=r)
    ref = layer_norm_ref(x, weight, bias, 1e-6, residual=r)
    if residual:
        assert_close(out[1], ref[1], name="h (looped)")
        out, ref = out[0], ref[0]
    assert_close(out, ref, name="y (looped)")


def test_layer_norm_empty_and_bad_shapes():
    w = torch.ones(16, device=DEVICE)
    assert layer_norm(torch.empty(0, 16, device=DEVICE), w, None).shape == (0, 16)
    with pytest.raises(ValueError, match="bias"):
        layer_norm(torch.randn(2, 16, device=DEVICE), w, torch.zeros(15, device=DEVICE))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="GPU-size case: needs CUDA")
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(4096, 1280), (16384, 1280), (1024, 5120), (8, 16384)])
def test_layer_norm_gpu_size(shape, dtype):
    test_layer_norm(shape, dtype)
    test_layer_norm_residual(shape, dtype)
