"""Export a moon3rt model to ONNX: the whole forward (vision tower, decoder, FIRE, MHMF,
pooling, projection) as one graph of standard ops: attention per segment in a padded
(segments, L) layout, everything else packed (export/onnx_model.py).

    python export/export_onnx.py --model moon3-tiny --out model.onnx [--verify]
    python export/export_onnx.py --model moon3-tiny --out attn.onnx --attention-op   # opset-23 Attention

Writes ``model.onnx`` (``model.onnx.data`` too when the weights pass protobuf's 2 GiB)
and a sidecar ``model.json`` with the input names, dtypes, symbolic shapes and the dims'
ranges; the graph's metadata_props carry the same ranges (``moon3rt.dims``) and config.

Exporter: torch's TorchScript-based one (``torch.onnx.export(..., dynamo=False)``,
deprecated since torch 2.9 but present). It needs only the ``onnx`` package, so it runs
where ``onnxscript`` is missing; the torch.export-based exporter (``dynamo=True``, the
torch default since 2.9) also handles this loop-free graph, with the same inputs and
results, but adds onnxscript as a dependency and exports about ten times slower.

Precision: the graph is always fp32. A bf16/fp16 model is exported from an fp32 copy
of its weights (an exact upcast), so the graph computes what the model's weights
define, in fp32. ONNX Runtime's CPU provider lacks bf16 kernels for most of these ops;
on a GPU, lower precision is a build-time choice (TensorRT's fp16/bf16 flags, or an
fp16 conversion of this graph), not a second export.
"""

from __future__ import annotations

import argparse
import copy
import importlib.metadata
import inspect
import json
import os
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

from moon3rt.checkpoint import load_model
from moon3rt.config import PRESETS, Moon3Config
from moon3rt.export.onnx_model import ATTENTION, OUTPUT, OnnxMoon3, example_batch, export_inputs
from moon3rt.model import Moon3Model, PackedBatch, random_model

DEFAULT_OPSET = 17
OPSETS = range(12, 21)  # opset 11 has no int64 Clip; 20 is the TorchScript exporter's newest
ATTENTION_OPSET = 23  # the first with the Attention op (attention="onnx")
DEFAULT_MAX_BATCH_TOKENS = 16384  # the API's default budget (decoder tokens + patches per batch)
DEFAULT_MAX_BATCH_ITEMS = 64
PROTOBUF_LIMIT = 2**31 - 2**26  # weights past this go to an external .data file (protobuf caps a message at 2 GiB)
DIM_AXES = {
    "input_ids": {0: "T"}, "position_ids": {1: "T"}, "token_slot": {0: "T"}, "item_tokens": {0: "B", 1: "L"},
    "item_mask": {0: "B", 1: "L"}, "title_mask": {0: "T"}, "pool_index": {0: "B"}, "pixel_values": {0: "P"},
    "patch_slot": {0: "P"}, "image_patches": {0: "N", 1: "S"}, "image_mask": {0: "N", 1: "S"},
    "patch_pos": {0: "P"}, OUTPUT: {0: "B"},
}
MEANINGS = {
    "input_ids": "packed token ids",
    "position_ids": "M-RoPE t/h/w positions (equal rows for 1-D positions)",
    "token_slot": "slot b*L + l of every token (the l-th token of item b)",
    "item_tokens": "packed index of the token in each item slot (0 in padding slots)",
    "item_mask": "true for the item slots that hold a token",
    "title_mask": "true for title tokens (MHMF's text modality)",
    "pool_index": "packed index of each item's pooling token",
    "pixel_values": "all images' patches, merge windows grouped (Qwen2-VL processor order)",
    "patch_slot": "slot n*S + s of every patch (the s-th patch of image n)",
    "image_patches": "packed index of the patch in each image slot (0 in padding slots)",
    "image_mask": "true for the image slots that hold a patch",
    "patch_pos": "row and column of every patch in its image",
    OUTPUT: "un-normalised embeddings (Moon3Model.forward)",
}


class ExportError(ValueError):
    """A model or option that cannot be exported; the message says what and why."""


def resolve_model(model_or_preset: Moon3Model | str | os.PathLike, seed: int = 0) -> Moon3Model:
    """A `Moon3Model`, a preset name (random weights from `seed`) or a checkpoint directory."""
    if isinstance(model_or_preset, Moon3Model):
        return model_or_preset
    name = os.fspath(model_or_preset)
    if name in PRESETS and not Path(name).is_dir():
        return random_model(Moon3Config.from_name(name), seed=seed)
    if Path(name).is_dir():
        return load_model(name)
    raise ExportError(f"model {name!r} is neither a preset ({sorted(PRESETS)}) nor a checkpoint directory")


def fp32_model(model: Moon3Model) -> Moon3Model:
    """The model itself when it is fp32, else an fp32 copy of its weights on the same device."""
    if all(p.dtype == torch.float32 for p in model.parameters()):
        return model
    # copy the module tree with hollow (meta) parameters, then fill it with upcast weights:
    # whatever optional modules the model has, the copy has too, and nothing is held twice
    hollow = {id(p): nn.Parameter(torch.empty_like(p, device="meta"), requires_grad=False)
              for p in model.parameters()}
    twin = copy.deepcopy(model, hollow)
    twin.load_state_dict({k: v.detach().float() for k, v in model.state_dict().items()}, assign=True)
    return twin.eval()


def dim_ranges(cfg: Moon3Config, vision: bool, max_batch_tokens: int, max_batch_items: int) -> dict:
    """min/opt/max of the dynamic dims. The batcher's budget counts decoder tokens plus
    patches, so T and P each stay within it (an item over the budget alone forms its own
    batch); L (slots per item) and S (slots per image) are at most one segment of T or P,
    S also at most the patches of the largest image the preprocessing makes."""
    merge2 = cfg.vision.spatial_merge_size**2
    t_opt, b_opt = max(1, max_batch_tokens // 4), max(1, min(16, max_batch_items))
    dims = {
        "T": {"min": 1, "opt": t_opt, "max": max_batch_tokens},
        "B": {"min": 1, "opt": b_opt, "max": max_batch_items},
        "L": {"min": 1, "opt": max(1, t_opt // b_opt), "max": max_batch_tokens},
    }
    if vision:
        s_max = max(merge2, min(max_batch_tokens, cfg.max_pixels // cfg.vision.patch_size**2))
        dims["P"] = {"min": merge2, "opt": max(merge2, t_opt), "max": max(merge2, max_batch_tokens)}
        dims["N"] = {"min": 1, "opt": b_opt, "max": max(1, max_batch_tokens // merge2)}
        dims["S"] = {"min": merge2, "opt": min(s_max, max(merge2, t_opt // b_opt)), "max": s_max}
    return dims


def describe_inputs(example: dict[str, np.ndarray]) -> list[dict]:
    out = []
    for name, value in example.items():
        axes = DIM_AXES[name]
        shape = [axes.get(i, int(n)) for i, n in enumerate(value.shape)]
        out.append({"name": name, "dtype": str(value.dtype), "shape": shape, "meaning": MEANINGS[name]})
    return out


def export_onnx(
    model_or_preset: Moon3Model | str | os.PathLike,
    path: str | os.PathLike,
    opset: int | None = None,
    *,
    vision: bool = True,
    seed: int = 0,
    max_batch_tokens: int = DEFAULT_MAX_BATCH_TOKENS,
    max_batch_items: int = DEFAULT_MAX_BATCH_ITEMS,
    dynamo: bool = False,
    plugins: bool = False,
    attention: str = "ops",
) -> Path:
    """Export to `path` (ONNX, fp32) plus its sidecar ``<stem>.json``; returns `path`.

    vision=False exports the text-only graph (no pixel inputs, no vision weights).
    plugins=True exports the plugin graph: the same inputs and output, with FIRE and MHMF
    as ``moon3rt`` custom nodes for TensorRT plugins (export/plugins.py); it needs the
    TorchScript-based exporter (dynamo=False).
    dynamo=True uses torch's torch.export-based exporter instead (needs onnxscript; opset
    18 or newer); it gives the same inputs and results, about ten times slower to export.
    attention="onnx" writes every attention as one ``Attention`` node of opset 23 (the
    graph's opset; onnxruntime >= 1.23 runs it on CPU) instead of standard ops; it needs
    the TorchScript-based exporter and the standard graph (no plugins).
    opset: default 17 (23 with attention="onnx").
    Raises `ExportError` for an unsupported opset or model.
    """
    try:
        import onnx
    except ImportError:
        raise ImportError("exporting to ONNX needs the onnx package: pip install 'moon3rt[onnx]'") from None

    if attention not in ATTENTION:
        raise ExportError(f"attention must be one of {ATTENTION}, got {attention!r}")
    if attention == "onnx":
        opset = ATTENTION_OPSET if opset is None else opset
        if opset != ATTENTION_OPSET:
            raise ExportError(f"attention='onnx' writes opset {ATTENTION_OPSET} (the Attention op), not {opset}")
        if dynamo or plugins:
            raise ExportError("attention='onnx' needs the TorchScript-based exporter and the standard graph "
                              "(no dynamo, no plugins)")
    else:
        opset = DEFAULT_OPSET if opset is None else opset
        if opset not in OPSETS:
            raise ExportError(f"opset {opset} is not supported: use {OPSETS.start}..{OPSETS.stop - 1}")
    if dynamo and plugins:
        raise ExportError("the plugin graph needs the TorchScript-based exporter (dynamo=False)")
    if dynamo:
        if opset < 18:
            raise ExportError(f"the dynamo exporter writes opset 18 or newer, not {opset}")
        try:
            import onnxscript  # noqa: F401
        except ImportError:
            raise ExportError("the dynamo exporter needs onnxscript: pip install onnxscript") from None
    if max_batch_tokens < 1 or max_batch_items < 1:
        raise ExportError(f"max_batch_tokens and max_batch_items must be positive, got "
                          f"{max_batch_tokens}, {max_batch_items}")
    source = resolve_model(model_or_preset, seed)
    cfg = source.cfg
    cfg.validate()
    if any(p.device.type == "meta" for p in source.parameters()):
        raise ExportError("the model has weights on the meta device; load or initialise them before exporting")
    source_dtype = next(source.parameters()).dtype
    model = fp32_model(source)
    device = next(model.parameters()).device
    if plugins:
        from moon3rt.export.plugin_model import PluginMoon3

        wrapper = PluginMoon3(model, vision=vision).eval()
    else:
        wrapper = OnnxMoon3(model, vision=vision, attention=attention).eval()

    batch = example_batch(cfg)
    if not vision:
        batch = _text_part(batch)
    example = export_inputs(batch, cfg, vision=vision)
    args = tuple(torch.from_numpy(example[name]).to(device) for name in wrapper.input_names)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # the Attention node is written by the TorchScript exporter at its newest opset (20), whose
    # other ops are unchanged up to 23 (newer versions only add types), then the import is raised
    proto = _trace(wrapper, args, path.parent, OPSETS.stop - 1 if attention == "onnx" else opset, dynamo)
    if attention == "onnx":
        _raise_default_opset(proto, opset)
    if plugins:
        from moon3rt.export.plugins import check_plugin_graph

        check_plugin_graph(proto)
        width = proto.graph.output[0].type.tensor_type.shape.dim[1]  # torch cannot infer it past custom nodes
        width.Clear()
        width.dim_value = cfg.output_dim
    names = [i.name for i in proto.graph.input]  # the inputs the graph uses (unused ones are dropped)
    dims = dim_ranges(cfg, vision, max_batch_tokens, max_batch_items)
    inputs = describe_inputs({name: example[name] for name in names})
    sidecar = {
        "format": "moon3rt-onnx/1",
        "graph": ("full" if vision else "text-only") + ("+plugins" if plugins else "")
                 + ("+attention-op" if attention == "onnx" else ""),
        "attention": attention,
        "model_file": path.name,
        "opset": opset,
        "exporter": f"torch.onnx.export(dynamo={dynamo}), torch {torch.__version__}",
        "moon3rt_version": _version(),
        "dtype": "float32",
        "source_dtype": str(source_dtype).removeprefix("torch."),
        "inputs": inputs,
        "outputs": [{"name": OUTPUT, "dtype": "float32", "shape": ["B", cfg.output_dim], "meaning": MEANINGS[OUTPUT]}],
        "dims": dims,
        "limits": {
            "max_text_tokens": cfg.max_text_tokens,
            "max_patches_per_image": cfg.max_pixels // cfg.vision.patch_size**2,
            "max_position_embeddings": cfg.text.max_position_embeddings,
        },
        "image_token_id": cfg.image_token_id,
        "spatial_merge_size": cfg.vision.spatial_merge_size,
        "pooling": cfg.pooling,
        "output_dim": cfg.output_dim,
        "config": cfg.to_dict(),
    }
    props = {
        "moon3rt.format": sidecar["format"], "moon3rt.graph": sidecar["graph"],
        "moon3rt.dims": json.dumps(dims), "moon3rt.inputs": json.dumps(inputs),
        "moon3rt.limits": json.dumps(sidecar["limits"]), "moon3rt.source_dtype": sidecar["source_dtype"],
        "moon3rt.output_dim": str(cfg.output_dim), "moon3rt.config": json.dumps(sidecar["config"]),
    }
    for key, value in props.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    proto.producer_name = "moon3rt"
    data = path.with_name(path.name + ".data")
    data.unlink(missing_ok=True)
    if sum(len(t.raw_data) for t in proto.graph.initializer) >= PROTOBUF_LIMIT:
        onnx.save(proto, str(path), save_as_external_data=True, all_tensors_to_one_file=True, location=data.name)
    else:
        onnx.save(proto, str(path))
    onnx.checker.check_model(str(path))  # by path, so a model with external data is checked too
    path.with_suffix(".json").write_text(json.dumps(sidecar, indent=2) + "\n")
    return path


def _trace(wrapper: OnnxMoon3, args: tuple, workdir: Path, opset: int, dynamo: bool = False):
    """Run torch's exporter in a scratch directory and return the loaded ModelProto.

    Past 2 GiB of weights the exporters write external tensor files next to the model;
    loading them back lets `export_onnx` write one ``.data`` file of its own.
    """
    import onnx

    names = list(wrapper.input_names)
    with tempfile.TemporaryDirectory(prefix=".moon3rt-export-", dir=workdir) as scratch:
        traced = Path(scratch) / "model.onnx"
        with warnings.catch_warnings(), torch.no_grad():
            warnings.filterwarnings("ignore", category=DeprecationWarning)  # the TorchScript exporter's notice
            warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
            if dynamo:
                warnings.filterwarnings("ignore", message=".*axis name.*will not be used")
                warnings.filterwarnings("ignore", category=FutureWarning)
                # torch.export specialises sizes 0 and 1, so T and P start at 2 (B's example is 2)
                dims = {"T": torch.export.Dim("T", min=2), "B": torch.export.Dim("B", min=1),
                        "L": torch.export.Dim("L", min=2), "P": torch.export.Dim("P", min=2),
                        "N": torch.export.Dim("N", min=1), "S": torch.export.Dim("S", min=2)}
                shapes = {n: {axis: dims[d] for axis, d in DIM_AXES[n].items()} for n in names}
                program = torch.onnx.export(wrapper, args, dynamo=True, opset_version=opset, input_names=names,
                                            output_names=[OUTPUT], dynamic_shapes=shapes, verbose=False)
                program.save(str(traced))
            else:
                # torch < 2.5 has no `dynamo` argument and only the TorchScript exporter
                legacy = {"dynamo": False} if "dynamo" in inspect.signature(torch.onnx.export).parameters else {}
                torch.onnx.export(
                    wrapper, args, str(traced), **legacy, opset_version=opset, input_names=names,
                    output_names=[OUTPUT], dynamic_axes={n: DIM_AXES[n] for n in (*names, OUTPUT)},
                    do_constant_folding=True, **_custom_opsets(wrapper),
                )
        return onnx.load(str(traced))  # reads any external tensors into the proto


def _raise_default_opset(proto, opset: int) -> None:
    for entry in proto.opset_import:
        if entry.domain in ("", "ai.onnx"):
            entry.version = opset


def _custom_opsets(wrapper: OnnxMoon3) -> dict:
    """The plugin graph imports the ``moon3rt`` opset for its custom nodes."""
    if type(wrapper) is OnnxMoon3:
        return {}
    from moon3rt.export.plugins import DOMAIN, VERSION

    return {"custom_opsets": {DOMAIN: int(VERSION)}}


def _text_part(batch: PackedBatch) -> PackedBatch:
    """The text-only items of `example_batch` (the last one) as a batch of their own."""
    start, end = batch.cu_seqlens[-2:].tolist()
    t0 = batch.cu_titles[-2].item()
    return PackedBatch(
        input_ids=batch.input_ids[start:end], position_ids=batch.position_ids[:, start:end],
        cu_seqlens=torch.tensor([0, end - start], dtype=torch.int32), pool_index=batch.pool_index[-1:] - start,
        title_index=batch.title_index[t0:] - start, cu_titles=torch.tensor([0, len(batch.title_index) - t0],
                                                                            dtype=torch.int32),
        cu_images=torch.zeros(2, dtype=torch.int32),
    )


def _version() -> str:
    try:
        return importlib.metadata.version("moon3rt")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def compare_with_torch(path: str | os.PathLike, model: Moon3Model, batch: PackedBatch,
                       vision: bool = True) -> tuple[float, float]:
    """(max abs error, min cosine) of onnxruntime (CPU) against `Moon3Model.forward` on `batch`.

    A plugin graph runs in onnx's reference evaluator instead, each custom node replaced
    by its plain-torch reference (`moon3rt.export.plugins.reference_evaluator`)."""
    import onnx
    import onnxruntime
    from moon3rt.export.plugins import plugin_nodes, reference_evaluator

    inputs = export_inputs(batch, model.cfg, vision=vision)
    proto = onnx.load(str(path))
    if plugin_nodes(proto):
        evaluator = reference_evaluator(proto)
        got = evaluator.run([OUTPUT], {name: inputs[name] for name in evaluator.input_names})[0]
    else:
        session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        got = session.run([OUTPUT], {i.name: inputs[i.name] for i in session.get_inputs()})[0]
    with torch.no_grad():
        ref = model(batch).float().cpu().numpy()
    cos = (got * ref).sum(-1) / (np.linalg.norm(got, axis=-1) * np.linalg.norm(ref, axis=-1))
    return float(np.abs(got - ref).max()), float(cos.min())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="moon3-tiny", help="preset name or checkpoint directory")
    parser.add_argument("--out", default="model.onnx", help="output .onnx path (a .json sidecar goes beside it)")
    parser.add_argument("--opset", type=int, help=f"ONNX opset (default {DEFAULT_OPSET}; {ATTENTION_OPSET} with "
                                                      "--attention-op)")
    parser.add_argument("--text-only", action="store_true", help="export the graph without vision inputs")
    parser.add_argument("--seed", type=int, default=0, help="weights seed for a preset")
    parser.add_argument("--max-batch-tokens", type=int, default=DEFAULT_MAX_BATCH_TOKENS,
                        help="upper bound of T and P recorded in the metadata")
    parser.add_argument("--max-batch-items", type=int, default=DEFAULT_MAX_BATCH_ITEMS,
                        help="upper bound of B recorded in the metadata")
    parser.add_argument("--dynamo", action="store_true",
                        help="use torch's torch.export-based exporter (needs onnxscript; --opset 18 or newer)")
    parser.add_argument("--plugins", action="store_true",
                        help="export the plugin graph: FIRE and MHMF as moon3rt custom nodes (TensorRT plugins)")
    parser.add_argument("--attention-op", action="store_true",
                        help=f"write each attention as one opset-{ATTENTION_OPSET} Attention node (onnxruntime >= 1.23) "
                             "instead of standard ops")
    parser.add_argument("--verify", action="store_true", help="compare onnxruntime with torch on a synthetic batch")
    args = parser.parse_args(argv)
    try:
        model = resolve_model(args.model, args.seed)
        start = time.perf_counter()
        path = export_onnx(model, args.out, args.opset, vision=not args.text_only, seed=args.seed,
                           max_batch_tokens=args.max_batch_tokens, max_batch_items=args.max_batch_items,
                           dynamo=args.dynamo, plugins=args.plugins,
                           attention="onnx" if args.attention_op else "ops")
    except (ExportError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    size = sum(f.stat().st_size for f in path.parent.glob(path.name + "*"))
    sidecar = json.loads(path.with_suffix(".json").read_text())
    print(f"wrote {path} ({size / 2**20:.1f} MiB, {time.perf_counter() - start:.1f} s, opset {sidecar['opset']}, "
          f"{sidecar['graph']} graph) and {path.with_suffix('.json')}")
    for spec in sidecar["inputs"]:
        print(f"  {spec['name']:<14} {spec['dtype']:<8} {spec['shape']}")
    print("  dims " + ", ".join(f"{k} {v['min']}..{v['max']}" for k, v in sidecar["dims"].items()))
    if args.verify:
        batch = example_batch(model.cfg)
        err, cos = compare_with_torch(path, fp32_model(model), batch if not args.text_only else _text_part(batch),
                                      vision=not args.text_only)
        runner = "reference evaluator (custom nodes by their torch references)" if args.plugins else "onnxruntime"
        print(f"{runner} vs torch on a synthetic batch: max abs error {err:.2e}, min cosine {cos:.7f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
