"""Process CPU time per item of the onnxruntime graphs and the torch backend, on a CPU.

On a shared host, wall-clock items/s move with whatever else runs; the CPU time a
process spends on a call (``time.process_time``, every thread of the process) moves far
less, so per-item costs across batch sizes and graphs compare within one run. Each
figure is the fastest of `--repeats` calls after one warm-up call, divided by the batch
size. Timed: ``backend.embed(pack(items))`` for the torch backend and the onnxruntime
backend with the standard-ops graph (``ops``) and the opset-23 ``Attention`` graph
(``onnx``), all at `--threads` threads (onnxruntime: ``intra_op_num_threads``, spinning
off). Items are the throughput benchmark's standard ones (bench/workload.py).

    python bench/onnx_cpu_time.py --model moon3-small --batch-sizes 1,8,16
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import reporting
import workload

import moon3rt
from moon3rt.backends.onnxruntime_backend import OnnxRuntimeBackend
from moon3rt.backends.torch_backend import TorchBackend
from moon3rt.batching import pack


def cpu_ms_per_item(embed, batch, repeats: int) -> float:
    with torch.inference_mode():
        embed(batch)
        best = float("inf")
        for _ in range(repeats):
            start = time.process_time()
            embed(batch)
            best = min(best, time.process_time() - start)
    return best / batch.num_items * 1e3


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="moon3-small", help="preset name or checkpoint directory")
    p.add_argument("--batch-sizes", default="1,8,16")
    p.add_argument("--image-size", type=int, help="square image side (default: the largest the model admits)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out-dir", default=str(reporting.REPO / "bench" / "results"))
    args = p.parse_args(argv)
    sizes = sorted({int(b) for b in args.batch_sizes.split(",")})
    threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        encoder = moon3rt.load(args.model, device="cpu", dtype="fp32")
        side = args.image_size or int(encoder.config.max_pixels**0.5) // 28 * 28
        raw = workload.make_items(max(sizes), side, encoder.prompt.tokenizer, 32, "JPEG")
        items = [encoder.prepare(item, i) for i, item in enumerate(raw)]
        cpu = torch.device("cpu")
        runners = {"torch": TorchBackend(encoder.model, cpu)}
        for graph in ("ops", "onnx"):
            runners[f"onnxruntime[{graph}]"] = OnnxRuntimeBackend(encoder.model, cpu, attention=graph)
        rows = []
        for size in sizes:
            batch = pack(items[:size], encoder.config.vision.spatial_merge_size)
            for name, backend in runners.items():
                ms = cpu_ms_per_item(backend.embed, batch, args.repeats)
                rows.append({"backend": name, "batch_size": size, "cpu_ms_per_item": ms,
                             "settings": getattr(backend, "settings", None) or None})
                print(f"{name:<20} batch {size:>3}: {ms:8.1f} ms CPU per item", flush=True)
    finally:
        torch.set_num_threads(threads)
    report = {"schema": "moon3rt-bench-onnx-cpu-time/1",
              "timestamp": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
              "environment": reporting.environment(cpu), "model": args.model, "dtype": "float32",
              "image_size": side, "threads": args.threads, "repeats": args.repeats,
              "decoder_tokens_per_item": sum(it.num_tokens for it in items) / len(items),
              "patches_per_item": sum(it.num_patches for it in items) / len(items), "results": rows}
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"onnx-cpu-time-{dt.datetime.now().strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {path}")
    return report


if __name__ == "__main__":
    main()
