"""16-bit GEMMs in an fp32 ONNX graph, for strongly typed TensorRT builds.

TensorRT-RTX builds strongly typed networks only: a layer computes in the types of its
inputs, so fp16/bf16 must be in the graph itself. The exported graph is fp32
(export/export_onnx.py); `lower_gemm_precision` makes every MatMul, Gemm and Conv
compute in 16 bits, as autocast does:

- float weights (initializers) feeding them are stored in the 16-bit type (half the
  engine's weight bytes); one used elsewhere too is copied, the fp32 one kept;
- their other float inputs get a Cast to the 16-bit type, their output a Cast back.

Everything else (norms, softmax, RoPE, masks, the custom plugin nodes) stays fp32, so
there is nothing to overflow outside the GEMMs; TensorRT fuses the casts into the
neighbouring kernels. The same pass serves full TensorRT, so both build the same
numerics from one graph.
"""

from __future__ import annotations

import numpy as np

GEMM_OPS = ("MatMul", "Gemm", "Conv")
PRECISIONS = ("fp32", "fp16", "bf16")


def _onnx_type(precision: str) -> int:
    from onnx import TensorProto

    return {"fp16": TensorProto.FLOAT16, "bf16": TensorProto.BFLOAT16}[precision]


def _convert(array: np.ndarray, precision: str):
    """A TensorProto of `array` (fp32) in the 16-bit type."""
    from onnx import helper, numpy_helper

    if precision == "fp16":
        return numpy_helper.from_array(array.astype(np.float16))
    # bf16: round to nearest even on the upper 16 bits of the fp32 pattern
    bits = np.ascontiguousarray(array, dtype=np.float32).view(np.uint32)
    rounded = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype(np.uint16)
    tensor = helper.make_tensor("", _onnx_type("bf16"), array.shape, rounded.tobytes(), raw=True)
    return tensor


def lower_gemm_precision(proto, precision: str):
    """`proto` (fp32 ModelProto, changed in place and returned) with 16-bit GEMMs; fp32 is a no-op."""
    from onnx import TensorProto, helper, numpy_helper

    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    if precision == "fp32":
        return proto
    low = _onnx_type(precision)
    graph = proto.graph
    inits = {t.name: t for t in graph.initializer}
    users: dict[str, int] = {}
    for node in graph.node:
        for name in node.input:
            users[name] = users.get(name, 0) + 1
    converted: dict[str, str] = {}  # fp32 initializer -> its 16-bit copy
    nodes = []
    for node in graph.node:
        if node.op_type not in GEMM_OPS:
            nodes.append(node)
            continue
        inputs = list(node.input)
        for i, name in enumerate(inputs):
            if not name:
                continue
            init = inits.get(name)
            if init is not None:
                if init.data_type != TensorProto.FLOAT:
                    continue
                if name not in converted:
                    tensor = _convert(numpy_helper.to_array(init), precision)
                    if users[name] == 1:  # only this GEMM reads it: convert in place
                        tensor.name = name
                        init.CopyFrom(tensor)
                        converted[name] = name
                    else:
                        tensor.name = f"{name}.{precision}"
                        graph.initializer.append(tensor)
                        converted[name] = tensor.name
                inputs[i] = converted[name]
            else:
                cast_out = f"{name}.{node.name or node.op_type}.{precision}"
                nodes.append(helper.make_node("Cast", [name], [cast_out], to=low, name=f"{cast_out}.cast"))
                inputs[i] = cast_out
        out = node.output[0]
        low_out = f"{out}.{precision}"
        del node.input[:]
        node.input.extend(inputs)
        node.output[0] = low_out
        nodes.append(node)
        nodes.append(helper.make_node("Cast", [low_out], [out], to=TensorProto.FLOAT, name=f"{low_out}.cast"))
    del graph.node[:]
    graph.node.extend(nodes)
    # a recorded fp32 type of an initializer now stored in 16 bits would contradict it
    kept = [v for v in graph.value_info if v.name not in converted]
    del graph.value_info[:]
    graph.value_info.extend(kept)
    return proto
