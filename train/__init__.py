"""Training MOON3 (DESIGN.md section 5), installed as ``moon3rt.train``: losses, the RL stage, the loop.

Stage 1, the contrastive cold start: symmetric InfoNCE between query and product vectors
(in-batch negatives gathered across ranks, hard negatives from the world), a Matryoshka
term, and a next-token loss on the attribute text written before ``<emb>``.

- `data`: products/queries JSON lines, batches with hard negatives, packing;
- `losses`: one function per loss term;
- `distributed`: process group and gathers with gradients;
- `loop`: model from a base, the step, checkpoints, resume, logs;
- `grpo`, `rewards`, `grpo_step`, `rl_loop`: the RL stage (docs/RL.md): objective, rewards, one step, the loop;
- `recipes`: named, reproducible runs (``moon3-tiny``: the embedded default).
"""
