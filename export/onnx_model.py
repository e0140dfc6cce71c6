"""`Moon3Model.forward` in a form that traces to one ONNX graph of standard ops.

The reference model walks the packed batch's segments in Python (`cu_seqlens.tolist()`),
which a trace would freeze to the example batch. Here every per-segment choice is a
mask built inside the graph from per-token ids, so one graph serves any batch:

- vision attention: patch i sees patch j when ``patch_image[i] == patch_image[j]``;
  decoder attention: token i sees token j when ``token_item[i] == token_item[j]`` and
  ``j <= i`` (both as -inf fills before the softmax; the diagonal is always allowed);
- RoPE angles are formed in the graph: decoder M-RoPE from the (3, T) t/h/w positions
  (`LanguageModel.rotary`, reused as is), vision 2-D RoPE from (P, 2) row/column
  positions that the host computes (`moon3rt.model.vision_positions`);
- image tokens are the rows where ``input_ids == image_token_id``; the k-th of them
  takes V[k] and FIRE's k-th delta, k coming from a CumSum (Gather + Where, no
  NonZero, so no data-dependent shapes);
- pooling gathers ``pool_index``; `mean` pooling averages with a (B, T) item
  membership matrix;
- MHMF: each modality is a token mask over the packed raw embeddings (after V is
  written in, image tokens hold V and title tokens their input embeddings, exactly
  the X_img / X_txt of the spec). A modality that an item lacks is filled with the
  most negative float before its attention softmax (a finite fill, so an all-masked
  row gives finite weights rather than NaN) and before the gate softmax, and its gate
  weight is then multiplied by 0, so an item with neither modality gets zero heads,
  as in the reference.

Graph inputs (dims: T packed tokens, B items, P vision patches; int64 unless noted):

| name         | shape            | meaning                                                    |
|--------------|------------------|------------------------------------------------------------|
| input_ids    | (T,)             | packed token ids                                           |
| position_ids | (3, T)           | M-RoPE t/h/w positions (three equal rows for 1-D ones)     |
| token_item   | (T,)             | item index 0..B-1 of every token                           |
| title_mask   | (T,) bool        | true for title tokens (MHMF's text modality)               |
| pool_index   | (B,)             | packed index of each item's pooling token (also fixes B)   |
| pixel_values | (P, C*2*14*14) f32 | all images' patches, merge windows grouped               |
| patch_image  | (P,)             | image index of every patch                                 |
| patch_pos    | (P, 2)           | row / column of every patch inside its image               |

A graph has only the inputs its model uses (the exporter drops the others): a model
without MHMF has no ``title_mask``. `export_inputs` returns them all; feed the graph's.

Output: ``embeddings`` (B, output_dim) float32, un-normalised, = `Moon3Model.forward`.

Text-only batches: `export_inputs` gives a batch without pixels one placeholder image
of a single merge window (spatial_merge_size^2 zero patches) that no token refers to,
so the graph never sees a zero-size dim; its cost is a few patches through the vision
tower. A graph without the vision inputs (``vision=False``) serves text-only batches
without that cost and without the vision weights.

There are no N_img / N_txt dims: the image and title tokens are found among the T
tokens, so the only dynamic dims are T, B and P.

Cost note: attention materialises (heads, T, T) and (heads, P, P) scores, as any
standard-ops formulation must; keep T and P to a few thousand per batch.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from ..config import Moon3Config
from ..model import Moon3Model, PackedBatch, rope_inv_freq, rotate_half, vision_positions

VISION_INPUTS = ("pixel_values", "patch_image", "patch_pos")
TEXT_INPUTS = ("input_ids", "position_ids", "token_item", "title_mask", "pool_index")
OUTPUT = "embeddings"


def _masked_softmax(scores: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
    """Softmax over the last dim where `allowed`; a row with nothing allowed stays finite."""
    return torch.softmax(scores.masked_fill(~allowed, torch.finfo(scores.dtype).min), dim=-1)


def _attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
    """Masked attention for (N, Hq, D) q and (N, Hk, D) k/v, GQA by grouping q heads.

    Query head h reads key head h // (Hq / Hk), as `repeat_interleave` does in the reference.
    """
    n_q, n_kv, d = q.shape[1], k.shape[1], q.shape[2]
    q = q.transpose(0, 1).reshape(n_kv, n_q // n_kv, -1, d)  # (Hk, G, N, D)
    k = k.transpose(0, 1).unsqueeze(1)  # (Hk, 1, N, D)
    v = v.transpose(0, 1).unsqueeze(1)
    scores = (q @ k.transpose(-1, -2)) * d**-0.5
    out = torch.softmax(scores.masked_fill(~allowed, float("-inf")), dim=-1) @ v  # (Hk, G, N, D)
    return out.reshape(n_q, -1, d).transpose(0, 1)  # (N, Hq, D)


class OnnxMoon3(nn.Module):
    """Wraps a `Moon3Model` (sharing its parameters) with a loop-free forward for export.

    ``forward(input_ids, position_ids, token_item, title_mask, pool_index
    [, pixel_values, patch_image, patch_pos])`` returns the (B, output_dim) fp32 vectors
    of `Moon3Model.forward` on the same batch (see the module docstring for the inputs).
    """

    def __init__(self, model: Moon3Model, vision: bool = True):
        super().__init__()
        self.model = model
        self.cfg = model.cfg
        self.vision = vision

    @property
    def input_names(self) -> tuple[str, ...]:
        return TEXT_INPUTS + (VISION_INPUTS if self.vision else ())

    # -------------------------------------------------------------------- vision
    def _vision_tower(self, pixel_values, patch_image, patch_pos):
        """(Z, V) of all images, attention restricted to each image."""
        tower, vc = self.model.visual, self.cfg.vision
        x = tower.patch_embed(pixel_values)
        # as `VisionTower.rotary`: head_dim/4 frequencies turn with the row, head_dim/4 with the column
        inv_freq = rope_inv_freq(vc.rope_theta, vc.head_dim // 2, patch_pos.device)
        freqs = (patch_pos[:, :, None].float() * inv_freq).flatten(1)  # (P, head_dim/2): rows then cols
        freqs = torch.cat([freqs, freqs], dim=-1)
        cos, sin = freqs.cos().unsqueeze(1), freqs.sin().unsqueeze(1)
        same_image = patch_image[:, None] == patch_image[None, :]
        for block in tower.blocks:
            attn, y = block.attn, block.norm1(x)
            q, k, v = attn.qkv(y).view(-1, 3, attn.num_heads, vc.head_dim).unbind(1)
            q = (q.float() * cos + rotate_half(q.float()) * sin).to(y.dtype)
            k = (k.float() * cos + rotate_half(k.float()) * sin).to(y.dtype)
            out = _attention(q, k, v, same_image)
            x = x + attn.proj(out.reshape(-1, vc.embed_dim))
            x = x + block.mlp(block.norm2(x))
        return tower.merger(x)

    # ------------------------------------------------------------------- forward
    def forward(self, input_ids, position_ids, token_item, title_mask, pool_index,
                pixel_values=None, patch_image=None, patch_pos=None):
        model, lm, cfg = self.model, self.model.language_model, self.cfg
        h = lm.embed_tokens(input_ids)
        is_image = input_ids == cfg.image_token_id
        r = None
        if self.vision:
            z, v = self._vision_tower(pixel_values, patch_image, patch_pos)
            # the k-th image token takes row k of V (and of FIRE's delta)
            image_row = (is_image.to(torch.int64).cumsum(0) - 1).clamp(min=0)
            h = torch.where(is_image[:, None], v.to(h.dtype)[image_row], h)
            if model.fire is not None:
                r = self._fire_prologue(z)
        raw = h  # X_img (image tokens) and X_txt (title tokens) for MHMF
        cos, sin = lm.rotary(position_ids, h.dtype)
        cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
        index = torch.ones_like(token_item).cumsum(0) - 1  # 0..T-1 (no Range/Trilu: plain ops)
        allowed = (token_item[:, None] == token_item[None, :]) & (index[None, :] <= index[:, None])
        fire_slots = {layer: slot for slot, layer in enumerate(model.fire.layers)} if model.fire is not None else {}
        for i, layer in enumerate(lm.layers):
            attn, y = layer.self_attn, layer.input_layernorm(h)
            q = attn.q_proj(y).view(-1, attn.num_heads, attn.head_dim)
            k = attn.k_proj(y).view(-1, attn.num_kv_heads, attn.head_dim)
            val = attn.v_proj(y).view(-1, attn.num_kv_heads, attn.head_dim)
            q = q * cos + rotate_half(q) * sin
            k = k * cos + rotate_half(k) * sin
            h = h + attn.o_proj(_attention(q, k, val, allowed).reshape(-1, attn.num_heads * attn.head_dim))
            h = h + layer.mlp(layer.post_attention_layernorm(h))
            if r is not None and i in fire_slots:
                h = self._fire_inject(h, r, is_image, image_row, fire_slots[i], i)
        h = lm.norm(h)

        items = torch.ones_like(pool_index).cumsum(0) - 1  # 0..B-1, B taken from pool_index
        member = items[:, None] == token_item[None, :]  # (B, T)
        if cfg.pooling == "mean":
            weights = member.float() / member.float().sum(-1, keepdim=True)
            e = (weights @ h.float()).to(h.dtype).float()
        else:
            e = h[pool_index].float()
        if model.fusion is not None:
            e = self._fusion(e, raw, member & is_image[None, :], member & title_mask[None, :])
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

    def _fusion(self, e, raw, image_mask, title_mask):
        """MHMF over the packed raw tokens; image_mask/title_mask (B, T) pick each item's X_img/X_txt."""
        fusion = self.model.fusion
        n_heads, d_f = fusion.num_heads, fusion.head_dim
        w = {name: p.float() for name, p in fusion.named_parameters()}
        x = raw.float()
        q = (e @ w["q_proj.weight"].t() + w["q_proj.bias"]).view(-1, n_heads, d_f).transpose(0, 1)  # (H, B, Df)
        k = (x @ w["k_proj.weight"].t() + w["k_proj.bias"]).view(-1, n_heads, d_f).transpose(0, 1)  # (H, T, Df)
        v = (x @ w["v_proj.weight"].t() + w["v_proj.bias"]).view(-1, n_heads, d_f).transpose(0, 1)
        scores = (q @ k.transpose(1, 2)) / d_f**0.5  # (H, B, T)
        outs = [(_masked_softmax(scores, m[None]) @ v).transpose(0, 1) for m in (image_mask, title_mask)]
        present = torch.stack([image_mask.float().sum(-1) > 0, title_mask.float().sum(-1) > 0], dim=-1)[:, None]
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


def export_inputs(batch: PackedBatch, cfg: Moon3Config, vision: bool = True) -> dict[str, np.ndarray]:
    """The graph inputs (see the module docstring) of a packed batch, as numpy arrays.

    vision=True (the full graph): a batch without pixels gets the placeholder image.
    vision=False (the text-only graph): a batch with pixels is an error.
    """
    lengths = np.diff(batch.cu_seqlens.cpu().numpy().astype(np.int64))
    input_ids = batch.input_ids.cpu().numpy().astype(np.int64)
    title_mask = np.zeros(input_ids.shape[0], dtype=bool)
    title_mask[batch.title_index.cpu().numpy()] = True
    out = {
        "input_ids": input_ids,
        "position_ids": batch.position_ids.cpu().numpy().astype(np.int64),
        "token_item": np.repeat(np.arange(len(lengths), dtype=np.int64), lengths),
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
        pixels = batch.pixel_values.detach().cpu().float().numpy()
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
    out["pixel_values"] = pixels
    out["patch_image"] = np.repeat(np.arange(len(grid), dtype=np.int64), n_patches)
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
