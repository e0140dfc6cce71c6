"""Kernel benchmark: each fused op against its torch reference and torch.compile of it.

    python bench/bench_kernels.py                 # GPU: moon3-2b shapes, bf16
    python bench/bench_kernels.py --smoke         # CPU (Triton interpreter): tiny shapes

On a GPU every case is timed with `triton.testing.do_bench` (median) and reported as
GB/s (memory-bound ops) or TFLOP/s (attention, FIRE's GEMMs) beside the percentage of
the card's limit measured in the same run: HBM bandwidth from a large device-to-device
copy, bf16 matmul TFLOP/s from a large GEMM. On a CPU the run is a smoke test of the
harness (the interpreter's times mean nothing). Results go to bench/results/ as JSON
with the card, versions and commit.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import triton  # noqa: E402
import triton.testing  # noqa: E402

from moon3rt.config import Moon3Config  # noqa: E402
from moon3rt.kernels import fire as fire_ops  # noqa: E402
from moon3rt.kernels.decode_attention import decode_attention, decode_attention_ref  # noqa: E402
from moon3rt.kernels.fused_gemm import linear_quick_gelu, linear_swiglu  # noqa: E402
from moon3rt.kernels.fusion_attention import fusion_attention, fusion_attention_ref  # noqa: E402
from moon3rt.kernels.layer_norm import layer_norm, layer_norm_ref  # noqa: E402
from moon3rt.kernels.quick_gelu import bias_quick_gelu, bias_quick_gelu_ref  # noqa: E402
from moon3rt.kernels.rms_norm import rms_norm, rms_norm_ref  # noqa: E402
from moon3rt.kernels.rope import apply_mrope_, apply_mrope_ref, apply_vision_rope_, apply_vision_rope_ref  # noqa: E402
from moon3rt.kernels.swiglu import swiglu_packed, swiglu_packed_ref  # noqa: E402
from moon3rt.kernels.varlen_attention import varlen_attention, varlen_attention_ref  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
sys.path.insert(0, str(Path(__file__).resolve().parent))
import summary  # noqa: E402
from reporting import git_commit  # noqa: E402  (bench/ is a folder of scripts, not a package)
from timing import copy_bandwidth, matmul_ceiling  # noqa: E402


@dataclass
class Case:
    name: str
    shape: str
    kernel: Callable[[], object]
    reference: Callable[[], object]
    bytes: float  # minimal HBM traffic of one call
    flops: float  # useful floating-point operations of one call (0: memory-bound)
    sdpa: Callable[[], object] | None = None  # the padded-SDPA peer for attention


def timer(device: torch.device, smoke: bool) -> Callable[[Callable], float]:
    """Median milliseconds of fn."""
    if device.type == "cuda":
        return lambda fn: triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")

    def cpu(fn):
        fn()
        times = []
        for _ in range(1 if smoke else 5):
            start = time.perf_counter()
            fn()
            times.append((time.perf_counter() - start) * 1e3)
        return statistics.median(times)

    return cpu


def measured_limits(device: torch.device, dtype: torch.dtype) -> dict:
    """Memory bandwidth (GB/s, a large copy) and matmul TFLOP/s (a large GEMM) on this device."""
    ceiling = matmul_ceiling(device, dtype if device.type == "cuda" else torch.float32)
    return {"bandwidth_gbs": copy_bandwidth(device), "matmul_tflops": ceiling["tflops"],
            "matmul_dtype": ceiling["dtype"]}


def build_cases(cfg: Moon3Config, items: int, device: torch.device, dtype: torch.dtype) -> list[Case]:
    """Shapes of one batch of `items` products: 256 merged tokens (1024 patches) + ~70 text tokens each."""
    t, v = cfg.text, cfg.vision
    big = v.embed_dim > 100
    img_tokens, text_tokens, title_tokens = (256, 70, 32) if big else (16, 36, 8)  # per item
    per_item_tokens, per_item_patches = img_tokens + text_tokens, 4 * img_tokens
    T, P = items * per_item_tokens, items * per_item_patches
    d, dv, inter = t.hidden_size, v.embed_dim, t.intermediate_size
    hq, hk, hd = t.num_attention_heads, t.num_key_value_heads, t.head_dim
    g = torch.Generator(device=device).manual_seed(0)
    rnd = lambda *s, dt=dtype: torch.randn(*s, generator=g, device=device, dtype=torch.float32).to(dt)  # noqa: E731
    es = torch.tensor([], dtype=dtype).element_size()
    cases = []

    x, res, w = rnd(T, d), rnd(T, d), rnd(d)
    cases.append(Case("rms_norm+residual", f"({T}, {d})", lambda: rms_norm(x, w, 1e-6, residual=res),
                      lambda: rms_norm_ref(x, w, 1e-6, residual=res), 4 * T * d * es, 0))
    xv, rv, wv, bv = rnd(P, dv), rnd(P, dv), rnd(dv), rnd(dv)
    cases.append(Case("layer_norm+residual", f"({P}, {dv})", lambda: layer_norm(xv, wv, bv, 1e-6, residual=rv),
                      lambda: layer_norm_ref(xv, wv, bv, 1e-6, residual=rv), 4 * P * dv * es, 0))

    qkv = rnd(T, (hq + 2 * hk) * hd)
    q, k = qkv[:, : hq * hd].view(T, hq, hd), qkv[:, hq * hd : (hq + hk) * hd].view(T, hk, hd)
    pos = torch.arange(T, device=device).repeat(3, 1)
    inv = 1.0 / t.rope_theta ** (torch.arange(0, hd, 2, device=device, dtype=torch.float32) / hd)
    cases.append(Case("mrope(q,k)", f"q ({T}, {hq}, {hd}) k ({T}, {hk}, {hd})",
                      lambda: apply_mrope_(q, k, pos, inv, t.mrope_section),
                      lambda: apply_mrope_ref(q, k, pos, inv, t.mrope_section), 2 * T * (hq + hk) * hd * es, 0))
    vqkv = rnd(P, 3, v.num_heads, v.head_dim)
    vq, vk = vqkv[:, 0], vqkv[:, 1]
    vpos = torch.stack([torch.arange(P, device=device) % 32, torch.arange(P, device=device) // 32], -1)
    vinv = 1.0 / v.rope_theta ** (torch.arange(0, v.head_dim // 2, 2, device=device, dtype=torch.float32)
                                  / (v.head_dim // 2))
    cases.append(Case("vision_rope(q,k)", f"({P}, {v.num_heads}, {v.head_dim}) x2",
                      lambda: apply_vision_rope_(vq, vk, vpos, vinv), lambda: apply_vision_rope_ref(vq, vk, vpos, vinv),
                      2 * 2 * P * dv * es, 0))
    gu = rnd(T, 2 * inter)
    cases.append(Case("swiglu", f"({T}, 2x{inter})", lambda: swiglu_packed(gu), lambda: swiglu_packed_ref(gu),
                      3 * T * inter * es, 0))
    fc1, b1 = rnd(P, v.mlp_dim), rnd(v.mlp_dim)
    cases.append(Case("bias+quick_gelu", f"({P}, {v.mlp_dim})", lambda: bias_quick_gelu(fc1, b1),
                      lambda: bias_quick_gelu_ref(fc1, b1), 2 * P * v.mlp_dim * es, 0))

    # GEMM + activation: the fused epilogue against cuBLAS + the activation kernel (the backend's
    # "cublas" path, in the torch column): which one the triton backend should use on this card
    xv1, w1 = rnd(P, dv), rnd(v.mlp_dim, dv) / dv**0.5
    cases.append(Case("fc1+quick_gelu fused", f"({P}, {dv}) x ({v.mlp_dim}, {dv})^T",
                      lambda: linear_quick_gelu(xv1, w1, b1),
                      lambda: bias_quick_gelu(torch.nn.functional.linear(xv1, w1, b1)),
                      (P * dv + v.mlp_dim * dv + P * v.mlp_dim) * es, 2 * P * dv * v.mlp_dim))
    xt1, wgu = rnd(T, d), rnd(2 * inter, d) / d**0.5
    cases.append(Case("gate_up+swiglu fused", f"({T}, {d}) x ({2 * inter}, {d})^T",
                      lambda: linear_swiglu(xt1, wgu),
                      lambda: swiglu_packed(torch.nn.functional.linear(xt1, wgu)),
                      (T * d + 2 * inter * d + T * inter) * es, 2 * T * d * 2 * inter))

    # Attention: the decoder (causal, GQA, one segment per item) and the vision tower (one per image).
    # On a GPU the vision case is also run with other block shapes (`config=`), to confirm the default.
    vision_configs = [None]
    if device.type == "cuda":
        vision_configs += [{"BLOCK_M": 128, "BLOCK_N": 64, "num_warps": 8, "num_stages": 2},
                           {"BLOCK_M": 64, "BLOCK_N": 64, "num_warps": 4, "num_stages": 3, "maxnreg": 128}]
    for label, n_seg, seg, h_q, h_k, dim, causal, config in (
        ("varlen_attention decoder", items, per_item_tokens, hq, hk, hd, True, None),
        *(("varlen_attention vision" + (" " + _config_label(c) if c else ""), items, per_item_patches,
           v.num_heads, v.num_heads, v.head_dim, False, c) for c in vision_configs),
    ):
        n = n_seg * seg
        aq, ak, av = rnd(n, h_q, dim), rnd(n, h_k, dim), rnd(n, h_k, dim)
        cu = torch.arange(0, n + 1, seg, device=device, dtype=torch.int32)
        flops = 4 * n_seg * seg * seg * h_q * dim / (2 if causal else 1)
        pq, pk, pv = (z.view(n_seg, seg, -1, dim).transpose(1, 2) for z in (aq, ak, av))

        def sdpa(pq=pq, pk=pk, pv=pv, causal=causal):
            return torch.nn.functional.scaled_dot_product_attention(pq, pk, pv, is_causal=causal, enable_gqa=True)

        cases.append(Case(label, f"{n_seg} x {seg} tokens, Hq {h_q} Hk {h_k} D {dim}",
                          lambda aq=aq, ak=ak, av=av, cu=cu, seg=seg, causal=causal, config=config:
                          varlen_attention(aq, ak, av, cu, seg, causal, config=config),
                          lambda aq=aq, ak=ak, av=av, cu=cu, seg=seg, causal=causal:
                          varlen_attention_ref(aq, ak, av, cu, seg, causal),
                          4 * n * h_q * dim * es, flops, sdpa))

    # Reasoning mode's decode step: one query per item over its KV cache (one layer).
    cache_len = per_item_tokens + 32
    kc, vc = rnd(items, cache_len, hk, hd), rnd(items, cache_len, hk, hd)
    dq = rnd(items, hq, hd)
    slots = torch.arange(items, device=device)
    lengths = torch.full((items,), cache_len, device=device)
    chunk = 256 if device.type == "cuda" else None
    cases.append(Case("decode_attention", f"{items} items x {cache_len} cached, Hq {hq} Hk {hk} D {hd}",
                      lambda: decode_attention(dq, kc, vc, slots, lengths, kv_chunk=chunk),
                      lambda: decode_attention_ref(dq, kc, vc, slots, lengths),
                      2 * items * cache_len * hk * hd * es, 0))

    if cfg.moon3 is not None and cfg.moon3.fusion is not None:
        H = cfg.moon3.fusion.num_heads
        n_img, n_txt = img_tokens, title_tokens
        fq, fx_img, fx_txt = rnd(items, H, d, dt=torch.float32), rnd(items * n_img, d), rnd(items * n_txt, d)
        cu_i = torch.arange(0, items * n_img + 1, n_img, device=device, dtype=torch.int32)
        cu_t = torch.arange(0, items * n_txt + 1, n_txt, device=device, dtype=torch.int32)
        gl = rnd(items, H, 2, dt=torch.float32)
        cases.append(Case("fusion_attention", f"B {items} H {H} D {d}, {n_img} img + {n_txt} txt tokens each",
                          lambda: fusion_attention(fq, fx_img, cu_i, fx_txt, cu_t, gl),
                          lambda: fusion_attention_ref(fq, fx_img, cu_i, fx_txt, cu_t, gl, upcast=False),
                          items * (n_img + n_txt) * d * es, 0))
    if cfg.moon3 is not None and cfg.moon3.fire is not None:
        rank, K = cfg.moon3.fire.rank, v.merged_dim
        n_img = items * img_tokens
        z, nw, wd = rnd(n_img, K), rnd(K), rnd(rank, K)
        cases.append(Case("fire_prologue", f"Z ({n_img}, {K}) -> rank {rank}",
                          lambda: fire_ops.fire_prologue(z, nw, wd, 1e-6),
                          lambda: fire_ops.fire_prologue_ref(z, nw, wd, 1e-6),
                          n_img * K * es, 2 * n_img * K * rank))
        hidden, r, up = rnd(T, d), rnd(n_img, rank), rnd(rank, d)
        rows = torch.randperm(T, generator=g, device=device)[:n_img]
        alpha = torch.tensor(0.3, device=device)
        cases.append(Case("fire_inject", f"{n_img} of {T} rows, rank {rank} -> {d}",
                          lambda: fire_ops.fire_inject_(hidden, rows, r, up, alpha),
                          lambda: fire_ops.fire_inject_ref(hidden, rows, r, up, alpha),
                          2 * n_img * d * es, 2 * n_img * rank * d))
    return cases


def _config_label(config: dict) -> str:
    label = f"{config['BLOCK_M']}x{config['BLOCK_N']}w{config['num_warps']}s{config['num_stages']}"
    return label + (f"r{config['maxnreg']}" if "maxnreg" in config else "")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="preset (default: moon3-2b on GPU, moon3-tiny on CPU)")
    parser.add_argument("--items", type=int, default=None, help="items per batch (default: 64 GPU, 2 CPU)")
    parser.add_argument("--dtype", default=None, help="bf16 (GPU default), fp16, fp32 (CPU default)")
    parser.add_argument("--smoke", action="store_true", help="one timing pass per case (CPU harness check)")
    parser.add_argument("--no-compile", action="store_true", help="skip torch.compile of the references")
    parser.add_argument("--only", default=None, help="comma-separated case name prefixes")
    parser.add_argument("--out-dir", default=str(RESULTS))
    args = parser.parse_args(argv)

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    gpu = device.type == "cuda"
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[
        args.dtype or ("bf16" if gpu else "fp32")]
    cfg = Moon3Config.from_name(args.model or ("moon3-2b" if gpu else "moon3-tiny"))
    items = args.items or (64 if gpu else 2)
    smoke = args.smoke or not gpu
    bench = timer(device, smoke)
    limits = measured_limits(device, dtype)
    cases = build_cases(cfg, items, device, dtype)
    if args.only:
        prefixes = args.only.split(",")
        cases = [c for c in cases if any(c.name.startswith(p) for p in prefixes)]
    use_compile = gpu and not args.no_compile
    card = torch.cuda.get_device_name(device) if gpu else platform.processor() or platform.machine()
    print(f"# kernels on {card} ({'Triton interpreter: smoke only, times are not kernel speed' if not gpu else 'CUDA'})"
          f", {dtype}, {cfg_name(args, gpu)}, {items} items per batch")
    print(f"# measured limits: {limits['bandwidth_gbs']:.0f} GB/s copy, {limits['matmul_tflops']:.1f} TFLOP/s "
          f"{limits['matmul_dtype']} matmul")
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tag = "gpu" if gpu else "cpu-smoke"
    path = out_dir / f"kernels-{tag}-{dt.datetime.now().strftime('%Y%m%d-%H%M%S')}.json"
    record = {
        "benchmark": "kernels",
        "timestamp": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "device": card, "device_type": device.type, "interpreter": not gpu,
        "dtype": str(dtype).replace("torch.", ""), "model": cfg_name(args, gpu), "items": items,
        "versions": {"torch": torch.__version__, "triton": triton.__version__, "python": sys.version.split()[0],
                     "cuda": torch.version.cuda, "driver": _driver()},
        "commit": git_commit(), "limits": limits, "results": [],
    }
    rows = record["results"]
    header = f"{'op':<26} {'shape':<44} {'triton ms':>9} {'torch ms':>9} {'compile ms':>10} {'speedup':>7} " \
             f"{'achieved':>14} {'% limit':>7}"
    print(header)
    for case in cases:
        row = {"op": case.name, "shape": case.shape, "bytes": case.bytes, "flops": case.flops}
        try:
            row["triton_ms"] = bench(case.kernel)
            row["torch_ms"] = bench(case.reference)
            if use_compile:
                try:
                    compiled = torch.compile(case.reference)
                    row["compile_ms"] = bench(compiled)
                except Exception as err:  # report, keep going
                    row["compile_error"] = f"{type(err).__name__}: {err}"[:200]
            if case.sdpa is not None and gpu:
                row["sdpa_padded_ms"] = bench(case.sdpa)
        except Exception as err:
            row["error"] = f"{type(err).__name__}: {err}"[:300]
            print(f"{case.name:<26} {case.shape:<44} failed: {row['error']}")
            rows.append(row)
            path.write_text(json.dumps(record, indent=2, default=_json_default))
            continue
        secs = row["triton_ms"] / 1e3
        if case.flops:
            row["tflops"] = case.flops / secs / 1e12
            row["pct_limit"] = 100 * row["tflops"] / limits["matmul_tflops"]
            achieved = f"{row['tflops']:.1f} TFLOP/s"
        else:
            row["gbs"] = case.bytes / secs / 1e9
            row["pct_limit"] = 100 * row["gbs"] / limits["bandwidth_gbs"]
            achieved = f"{row['gbs']:.0f} GB/s"
        speedup = row["torch_ms"] / row["triton_ms"]
        comp = f"{row['compile_ms']:.3f}" if "compile_ms" in row else "-"
        print(f"{case.name:<26} {case.shape:<44} {row['triton_ms']:9.3f} {row['torch_ms']:9.3f} {comp:>10} "
              f"{speedup:6.2f}x {achieved:>14} {row['pct_limit']:6.1f}%"
              + (f"  (SDPA flash, padded: {row['sdpa_padded_ms']:.3f} ms)" if "sdpa_padded_ms" in row else ""))
        rows.append(row)
        path.write_text(json.dumps(record, indent=2, default=_json_default))  # partial results survive a timeout
    record["goals"] = summary.kernel_goals(record)
    record["goals_verdict"] = summary.verdict(record["goals"], bool(record["goals"]) and record["goals"][0]["applies"])
    for g in record["goals"]:
        shown = "-" if g["measured"] is None else f"{g['measured']:.2f}"
        print(f"# goal {g['goal']:<48} {g['target']:>7}  measured {shown:>8}  {g['status']}")
    print(f"# {record['goals_verdict']['text']}")
    path.write_text(json.dumps(record, indent=2, default=_json_default))
    print(f"# wrote {path}")
    return 1 if any("error" in r for r in rows) else 0


def cfg_name(args, gpu: bool) -> str:
    return args.model or ("moon3-2b" if gpu else "moon3-tiny")


def _driver() -> str | None:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=10)
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def _json_default(obj):
    if isinstance(obj, float) and math.isnan(obj):
        return None
    return str(obj)


if __name__ == "__main__":
    sys.exit(main())
