"""The ablation table of docs/TRAINING.md: the recipe's training with one module removed per row.

    python bench/ablation.py --steps 400 --model moon3-mini --out runs/ablation   # full, no FIRE, no MHMF, mean pooling

Every row trains from the same seed on the same rendered world (the recipe's, under
``--out/world``, rendered once) with the same budget (``--steps``; the recipe's other
settings), then `moon3rt eval --world` scores it on the held-out world. Writes
``--out/ablation.json`` and ``--out/ablation.md`` (the table) and prints the table. A row
already trained (its ``final/`` exists) or evaluated (its ``eval.json``) is reused, so an
interrupted run resumes.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

ROWS = {"full": [], "no FIRE": ["--no-fire"], "no MHMF": ["--no-fusion"], "mean pooling": ["--pooling", "mean", "--ntp-items", "0"]}
# mean pooling has no <emb> to reason into, so that row learns no attribute text (reasoning
# mode needs emb_token pooling): it differs from the full row in both
COLUMNS = [("text R@10", "kinds", "text", "recall@10"), ("image R@1", "kinds", "image", "recall@1"),
           ("product R@1", "kinds", "product", "recall@1"), ("title R@1", "kinds", "title", "recall@1"),
           ("colour", "zero_shot", "colour", "accuracy"), ("category", "zero_shot", "category", "accuracy"),
           ("pattern", "zero_shot", "pattern", "accuracy"), ("logo", "zero_shot", "logo", "accuracy"),
           ("stitching", "zero_shot", "stitching", "accuracy")]


def run(cmd: list[str]) -> None:
    print("+", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True)


def evaluate(model: Path, report: Path, world: Path, products: int, *extra: str) -> dict:
    """`moon3rt eval --world` of `model` into `report` (the held-out world cached under `world`),
    unless `report` exists already; returns the report."""
    if not report.exists():
        report.parent.mkdir(parents=True, exist_ok=True)
        run([sys.executable, "-m", "moon3rt", "eval", "--model", str(model), "--world", *extra, "--world-dir",
             str(world), "--world-products", str(products), "--output", str(report), "--no-progress"])
    return json.loads(report.read_text())


def write(stem: Path, text: str, meta: dict) -> None:
    """The table to ``stem.md``, `meta` (plus the commit) to ``stem.json``, and the table to stdout."""
    stem.with_suffix(".md").write_text(text + "\n")
    stem.with_suffix(".json").write_text(json.dumps({**meta, "commit": os.environ.get("MOON3RT_GIT_COMMIT")},
                                                    indent=2) + "\n")
    print(text)


def table(results: dict[str, dict], steps: int, columns=COLUMNS) -> str:
    """A markdown table, one row per report; a column is (heading, *keys into the report)."""
    head = "| row (" + f"{steps} steps" + ") | " + " | ".join(c[0] for c in columns) + " |"
    lines = [head, "|" + "---|" * (len(columns) + 1)]
    for row, report in results.items():
        cells = []
        for _, *path in columns:
            value = report
            for key in path:
                value = value.get(key, {}) if isinstance(value, dict) else {}
            cells.append(f"{value:.3f}" if isinstance(value, (int, float)) else "-")
        lines.append(f"| {row} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--recipe", default="moon3-tiny")
    p.add_argument("--model", default=None, help="base model of every row (default: the recipe's)")
    p.add_argument("--steps", type=int, default=400, help="optimizer steps per row (same for every row)")
    p.add_argument("--out", default="runs/ablation")
    p.add_argument("--rows", default=",".join(ROWS), help="comma list of " + ", ".join(ROWS))
    p.add_argument("--data", default=None, help="the recipe's training world, rendered already "
                   "(default: rendered under --out/world/train)")
    p.add_argument("--world-products", type=int, default=1200, help="held-out products in the eval pool")
    args = p.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    py = [sys.executable, "-m", "moon3rt"]
    world = Path(args.data) if args.data else out / "world" / "train"
    results = {}
    for row in [r.strip() for r in args.rows.split(",") if r.strip()]:
        if row not in ROWS:
            p.error(f"unknown row {row!r}; rows are {list(ROWS)}")
        slug = row.replace(" ", "-").lower()
        run_dir = out / slug
        if not (run_dir / "final" / "model.safetensors").exists():
            run(py + ["train", "--recipe", args.recipe, "--data", str(world), "--out", str(run_dir),
                      "--steps", str(args.steps), "--no-progress", *(["--model", args.model] if args.model else []),
                      *ROWS[row]])
        results[row] = evaluate(run_dir / "final", run_dir / "eval.json", out / "world", args.world_products)
    write(out / "ablation", table(results, args.steps),
          {"steps": args.steps, "recipe": args.recipe, "model": args.model, "rows": results})
    return 0


if __name__ == "__main__":
    sys.exit(main())
