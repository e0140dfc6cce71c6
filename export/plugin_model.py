"""The plugin graph's module: `OnnxMoon3` with FIRE and MHMF as custom ONNX nodes.

Each custom node is an `torch.autograd.Function` whose ``forward`` runs the op's
plain-torch reference (so the trace carries correct values and shapes) and whose
``symbolic`` writes one ``moon3rt`` node with the attributes of its `PluginSpec`
(export/plugins.py). Everything else, inputs included, is the standard graph.

The varlen layout the kernels want is made from the standard graph's masks with
`stable_partition`: a permutation of 0..T-1 that lists the masked tokens first, in
order. Gathering with it packs a modality's tokens item after item (the tokens of an
item are contiguous in T, so its image or title tokens stay together) in O(T), with no
NonZero and no data-dependent shape.
"""

from __future__ import annotations

import math

import torch

from .onnx_model import OnnxMoon3
from .plugins import DOMAIN, LOOKUP_ATTRIBUTES, PLUGINS, PluginSpec

_SUFFIX = {float: "f", int: "i", str: "s"}
_FUNCTIONS: dict[str, type] = {}


def _node_function(spec: PluginSpec) -> type:
    """The autograd.Function that traces to one `spec` node."""
    n_in, attr_names = len(spec.inputs), list(spec.attributes)

    def forward(ctx, *args):
        tensors, attrs = args[:n_in], dict(zip(attr_names, args[n_in:]))
        return spec.reference(*tensors, **attrs)

    def symbolic(g, *args):
        tensors, attrs = args[:n_in], dict(zip(attr_names, args[n_in:]))
        kwargs = {f"{k}_{_SUFFIX[spec.attributes[k]]}": spec.attributes[k](v) for k, v in attrs.items()}
        kwargs.update({f"{k}_{_SUFFIX[type(v)]}": v for k, v in LOOKUP_ATTRIBUTES.items()})
        outs = g.op(f"{DOMAIN}::{spec.op_type}", *tensors, outputs=len(spec.outputs), **kwargs)
        outs = outs if isinstance(outs, (tuple, list)) else (outs,)
        for value, out in zip(outs, spec.outputs):  # element type and rank, so the exporter need not guess
            value.setType(tensors[0].type().with_dtype(getattr(torch, out.dtype)).with_sizes([None] * len(out.shape)))
        return outs if len(outs) > 1 else outs[0]

    return type(spec.op_type, (torch.autograd.Function,),
                {"forward": staticmethod(forward), "symbolic": staticmethod(symbolic)})


def plugin_op(op_type: str, *inputs: torch.Tensor, **attrs):
    """Call the custom op `op_type` (a node in an ONNX trace, its reference otherwise)."""
    spec = PLUGINS[op_type]
    if set(attrs) != set(spec.attributes):
        raise TypeError(f"{op_type} takes attributes {sorted(spec.attributes)}, got {sorted(attrs)}")
    if op_type not in _FUNCTIONS:
        _FUNCTIONS[op_type] = _node_function(spec)
    return _FUNCTIONS[op_type].apply(*inputs, *(attrs[k] for k in spec.attributes))


def stable_partition(mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(order, count) for a (T,) bool mask: order (T,) int64 lists the positions where mask
    holds, in order, then the others; count (1,) is how many hold.

    Built as a scatter with unique targets: with c the number of masked tokens up to and
    including t, a masked token t goes to slot c - 1 and an unmasked one to slot
    count + t - c (after all masked ones, in order). It exports to CumSum + ScatterElements.
    """
    one = mask.to(torch.int64)
    index = torch.ones_like(one).cumsum(0) - 1  # 0..T-1 (no Range: plain ops)
    rank = one.cumsum(0)  # masked tokens up to and including t
    count = rank[-1:]
    target = torch.where(mask, rank - 1, count + index - rank)
    return torch.zeros_like(index).scatter(0, target, index), count


class PluginMoon3(OnnxMoon3):
    """`OnnxMoon3` whose FIRE prologue, FIRE injections and MHMF pooling are custom nodes."""

    def forward(self, *args, **kwargs):
        self._fire_rows = None  # the image rows of this trace, made once for every FIRE layer
        return super().forward(*args, **kwargs)

    def _fire_prologue(self, z):
        fire = self.model.fire
        return plugin_op("FirePrologue", z, fire.norm.weight, fire.down.weight, eps=float(fire.norm.eps))

    def _fire_inject(self, h, r, is_image, image_row, slot, layer):
        if self._fire_rows is None:
            order, count = stable_partition(is_image)
            n = r.shape[0]  # merged image rows: one per image token (the placeholder image has none)
            rows = order[:n]
            live = (torch.ones_like(rows).cumsum(0) - 1) < count  # slots with an image token
            # a slot without a token (the placeholder image's) adds 0 to a valid row
            self._fire_rows = (torch.where(live, rows, torch.zeros_like(rows)).to(torch.int32),
                               r * live[:, None].to(r.dtype))
        rows, r_live = self._fire_rows
        fire = self.model.fire
        scale = torch.tanh(fire.alpha[slot:slot + 1].float())
        return plugin_op("FireInject", h, rows, r_live, fire.up[slot], scale, layer=int(layer))

    def _fusion(self, e, raw, is_image, title_mask, item_tokens, item_mask):
        """MHMF in the absorbed form (as `TritonBackend.fusion`) with FusionScores/FusionPool nodes."""
        fusion = self.model.fusion
        n_heads, d_f, d = fusion.num_heads, fusion.head_dim, e.shape[1]
        w = {name: p.float() for name, p in fusion.named_parameters()}
        q = (e @ w["q_proj.weight"].t() + w["q_proj.bias"]).view(-1, n_heads, d_f).transpose(0, 1)  # (H, B, Df)
        q_abs = (q @ w["k_proj.weight"].view(n_heads, d_f, d)).transpose(0, 1) / math.sqrt(d_f)  # (B, H, d)
        gate_logits = (e @ w["gate.weight"].t() + w["gate.bias"]).view(-1, n_heads, len(fusion.MODALITIES))
        x = raw.float()
        packed = []
        for mask in (is_image, title_mask):  # (T,): the modality's tokens, item after item
            order, _ = stable_partition(mask)
            counts = (mask[item_tokens] & item_mask).to(torch.int64).sum(-1)  # per item
            cu = torch.cat([torch.zeros_like(counts[:1]), counts.cumsum(0)]).to(torch.int32)
            packed.append((x[order], cu))
        (x_img, cu_img), (x_txt, cu_txt) = packed
        s_img, s_txt, row_max, row_sum = plugin_op("FusionScores", q_abs, x_img, cu_img, x_txt, cu_txt,
                                                   num_heads=n_heads)
        x_mix = plugin_op("FusionPool", x_img, cu_img, s_img, x_txt, cu_txt, s_txt, row_max, row_sum,
                          gate_logits, num_heads=n_heads)  # (B, H, d)
        present = ((cu_img[1:] > cu_img[:-1]) | (cu_txt[1:] > cu_txt[:-1])).float()  # an item with no tokens adds 0
        w_v = w["v_proj.weight"].view(n_heads, d_f, d)
        o = (x_mix.transpose(0, 1) @ w_v.transpose(1, 2)).transpose(0, 1)  # (B, H, Df)
        o = o + w["v_proj.bias"].view(n_heads, d_f) * present[:, None, None]
        return e + o.reshape(-1, n_heads * d_f) @ w["o_proj.weight"].t()
