"""`Moon3Model.forward` in a form that traces to one ONNX graph of standard ops.

The reference model walks the packed batch's segments in Python (`cu_seqlens.tolist()`),
which a trace would freeze to the example batch. Here the host hands the graph slot
indices instead, so one graph serves any batch:

- everything but attention runs on the packed tokens (T) and patches (P);
- attention runs per segment in a padded layout: the decoder's B items as (B, L) slots,
  L the longest item's tokens; the vision tower's N images as (N, S) slots, S the
  longest image's patches. ``item_tokens`` / ``image_patches`` gather the packed rows
  into the slots, ``token_slot`` / ``patch_slot`` gather the results back. Work and
  memory grow with the sum over segments of L^2 (as in the reference), not with the
  square of the whole batch;
- the decoder's segments are causal: tokens sit at the front of their item's slots, so
  a real query (slot l < length) only sees slots <= l, all real, and the causal mask is
  the whole mask; the vision tower's segments are bidirectional with a key-padding mask
  from ``image_mask``. Both are additive biases (0 or -inf) before the softmax, and each
  slot's own key is always allowed, so no row is empty; padded query rows compute values
  that are never gathered back;
- the softmax scale multiplies Q before the first MatMul, and GQA's KV heads are
  expanded to the query heads as 4-D tensors (Unsqueeze, Expand, Reshape): the
  MatMul -> Add -> Softmax -> MatMul pattern that TensorRT fuses into one attention
  kernel. ``attention="onnx"`` writes each attention as one opset-23 ``Attention`` node
  instead (KV heads not expanded, the scale an attribute; export/export_onnx.py);
- RoPE angles are formed in the graph: decoder M-RoPE from the (3, T) t/h/w positions
  (`LanguageModel.rotary`, reused as is), vision 2-D RoPE from (P, 2) row/column
  positions that the host computes (`moon3rt.model.vision_positions`);
- image tokens are the rows where ``input_ids == image_token_id``; the k-th of them
  takes V[k] and FIRE's k-th delta, k coming from a CumSum (Gather + Where, no
  NonZero, so no data-dependent shapes);
- pooling gathers ``pool_index``; `mean` pooling averages each item's slots under
  ``item_mask``;
- MHMF runs on the item slots too: each modality is a slot mask (image tokens hold V
  after it is written in, title tokens their input embeddings: the X_img / X_txt of the
  spec). A modality that an item lacks is filled with the most negative float before its
  attention softmax (a finite fill, so an all-masked row gives finite weights rather
  than NaN) and before the gate softmax, and its gate weight is then multiplied by 0, so
  an item with neither modality gets zero heads, as in the reference.

Graph inputs (dims: T packed tokens, B items, L slots per item, P vision patches, N
images, S slots per image; int64 unless noted):

| name          | shape              | meaning                                                    |
|---------------|--------------------|------------------------------------------------------------|
| input_ids     | (T,)               | packed token ids                                           |
| position_ids  | (3, T)             | M-RoPE t/h/w positions (three equal rows for 1-D ones)     |
| token_slot    | (T,)               | slot b*L + l of every token (l-th token of item b)         |
| item_tokens   | (B, L)             | packed index of the token in each item slot (padding: 0)   |
| item_mask     | (B, L) bool        | true for the slots that hold a token                       |
| title_mask    | (T,) bool          | true for title tokens (MHMF's text modality)               |
| pool_index    | (B,)               | packed index of each item's pooling token                  |
| pixel_values  | (P, C*2*14*14) f32 | all images' patches, merge windows grouped                 |
| patch_slot    | (P,)               | slot n*S + s of every patch (s-th patch of image n)        |
| image_patches | (N, S)             | packed index of the patch in each image slot (padding: 0)  |
| image_mask    | (N, S) bool        | true for the slots that hold a patch                       |
| patch_pos     | (P, 2)             | row / column of every patch inside its image               |

A graph has only the inputs its model uses (the exporter drops the others): a model
without MHMF has no ``title_mask``, and one without MHMF or mean pooling no
``item_mask``. `export_inputs` returns them all; feed the graph's.

Output: ``embeddings`` (B, output_dim) float32, un-normalised, = `Moon3Model.forward`.

The graph takes the processor's normalised float32 patches; a batch of uint8 patches (as
`moon3rt.batching.pack` makes them) is expanded to them by `export_inputs`.

Text-only batches: `export_inputs` gives a batch without pixels one placeholder image
of a single merge window (spatial_merge_size^2 zero patches) that no token refers to,
so the graph never sees a zero-size dim; its cost is a few patches through the vision
tower. A graph without the vision inputs (``vision=False``) serves text-only batches
without that cost and without the vision weights.

Cost note: attention materialises (B, heads, L, L) and (N, heads, S, S) scores, so a
batch of items of very different lengths pays for padding; the onnxruntime backend
groups items of similar length (`moon3rt.batching.attention_buckets`).
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from ..config import Moon3Config
from ..images import expand_levels
from ..model import Moon3Model, PackedBatch, rope_inv_freq, rotate_half, vision_positions

VISION_INPUTS = ("pixel_values", "patch_slot", "image_patches", "image_mask", "patch_pos")
TEXT_INPUTS = ("input_ids", "position_ids", "token_slot", "item_tokens", "item_mask", "title_mask", "pool_index")
OUTPUT = "embeddings"
ATTENTION = ("ops", "onnx")  # standard ops (default) | one opset-23 Attention node per attention


def _masked_softmax(scores: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
    """Softmax over the last dim where `allowed`; a row with nothing allowed stays finite."""
    return torch.softmax(scores.masked_fill(~allowed, torch.finfo(scores.dtype).min), dim=-1)


def _attention_ops(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor,
                   scale: float) -> torch.Tensor:
    """softmax(scale q k^T + bias) v for (Bs, Hq, L, D) q and (Bs, Hk, L, D) k/v.

    Query head h reads key head h // (Hq / Hk), as `repeat_interleave` does in the reference:
    the KV heads are expanded in 4-D, and the scale multiplies q before the MatMul."""
    n_q, n_kv = q.shape[1], k.shape[1]
    if n_kv != n_q:
        k = k.unsqueeze(2).expand(-1, -1, n_q // n_kv, -1, -1).flatten(1, 2)
        v = v.unsqueeze(2).expand(-1, -1, n_q // n_kv, -1, -1).flatten(1, 2)
    scores = (q * scale) @ k.transpose(-1, -2)
    return torch.softmax(scores + bias, dim=-1) @ v


class _Attention23(torch.autograd.Function):
    """`_attention_ops` that traces to one ONNX ``Attention`` node (opset 23; GQA from the
    4-D shapes, the bias as a float ``attn_mask``, the scale an attribute).

    Not Attention-24's ``nonpad_kv_seqlen`` with ``is_causal``: onnxruntime 1.32 aligns
    that causal mask to the bottom right, which is wrong for right-padded segments."""

    @staticmethod
    def forward(ctx, q, k, v, bias, scale):
        return _attention_ops(q, k, v, bias, scale)

    @staticmethod
    def symbolic(g, q, k, v, bias, scale):
        out = g.op("Attention", q, k, v, bias, scale_f=scale)
        out.setType(q.type())
        return out


def _attention(q, k, v, bias, head_dim: int, op: str) -> torch.Tensor:
    """Attention over padded segments: q (Bs, L, Hq, D), k/v (Bs, L, Hk, D) -> (Bs, L, Hq, D)."""
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))
    scale = float(head_dim) ** -0.5
    out = _Attention23.apply(q, k, v, bias, scale) if op == "onnx" else _attention_ops(q, k, v, bias, scale)
    return out.transpose(1, 2)


def _to_slots(x: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
    """Packed rows (n, ...) into a padded (segments, L, ...) layout."""
    return x[slots]


def _to_packed(x: torch.Tensor, back: torch.Tensor) -> torch.Tensor:
    """A padded (segments, L, H, D) result back to packed (n, H*D) rows."""
    return x.reshape(-1, x.shape[2] * x.shape[3])[back]


def _slot_index(slots: torch.Tensor) -> torch.Tensor:
    """0..L-1 for a (segments, L) slot tensor (no Range: plain ops)."""
    return torch.ones_like(slots[0]).cumsum(0) - 1


class OnnxMoon3(nn.Module):
    """Wraps a `Moon3Model` (sharing its parameters) with a loop-free forward for export.

    ``forward(input_ids, position_ids, token_slot, item_tokens, item_mask, title_mask,
    pool_index[, pixel_values, patch_slot, image_patches, image_mask, patch_pos])`` returns
    the (B, output_dim) fp32 vectors of `Moon3Model.forward` on the same batch (see the
    module docstring for the inputs). attention: "ops" (standard ops) or "onnx" (one
    opset-23 ``Attention`` node per attention).
    """

    def __init__(self, model: Moon3Model, vision: bool = True, attention: str = "ops"):
        super().__init__()
        if attention not in ATTENTION:
            raise ValueError(f"attention must be one of {ATTENTION}, got {attention!r}")
        self.model = model
        self.cfg = model.cfg
        self.vision = vision
        self.attention = attention

    @property
    def input_names(self) -> tuple[str, ...]:
        return TEXT_INPUTS + (VISION_INPUTS if self.vision else ())

    # -------------------------------------------------------------------- vision
    def _vision_tower(self, pixel_values, patch_slot, image_patches, image_mask, patch_pos):
        """(Z, V) of all images, attention restricted to each image."""
        tower, vc = self.model.visual, self.cfg.vision
        x = tower.patch_embed(pixel_values)
        # as `VisionTower.rotary`: head_dim/4 frequencies turn with the row, head_dim/4 with the column
        inv_freq = rope_inv_freq(vc.rope_theta, vc.head_dim // 2, patch_pos.device)
        freqs = (patch_pos[:, :, None].float() * inv_freq).flatten(1)  # (P, head_dim/2): rows then cols
        freqs = torch.cat([freqs, freqs], dim=-1)
        cos, sin = freqs.cos().unsqueeze(1), freqs.sin().unsqueeze(1)
        # key padding: (N, 1, 1, S), 0 where a slot holds a patch
        bias = torch.zeros_like(image_mask, dtype=torch.float32).masked_fill(~image_mask, float("-inf"))[:, None, None]
        if self.attention == "onnx":  # onnxruntime wants the mask's query dim spelled out: (N, 1, S, S)
            bias = bias.expand(-1, -1, image_mask.shape[1], -1)
        for block in tower.blocks:
            attn, y = block.attn, block.norm1(x)
            q, k, v = attn.qkv(y).view(-1, 3, attn.num_heads, vc.head_dim).unbind(1)
            q = (q.float() * cos + rotate_half(q.float()) * sin).to(y.dtype)
            k = (k.float() * cos + rotate_half(k.float()) * sin).to(y.dtype)
            out = _attention(*(_to_slots(t, image_patches) for t in (q, k, v)), bias, vc.head_dim,
                             self.attention)
            x = x + attn.proj(_to_packed(out, patch_slot))
            x = x + block.mlp(block.norm2(x))
        return tower.merger(x)

    # ------------------------------------------------------------------- forward
    def forward(self, input_ids, position_ids, token_slot, item_tokens, item_mask, title_mask, pool_index,
                pixel_values=None, patch_slot=None, image_patches=None, image_mask=None, patch_pos=None):
        model, lm, cfg = self.model, self.model.language_model, self.cfg
        h = lm.embed_tokens(input_ids)
        is_image = input_ids == cfg.image_token_id
        r = image_row = None
        if self.vision:
            z, v = self._vision_tower(pixel_values, patch_slot, image_patches, image_mask, patch_pos)
            # the k-th image token takes row k of V (and of FIRE's delta)
            image_row = (is_image.to(torch.int64).cumsum(0) - 1).clamp(min=0)
            h = torch.where(is_image[:, None], v.to(h.dtype)[image_row], h)
            if model.fire is not None:
                r = self._fire_prologue(z)
        raw = h  # X_img (image tokens) and X_txt (title tokens) for MHMF
        cos, sin = lm.rotary(position_ids, h.dtype)
        index = _slot_index(item_tokens)  # tokens lead their item's slots: causal is the whole mask
        causal = torch.zeros_like(index[:, None] + index[None, :], dtype=h.dtype).masked_fill(
            index[None, :] > index[:, None], float("-inf"))  # (L, L)
        fire_slots = {layer: slot for slot, layer in enumerate(model.fire.layers)} if model.fire is not None else {}
        for i, layer in enumerate(lm.layers):
            attn, y = layer.self_attn, layer.input_layernorm(h)
            q, k, val = attn.rotated_qkv(y, cos, sin)
            out = _attention(*(_to_slots(t, item_tokens) for t in (q, k, val)), causal, attn.head_dim,
                             self.attention)
            h = h + attn.o_proj(_to_packed(out, token_slot))
            h = h + layer.mlp(layer.post_attention_layernorm(h))
            if r is not None and i in fire_slots:
                h = self._fire_inject(h, r, is_image, image_row, fire_slots[i], i)
        h = lm.norm(h)

        if cfg.pooling == "mean":
            weights = item_mask.float() / item_mask.float().sum(-1, keepdim=True)  # (B, L)
            e = (weights[:, None, :] @ h.float()[item_tokens])[:, 0].to(h.dtype).float()
        else:
            e = h[pool_index].float()
        if model.fusion is not None:
            e = self._fusion(e, raw, is_image, title_mask, item_tokens, item_mask)
        if model.projection is not None:
            e = e @ model.projection.weight.float().t()
        return e

    # FIRE and MHMF are methods so that the plugin graph (export/plugin_model.py) can
    # replace them with custom nodes; everything else is shared by both graphs
    def _fire_prologue(self, z):
        return self.model.fire.prologue(z)

    def _fire_inject(self, h, r, is_image, image_row, slot, layer):
        """H[img] += tanh(alpha_l) R U_l: the k-th image token (image_row) takes row k of the delta."""
        fire = self.model.fire
        delta = torch.tanh(fire.alpha[slot].float()) * (r.float() @ fire.up[slot].float())
        return torch.where(is_image[:, None], (h.float() + delta[image_row]).to(h.dtype), h)

    def _fusion(self, e, raw, is_image, title_mask, item_tokens, item_mask):
        """MHMF on the item slots: (T,) is_image/title_mask pick X_img/X_txt among each item's tokens."""
        fusion = self.model.fusion
        n_heads, d_f = fusion.num_heads, fusion.head_dim
        w = {name: p.float() for name, p in fusion.named_parameters()}
        x = raw.float()
        q = (e @ w["q_proj.weight"].t() + w["q_proj.bias"]).view(-1, n_heads, 1, d_f)  # (B, H, 1, Df)
        k = (x @ w["k_proj.weight"].t() + w["k_proj.bias"])[item_tokens]  # (B, L, H*Df)
        v = (x @ w["v_proj.weight"].t() + w["v_proj.bias"])[item_tokens]
        k = k.view(k.shape[0], k.shape[1], n_heads, d_f).transpose(1, 2)  # (B, H, L, Df)
        v = v.view(v.shape[0], v.shape[1], n_heads, d_f).transpose(1, 2)
        scores = (q @ k.transpose(-1, -2)) / d_f**0.5  # (B, H, 1, L)
        masks = [is_image[item_tokens] & item_mask, title_mask[item_tokens] & item_mask]  # (B, L) each
        outs = [(_masked_softmax(scores, m[:, None, None]) @ v)[:, :, 0] for m in masks]  # (B, H, Df)
        present = torch.stack([m.float().sum(-1) > 0 for m in masks], dim=-1)[:, None]  # (B, 1, 2)
        gate_logits = (e @ w["gate.weight"].t() + w["gate.bias"]).view(-1, n_heads, len(fusion.MODALITIES))
        gate = _masked_softmax(gate_logits, present) * present.float()  # (B, H, 2); absent modality: 0
        heads = gate[..., 0:1] * outs[0] + gate[..., 1:2] * outs[1]  # (B, H, Df)
        return e + heads.reshape(-1, n_heads * d_f) @ w["o_proj.weight"].t()


# ------------------------------------------------------------------------ host side
def placeholder_image(cfg: Moon3Config) -> tuple[np.ndarray, np.ndarray]:
    """Patches and grid (t, h, w) of the smallest image: one merge window of zero patches."""
    vc = cfg.vision
    m = vc.spatial_merge_size
    width = vc.in_channels * vc.temporal_patch_size * vc.patch_size**2
    return np.zeros((m * m, width), np.float32), np.array([[1, m, m]], np.int64)


def segment_slots(lengths: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(rows (n, L), mask (n, L), slot (total,)) of segments of `lengths` packed one after
    another: rows[s, l] is the packed index of segment s's l-th element (0 past its
    end), mask where a slot holds one, slot[i] = s * L + l of packed element i."""
    lengths = np.asarray(lengths, dtype=np.int64)
    width = max(1, int(lengths.max(initial=0)))
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64)
    offset = np.arange(width, dtype=np.int64)
    mask = offset[None, :] < lengths[:, None]
    rows = np.where(mask, starts[:, None] + offset[None, :], 0)
    segment = np.repeat(np.arange(len(lengths), dtype=np.int64), lengths)
    slot = segment * width + (np.arange(int(lengths.sum()), dtype=np.int64) - starts[segment])
    return rows, mask, slot


def export_inputs(batch: PackedBatch, cfg: Moon3Config, vision: bool = True) -> dict[str, np.ndarray]:
    """The graph inputs (see the module docstring) of a packed batch, as numpy arrays.

    vision=True (the full graph): a batch without pixels gets the placeholder image.
    vision=False (the text-only graph): a batch with pixels is an error.
    """
    lengths = np.diff(batch.cu_seqlens.cpu().numpy().astype(np.int64))
    input_ids = batch.input_ids.cpu().numpy().astype(np.int64)
    title_mask = np.zeros(input_ids.shape[0], dtype=bool)
    title_mask[batch.title_index.cpu().numpy()] = True
    item_tokens, item_mask, token_slot = segment_slots(lengths)
    out = {
        "input_ids": input_ids,
        "position_ids": batch.position_ids.cpu().numpy().astype(np.int64),
        "token_slot": token_slot,
        "item_tokens": item_tokens,
        "item_mask": item_mask,
        "title_mask": title_mask,
        "pool_index": batch.pool_index.cpu().numpy().astype(np.int64),
    }
    has_pixels = batch.pixel_values is not None and batch.pixel_values.shape[0] > 0
    n_image_tokens = int((input_ids == cfg.image_token_id).sum())
    if not vision:
        if has_pixels or n_image_tokens:
            raise ValueError(
                f"the text-only graph cannot take images: the batch has {n_image_tokens} <|image_pad|> tokens"
                f" and {0 if not has_pixels else batch.pixel_values.shape[0]} patches; use the full graph"
            )
        return out
    if has_pixels:
        pixels = batch.pixel_values.detach().cpu()
        if pixels.dtype == torch.uint8:  # the graph takes the processor's float patches
            if batch.pixel_norm is None:
                raise ValueError("uint8 pixel_values need their normalisation (PackedBatch.pixel_norm)")
            pixels = expand_levels(pixels.numpy(), *batch.pixel_norm, cfg.vision.temporal_patch_size)
        else:
            pixels = pixels.float().numpy()
        grid = batch.image_grid_thw.cpu().numpy().astype(np.int64)
    else:
        pixels, grid = placeholder_image(cfg)
    merge = cfg.vision.spatial_merge_size
    n_patches = grid.prod(axis=1)
    if pixels.shape[0] != n_patches.sum():
        raise ValueError(f"pixel_values has {pixels.shape[0]} patches but image_grid_thw adds up to {n_patches.sum()}")
    n_merged = int(n_patches.sum()) // merge**2 if has_pixels else 0
    if n_image_tokens != n_merged:
        raise ValueError(f"{n_image_tokens} <|image_pad|> tokens but {n_merged} merged image tokens")
    image_patches, image_mask, patch_slot = segment_slots(n_patches)
    out["pixel_values"] = pixels
    out["patch_slot"] = patch_slot
    out["image_patches"] = image_patches
    out["image_mask"] = image_mask
    out["patch_pos"] = vision_positions(torch.from_numpy(grid), merge).numpy().astype(np.int64)
    return out


def example_batch(cfg: Moon3Config, seed: int = 0) -> PackedBatch:
    """A small synthetic batch for tracing and smoke checks: an item with two images and a
    title, then a text-only item. Token ids avoid the special ids below 16."""
    gen = torch.Generator().manual_seed(seed)
    vc, m = cfg.vision, cfg.vision.spatial_merge_size
    grids = [(1, 2 * m, m), (1, m, 3 * m)]
    merged = [h * w // m**2 for _, h, w in grids]

    def text(n: int) -> torch.Tensor:
        return torch.randint(16, cfg.text.vocab_size, (n,), generator=gen)

    image = torch.full((sum(merged),), cfg.image_token_id)
    item0 = torch.cat([text(3), image, text(4)])
    item1 = text(6)
    for item in (item0, item1):  # pooling token, as the prompt ends
        item[-1] = cfg.moon3.embed_token_id if cfg.pooling == "emb_token" else 0
    lengths = [len(item0), len(item1)]
    width = vc.in_channels * vc.temporal_patch_size * vc.patch_size**2
    title0 = torch.arange(3 + sum(merged), lengths[0] - 1)
    title1 = lengths[0] + torch.arange(1, 4)
    return PackedBatch(
        input_ids=torch.cat([item0, item1]),
        position_ids=torch.cat([torch.arange(n) for n in lengths]).expand(3, -1).contiguous(),
        cu_seqlens=torch.tensor([0, lengths[0], sum(lengths)], dtype=torch.int32),
        pool_index=torch.tensor([lengths[0] - 1, sum(lengths) - 1]),
        title_index=torch.cat([title0, title1]),
        cu_titles=torch.tensor([0, len(title0), len(title0) + len(title1)], dtype=torch.int32),
        cu_images=torch.tensor([0, sum(merged), sum(merged)], dtype=torch.int32),
        pixel_values=torch.randn(sum(t * h * w for t, h, w in grids), width, generator=gen),
        image_grid_thw=torch.tensor(grids),
    )
