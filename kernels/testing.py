"""Shared accuracy policy for kernel tests: one tolerance table, one `assert_close`.

Every kernel test compares against its plain-torch reference through `assert_close`,
so a tolerance is changed here, once, for all ops. Attention-like ops (softmax over a
long axis) use `assert_within_baseline` instead for 16-bit dtypes: the kernel's error
against an fp32 reference may be at most `factor` times the error of plain torch run
in the same dtype.

Only torch is imported here (never triton), so a test module can import this before
deciding whether Triton runs in the interpreter.
"""

import os

import torch

# dtype -> (atol, rtol). fp16/bf16 allow about two units in the last place of an O(1)
# value, since kernel and reference round a slightly different fp32 sum once each.
TOLERANCES = {
    torch.float32: (1e-5, 1e-5),
    torch.float16: (1e-3, 2e-3),
    torch.bfloat16: (1e-2, 1.6e-2),
}


def kernel_dtypes() -> list:
    """dtypes to test kernels in: fp32 everywhere, bf16 and fp16 only on a GPU."""
    if torch.cuda.is_available():
        return [torch.float32, torch.bfloat16, torch.float16]
    return [torch.float32]


def interpreter_or_cuda() -> str:
    """Device to test Triton kernels on: "cuda", or "cpu" under TRITON_INTERPRET=1."""
    if torch.cuda.is_available():
        return "cuda"
    if os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "on", "yes"):
        return "cpu"
    raise RuntimeError(
        "no CUDA device and TRITON_INTERPRET is not set: set TRITON_INTERPRET=1 before "
        "triton is first imported to run the kernels on the CPU"
    )


def _max_errors(actual: torch.Tensor, expected: torch.Tensor):
    diff = (actual - expected).abs()
    rel = diff / expected.abs().clamp_min(torch.finfo(torch.float32).tiny)
    return diff.max().item(), rel.max().item()


def assert_close(actual, expected, dtype=None, name="output", atol=None, rtol=None):
    """Assert `actual` matches `expected` within the table's tolerance for `dtype`.

    Both are compared in fp32. `dtype` defaults to `actual.dtype`; `atol`/`rtol`
    override the table for one check. A failure names the first mismatching index,
    the two values there, how many elements mismatch and the max abs/rel errors.
    """
    dtype = actual.dtype if dtype is None else dtype
    table_atol, table_rtol = TOLERANCES[dtype]
    atol = table_atol if atol is None else atol
    rtol = table_rtol if rtol is None else rtol
    if actual.shape != expected.shape:
        raise AssertionError(f"{name}: shape {tuple(actual.shape)}, expected {tuple(expected.shape)}")
    a = actual.detach().float().cpu()
    e = expected.detach().float().cpu()
    ok = torch.isclose(a, e, rtol=rtol, atol=atol, equal_nan=True)
    if bool(ok.all()):
        return
    bad = (~ok).nonzero()
    first = tuple(bad[0].tolist())
    max_abs, max_rel = _max_errors(a, e)
    raise AssertionError(
        f"{name} ({dtype}, atol={atol:g}, rtol={rtol:g}): {bad.shape[0]} of {a.numel()} elements "
        f"mismatch; first at index {first}: actual {a[first].item():.7g}, expected "
        f"{e[first].item():.7g}; max abs error {max_abs:.3g}, max rel error {max_rel:.3g}"
    )


def assert_within_baseline(actual, reference, baseline, factor=2.0, atol=1e-5, name="output"):
    """Assert max|actual - reference| <= factor * max|baseline - reference| + atol.

    `reference` is the fp32 result, `baseline` plain torch in the kernel's dtype: a
    kernel may be as inaccurate as torch itself, within `factor`, but no worse.
    """
    ref = reference.detach().float().cpu()
    err = (actual.detach().float().cpu() - ref).abs().max().item()
    base = (baseline.detach().float().cpu() - ref).abs().max().item()
    if not err <= factor * base + atol:
        raise AssertionError(
            f"{name} ({actual.dtype}): max abs error {err:.3g} vs fp32 reference exceeds "
            f"{factor:g} x plain-torch error {base:.3g} + {atol:g}"
        )
