"""TensorRT plugins for the plugin graph's custom nodes: `tensorrt.plugin` quickly deployable
plugins with an ahead-of-time implementation whose kernel is moon3rt's Triton kernel as PTX.

    from moon3rt.export.trt_plugins import register_plugins
    register_plugins()          # before parsing a plugin graph with tensorrt.OnnxParser

For each `PluginSpec` (export/plugins.py) this registers
- ``@trtp.register("moon3rt::<op>")``: output descriptors from the input descriptors
  (shapes as TensorRT dim expressions; FireInject's output aliases its input 0, which
  needs the builder's ALIASED_PLUGIN_IO preview feature, see export/build_engine.py);
- ``@trtp.aot_impl("moon3rt::<op>")``: compiles the op's Triton adapter
  (export/plugin_kernels.py) for the GPU the engine is built on and returns
  (entry name, PTX, launch parameters, extra int32 args). The grid and the extra args
  are symbolic in the dynamic dims, so one engine serves every shape in its profiles;
  the PTX goes into the engine, which then runs without Python.

Only ahead-of-time implementations are registered: the engine needs no Python callback,
and its plugin kernels are the PTX that `moon3rt.export.triton_aot` checks on any
machine. `tensorrt` is imported when `register_plugins` runs, not at import, so this
module and its launch arithmetic load without TensorRT. TensorRT-RTX's Python package
ships no ``tensorrt_rtx.plugin`` module (checked with tensorrt-rtx-cu13 1.7.1): the
plugin graph needs full TensorRT (10.9 or newer for AOT plugins).
"""

from __future__ import annotations

import inspect
import os

from .plugins import PLUGINS, PluginSpec, output_shapes

MIN_TENSORRT = (10, 9)  # tensorrt.plugin.aot_impl


class TensorRTMissing(ImportError):
    pass


def import_tensorrt_plugin():
    """(tensorrt, tensorrt.plugin), or a `TensorRTMissing` naming what to install."""
    try:
        import tensorrt as trt
    except ImportError:
        raise TensorRTMissing(
            "the plugin graph's TensorRT plugins need full TensorRT >= 10.9 with its Python bindings "
            "(`import tensorrt`): pip install tensorrt-cu12 (or tensorrt-cu13). TensorRT-RTX "
            "(`import tensorrt_rtx`) cannot build the plugin graph; use the standard graph there"
        ) from None
    version = tuple(int(v) for v in trt.__version__.split(".")[:2])
    try:
        import tensorrt.plugin as trtp
    except ImportError as err:
        raise TensorRTMissing(f"tensorrt {trt.__version__} has no tensorrt.plugin module ({err}); "
                              f"AOT plugins need TensorRT >= {'.'.join(map(str, MIN_TENSORRT))}") from None
    if version < MIN_TENSORRT or not hasattr(trtp, "aot_impl"):
        raise TensorRTMissing(f"tensorrt {trt.__version__} has no tensorrt.plugin.aot_impl; "
                              f"AOT plugins need TensorRT >= {'.'.join(map(str, MIN_TENSORRT))}")
    return trt, trtp


def build_arch(device=None) -> int:
    """Compute capability (x10) to compile plugin kernels for: the GPU the engine is built
    on, `device` (a torch device or index; default the current CUDA device, which
    `build_engine` sets to the device it builds on while TensorRT calls the plugins).

    $MOON3RT_TRT_ARCH names it where there is no GPU (compiling and checking the plugins on
    a CPU); with a GPU it must agree with that GPU, since TensorRT builds the rest of the
    engine for it and PTX for another arch (sm_90a above all) may not load there."""
    import torch

    here = None
    if torch.cuda.is_available():
        device = torch.device("cuda", torch.cuda.current_device()) if device is None else torch.device(device)
        major, minor = torch.cuda.get_device_capability(device)
        here = major * 10 + minor
    wanted = os.environ.get("MOON3RT_TRT_ARCH")
    if wanted:
        if not wanted.isdigit():
            raise ValueError(f"MOON3RT_TRT_ARCH={wanted!r}: expected a compute capability x10, e.g. 90 for an H100")
        if here is not None and int(wanted) != here:
            raise ValueError(f"MOON3RT_TRT_ARCH={wanted} but the engine is built on {device}, a GPU of compute "
                             f"capability {here}: plugin kernels must be compiled for the GPU TensorRT builds for; "
                             f"unset MOON3RT_TRT_ARCH or set it to {here}")
        return int(wanted)
    if here is None:
        raise RuntimeError("building plugin kernels needs a CUDA device or MOON3RT_TRT_ARCH (e.g. 90 for H100)")
    return here


_REGISTERED: set[str] = set()


def register_plugins() -> list[str]:
    """Register every plugin of `PLUGINS` with TensorRT (once per process); returns their ids."""
    trt, trtp = import_tensorrt_plugin()
    for spec in PLUGINS.values():
        if spec.qualified_name not in _REGISTERED:
            _register(spec, trt, trtp)
            _REGISTERED.add(spec.qualified_name)
    return sorted(_REGISTERED)


def _signature(params: list[tuple[str, type]], returns) -> inspect.Signature:
    kind = inspect.Parameter.POSITIONAL_OR_KEYWORD
    return inspect.Signature([inspect.Parameter(n, kind, annotation=a) for n, a in params], return_annotation=returns)


def _register(spec: PluginSpec, trt, trtp) -> None:
    """`trtp.register` + `trtp.aot_impl` for one spec. `tensorrt.plugin` reads the parameter
    names and annotations of the functions it is given, so they get explicit signatures."""
    tensor_params = [(t.name, trtp.TensorDesc) for t in spec.inputs]
    attr_params = list(spec.attributes.items())
    n_in = len(spec.inputs)
    dtypes = {"float32": trt.float32, "int32": trt.int32}

    def describe(*inputs, **attrs):  # tensorrt.plugin passes the attributes by name
        if spec.aliases:
            return tuple(inputs[spec.aliases[i]].aliased() for i in range(len(spec.outputs)))
        shapes = output_shapes(spec.op_type, [d.shape_expr for d in inputs])
        return tuple(trtp.from_shape_expr(s, dtype=dtypes[t.dtype]) for s, t in zip(shapes, spec.outputs))

    returns = tuple[tuple(trtp.TensorDesc for _ in spec.outputs)]
    describe.__signature__ = _signature(tensor_params + attr_params, returns)
    describe.__name__ = f"{spec.op_type}_describe"

    def aot_impl(*args):
        from .triton_aot import compile_plugin

        inputs, attrs = args[:n_in], dict(zip(spec.attributes, args[n_in:n_in + len(spec.attributes)]))
        shapes = [d.shape_expr for d in inputs]
        # parameters checked against the launch, shared memory within 48 KiB (refused otherwise)
        kernel, launch = compile_plugin(spec.op_type, shapes, attrs, build_arch())
        params = trtp.KernelLaunchParams()
        params.grid_x, params.grid_y, params.grid_z = launch.grid
        params.block_x = kernel.num_warps * 32
        params.shared_mem = kernel.shared
        extra = trtp.SymIntExprs.from_tuple([trtp.SymInt32(v) for v in spec.extra_arg_values(shapes)])
        return kernel.name, kernel.plugin_ptx, params, extra

    aot_returns = tuple[str | bytes, str | bytes, trtp.KernelLaunchParams,
                               trtp.SymExprs]
    aot_impl.__signature__ = _signature(
        tensor_params + attr_params + [("outputs", tuple[tuple(trtp.TensorDesc for _ in spec.outputs)]),
                                       ("tactic", int)], aot_returns)
    aot_impl.__name__ = f"{spec.op_type}_aot_impl"

    # tensorrt.plugin registers every creator with plugin_version "1" (_TemplatePluginCreator);
    # the ONNX parser looks plugins up by that version, so the graph's plugin_version
    # (plugins.VERSION) must stay "1" as long as the plugins are registered this way.
    trtp.register(spec.qualified_name)(describe)
    trtp.aot_impl(spec.qualified_name)(aot_impl)
