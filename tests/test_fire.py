"""FIRE kernels vs their plain-torch references (kernels/fire.py)."""

import pytest
import torch
from moon3rt.kernels.fire import fire_inject_, fire_inject_ref, fire_prologue, fire_prologue_ref
from moon3rt.kernels.testing import assert_close, interpreter_or_cuda, kernel_dtypes

DEVICE = interpreter_or_cuda()
DTYPES = kernel_dtypes()

# (N, K, rank): K = 4 * d_v; 100 and 136 are not multiples of BLOCK_K = 64, N = 70 spans
# two BLOCK_M tiles, rank 80 spans two BLOCK_R tiles, rank 3 is below the 16 dot minimum
PROLOGUE_SHAPES = [(1, 16, 8), (7, 100, 8), (13, 72, 3), (70, 136, 16), (5, 40, 24), (9, 24, 80)]
# (T, N, rank, d): N of T hidden rows are image rows; d = 17 is prime
INJECT_SHAPES = [(5, 1, 8, 24), (50, 13, 16, 40), (90, 70, 3, 72), (31, 31, 80, 17)]


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.int32 if t.element_size() == 4 else torch.int16)


def _prologue_inputs(n, k, rank, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    z = 3.0 * torch.randn(n, k, generator=g)  # RMS ~3, so the normalisation matters
    norm_weight = 1.0 + 0.1 * torch.randn(k, generator=g)
    w_down = torch.randn(rank, k, generator=g) / k**0.5
    return [t.to(DEVICE, dtype) for t in (z, norm_weight, w_down)]


def _inject_inputs(t_rows, n, rank, d, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(t_rows, d, generator=g)
    rows = torch.randperm(t_rows, generator=g)[:n]  # shuffled, unique
    r = torch.randn(n, rank, generator=g)
    up = torch.randn(rank, d, generator=g) / rank**0.5
    return hidden.to(DEVICE, dtype), rows.to(DEVICE), r.to(DEVICE, dtype), up.to(DEVICE, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n, k, rank", PROLOGUE_SHAPES)
def test_fire_prologue(n, k, rank, dtype):
    z, norm_weight, w_down = _prologue_inputs(n, k, rank, dtype, seed=n * 1000 + k)
    out = fire_prologue(z, norm_weight, w_down, 1e-6)
    assert out.shape == (n, rank) and out.dtype == dtype
    assert_close(out, fire_prologue_ref(z, norm_weight, w_down, 1e-6), name="R")


@pytest.mark.parametrize("dtype", DTYPES)
def test_fire_prologue_small_activations(dtype):
    """mean(z^2) ~ eps: eps must sit inside the rsqrt exactly as in the reference."""
    z, norm_weight, w_down = _prologue_inputs(9, 40, 8, torch.float32, seed=2)
    z = (z * 3e-4).to(dtype)
    out = fire_prologue(z, norm_weight.to(dtype), w_down.to(dtype), 1e-6)
    assert_close(out, fire_prologue_ref(z, norm_weight.to(dtype), w_down.to(dtype), 1e-6), name="R")


@pytest.mark.parametrize("dtype", DTYPES)
def test_fire_prologue_strided(dtype):
    n, k, rank = 11, 100, 16
    z, norm_weight, w_down = _prologue_inputs(n, k, rank, dtype, seed=7)
    z_view = torch.zeros(n, k + 5, device=DEVICE, dtype=dtype)[:, 2:2 + k]  # row stride k + 5
    z_view.copy_(z)
    norm_view = torch.zeros(2 * k, device=DEVICE, dtype=dtype)[::2]  # stride 2
    norm_view.copy_(norm_weight)
    w_view = w_down.T.contiguous().T  # (rank, K) view of a (K, rank) buffer
    assert not (z_view.is_contiguous() or norm_view.is_contiguous() or w_view.is_contiguous())
    out = fire_prologue(z_view, norm_view, w_view, 1e-5)
    assert_close(out, fire_prologue_ref(z, norm_weight, w_down, 1e-5), name="R (strided inputs)")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("alpha", [0.7, -0.3, 1e-4])
@pytest.mark.parametrize("rows_dtype", [torch.int64, torch.int32])
@pytest.mark.parametrize("t_rows, n, rank, d", INJECT_SHAPES)
def test_fire_inject(t_rows, n, rank, d, rows_dtype, alpha, dtype):
    hidden, rows, r, up = _inject_inputs(t_rows, n, rank, d, dtype, seed=t_rows + n + d)
    rows = rows.to(rows_dtype)
    alpha = torch.tensor(alpha, device=DEVICE)
    expected = hidden.clone()
    fire_inject_ref(expected, rows, r, up, alpha)
    before = hidden.clone()
    fire_inject_(hidden, rows, r, up, alpha)
    assert_close(hidden, expected, name="hidden")
    untouched = torch.ones(t_rows, dtype=torch.bool, device=DEVICE)
    untouched[rows.long()] = False
    assert torch.equal(_bits(hidden[untouched]), _bits(before[untouched])), "non-image rows changed"


@pytest.mark.parametrize("dtype", DTYPES)
def test_fire_inject_alpha_zero_is_identity(dtype):
    hidden, rows, r, up = _inject_inputs(40, 23, 16, 40, dtype, seed=3)
    before = hidden.clone()
    fire_inject_(hidden, rows, r, up, torch.zeros((), device=DEVICE))
    assert torch.equal(_bits(hidden), _bits(before)), "alpha = 0 must leave hidden bit-identical"


@pytest.mark.parametrize("dtype", DTYPES)
def test_fire_inject_strided(dtype):
    t_rows, n, rank, d = 30, 12, 8, 40
    hidden, rows, r, up = _inject_inputs(t_rows, n, rank, d, dtype, seed=11)
    alpha = torch.tensor(0.5, device=DEVICE)
    buffer = torch.randn(t_rows, d + 5, device=DEVICE).to(dtype)
    view = buffer[:, 3:3 + d]  # in-place target with row stride d + 5
    view.copy_(hidden)
    r_view, up_view = r.T.contiguous().T, up.T.contiguous().T  # column-major views
    assert not (view.is_contiguous() or r_view.is_contiguous() or up_view.is_contiguous())
    expected = buffer.clone()
    fire_inject_ref(expected[:, 3:3 + d], rows, r, up, alpha)
    fire_inject_(view, rows.to(torch.int32), r_view, up_view, alpha)
    assert_close(buffer, expected, name="hidden (strided)")
    assert torch.equal(_bits(buffer[:, :3]), _bits(expected[:, :3])), "columns before the view changed"
    assert torch.equal(_bits(buffer[:, 3 + d:]), _bits(expected[:, 3 + d:])), "columns after the view changed"


def test_fire_empty_inputs():
    hidden = torch.randn(6, 24, device=DEVICE)
    before = hidden.clone()
    rows = torch.empty(0, dtype=torch.int64, device=DEVICE)
    fire_inject_(hidden, rows, torch.empty(0, 8, device=DEVICE), torch.randn(8, 24, device=DEVICE),
                 torch.tensor(0.3, device=DEVICE))
    assert torch.equal(hidden, before)
    out = fire_prologue(torch.empty(0, 24, device=DEVICE), torch.ones(24, device=DEVICE),
                        torch.randn(8, 24, device=DEVICE), 1e-6)
    assert out.shape == (0, 8)


def test_fire_bad_shapes_are_named():
    with pytest.raises(ValueError, match="w_down"):
        fire_prologue(torch.randn(3, 24, device=DEVICE), torch.ones(24, device=DEVICE),
                      torch.randn(8, 20, device=DEVICE), 1e-6)
    with pytest.raises(ValueError, match="up"):
        fire_inject_(torch.randn(6, 24, device=DEVICE), torch.arange(2, device=DEVICE),
                     torch.randn(2, 8, device=DEVICE), torch.randn(8, 23, device=DEVICE),
                     torch.tensor(0.1, device=DEVICE))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="GPU-size case: needs CUDA")
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n, k, rank", [(1024, 5120, 64), (300, 5120, 256), (4096, 5120, 16)])
def test_fire_prologue_gpu_size(n, k, rank, dtype):
    test_fire_prologue(n, k, rank, dtype)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="GPU-size case: needs CUDA")
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("t_rows, n, rank, d", [(1300, 1024, 64, 1536), (5000, 4096, 16, 3584)])
def test_fire_inject_gpu_size(t_rows, n, rank, d, dtype):
    test_fire_inject(t_rows, n, rank, d, torch.int64, 0.7, dtype)
