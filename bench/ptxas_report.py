"""Registers, spills and shared memory of every kernel as launched for moon3-2b, compiled for sm_90a without a GPU.

    python bench/ptxas_report.py                       # bf16 and fp32, every kernel, table on stdout
    python bench/ptxas_report.py --only varlen --dtype bf16 --json out/ptxas.json

Each case calls the real host launcher (`moon3rt.kernels.*`) on CPU tensors with the
2B model's shapes and strides (one or two items: the kernels' specialisation does not
depend on the token count), with the launch itself captured instead of run. The captured
arguments are specialised the way Triton's JIT specialises a launch on a GPU (pointers
16-byte aligned or not, ints equal to 1 or divisible by 16), the kernel is compiled by
`triton.compile` for `GPUTarget("cuda", 90, 32)`, and `ptxas -v -arch=sm_90a` is run on
its PTX. The launchers choose their GPU block sizes (`_launch_config`) as on CUDA.

Reported per kernel: registers per thread, spill stores/loads (bytes per thread), the
dynamic shared memory Triton allocates (bytes per block), warps, stages and compile time.
Needs triton >= 3.6 and a ptxas (the CUDA toolkit's, else the one Triton bundles); no
GPU and no TRITON_INTERPRET.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
    sys.exit("ptxas_report: unset TRITON_INTERPRET (the interpreter's kernels cannot be compiled)")

# a fresh cache, so the compile times are real compiles
os.environ["TRITON_CACHE_DIR"] = tempfile.mkdtemp(prefix="moon3rt-ptxas-")
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # triton 3.9 warns otherwise; the launches' default

import torch  # noqa: E402
import triton  # noqa: E402
from moon3rt.export.triton_aot import ptx_version  # noqa: E402
from moon3rt.kernels import decode_attention as decode_mod  # noqa: E402
from moon3rt.kernels import fire, fusion_attention, layer_norm, quick_gelu, rms_norm, rope, swiglu  # noqa: E402
from moon3rt.kernels import varlen_attention as varlen_mod  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402
from triton.runtime.jit import JITFunction, create_function_from_signature  # noqa: E402

from moon3rt.config import Moon3Config  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from reporting import git_commit  # noqa: E402

ARCH = 90
CUDA = torch.device("cuda")


@dataclass
class Launch:
    fn: JITFunction
    args: tuple
    kwargs: dict


@dataclass
class Row:
    case: str
    kernel: str
    dtype: str
    num_warps: int
    num_stages: int
    registers: int
    spill_stores: int
    spill_loads: int
    shared_bytes: int
    ptxas_smem_bytes: int
    tensor_cores: str  # "wgmma" (sm_90 warpgroup MMA), "mma" (warp-level mma.sync) or "-"
    global_accesses: str  # PTX ld.global/st.global instructions: "total (vector)" each, e.g. "ld 24 (24v) st 8 (8v)"
    compile_s: float
    constexprs: dict


@contextlib.contextmanager
def captured_launches():
    """Within the block, `kernel[grid](...)` records its arguments instead of launching."""
    launches: list[Launch] = []
    original = JITFunction.run

    def record(self, *args, grid, warmup, **kwargs):
        launches.append(Launch(self, args, kwargs))

    JITFunction.run = record
    try:
        yield launches
    finally:
        JITFunction.run = original


@contextlib.contextmanager
def gpu_launch_configs():
    """Launchers that pick block sizes by device type (`_launch_config(device, ...)`) pick CUDA's."""
    modules = [m for m in (varlen_mod, decode_mod, _fused_gemm()) if m is not None]
    originals = [m._launch_config for m in modules]
    for module, original in zip(modules, originals):
        module._launch_config = lambda device, *a, _original=original, **k: _original(CUDA, *a, **k)
    try:
        yield
    finally:
        for module, original in zip(modules, originals):
            module._launch_config = original


def specialise(launch: Launch, backend):
    """(signature, constexprs, attrs, options) as Triton's JIT derives them for this launch on a GPU."""
    fn = launch.fn
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    bound, specialization, options = binder(*launch.args, **launch.kwargs)
    names = [p.name for p in fn.params]
    signature = {n: s[0] for n, s in zip(names, specialization)}
    values = list(bound.values())
    constexprs = {(i,): values[i] for i, s in enumerate(specialization) if s[0] == "constexpr"}
    attrs = {(i,): backend.parse_attr(s[1]) for i, s in enumerate(specialization)
             if s[0] != "constexpr" and isinstance(s[1], str)}
    return signature, constexprs, attrs, options


def ptxas_path() -> str:
    found = shutil.which("ptxas")
    if found:
        return found
    bundled = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas"
    if bundled.exists():
        return str(bundled)
    raise FileNotFoundError("no ptxas on PATH and none bundled with triton")


def ptxas_figures(ptx: str, name: str) -> dict:
    """Registers, spill stores/loads and static smem of entry `name`, from `ptxas -v -arch=sm_90a`."""
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "k.ptx"
        src.write_text(ptx)
        out = subprocess.run([ptxas_path(), "-v", f"-arch=sm_{ARCH}a", str(src), "-o", str(Path(tmp) / "k.cubin")],
                             capture_output=True, text=True, timeout=600)
    if out.returncode:
        raise RuntimeError(f"ptxas failed on {name}: {out.stderr[-2000:]}")
    log = out.stderr + out.stdout

    def grab(pattern):
        m = re.search(pattern, log)
        return int(m.group(1)) if m else 0

    return {"registers": grab(r"Used (\d+) registers"), "spill_stores": grab(r"(\d+) bytes spill stores"),
            "spill_loads": grab(r"(\d+) bytes spill loads"), "ptxas_smem_bytes": grab(r"(\d+) bytes smem")}


def tensor_cores(ptx: str) -> str:
    return "wgmma" if "wgmma.mma_async" in ptx else "mma" if re.search(r"\bmma\.sync", ptx) else "-"


def global_accesses(ptx: str) -> str:
    """How many global loads and stores the PTX issues, and how many of them are vector (.v2/.v4) accesses."""
    parts = []
    for op in ("ld", "st"):
        found = re.findall(rf"\b{op}\.global(\.[a-z0-9.]+)", ptx)
        vector = sum(1 for f in found if ".v2" in f or ".v4" in f or ".v8" in f)
        parts.append(f"{op} {len(found)} ({vector}v)")
    return " ".join(parts)


def compile_launch(case: str, launch: Launch, dtype: str) -> Row:
    from triton.backends.nvidia.compiler import CUDABackend

    target = GPUTarget("cuda", ARCH, 32)
    backend = CUDABackend(target)
    signature, constexprs, attrs, options = specialise(launch, backend)
    options = dict(options)
    options.setdefault("num_warps", 4)
    options["ptx_version"] = ptx_version(ARCH)
    start = time.perf_counter()
    kernel = triton.compile(ASTSource(launch.fn, signature, constexprs, attrs), target=target, options=options)
    seconds = time.perf_counter() - start
    meta = kernel.metadata
    figures = ptxas_figures(kernel.asm["ptx"], meta.name)
    names = [p.name for p in launch.fn.params]
    shown = {names[k[0]]: v for k, v in constexprs.items() if names[k[0]].isupper()}
    shown = {k: v if isinstance(v, (int, float, str)) else str(v) for k, v in shown.items()}
    return Row(case, launch.fn.__name__, dtype, meta.num_warps, meta.num_stages, figures["registers"],
               figures["spill_stores"], figures["spill_loads"], meta.shared, figures["ptxas_smem_bytes"],
               tensor_cores(kernel.asm["ptx"]), global_accesses(kernel.asm["ptx"]), round(seconds, 2), shown)


# ----------------------------------------------------------------------------- cases
def _fused_gemm():
    try:
        from moon3rt.kernels import fused_gemm
    except ImportError:  # a checkout from before the fused GEMM
        return None
    return fused_gemm


def cases(cfg: Moon3Config, dtype: torch.dtype) -> dict:
    """name -> a call of the host launcher with moon3-2b shapes and strides (2 items)."""
    t, v = cfg.text, cfg.vision
    items, patches, tokens = 2, 1024, 300  # 448x448 images, ~300 decoder tokens each
    P, T = items * patches, items * tokens
    hq, hk, hd = t.num_attention_heads, t.num_key_value_heads, t.head_dim
    g = torch.Generator().manual_seed(0)
    rnd = lambda *s, dt=dtype: torch.randn(*s, generator=g).to(dt)  # noqa: E731
    cu_v = torch.tensor([0, patches, P], dtype=torch.int32)
    cu_t = torch.tensor([0, tokens, T], dtype=torch.int32)
    vq, vk, vv = rnd(P, 3, v.num_heads, v.head_dim).unbind(1)  # the vision tower's fused qkv views
    qkv = rnd(T, (hq + 2 * hk) * hd)
    dq = qkv[:, : hq * hd].view(T, hq, hd)
    dk = qkv[:, hq * hd : (hq + hk) * hd].view(T, hk, hd)
    dv = qkv[:, (hq + hk) * hd :].view(T, hk, hd)
    vpos = torch.stack([torch.arange(P) % 32, torch.arange(P) // 32], -1)
    vinv = torch.rand(v.head_dim // 4)
    tpos = torch.arange(T).repeat(3, 1)
    tinv = torch.rand(hd // 2)
    cache = 64
    kc, vc = rnd(64, cache + 300, hk, hd), rnd(64, cache + 300, hk, hd)
    fusion_heads = cfg.moon3.fusion.num_heads
    fused_gemm = _fused_gemm()
    d = t.hidden_size
    out = {
        "varlen_attention vision": lambda: varlen_mod.varlen_attention(vq, vk, vv, cu_v, patches, causal=False),
        "varlen_attention decoder": lambda: varlen_mod.varlen_attention(dq, dk, dv, cu_t, tokens, causal=True),
        "vision_rope": lambda: rope.apply_vision_rope_(vq, vk, vpos, vinv),
        "mrope": lambda: rope.apply_mrope_(dq, dk, tpos, tinv, t.mrope_section),
        "bias_quick_gelu": lambda: quick_gelu.bias_quick_gelu(rnd(P, v.mlp_dim)),
        "swiglu_packed": lambda: swiglu.swiglu_packed(rnd(T, 2 * t.intermediate_size)),
        "layer_norm+residual": lambda: layer_norm.layer_norm(rnd(P, v.embed_dim), rnd(v.embed_dim), rnd(v.embed_dim),
                                                             1e-6, residual=rnd(P, v.embed_dim)),
        "rms_norm+residual": lambda: rms_norm.rms_norm(rnd(T, d), rnd(d), 1e-6, residual=rnd(T, d)),
        "decode_attention": lambda: decode_mod.decode_attention(
            rnd(64, hq, hd), kc, vc, torch.arange(64), torch.full((64,), cache), kv_chunk=256),
        "fusion_attention": lambda: fusion_attention.fusion_attention(
            rnd(items, fusion_heads, d, dt=torch.float32), rnd(items * 256, d), torch.tensor([0, 256, 512]),
            rnd(items * 32, d), torch.tensor([0, 32, 64]), rnd(items, fusion_heads, 2, dt=torch.float32)),
        "fire_prologue": lambda: fire.fire_prologue(rnd(items * 256, v.merged_dim), rnd(v.merged_dim),
                                                    rnd(cfg.moon3.fire.rank, v.merged_dim), 1e-6),
        "fire_inject": lambda: fire.fire_inject_(rnd(T, d), torch.arange(items * 256),
                                                 rnd(items * 256, cfg.moon3.fire.rank),
                                                 rnd(cfg.moon3.fire.rank, d), torch.tensor(0.3)),
    }
    if fused_gemm is not None:
        out["gemm+quick_gelu (fc1)"] = lambda: fused_gemm.linear_quick_gelu(
            rnd(P, v.embed_dim), rnd(v.mlp_dim, v.embed_dim), rnd(v.mlp_dim))
        out["gemm+swiglu (gate_up)"] = lambda: fused_gemm.linear_swiglu(rnd(T, d), rnd(2 * t.intermediate_size, d))
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dtype", default="bf16,fp32", help="comma list of bf16, fp16, fp32")
    parser.add_argument("--only", default=None, help="comma-separated case name prefixes")
    parser.add_argument("--json", default=None, help="also write the rows here")
    args = parser.parse_args(argv)
    dtypes = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
    cfg = Moon3Config.from_name("moon3-2b")
    rows, failures = [], []
    print(f"# sm_{ARCH}a, triton {triton.__version__}, {ptxas_path()}, moon3-2b shapes, commit {git_commit()}")
    print(f"{'case':<26} {'kernel':<30} {'dtype':<5} {'warps':>5} {'stg':>3} {'regs':>4} {'spill st/ld B':>13} "
          f"{'smem B':>7} {'mma':>5} {'global accesses':>22} {'compile s':>9}  constexprs")
    for name in (n.strip() for n in args.dtype.split(",")):
        dtype = dtypes[name]
        for case, call in cases(cfg, dtype).items():
            if args.only and not any(case.startswith(p) for p in args.only.split(",")):
                continue
            with gpu_launch_configs(), captured_launches() as launches:
                call()
            for launch in launches:
                try:
                    row = compile_launch(case, launch, name)
                except Exception as err:  # report, keep going
                    failures.append(f"{case} {launch.fn.__name__} {name}: {type(err).__name__}: {err}"[:500])
                    print(f"{case:<26} {launch.fn.__name__:<30} {name:<5} FAILED: {failures[-1]}")
                    continue
                rows.append(row)
                print(f"{row.case:<26} {row.kernel:<30} {row.dtype:<5} {row.num_warps:>5} {row.num_stages:>3} "
                      f"{row.registers:>4} {f'{row.spill_stores}/{row.spill_loads}':>13} {row.shared_bytes:>7} "
                      f"{row.tensor_cores:>5} {row.global_accesses:>22} {row.compile_s:>9.1f}  {row.constexprs}",
                      flush=True)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({
            "arch": f"sm_{ARCH}a", "triton": triton.__version__, "torch": torch.__version__, "model": "moon3-2b",
            "commit": git_commit(), "rows": [asdict(r) for r in rows], "failures": failures}, indent=2) + "\n")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
