"""Training: the loss falls, DDP (2 gloo processes) equals one process, resume is exact,
bad data is reported, a non-finite loss stops with the last good checkpoint, and a
trained checkpoint embeds the same on every backend."""

import dataclasses
import json
import os
import socket

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
from moon3rt.train import loop
from moon3rt.train.data import DataError, read_dataset
from moon3rt.train.loop import TrainConfig, TrainingStopped, train

import moon3rt
from moon3rt.checkpoint import load_model
from moon3rt.world import WorldSpec, write_split

SPEC = WorldSpec(seed=5, train_products=16, image_queries=1, text_queries=2, size=56)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return write_split(SPEC, "train", tmp_path_factory.mktemp("world") / "train", show_progress=False)


def config(world, out, **kw) -> TrainConfig:
    base = dict(model="moon3-tiny-random", data=str(world), out=str(out), steps=4, batch_size=8, lr=2e-3, warmup=1,
                ntp_items=2, save_every=100, log_every=1, show_progress=False)
    return TrainConfig(**{**base, **kw})


def weights(directory):
    return {k: v.clone() for k, v in load_model(directory).state_dict().items()}


def assert_same_weights(a, b, atol=0.0):
    assert a.keys() == b.keys()
    worst = max((a[k] - b[k]).abs().max().item() for k in a)
    assert worst <= atol, worst


def logged(out):
    return [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]


def test_loss_falls_over_a_few_dozen_steps(world, tmp_path):
    train(config(world, tmp_path, steps=30, lr=1e-2, hard_negatives=False))
    rows = logged(tmp_path)
    mean = lambda key, part: np.mean([r[key] for r in part])
    assert mean("loss", rows[-3:]) < 0.9 * mean("loss", rows[:3]), rows
    assert mean("ntp", rows[-3:]) < 0.7 * mean("ntp", rows[:3]), rows
    assert all("ntp" in r and "nce" in r for r in rows)
    assert (tmp_path / "loss.png").exists() and (tmp_path / "final" / "model.safetensors").exists()


def test_resume_continues_identically(world, tmp_path):
    straight = train(config(world, tmp_path / "a"))
    # the same run stopped after its first step (time limit), then resumed from that checkpoint
    train(config(world, tmp_path / "b", max_minutes=0.0))
    assert [p.name for p in loop.checkpoints(tmp_path / "b")] == ["step-00000001"]
    resumed = train(config(world, tmp_path / "b", resume=True))
    assert_same_weights(weights(straight), weights(resumed), atol=1e-6)


def _ddp_worker(rank, port, cfg):
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    train(cfg)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_process_ddp_step_equals_one_process_on_the_combined_batch(world, tmp_path):
    # ntp_items counts per rank, so with it on the two runs would learn different attribute texts
    single = train(config(world, tmp_path / "one", steps=2, ntp_items=0))
    cfg = config(world, tmp_path / "two", steps=2, ntp_items=0)
    mp.spawn(_ddp_worker, args=(_free_port(), cfg), nprocs=2, join=True)
    # Adam divides by the gradient's running RMS, so fp32 summation-order noise in tiny gradients
    # shows up amplified in the weights: 1e-4 is 5% of one step at lr 2e-3
    assert_same_weights(weights(single), weights(tmp_path / "two" / "final"), atol=1e-4)
    a, b = logged(tmp_path / "one"), logged(tmp_path / "two")
    assert a[-1]["loss"] == pytest.approx(b[-1]["loss"], abs=1e-4)


def test_ddp_runs_with_the_next_token_loss(world, tmp_path):
    cfg = config(world, tmp_path, steps=1, ntp_items=1)
    mp.spawn(_ddp_worker, args=(_free_port(), cfg), nprocs=2, join=True)
    row = logged(tmp_path)[-1]
    assert np.isfinite(row["ntp"]) and row["ntp"] > 0


def test_bad_data_lines_are_reported_skipped_or_fatal(world, tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    (data / "images").symlink_to(world / "images")
    products = (world / "products.jsonl").read_text().splitlines()
    (data / "products.jsonl").write_text("\n".join(products[:4] + ["{broken", json.dumps(
        {"id": "x", "text": "lost", "image": "images/missing.jpg"})]) + "\n")
    queries = [json.loads(q) for q in (world / "queries.jsonl").read_text().splitlines()]
    keep = [q for q in queries if q["relevant"][0] in {json.loads(p)["id"] for p in products[:4]}]
    (data / "queries.jsonl").write_text("\n".join(json.dumps(q) for q in keep) + "\n"
                                        + json.dumps({"id": "q", "text": "a", "relevant": ["nobody"]}) + "\n")
    ds = read_dataset(data)
    assert len(ds.products) == 4 and len(ds.queries) == len(keep)
    text = "\n".join(ds.problems)
    assert "products.jsonl:5: not valid JSON" in text
    assert "products.jsonl:6: image file" in text and "missing.jpg" in text
    assert f"queries.jsonl:{len(keep) + 1}: relevant product 'nobody'" in text
    with pytest.raises(DataError, match="3 bad data line"):
        read_dataset(data, strict=True)
    (data / "queries.jsonl").write_text(json.dumps({"id": "q", "text": "a", "relevant": ["nobody"]}) + "\n")
    with pytest.raises(DataError, match="no usable query-product pairs"):
        read_dataset(data)


def test_non_finite_loss_stops_with_the_step_and_last_good_checkpoint(world, tmp_path, monkeypatch):
    calls = {"n": 0}
    real = loop.matryoshka_info_nce

    def poisoned(*args, **kwargs):
        calls["n"] += 1
        value = real(*args, **kwargs)
        return value * float("nan") if calls["n"] == 3 else value

    monkeypatch.setattr(loop, "matryoshka_info_nce", poisoned)
    with pytest.raises(TrainingStopped, match=r"non-finite loss at step 2 .*step-00000002"):
        train(config(world, tmp_path, steps=5, save_every=1))
    assert [p.name for p in loop.checkpoints(tmp_path)] == ["step-00000001", "step-00000002"]
    assert not (tmp_path / "final").exists()
    moon3rt.load(tmp_path / "checkpoints" / "step-00000002")  # the kept checkpoint is usable


@pytest.fixture(scope="module")
def trained(world, tmp_path_factory):
    out = tmp_path_factory.mktemp("trained")
    return train(config(world, out, steps=3))


def test_trained_checkpoint_embeds_the_same_on_every_backend(trained, world, monkeypatch, tmp_path):
    monkeypatch.setenv("MOON3RT_CACHE", str(tmp_path))
    rows = [json.loads(line) for line in (world / "products.jsonl").read_text().splitlines()[:3]]
    items = [{"text": r["text"], "image": world / r["image"]} for r in rows] + ["navy striped t-shirt"]
    ref = moon3rt.load(trained, device="cpu").encode(items)
    assert np.isfinite(ref).all() and np.allclose(np.linalg.norm(ref, axis=1), 1, atol=1e-5)
    for backend in ("triton", "onnxruntime"):
        got = moon3rt.load(trained, device="cpu", backend=backend).encode(items)
        assert np.abs(got - ref).max() < 1e-4, (backend, np.abs(got - ref).max())


def test_trained_fire_starts_from_identity_and_moves(trained):
    model = load_model(trained)
    alpha = model.fire.alpha.detach()
    assert (alpha != 0).any() and alpha.abs().max() < 0.5  # began at 0 (the identity), learned a little


def test_recipe_names_a_reproducible_run():
    from moon3rt.train.recipes import RECIPES

    recipe = RECIPES["moon3-tiny"]
    assert recipe.train.model == "moon3-tiny-random" and recipe.world.seed == recipe.train.seed == 0
    assert recipe.train.ntp_from_image
    assert dataclasses.replace(recipe.train, data="d", out="o").steps == recipe.train.steps


def test_attribute_text_from_an_image_drops_the_title_and_varies_the_rendering(world):
    from moon3rt.train.data import reasoning_source, sample_pairs

    data = read_dataset(world)
    # every product is drawn SPEC.image_queries more times as an image query
    assert all(len(v) == 1 + SPEC.image_queries for v in data.views_of)
    listed = reasoning_source(data, 0, 1, from_image=False)
    assert listed is data.products[0] and listed.text
    drawn = [reasoning_source(data, 0, v, from_image=True) for v in range(2)]
    assert all(r.text is None and r.attributes == data.products[0].attributes for r in drawn)
    assert drawn[0].images != drawn[1].images and drawn[0].images[0] in data.views_of[0]
    pairs = sample_pairs(data, 8, seed=0, step=3)
    assert len(pairs.views) == len(pairs.products)
    assert sample_pairs(data, 8, seed=0, step=3) == pairs  # a function of (seed, step)


def test_a_share_of_the_attribute_texts_is_read_off_renderings(world, monkeypatch):
    from moon3rt.train import data as train_data
    from moon3rt.train.data import Preparer, build_step, sample_pairs

    from moon3rt.prompt import PromptBuilder, load_tokenizer

    cfg = config(world, "unused")
    model = loop.build_model(cfg, torch.device("cpu"))
    preparer = Preparer(PromptBuilder(model.cfg, load_tokenizer(loop.tokenizer_path(cfg.model))))
    data = read_dataset(world)
    pairs = sample_pairs(data, 8, seed=0, step=0)
    flags = []
    real = train_data.reasoning_source
    monkeypatch.setattr(train_data, "reasoning_source",
                        lambda d, i, v, from_image: flags.append(from_image) or real(d, i, v, from_image))
    for share, expected in ((0.0, 0), (0.5, 2), (1.0, 4), (True, 4)):
        flags.clear()
        sb = build_step(preparer, data, pairs, 0, 1, 4, share)
        assert sum(flags[:4]) == expected and not any(flags[4:]), (share, flags)
        assert sb.ntp_inputs.numel() > 0


def test_loss_falls_when_the_attribute_text_is_read_off_the_image(world, tmp_path):
    train(config(world, tmp_path, steps=20, lr=1e-2, hard_negatives=False, ntp_from_image=True))
    rows = logged(tmp_path)
    assert np.mean([r["ntp"] for r in rows[-3:]]) < 0.7 * np.mean([r["ntp"] for r in rows[:3]]), rows


def test_recipe_runs_share_one_rendered_world(world, tmp_path, monkeypatch):
    from moon3rt.train import recipes

    seen = {}
    monkeypatch.setattr(recipes, "write_split", lambda *a, **k: pytest.fail("the world was rendered again"))
    monkeypatch.setattr(recipes, "train", lambda cfg: seen.setdefault("cfg", cfg))
    recipes.run_recipe("moon3-tiny", tmp_path / "run", data=str(world), steps=3)
    assert seen["cfg"].data == str(world) and seen["cfg"].steps == 3 and seen["cfg"].out == str(tmp_path / "run")


def test_resume_refuses_a_checkpoint_of_the_other_stage(world, tmp_path):
    cfg = config(world, tmp_path, steps=1)
    train(cfg)
    [ckpt] = loop.checkpoints(tmp_path)
    model = loop.build_model(cfg, torch.device("cpu"))
    optimizer, scheduler = loop.make_optimizer(model, cfg)
    assert loop.resume(tmp_path, model, optimizer, scheduler, torch.device("cpu")) == (1, ckpt)
    state = torch.load(ckpt / "trainer_state.pt", weights_only=False)
    state["config"]["stage"] = "rl"
    torch.save(state, ckpt / "trainer_state.pt")
    with pytest.raises(ValueError, match="not a checkpoint of the contrastive stage"):
        loop.resume(tmp_path, model, optimizer, scheduler, torch.device("cpu"))
    assert loop.resume(tmp_path, model, optimizer, scheduler, torch.device("cpu"), stage="rl")[0] == 1


def test_ntp_from_image_flag_alone_means_all_and_takes_a_share():
    import argparse

    from moon3rt.train.cli import add_arguments

    p = argparse.ArgumentParser()
    add_arguments(p)
    assert p.parse_args(["--ntp-from-image", "--steps", "3"]).ntp_from_image == 1.0
    assert p.parse_args(["--ntp-from-image", "0.5"]).ntp_from_image == 0.5
    assert p.parse_args([]).ntp_from_image is None
