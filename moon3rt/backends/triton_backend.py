"""The fused backend: the reference model's weights run through moon3rt's Triton kernels.

GEMMs stay on cuBLAS through torch; everything between them is a kernel from
`moon3rt.kernels`:

- vision tower: LayerNorm (fused with the residual add), 2-D RoPE on q and k in place,
  varlen bidirectional attention per image, bias + QuickGELU;
- decoder: residual add + RMSNorm, M-RoPE on q and k in place (angles computed in-kernel
  from the 3-D positions), varlen causal GQA attention per item, SwiGLU on the fused
  gate/up GEMM's output;
- FIRE: fused prologue (RMSNorm + down GEMM + SiLU) and, after each FIRE layer, a GEMM
  whose epilogue adds `tanh(alpha) R U_l` into the image rows in place;
- MHMF: the absorbed form, one kernel reading each raw token once for all heads;
- reasoning mode (`moon3rt.generate`): the prefill is `hidden_states` with a KV sink, and
  `decode_step` runs one token per item with the same kernels and
  `kernels.decode_attention` over the KV cache.

`embed` splits a forward in two: `prepare` (host work and copies to the device) and
`forward` (device work only, never a sync), so that on CUDA the forward is captured as
a CUDA graph per shape bucket and replayed (`cuda_graphs.py`): ~600 launches become one.

q/k/v and gate/up weights are concatenated once into single GEMMs; the model's own
parameters become views into the concatenated tensors, so nothing is stored twice and
the torch backend keeps working on the same model. Needs a CUDA device, or
``TRITON_INTERPRET=1`` (Triton's interpreter, CPU, for tests).
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from torch import nn

from ..kernels.decode_attention import decode_attention
from ..kernels.fire import fire_inject_, fire_prologue
from ..kernels.fused_gemm import linear_quick_gelu, linear_swiglu
from ..kernels.fusion_attention import fusion_attention
from ..kernels.layer_norm import layer_norm
from ..kernels.quick_gelu import bias_quick_gelu
from ..kernels.rms_norm import rms_norm
from ..kernels.rope import apply_mrope_, apply_vision_rope_
from ..kernels.swiglu import swiglu_packed
from ..kernels.varlen_attention import varlen_attention
from ..model import Moon3Model, PackedBatch, rope_inv_freq, vision_positions
from .cuda_graphs import ForwardInputs, GraphCache


def _concat_into_views(modules_and_names: list[tuple[nn.Module, str]]) -> torch.Tensor:
    """Concatenate parameters along dim 0 and make each module's parameter a view into the result."""
    params = [getattr(m, n) for m, n in modules_and_names]
    fused = torch.cat([p.detach() for p in params], dim=0)
    start = 0
    for (module, name), p in zip(modules_and_names, params):
        rows = p.shape[0]
        setattr(module, name, nn.Parameter(fused[start : start + rows], requires_grad=False))
        start += rows
    return fused


def _max_len(cu: torch.Tensor) -> int:
    return int((cu[1:] - cu[:-1]).max()) if cu.numel() > 1 else 0


GEMM_EPILOGUES = ("cublas", "fused")


class TritonBackend:
    """`cuda_graphs`: replay `embed`'s forward as a CUDA graph per shape bucket (default: on
    CUDA, unless ``MOON3RT_CUDA_GRAPHS=0``). `gemm_epilogue`: "cublas" runs fc1 and gate/up on
    cuBLAS and the activation as its own kernel; "fused" runs them as Triton GEMMs with the
    activation in the epilogue (`kernels.fused_gemm`). Default: ``MOON3RT_GEMM_EPILOGUE``,
    else "cublas" (the fused GEMMs have not been timed against cuBLAS on a GPU yet:
    bench/bench_kernels.py measures both)."""

    name = "triton"

    def __init__(self, model: Moon3Model, device: torch.device, gemm_epilogue: str | None = None,
                 cuda_graphs: bool | None = None):
        if device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
            raise ValueError(
                "backend='triton' needs a CUDA device; on a CPU it runs only under TRITON_INTERPRET=1 "
                "(Triton's interpreter, for tests)"
            )
        self.model, self.device, self.cfg = model, device, model.cfg
        self.gemm_epilogue = gemm_epilogue or os.environ.get("MOON3RT_GEMM_EPILOGUE", "cublas")
        if self.gemm_epilogue not in GEMM_EPILOGUES:
            raise ValueError(f"gemm_epilogue={self.gemm_epilogue!r} (MOON3RT_GEMM_EPILOGUE): expected one of "
                             f"{list(GEMM_EPILOGUES)}")
        # embed() replays a CUDA graph per shape bucket (moon3rt/backends/cuda_graphs.py) on CUDA
        # unless MOON3RT_CUDA_GRAPHS=0; the heads after the forward run eagerly
        if cuda_graphs is None:
            cuda_graphs = device.type == "cuda" and os.environ.get("MOON3RT_CUDA_GRAPHS", "1") != "0"
        if cuda_graphs and device.type != "cuda":
            raise ValueError("cuda_graphs=True needs a CUDA device")
        self.graphs = GraphCache(self.forward) if cuda_graphs else None
        # decode attention splits caches into chunks of this many keys on a GPU (split-K:
        # a few long caches still fill the SMs); fixed, so results never depend on the batch
        self.kv_chunk = 256 if device.type == "cuda" else None
        lm = model.language_model
        self.qkv, self.gate_up = [], []
        for layer in lm.layers:
            a = layer.self_attn
            w = _concat_into_views([(a.q_proj, "weight"), (a.k_proj, "weight"), (a.v_proj, "weight")])
            b = _concat_into_views([(a.q_proj, "bias"), (a.k_proj, "bias"), (a.v_proj, "bias")])
            self.qkv.append((w, b))
            m = layer.mlp
            self.gate_up.append(_concat_into_views([(m.gate_proj, "weight"), (m.up_proj, "weight")]))
        t, v = self.cfg.text, self.cfg.vision
        self.text_inv_freq = rope_inv_freq(t.rope_theta, t.head_dim, device)
        self.vision_inv_freq = rope_inv_freq(v.rope_theta, v.head_dim // 2, device)

    # ------------------------------------------------------------------------ vision
    def _vision_layout(self, grid_host: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int]:
        """(N, 2) patch positions and (I+1,) image offsets on the device, and the longest image."""
        positions = vision_positions(grid_host, self.cfg.vision.spatial_merge_size).to(self.device)
        lengths = grid_host.prod(-1).to(torch.int32)
        cu = F.pad(torch.cumsum(lengths, 0, dtype=torch.int32), (1, 0))
        return positions, cu.to(self.device), _max_len(cu)

    def _vision_tower(self, pixel_values, positions, cu, max_len, norm=None) -> tuple[torch.Tensor, torch.Tensor]:
        """(Z, V) of the vision tower from patches, their positions and the images' offsets (device);
        `norm`: the (mean, std) of uint8 patches."""
        tower, cfg = self.model.visual, self.cfg.vision
        x = tower.patch_embed(pixel_values, norm)
        n, heads = x.shape[0], cfg.num_heads
        out = None
        for block in tower.blocks:
            if out is None:
                y = layer_norm(x, block.norm1.weight, block.norm1.bias, block.norm1.eps)
            else:
                y, x = layer_norm(out, block.norm1.weight, block.norm1.bias, block.norm1.eps, residual=x)
            qkv = F.linear(y, block.attn.qkv.weight, block.attn.qkv.bias).view(n, 3, heads, cfg.head_dim)
            q, k, v = qkv.unbind(1)
            apply_vision_rope_(q, k, positions, self.vision_inv_freq)
            attn = varlen_attention(q, k, v, cu, max_len, causal=False)
            out = F.linear(attn.reshape(n, -1), block.attn.proj.weight, block.attn.proj.bias)
            y, x = layer_norm(out, block.norm2.weight, block.norm2.bias, block.norm2.eps, residual=x)
            hidden = self._fc1_quick_gelu(y, block.mlp.fc1)
            out = F.linear(hidden, block.mlp.fc2.weight, block.mlp.fc2.bias)
        merger = tower.merger
        if out is None:
            z = layer_norm(x, merger.ln_q.weight, merger.ln_q.bias, merger.ln_q.eps)
        else:
            z, _ = layer_norm(out, merger.ln_q.weight, merger.ln_q.bias, merger.ln_q.eps, residual=x)
        z = z.view(-1, cfg.merged_dim)
        return z, merger.mlp(z)

    # ----------------------------------------------------------------------- decoder
    def prepare(self, batch: PackedBatch) -> ForwardInputs:
        """The batch's tensors on the device and its shape-like values on the host: everything the
        forward reads, so that the forward itself never waits on the device (and can be a graph)."""
        cfg = self.cfg
        max_len = _max_len(batch.cu_seqlens.cpu())
        has_images = batch.pixel_values is not None and batch.pixel_values.shape[0] > 0
        rows = None
        if has_images:
            grid_host = batch.image_grid_thw.cpu()
            rows = torch.nonzero(batch.input_ids.cpu() == cfg.image_token_id).squeeze(1)
            patches = int(grid_host.prod(-1).sum())
            merge = cfg.vision.spatial_merge_size ** 2
            if rows.numel() * merge != patches:
                raise ValueError(f"{rows.numel()} <|image_pad|> tokens but {patches // merge} merged image tokens")
            rows = rows.to(self.device)
        moved = batch.to(self.device, non_blocking=True)
        inputs = ForwardInputs(moved.input_ids, moved.position_ids, moved.cu_seqlens, max_len)
        if has_images:
            positions, cu, vision_max = self._vision_layout(grid_host)
            inputs.pixel_values, inputs.vision_positions, inputs.vision_cu = moved.pixel_values, positions, cu
            inputs.vision_max_len, inputs.image_rows, inputs.pixel_norm = vision_max, rows, batch.pixel_norm
        return inputs

    def forward(self, inputs: ForwardInputs, kv_sink=None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(h, V) from prepared inputs: device work only, no host syncs."""
        model = self.model
        lm = model.language_model
        h = lm.embed_tokens(inputs.input_ids)
        v = r = None
        if inputs.pixel_values is not None:
            z, v = self._vision_tower(inputs.pixel_values, inputs.vision_positions, inputs.vision_cu,
                                      inputs.vision_max_len, inputs.pixel_norm)
            h.index_copy_(0, inputs.image_rows, v.to(h.dtype))
            if model.fire is not None:
                r = fire_prologue(z, model.fire.norm.weight, model.fire.down.weight, model.fire.norm.eps)
        fire_slots = {layer: slot for slot, layer in enumerate(model.fire.layers)} if model.fire is not None else {}

        def attend(i, q, k, vv):
            if kv_sink is not None:
                kv_sink(i, k, vv)
            return varlen_attention(q, k, vv, inputs.cu_seqlens, inputs.max_len, causal=True)

        out = None  # the sublayer output not yet added to the residual stream h
        for i, layer in enumerate(lm.layers):
            h, out = self._decoder_layer(i, layer, h, out, inputs.position_ids, attend)
            if r is not None and i in fire_slots:
                h, out = h + out, None
                slot = fire_slots[i]
                fire_inject_(h, inputs.image_rows, r, model.fire.up[slot], model.fire.alpha[slot])
        return self._final_norm(h, out), v

    def hidden_states(self, batch: PackedBatch, kv_sink=None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """As `Moon3Model.hidden_states`; `kv_sink(layer, k, v)` receives the rotated k/v."""
        return self.forward(self.prepare(batch), kv_sink)

    def decode_step(self, tokens, positions, slots, lengths, cache) -> torch.Tensor:
        """One token per active item (see `moon3rt.generate.TorchDecoder.decode_step`): (A, d)."""
        lm = self.model.language_model

        def attend(i, q, k, vv):
            cache.k[i, slots, lengths] = k
            cache.v[i, slots, lengths] = vv
            return decode_attention(q, cache.k[i], cache.v[i], slots, lengths + 1, kv_chunk=self.kv_chunk)

        h, out = lm.embed_tokens(tokens), None
        for i, layer in enumerate(lm.layers):
            h, out = self._decoder_layer(i, layer, h, out, positions, attend)
        return self._final_norm(h, out)

    def _decoder_layer(self, i, layer, h, out, positions, attend):
        """One decoder layer on the residual stream `h`, whose pending sublayer output `out`
        (None when there is none) the first norm adds in. Returns the new (h, out)."""
        t = self.cfg.text
        n, hq, hk, hd = h.shape[0], t.num_attention_heads, t.num_key_value_heads, t.head_dim
        norm = layer.input_layernorm
        if out is None:
            y = rms_norm(h, norm.weight, norm.eps)
        else:
            y, h = rms_norm(out, norm.weight, norm.eps, residual=h)
        qkv = F.linear(y, *self.qkv[i])
        q = qkv[:, : hq * hd].view(n, hq, hd)
        k = qkv[:, hq * hd : (hq + hk) * hd].view(n, hk, hd)
        vv = qkv[:, (hq + hk) * hd :].view(n, hk, hd)
        apply_mrope_(q, k, positions, self.text_inv_freq, t.mrope_section)
        out = F.linear(attend(i, q, k, vv).reshape(n, -1), layer.self_attn.o_proj.weight)
        norm = layer.post_attention_layernorm
        y, h = rms_norm(out, norm.weight, norm.eps, residual=h)
        out = F.linear(self._gate_up_swiglu(y, self.gate_up[i]), layer.mlp.down_proj.weight)
        return h, out

    def _fc1_quick_gelu(self, y, fc1):
        if self.gemm_epilogue == "fused":
            return linear_quick_gelu(y, fc1.weight, fc1.bias)
        # the bias stays in the GEMM (rounded once, as nn.Linear does); QuickGELU is the kernel
        return bias_quick_gelu(F.linear(y, fc1.weight, fc1.bias))

    def _gate_up_swiglu(self, y, gate_up):
        if self.gemm_epilogue == "fused":
            return linear_swiglu(y, gate_up)
        return swiglu_packed(F.linear(y, gate_up))

    def _final_norm(self, h, out):
        norm = self.model.language_model.norm
        if out is None:
            return rms_norm(h, norm.weight, norm.eps)
        y, _ = rms_norm(out, norm.weight, norm.eps, residual=h)
        return y

    # ------------------------------------------------------------------------- heads
    def fusion(self, e: torch.Tensor, x_img, cu_img, x_txt, cu_txt) -> torch.Tensor:
        """MHMF in the absorbed form of DESIGN.md: q~_h = W_k^hT q_h / sqrt(d_f), o = W_v^h x_mix + b_v."""
        fusion = self.model.fusion
        H, Df, d = fusion.num_heads, fusion.head_dim, e.shape[1]
        w = self._fusion_weights()
        q = F.linear(e, w["q_proj.weight"], w["q_proj.bias"]).view(-1, H, Df)
        q_abs = torch.einsum("bhf,hfd->bhd", q, w["k_proj.weight"].view(H, Df, d)) / Df**0.5  # K bias drops out
        gate_logits = F.linear(e, w["gate.weight"], w["gate.bias"]).view(-1, H, 2)
        # 16-bit tokens are read as they are and accumulated with exact fp32 dots into an fp32 result
        x_mix = fusion_attention(q_abs, x_img, cu_img, x_txt.to(x_img.dtype), cu_txt, gate_logits,
                                 out_dtype=torch.float32, precision="ieee")
        present = ((cu_img[1:] > cu_img[:-1]) | (cu_txt[1:] > cu_txt[:-1])).float()  # an item with no tokens adds 0
        o = torch.einsum("bhd,hfd->bhf", x_mix, w["v_proj.weight"].view(H, Df, d))
        o = o + w["v_proj.bias"].view(H, Df) * present[:, None, None]
        return e + F.linear(o.reshape(-1, H * Df), w["o_proj.weight"])

    def _fusion_weights(self) -> dict[str, torch.Tensor]:
        """MHMF's parameters in fp32, converted once (they are small: a few d x H*d_f matrices)."""
        if getattr(self, "_fusion_fp32", None) is None:
            self._fusion_fp32 = {n: p.detach().float() for n, p in self.model.fusion.named_parameters()}
        return self._fusion_fp32

    @torch.inference_mode()
    def embed(self, batch: PackedBatch) -> torch.Tensor:
        inputs = self.prepare(batch)
        replayed = self.graphs.run(inputs) if self.graphs is not None else None
        h, v = replayed if replayed is not None else self.forward(inputs)
        index = self._head_inputs(batch)
        return self.model.heads(self.model.pool(h, index), v, index, fusion=self.fusion)

    def _head_inputs(self, batch: PackedBatch) -> PackedBatch:
        """The batch without its pixels, on the device: what pooling and the heads read."""
        small = dict(batch.__dict__, pixel_values=None, image_grid_thw=None)
        return PackedBatch(**small).to(self.device)

    def heads(self, e: torch.Tensor, v: torch.Tensor | None, batch: PackedBatch) -> torch.Tensor:
        """MHMF (fused) and projection of the pooled states e (B, d); (B, out) fp32."""
        return self.model.heads(e, v, self._head_inputs(batch), fusion=self.fusion)
