"""The custom ops of the plugin graph, specified once: the exporter, the graph checks,
the reference evaluation, the TensorRT plugins and the native kernels all read `PLUGINS`.

The plugin graph (``export_onnx(..., plugins=True)``) is the standard graph with MOON3's
two fused ops as custom nodes in the ``moon3rt`` domain:

| op type      | inputs                                                   | outputs                            | attributes     |
|--------------|----------------------------------------------------------|------------------------------------|----------------|
| FirePrologue | z (N, K), norm_weight (K,), w_down (R, K)                | r (N, R)                           | eps: float     |
| FireInject   | hidden (T, d), rows (N,) i32, r (N, R), up (R, d), scale (1,) | hidden_out (T, d), aliases hidden | layer: int |
| FusionScores | q (B, H, d), x_img (Ni, d), cu_img (B+1,) i32, x_txt (Nt, d), cu_txt (B+1,) i32 | s_img (H, Ni), s_txt (H, Nt), row_max (B, 2, H), row_sum (B, 2, H) | num_heads: int |
| FusionPool   | x_img, cu_img, s_img, x_txt, cu_txt, s_txt, row_max, row_sum, gate_logits (B, H, 2) | x_mix (B, H, d) | num_heads: int |

Every node also carries ``plugin_namespace="moon3rt"``, ``plugin_version="1"`` and ``aot=1``:
TensorRT's ONNX parser looks a custom node up as plugin (op_type, plugin_version,
plugin_namespace), ignoring the node's domain, and ``aot`` asks it for the plugin's
ahead-of-time implementation (the kernel as PTX inside the engine, no Python at run time).

Why these inputs (the standard graph has masks, the kernels want varlen offsets):

- MHMF is one fused op but two kernel launches (scores with online softmax statistics,
  then pooling over D-blocks; see kernels/fusion_attention.py). An ahead-of-time TensorRT
  plugin launches exactly one kernel, so the op is two nodes, and the kernels' fp32
  scratch (scores, row max, row sum) becomes the tensors passed between them.
- x_img / x_txt are the raw tokens of each modality packed item after item, built in the
  graph by a stable partition (ScatterElements with a permutation of 0..T-1, no NonZero),
  so they keep T rows: item b owns rows cu[b]:cu[b+1] and rows past cu[B] are never read.
  cu_img / cu_txt are per-item token counts (the modality masks over the item slots), cumulated.
- q is the absorbed query q~ = W_k^T q / sqrt(d_f); the V projection, its bias and the
  output projection stay standard ops around FusionPool (DESIGN.md, MHMF).
- FireInject is the functional form of ``fire_inject_``: hidden_out equals hidden with
  ``rows`` updated. rows are the image tokens' positions (row k of R belongs to the k-th
  image token), found by the same partition; scale = tanh(alpha_l) is a standard Tanh.
  TensorRT runs it in place (the plugin output aliases input 0).

`reference_evaluator` runs a plugin graph on the CPU with each custom node replaced by
its plain-torch reference here, which is how the plugin graph is checked against the
standard graph without TensorRT.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch

from ..kernels.fire import fire_prologue_ref

DOMAIN = "moon3rt"
# fixed: tensorrt.plugin registers every plugin creator as version "1" (export/trt_plugins.py)
VERSION = "1"
# read by TensorRT's ONNX parser to find the plugin and pick its AOT implementation; every custom node has them
LOOKUP_ATTRIBUTES = {"plugin_namespace": DOMAIN, "plugin_version": VERSION, "aot": 1}


class PluginGraphError(ValueError):
    """A custom node that does not match its spec in `PLUGINS`."""


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: str  # "float32" or "int32"
    shape: tuple  # symbols (str) and fixed sizes (int)


@dataclass(frozen=True)
class PluginSpec:
    """One custom op: its node signature, the kernel behind it and its reference.

    `extra_args` are the int32 scalars the plugin's kernel takes between its input and
    output pointers (TensorRT's ahead-of-time calling convention), each a (name, input
    index, dim) triple: the size is read from that input's shape, so it is a symbolic
    expression inside TensorRT and an int everywhere else.
    """

    op_type: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    attributes: dict[str, type]
    extra_args: tuple[tuple[str, int, int], ...]
    kernel: str  # the @triton.jit adapter in moon3rt.export.plugin_kernels
    reference: Callable
    aliases: dict[int, int] = field(default_factory=dict)  # output index -> input index (in place)

    @property
    def qualified_name(self) -> str:
        return f"{DOMAIN}::{self.op_type}"

    def extra_arg_values(self, shapes: list) -> list:
        """The extra int32 arguments from the input shapes (ints or symbolic dims)."""
        return [shapes[i][d] for _, i, d in self.extra_args]


# --------------------------------------------------------------------------- references
def fusion_scores_ref(q, x_img, cu_img, x_txt, cu_txt, num_heads=None):
    """Pass 1 of MHMF pooling: raw scores q~ . x_i of every segment token, and per
    (item, modality, head) the softmax statistics max_i s_i and sum_i exp(s_i - max).
    An empty segment has max -inf and sum 0. Rows outside every segment are 0 here; the
    kernel leaves them unwritten, which is fine because FusionPool never reads them."""
    batch, heads, _ = q.shape
    row_max = torch.full((batch, 2, heads), float("-inf"))
    row_sum = torch.zeros((batch, 2, heads))
    scores = []
    for m, (x, cu) in enumerate(((x_img, cu_img), (x_txt, cu_txt))):
        s_m = torch.zeros((heads, x.shape[0]))
        cu = cu.tolist()
        for b in range(batch):
            if cu[b + 1] == cu[b]:
                continue
            s = q[b].float() @ x[cu[b]:cu[b + 1]].float().T  # (H, n)
            s_m[:, cu[b]:cu[b + 1]] = s
            row_max[b, m] = s.max(-1).values
            row_sum[b, m] = (s - row_max[b, m, :, None]).exp().sum(-1)
        scores.append(s_m)
    return scores[0], scores[1], row_max, row_sum


def fusion_pool_ref(x_img, cu_img, s_img, x_txt, cu_txt, s_txt, row_max, row_sum, gate_logits, num_heads=None):
    """Pass 2: x_mix[b, h] = sum over present modalities m of g^{h,m} * softmax-weighted
    mean of the segment's tokens (g: softmax of gate_logits over the present modalities)."""
    batch, heads, _ = gate_logits.shape
    out = torch.zeros((batch, heads, x_img.shape[1]))
    segments = ((x_img, cu_img.tolist(), s_img), (x_txt, cu_txt.tolist(), s_txt))
    for b in range(batch):
        pooled, logits = [], []
        for m, (x, cu, s) in enumerate(segments):
            if cu[b + 1] == cu[b]:
                continue
            w = (s[:, cu[b]:cu[b + 1]] - row_max[b, m, :, None]).exp() / row_sum[b, m, :, None]
            pooled.append(w @ x[cu[b]:cu[b + 1]].float())
            logits.append(gate_logits[b, :, m].float())
        if pooled:
            gate = torch.softmax(torch.stack(logits, dim=-1), dim=-1)
            out[b] = sum(gate[:, j, None] * pooled[j] for j in range(len(pooled)))
    return out.to(x_img.dtype)


def fire_prologue_node_ref(z, norm_weight, w_down, eps):
    return fire_prologue_ref(z, norm_weight, w_down, eps)


def fire_inject_node_ref(hidden, rows, r, up, scale, layer=None):
    """Functional ``fire_inject_``: hidden with hidden[rows] += scale * (r @ up), scale = tanh(alpha)."""
    out = hidden.clone()
    rows = rows.long()
    out[rows] = (out[rows].float() + scale.float() * (r.float() @ up.float())).to(out.dtype)
    return out


# ----------------------------------------------------------------------------- registry
def _t(name, shape, dtype="float32"):
    return TensorSpec(name, dtype, tuple(shape))


PLUGINS: dict[str, PluginSpec] = {spec.op_type: spec for spec in (
    PluginSpec(
        "FirePrologue",
        inputs=(_t("z", ("N", "K")), _t("norm_weight", ("K",)), _t("w_down", ("R", "K"))),
        outputs=(_t("r", ("N", "R")),),
        attributes={"eps": float},
        extra_args=(("N", 0, 0), ("K", 0, 1), ("RANK", 2, 0)),
        kernel="fire_prologue_plugin",
        reference=fire_prologue_node_ref,
    ),
    PluginSpec(
        "FireInject",
        inputs=(_t("hidden", ("T", "d")), _t("rows", ("N",), "int32"), _t("r", ("N", "R")),
                _t("up", ("R", "d")), _t("scale", (1,))),
        outputs=(_t("hidden_out", ("T", "d")),),
        attributes={"layer": int},
        extra_args=(("N", 1, 0), ("RANK", 2, 1), ("DIM", 0, 1)),
        kernel="fire_inject_plugin",
        reference=fire_inject_node_ref,
        aliases={0: 0},
    ),
    PluginSpec(
        "FusionScores",
        inputs=(_t("q", ("B", "H", "d")), _t("x_img", ("Ni", "d")), _t("cu_img", ("B+1",), "int32"),
                _t("x_txt", ("Nt", "d")), _t("cu_txt", ("B+1",), "int32")),
        outputs=(_t("s_img", ("H", "Ni")), _t("s_txt", ("H", "Nt")), _t("row_max", ("B", 2, "H")),
                 _t("row_sum", ("B", 2, "H"))),
        attributes={"num_heads": int},
        extra_args=(("H", 0, 1), ("D", 0, 2), ("N_img", 1, 0), ("N_txt", 3, 0)),
        kernel="fusion_scores_plugin",
        reference=fusion_scores_ref,
    ),
    PluginSpec(
        "FusionPool",
        inputs=(_t("x_img", ("Ni", "d")), _t("cu_img", ("B+1",), "int32"), _t("s_img", ("H", "Ni")),
                _t("x_txt", ("Nt", "d")), _t("cu_txt", ("B+1",), "int32"), _t("s_txt", ("H", "Nt")),
                _t("row_max", ("B", 2, "H")), _t("row_sum", ("B", 2, "H")), _t("gate_logits", ("B", "H", 2))),
        outputs=(_t("x_mix", ("B", "H", "d")),),
        attributes={"num_heads": int},
        extra_args=(("H", 8, 1), ("D", 0, 1), ("N_img", 0, 0), ("N_txt", 3, 0)),
        kernel="fusion_pool_plugin",
        reference=fusion_pool_ref,
    ),
)}


def output_shapes(op_type: str, shapes: list) -> list[tuple]:
    """Output shapes of a plugin op from its input shapes (ints, or TensorRT dim expressions)."""
    if op_type == "FirePrologue":
        return [(shapes[0][0], shapes[2][0])]
    if op_type == "FireInject":
        return [tuple(shapes[0])]
    if op_type == "FusionScores":
        b, h = shapes[0][0], shapes[0][1]
        return [(h, shapes[1][0]), (h, shapes[3][0]), (b, 2, h), (b, 2, h)]
    if op_type == "FusionPool":
        return [(shapes[8][0], shapes[8][1], shapes[0][1])]
    raise KeyError(op_type)


# ------------------------------------------------------------------------------ checks
_ONNX_TYPES = {"float32": 1, "int32": 6}  # onnx.TensorProto.FLOAT / INT32
_ATTRIBUTE_TYPES = {float: 1, int: 2, str: 3}  # onnx.AttributeProto.FLOAT / INT / STRING


def plugin_nodes(proto) -> list:
    """The custom (``moon3rt`` domain) nodes of a ModelProto, in graph order."""
    return [n for n in proto.graph.node if n.domain == DOMAIN]


def check_plugin_graph(proto) -> dict[str, int]:
    """Check every custom node of a plugin graph against `PLUGINS`; returns {op_type: count}.

    Checked: domain and its opset import, op type, input/output counts, attribute names
    and types (including the TensorRT lookup attributes and their values), and the
    element type of every input/output the graph records a type for. Raises
    `PluginGraphError` listing every problem.
    """
    types = {v.name: v.type.tensor_type.elem_type for v in (*proto.graph.input, *proto.graph.value_info,
                                                           *proto.graph.output)}
    types.update({t.name: t.data_type for t in proto.graph.initializer})
    problems, counts = [], {}
    if plugin_nodes(proto) and not any(o.domain == DOMAIN for o in proto.opset_import):
        problems.append(f"the model does not import the {DOMAIN!r} opset")
    for node in proto.graph.node:
        if node.domain != DOMAIN:
            if node.op_type in PLUGINS:
                problems.append(f"node {node.name!r}: {node.op_type} in domain {node.domain!r}, expected {DOMAIN!r}")
            continue
        where = f"node {node.name!r} ({node.op_type})"
        spec = PLUGINS.get(node.op_type)
        if spec is None:
            problems.append(f"{where}: no such op in the plugin registry ({sorted(PLUGINS)})")
            continue
        counts[spec.op_type] = counts.get(spec.op_type, 0) + 1
        if len(node.input) != len(spec.inputs) or len(node.output) != len(spec.outputs):
            problems.append(f"{where}: {len(node.input)} inputs / {len(node.output)} outputs, expected "
                            f"{len(spec.inputs)} / {len(spec.outputs)}")
            continue
        attrs = {a.name: a for a in node.attribute}
        expected = {**{k: _ATTRIBUTE_TYPES[v] for k, v in spec.attributes.items()},
                    **{k: _ATTRIBUTE_TYPES[type(v)] for k, v in LOOKUP_ATTRIBUTES.items()}}
        if set(attrs) != set(expected):
            problems.append(f"{where}: attributes {sorted(attrs)}, expected {sorted(expected)}")
        for name, kind in expected.items():
            if name in attrs and attrs[name].type != kind:
                problems.append(f"{where}: attribute {name} has type {attrs[name].type}, expected {kind}")
        for name, value in LOOKUP_ATTRIBUTES.items():
            got = (attrs[name].s.decode() if isinstance(value, str) else attrs[name].i) if name in attrs else value
            if got != value:
                problems.append(f"{where}: {name}={got!r}, expected {value!r}")
        for tensor, spec_t in (*zip(node.input, spec.inputs), *zip(node.output, spec.outputs)):
            got = types.get(tensor)
            if got is not None and got != _ONNX_TYPES[spec_t.dtype]:
                problems.append(f"{where}: {spec_t.name} ({tensor!r}) has element type {got}, expected {spec_t.dtype}")
    if problems:
        raise PluginGraphError("plugin graph does not match the registry:\n  " + "\n  ".join(problems))
    return counts


def reference_evaluator(model):
    """An `onnx.reference.ReferenceEvaluator` for a plugin graph (path or ModelProto) in
    which each custom node runs its plain-torch reference from `PLUGINS`."""
    from onnx.reference import ReferenceEvaluator
    from onnx.reference.op_run import OpRun

    def op_class(spec: PluginSpec):
        def _run(self, *inputs, **attrs):
            tensors = [torch.from_numpy(np.array(x, copy=True)) for x in inputs]  # a writable copy
            kwargs = {k: attrs[k] for k in spec.attributes}
            out = spec.reference(*tensors, **kwargs)
            out = out if isinstance(out, tuple) else (out,)
            return tuple(o.numpy() for o in out)

        return type(spec.op_type, (OpRun,), {"op_domain": DOMAIN, "_run": _run})

    return ReferenceEvaluator(model, new_ops=[op_class(s) for s in PLUGINS.values()])
