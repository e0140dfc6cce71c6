"""The RL rows of docs/TRAINING.md's ablation: the SFT checkpoint, + RL without InfoNCE, + joint RL.

    python bench/rl_ablation.py --sft moon3rt/assets/moon3-tiny --data runs/world/train --steps 100

Every RL row starts from the same SFT checkpoint with the same seed, data and budget
(``--steps`` steps of `train --stage rl`, ``--lr``; the stage's other defaults), then
`moon3rt eval --world --reasoning` scores it on the held-out world in direct and in
reasoning mode, with the accuracy of the generated attribute fields. The SFT row is the
checkpoint itself, evaluated the same way. Writes ``--out/rl_ablation.json`` and
``--out/rl_ablation.md``. A row already trained (``final/``) or evaluated (``eval.json``) is
reused, so an interrupted run resumes and rows can run in separate processes (``--rows``).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import ablation  # noqa: E402

ROWS = {"SFT": None, "RL without InfoNCE": ["--nce-weight", "0"], "joint RL": []}
COLUMNS = [("text R@10", "kinds", "text", "recall@10"),
           ("reasoning text R@10", "reasoning", "kinds", "text", "recall@10"),
           ("detail R@10", "kinds", "text/detail", "recall@10"),
           ("reasoning detail R@10", "reasoning", "kinds", "text/detail", "recall@10"),
           ("image R@1", "kinds", "image", "recall@1"),
           ("reasoning image R@1", "reasoning", "kinds", "image", "recall@1"),
           ("generated category", "reasoning", "attributes", "category", "accuracy"),
           ("generated colour", "reasoning", "attributes", "colour", "accuracy"),
           ("generated pattern", "reasoning", "attributes", "pattern", "accuracy"),
           ("generated logo", "reasoning", "attributes", "logo", "accuracy"),
           ("generated stitching", "reasoning", "attributes", "stitching", "accuracy")]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sft", required=True, help="the SFT checkpoint every RL row starts from")
    p.add_argument("--data", required=True, help="training data directory (the world the SFT run used)")
    p.add_argument("--steps", type=int, default=100, help="RL steps per row (same for every row)")
    p.add_argument("--lr", type=float, default=5e-5)
    p.add_argument("--out", default="runs/rl-ablation")
    p.add_argument("--rows", default=",".join(ROWS), help="comma list of " + ", ".join(ROWS))
    p.add_argument("--world-products", type=int, default=1200, help="held-out products in the eval pool")
    args = p.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    py = [sys.executable, "-m", "moon3rt"]
    results = {}
    rows = [r.strip() for r in args.rows.split(",") if r.strip()]
    for row in rows:
        if row not in ROWS:
            p.error(f"unknown row {row!r}; rows are {list(ROWS)}")
    for row in rows:
        slug = row.replace(" ", "-").lower()
        run_dir = out / slug
        model = Path(args.sft)
        if ROWS[row] is not None:
            model = run_dir / "final"
            if not (model / "model.safetensors").exists():
                ablation.run(py + ["train", "--stage", "rl", "--model", args.sft, "--data", args.data,
                                   "--out", str(run_dir), "--steps", str(args.steps), "--lr", str(args.lr),
                                   "--no-progress", *ROWS[row]])
        results[row] = ablation.evaluate(model, run_dir / "eval.json", out / "world", args.world_products,
                                         "--reasoning")
    ablation.write(out / "rl_ablation", ablation.table(results, args.steps, COLUMNS),
                   {"steps": args.steps, "lr": args.lr, "sft": args.sft, "rows": results})
    return 0


if __name__ == "__main__":
    sys.exit(main())
