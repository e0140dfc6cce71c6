"""The training loop: model from a base, one step function, checkpoints that resume exactly.

    python -m moon3rt train --model moon3-tiny-random --data runs/world/train --out runs/tiny
    torchrun --nproc-per-node 2 -m moon3rt train ...        # DDP (gloo on CPUs, NCCL on GPUs)

Each optimizer step draws its global batch from (seed, step) alone (`data.sample_pairs`),
every rank takes its contiguous share, vectors are gathered across ranks with gradients,
and each rank's loss is scaled so that DDP's gradient average equals the gradient of the
loss on the whole global batch. Checkpoints are moon3rt checkpoint directories (config.json,
model.safetensors, tokenizer.json, preprocessor_config.json) plus ``trainer_state.pt``
(optimizer, scheduler, step), written atomically; ``--resume`` continues from the newest.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from moon3rt.checkpoint import load_model, save_model
from moon3rt.config import PRESETS, Moon3Config
from moon3rt.images import CLIP_MEAN, CLIP_STD
from moon3rt.model import Moon3Model, random_model
from moon3rt.prompt import PromptBuilder, load_tokenizer

from . import distributed
from .data import Preparer, build_step, positive_mask, read_dataset, sample_pairs
from .losses import matryoshka_info_nce, next_token_loss


class TrainingStopped(RuntimeError):
    """Training stopped early (non-finite loss); the message names the step and the last good checkpoint."""


@dataclass
class TrainConfig:
    model: str = "moon3-tiny-random"  # base: a preset (random init) or a checkpoint directory
    data: str = ""
    out: str = ""
    steps: int = 1000
    batch_size: int = 32  # query-product pairs per micro-batch, over all ranks
    grad_accum: int = 1
    lr: float = 1e-3
    min_lr_ratio: float = 0.1
    warmup: int = 50
    weight_decay: float = 0.01
    max_grad_norm: float = 1.0
    temperature: float = 0.05
    matryoshka: bool = True
    ntp_weight: float = 0.2
    ntp_items: int = 4  # products per rank per micro-batch that also learn their attribute text
    # share of those learned from a rendering alone (no title), so the text must be read off
    # the pixels; the rest from the product as listed. True = 1.0 (all), False = 0.0 (none)
    ntp_from_image: float = 0.0
    hard_negatives: bool = True
    freeze_vision: bool = False
    grad_checkpointing: bool = False
    bf16: bool | None = None  # None: bf16 autocast on CUDA, fp32 on CPU
    seed: int = 0
    save_every: int = 200
    keep: int = 2
    log_every: int = 10
    max_minutes: float | None = None  # stop (and save) once this much wall time has passed
    strict: bool = False
    resume: bool = False
    # model surgery, for ablations: drop FIRE or MHMF, change the pooling
    no_fire: bool = False
    no_fusion: bool = False
    pooling: str | None = None
    show_progress: bool = True


# ------------------------------------------------------------------------------ model
def tokenizer_path(base: str) -> Path:
    if Path(base).is_dir():
        return Path(base) / "tokenizer.json"
    from moon3rt.api import TINY_TOKENIZER  # presets share the shipped byte-level tokenizer

    return TINY_TOKENIZER


def build_model(cfg: TrainConfig, device: torch.device) -> Moon3Model:
    """The base model of `cfg` (`base_model`), with the ablations' surgery."""
    return base_model(cfg.model, device, cfg.seed, cfg.no_fire, cfg.no_fusion, cfg.pooling)


def base_model(name: str, device: torch.device, seed: int = 0, no_fire: bool = False, no_fusion: bool = False,
               pooling: str | None = None) -> Moon3Model:
    """The base model in fp32: a checkpoint directory as saved, or a preset freshly initialised.

    A fresh model starts FIRE at alpha = 0 (DESIGN.md: FIRE begins as the identity) with
    random up-projections, so alpha gets a gradient from the first step.
    """
    if Path(name).is_dir():
        model = load_model(name, dtype=torch.float32, device=device)
        mcfg = model.cfg
    else:
        if name not in PRESETS:
            raise ValueError(f"base model {name!r} is neither a checkpoint directory nor a preset "
                             f"({sorted(PRESETS)})")
        mcfg = Moon3Config.from_name(name)
        model = None
    surgery = no_fire or no_fusion or pooling
    if surgery:
        if mcfg.moon3 is None:
            raise ValueError("--no-fire/--no-fusion/--pooling need a model with a moon3 block")
        mcfg = dataclasses.replace(mcfg, moon3=dataclasses.replace(
            mcfg.moon3, fire=None if no_fire else mcfg.moon3.fire,
            fusion=None if no_fusion else mcfg.moon3.fusion, pooling=pooling or mcfg.moon3.pooling))
        mcfg.validate()
    if model is None or surgery:
        fresh = random_model(mcfg, seed=seed, device=device)
        if model is not None:  # keep the trained weights the new layout still has
            fresh.load_state_dict({k: v for k, v in model.state_dict().items()
                                   if k in fresh.state_dict()}, strict=False)
        model = fresh
        if model.fire is not None and not Path(name).is_dir():
            with torch.no_grad():
                model.fire.alpha.zero_()
    return model.train()


def enable_grad_checkpointing(model: Moon3Model) -> None:
    """Recompute each decoder layer and vision block in backward (parameter names unchanged)."""
    from torch.utils.checkpoint import checkpoint

    for layer in [*model.language_model.layers, *model.visual.blocks]:
        inner = layer.forward
        layer.forward = lambda *args, _f=inner: checkpoint(_f, *args, use_reentrant=False)


class Forward(nn.Module):
    """The differentiable forward the losses need: output vectors (B, out) fp32, and the
    next-token logits (N, vocab) at `ntp_inputs` (packed positions), from the output embeddings.

    Everything that touches a parameter runs inside this module, as DDP requires.
    """

    def __init__(self, model: Moon3Model):
        super().__init__()
        self.model = model

    def forward(self, batch, ntp_inputs: torch.Tensor | None = None):
        h, v = self.model.hidden_states(batch)
        y = self.model.heads(self.model.pool(h, batch), v, batch)
        emb = self.model.output_embeddings()
        if ntp_inputs is None or ntp_inputs.numel() == 0 or emb is None:
            return y, None
        return y, h[ntp_inputs].float() @ emb.float().t()


# ------------------------------------------------------------------------------- step
def loss_terms(forward: nn.Module, model: Moon3Model, sb, positives: torch.Tensor, cfg: TrainConfig,
               rank: int, world: int, ntp_total: int) -> dict[str, torch.Tensor]:
    """The step's loss terms on this rank, scaled so that their mean over ranks is the global loss."""
    use_ntp = cfg.ntp_weight > 0 and sb.ntp_inputs.numel() > 0
    y, logits = forward(sb.batch, sb.ntp_inputs.to(sb.batch.input_ids.device) if use_ntp else None)
    n = sb.num_pairs
    q, p = y[:n].float(), y[n:2 * n].float()
    q_all, p_all = distributed.gather(q), distributed.gather(p)
    full = model.cfg.output_dim
    dims = [full]
    if cfg.matryoshka and model.cfg.moon3 is not None:
        dims += [d for d in model.cfg.moon3.matryoshka_dims if d != full]
    nce = matryoshka_info_nce(q, p, q_all, p_all, positives.to(q.device), cfg.temperature, dims, rank * n) * world
    terms = {"nce": nce}
    if logits is not None:
        terms["ntp"] = next_token_loss(logits, sb.ntp_targets.to(logits.device), ntp_total) * world
    terms["loss"] = nce + cfg.ntp_weight * terms.get("ntp", torch.zeros((), device=nce.device))
    return terms


def lr_lambda(cfg: TrainConfig):
    def f(step: int) -> float:
        if step < cfg.warmup:
            return (step + 1) / max(cfg.warmup, 1)
        t = (step - cfg.warmup) / max(cfg.steps - cfg.warmup, 1)
        return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(t, 1.0)))
    return f


def make_optimizer(model: nn.Module, cfg: TrainConfig):
    decay = [p for n, p in model.named_parameters() if p.requires_grad and p.ndim >= 2]
    rest = [p for n, p in model.named_parameters() if p.requires_grad and p.ndim < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                             {"params": rest, "weight_decay": 0.0}], lr=cfg.lr, betas=(0.9, 0.98))
    return opt, torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(cfg))


# ------------------------------------------------------------------------ checkpoints
def save_checkpoint(model: Moon3Model, directory: Path, tokenizer: Path, state: dict | None = None) -> Path:
    """A moon3rt checkpoint directory (plus trainer_state.pt when `state`), written atomically."""
    tmp = directory.with_name(directory.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    save_model(model, tmp)
    shutil.copyfile(tokenizer, tmp / "tokenizer.json")
    c = model.cfg
    (tmp / "preprocessor_config.json").write_text(json.dumps({
        "image_processor_type": "Qwen2VLImageProcessor", "min_pixels": c.min_pixels, "max_pixels": c.max_pixels,
        "patch_size": c.vision.patch_size, "merge_size": c.vision.spatial_merge_size,
        "temporal_patch_size": c.vision.temporal_patch_size, "image_mean": list(CLIP_MEAN),
        "image_std": list(CLIP_STD)}, indent=2) + "\n")
    if state is not None:
        torch.save(state, tmp / "trainer_state.pt")
    old = directory.with_name(directory.name + ".old")
    if directory.exists():
        shutil.rmtree(old, ignore_errors=True)
        os.replace(directory, old)
    os.replace(tmp, directory)
    shutil.rmtree(old, ignore_errors=True)
    return directory


def checkpoints(out: Path) -> list[Path]:
    """Complete step checkpoints under ``out/checkpoints``, oldest first."""
    root = out / "checkpoints"
    if not root.is_dir():
        return []
    return sorted(p for p in root.glob("step-*") if p.is_dir() and not p.name.endswith((".tmp", ".old"))
                  and (p / "trainer_state.pt").exists())


def resume(out: Path, model: nn.Module, optimizer, scheduler, device: torch.device,
           stage: str | None = None) -> tuple[int, Path | None]:
    """Load the newest step checkpoint under `out` into model, optimizer and scheduler.

    Returns (its step, its path), or (0, None) when there is none. `stage`: the checkpoint's
    ``config.stage`` must equal it (contrastive checkpoints carry none), else ValueError.
    """
    found = checkpoints(out)
    if not found:
        return 0, None
    state = torch.load(found[-1] / "trainer_state.pt", map_location="cpu", weights_only=False)
    if state.get("config", {}).get("stage") != stage:
        raise ValueError(f"{found[-1]} is not a checkpoint of the {stage or 'contrastive'} stage; "
                         "resume it with its own stage")
    model.load_state_dict(load_model(found[-1], dtype=torch.float32, device=device).state_dict())
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    return state["step"], found[-1]


def save_step(model: Moon3Model, out: Path, step: int, tokenizer: Path, state: dict, keep: int, rank: int,
              world: int, plot=None) -> Path:
    """Rank 0 writes ``out/checkpoints/step-N`` (trainer state included), keeps the newest `keep`
    and calls `plot()`; every rank waits for it and gets its path."""
    path = out / "checkpoints" / f"step-{step:08d}"
    if rank == 0:
        save_checkpoint(model, path, tokenizer, state)
        for old in checkpoints(out)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
        if plot is not None:
            plot()
    if world > 1:
        torch.distributed.barrier()
    return path


def save_final(model: Moon3Model, out: Path, tokenizer: Path, rank: int, world: int, plot=None) -> Path:
    """Rank 0 writes ``out/final`` (what `moon3rt.load` reads) and calls `plot()`; every rank waits."""
    final = out / "final"
    if rank == 0:
        save_checkpoint(model, final, tokenizer)
        if plot is not None:
            plot()
    if world > 1:
        torch.distributed.barrier()
    return final


def plot_losses(log: Path, png: Path, keys: tuple[str, ...] = ("loss", "nce", "ntp"), ylabel: str = "loss",
                log_scale: bool = True, title: str = "moon3rt training") -> None:
    """The curves of `keys` in a log.jsonl, one line each, as a PNG (skipped without matplotlib)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    rows = [json.loads(line) for line in log.read_text().splitlines() if line.strip()]
    if not rows:
        return
    fig, ax = plt.subplots(figsize=(7, 4))
    for key in keys:
        pts = [(r["step"], r[key]) for r in rows if key in r]
        if pts:
            ax.plot(*zip(*pts), label=key)
    ax.set_xlabel("step")
    ax.set_ylabel(ylabel)
    if log_scale:
        ax.set_yscale("log")
    ax.legend()
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(png, dpi=100)
    plt.close(fig)


# ------------------------------------------------------------------------------- loop
def train(cfg: TrainConfig) -> Path:
    """Run training; returns ``out/final`` (a moon3rt checkpoint). Raises `TrainingStopped` on a non-finite loss."""
    rank, world, device = distributed.setup()
    try:
        return _train(cfg, rank, world, device)
    finally:
        distributed.teardown()


def _train(cfg: TrainConfig, rank: int, world: int, device: torch.device) -> Path:
    out = Path(cfg.out)
    if not cfg.out:
        raise ValueError("--out is required")
    if cfg.batch_size % world:
        raise ValueError(f"batch_size={cfg.batch_size} must be a multiple of the number of processes ({world})")
    if not 0 <= float(cfg.ntp_from_image) <= 1:
        raise ValueError(f"ntp_from_image={cfg.ntp_from_image} must be a share between 0 and 1")
    torch.manual_seed(cfg.seed)
    data = read_dataset(cfg.data, strict=cfg.strict)
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        for problem in data.problems:
            print(f"skipped: {problem}")
        (out / "train_config.json").write_text(json.dumps(dataclasses.asdict(cfg), indent=2) + "\n")
    model = build_model(cfg, device)
    tok_path = tokenizer_path(cfg.model)
    preparer = Preparer(PromptBuilder(model.cfg, load_tokenizer(tok_path)))
    if cfg.freeze_vision:
        model.visual.requires_grad_(False)
    if cfg.grad_checkpointing:
        enable_grad_checkpointing(model)
    optimizer, scheduler = make_optimizer(model, cfg)
    start, last_good = resume(out, model, optimizer, scheduler, device) if cfg.resume else (0, None)
    if rank == 0 and last_good is not None:
        print(f"resumed from {last_good} (step {start})")
    forward: nn.Module = Forward(model)
    if world > 1:
        forward = nn.parallel.DistributedDataParallel(forward, device_ids=[device.index] if device.type == "cuda"
                                                      else None, find_unused_parameters=True)
    bf16 = cfg.bf16 if cfg.bf16 is not None else device.type == "cuda"
    log_path, began = out / "log.jsonl", time.perf_counter()
    plot = lambda: plot_losses(log_path, out / "loss.png")  # noqa: E731
    bar = tqdm(total=cfg.steps, initial=start, disable=not (cfg.show_progress and rank == 0), desc="train",
               unit="step")
    step = start
    while step < cfg.steps:
        t0 = time.perf_counter()
        totals: dict[str, float] = {}
        items = 0
        for micro in range(cfg.grad_accum):
            pairs = sample_pairs(data, cfg.batch_size, cfg.seed, step * cfg.grad_accum + micro, cfg.hard_negatives)
            positives = positive_mask(data, pairs)
            sb = build_step(preparer, data, pairs, rank, world, cfg.ntp_items, cfg.ntp_from_image)
            sb.batch = sb.batch.to(device)
            ntp_total = int(distributed.all_sum(sb.ntp_targets.numel()))
            sync = micro == cfg.grad_accum - 1 or world == 1
            ctx = forward.no_sync() if not sync else _null()
            with ctx, torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
                terms = loss_terms(forward, model, sb, positives, cfg, rank, world, ntp_total)
            bad = 0.0 if torch.isfinite(terms["loss"]).item() else 1.0
            if distributed.all_sum(bad) > 0:
                bar.close()
                where = f"; the last good checkpoint is {last_good}" if last_good else "; no checkpoint was saved yet"
                raise TrainingStopped(f"non-finite loss at step {step} (micro-batch {micro}): "
                                      + ", ".join(f"{k}={v.item():.4g}" for k, v in terms.items()) + where)
            (terms["loss"] / cfg.grad_accum).backward()
            for k, v in terms.items():
                totals[k] = totals.get(k, 0.0) + v.item() / cfg.grad_accum / world
            items += 2 * sb.num_pairs * world
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.max_grad_norm).item()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        lr = scheduler.get_last_lr()[0]
        scheduler.step()
        step += 1
        seconds = time.perf_counter() - t0
        if world > 1:  # the logged loss is the global batch's
            totals = {k: distributed.all_sum(v) for k, v in totals.items()}
        rate = items / max(seconds, 1e-9)
        bar.set_postfix(loss=f"{totals['loss']:.3f}", lr=f"{lr:.2e}", items_s=f"{rate:.0f}")
        bar.update(1)
        if rank == 0 and (step % cfg.log_every == 0 or step == cfg.steps or step == start + 1):
            with open(log_path, "a", encoding="utf-8") as f:
                f.write(json.dumps({"step": step, **{k: round(v, 6) for k, v in totals.items()}, "lr": lr,
                                    "grad_norm": round(grad_norm, 4), "items_per_s": round(rate, 1),
                                    "elapsed_s": round(time.perf_counter() - began, 1)}) + "\n")
        out_of_time = cfg.max_minutes is not None and (time.perf_counter() - began) / 60 > cfg.max_minutes
        if step % cfg.save_every == 0 or step == cfg.steps or out_of_time:
            state = {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "step": step,
                     "config": dataclasses.asdict(cfg)}
            last_good = save_step(model, out, step, tok_path, state, cfg.keep, rank, world, plot)
        if out_of_time:
            if rank == 0:
                print(f"stopping at step {step}: --max-minutes {cfg.max_minutes} reached")
            break
    bar.close()
    return save_final(model, out, tok_path, rank, world, plot)


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False
