"""FLOPs of one item, counted from the model config: what "% of roofline" is measured against.

Every GEMM costs 2*M*N*K (a multiply and an add per term). Attention costs its two
matrix products, Q K^T and A V: 2 * d_qk per query-key pair each. Elementwise work
(norms, RoPE, softmax, activations, residual adds, bias) and embedding lookups are
not counted: they are memory-bound and well under 1% of the total. Symbols:

Vision tower, per image of N patches (d_v = embed_dim, m_v = mlp_dim, depth D_v,
P = in_channels * temporal_patch_size * patch_size^2 values per patch):
    patch embed      2 N P d_v
    per block        2 N d_v (3 d_v)  qkv     + 2 N d_v d_v  proj
                   + 2 N d_v m_v      fc1     + 2 N m_v d_v  fc2
                   + 4 N^2 d_v        bidirectional attention within the image
Merger, N_m = N / spatial_merge^2 tokens of width w = spatial_merge^2 d_v:
                     2 N_m w w + 2 N_m w d
Decoder, per layer, L tokens of the item (template + merged image tokens + title),
d = hidden_size, d_kv = num_key_value_heads * head_dim, I = intermediate_size:
                     2 L d d (q) + 2 L d d_kv (k) + 2 L d d_kv (v) + 2 L d d (o)
                   + 3 * 2 L d I      SwiGLU (gate, up, down)
                   + 2 d L (L + 1)    causal attention: L (L + 1) / 2 pairs, 4 d each
                                      (query heads times head_dim = d; GQA shares K/V,
                                      not the products)
FIRE (rank r, on the N_m image tokens): 2 N_m w r once, then 2 N_m r d per FIRE layer.
MHMF (H heads of width D_f, over n_x = N_m + n_title raw tokens):
                     2 d (H D_f) q + 2 d (2 H) gate + 2 * 2 n_x d (H D_f) k, v
                   + 2 * 2 n_x (H D_f) scores and pooling + 2 (H D_f) d out
Projection:          2 d projection_dim
No LM head: an embedder stops at the pooled state.
"""

from __future__ import annotations

from collections.abc import Sequence

from moon3rt.config import Moon3Config


def flop_breakdown(
    cfg: Moon3Config, n_patches: int | Sequence[int], n_tokens: int, n_title: int = 0
) -> dict[str, int]:
    """FLOPs of one item by part: ``vision``, ``merger``, ``decoder``, ``fire``, ``fusion``, ``projection``.

    n_patches: vision patches of the item's image, or a list with one count per image
    (attention is per image); n_tokens: decoder tokens of the item, merged image tokens
    included; n_title: title tokens (the text side of MHMF).
    """
    v, t = cfg.vision, cfg.text
    images = [int(n_patches)] if isinstance(n_patches, int) else [int(n) for n in n_patches]
    per_patch = v.in_channels * v.temporal_patch_size * v.patch_size**2
    d_v, m_v, w, d = v.embed_dim, v.mlp_dim, v.merged_dim, t.hidden_size
    merged = sum(images) // v.spatial_merge_size**2

    vision = 0
    for n in images:
        block = 2 * n * d_v * 3 * d_v + 2 * n * d_v * d_v + 2 * 2 * n * d_v * m_v + 4 * n * n * d_v
        vision += 2 * n * per_patch * d_v + v.depth * block
    merger = 2 * merged * w * w + 2 * merged * w * d

    L, d_kv = n_tokens, t.num_key_value_heads * t.head_dim
    layer = 2 * L * d * d * 2 + 2 * L * d * d_kv * 2 + 3 * 2 * L * d * t.intermediate_size + 2 * d * L * (L + 1)
    decoder = t.num_hidden_layers * layer

    fire = fusion = projection = 0
    if cfg.has_fire and merged:
        rank = cfg.moon3.fire.rank
        fire = 2 * merged * w * rank + len(cfg.moon3.fire.layers) * 2 * merged * rank * d
    if cfg.has_fusion:
        width = cfg.moon3.fusion.num_heads * cfg.moon3.fusion.head_dim
        n_x = merged + n_title
        fusion = (2 * d * width + 2 * d * 2 * cfg.moon3.fusion.num_heads + 2 * 2 * n_x * d * width
                  + 2 * 2 * n_x * width + 2 * width * d)
    if cfg.has_projection:
        projection = 2 * d * cfg.moon3.projection_dim
    return {"vision": vision, "merger": merger, "decoder": decoder, "fire": fire, "fusion": fusion,
            "projection": projection}


def flops_per_item(cfg: Moon3Config, n_patches: int | Sequence[int], n_tokens: int, n_title: int = 0) -> int:
    """Total FLOPs of one item (see the module docstring for the formula)."""
    return sum(flop_breakdown(cfg, n_patches, n_tokens, n_title).values())
