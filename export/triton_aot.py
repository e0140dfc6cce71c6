"""Triton kernels compiled ahead of time, without a GPU: PTX and cubin for a named arch.

    python -m moon3rt.export.triton_aot --model moon3-tiny --arch 90 --out plugin-ptx/

compiles the plugin graph's four kernels (export/plugin_kernels.py) for a model's sizes
and writes, per kernel and arch, the PTX TensorRT loads (``<op>.sm<arch>.ptx``) and a
``manifest.json`` (entry name, parameters, warps, shared memory, grid formula).

`triton.compile` with a `GPUTarget` needs no device: Triton's LLVM emits PTX in process
and its bundled ptxas makes the cubin. Needs triton >= 3.6 (`ASTSource(constexprs=)`).
Three things are fixed so that TensorRT can load and launch the kernels:

- The PTX ISA, per arch (`PTX_VERSIONS`): the lowest ISA that can target it, so the
  driver that JIT-compiles the PTX (TensorRT loads plugin kernels as PTX) can be as old
  as possible: 8.0 (CUDA 12.0) up to sm_90a, 8.6 for sm_100a, 8.7 for sm_120a. Triton's
  default is the newest ISA its ptxas knows, which older drivers reject; an ISA too old
  for the target makes Triton's LLVM abort the process, so an arch outside the table
  is refused before compiling.
- Triton appends hidden pointer parameters to every kernel, one per scratch buffer its
  metadata describes (global and profile scratch with triton 3.6 to 3.9). Triton's
  launcher passes them; TensorRT's ahead-of-time plugin launch passes only inputs, extra
  scalars and outputs. The kernels here use neither buffer (the metadata says size 0 and the PTX
  never reads them), so `strip_hidden_parameters` removes them from the entry, and
  `check_parameters` proves the remaining list is exactly what the plugin's launch
  passes, in order and type.
- Plugin kernels (`compile_plugin`) fit in 48 KiB of shared memory: TensorRT launches an
  AOT plugin's kernel without opting in to more, so a larger kernel would fail to
  launch. They are compiled with two pipeline stages (Triton's default of three doubles
  FireInject's buffers at rank 64), then one, and refused if still too large.

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
# Lowest PTX ISA (x10) able to target each arch: 8.0 (CUDA 12.0) is the first with sm_90a,
# 8.6 (CUDA 12.7) with sm_100a, 8.7 (CUDA 12.8) with sm_120a.
PTX_VERSIONS = {80: 80, 86: 80, 89: 80, 90: 80, 100: 86, 120: 87}
MIN_TRITON = (3, 6)  # ASTSource(fn, signature, constexprs=...) and the scratch-buffer metadata
# scratch buffers Triton describes in a kernel's metadata, one hidden pointer parameter each
SCRATCH_FIELDS = ("global_scratch_size", "profile_scratch_size")
# TensorRT launches AOT plugin kernels without the opt-in to more than the default 48 KiB
MAX_PLUGIN_SHARED = 48 * 1024
PLUGIN_NUM_STAGES = (2, 1)  # software pipeline depths tried, in order, for a plugin kernel to fit
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
    scratch: tuple[str, ...] = ()  # the metadata's scratch-buffer fields, one per hidden parameter
    num_stages: int = 0
    ptx_version: int = 0

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


def ptx_version(arch: int) -> int:
    """The PTX ISA (x10) to compile for sm_`arch`; a clear error for an arch not in `PTX_VERSIONS`."""
    if arch not in PTX_VERSIONS:
        raise ValueError(f"compute capability {arch} is not supported for ahead-of-time kernels: known archs are "
                         f"{sorted(PTX_VERSIONS)} (each needs its minimum PTX ISA in triton_aot.PTX_VERSIONS)")
    return PTX_VERSIONS[arch]


def check_triton_version(version: str) -> None:
    """Refuse a triton older than `MIN_TRITON`, whose compile API differs."""
    parts = re.match(r"(\d+)\.(\d+)", version)
    if parts is None or tuple(map(int, parts.groups())) < MIN_TRITON:
        raise RuntimeError(f"ahead-of-time compilation needs triton >= {'.'.join(map(str, MIN_TRITON))}, "
                           f"found {version}: pip install -U 'triton>={'.'.join(map(str, MIN_TRITON))}'")


def compile_kernel(fn, signature: dict, constexprs: dict, num_warps: int, arch: int,
                   num_stages: int | None = None) -> CompiledKernel:
    """Compile @triton.jit `fn` for sm_`arch` with an explicit signature (runtime args then
    constexprs, as `triton.compiler.ASTSource` takes them). `num_stages`: Triton's
    software pipeline depth (None: Triton's default)."""
    ptx = ptx_version(arch)  # before Triton's LLVM sees an arch it would abort on
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from triton.runtime.jit import JITFunction

    check_triton_version(triton.__version__)
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
    options = {"num_warps": num_warps, "ptx_version": ptx, "enable_fp_fusion": True}
    if num_stages is not None:
        options["num_stages"] = num_stages
    kernel = triton.compile(source, target=GPUTarget("cuda", arch, 32), options=options)
    meta = kernel.metadata
    params = entry_parameters(kernel.asm["ptx"], meta.name)
    hidden = len(params) - len(signature_types(signature))
    scratch = tuple(f for f in SCRATCH_FIELDS if hasattr(meta, f))
    if hidden != len(scratch):
        raise AssertionError(f"{meta.name}: the PTX entry has {len(params)} parameters for {len(signature)} runtime "
                             f"arguments, but the metadata describes {len(scratch)} scratch buffers {list(scratch)}")
    for size_field in scratch:
        if getattr(meta, size_field):
            raise ValueError(f"{meta.name} needs {size_field}={getattr(meta, size_field)}; "
                             "its launch would have to allocate that buffer")
    return CompiledKernel(meta.name, arch, kernel.asm["ptx"], kernel.asm["cubin"], tuple(params), hidden,
                          meta.num_warps, meta.shared, scratch, meta.num_stages, ptx)


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


class PluginSharedMemoryError(ValueError):
    """A plugin kernel needs more shared memory than a TensorRT AOT plugin launch allows."""


def compile_plugin(op_type: str, shapes: list, attrs: dict, arch: int, max_shared: int | None = None):
    """(CompiledKernel, PluginLaunch) of one plugin op, its parameters checked and its
    shared memory within `max_shared` (default `MAX_PLUGIN_SHARED`): each pipeline depth
    of `PLUGIN_NUM_STAGES` is tried in turn, and `PluginSharedMemoryError` raised if none fits."""
    from .plugin_kernels import ADAPTERS, plugin_launch

    limit = MAX_PLUGIN_SHARED if max_shared is None else max_shared
    launch = plugin_launch(op_type, shapes, attrs)
    tried = []
    for stages in PLUGIN_NUM_STAGES:
        kernel = compile_kernel(ADAPTERS[launch.kernel], launch.signature, launch.constexprs, launch.num_warps, arch,
                                num_stages=stages)
        tried.append(f"{kernel.shared} B with num_stages={stages}")
        if kernel.shared <= limit:
            check_parameters(kernel, signature_types(launch.signature))
            return kernel, launch
    blocks = {k: v for k, v in launch.constexprs.items() if k.startswith(("BLOCK", "H_PAD"))}
    raise PluginSharedMemoryError(
        f"{op_type} ({launch.kernel}, sm_{arch}, {blocks}) needs {', '.join(tried)} of shared memory; a TensorRT "
        f"AOT plugin kernel gets at most {limit} B (TensorRT launches it without opting in to more). Use the "
        "standard graph for this model, or smaller blocks in export/plugin_kernels.py: plugin_launch")


def write_plugin_ptx(cfg, archs, out: Path) -> dict:
    """Compile every plugin op for `cfg` and each arch into `out`; returns the manifest."""
    from .plugins import PLUGINS

    out.mkdir(parents=True, exist_ok=True)
    manifest = {"ptx_versions": {str(a): ptx_version(a) for a in archs}, "kernels": []}
    for op_type, (shapes, attrs) in plugin_shapes(cfg).items():
        for arch in archs:
            kernel, launch = compile_plugin(op_type, shapes, attrs, arch)
            path = out / f"{op_type}.sm{arch}.ptx"
            path.write_text(kernel.plugin_ptx)
            spec = PLUGINS[op_type]
            manifest["kernels"].append({
                "op_type": op_type, "arch": arch, "entry": kernel.name, "file": path.name,
                "parameters": list(launch.signature), "parameter_types": entry_parameters(kernel.plugin_ptx, kernel.name),
                "hidden_parameters_removed": kernel.hidden, "scratch_buffers": list(kernel.scratch),
                "constexprs": launch.constexprs, "ptx_version": kernel.ptx_version,
                "num_warps": kernel.num_warps, "num_stages": kernel.num_stages, "shared_bytes": kernel.shared,
                "grid_for_example": [int(g) for g in launch.grid], "example_shapes": [list(s) for s in shapes],
                "inputs": [t.name for t in spec.inputs], "outputs": [t.name for t in spec.outputs],
            })
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


def model_config(name: str):
    """The config of a preset or checkpoint directory (only its sizes are needed: no weights)."""
    from moon3rt.config import PRESETS, Moon3Config

    if Path(name).is_dir():
        return Moon3Config.from_json_file(Path(name) / "config.json")
    if name in PRESETS:
        return Moon3Config.from_name(name)
    raise ValueError(f"model {name!r} is neither a preset ({sorted(PRESETS)}) nor a checkpoint directory")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="moon3-tiny", help="preset name or checkpoint directory (for its sizes)")
    parser.add_argument("--arch", type=int, action="append", help=f"compute capability x10 (default {ARCHS})")
    parser.add_argument("--out", default="plugin-ptx", help="output directory")
    args = parser.parse_args(argv)
    archs = args.arch or ARCHS
    for arch in archs:
        ptx_version(arch)  # every arch refused up front, before any compiling
    manifest = write_plugin_ptx(model_config(args.model), archs, Path(args.out))
    for k in manifest["kernels"]:
        print(f"{k['op_type']:<13} sm_{k['arch']}  {k['entry']}  {len(k['parameter_types'])} params "
              f"({k['hidden_parameters_removed']} hidden removed), {k['num_warps']} warps, {k['num_stages']} stages, "
              f"{k['shared_bytes']} B smem, PTX ISA {k['ptx_version'] / 10:.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
