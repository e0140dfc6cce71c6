"""Kill -9 a `moon3rt encode` job at random moments, resume it, and check nothing is lost.

    python bench/job_resume.py [--rows 6000] [--kills 5] [--out /out/job_resume]

One uninterrupted run is the reference. A second run into another directory is
SIGKILLed `--kills` times (the process gets no chance to clean up), each time restarted
with `--resume`, and finally allowed to finish. Each kill comes at a moment drawn
uniformly over the embedding the restarted run has left (timed from its first progress
line, so it lands mid-chunk, mid-shard or between shards rather than during start-up). The script then
counts rows lost and duplicated and compares every vector bit for bit with the
reference. Text items, moon3-tiny, CPU, fp32.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from reporting import environment, write_json  # noqa: E402

COLOURS = ["red", "navy", "olive", "white", "black", "ivory", "teal"]


def write_input(path: Path, rows: int) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for i in range(rows):
            f.write(json.dumps({"id": f"sku-{i}", "text": f"{COLOURS[i % 7]} cotton shirt, style {i}, size {i % 9}"})
                    + "\n")


def command(inp: Path, out: Path, args, resume: bool, progress: bool = False) -> list[str]:
    cmd = [sys.executable, "-m", "moon3rt", "encode", "--input", str(inp), "--output", str(out), "--device", "cpu",
           "--shard-rows", str(args.shard_rows), "--chunk-rows", str(args.chunk_rows)]
    cmd += ["--progress-interval", "0"] if progress else ["--no-progress"]  # a line per chunk on stderr
    return cmd + (["--resume"] if resume else [])


def wait_for_first_chunk(proc: subprocess.Popen, timeout: float = 600) -> bool:
    """Block until the job prints its first progress line (it has started embedding) or exits."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        ready, _, _ = select.select([proc.stderr], [], [], 1.0)
        if ready:
            line = proc.stderr.readline()
            if not line:
                return False  # exited
            if line.startswith(b"encode:"):
                return True
        elif proc.poll() is not None:
            return False
    return False


def read(out: Path) -> tuple[list[str], dict[str, np.ndarray]]:
    table = pq.read_table(out, columns=["id", "embedding"])
    ids = table["id"].to_pylist()
    flat = table["embedding"].combine_chunks().flatten().to_numpy().reshape(len(ids), -1)
    return ids, dict(zip(ids, flat))


def _rows_done(out: Path) -> int:
    path = out / "_manifest.json"
    return sum(s["rows"] for s in json.loads(path.read_text())["shards"]) if path.exists() else 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, default=6000)
    p.add_argument("--kills", type=int, default=5)
    p.add_argument("--shard-rows", type=int, default=500)
    p.add_argument("--chunk-rows", type=int, default=100)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=Path("out/job_resume"))
    args = p.parse_args(argv)
    rng = random.Random(args.seed)
    args.out.mkdir(parents=True, exist_ok=True)
    inp = args.out / "items.jsonl"
    write_input(inp, args.rows)
    ref, killed = args.out / "reference", args.out / "killed"
    for d in (ref, killed):
        subprocess.run(["rm", "-rf", str(d)], check=True)
    t0 = time.perf_counter()
    subprocess.run(command(inp, ref, args, False), check=True, stdout=subprocess.DEVNULL)
    clean_seconds = time.perf_counter() - t0
    job_seconds = json.loads((ref / "_summary.json").read_text())["seconds"]
    kills = []
    for k in range(args.kills):
        left = 1 - (_rows_done(killed) / args.rows)
        delay = rng.uniform(0.0, left * job_seconds)
        proc = subprocess.Popen(command(inp, killed, args, k > 0, progress=True), stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE)
        wait_for_first_chunk(proc)
        time.sleep(delay)  # stderr is a pipe: a line per chunk stays well inside its buffer
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        done = _rows_done(killed)
        kills.append({"after_first_chunk_s": round(delay, 2), "returncode": proc.returncode, "rows_in_finished_shards": done,
                      "tmp_files_left": len(list(killed.glob(".*.tmp"))) if killed.exists() else 0})
        print(f"kill {k + 1}: SIGKILL {delay:.1f} s after the first chunk (rc {proc.returncode}), {done} rows in "
              f"finished shards, "
              f"{kills[-1]['tmp_files_left']} temporary files left for the next run to remove")
        proc.stderr.close()
    subprocess.run(command(inp, killed, args, True), check=True, stdout=subprocess.DEVNULL)
    ref_ids, ref_vec = read(ref)
    got_ids, got_vec = read(killed)
    expected = {f"sku-{i}" for i in range(args.rows)}
    lost = len(expected - set(got_ids))
    duplicated = len(got_ids) - len(set(got_ids))
    differing = sum(not np.array_equal(got_vec[i], ref_vec[i]) for i in set(got_ids) & set(ref_ids))
    report = {
        "benchmark": "job_resume", "environment": environment(torch.device("cpu")),
        "workload": {"rows": args.rows, "items": "text, ~40 chars", "model": "moon3-tiny", "dtype": "fp32",
                     "shard_rows": args.shard_rows, "chunk_rows": args.chunk_rows, "seed": args.seed},
        "clean_run_s": round(clean_seconds, 2), "clean_job_s": job_seconds, "kills": kills,
        "kills_landed": sum(k["returncode"] == -signal.SIGKILL for k in kills),
        "rows_out": len(got_ids), "lost": lost, "duplicated": duplicated, "vectors_differing": differing,
        "bit_identical": differing == 0 and len(ref_ids) == len(got_ids),
    }
    write_json(args.out / "job_resume.json", report)
    print(f"{args.kills} kills: {len(got_ids)}/{args.rows} rows, {lost} lost, {duplicated} duplicated, "
          f"{differing} vectors differ from the uninterrupted run -> {args.out / 'job_resume.json'}")
    return 0 if lost == duplicated == differing == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
