"""Build a serialized TensorRT engine from an exported moon3rt ONNX graph.

    python export/build_engine.py --onnx model.onnx --engine model.engine --precision bf16

On an H100 (full TensorRT, sm_90, FIRE and MHMF as plugins running moon3rt's kernels):

    pip install tensorrt-cu12        # or tensorrt-cu13; 10.9 or newer
    python export/export_onnx.py --model CHECKPOINT --out plugins.onnx --plugins
    python export/build_engine.py --onnx plugins.onnx --precision bf16 --profiles 2 --timing-cache trt.cache

Two TensorRT flavours, found by import:

- Full TensorRT (``import tensorrt``; ``pip install tensorrt-cu12`` or ``tensorrt-cu13``,
  10.9 or newer for the plugins). Builds on, and for, the GPU present: on an H100 that
  is sm_90. It builds both graphs; the plugin graph (``export_onnx.py --plugins``) needs
  it, because its FIRE and MHMF nodes become TensorRT plugins whose kernels are moon3rt's
  Triton kernels compiled to PTX for that GPU at build time (export/trt_plugins.py).
  A timing cache file makes rebuilds fast (one from another TensorRT version or GPU is
  replaced by a fresh one, with a warning).
- TensorRT-RTX (``import tensorrt_rtx``; ``pip install tensorrt-rtx-cu13``, ~100 MB).
  Builds the standard-ops graph without any GPU, for the compute capabilities named
  with --compute-capability (TensorRT-RTX 1.7 knows 75, 80, 86, 89, 120, 121: RTX and
  Ampere-class GPUs, not Hopper); the engine is compiled for the exact GPU when it is
  first loaded. It has no plugin support in Python and ignores timing caches.

Precision: the graph is fp32; fp16/bf16 make every GEMM 16-bit in the graph
(export/precision.py) and the network is built strongly typed, so both flavours compute
the same thing. Optimization profiles come from the graph's recorded dim ranges
(``moon3rt.dims``: min/opt/max of T tokens, B items, P patches), one profile or several
(--profiles N: the first ones cover smaller batches, the last the full range); a batch
outside every profile is refused by `select_profile` with the sizes it has and allows.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path

from moon3rt.export.precision import PRECISIONS, lower_gemm_precision

FLAVOURS = ("tensorrt", "tensorrt_rtx")
INSTALL = {
    "tensorrt": "pip install tensorrt-cu12 (or tensorrt-cu13): full TensorRT, builds for the GPU present, plugins",
    "tensorrt_rtx": "pip install tensorrt-rtx-cu13: TensorRT-RTX, builds the standard graph without a GPU",
}


class TensorRTNotFound(ImportError):
    pass


class BuildError(RuntimeError):
    pass


class ShapeOutOfProfile(ValueError):
    pass


def import_tensorrt(flavour: str | None = None):
    """(module, flavour name): full TensorRT first, then TensorRT-RTX, or the one asked for."""
    wanted = [flavour] if flavour else list(FLAVOURS)
    for name in wanted:
        if name not in FLAVOURS:
            raise ValueError(f"unknown TensorRT flavour {name!r}; one of {FLAVOURS}")
        try:
            return __import__(name), name
        except ImportError:
            continue
    lines = "\n".join(f"  import {n}: {INSTALL[n]}" for n in wanted)
    what = "neither is importable" if len(wanted) > 1 else f"{wanted[0]} is not importable"
    raise TensorRTNotFound(f"building an engine needs TensorRT's Python bindings and {what}:\n{lines}")


# ------------------------------------------------------------------------- profiles
def graph_dims(proto) -> dict:
    """min/opt/max of each dynamic dim, from the graph's ``moon3rt.dims`` metadata."""
    meta = {p.key: p.value for p in proto.metadata_props}
    if "moon3rt.dims" not in meta:
        raise BuildError("the ONNX file has no moon3rt.dims metadata: export it with export/export_onnx.py")
    return json.loads(meta["moon3rt.dims"])


def input_shapes(proto) -> dict[str, list]:
    """Each graph input's shape as ints and dim names, e.g. {'position_ids': [3, 'T']}."""
    return {i.name: [d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim] for i in proto.graph.input}


def default_profiles(dims: dict, count: int = 1) -> list[dict]:
    """`count` profiles {dim: (min, opt, max)}: the last spans the recorded range, each
    earlier one a quarter of the next (smaller batches get kernels tuned for them)."""
    if count < 1:
        raise ValueError(f"need at least one profile, got {count}")
    profiles = []
    for k in range(count):
        shrink = 4 ** (count - 1 - k)
        profile = {}
        for name, r in dims.items():
            high = max(r["min"], r["max"] // shrink)
            profile[name] = (r["min"], min(high, max(r["min"], r["opt"] // shrink)), high)
        profiles.append(profile)
    return profiles


def check_profiles(profiles: list[dict], dims: dict) -> None:
    for i, profile in enumerate(profiles):
        if set(profile) != set(dims):
            raise ValueError(f"profile {i} gives dims {sorted(profile)}, the graph has {sorted(dims)}")
        for name, (lo, opt, hi) in profile.items():
            if not 1 <= lo <= opt <= hi:
                raise ValueError(f"profile {i}: {name} needs 1 <= min <= opt <= max, got {(lo, opt, hi)}")


def select_profile(profiles: list[dict], sizes: dict[str, int]) -> int:
    """Index of the first profile that holds `sizes` ({'T': .., 'B': .., 'P': ..})."""
    for i, profile in enumerate(profiles):
        if all(profile[name][0] <= sizes[name] <= profile[name][2] for name in profile):
            return i
    ranges = ", ".join(f"{n} {profile[n][0]}..{profile[n][2]}" for n in profiles[-1])
    raise ShapeOutOfProfile(
        "batch sizes " + ", ".join(f"{n}={v}" for n, v in sizes.items()) + f" are outside every optimization "
        f"profile (the widest allows {ranges}); split the batch or rebuild with larger --max-batch-tokens/-items"
    )


def profile_shapes(shapes: list, profile: dict) -> tuple[tuple, tuple, tuple]:
    """(min, opt, max) shapes of one input for a profile."""
    return tuple(tuple(d if isinstance(d, int) else profile[d][k] for d in shapes) for k in range(3))


# ---------------------------------------------------------------------------- build
@dataclass
class BuildReport:
    engine: str
    flavour: str
    tensorrt_version: str
    precision: str
    compute_capabilities: list
    profiles: list
    engine_bytes: int = 0
    build_seconds: float = 0.0
    network_layers: int = 0
    engine_layers: int | None = None  # from the engine inspector, when the engine loads here (needs a GPU)
    plugins: dict = field(default_factory=dict)
    timing_cache: str | None = None
    notes: list = field(default_factory=list)


def build_engine(onnx_path, engine_path, precision: str = "fp16", profiles: list[dict] | int | None = None,
                 timing_cache=None, *, compute_capability: list[int] | None = None, flavour: str | None = None,
                 workspace_gib: float | None = None, optimization_level: int | None = None,
                 device=None, verbose: bool = False) -> BuildReport:
    """Build `onnx_path` into a serialized engine at `engine_path` (and ``<engine>.json``).

    profiles: a list of {dim: (min, opt, max)}, a count for `default_profiles`, or None
    (one profile over the recorded ranges). timing_cache: a file read before and written
    after the build (full TensorRT); one written by another TensorRT or GPU is replaced.
    compute_capability: e.g. [89] or [80, 89]; TensorRT-RTX needs it without a GPU, full
    TensorRT builds for the GPU present and refuses another. device: the CUDA device full
    TensorRT builds on (default: the current one); it is made current for the build, so
    TensorRT and the plugin kernels (export/trt_plugins.py: build_arch) target the same GPU.
    """
    import onnx
    from moon3rt.export.plugins import check_plugin_graph, plugin_nodes

    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    trt, flavour = import_tensorrt(flavour)
    if flavour == "tensorrt" and device is not None:  # full TensorRT builds on the current device
        import torch

        with torch.cuda.device(device):
            return build_engine(onnx_path, engine_path, precision, profiles, timing_cache,
                                compute_capability=compute_capability, flavour=flavour, workspace_gib=workspace_gib,
                                optimization_level=optimization_level, verbose=verbose)
    onnx_path, engine_path = Path(onnx_path), Path(engine_path)
    proto = onnx.load(str(onnx_path))
    dims = graph_dims(proto)
    if profiles is None or isinstance(profiles, int):
        profiles = default_profiles(dims, profiles or 1)
    check_profiles(profiles, dims)
    report = BuildReport(str(engine_path), flavour, trt.__version__, precision, list(compute_capability or []),
                         [{k: list(v) for k, v in p.items()} for p in profiles])
    if any(node.op_type == "Attention" for node in proto.graph.node):
        raise BuildError(f"{onnx_path} writes attention as opset-23 Attention nodes (export --attention-op), a "
                         "graph for onnxruntime; build the standard graph (export without --attention-op), whose "
                         "attention TensorRT fuses")
    if plugin_nodes(proto):
        report.plugins = check_plugin_graph(proto)
        if flavour != "tensorrt":
            raise BuildError("the plugin graph needs full TensorRT (import tensorrt, >= 10.9); TensorRT-RTX has no "
                             "Python plugin support: build the standard graph with it instead")
        from moon3rt.export.trt_plugins import register_plugins

        register_plugins()
    shapes = input_shapes(proto)
    lower_gemm_precision(proto, precision)

    logger = trt.Logger(trt.Logger.VERBOSE if verbose else trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED))
    parser = trt.OnnxParser(network, logger)
    engine_path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=engine_path.parent, prefix=".build-") as scratch:
        graph_file = Path(scratch) / "model.onnx"  # the precision-lowered graph (external data for big models)
        big = sum(len(t.raw_data) for t in proto.graph.initializer) > 2**30
        onnx.save(proto, str(graph_file), save_as_external_data=big, location="model.onnx.data")
        if not parser.parse_from_file(str(graph_file)):
            errors = "\n  ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
            raise BuildError(f"{flavour} could not parse {onnx_path}:\n  {errors}")
    report.network_layers = network.num_layers

    config = builder.create_builder_config()
    if workspace_gib:
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_gib * 2**30))
    if optimization_level is not None:
        config.builder_optimization_level = optimization_level
    config.profiling_verbosity = trt.ProfilingVerbosity.DETAILED  # layer names for the engine inspector
    if report.plugins:  # FireInject updates hidden states in place (an aliased plugin output)
        config.set_preview_feature(trt.PreviewFeature.ALIASED_PLUGIN_IO_10_03, True)
    _set_targets(trt, flavour, config, compute_capability, report)
    for profile in profiles:
        opt_profile = builder.create_optimization_profile()
        for name, dims_of in shapes.items():
            opt_profile.set_shape(name, *profile_shapes(dims_of, profile))
        config.add_optimization_profile(opt_profile)
    cache = _load_timing_cache(config, timing_cache, flavour, report)

    start = time.perf_counter()
    serialized = builder.build_serialized_network(network, config)
    report.build_seconds = round(time.perf_counter() - start, 2)
    if serialized is None:
        raise BuildError(f"{flavour} failed to build {onnx_path} (see the TensorRT log above)")
    engine_path.write_bytes(serialized)
    report.engine_bytes = engine_path.stat().st_size
    if cache is not None:
        _save_timing_cache(config, Path(timing_cache))
    report.engine_layers = engine_layer_count(trt, logger, bytes(serialized), report)
    sidecar = {**asdict(report), "onnx": str(onnx_path), "inputs": shapes, "dims": dims}
    engine_path.with_name(engine_path.name + ".json").write_text(json.dumps(sidecar, indent=2) + "\n")
    return report


def _set_targets(trt, flavour, config, compute_capability, report) -> None:
    if flavour == "tensorrt_rtx":
        if not compute_capability:
            raise BuildError("TensorRT-RTX needs --compute-capability (e.g. 89 for an RTX 4090 or L40S, "
                             "80 for an A100 or RTX 30)")
        known = {int(v.value): v for k, v in trt.ComputeCapability.__members__.items() if k.startswith("SM")}
        missing = [cc for cc in compute_capability if cc not in known]
        if missing:
            raise BuildError(f"TensorRT-RTX {trt.__version__} cannot target compute capability {missing}; it knows "
                             f"{sorted(known)} (Hopper, 90, needs full TensorRT)")
        config.num_compute_capabilities = len(compute_capability)
        for i, cc in enumerate(compute_capability):
            config.set_compute_capability(known[cc], i)
        return
    import torch

    if not torch.cuda.is_available():
        raise BuildError("full TensorRT builds for the GPU present and none is visible; to build without a GPU "
                         "use TensorRT-RTX (pip install tensorrt-rtx-cu13) and the standard graph")
    major, minor = torch.cuda.get_device_capability()
    here = major * 10 + minor
    if compute_capability and set(compute_capability) != {here}:
        raise BuildError(f"full TensorRT builds for this GPU (compute capability {here}), not {compute_capability}")
    report.compute_capabilities = [here]


def _load_timing_cache(config, path, flavour, report):
    """The timing cache set on `config`: `path`'s, or a fresh one where there is no file or
    the file is from another TensorRT version or GPU (a warning says so; the file is
    replaced after the build)."""
    if path is None:
        return None
    if flavour == "tensorrt_rtx":
        report.notes.append("TensorRT-RTX ignores timing caches; none was read or written")
        return None
    path = Path(path)
    cache = config.create_timing_cache(path.read_bytes()) if path.exists() else None
    # ignore_mismatch=False: TensorRT refuses a cache recorded elsewhere and returns False
    if cache is None or not config.set_timing_cache(cache, ignore_mismatch=False):
        if path.exists():
            message = (f"timing cache {path} does not match this TensorRT version or GPU (or is unreadable); "
                       "building with a fresh one, which replaces it")
            warnings.warn(message, stacklevel=3)
            report.notes.append(message)
        cache = config.create_timing_cache(b"")
        if not config.set_timing_cache(cache, ignore_mismatch=False):
            raise BuildError("TensorRT refused a fresh, empty timing cache")
    report.timing_cache = str(path)
    return cache


def _save_timing_cache(config, path: Path) -> None:
    """Write the config's timing cache to `path` atomically (concurrent builds may share it)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, scratch = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(memoryview(config.get_timing_cache().serialize()))
        os.replace(scratch, path)
    except BaseException:
        Path(scratch).unlink(missing_ok=True)
        raise


def engine_layer_count(trt, logger, serialized: bytes, report: BuildReport | None = None) -> int | None:
    """Layers of the built engine, from the engine inspector; None where the engine cannot
    be loaded here (deserialising needs a CUDA driver and a GPU the engine was built for)."""
    try:
        import torch

        if not torch.cuda.is_available():
            raise RuntimeError("no CUDA device")
        engine = trt.Runtime(logger).deserialize_cuda_engine(serialized)
        if engine is None:
            raise RuntimeError("deserialize_cuda_engine returned None")
        info = json.loads(engine.create_engine_inspector().get_engine_information(trt.LayerInformationFormat.JSON))
        return len(info.get("Layers", []))
    except Exception as err:  # noqa: BLE001 - any failure only means the count is unknown here
        if report is not None:
            report.notes.append(f"engine not inspected here ({err}); network layers reported instead")
        return None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--onnx", required=True, help="graph from export/export_onnx.py (--plugins for the plugin graph)")
    parser.add_argument("--engine", help="output engine path (default: the ONNX path with .engine)")
    parser.add_argument("--precision", choices=PRECISIONS, default="fp16")
    parser.add_argument("--profiles", type=int, default=1, help="number of optimization profiles from the dim ranges")
    parser.add_argument("--timing-cache", help="timing cache file, read and updated (full TensorRT)")
    parser.add_argument("--compute-capability", type=int, action="append",
                        help="target, e.g. 89 (TensorRT-RTX: required, repeatable; full TensorRT: the GPU present)")
    parser.add_argument("--flavour", choices=FLAVOURS, help="force full TensorRT or TensorRT-RTX (default: first found)")
    parser.add_argument("--workspace-gib", type=float, help="builder workspace limit")
    parser.add_argument("--optimization-level", type=int, help="builder optimization level 0..5")
    parser.add_argument("--device", help="CUDA device to build on, e.g. cuda:1 (full TensorRT; default: current)")
    parser.add_argument("--verbose", action="store_true")
    args = parser.parse_args(argv)
    engine = args.engine or str(Path(args.onnx).with_suffix(".engine"))
    try:
        report = build_engine(args.onnx, engine, args.precision, args.profiles, args.timing_cache,
                              compute_capability=args.compute_capability, flavour=args.flavour,
                              workspace_gib=args.workspace_gib, optimization_level=args.optimization_level,
                              device=args.device, verbose=args.verbose)
    except (TensorRTNotFound, BuildError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    layers = report.engine_layers if report.engine_layers is not None else f"n/a here; network {report.network_layers}"
    print(f"wrote {report.engine} ({report.engine_bytes / 2**20:.1f} MiB) with {report.flavour} {report.tensorrt_version}"
          f" in {report.build_seconds} s: {report.precision}, compute capability {report.compute_capabilities}, "
          f"{len(report.profiles)} profile(s), layers {layers}")
    for note in report.notes:
        print(f"  note: {note}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
