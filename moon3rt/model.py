"""The reference MOON3 encoder in plain PyTorch: the spec of DESIGN.md section 1 in code.

Batches are packed: the items' tokens are concatenated and `cu_seqlens` marks where
each item starts, so nothing is padded and every item's result depends on that item
alone. Attention is computed one segment at a time (one image for the vision tower,
one item for the decoder); the fast backends must match this file.

Module and parameter names follow transformers' Qwen2-VL (``visual.*``,
``language_model.*``) so checkpoints map onto them by prefix alone; the MOON3 heads
live under ``moon3.*``.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .config import Moon3Config, TextConfig, VisionConfig


@dataclass
class PackedBatch:
    """Model input for B items packed into T tokens (see `moon3rt.prompt.pack`)."""

    input_ids: torch.Tensor  # (T,) int64
    position_ids: torch.Tensor  # (3, T) int64: M-RoPE t/h/w positions (equal rows for 1-D)
    cu_seqlens: torch.Tensor  # (B+1,) int32: item b owns tokens cu_seqlens[b]:cu_seqlens[b+1]
    pool_index: torch.Tensor  # (B,) int64: packed index of each item's pooling token
    title_index: torch.Tensor  # (N_txt,) int64: packed indices of the title tokens, item by item
    cu_titles: torch.Tensor  # (B+1,) int32: item b owns title_index[cu_titles[b]:cu_titles[b+1]]
    cu_images: torch.Tensor  # (B+1,) int32: item b owns merged image tokens cu_images[b]:cu_images[b+1]
    # the patches of all images: (P, C*ps*ps) uint8 pixels normalised by `pixel_norm` in the
    # patch embedding, or (P, C*T*ps*ps) float patches normalised already (pixel_norm None)
    pixel_values: torch.Tensor | None = None
    image_grid_thw: torch.Tensor | None = None  # (n_images, 3) int64, in patches
    pixel_norm: tuple[tuple[float, ...], tuple[float, ...]] | None = None  # (mean, std) per channel

    @property
    def num_items(self) -> int:
        return self.cu_seqlens.numel() - 1

    def to(self, device: torch.device | str, non_blocking: bool = False) -> "PackedBatch":
        """The batch on `device`; non_blocking copies overlap with the host when the source is pinned."""
        moved = {k: (v.to(device, non_blocking=non_blocking) if isinstance(v, torch.Tensor) else v)
                 for k, v in self.__dict__.items()}
        return PackedBatch(**moved)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def rope_inv_freq(theta: float, dim: int, device=None) -> torch.Tensor:
    """RoPE's inverse frequencies theta^(-2i/dim), i < dim/2, fp32: (dim/2,)."""
    return 1.0 / theta ** (torch.arange(0, dim, 2, dtype=torch.float32, device=device) / dim)


def segments(cu: torch.Tensor) -> list[tuple[int, int]]:
    bounds = cu.tolist()
    return list(zip(bounds[:-1], bounds[1:]))


class RMSNorm(nn.Module):
    """Qwen2's RMSNorm: statistics in fp32, cast back, then scale by the weight."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)


# ----------------------------------------------------------------------------- vision
class PatchEmbed(nn.Module):
    """Conv3d with stride = kernel on (C, T, P, P) patches, i.e. a Linear on flattened patches.

    uint8 patches (C, P, P) of a still image are normalised here: with
    x = ((l / 255) - mean_c) / std_c repeated over T, W x = W' (l - 128) + b', where W' sums
    W over T and scales channel c by 1 / (255 std_c), and b' = sum W (128 / 255 - mean_c) / std_c.
    (Centring the levels at 128 keeps the two terms as small as the normalised input's.)
    """

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        kernel = (cfg.temporal_patch_size, cfg.patch_size, cfg.patch_size)
        self.proj = nn.Conv3d(cfg.in_channels, cfg.embed_dim, kernel_size=kernel, stride=kernel, bias=False)
        self._folded: tuple | None = None  # (key, W', b') for inference; recomputed when the weight changes

    def forward(self, patches: torch.Tensor, norm: tuple | None = None) -> torch.Tensor:
        weight = self.proj.weight
        if patches.dtype != torch.uint8:
            return patches.to(weight.dtype) @ weight.reshape(weight.shape[0], -1).t()
        if norm is None:
            raise ValueError("uint8 patches need their normalisation (PackedBatch.pixel_norm)")
        w, b = self.folded(norm)
        return F.linear(patches.to(weight.dtype).sub_(128), w, b)  # one temporary: the converted levels

    def folded(self, norm: tuple) -> tuple[torch.Tensor, torch.Tensor]:
        """(W' (D, C*P*P), b' (D,)) in the weight's dtype, computed in fp32 (at least) on the weight's device
        (python scalars only: no host-to-device copy, so safe inside a CUDA graph capture once cached)."""
        weight = self.proj.weight
        training = torch.is_grad_enabled() and weight.requires_grad
        key = (norm, weight._version, weight.data_ptr(), weight.dtype, weight.device)
        if not training and self._folded is not None and self._folded[0] == key:
            return self._folded[1], self._folded[2]
        mean, std = norm
        w = weight.to(torch.promote_types(weight.dtype, torch.float32)).sum(dim=2)  # (D, C, P, P): the frame over T
        channels = range(w.shape[1])
        scaled = torch.stack([w[:, c] * ((1 / 255) / std[c]) for c in channels], dim=1)
        bias = sum(w[:, c].sum(dim=(1, 2)) * ((128 / 255 - mean[c]) / std[c]) for c in channels)
        out = scaled.reshape(w.shape[0], -1).to(weight.dtype), bias.to(weight.dtype)
        if not training:
            self._folded = (key, *out)
        return out


class VisionAttention(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.num_heads = cfg.num_heads
        self.qkv = nn.Linear(cfg.embed_dim, 3 * cfg.embed_dim)
        self.proj = nn.Linear(cfg.embed_dim, cfg.embed_dim)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cu_seqlens: torch.Tensor):
        n = x.shape[0]
        q, k, v = self.qkv(x).view(n, 3, self.num_heads, -1).unbind(1)
        # 2-D RoPE is applied in fp32, as Qwen2-VL does.
        cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
        q = (q.float() * cos + rotate_half(q.float()) * sin).to(x.dtype)
        k = (k.float() * cos + rotate_half(k.float()) * sin).to(x.dtype)
        out = torch.empty_like(q)
        for start, end in segments(cu_seqlens):  # bidirectional attention within each image
            qi, ki, vi = (t[start:end].transpose(0, 1) for t in (q, k, v))
            out[start:end] = F.scaled_dot_product_attention(qi, ki, vi).transpose(0, 1)
        return self.proj(out.reshape(n, -1))


class VisionMLP(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.fc1 = nn.Linear(cfg.embed_dim, cfg.mlp_dim)
        self.fc2 = nn.Linear(cfg.mlp_dim, cfg.embed_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.fc1(x)
        return self.fc2(h * torch.sigmoid(1.702 * h))  # QuickGELU


class VisionBlock(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.norm1 = nn.LayerNorm(cfg.embed_dim, eps=1e-6)
        self.norm2 = nn.LayerNorm(cfg.embed_dim, eps=1e-6)
        self.attn = VisionAttention(cfg)
        self.mlp = VisionMLP(cfg)

    def forward(self, x, cos, sin, cu_seqlens):
        x = x + self.attn(self.norm1(x), cos, sin, cu_seqlens)
        return x + self.mlp(self.norm2(x))


class PatchMerger(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.merged_dim = cfg.merged_dim
        self.ln_q = nn.LayerNorm(cfg.embed_dim, eps=1e-6)
        self.mlp = nn.Sequential(
            nn.Linear(cfg.merged_dim, cfg.merged_dim), nn.GELU(), nn.Linear(cfg.merged_dim, cfg.hidden_size)
        )

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        z = self.ln_q(x).reshape(-1, self.merged_dim)  # Z: the fine-grained local features
        return z, self.mlp(z)  # (Z, V)


def vision_positions(grid_thw: torch.Tensor, merge: int) -> torch.Tensor:
    """(N, 2) row/column of every patch, in the processor's order (merge windows grouped)."""
    out = []
    for t, h, w in grid_thw.tolist():
        rows = torch.arange(h).view(h // merge, merge, 1, 1).expand(-1, -1, w // merge, merge)
        cols = torch.arange(w).view(1, 1, w // merge, merge).expand(h // merge, merge, -1, -1)
        hw = torch.stack([rows.transpose(1, 2).reshape(-1), cols.transpose(1, 2).reshape(-1)], dim=-1)
        out.append(hw.repeat(t, 1))
    return torch.cat(out).to(grid_thw.device)


class VisionTower(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.cfg = cfg
        self.patch_embed = PatchEmbed(cfg)
        self.blocks = nn.ModuleList(VisionBlock(cfg) for _ in range(cfg.depth))
        self.merger = PatchMerger(cfg)

    def rotary(self, grid_thw: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """2-D RoPE: a quarter of the frequencies turn with the row, a quarter with the column."""
        inv_freq = rope_inv_freq(self.cfg.rope_theta, self.cfg.head_dim // 2, grid_thw.device)  # (head_dim/4,)
        pos = vision_positions(grid_thw, self.cfg.spatial_merge_size).float()  # (N, 2)
        freqs = (pos[:, :, None] * inv_freq).flatten(1)  # (N, head_dim/2): rows then cols
        freqs = torch.cat([freqs, freqs], dim=-1)
        return freqs.cos(), freqs.sin()

    def forward(self, pixel_values: torch.Tensor, grid_thw: torch.Tensor,
                norm: tuple | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns ``(Z, V)``: the merger's grouped normalised input and its output. `norm`:
        the (mean, std) of uint8 `pixel_values` (`PackedBatch.pixel_norm`)."""
        x = self.patch_embed(pixel_values, norm)
        cos, sin = self.rotary(grid_thw)
        lengths = (grid_thw[:, 0] * grid_thw[:, 1] * grid_thw[:, 2]).to(torch.int32)
        cu = F.pad(torch.cumsum(lengths, 0, dtype=torch.int32), (1, 0))
        for block in self.blocks:
            x = block(x, cos, sin, cu)
        return self.merger(x)


# ---------------------------------------------------------------------------- decoder
class Attention(nn.Module):
    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.num_heads, self.num_kv_heads = cfg.num_attention_heads, cfg.num_key_value_heads
        self.head_dim = cfg.head_dim
        self.q_proj = nn.Linear(cfg.hidden_size, self.num_heads * self.head_dim)
        self.k_proj = nn.Linear(cfg.hidden_size, self.num_kv_heads * self.head_dim)
        self.v_proj = nn.Linear(cfg.hidden_size, self.num_kv_heads * self.head_dim)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, cfg.hidden_size, bias=False)

    def rotated_qkv(self, x, cos, sin):
        """q (n, Hq, D), k and v (n, Hk, D) of n tokens, with RoPE applied to q and k."""
        n = x.shape[0]
        q = self.q_proj(x).view(n, self.num_heads, self.head_dim)
        k = self.k_proj(x).view(n, self.num_kv_heads, self.head_dim)
        v = self.v_proj(x).view(n, self.num_kv_heads, self.head_dim)
        cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
        return q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin, v

    def forward(self, x, cos, sin, cu_seqlens, kv_sink=None):
        """`kv_sink(k, v)`, when given, receives the rotated keys and values (a KV cache's prefill)."""
        n = x.shape[0]
        q, k, v = self.rotated_qkv(x, cos, sin)
        if kv_sink is not None:
            kv_sink(k, v)
        groups = self.num_heads // self.num_kv_heads
        out = torch.empty_like(q)
        for start, end in segments(cu_seqlens):  # causal attention within each item
            qi = q[start:end].transpose(0, 1)
            ki = k[start:end].transpose(0, 1).repeat_interleave(groups, dim=0)
            vi = v[start:end].transpose(0, 1).repeat_interleave(groups, dim=0)
            out[start:end] = F.scaled_dot_product_attention(qi, ki, vi, is_causal=True).transpose(0, 1)
        return self.o_proj(out.reshape(n, -1))


class MLP(nn.Module):
    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x, cos, sin, cu_seqlens, kv_sink=None):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, cu_seqlens, kv_sink)
        return x + self.mlp(self.post_attention_layernorm(x))


class LanguageModel(nn.Module):
    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def rotary(self, position_ids: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """M-RoPE: frequency band i of `mrope_section` turns with the t, h or w position (i mod 3)."""
        inv_freq = rope_inv_freq(self.cfg.rope_theta, self.cfg.head_dim, position_ids.device)
        freqs = position_ids[..., None].float() * inv_freq  # (3, T, head_dim/2)
        bands = freqs.split(self.cfg.mrope_section, dim=-1)
        freqs = torch.cat([band[i % 3] for i, band in enumerate(bands)], dim=-1)
        freqs = torch.cat([freqs, freqs], dim=-1)
        return freqs.cos().to(dtype), freqs.sin().to(dtype)


# ------------------------------------------------------------------------ MOON3 heads
class Fire(nn.Module):
    """FIRE: ``R = SiLU(RMSNorm(Z) W_down)``; after layer l: ``H[img] += tanh(alpha_l) R U_l``."""

    def __init__(self, cfg: Moon3Config):
        super().__init__()
        fire = cfg.moon3.fire
        self.layers = list(fire.layers)
        self.norm = RMSNorm(cfg.vision.merged_dim, fire.eps)
        self.down = nn.Linear(cfg.vision.merged_dim, fire.rank, bias=False)
        self.up = nn.Parameter(torch.zeros(len(self.layers), fire.rank, cfg.text.hidden_size))
        self.alpha = nn.Parameter(torch.zeros(len(self.layers)))

    def prologue(self, z: torch.Tensor) -> torch.Tensor:
        zf = z.float()
        zn = zf * torch.rsqrt(zf.pow(2).mean(-1, keepdim=True) + self.norm.eps) * self.norm.weight.float()
        return F.silu(zn @ self.down.weight.float().t()).to(z.dtype)

    def inject(self, hidden: torch.Tensor, rows: torch.Tensor, r: torch.Tensor, slot: int) -> None:
        delta = torch.tanh(self.alpha[slot].float()) * (r.float() @ self.up[slot].float())
        hidden[rows] = (hidden[rows].float() + delta).to(hidden.dtype)


class Fusion(nn.Module):
    """MHMF: the pooled query attends back to the raw image and title tokens (DESIGN.md)."""

    MODALITIES = ("image", "text")

    def __init__(self, cfg: Moon3Config):
        super().__init__()
        d, fusion = cfg.text.hidden_size, cfg.moon3.fusion
        self.num_heads, self.head_dim = fusion.num_heads, fusion.head_dim
        width = fusion.num_heads * fusion.head_dim
        self.q_proj = nn.Linear(d, width)
        self.k_proj = nn.Linear(d, width)
        self.v_proj = nn.Linear(d, width)
        self.gate = nn.Linear(d, fusion.num_heads * len(self.MODALITIES))  # viewed as (H, modality)
        self.o_proj = nn.Linear(width, d, bias=False)

    def forward(self, e, x_img, cu_img, x_txt, cu_txt):
        """e (B, d); x_img/x_txt packed raw tokens with (B+1,) offsets. fp32 throughout."""
        H, Df = self.num_heads, self.head_dim
        w = {name: p.float() for name, p in self.named_parameters()}
        e = e.float()
        q = (e @ w["q_proj.weight"].t() + w["q_proj.bias"]).view(-1, H, Df)
        gate_logits = (e @ w["gate.weight"].t() + w["gate.bias"]).view(-1, H, len(self.MODALITIES))
        heads = []
        for b in range(e.shape[0]):
            outs, logits = [], []
            for m, (x, cu) in enumerate(((x_img, cu_img), (x_txt, cu_txt))):
                xs = x[cu[b] : cu[b + 1]].float()
                if xs.shape[0] == 0:  # a modality the item does not have takes no part in the gate
                    continue
                k = (xs @ w["k_proj.weight"].t() + w["k_proj.bias"]).view(-1, H, Df)
                v = (xs @ w["v_proj.weight"].t() + w["v_proj.bias"]).view(-1, H, Df)
                a = torch.softmax(torch.einsum("hd,nhd->hn", q[b], k) / Df**0.5, dim=-1)
                outs.append(torch.einsum("hn,nhd->hd", a, v))
                logits.append(gate_logits[b, :, m])
            if not outs:
                heads.append(torch.zeros(H, Df, device=e.device))
                continue
            g = torch.softmax(torch.stack(logits, dim=-1), dim=-1)  # (H, present modalities)
            heads.append(sum(g[:, i : i + 1] * o for i, o in enumerate(outs)))
        o = torch.stack(heads).reshape(e.shape[0], H * Df)
        return e + o @ w["o_proj.weight"].t()


class Moon3Heads(nn.Module):
    def __init__(self, cfg: Moon3Config):
        super().__init__()
        if cfg.has_fire:
            self.fire = Fire(cfg)
        if cfg.has_fusion:
            self.fusion = Fusion(cfg)
        if cfg.has_projection:
            self.projection = nn.Linear(cfg.text.hidden_size, cfg.moon3.projection_dim, bias=False)


# ---------------------------------------------------------------------------- encoder
class Moon3Model(nn.Module):
    """Qwen2-VL backbone + FIRE + MHMF + pooling + projection. `forward` returns (B, out) fp32.

    `lm_head` (vocab, d) exists only for checkpoints with untied embeddings that ship
    ``lm_head.weight``; reasoning mode needs logits, and `output_embeddings` says where
    they come from.
    """

    def __init__(self, cfg: Moon3Config, lm_head: bool = False):
        super().__init__()
        self.cfg = cfg
        self.visual = VisionTower(cfg.vision)
        self.language_model = LanguageModel(cfg.text)
        if cfg.moon3 is not None and (cfg.has_fire or cfg.has_fusion or cfg.has_projection):
            self.moon3 = Moon3Heads(cfg)
        if lm_head:
            self.lm_head = nn.Linear(cfg.text.hidden_size, cfg.text.vocab_size, bias=False)

    def output_embeddings(self) -> torch.Tensor | None:
        """The (vocab, d) matrix that turns final-norm states into logits, or None if there is none.

        Tied checkpoints use the input embeddings; untied ones their own ``lm_head.weight``,
        which is optional at load (embedding needs no logits), so it may be absent.
        """
        head = getattr(self, "lm_head", None)
        if head is not None:
            return head.weight
        if self.cfg.text.tie_word_embeddings:
            return self.language_model.embed_tokens.weight
        return None

    @property
    def fire(self) -> Fire | None:
        return getattr(getattr(self, "moon3", None), "fire", None)

    @property
    def fusion(self) -> Fusion | None:
        return getattr(getattr(self, "moon3", None), "fusion", None)

    @property
    def projection(self) -> nn.Linear | None:
        return getattr(getattr(self, "moon3", None), "projection", None)

    def hidden_states(self, batch: PackedBatch, kv_sink=None,
                      vision: tuple[torch.Tensor, torch.Tensor] | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Final-norm hidden states (T, d) of the packed batch, and the raw image signal V.

        `kv_sink(layer, k, v)`, when given, receives each decoder layer's rotated keys and
        values (T, Hk, D): the prefill of reasoning mode's KV cache (`moon3rt.generate`).
        `vision`, when given, is the vision tower's (Z, V) for the batch's image tokens in
        packed order, computed elsewhere (one pass shared by sequences that repeat the same
        images, as RL rollouts do); the batch's pixel_values are then not read.
        """
        lm = self.language_model
        h = lm.embed_tokens(batch.input_ids)
        image_rows = v = r = None
        if vision is not None or (batch.pixel_values is not None and batch.pixel_values.shape[0] > 0):
            z, v = vision if vision is not None else self.visual(batch.pixel_values, batch.image_grid_thw,
                                                                 batch.pixel_norm)
            image_rows = torch.nonzero(batch.input_ids == self.cfg.image_token_id).squeeze(1)
            if image_rows.numel() != v.shape[0]:
                raise ValueError(f"{image_rows.numel()} <|image_pad|> tokens but {v.shape[0]} merged image tokens")
            h = h.index_copy(0, image_rows, v.to(h.dtype))
            if self.fire is not None:
                r = self.fire.prologue(z)
        cos, sin = lm.rotary(batch.position_ids, h.dtype)
        fire_slots = {layer: slot for slot, layer in enumerate(self.fire.layers)} if self.fire is not None else {}
        for i, layer in enumerate(lm.layers):
            h = layer(h, cos, sin, batch.cu_seqlens, None if kv_sink is None else functools.partial(kv_sink, i))
            if r is not None and i in fire_slots:
                self.fire.inject(h, image_rows, r, fire_slots[i])
        return lm.norm(h), v

    def pool(self, h: torch.Tensor, batch: PackedBatch) -> torch.Tensor:
        if self.cfg.pooling == "mean":
            return torch.stack([h[s:e].float().mean(0) for s, e in segments(batch.cu_seqlens)]).to(h.dtype)
        return h[batch.pool_index]

    def forward(self, batch: PackedBatch) -> torch.Tensor:
        h, v = self.hidden_states(batch)
        return self.heads(self.pool(h, batch), v, batch)

    def heads(self, e: torch.Tensor, v: torch.Tensor | None, batch: PackedBatch, fusion=None) -> torch.Tensor:
        """MHMF and projection of the pooled states e (B, d), given the image signal V. (B, out) fp32.

        `fusion` replaces `self.fusion`'s computation (same arguments), e.g. the fused kernel.
        """
        e = e.float()
        if self.fusion is not None:
            x_img = v if v is not None else e.new_zeros(0, e.shape[1])
            x_txt = self.language_model.embed_tokens(batch.input_ids[batch.title_index])
            e = (fusion or self.fusion)(e, x_img, batch.cu_images, x_txt, batch.cu_titles)
        if self.projection is not None:
            e = e @ self.projection.weight.float().t()
        return e


def matryoshka(y: torch.Tensor, dim: int | None = None, normalize: bool = True) -> torch.Tensor:
    """Output vectors (B, out) -> truncated to the first `dim` features, then L2-normalised, fp32."""
    y = y.float()
    if dim is not None:
        y = y[:, :dim]
    return F.normalize(y, dim=-1) if normalize else y


def embed(model: Moon3Model, batch: PackedBatch, dim: int | None = None, normalize: bool = True) -> torch.Tensor:
    """Full embedding: forward, Matryoshka truncation to `dim`, L2 normalisation. (B, dim) fp32."""
    return matryoshka(model(batch), dim, normalize)


def random_model(
    cfg: Moon3Config, seed: int = 0, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
    lm_head: bool = False,
) -> Moon3Model:
    """A model with deterministic random weights (for presets and tests).

    Matrices are N(0, 0.02), norms are ones, FIRE's alphas 0.5 (so random models exercise
    FIRE). Parameters are drawn in name order from one generator on `device`, in fp32 and
    then cast, so a seed gives the same weights on every machine with the same device type.
    Nothing is allocated twice: the model is built on the meta device and filled in place.
    """
    device = torch.device(device)
    with torch.device("meta"):
        model = Moon3Model(cfg, lm_head=lm_head)
    if device.type == "meta":  # shapes only (e.g. to count parameters): nothing to fill
        return model.eval()
    gen = torch.Generator(device=device).manual_seed(seed)
    state = {}
    for name, p in sorted(model.named_parameters(), key=lambda kv: kv[0]):
        leaf = name.rsplit(".", 1)[-1]
        if "norm" in name or "ln_q" in name:
            value = (torch.ones if leaf == "weight" else torch.zeros)(p.shape, device=device)
        elif name.endswith("fire.alpha"):
            value = torch.full(p.shape, 0.5, device=device)
        else:
            value = torch.randn(p.shape, generator=gen, device=device) * 0.02
        state[name] = value.to(dtype)
    model.load_state_dict(state, assign=True)
    return model.eval()
