"""End-to-end throughput of moon3rt against its peers, on the standard workload.

Standard item: one 448x448 product photo (1024 patches, 256 merged tokens) plus a title
of about 32 tokens, drawn deterministically (bench/workload.py). Default model:
``moon3-2b`` with random weights in bf16 on a GPU; ``moon3-tiny`` in fp32 on the CPU,
where the image shrinks to what the tiny preset admits (224x224, 64 merged tokens).

For every backend and batch size the model part is timed: items already preprocessed
and packed, ``backend.embed(batch)`` with a device synchronisation around each call,
after a warm-up. Reported: items/s, tokens/s (decoder tokens + vision patches), batch
latency p50/p99, peak memory, achieved TFLOP/s and its share of a dense matmul measured
in the same run (FLOPs counted from the config: bench/flop_count.py). Separately:
single-item latency, ``Encoder.encode`` items/s with preprocessing, and preprocessing
images/s per CPU core for JPEG and PNG. On a CPU, torch runs one thread by default
(per-core figures, steady on a shared host; --threads to change).

Peers, same weights and inputs: transformers' ``Qwen2VLModel`` (sdpa, right-padded
batches, last-token pooling; the backbone only, no FIRE/MHMF) and ``torch.compile`` of
the reference model (default on CUDA only: on a CPU it compiles for minutes). Every
moon3rt backend in ``moon3rt.backends.BACKENDS`` is tried. Before timing, each one's
vectors are checked against the reference torch backend (cosine > 0.9999 in fp32,
> 0.999 in bf16/fp16); one that fails is reported and not timed.

    python bench/throughput.py                                   # defaults for this machine
    python bench/throughput.py --batch-sizes 1,16,64 --duration 3
    python bench/throughput.py --model moon3-tiny --backends torch --no-plot
"""

from __future__ import annotations

import argparse
import datetime as dt
import gc
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # sibling modules, however this file is loaded

import reporting  # noqa: E402
import runners  # noqa: E402
import summary  # noqa: E402
import timing  # noqa: E402
import workload  # noqa: E402
from flop_count import flop_breakdown, flops_per_item  # noqa: E402
from runners import PEERS  # noqa: E402

import moon3rt  # noqa: E402
from moon3rt.api import Encoder, resolve_device, resolve_dtype  # noqa: E402
from moon3rt.backends import BACKENDS  # noqa: E402
from moon3rt.batching import pack  # noqa: E402
from moon3rt.config import Moon3Config  # noqa: E402

__all__ = ["flop_breakdown", "flops_per_item", "main"]

STANDARD_IMAGE = 448
DESIGN_TFLOP_PER_ITEM = 2.3  # DESIGN.md section 4: Qwen2-VL-2B class, 256 merged tokens + ~32 title tokens
MAX_DISTINCT_BATCHES = 8  # distinct packed batches per batch size (bounds host memory)


def log(msg: str) -> None:
    print(f"[throughput] {msg}", file=sys.stderr, flush=True)


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="preset name or checkpoint directory "
                                   "(default: moon3-2b on CUDA, moon3-tiny on CPU)")
    p.add_argument("--device", help="cuda or cpu (default: cuda when present)")
    p.add_argument("--dtype", help="fp32, bf16 or fp16 (default: bf16 on CUDA, fp32 on CPU)")
    p.add_argument("--backends", default="auto",
                   help="comma list of moon3rt backends and peers (transformers, torch.compile); "
                        "'auto' = every moon3rt backend + transformers + torch.compile on CUDA")
    p.add_argument("--batch-sizes", help="comma list (default: 1,16,64 on CUDA, 1,8 on CPU)")
    p.add_argument("--image-size", type=int,
                   help=f"square image side in pixels (default {STANDARD_IMAGE}, or the largest the model admits)")
    p.add_argument("--text-tokens", type=int, default=32, help="title length in tokens (default 32)")
    p.add_argument("--duration", type=float, help="seconds of timed calls per measurement (default 5 CUDA, 2 CPU)")
    p.add_argument("--warmup", type=float, help="seconds of warm-up per measurement (default duration / 4)")
    p.add_argument("--items", type=int, help="distinct items in the workload (default max(16, 2 x largest batch))")
    p.add_argument("--threads", type=int,
                   help="torch intra-op threads (default on CPU: 1, so figures are per core and steady on a "
                        "shared host; on CUDA: torch's own choice)")
    p.add_argument("--out-dir", default=str(reporting.REPO / "bench" / "results"), help="where JSON and PNG go")
    p.add_argument("--no-plot", action="store_true", help="write no PNG")
    p.add_argument("--skip-peers", action="store_true", help="time moon3rt backends only")
    p.add_argument("--no-compile", action="store_true", help="leave torch.compile out")
    p.add_argument("--no-single-item", action="store_true",
                   help="time only --batch-sizes (no extra batch-1 latency run; e.g. one torch.compile measurement)")
    p.add_argument("--reasoning", action="store_true",
                   help="also time reasoning mode (generate attributes, then <emb>) per moon3rt backend that can")
    p.add_argument("--reasoning-only", action="store_true",
                   help="with --reasoning: check the backends, then time reasoning mode only")
    p.add_argument("--reasoning-tokens", type=int, default=64, help="reasoning budget per item (default 64)")
    p.add_argument("--include-results", action="append", default=[], metavar="JSON",
                   help="add the rows of an earlier run's JSON (same device, model, dtype and workload) to the "
                        "table, plot and goals, e.g. to split a slow torch.compile run from the rest")
    args = p.parse_args(argv)
    args.device = resolve_device(args.device)
    args.dtype = resolve_dtype(args.dtype, args.device)
    cuda = args.device.type == "cuda"
    args.model = args.model or ("moon3-2b" if cuda else "moon3-tiny")
    args.batch_sizes = sorted({int(b) for b in (args.batch_sizes or ("1,16,64" if cuda else "1,8")).split(",")})
    if args.batch_sizes[0] <= 0:
        p.error("--batch-sizes must be positive")
    args.duration = args.duration if args.duration is not None else (5.0 if cuda else 2.0)
    args.warmup = args.warmup if args.warmup is not None else args.duration / 4
    args.items = args.items or max(16, 2 * args.batch_sizes[-1])
    args.reasoning = args.reasoning or args.reasoning_only
    if args.threads is None and not cuda:
        args.threads = 1
    return args


def backend_names(args) -> list[str]:
    requested = [n.strip() for n in args.backends.split(",") if n.strip()]
    if requested == ["auto"]:
        requested = list(BACKENDS) + ["transformers"]
        if args.device.type == "cuda":
            requested.append("torch.compile")
    if args.skip_peers:
        requested = [n for n in requested if n not in PEERS]
    if args.no_compile:
        requested = [n for n in requested if n != "torch.compile"]
    return list(dict.fromkeys(requested))


def choose_image_size(cfg: Moon3Config, requested: int | None) -> tuple[int, str]:
    """The image side to use and a note saying why, when it is not the standard 448."""
    if requested is not None:
        if requested**2 > cfg.max_pixels:
            old = cfg.max_pixels
            cfg.max_pixels = requested**2
            return requested, (f"max_pixels raised from {old} to {requested}^2 so the "
                               f"{requested}x{requested} image is not shrunk")
        return requested, "" if requested == STANDARD_IMAGE else f"non-standard image size {requested}x{requested}"
    if STANDARD_IMAGE**2 <= cfg.max_pixels:
        return STANDARD_IMAGE, ""
    side = int(cfg.max_pixels**0.5) // 28 * 28
    return side, (f"this model admits at most {cfg.max_pixels // 784} merged tokens (max_pixels={cfg.max_pixels}), "
                  f"so images are {side}x{side} instead of the standard 448x448 "
                  f"(--image-size 448 raises max_pixels)")


def batches_of(items: list, size: int) -> list[list]:
    """Up to MAX_DISTINCT_BATCHES batches of `size` items, cycling over the workload."""
    count = max(1, min(MAX_DISTINCT_BATCHES, len(items) // size))
    return [[items[(k * size + j) % len(items)] for j in range(size)] for k in range(count)]


def preprocess_rate(encoder: Encoder, items: list[dict], duration: float) -> dict:
    """`Encoder.prepare` on encoded bytes in one thread: images/s per CPU core."""
    for i, item in enumerate(items[:2]):
        encoder.prepare(item, i)
    count, start = 0, time.perf_counter()
    while count < len(items) or time.perf_counter() - start < duration:
        encoder.prepare(items[count % len(items)], count)
        count += 1
    seconds = time.perf_counter() - start
    return {"images_per_s_per_core": count / seconds, "images": count, "seconds": seconds,
            "mean_file_bytes": float(np.mean([len(it["image"]) for it in items]))}


class Run:
    """One benchmark run: the loaded encoder, the workload, and the report being filled in."""

    def __init__(self, args):
        self.args = args
        self.device, self.dtype = args.device, args.dtype
        t0 = time.perf_counter()
        self.encoder = moon3rt.load(args.model, device=self.device, dtype=self.dtype)
        self.cfg = self.encoder.config
        log(f"loaded {args.model} ({self.device}, {self.dtype}) in {time.perf_counter() - t0:.1f} s")
        self.image_size, note = choose_image_size(self.cfg, args.image_size)
        self.notes = [note] if note else []
        tokenizer = self.encoder.prompt.tokenizer
        t0 = time.perf_counter()
        self.raw = workload.make_items(args.items, self.image_size, tokenizer, args.text_tokens, "JPEG")
        self.items = [self.encoder.prepare(item, i) for i, item in enumerate(self.raw)]
        self.item_flops = {id(p): flops_per_item(self.cfg, [im.num_patches for im in p.images],
                                                 p.num_tokens, len(p.title_positions)) for p in self.items}
        log(f"workload: {args.items} items of {self.image_size}x{self.image_size} "
            f"in {time.perf_counter() - t0:.1f} s")
        self.threshold = 0.9999 if self.dtype == torch.float32 else 0.999
        self.bandwidth_gbs = None
        stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
        where = "cpu" if self.device.type == "cpu" else reporting.slug(torch.cuda.get_device_name(self.device))
        self.out_dir = Path(args.out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.stem = f"throughput-{where}-{stamp}"
        self.report = {
            "schema": "moon3rt-bench-throughput/1",
            "timestamp": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
            "environment": reporting.environment(self.device),
            "config": self.config_section(),
            "workload": self.workload_section(),
            "flops": self.flops_section(),
            "ceiling": None, "preprocess": {}, "checks": [], "results": [], "single_item": {},
            "end_to_end": [], "skipped": [], "goals": [], "notes": self.notes, "files": {},
        }

    # --------------------------------------------------------------------- report parts
    def config_section(self) -> dict:
        a = self.args
        return {"model": a.model, "device": str(self.device), "dtype": str(self.dtype).replace("torch.", ""),
                "backends": backend_names(a), "batch_sizes": a.batch_sizes, "image_size": self.image_size,
                "text_tokens": a.text_tokens, "threads": torch.get_num_threads(), "duration_s": a.duration,
                "warmup_s": a.warmup, "items": a.items,
                "cosine_threshold": self.threshold,
                "host_pixels": ("page-locked; uint8 for torch/triton/torch.compile (normalised in the patch "
                                "embedding), the model's dtype for transformers, fp32 for the exported graphs"
                                if self.device.type == "cuda" else "uint8 (fp32 for transformers and the exported "
                                "graphs), pageable (CPU run: no copy)"),
                "model_config": self.cfg.to_dict()}

    def workload_section(self) -> dict:
        def mean(values) -> float:
            return float(np.mean(list(values)))

        merge = self.cfg.vision.spatial_merge_size**2
        return {"image_size": self.image_size, "image_format": "JPEG q90",
                "patches_per_item": mean(it.num_patches for it in self.items),
                "merged_image_tokens_per_item": mean(it.num_patches // merge for it in self.items),
                "decoder_tokens_per_item": mean(it.num_tokens for it in self.items),
                "title_tokens_per_item": mean(len(it.title_positions) for it in self.items),
                "tokens_per_item": mean(it.cost for it in self.items)}  # decoder tokens + vision patches

    def flops_section(self) -> dict:
        first = self.items[0]
        merged = first.num_patches // self.cfg.vision.spatial_merge_size**2
        template = first.num_tokens - merged - len(first.title_positions)
        # The DESIGN.md reference item: moon3-2b, 448x448 (1024 patches, 256 merged) + ~32 title tokens.
        ref_tokens = 256 + template + 32
        ref = flop_breakdown(Moon3Config.from_name("moon3-2b"), 1024, ref_tokens, 32)
        ref_total = sum(ref.values())
        vision = ref["vision"] + ref["merger"]
        return {
            "per_item": float(np.mean(list(self.item_flops.values()))),
            "breakdown_first_item": flop_breakdown(self.cfg, [im.num_patches for im in first.images],
                                                   first.num_tokens, len(first.title_positions)),
            "reference_2b": {"decoder_tokens": ref_tokens, "template_tokens": template, "tflop": ref_total / 1e12,
                             "vision_share": vision / ref_total, "design_md_tflop": DESIGN_TFLOP_PER_ITEM,
                             "design_md_vision_share": 0.65,
                             "relative_difference": ref_total / 1e12 / DESIGN_TFLOP_PER_ITEM - 1,
                             "breakdown": ref},
        }

    def save(self) -> Path:
        path = self.out_dir / f"{self.stem}.json"
        self.report["files"]["json"] = str(path)
        reporting.write_json(path, self.report)
        return path

    # ------------------------------------------------------------------------- stages
    def measure_ceiling(self) -> None:
        self.report["ceiling"] = c = timing.matmul_ceiling(self.device, self.dtype, min(1.0, self.args.duration))
        log(f"matmul ceiling: {c['tflops']:.3f} TFLOP/s ({c['dtype']}, {c['shape']})")

    def measure_preprocessing(self) -> None:
        k = min(len(self.raw), 16)
        for fmt in ("JPEG", "PNG"):
            sample = [{"text": self.raw[i]["text"],
                       "image": workload.encode_image(workload.product_image(i, self.image_size), fmt)}
                      for i in range(k)]
            r = preprocess_rate(self.encoder, sample, min(self.args.duration, 2.0))
            r["image_size"] = self.image_size
            self.report["preprocess"][fmt.lower()] = r
            log(f"preprocess {fmt}: {r['images_per_s_per_core']:.1f} images/s per core")

    def make_runner(self, name: str):
        if name == "transformers":
            pad = self.encoder.prompt.tokenizer.token_to_id("<|endoftext|>") or 0
            return runners.TransformersRunner(self.encoder.model, self.device, self.dtype, pad)
        if name == "torch.compile":
            return runners.CompiledRunner(self.encoder.model, self.device)
        if name not in BACKENDS:
            raise ValueError(f"not a moon3rt backend (moon3rt.backends.BACKENDS = {list(BACKENDS)}) nor a peer")
        return runners.BackendRunner(name, self.encoder.model, self.device)

    def check(self, runner, reference) -> bool:
        check_items = self.items[:4]
        if runner.name == "transformers":
            expected = runners.backbone_reference(self.encoder.model, check_items, self.device)
            against = "moon3rt backbone (FIRE off), last-token pooled"
        else:
            expected = reference
            against = "torch backend" if runner.name != "torch" else "torch backend (itself: the reference)"
        out = runner.run(runner.prepare(check_items))
        timing.synchronize(self.device)
        cos = runners.min_cosine(out, expected)
        passed = bool(cos > self.threshold)
        self.report["checks"].append({"backend": runner.name, "min_cosine": cos, "threshold": self.threshold,
                                      "against": against, "items": len(check_items), "passed": passed})
        log(f"check {runner.name}: min cosine {cos:.6f} vs {against} -> {'ok' if passed else 'FAILED'}")
        return passed

    def time_runner(self, runner) -> None:
        flops_total = self.report["ceiling"]["tflops"] * 1e12
        sizes = list(self.args.batch_sizes)
        if 1 not in sizes and not self.args.no_single_item:
            sizes = [1] + sizes  # single-item latency
        for size in sizes:
            groups = batches_of(self.items, size)
            inputs = [runner.prepare(g) for g in groups]
            try:
                with timing.PeakMemory(self.device) as mem:
                    t = timing.time_calls(runner.run, inputs, self.device, self.args.duration if size in
                                          self.args.batch_sizes else self.args.duration / 2, self.args.warmup)
            except (RuntimeError, ValueError) as err:
                self.report["skipped"].append({"backend": runner.name, "batch_size": size, "reason": repr(err)})
                log(f"{runner.name} batch {size}: FAILED {err!r}")
                if self.device.type == "cuda":
                    torch.cuda.empty_cache()
                continue
            # Every call covers one of the distinct batches, in turn; average over what was timed.
            per_call_tokens = [sum(p.cost for p in groups[i % len(groups)]) for i in range(len(t.latencies_s))]
            per_call_flops = [sum(self.item_flops[id(p)] for p in groups[i % len(groups)])
                              for i in range(len(t.latencies_s))]
            seconds = t.total_s
            row = {
                "backend": runner.name, "batch_size": size,
                "items_per_s": size * len(t.latencies_s) / seconds,
                "items_per_s_at_p50": size / (t.percentile_ms(50) / 1e3),  # robust to stalls on a shared host
                "tokens_per_s": sum(per_call_tokens) / seconds,
                "latency_ms": {"p50": t.percentile_ms(50), "p99": t.percentile_ms(99),
                               "mean": seconds / len(t.latencies_s) * 1e3},
                "calls": len(t.latencies_s), "warmup_s": t.warmup_s,
                "peak_memory_mib": mem.peak_mib, "memory_at_start_mib": mem.start_mib, "memory_kind": mem.kind,
                "tflops": sum(per_call_flops) / seconds / 1e12,
                "pct_roofline": 100 * sum(per_call_flops) / seconds / flops_total,
            }
            settings = getattr(getattr(runner, "backend", None), "settings", None)  # e.g. onnxruntime's session
            if settings:
                row["backend_settings"] = settings
            if size == 1:
                self.report["single_item"][runner.name] = {"p50_ms": row["latency_ms"]["p50"],
                                                           "p99_ms": row["latency_ms"]["p99"], "calls": row["calls"]}
            if size in self.args.batch_sizes:
                self.report["results"].append(row)
            log(f"{runner.name} batch {size}: {row['items_per_s']:.1f} items/s, p50 {row['latency_ms']['p50']:.2f} ms "
                f"(warm-up {t.warmup_s:.1f} s)")
            del inputs

    def end_to_end(self, name: str) -> None:
        """`Encoder.encode` on the encoded items: preprocessing (worker threads) + batching + model."""
        encoder = Encoder(self.encoder.model, self.encoder.prompt.tokenizer, self.device, self.dtype, backend=name,
                          name=self.args.model, image_mean=self.encoder.image_mean, image_std=self.encoder.image_std)
        size = self.args.batch_sizes[-1]
        encoder.encode(self.raw[:size], batch_size=size)  # warm-up
        timing.synchronize(self.device)
        t0 = time.perf_counter()
        encoder.encode(self.raw, batch_size=size)
        timing.synchronize(self.device)
        seconds = time.perf_counter() - t0
        row = {"backend": name, "batch_size": size, "items": len(self.raw), "seconds": seconds,
               "items_per_s": len(self.raw) / seconds, "num_workers": min(4, os.cpu_count() or 1)}
        self.report["end_to_end"].append(row)
        log(f"encode() end to end, {name}, batch {size}: {row['items_per_s']:.1f} items/s")

    def reasoning_stage(self, name: str) -> None:
        """Reasoning mode at the largest batch size: items/s, generated tokens/s, decode GB/s.

        Decode time = generate time - the direct forward of the same prompts (the prefill).
        Decode traffic per step is estimated as the decoder's weights plus the LM head read
        once, plus every active item's cached keys and values read once.
        """
        from moon3rt.generate import decoder_for, generate

        encoder = Encoder(self.encoder.model, self.encoder.prompt.tokenizer, self.device, self.dtype, backend=name,
                          name=self.args.model, image_mean=self.encoder.image_mean,
                          image_std=self.encoder.image_std)
        plan = encoder.reasoning_plan(self.args.reasoning_tokens)
        lm_weight = encoder.model.output_embeddings()
        merge = self.cfg.vision.spatial_merge_size
        prompts = [encoder.prepare(item, i, reasoning=True) for i, item in enumerate(self.raw)]
        size = self.args.batch_sizes[-1]
        batches = [pack(group, merge) for group in batches_of(prompts, size)]
        decoder = decoder_for(encoder.backend)
        generate(decoder, batches[0], plan, lm_weight)  # warm-up (and compilation)
        timing.synchronize(self.device)
        t0 = time.perf_counter()
        for batch in batches:
            encoder.backend.embed(batch)
        timing.synchronize(self.device)
        prefill_s = time.perf_counter() - t0
        generated = steps = 0
        kv_bytes = 0.0
        t = self.cfg.text
        es = torch.tensor([], dtype=self.dtype).element_size()
        per_token_kv = t.num_hidden_layers * 2 * t.num_key_value_heads * t.head_dim * es
        t0 = time.perf_counter()
        for batch in batches:
            out = generate(decoder, batch, plan, lm_weight)
            lengths = (batch.cu_seqlens[1:] - batch.cu_seqlens[:-1]).tolist()
            for length, tokens in zip(lengths, out.tokens):
                n = len(tokens) + len(plan.close_ids) + 1
                generated += len(tokens)
                kv_bytes += per_token_kv * (n * length + n * (n - 1) / 2)  # one read of the cache per step
            steps += out.steps
        timing.synchronize(self.device)
        total_s = time.perf_counter() - t0
        decode_s = max(total_s - prefill_s, 1e-9)
        lm = encoder.model.language_model
        weight_bytes = sum(p.numel() for p in lm.layers.parameters()) * es + lm_weight.numel() * es
        decode_bytes = steps * weight_bytes + kv_bytes
        row = {"backend": name, "batch_size": size, "items": len(prompts), "reasoning_tokens": plan.max_tokens,
               "seconds": total_s, "prefill_s": prefill_s, "decode_s": decode_s, "decode_steps": steps,
               "items_per_s": len(prompts) / total_s, "generated_tokens": generated,
               "generated_tokens_per_s": generated / total_s,
               "decode_gb_per_s": decode_bytes / decode_s / 1e9}
        if self.bandwidth_gbs:
            row["decode_pct_bandwidth"] = 100 * row["decode_gb_per_s"] / self.bandwidth_gbs
        self.report.setdefault("reasoning", []).append(row)
        log(f"reasoning {name}, batch {size}: {row['items_per_s']:.1f} items/s, "
            f"{row['generated_tokens_per_s']:.0f} generated tokens/s, decode {row['decode_gb_per_s']:.0f} GB/s")

    def include(self, path: Path) -> None:
        """Rows of an earlier run that this one did not measure, marked with their source."""
        earlier = json.loads(path.read_text())
        mine, theirs = self.report, earlier
        keys = ("model", "dtype", "image_size", "text_tokens")
        if (theirs["environment"]["device_name"] != mine["environment"]["device_name"]
                or any(theirs["config"][k] != mine["config"][k] for k in keys)):
            self.notes.append(f"{path} not included: another device, model, dtype or workload")
            return
        measured = {(r["backend"], r["batch_size"]) for r in mine["results"]}
        added = [dict(r, source=str(path)) for r in theirs["results"]
                 if (r["backend"], r["batch_size"]) not in measured]
        mine["results"].extend(added)
        for name, single in theirs["single_item"].items():
            mine["single_item"].setdefault(name, dict(single, source=str(path)))
        if added:
            names = ", ".join(dict.fromkeys(r["backend"] for r in added))
            self.notes.append(f"rows marked * ({names}) come from {path}, measured in an earlier run")

    def run(self) -> dict:
        self.save()
        self.measure_ceiling()
        self.measure_preprocessing()
        self.save()
        reference = self.encoder.backend.embed(pack(self.items[:4], self.cfg.vision.spatial_merge_size))
        timed_backends = []
        for name in backend_names(self.args):
            try:
                runner = self.make_runner(name)
                ok = self.check(runner, reference)
            except Exception as err:  # a peer or backend that cannot run here is reported, not fatal
                self.report["skipped"].append({"backend": name, "reason": f"{type(err).__name__}: {err}"})
                log(f"{name}: skipped ({type(err).__name__}: {err})")
                continue
            if not ok:
                self.report["skipped"].append({"backend": name, "reason": "failed the embedding check"})
                continue
            if not self.args.reasoning_only:
                self.time_runner(runner)
            if name not in PEERS:
                timed_backends.append(name)
            del runner
            gc.collect()
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
            self.save()
        for name in [] if self.args.reasoning_only else timed_backends:
            try:
                self.end_to_end(name)
            except Exception as err:
                self.report["skipped"].append({"backend": name, "stage": "end_to_end",
                                               "reason": f"{type(err).__name__}: {err}"})
        if self.args.reasoning:
            self.bandwidth_gbs = timing.copy_bandwidth(self.device)
            self.report["bandwidth_gbs"] = self.bandwidth_gbs
            for name in timed_backends:
                try:
                    self.reasoning_stage(name)
                except Exception as err:
                    self.report["skipped"].append({"backend": name, "stage": "reasoning",
                                                   "reason": f"{type(err).__name__}: {err}"})
                    log(f"reasoning {name}: skipped ({type(err).__name__}: {err})")
                self.save()
        for path in self.args.include_results:
            self.include(Path(path))
        self.report["goals"] = summary.goals(self.report)
        self.report["goals_verdict"] = summary.verdict(self.report["goals"], bool(self.report["goals"])
                                                       and self.report["goals"][0]["applies"])
        if not self.args.no_plot and self.report["results"]:
            png = self.out_dir / f"{self.stem}.png"
            c = self.report["config"]
            tool = reporting.plot(png, self.report["results"],
                                  f"moon3rt throughput: {c['model']} {c['dtype']} on "
                                  f"{self.report['environment']['device_name']} ({self.image_size}px + "
                                  f"{self.args.text_tokens} title tokens)")
            self.report["files"]["png"] = str(png)
            self.report["files"]["png_tool"] = tool
        self.save()
        return self.report


def main(argv=None) -> dict:
    args = parse_args(argv)
    threads = torch.get_num_threads()
    if args.threads:
        torch.set_num_threads(args.threads)
    start = time.perf_counter()
    try:
        report = Run(args).run()
    finally:
        torch.set_num_threads(threads)  # main() may run inside another program (the smoke test)
    report["wall_s"] = time.perf_counter() - start
    reporting.write_json(Path(report["files"]["json"]), report)
    summary.print_report(report)
    return report


if __name__ == "__main__":
    main()
