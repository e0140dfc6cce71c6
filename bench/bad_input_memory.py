"""Host memory of `encode_with_report` on bad and huge inputs: peak RSS and RSS after the call.

Each case runs in a fresh Python process (so peaks do not mix) with `moon3-tiny` on the
CPU, fp32, and reports:

- ``rss_before``: RSS after loading the encoder, before the call;
- ``rss_after``: RSS after the call, while its `EncodeResult` (with every failure) is alive;
- ``peak``: the process's peak RSS (VmHWM).

Cases (sizes are arguments, defaults as below):

- ``junk``: one file of random bytes after a JPEG header (``--junk-mb`` MB), given
  ``--junk-n`` times, plus one good text item. Every file item fails.
- ``truncated``: ``--truncated-n`` PNGs of noise (``--truncated-side`` px square, about
  3 bytes a pixel) cut in half. Every one fails.
- ``huge``: four ``--huge-side`` px square PNGs (a smooth gradient) in one call, with
  ``num_workers`` 1, 2 and 4. All succeed.

``--baseline DIR`` runs every case a second time with the moon3rt package found in DIR
(e.g. ``git archive <commit> moon3rt | tar -x -C DIR``), side by side in one table.

    python bench/bad_input_memory.py --baseline /tmp/base          # all cases
    python bench/bad_input_memory.py --cases junk truncated         # skip the memory-heavy one
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def rss_mb(field: str = "VmRSS") -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    raise RuntimeError(f"no {field} in /proc/self/status (Linux only)")


# ------------------------------------------------------------------------------ inputs
def make_junk(path: Path, mb: int) -> Path:
    header = bytes.fromhex("ffd8ffe000104a46494600010100000100010000")  # SOI + JFIF APP0
    with open(path, "wb") as f:
        f.write(header)
        f.write(os.urandom(mb * 1024 * 1024))
    return path


def make_truncated_png(path: Path, side: int) -> Path:
    import numpy as np
    from PIL import Image

    noise = np.random.default_rng(0).integers(0, 256, (side, side, 3), dtype=np.uint8)
    Image.fromarray(noise).save(path, compress_level=1)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path


def make_huge_png(path: Path, side: int) -> Path:
    import numpy as np
    from PIL import Image

    ramp = np.linspace(0, 255, side, dtype=np.float32).astype(np.uint8)
    rgb = np.empty((side, side, 3), np.uint8)
    rgb[..., 0] = ramp[None, :]
    rgb[..., 1] = ramp[:, None]
    rgb[..., 2] = 128
    Image.fromarray(rgb).save(path, compress_level=1)
    return path


# ------------------------------------------------------------------------------ one case
def child(case: dict) -> None:
    import moon3rt

    enc = moon3rt.load("moon3-tiny", device="cpu", dtype="fp32")
    enc.encode(["warm-up"])
    before = rss_mb()
    items = [Path(p) for p in case["paths"]] + list(case.get("extra", []))
    start = time.perf_counter()
    result = enc.encode_with_report(items, num_workers=case["workers"])
    seconds = time.perf_counter() - start
    after = rss_mb()
    out = {"rss_before": before, "rss_after": after, "peak": rss_mb("VmHWM"), "seconds": seconds,
           "items": len(items), "failures": len(result.failures), "moon3rt": moon3rt.__file__}
    print("RESULT " + json.dumps(out))


def run_case(case: dict, package_dir: str | None) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
    if package_dir:
        env["PYTHONPATH"] = package_dir + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run([sys.executable, __file__, "--child", json.dumps(case)], env=env, cwd=tempfile.gettempdir(),
                          capture_output=True, text=True)
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[7:])
    raise RuntimeError(f"case {case['name']} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", nargs="+", default=["junk", "truncated", "huge"],
                        choices=["junk", "truncated", "huge"])
    parser.add_argument("--junk-mb", type=int, default=20)
    parser.add_argument("--junk-n", type=int, default=100)
    parser.add_argument("--truncated-side", type=int, default=2450)  # ~18 MB of noise PNG
    parser.add_argument("--truncated-n", type=int, default=40)
    parser.add_argument("--huge-side", type=int, default=20000)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2, 4], help="num_workers for 'huge'")
    parser.add_argument("--baseline", default=None, help="a directory holding another moon3rt package")
    parser.add_argument("--json", default=None, help="also write the rows here")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(json.loads(args.child))

    import PIL
    import torch

    import moon3rt

    sys.path.insert(0, str(REPO / "bench"))
    from reporting import git_commit

    tmp = Path(tempfile.mkdtemp(prefix="moon3rt-memory-"))
    cases = []
    if "junk" in args.cases:
        junk = make_junk(tmp / "junk.jpg", args.junk_mb)
        cases.append({"name": f"junk {args.junk_n} x {args.junk_mb} MB", "paths": [str(junk)] * args.junk_n,
                      "extra": ["ok"], "workers": 4})
    if "truncated" in args.cases:
        paths = [str(make_truncated_png(tmp / f"cut{i}.png", args.truncated_side)) for i in range(args.truncated_n)]
        size = Path(paths[0]).stat().st_size / 2**20
        cases.append({"name": f"truncated png {args.truncated_n} x {size:.0f} MB", "paths": paths, "workers": 4})
    if "huge" in args.cases:
        huge = make_huge_png(tmp / "huge.png", args.huge_side)
        for w in args.workers:
            cases.append({"name": f"4 x {args.huge_side}^2 png, {w} worker(s)", "paths": [str(huge)] * 4, "workers": w})

    print(f"moon3rt {moon3rt.__version__ if hasattr(moon3rt, '__version__') else ''} commit {git_commit()}; "
          f"baseline {args.baseline or '-'}; torch {torch.__version__}, Pillow {PIL.__version__}, "
          f"Python {platform.python_version()}, {platform.machine()} {os.cpu_count()} CPUs; moon3-tiny, CPU, fp32")
    header = f"{'case':40s} {'code':9s} {'RSS before':>11s} {'RSS after':>10s} {'peak RSS':>9s} {'s':>6s}"
    print(header)
    rows = []
    try:
        for case in cases:
            for code, where in (("baseline", args.baseline), ("this", None)):
                if code == "baseline" and not where:
                    continue
                r = run_case(case, where)
                rows.append({"case": case["name"], "code": code, **r})
                print(f"{case['name']:40s} {code:9s} {r['rss_before']:9.0f}MB {r['rss_after']:8.0f}MB "
                      f"{r['peak']:7.0f}MB {r['seconds']:6.1f}", flush=True)
    finally:
        for p in tmp.iterdir():
            p.unlink()
        tmp.rmdir()
    if args.json:
        report = {"commit": git_commit(), "baseline": args.baseline, "rows": rows}
        Path(args.json).write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
