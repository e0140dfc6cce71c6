"""Triton kernels compiled ahead of time, without a GPU: PTX and cubin for a named arch.

    python -m moon3rt.export.triton_aot --model moon3-tiny --arch 90 --out plugin-ptx/

compiles the plugin graph's four kernels (export/plugin_kernels.py) for a model's sizes
and writes, per kernel and arch, the PTX TensorRT loads (``<op>.sm<arch>.ptx``) and a
``manifest.json`` (entry name, parameters, warps, shared memory, grid formula).

`triton.compile` with a `GPUTarget` needs no device: Triton's LLVM emits PTX in process
and its bundled ptxas makes the cubin. Two things are pinned for portability:

- PTX ISA 8.0 (``ptx_version=80``, CUDA 12.0): the driver that JIT-compiles the PTX
  (TensorRT loads plugin kernels as PTX) only needs to be a CUDA 12 driver. Triton's
  default is the newest ISA its ptxas knows, which older drivers reject.
- Triton appends two hidden pointer parameters to every kernel (global and profile
  scratch). The launcher passes them; TensorRT's ahead-of-time plugin launch passes
  only inputs, extra scalars and outputs. The kernels here use neither buffer (the
  metadata says size 0 and the PTX never reads them), so `strip_hidden_parameters`
  removes them from the entry, and `check_parameters` proves the remaining list is
  exactly what the plugin's launch passes, in order and type.

Triton's interpreter (TRITON_INTERPRET=1) replaces @triton.jit functions with Python
ones that cannot be compiled; compile in a process without it (the CLI, or a subprocess).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from dataclasses import dataclass
from pathlib import Path

ARCHS = (80, 89, 90)  # A100, L4/L40/RTX 40, H100/H200
PTX_VERSION = 80  # PTX ISA 8.0 (CUDA 12.0); supports sm_90a
PTX_TYPES = {"ptr": "ptr", "u32": "i32", "u64": "i64", "f32": "fp32", "f64": "fp64"}


@dataclass(frozen=True)
class CompiledKernel:
    """One kernel compiled for one arch. `params` are the PTX entry's parameter types in
    order ("ptr", "i32", "fp32", ...), Triton's hidden trailing pointers included;
    `hidden` says how many of them there are."""

    name: str
    arch: int
    ptx: str
    cubin: bytes
    params: tuple[str, ...]
    hidden: int
    num_warps: int
    shared: int  # dynamic shared memory, bytes

    @property
    def plugin_ptx(self) -> str:
        """The PTX with the hidden parameters removed: TensorRT's AOT launch convention."""
        return strip_hidden_parameters(self.ptx, self.name, self.hidden)


def signature_types(signature: dict) -> list[str]:
    """PTX parameter types of a Triton signature's runtime arguments ("*fp32" -> "ptr")."""
    return ["ptr" if t.startswith("*") else t for t in signature.values() if t != "constexpr"]


def entry_parameters(ptx: str, name: str) -> list[str]:
    """Parameter types of kernel `name`'s ``.entry`` in `ptx`, in order."""
    match = re.search(r"\.entry\s+" + re.escape(name) + r"\s*\((.*?)\)", ptx, re.DOTALL)
    if match is None:
        raise ValueError(f"no .entry {name} in the PTX")
    types = []
    for decl in filter(None, (d.strip() for d in match.group(1).split(","))):
        words = decl.split()
        kind = "ptr" if ".ptr" in words else words[1].lstrip(".")
        types.append(PTX_TYPES.get(kind, kind))
    return types


def strip_hidden_parameters(ptx: str, name: str, count: int) -> str:
    """`ptx` without the last `count` parameters of entry `name`; refuses if the body reads them."""
    if count == 0:
        return ptx
    entry = re.search(r"\.entry\s+" + re.escape(name) + r"\s*\((.*?)\)", ptx, re.DOTALL)
    if entry is None:
        raise ValueError(f"no .entry {name} in the PTX")
    decls = entry.group(1).split(",")
    body = ptx[entry.end():]
    for decl in decls[-count:]:
        param = decl.split()[-1]
        if re.search(rf"\b{re.escape(param)}\b", body):
            raise ValueError(f"{name}: hidden parameter {param} is used by the kernel; it cannot be dropped")
    return ptx[:entry.start(1)] + ",".join(decls[:-count]) + "\n" + ptx[entry.end(1):]


def compile_kernel(fn, signature: dict, constexprs: dict, num_warps: int, arch: int) -> CompiledKernel:
    """Compile @triton.jit `fn` for sm_`arch` with an explicit signature (runtime args then
    constexprs, as `triton.compiler.ASTSource` takes them)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from triton.runtime.jit import JITFunction

    if not isinstance(fn, JITFunction):
        raise TypeError(
            f"{getattr(fn, 'fn', fn).__name__} is not a compilable @triton.jit function (TRITON_INTERPRET=1 "
            "replaces them with Python); compile ahead of time in a process without TRITON_INTERPRET"
        )
    unknown = (set(signature) | set(constexprs)) - set(fn.arg_names)
    missing = [a for a in fn.arg_names if a not in signature and a not in constexprs]
    if unknown or missing:
        raise ValueError(f"{fn.__name__}: parameters {sorted(unknown)} are not the kernel's, "
                         f"{missing} have no type or value")
    if [a for a in fn.arg_names if a in signature] != list(signature):
        raise ValueError(f"{fn.__name__}: give the runtime parameters in the kernel's order, {fn.arg_names}")
    # a runtime parameter given a value (a unit stride, FIRE's eps) is specialised like a constexpr
    full = {a: signature.get(a, "constexpr") for a in fn.arg_names}
    source = ASTSource(fn, full, constexprs=dict(constexprs))
    options = {"num_warps": num_warps, "ptx_version": PTX_VERSION, "enable_fp_fusion": True}
    kernel = triton.compile(source, target=GPUTarget("cuda", arch, 32), options=options)
    meta = kernel.metadata
    params = entry_parameters(kernel.asm["ptx"], meta.name)
    hidden = len(params) - len(signature_types(signature))
    if hidden < 0:
        raise AssertionError(f"{meta.name}: PTX has {len(params)} parameters, the signature {len(signature)}")
    for size_field in ("global_scratch_size", "profile_scratch_size"):
        if getattr(meta, size_field, 0):
            raise ValueError(f"{meta.name} needs {size_field}={getattr(meta, size_field)}; "
                             "its launch would have to allocate that buffer")
    return CompiledKernel(meta.name, arch, kernel.asm["ptx"], kernel.asm["cubin"], tuple(params), hidden,
                          meta.num_warps, meta.shared)


def check_parameters(kernel: CompiledKernel, launch_types: list[str]) -> None:
    """The kernel as TensorRT sees it (hidden parameters stripped) takes exactly `launch_types`."""
    got = entry_parameters(kernel.plugin_ptx, kernel.name)
    if got != list(launch_types):
        raise AssertionError(f"{kernel.name} (sm_{kernel.arch}) takes {got}, the launch passes {list(launch_types)}")


# --------------------------------------------------------------------------- plugins
def plugin_shapes(cfg, tokens: int = 64, items: int = 2) -> dict:
    """Example input shapes and node attributes of each plugin op for a model config: the
    static dims (K, rank, d, heads) fix the constexprs; T, N and B are sample sizes."""
    d, heads = cfg.text.hidden_size, cfg.moon3.fusion.num_heads if cfg.has_fusion else 1
    k, rank = cfg.vision.merged_dim, cfg.moon3.fire.rank if cfg.has_fire else 16
    eps = cfg.moon3.fire.eps if cfg.has_fire else 1e-6
    b1 = (items + 1,)
    return {
        "FirePrologue": ([(tokens, k), (k,), (rank, k)], {"eps": eps}),
        "FireInject": ([(tokens, d), (tokens,), (tokens, rank), (rank, d), (1,)], {"layer": 0}),
        "FusionScores": ([(items, heads, d), (tokens, d), b1, (tokens, d), b1], {"num_heads": heads}),
        "FusionPool": ([(tokens, d), b1, (heads, tokens), (tokens, d), b1, (heads, tokens), (items, 2, heads),
                        (items, 2, heads), (items, heads, 2)], {"num_heads": heads}),
    }


def compile_plugin(op_type: str, shapes: list, attrs: dict, arch: int):
    """(CompiledKernel, PluginLaunch) of one plugin op, its parameters checked."""
    from .plugin_kernels import ADAPTERS, plugin_launch

    launch = plugin_launch(op_type, shapes, attrs)
    kernel = compile_kernel(ADAPTERS[launch.kernel], launch.signature, launch.constexprs, launch.num_warps, arch)
    check_parameters(kernel, signature_types(launch.signature))
    return kernel, launch


def write_plugin_ptx(cfg, archs, out: Path) -> dict:
    """Compile every plugin op for `cfg` and each arch into `out`; returns the manifest."""
    from .plugins import PLUGINS

    out.mkdir(parents=True, exist_ok=True)
    manifest = {"ptx_version": PTX_VERSION, "kernels": []}
    for op_type, (shapes, attrs) in plugin_shapes(cfg).items():
        for arch in archs:
            kernel, launch = compile_plugin(op_type, shapes, attrs, arch)
            path = out / f"{op_type}.sm{arch}.ptx"
            path.write_text(kernel.plugin_ptx)
            spec = PLUGINS[op_type]
            manifest["kernels"].append({
                "op_type": op_type, "arch": arch, "entry": kernel.name, "file": path.name,
                "parameters": list(launch.signature), "parameter_types": entry_parameters(kernel.plugin_ptx, kernel.name),
                "hidden_parameters_removed": kernel.hidden, "constexprs": launch.constexprs,
                "num_warps": kernel.num_warps, "shared_bytes": kernel.shared,
                "grid_for_example": [int(g) for g in launch.grid], "example_shapes": [list(s) for s in shapes],
                "inputs": [t.name for t in spec.inputs], "outputs": [t.name for t in spec.outputs],
            })
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="moon3-tiny", help="preset name or checkpoint directory (for its sizes)")
    parser.add_argument("--arch", type=int, action="append", help=f"compute capability x10 (default {ARCHS})")
    parser.add_argument("--out", default="plugin-ptx", help="output directory")
    args = parser.parse_args(argv)
    from moon3rt.export.export_onnx import resolve_model

    cfg = resolve_model(args.model).cfg
    manifest = write_plugin_ptx(cfg, args.arch or ARCHS, Path(args.out))
    for k in manifest["kernels"]:
        print(f"{k['op_type']:<13} sm_{k['arch']}  {k['entry']}  {len(k['parameter_types'])} params "
              f"({k['hidden_parameters_removed']} hidden removed), {k['num_warps']} warps, {k['shared_bytes']} B smem")
    return 0


if __name__ == "__main__":
    sys.exit(main())
