"""Peak memory and reading overhead of `moon3rt encode` as the input grows.

    python bench/job_memory.py [--text-rows 10000 100000] [--image-rows 2000 20000] [--out /out/job_memory]

Each run is a fresh `python -m moon3rt encode` process writing Parquet shards; its peak
RSS comes from the kernel (wait4's ru_maxrss). Streaming is real when the peak does not
grow with the input: compare the small and the large run of each kind. Text rows come
from JSON lines; image rows from Parquet with a binary column of encoded JPEG bytes
(each image a different colour and size). The job's own summary splits its time into
reading/parsing the input and embedding it, which gives the reading overhead.
moon3-tiny, CPU, fp32.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from job_resume import COLOURS, write_input  # noqa: E402
from reporting import environment, write_json  # noqa: E402


def image_input(path: Path, rows: int, group: int = 1000) -> None:
    writer = None
    for start in range(0, rows, group):
        ids, titles, images = [], [], []
        for i in range(start, min(rows, start + group)):
            buf = io.BytesIO()
            Image.new("RGB", (48 + i % 5 * 8, 40 + i % 3 * 8), ((i * 37) % 256, (i * 91) % 256, (i * 53) % 256)) \
                .save(buf, format="JPEG", quality=90)
            ids.append(f"img-{i}")
            titles.append(f"{COLOURS[i % 7]} mug {i}")
            images.append(buf.getvalue())
        table = pa.table({"id": ids, "text": titles, "image": pa.array(images, pa.binary())})
        writer = writer or pq.ParquetWriter(path, table.schema)
        writer.write_table(table)  # one row group per `group` rows, as a catalogue export would have
    writer.close()


def measure(inp: Path, out: Path, chunk_rows: int) -> dict:
    shutil.rmtree(out, ignore_errors=True)
    cmd = [sys.executable, "-m", "moon3rt", "encode", "--input", str(inp), "--output", str(out), "--device", "cpu",
           "--chunk-rows", str(chunk_rows), "--no-progress"]
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    stdout, stderr = proc.stdout.read().decode(), proc.stderr.read().decode()
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"{cmd} failed:\n{stderr}")
    summary = json.loads((out / "_summary.json").read_text())
    return {"rows": summary["items"], "failures": summary["failures"], "peak_rss_mb": round(usage.ru_maxrss / 1024, 1),
            "wall_s": round(wall, 2), "job_s": round(summary["seconds"], 2),
            "read_s": round(summary["read_seconds"], 3), "encode_s": round(summary["encode_seconds"], 2),
            "read_overhead_pct": round(100 * summary["read_seconds"] / summary["encode_seconds"], 2),
            "items_per_s": summary["items_per_s"], "shards": summary["shards"], "summary_line": stdout.strip()}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--text-rows", type=int, nargs="*", default=[10_000, 100_000])
    p.add_argument("--image-rows", type=int, nargs="*", default=[2_000, 20_000])
    p.add_argument("--chunk-rows", type=int, default=1024)
    p.add_argument("--out", type=Path, default=Path("out/job_memory"))
    args = p.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    runs = []
    for kind, sizes, make, suffix in (("text/jsonl", args.text_rows, write_input, "jsonl"),
                                      ("image-bytes/parquet", args.image_rows, image_input, "parquet")):
        for rows in sizes:
            inp = args.out / f"{kind.split('/')[0]}-{rows}.{suffix}"
            make(inp, rows)
            result = {"input": kind, "input_mb": round(inp.stat().st_size / 1e6, 1),
                      **measure(inp, args.out / f"shards-{inp.stem}", args.chunk_rows)}
            runs.append(result)
            print(f"{kind:20s} {rows:7d} rows ({result['input_mb']} MB): peak RSS {result['peak_rss_mb']} MB, "
                  f"{result['items_per_s']:.1f} items/s, reading {result['read_overhead_pct']}% of embedding time")
            inp.unlink()
    report = {"benchmark": "job_memory", "environment": environment(torch.device("cpu")),
              "workload": {"model": "moon3-tiny", "dtype": "fp32", "chunk_rows": args.chunk_rows,
                           "text": "~40-char titles", "images": "48..80 x 40..56 px JPEG bytes + title"},
              "runs": runs}
    write_json(args.out / "job_memory.json", report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
