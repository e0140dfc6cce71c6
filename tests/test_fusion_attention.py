"""MHMF pooling kernel vs its reference, and the absorbed form vs DESIGN.md's formula."""

import pytest
import torch
from moon3rt.kernels.fusion_attention import fusion_attention, fusion_attention_ref
from moon3rt.kernels.testing import (
    assert_close,
    assert_within_baseline,
    interpreter_or_cuda,
    kernel_dtypes,
)

DEVICE = interpreter_or_cuda()
DTYPES = kernel_dtypes()

# (H, D, image lengths, text lengths), one entry per item
CASES = [
    (1, 24, [1], [1]),  # B = 1, one head, single-token segments
    (3, 40, [5, 0, 70, 0, 1], [2, 4, 0, 0, 13]),  # both, text-only, image-only (70 > BLOCK_N), none, 1 token
    (3, 72, [37], [0]),  # B = 1, image only, D > BLOCK_D
    (5, 7, [0, 3, 11], [2, 0, 1]),  # prime H and D
    (2, 40, [0, 0], [0, 0]),  # every segment empty: x_mix = 0
    (17, 24, [4, 9], [3, 0]),  # H > 16: heads padded to 32
]


def _cu(lengths):
    return torch.tensor([0] + lengths, dtype=torch.int64).cumsum(0)


def _inputs(heads, dim, img_lens, txt_lens, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    batch = len(img_lens)
    q = torch.randn(batch, heads, dim, generator=g) / dim**0.25  # scores of order 1..3
    x_img = torch.randn(sum(img_lens), dim, generator=g)
    x_txt = torch.randn(sum(txt_lens), dim, generator=g)
    gate_logits = torch.randn(batch, heads, 2, generator=g)
    q, x_img, x_txt, gate_logits = (t.to(DEVICE, dtype) for t in (q, x_img, x_txt, gate_logits))
    return q, x_img, _cu(img_lens).to(DEVICE), x_txt, _cu(txt_lens).to(DEVICE), gate_logits


def _check(out, args, dtype, name):
    """fp32: the tolerance table; fp16/bf16: at most 2x the error of plain torch in dtype."""
    if dtype == torch.float32:
        assert_close(out, fusion_attention_ref(*args), name=name)
        return
    q, x_img, cu_img, x_txt, cu_txt, gate_logits = args
    fp32 = fusion_attention_ref(q.float(), x_img.float(), cu_img, x_txt.float(), cu_txt, gate_logits.float())
    baseline = fusion_attention_ref(*args, upcast=False)
    assert_within_baseline(out, fp32, baseline, name=name)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("cu_dtype", [torch.int32, torch.int64])
@pytest.mark.parametrize("heads, dim, img_lens, txt_lens", CASES)
def test_fusion_attention(heads, dim, img_lens, txt_lens, cu_dtype, dtype):
    q, x_img, cu_img, x_txt, cu_txt, gate = _inputs(heads, dim, img_lens, txt_lens, dtype, seed=heads * dim)
    args = (q, x_img, cu_img.to(cu_dtype), x_txt, cu_txt.to(cu_dtype), gate)
    out = fusion_attention(*args)
    assert out.shape == q.shape and out.dtype == dtype
    _check(out, args, dtype, name="x_mix")
    for b, (n_img, n_txt) in enumerate(zip(img_lens, txt_lens)):
        if n_img == n_txt == 0:
            assert torch.equal(out[b], torch.zeros_like(out[b])), f"item {b} has no tokens: x_mix must be 0"


@pytest.mark.parametrize("dtype", DTYPES)
def test_fusion_attention_online_softmax_rescales(dtype):
    """Scores that grow along the segment move the running max in every BLOCK_N tile."""
    heads, dim, img_lens, txt_lens = 3, 24, [200, 5], [0, 150]
    q, x_img, cu_img, x_txt, cu_txt, gate = _inputs(heads, dim, img_lens, txt_lens, torch.float32, seed=9)
    q = q.abs()
    x_img = x_img.abs() * torch.linspace(0.2, 1.5, x_img.shape[0], device=DEVICE)[:, None]
    x_txt = x_txt.abs() * torch.linspace(0.2, 1.5, x_txt.shape[0], device=DEVICE)[:, None]
    args = (q.to(dtype), x_img.to(dtype), cu_img, x_txt.to(dtype), cu_txt, gate.to(dtype))
    _check(fusion_attention(*args), args, dtype, name="x_mix (rising scores)")


@pytest.mark.parametrize("dtype", DTYPES)
def test_fusion_attention_strided(dtype):
    heads, dim, img_lens, txt_lens = 3, 40, [6, 0, 3], [2, 5, 0]
    args = _inputs(heads, dim, img_lens, txt_lens, dtype, seed=5)
    q, x_img, cu_img, x_txt, cu_txt, gate_logits = args
    batch = len(img_lens)
    x_img_view = torch.zeros(x_img.shape[0], dim + 5, device=DEVICE, dtype=dtype)[:, 3:3 + dim]  # stride D + 5
    x_img_view.copy_(x_img)
    x_txt_view = x_txt.T.contiguous().T  # column-major: unit row stride
    q_view = q.transpose(0, 1).contiguous().transpose(0, 1)  # (B, H, D) view of (H, B, D)
    gate_view = gate_logits.transpose(1, 2).contiguous().transpose(1, 2)  # view of (B, 2, H)
    assert not any(t.is_contiguous() for t in (x_img_view, x_txt_view, q_view, gate_view))
    assert q_view.shape == (batch, heads, dim)
    out = fusion_attention(q_view, x_img_view, cu_img, x_txt_view, cu_txt, gate_view)
    _check(out, args, dtype, name="x_mix (strided inputs)")


def _mhmf_per_head(e, x_img, cu_img, x_txt, cu_txt, w):
    """DESIGN.md MHMF literally: per item, head and present modality, k/v with biases, no absorption."""
    heads, head_dim = w["q"].shape[:2]
    fused = []
    for b in range(e.shape[0]):
        head_outputs = []
        for h in range(heads):
            q_h = w["q"][h] @ e[b]
            pooled, logits = [], []
            for m, (x, cu) in enumerate(((x_img, cu_img), (x_txt, cu_txt))):
                start, end = int(cu[b]), int(cu[b + 1])
                if start == end:
                    continue
                k = x[start:end] @ w["k"][h].T + w["k_bias"][h]
                v = x[start:end] @ w["v"][h].T + w["v_bias"][h]
                a = torch.softmax(k @ q_h / head_dim**0.5, dim=0)
                pooled.append(a @ v)
                logits.append(w["gate"][h, m] @ e[b] + w["gate_bias"][h, m])
            o_h = torch.zeros(head_dim, device=e.device)
            if pooled:
                g = torch.softmax(torch.stack(logits), dim=0)
                o_h = sum(g[j] * pooled[j] for j in range(len(pooled)))
            head_outputs.append(o_h)
        fused.append(e[b] + w["o"] @ torch.cat(head_outputs))
    return torch.stack(fused)


def _mhmf_absorbed(e, x_img, cu_img, x_txt, cu_txt, w):
    """The same through the kernel: q~ = W_k^T q / sqrt(d_f), then o = W_v x_mix + b_v."""
    heads, head_dim = w["q"].shape[:2]
    q = torch.einsum("hfd,bd->bhf", w["q"], e)
    q_absorbed = torch.einsum("hfd,bhf->bhd", w["k"], q) / head_dim**0.5  # the K bias drops out
    gate_logits = torch.einsum("hmd,bd->bhm", w["gate"], e) + w["gate_bias"]
    x_mix = fusion_attention(q_absorbed, x_img, cu_img, x_txt, cu_txt, gate_logits)
    # softmax weights and present-modality gates each sum to 1, so b_v passes through
    # unchanged, except for an item with no tokens at all, whose heads output 0
    present = ((cu_img[1:] - cu_img[:-1]) + (cu_txt[1:] - cu_txt[:-1]) > 0).float()
    o = torch.einsum("hfd,bhd->bhf", w["v"], x_mix) + w["v_bias"] * present[:, None, None]
    return e + o.reshape(e.shape[0], heads * head_dim) @ w["o"].T


@pytest.mark.parametrize("heads, dim, head_dim, img_lens, txt_lens", [
    (3, 40, 8, [5, 0, 3, 0, 1], [2, 4, 0, 0, 1]),
    (1, 24, 16, [7], [3]),
    (2, 72, 12, [0, 66], [9, 0]),
])
def test_absorbed_form_matches_design_formula(heads, dim, head_dim, img_lens, txt_lens):
    g = torch.Generator().manual_seed(dim + heads)

    def rand(*shape, scale=1.0):
        return (scale * torch.randn(*shape, generator=g)).to(DEVICE)

    w = {
        "q": rand(heads, head_dim, dim, scale=dim**-0.5),
        "k": rand(heads, head_dim, dim, scale=dim**-0.5),
        "k_bias": rand(heads, head_dim, scale=3.0),  # large on purpose: it must not matter
        "v": rand(heads, head_dim, dim, scale=dim**-0.5),
        "v_bias": rand(heads, head_dim),
        "gate": rand(heads, 2, dim, scale=dim**-0.5),
        "gate_bias": rand(heads, 2),
        "o": rand(dim, heads * head_dim, scale=(heads * head_dim) ** -0.5),
    }
    e = rand(len(img_lens), dim, scale=2.0)
    x_img, x_txt = rand(sum(img_lens), dim), rand(sum(txt_lens), dim)
    cu_img, cu_txt = _cu(img_lens).to(DEVICE), _cu(txt_lens).to(DEVICE)
    expected = _mhmf_per_head(e, x_img, cu_img, x_txt, cu_txt, w)
    actual = _mhmf_absorbed(e, x_img, cu_img, x_txt, cu_txt, w)
    assert_close(actual, expected, name="f = e + W_o concat_h(o^h)")


@pytest.mark.parametrize("token_dtype", [torch.float16, torch.bfloat16])
def test_fusion_attention_fp32_out_from_16_bit_tokens(token_dtype):
    """16-bit tokens, fp32 queries: out_dtype=fp32 with exact dots equals the fp32 reference on those tokens."""
    q, x_img, cu_img, x_txt, cu_txt, gate = _inputs(3, 40, [5, 0, 7], [2, 3, 0], torch.float32, 3)
    x_img, x_txt = x_img.to(token_dtype), x_txt.to(token_dtype)
    out = fusion_attention(q, x_img, cu_img, x_txt, cu_txt, gate, out_dtype=torch.float32, precision="ieee")
    assert out.dtype == torch.float32
    ref = fusion_attention_ref(q, x_img.float(), cu_img, x_txt.float(), cu_txt, gate)
    assert_close(out, ref, dtype=torch.float32, name="x_mix")


def test_fusion_attention_bad_inputs_are_named():
    q, x_img, cu_img, x_txt, cu_txt, gate_logits = _inputs(2, 24, [2, 1], [1, 0], torch.float32, seed=1)
    with pytest.raises(ValueError, match="cu_txt"):
        fusion_attention(q, x_img, cu_img, x_txt, cu_txt[:-1], gate_logits)
    with pytest.raises(ValueError, match="x_img"):
        fusion_attention(q, x_img[:, :20], cu_img, x_txt, cu_txt, gate_logits)
    with pytest.raises(ValueError, match="gate_logits"):
        fusion_attention(q, x_img, cu_img, x_txt, cu_txt, gate_logits[..., :1])


def _gpu_case(heads, dim, batch, max_img, max_txt, seed):
    g = torch.Generator().manual_seed(seed)
    img_lens = torch.randint(0, max_img + 1, (batch,), generator=g)
    txt_lens = torch.randint(0, max_txt + 1, (batch,), generator=g)
    img_lens[::5] = 0  # text-only items
    txt_lens[1::7] = 0  # image-only items
    img_lens[2], txt_lens[2] = 0, 0  # one item with nothing
    return heads, dim, img_lens.tolist(), txt_lens.tolist()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="GPU-size case: needs CUDA")
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", [
    _gpu_case(16, 1536, 48, 400, 48, seed=0),  # Qwen2-VL-2B width
    _gpu_case(8, 3584, 8, 1200, 64, seed=1),  # Qwen2-VL-7B width, long image segments
    _gpu_case(12, 1536, 4, 256, 32, seed=2),
], ids=["2b-h16", "7b-h8", "2b-h12"])
def test_fusion_attention_gpu_size(case, dtype):
    heads, dim, img_lens, txt_lens = case
    args = _inputs(heads, dim, img_lens, txt_lens, dtype, seed=heads)
    args = (*args[:2], args[2].to(torch.int32), args[3], args[4].to(torch.int32), args[5])
    _check(fusion_attention(*args), args, dtype, name="x_mix (GPU size)")
