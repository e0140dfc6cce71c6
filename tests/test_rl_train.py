"""train --stage rl: the CLI trains and saves loadable checkpoints, resume is exact, a model
that cannot reason is refused up front, a non-finite objective stops with the last good
checkpoint, and 2 gloo processes equal one."""

import json
import os
import socket

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
from moon3rt.train import loop, rl_loop
from moon3rt.train.loop import TrainingStopped, save_checkpoint
from moon3rt.train.rl_loop import RLTrainConfig, train_rl

import moon3rt
from moon3rt.api import TINY_TOKENIZER
from moon3rt.checkpoint import load_model
from moon3rt.cli import main
from moon3rt.config import Moon3Config
from moon3rt.model import random_model
from moon3rt.world import WorldSpec, write_split

SPEC = WorldSpec(seed=5, train_products=6, image_queries=1, text_queries=1, size=56)
FAST = ["--batch-size", "2", "--rollouts", "2", "--max-reasoning-tokens", "3", "--lr", "1e-3", "--no-progress"]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return write_split(SPEC, "train", tmp_path_factory.mktemp("world") / "train", show_progress=False)


@pytest.fixture(scope="module")
def sft(tmp_path_factory):
    """A reasoning-capable checkpoint standing in for the SFT stage's output (random weights)."""
    return save_checkpoint(random_model(Moon3Config.from_name("moon3-tiny-random"), seed=1),
                           tmp_path_factory.mktemp("sft") / "sft", TINY_TOKENIZER)


def config(world, sft, out, **kw) -> RLTrainConfig:
    base = dict(model=str(sft), data=str(world), out=str(out), steps=2, batch_size=2, rollouts=2,
                max_reasoning_tokens=3, lr=1e-3, show_progress=False)
    return RLTrainConfig(**{**base, **kw})


def weights(directory):
    return load_model(directory).state_dict()


def test_cli_runs_two_steps_and_saves_a_loadable_checkpoint(world, sft, tmp_path, capsys):
    out = tmp_path / "rl"
    assert main(["train", "--stage", "rl", "--model", str(sft), "--data", str(world), "--out", str(out),
                 "--steps", "2", "--save-every", "1", *FAST]) == 0
    assert "trained checkpoint" in capsys.readouterr().out
    assert [p.name for p in loop.checkpoints(out)] == ["step-00000001", "step-00000002"]
    rows = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2]
    for r in rows:
        assert all(np.isfinite(r[k]) for k in ("reward", "objective", "kl", "nce", "rollout_tokens_per_s"))
        assert r["rollout_tokens"] > 0 and r["lr"] == 1e-3
    assert rows[0]["kl"] == 0.0 and rows[1]["kl"] > 0  # pi_theta = pi_ref until the first update
    assert (out / "rl.png").exists() and json.loads((out / "train_config.json").read_text())["stage"] == "rl"
    before, after = weights(sft), weights(out / "final")
    assert max((after[k] - before[k]).abs().max().item() for k in before) > 1e-5  # it trained
    torch.testing.assert_close(weights(out / "checkpoints" / "step-00000002"), after, atol=0, rtol=0)
    vectors = moon3rt.load(out / "final").encode(["navy striped t-shirt"])
    assert vectors.shape == (1, 48) and np.isfinite(vectors).all()


def test_resume_continues_exactly(world, sft, tmp_path):
    straight = train_rl(config(world, sft, tmp_path / "a"))
    train_rl(config(world, sft, tmp_path / "b", max_minutes=0.0))  # stops after its first step
    assert [p.name for p in loop.checkpoints(tmp_path / "b")] == ["step-00000001"]
    resumed = train_rl(config(world, sft, tmp_path / "b", resume=True))
    a, b = weights(straight), weights(resumed)
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(b[k], a[k], atol=1e-7, rtol=1e-6, msg=k)
    first = weights(tmp_path / "b" / "checkpoints" / "step-00000001")
    assert max((a[k] - first[k]).abs().max().item() for k in a) > 1e-5  # step 2 moved the weights
    log = [json.loads(line) for line in (tmp_path / "b" / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2]


def test_a_model_without_emb_is_refused_up_front(world, tmp_path, capsys):
    cfg = Moon3Config.from_name("moon3-tiny-random")
    cfg.moon3.pooling, cfg.moon3.embed_token_id = "mean", None
    model = save_checkpoint(random_model(cfg.validate()), tmp_path / "no_emb", TINY_TOKENIZER)
    out = tmp_path / "rl"
    assert main(["train", "--stage", "rl", "--model", str(model), "--data", str(world), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert f"error: {model} cannot be trained with --stage rl" in err and "embed_token_id is not set" in err
    assert "Traceback" not in err and not out.exists()
    assert main(["train", "--stage", "rl", "--model", str(model), "--data", str(world), "--out", str(out),
                 "--ntp-weight", "0.5"]) == 2
    assert "--ntp-weight not used by --stage rl" in capsys.readouterr().err


def test_a_budget_past_the_models_positions_is_refused_up_front(world, sft, tmp_path, capsys):
    out = tmp_path / "rl"
    assert main(["train", "--stage", "rl", "--model", str(sft), "--data", str(world), "--out", str(out),
                 "--max-reasoning-tokens", "100000"]) == 2
    err = capsys.readouterr().err
    assert "max_reasoning_tokens=100000 cannot fit this model's positions" in err and "max_position_embeddings=" in err
    assert "(--max-reasoning-tokens)" in err
    assert "Traceback" not in err and not out.exists()


def test_non_finite_objective_stops_with_the_step_and_last_good_checkpoint(world, sft, tmp_path, monkeypatch):
    calls = {"n": 0}
    real = rl_loop.update

    def poisoned(rescorer, optimizer, rollouts, cfg):
        calls["n"] += 1
        if calls["n"] == 2:
            rollouts.old_logp[0] = float("nan")
        return real(rescorer, optimizer, rollouts, cfg)

    monkeypatch.setattr(rl_loop, "update", poisoned)
    with pytest.raises(TrainingStopped, match=r"non-finite objective at step 1 \(update 0\).*nan.*step-00000001"):
        train_rl(config(world, sft, tmp_path, steps=3, save_every=1))
    assert [p.name for p in loop.checkpoints(tmp_path)] == ["step-00000001"] and not (tmp_path / "final").exists()


def _ddp_worker(rank, port, cfg):
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    train_rl(cfg)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_gloo_processes_equal_one(world, sft, tmp_path):
    single = train_rl(config(world, sft, tmp_path / "one", steps=1, batch_size=4))
    mp.spawn(_ddp_worker, args=(_free_port(), config(world, sft, tmp_path / "two", steps=1, batch_size=4)),
             nprocs=2, join=True)
    a, b = weights(single), weights(tmp_path / "two" / "final")
    diff = torch.cat([(a[k] - b[k]).abs().flatten() for k in a])
    # Adam's first step is about lr * sign(gradient): a gradient within fp32 summation noise of 0
    # can move either way, so a few weights differ by up to 2 lr; all the others agree closely
    assert (diff > 1e-5).float().mean() < 1e-3 and diff.max() <= 2e-3 + 1e-6, diff.max()
    one, two = (json.loads((tmp_path / d / "log.jsonl").read_text()) for d in ("one", "two"))
    assert one["reward"] == pytest.approx(two["reward"], abs=1e-5)
    assert one["objective"] == pytest.approx(two["objective"], abs=1e-5)
    assert one["rollout_tokens"] == two["rollout_tokens"]
