"""What a throughput run leaves behind: the environment beside the numbers, a table, JSON, a PNG.

The plot uses matplotlib when it is importable and otherwise draws the same grouped
bar chart with PIL, so every run writes one.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import platform
import re
import subprocess
from pathlib import Path

import torch
from PIL import Image, ImageDraw, ImageFont

REPO = Path(__file__).resolve().parent.parent


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def _run(cmd: list[str]) -> str | None:
    try:
        out = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def git_commit() -> str:
    """``git rev-parse HEAD``, plus ``-dirty`` when the working tree has changes."""
    head = _run(["git", "rev-parse", "HEAD"])
    if head is None:
        return os.environ.get("MOON3RT_GIT_COMMIT", "unknown")
    return head + ("-dirty" if _run(["git", "status", "--porcelain"]) else "")


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            match = re.search(r"^model name\s*:\s*(.+)$", f.read(), re.MULTILINE)
        if match:
            return match.group(1).strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment(device: torch.device) -> dict:
    env = {
        "device": str(device),
        "device_name": _cpu_name(),
        "driver": None,
        "cuda": torch.version.cuda,
        "torch": torch.__version__,
        "triton": _version("triton"),
        "transformers": _version("transformers"),
        "numpy": _version("numpy"),
        "pillow": _version("pillow"),
        "moon3rt": _version("moon3rt"),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu": _cpu_name(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        # CPU timings on a shared machine mean little without this
        "load_average": [round(x, 2) for x in os.getloadavg()] if hasattr(os, "getloadavg") else None,
        "git_commit": git_commit(),
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env["device_name"] = props.name
        env["gpu_memory_mib"] = props.total_memory // (1024 * 1024)
        env["multiprocessors"] = props.multi_processor_count
        driver = _run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"])
        env["driver"] = driver.splitlines()[0] if driver else None
    return env


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def write_json(path: Path, report: dict) -> None:
    """Write atomically, so a run killed mid-way leaves the last complete report."""
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(report, indent=2, default=str) + "\n")
    tmp.replace(path)


# --------------------------------------------------------------------------------- table
def _fmt(value, spec: str) -> str:
    if value is None or (isinstance(value, float) and value != value):
        return "-"
    return format(value, spec)


def table(headers: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(headers)]
    line = "  ".join(h.rjust(w) if i else h.ljust(w) for i, (h, w) in enumerate(zip(headers, widths)))
    out = [line, "-" * len(line)]
    for r in rows:
        out.append("  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths))))
    return "\n".join(out)


def results_table(results: list[dict], baseline: str = "transformers") -> str:
    base = {r["batch_size"]: r["items_per_s"] for r in results if r["backend"] == baseline}
    rows = []
    for r in results:
        ratio = r["items_per_s"] / base[r["batch_size"]] if r["batch_size"] in base else None
        rows.append([
            r["backend"] + ("*" if r.get("source") else ""), str(r["batch_size"]),
            _fmt(r["items_per_s"], ".1f"), _fmt(r["tokens_per_s"], ".0f"),
            _fmt(r["latency_ms"]["p50"], ".2f"), _fmt(r["latency_ms"]["p99"], ".2f"), str(r["calls"]),
            _fmt(r["tflops"], ".3f"), _fmt(r["pct_roofline"], ".1f"), _fmt(r["peak_memory_mib"], ".0f"),
            _fmt(r["peak_memory_mib"] - r["memory_at_start_mib"], ".0f"), _fmt(ratio, ".2f"),
        ])
    return table(["backend", "batch", "items/s", "tokens/s", "p50 ms", "p99 ms", "calls", "TFLOP/s",
                  "% roof", "peak MiB", "+MiB", f"x {baseline}"], rows)


# ---------------------------------------------------------------------------------- plot
def plot(path: Path, results: list[dict], title: str) -> str:
    """Grouped bars of items/s: one group per batch size, one bar per backend. Returns the tool used."""
    backends = list(dict.fromkeys(r["backend"] for r in results))
    sizes = sorted({r["batch_size"] for r in results})
    value = {(r["backend"], r["batch_size"]): r["items_per_s"] for r in results}
    try:
        _plot_matplotlib(path, backends, sizes, value, title)
        return "matplotlib"
    except Exception:  # not installed, or broken: the plot must exist all the same
        _plot_pil(path, backends, sizes, value, title)
        return "PIL"


def _plot_matplotlib(path: Path, backends, sizes, value, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 5), dpi=110)
    width = 0.8 / max(1, len(backends))
    for i, name in enumerate(backends):
        xs = [j + (i - (len(backends) - 1) / 2) * width for j in range(len(sizes))]
        ys = [value.get((name, b), 0.0) for b in sizes]
        bars = ax.bar(xs, ys, width, label=name)
        ax.bar_label(bars, labels=[f"{y:.1f}" if y else "" for y in ys], fontsize=7)
    ax.set_xticks(range(len(sizes)), [f"batch {b}" for b in sizes])
    ax.set_ylabel("items/s")
    ax.set_title(title, fontsize=9)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


PALETTE = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75)]


def _plot_pil(path: Path, backends, sizes, value, title: str) -> None:
    W, H, left, right, top, bottom = 960, 540, 80, 170, 50, 50
    img = Image.new("RGB", (W, H), "white")
    draw = ImageDraw.Draw(img)
    font = ImageFont.load_default()
    peak = max([v for v in value.values() if v == v] + [1e-9]) * 1.15
    plot_w, plot_h = W - left - right, H - top - bottom
    draw.text((left, 15), title, fill="black", font=font)
    draw.line([(left, top), (left, top + plot_h), (left + plot_w, top + plot_h)], fill="black")
    for k in range(6):  # y ticks
        y = top + plot_h - plot_h * k / 5
        draw.line([(left - 4, y), (left, y)], fill="black")
        draw.line([(left + 1, y), (left + plot_w, y)], fill=(230, 230, 230))
        draw.text((5, y - 6), f"{peak * k / 5:.3g}", fill="black", font=font)
    draw.text((5, top - 25), "items/s", fill="black", font=font)
    group = plot_w / max(1, len(sizes))
    bar = group * 0.8 / max(1, len(backends))
    for j, b in enumerate(sizes):
        x0 = left + j * group + group * 0.1
        for i, name in enumerate(backends):
            v = value.get((name, b))
            if v is None or v != v:
                continue
            x = x0 + i * bar
            y = top + plot_h - plot_h * v / peak
            draw.rectangle([x, y, x + bar - 2, top + plot_h], fill=PALETTE[i % len(PALETTE)])
            draw.text((x, y - 12), f"{v:.1f}", fill="black", font=font)
        draw.text((x0 + group * 0.3, top + plot_h + 8), f"batch {b}", fill="black", font=font)
    for i, name in enumerate(backends):  # legend
        y = top + 10 + 18 * i
        draw.rectangle([W - right + 15, y, W - right + 27, y + 12], fill=PALETTE[i % len(PALETTE)])
        draw.text((W - right + 33, y), name, fill="black", font=font)
    img.save(path)
