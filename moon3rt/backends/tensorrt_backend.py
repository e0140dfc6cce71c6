"""TensorRT backend: the model exported to ONNX, built into an engine once, run on CUDA.

On first use the model is exported (`moon3rt.export.export_onnx`, the standard graph, or
the plugin graph with MOON3RT_TRT_PLUGINS=1) and built (`moon3rt.export.build_engine`)
into ``$MOON3RT_CACHE/tensorrt/<hash>/``; the hash covers the config, every weight and
the export and build code (for the plugin graph also the plugin and ahead-of-time
compiler code, the kernels it compiles and the triton version), and the engine file name
the TensorRT flavour and version, the GPU's compute capability, the precision and the
graph, so a cached engine is reused only where it was built for. The timing cache beside
it is named by flavour, version and compute capability. The engine is built on the
model's device. Inputs and outputs are torch CUDA tensors on the model's
device and the engine runs on torch's current stream.

Settings (environment, since `moon3rt.load` passes only the backend's name):
MOON3RT_TRT_PRECISION fp32|fp16|bf16 (default: the model's dtype), MOON3RT_TRT_PLUGINS=1,
MOON3RT_TRT_MAX_TOKENS (default 8192: T and P of the widest profile), MOON3RT_TRT_MAX_ITEMS
(default 64). Batches are grouped by length as for onnxruntime (the graph's attention is
per segment, padded: `moon3rt.batching.attention_buckets`), then cut to those limits.

Needs a CUDA device and TensorRT: full TensorRT (``import tensorrt``) or TensorRT-RTX
(``import tensorrt_rtx``, which cannot target Hopper and builds only the standard graph).
"""

from __future__ import annotations

import hashlib
import inspect
import json
import os
import shutil
import tempfile
import threading
from pathlib import Path

import numpy as np
import torch

from ..batching import attention_buckets, segment_lengths, take_items
from ..model import Moon3Model, PackedBatch
from .onnxruntime_backend import DEFAULT_MAX_CELLS, cache_root, model_digest

INSTALL_HINT = ("install full TensorRT (pip install tensorrt-cu12 or tensorrt-cu13; import tensorrt) or "
                "TensorRT-RTX (pip install tensorrt-rtx-cu13; import tensorrt_rtx)")
DTYPE_PRECISION = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}


def require_cuda(device: torch.device) -> None:
    if device.type != "cuda":
        raise ValueError(f"backend='tensorrt' runs engines on a CUDA device, not {device.type!r}; "
                         "use device='cuda' (or backend='onnxruntime' on a CPU)")
    if not torch.cuda.is_available():
        raise RuntimeError("backend='tensorrt' needs a CUDA device and torch sees none "
                           "(check the driver and that torch is a CUDA build)")


def require_tensorrt():
    """(module, flavour) of the TensorRT that is installed, or an ImportError naming both."""
    from ..export.build_engine import TensorRTNotFound, import_tensorrt

    try:
        return import_tensorrt()
    except TensorRTNotFound as err:
        raise ImportError(f"backend='tensorrt' needs TensorRT's Python bindings: {INSTALL_HINT}\n{err}") from None


def torch_dtype(trt, trt_dtype) -> torch.dtype:
    """torch dtype of a TensorRT tensor type."""
    table = {trt.float32: torch.float32, trt.float16: torch.float16, trt.bfloat16: torch.bfloat16,
             trt.int32: torch.int32, trt.int64: torch.int64, trt.bool: torch.bool, trt.int8: torch.int8}
    return table[trt_dtype]


def batch_sizes(inputs: dict[str, np.ndarray]) -> dict[str, int]:
    """The dynamic dims {T, B, L, P, N, S} of one set of graph inputs (P, N, S only with
    pixel inputs)."""
    sizes = {"T": int(inputs["input_ids"].shape[0]), "B": int(inputs["pool_index"].shape[0]),
             "L": int(inputs["item_tokens"].shape[1])}
    if "pixel_values" in inputs:
        sizes["P"] = int(inputs["pixel_values"].shape[0])
        sizes["N"], sizes["S"] = (int(n) for n in inputs["image_patches"].shape)
    return sizes


def prepare_bindings(inputs: dict[str, np.ndarray], engine_inputs: dict[str, torch.dtype],
                     device: torch.device) -> dict[str, torch.Tensor]:
    """Graph inputs as contiguous tensors on `device` in the engine's dtypes, for exactly
    the engine's inputs (a graph without MHMF has no title_mask). Raises on a missing input
    or a value the engine's dtype cannot hold."""
    missing = sorted(set(engine_inputs) - set(inputs))
    if missing:
        raise ValueError(f"the engine takes inputs {missing} that the batch does not provide")
    out = {}
    for name, dtype in engine_inputs.items():
        value = inputs[name]
        if dtype == torch.int32 and value.size and np.abs(value).max() > np.iinfo(np.int32).max:
            raise ValueError(f"input {name} has values past int32, which the engine's {name} cannot hold")
        out[name] = torch.from_numpy(np.ascontiguousarray(value)).to(device=device, dtype=dtype).contiguous()
    return out


def split_for_engine(batch: PackedBatch, max_tokens: int, max_items: int, merge: int,
                     max_cells: int = DEFAULT_MAX_CELLS) -> list[list[int]]:
    """Item indices of the parts a batch runs in: grouped by length (`attention_buckets`,
    the graph's attention is per segment, padded), each within the engine's T and P range
    (decoder tokens plus patches at most `max_tokens`) and item count."""
    tokens, images = segment_lengths(batch, merge)
    parts = []
    for group in attention_buckets(tokens, images, max_cells):
        part, total = [], 0
        for b in group:
            cost = tokens[b] + sum(images[b])
            if part and (total + cost > max_tokens or len(part) >= max_items):
                parts.append(part)
                part, total = [], 0
            part.append(b)
            total += cost
        parts.append(part)
    return parts


def engine_sources(plugins: bool) -> list[Path]:
    """The source files, beyond `model_digest`'s, that shape an engine: the precision pass
    and the build, and for the plugin graph its nodes, their TensorRT plugins, the Triton
    adapters, the ahead-of-time compiler and the kernels compiled into the engine as PTX."""
    from ..export import build_engine, precision

    modules = [build_engine, precision]
    if plugins:
        from ..export import plugin_kernels, plugin_model, triton_aot, trt_plugins
        from ..export import plugins as plugin_specs
        from ..kernels import fire, fusion_attention

        modules += [plugin_model, plugin_specs, plugin_kernels, trt_plugins, triton_aot, fire, fusion_attention]
    return [Path(inspect.getfile(module)) for module in modules]


def engine_digest(model: Moon3Model, plugins: bool) -> str:
    """`model_digest` plus `engine_sources`, and for the plugin graph the triton version
    (it compiles the plugin kernels stored in the engine)."""
    h = hashlib.blake2b(model_digest(model).encode(), digest_size=16)
    for path in engine_sources(plugins):
        h.update(path.read_bytes())
    if plugins:
        import triton

        h.update(f"triton {triton.__version__}".encode())
    return h.hexdigest()


def engine_files(flavour: str, version: str, cc: int, precision: str, graph: str) -> tuple[str, str]:
    """(engine, timing cache) file names: an engine and its timing cache are only reused by
    the TensorRT flavour and version and on the compute capability that made them."""
    stem = f"{flavour}-{version}-sm{cc}"
    return f"{stem}-{precision}-{graph}.engine", f"{stem}.timing.cache"


class TensorRTBackend:
    name = "tensorrt"

    def __init__(self, model: Moon3Model, device: torch.device, cache_dir: str | os.PathLike | None = None):
        self.device = torch.device(device)
        require_cuda(self.device)
        self.trt, self.flavour = require_tensorrt()
        self.model = model
        self.cache_dir = Path(cache_dir) if cache_dir is not None else None
        dtype = next(model.parameters()).dtype
        self.precision = os.environ.get("MOON3RT_TRT_PRECISION") or DTYPE_PRECISION.get(dtype, "fp32")
        self.plugins = os.environ.get("MOON3RT_TRT_PLUGINS", "0") == "1"
        self.max_batch_tokens = int(os.environ.get("MOON3RT_TRT_MAX_TOKENS", "8192"))
        self.max_batch_items = int(os.environ.get("MOON3RT_TRT_MAX_ITEMS", "64"))
        self.engine_path: Path | None = None
        self._engine = self._context = self._profiles = None
        self._lock = threading.Lock()

    # ---------------------------------------------------------------- build and load
    def _compute_capability(self) -> int:
        major, minor = torch.cuda.get_device_capability(self.device)
        return major * 10 + minor

    def _build(self) -> Path:
        from ..export.build_engine import build_engine
        from ..export.export_onnx import export_onnx

        cc = self._compute_capability()
        graph = "plugins" if self.plugins else "standard"
        target = (self.cache_dir or cache_root() / "tensorrt") / engine_digest(self.model, self.plugins)
        engine_name, cache_name = engine_files(self.flavour, self.trt.__version__, cc, self.precision, graph)
        engine = target / engine_name
        if engine.exists() and engine.with_name(engine.name + ".json").exists():  # the sidecar is written last
            return engine
        target.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=".build-", dir=target))
        try:
            onnx_path = export_onnx(self.model, staging / "model.onnx", plugins=self.plugins,
                                    max_batch_tokens=self.max_batch_tokens, max_batch_items=self.max_batch_items)
            build_engine(onnx_path, staging / engine.name, self.precision, profiles=2,
                         timing_cache=target / cache_name, compute_capability=[cc], flavour=self.flavour,
                         device=self.device)
            for suffix in ("", ".json"):
                os.replace(staging / (engine.name + suffix), engine.with_name(engine.name + suffix))
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        return engine

    def engine(self):
        """(engine, execution context), building the engine first if the cache lacks it."""
        with self._lock:
            if self._engine is None:
                self.engine_path = self._build()
                meta = json.loads(self.engine_path.with_name(self.engine_path.name + ".json").read_text())
                self._profiles = [{k: tuple(v) for k, v in p.items()} for p in meta["profiles"]]
                runtime = self.trt.Runtime(self.trt.Logger(self.trt.Logger.WARNING))
                self._engine = runtime.deserialize_cuda_engine(self.engine_path.read_bytes())
                if self._engine is None:
                    raise RuntimeError(f"TensorRT could not load {self.engine_path}; delete it to rebuild")
                self._context = self._engine.create_execution_context()
            return self._engine, self._context

    # --------------------------------------------------------------------------- run
    def _io(self, engine):
        inputs, outputs = {}, []
        for i in range(engine.num_io_tensors):
            name = engine.get_tensor_name(i)
            if engine.get_tensor_mode(name) == self.trt.TensorIOMode.INPUT:
                inputs[name] = torch_dtype(self.trt, engine.get_tensor_dtype(name))
            else:
                outputs.append(name)
        return inputs, outputs

    @torch.inference_mode()
    def embed(self, batch: PackedBatch) -> torch.Tensor:
        """Un-normalised vectors (B, output_dim), float32, on the model's CUDA device."""
        from ..export.build_engine import select_profile
        from ..export.onnx_model import OUTPUT, export_inputs

        engine, context = self.engine()
        engine_inputs, _ = self._io(engine)
        cfg, stream = self.model.cfg, torch.cuda.current_stream(self.device)

        def run(part: PackedBatch) -> torch.Tensor:
            inputs = export_inputs(part, cfg, vision="pixel_values" in engine_inputs)
            profile = select_profile(self._profiles, batch_sizes(inputs))
            bindings = prepare_bindings(inputs, engine_inputs, self.device)
            context.set_optimization_profile_async(profile, stream.cuda_stream)
            for name, tensor in bindings.items():
                context.set_input_shape(name, tuple(tensor.shape))
                context.set_tensor_address(name, tensor.data_ptr())
            out = torch.empty(tuple(context.get_tensor_shape(OUTPUT)), dtype=torch.float32, device=self.device)
            context.set_tensor_address(OUTPUT, out.data_ptr())
            if not context.execute_async_v3(stream.cuda_stream):
                raise RuntimeError(f"TensorRT failed to run {self.engine_path} on a batch of {part.num_items} items")
            return out

        merge = cfg.vision.spatial_merge_size
        groups = split_for_engine(batch, self.max_batch_tokens, self.max_batch_items, merge)
        if len(groups) == 1 and groups[0] == list(range(batch.num_items)):
            return run(batch)
        out = torch.empty(batch.num_items, cfg.output_dim, dtype=torch.float32, device=self.device)
        for group in groups:
            out[torch.tensor(group, device=self.device)] = run(take_items(batch, group, merge))
        return out
