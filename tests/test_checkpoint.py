"""Checkpoint IO: transformers-saved Qwen2-VL directories, our own round trip, errors, flavours."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from oracle import hf_config, hf_last_hidden, random_hf_model
from safetensors import safe_open
from safetensors.torch import save_file
from transformers import Qwen2VLForConditionalGeneration

import moon3rt
from moon3rt.batching import pack
from moon3rt.checkpoint import INDEX_FILE, SINGLE_FILE, CheckpointError, load_model, save_model
from moon3rt.config import ConfigError, Moon3Config
from moon3rt.model import random_model

TOKENIZER = Path(moon3rt.__file__).parent / "assets" / "moon3-tiny" / "tokenizer.json"
HF_ATOL = 1e-4  # fp32, ours vs transformers


def rgb(height: int, width: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


ITEMS = [
    "red cotton t-shirt",
    {"text": "navy denim jacket, brass buttons", "image": rgb(90, 120, 1)},
    {"images": [rgb(57, 61, 2), rgb(73, 95, 3)]},
]


def file_keys(directory: Path) -> set[str]:
    keys: set[str] = set()
    for file in directory.glob("*.safetensors"):
        with safe_open(str(file), framework="pt") as f:
            keys.update(f.keys())
    return keys


def assert_matches_transformers(encoder, hf, mrope: bool = True) -> None:
    """Packed hidden states of ITEMS equal transformers' run of each item alone."""
    prepared = [encoder.prepare(item, i) for i, item in enumerate(ITEMS)]
    with torch.no_grad():
        hidden, _ = encoder.model.hidden_states(pack(prepared))
    start = 0
    for i, item in enumerate(prepared):
        ours = hidden[start : start + item.num_tokens]
        start += item.num_tokens
        ref = hf_last_hidden(hf, item, encoder.config.image_token_id, mrope=mrope)
        err = (ours - ref).abs().max().item()
        assert err <= HF_ATOL, f"item {i}: max abs error {err:.2e} vs transformers (tolerance {HF_ATOL})"
        # a plain backbone's embedding is the normalised hidden state at the pooling token
        want = torch.nn.functional.normalize(ref[-1], dim=-1).numpy()
        np.testing.assert_allclose(encoder.encode([ITEMS[i]])[0], want, atol=1e-5, err_msg=f"item {i}")


# ------------------------------------------------------------------- transformers checkpoints
@pytest.fixture(scope="module")
def hf_model():
    return random_hf_model(Moon3Config.from_name("moon3-tiny-random"))


@pytest.fixture(scope="module")
def hf_dir(hf_model, tmp_path_factory) -> Path:
    """A Qwen2VLModel saved by transformers (bare ``visual.*`` / ``language_model.*`` names)."""
    directory = tmp_path_factory.mktemp("hf_bare")
    hf_model.save_pretrained(directory)
    shutil.copy(TOKENIZER, directory)
    return directory


def test_save_pretrained_layout(hf_dir):
    keys = file_keys(hf_dir)
    assert "language_model.embed_tokens.weight" in keys and "visual.patch_embed.proj.weight" in keys
    assert not any(k.startswith("model.") for k in keys)


@pytest.fixture(scope="module")
def conditional_generation(hf_model):
    cfg = Moon3Config.from_name("moon3-tiny-random")
    model = Qwen2VLForConditionalGeneration(hf_config(cfg)).eval()
    model.model.load_state_dict(hf_model.state_dict())
    return model


def original_names_dir(conditional_generation, directory: Path) -> Path:
    """Qwen2VLForConditionalGeneration.save_pretrained: transformers writes the original
    Qwen2-VL names (``visual.*``, ``model.*`` for the decoder)."""
    conditional_generation.save_pretrained(directory)
    keys = file_keys(directory)
    assert "model.embed_tokens.weight" in keys and "visual.blocks.0.attn.qkv.weight" in keys
    return directory


def transformers5_names_dir(conditional_generation, directory: Path) -> Path:
    """The in-memory transformers-5 names (``model.visual.*``, ``model.language_model.*``)
    written by hand, with an untied ``lm_head.weight`` that the loader must skip."""
    conditional_generation.save_pretrained(directory)
    for file in directory.glob("*.safetensors"):
        file.unlink()
    state = {k: v.detach().clone().contiguous() for k, v in conditional_generation.state_dict().items()}
    state["lm_head.weight"] = torch.randn_like(state["lm_head.weight"])
    assert "model.visual.merger.ln_q.weight" in state and "model.language_model.norm.weight" in state
    save_file(state, str(directory / "model.safetensors"))
    return directory


@pytest.mark.parametrize("layout", ["bare", "original", "transformers5"])
def test_transformers_checkpoint_matches_transformers(layout, hf_model, hf_dir, conditional_generation, tmp_path):
    if layout == "bare":
        directory = hf_dir
    elif layout == "original":
        directory = original_names_dir(conditional_generation, tmp_path)
    else:
        directory = transformers5_names_dir(conditional_generation, tmp_path)
    shutil.copy(TOKENIZER, directory)
    encoder = moon3rt.load(directory)
    assert encoder.config.flavour == "qwen2-vl" and encoder.config.moon3 is None
    assert encoder.dim == 64  # no projection: the pooled hidden state
    vectors = encoder.encode(ITEMS)
    assert vectors.dtype == np.float32 and vectors.shape == (len(ITEMS), 64)
    assert np.isfinite(vectors).all()
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    assert_matches_transformers(encoder, hf_model)


def test_plain_checkpoint_uses_mrope(hf_dir):
    encoder = moon3rt.load(hf_dir)
    item = encoder.prepare(ITEMS[1])
    image = item.input_ids == encoder.config.image_token_id
    rows = item.position_ids[:, image]
    assert not (rows[1] == rows[2]).all() and (rows[0] == rows[0, 0]).all()  # t fixed, h/w vary


# ------------------------------------------------------------------------------ round trip
def assert_same_model(a, b) -> None:
    assert a.cfg == b.cfg
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for name in sa:
        assert sa[name].dtype == sb[name].dtype, name
        assert torch.equal(sa[name], sb[name]), f"{name} differs after the round trip"


@pytest.fixture(scope="module")
def tiny_model():
    return random_model(Moon3Config.from_name("moon3-tiny-random"), seed=3)


def test_round_trip_single_file(tiny_model, tmp_path):
    save_model(tiny_model, tmp_path)
    assert (tmp_path / SINGLE_FILE).exists() and not (tmp_path / INDEX_FILE).exists()
    keys = file_keys(tmp_path)
    assert {"moon3.fire.up", "moon3.fire.alpha", "moon3.fusion.gate.weight", "moon3.projection.weight"} <= keys
    assert any(k.startswith("model.visual.") for k in keys) and any(k.startswith("model.language_model.") for k in keys)
    assert_same_model(tiny_model, load_model(tmp_path))


def test_round_trip_sharded(tiny_model, tmp_path):
    save_model(tiny_model, tmp_path, max_shard_bytes=60_000)
    shards = sorted(tmp_path.glob("model-*-of-*.safetensors"))
    assert len(shards) >= 3 and not (tmp_path / SINGLE_FILE).exists()
    index = json.loads((tmp_path / INDEX_FILE).read_text())
    assert set(index["weight_map"].values()) == {s.name for s in shards}
    assert set(index["weight_map"]) == file_keys(tmp_path)
    assert_same_model(tiny_model, load_model(tmp_path))


def test_resave_in_other_layout_replaces_old_weights(tiny_model, tmp_path):
    save_model(tiny_model, tmp_path, max_shard_bytes=60_000)
    other = random_model(Moon3Config.from_name("moon3-tiny-random"), seed=4)
    save_model(other, tmp_path)  # single file now: the old index must not win
    assert not (tmp_path / INDEX_FILE).exists() and not list(tmp_path.glob("model-*-of-*"))
    assert_same_model(other, load_model(tmp_path))
    save_model(tiny_model, tmp_path, max_shard_bytes=60_000)
    assert not (tmp_path / SINGLE_FILE).exists()
    assert_same_model(tiny_model, load_model(tmp_path))


def test_load_in_bf16_casts(tiny_model, tmp_path):
    save_model(tiny_model, tmp_path, max_shard_bytes=60_000)
    model = load_model(tmp_path, dtype=torch.bfloat16)
    for name, tensor in model.state_dict().items():
        assert tensor.dtype == torch.bfloat16, name
        assert torch.equal(tensor, tiny_model.state_dict()[name].to(torch.bfloat16)), name


def test_moon3_checkpoint_embeds_like_preset(tmp_path):
    preset = moon3rt.load("moon3-tiny-random", seed=0)
    save_model(preset.model, tmp_path, max_shard_bytes=60_000)
    shutil.copy(TOKENIZER, tmp_path)
    loaded = moon3rt.load(tmp_path)
    assert loaded.config == preset.config and loaded.config.flavour == "moon3"
    assert loaded.model.fire is not None and loaded.model.fusion is not None and loaded.model.projection is not None
    np.testing.assert_array_equal(loaded.encode(ITEMS), preset.encode(ITEMS))
    np.testing.assert_array_equal(loaded.encode(ITEMS, dim=16), preset.encode(ITEMS, dim=16))


# ---------------------------------------------------------------------------------- errors
def test_missing_unexpected_and_misshaped_reported_together(tiny_model, tmp_path):
    save_model(tiny_model, tmp_path)
    with safe_open(str(tmp_path / SINGLE_FILE), framework="pt") as f:
        state = {k: f.get_tensor(k) for k in f.keys()}
    del state["moon3.fusion.o_proj.weight"]
    state["moon3.fusion.extra_bias"] = torch.zeros(3)
    state["model.language_model.norm.weight"] = torch.ones(65)
    save_file(state, str(tmp_path / SINGLE_FILE))
    with pytest.raises(CheckpointError) as info:
        load_model(tmp_path)
    message = str(info.value)
    assert "missing 1: ['moon3.fusion.o_proj.weight']" in message
    assert "unexpected 1: ['moon3.fusion.extra_bias']" in message
    assert "language_model.norm.weight: checkpoint (65,), config expects (64,)" in message


def test_same_tensor_under_two_names_is_refused(tiny_model, tmp_path):
    save_model(tiny_model, tmp_path)
    with safe_open(str(tmp_path / SINGLE_FILE), framework="pt") as f:
        state = {k: f.get_tensor(k) for k in f.keys()}
    state["visual.merger.ln_q.weight"] = state["model.visual.merger.ln_q.weight"].clone()
    save_file(state, str(tmp_path / SINGLE_FILE))
    with pytest.raises(CheckpointError, match="stored twice.*ln_q"):
        load_model(tmp_path)


def test_directory_errors(tiny_model, tmp_path):
    with pytest.raises(CheckpointError, match="no config.json"):
        load_model(tmp_path)
    tiny_model.cfg.to_json_file(tmp_path / "config.json")
    with pytest.raises(CheckpointError, match="no \\*.safetensors"):
        load_model(tmp_path)
    save_model(tiny_model, tmp_path / "sharded", max_shard_bytes=60_000)
    shard = sorted((tmp_path / "sharded").glob("model-*.safetensors"))[1]
    shard.unlink()
    with pytest.raises(CheckpointError, match=shard.name):
        load_model(tmp_path / "sharded")
    (tmp_path / "sharded" / INDEX_FILE).write_text("{not json")
    with pytest.raises(CheckpointError, match="weight_map"):
        load_model(tmp_path / "sharded")
    save_model(tiny_model, tmp_path / "no_tokenizer")
    with pytest.raises(CheckpointError, match="tokenizer.json"):
        moon3rt.load(tmp_path / "no_tokenizer")


@pytest.mark.parametrize(
    "edit, match",
    [
        (lambda raw: raw["text_config"]["rope_parameters"].update(mrope_section=[2, 3, 4]), "mrope_section"),
        (lambda raw: raw["moon3"]["fire"].update(layers=[0, 5]), "fire.layers"),
        (lambda raw: raw["moon3"].update(pooling="max"), "pooling"),
        (lambda raw: raw["vision_config"].update(hidden_size=32), "vision_config.hidden_size"),
        (lambda raw: raw["text_config"].pop("hidden_size"), "hidden_size"),
    ],
)
def test_invalid_config_fails_at_load(edit, match, tiny_model, tmp_path):
    save_model(tiny_model, tmp_path)
    shutil.copy(TOKENIZER, tmp_path)
    raw = json.loads((tmp_path / "config.json").read_text())
    edit(raw)
    (tmp_path / "config.json").write_text(json.dumps(raw))
    with pytest.raises(ConfigError, match=match):
        load_model(tmp_path)
    with pytest.raises(ConfigError, match=match):
        moon3rt.load(tmp_path)


# -------------------------------------------------------------------------------- flavours
@pytest.fixture(scope="module")
def gme_dir(hf_dir, tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp("gme")
    for file in hf_dir.iterdir():
        shutil.copy(file, directory)
    raw = json.loads((directory / "config.json").read_text())
    raw.update(min_image_tokens=4, max_image_tokens=6)
    (directory / "config.json").write_text(json.dumps(raw))
    return directory


def test_gme_detected_with_sequential_positions(gme_dir, hf_model):
    encoder = moon3rt.load(gme_dir)
    cfg = encoder.config
    assert cfg.flavour == "gme" and not cfg.uses_mrope
    assert (cfg.min_pixels, cfg.max_pixels) == (4 * 28 * 28, 6 * 28 * 28)
    for i, source in enumerate(ITEMS):
        item = encoder.prepare(source, i)
        positions = item.position_ids
        assert (positions == positions[0]).all(), f"item {i}: 1-D positions must repeat on all three rows"
        np.testing.assert_array_equal(positions[0], np.arange(item.num_tokens))
        for image in item.images:  # each image within [min_image_tokens, max_image_tokens]
            assert 4 <= image.grid_thw[1] * image.grid_thw[2] // 4 <= 6
    assert_matches_transformers(encoder, hf_model, mrope=False)


def test_flavour_override(gme_dir, hf_dir, hf_model):
    as_plain = moon3rt.load(gme_dir, flavour="qwen2-vl")
    assert as_plain.config.flavour == "qwen2-vl" and as_plain.config.uses_mrope
    assert_matches_transformers(as_plain, hf_model, mrope=True)
    as_gme = moon3rt.load(hf_dir, flavour="gme")
    assert as_gme.config.flavour == "gme"
    item = as_gme.prepare(ITEMS[1])
    np.testing.assert_array_equal(item.position_ids, np.broadcast_to(np.arange(item.num_tokens), (3, item.num_tokens)))
    with pytest.raises(ConfigError, match="flavour"):
        moon3rt.load(hf_dir, flavour="clip")


def test_moon3_block_detected(tiny_model, tmp_path):
    save_model(tiny_model, tmp_path)
    shutil.copy(TOKENIZER, tmp_path)
    raw = json.loads((tmp_path / "config.json").read_text())
    del raw["moon3rt"]  # no recorded flavour: detection from the moon3 block alone
    (tmp_path / "config.json").write_text(json.dumps(raw))
    encoder = moon3rt.load(tmp_path)
    assert encoder.config.flavour == "moon3" and encoder.config.uses_mrope and encoder.dim == 48
    assert moon3rt.load(tmp_path, flavour="gme").config.flavour == "gme"


def test_tokenizer_larger_than_the_vocabulary_fails_at_load():
    cfg = Moon3Config.from_name("moon3-tiny-random")
    cfg.text.vocab_size = 300  # the shipped tokenizer has 1024 tokens
    from moon3rt.model import random_model
    from moon3rt.prompt import PromptBuilder, load_tokenizer

    with pytest.raises(ValueError, match="tokenizer has 1024 tokens but the model's vocab_size is 300"):
        PromptBuilder(cfg.validate(), load_tokenizer(moon3rt.api.TINY_TOKENIZER))
    assert random_model(cfg) is not None  # the model alone is fine; the pair is what is refused


@pytest.mark.parametrize("name, flavour", [
    ("/data/qwen2-vl-2b-augmented", "qwen2-vl"),
    ("org/qwen2vl-segmentation-ft", "qwen2-vl"),
    ("Alibaba-NLP/gme-Qwen2-VL-2B-Instruct", "gme"),
])
def test_gme_is_detected_by_word_not_substring(name, flavour):
    from moon3rt.config import detect_flavour

    assert detect_flavour({"_name_or_path": name}) == flavour


@pytest.mark.parametrize("block, message", [
    ({"fusion": {"num_heads": 4}}, "missing key 'head_dim'"),
    ({"fire": [0, 2]}, "malformed moon3 block"),
    ({"embed_token_id": "7"}, "must be an integer"),
])
def test_malformed_moon3_block_is_a_config_error(block, message):
    from moon3rt.config import ConfigError

    raw = Moon3Config.from_name("moon3-tiny-random").to_dict()
    raw["moon3"] = block
    with pytest.raises(ConfigError, match=message):
        Moon3Config.from_dict(raw)


# ------------------------------------------------------------------ broken checkpoint files
def _cut_in_half(d: Path) -> None:
    data = (d / SINGLE_FILE).read_bytes()
    (d / SINGLE_FILE).write_bytes(data[: len(data) // 2])


def _int32_tensor(d: Path) -> None:
    with safe_open(str(d / SINGLE_FILE), framework="pt") as f:
        state = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    state["moon3.projection.weight"] = state["moon3.projection.weight"].to(torch.int32)
    save_file(state, str(d / SINGLE_FILE))


def _index_names_the_wrong_shard(d: Path) -> None:
    index = json.loads((d / INDEX_FILE).read_text())
    shards = sorted(set(index["weight_map"].values()))
    for name, shard in index["weight_map"].items():
        if shard == shards[1]:
            index["weight_map"][name] = shards[0]  # shard 2 is listed nowhere now
    (d / INDEX_FILE).write_text(json.dumps(index))


def _image_pad_only_in_the_vocabulary(d: Path) -> None:
    tok = json.loads((d / "tokenizer.json").read_text())
    tok["added_tokens"] = [t for t in tok["added_tokens"] if t["content"] != "<|image_pad|>"]
    (d / "tokenizer.json").write_text(json.dumps(tok))


def _drop_image_pad(d: Path) -> None:
    tok = json.loads((d / "tokenizer.json").read_text())
    tok["added_tokens"] = [t for t in tok["added_tokens"] if t["content"] != "<|image_pad|>"]
    tok["model"]["vocab"].pop("<|image_pad|>")
    (d / "tokenizer.json").write_text(json.dumps(tok))


BROKEN = {
    "truncated weights": (_cut_in_half, SINGLE_FILE, "not a readable safetensors file .*truncated"),
    "empty weights": (lambda d: (d / SINGLE_FILE).write_bytes(b""), SINGLE_FILE, r"\(0 bytes; .*empty"),
    "garbage weights": (lambda d: (d / SINGLE_FILE).write_bytes(b"garbage" * 100), SINGLE_FILE,
                        "not a readable safetensors file"),
    "int32 tensor": (_int32_tensor, "", r"moon3.projection.weight in model.safetensors: I32"),
    "malformed preprocessor_config.json": (lambda d: (d / "preprocessor_config.json").write_text("{bad"),
                                           "preprocessor_config.json", "not valid JSON"),
    "preprocessor_config.json mean": (lambda d: (d / "preprocessor_config.json").write_text('{"image_mean": 3}'),
                                      "preprocessor_config.json", "image_mean must be a list of 3 numbers"),
    "index names the wrong shard": (_index_names_the_wrong_shard, INDEX_FILE,
                                    r"16 tensor\(s\) are not in the shard the index names: .*00001-of-"),
    "<|image_pad|> not a special token": (_image_pad_only_in_the_vocabulary, "tokenizer.json",
                                          r"does not keep \['<\|image_pad\|>'\] as single tokens"),
    "tokenizer without <|image_pad|>": (_drop_image_pad, "tokenizer.json", r"lacks the special tokens \['<\|image_pad"),
}


@pytest.mark.parametrize("case", sorted(BROKEN))
def test_broken_checkpoint_files_fail_at_load_naming_the_file(case, tiny_model, tmp_path):
    """Each is a CheckpointError at load naming the file and the problem, never a bare
    SafetensorError / RuntimeError / JSONDecodeError, nor a failure of every item later."""
    edit, file, problem = BROKEN[case]
    save_model(tiny_model, tmp_path, max_shard_bytes=60_000 if case.startswith("index") else None)
    shutil.copy(TOKENIZER, tmp_path)
    edit(tmp_path)
    with pytest.raises(CheckpointError) as info:
        moon3rt.load(tmp_path, device="cpu")
    message = str(info.value)
    assert str(tmp_path / file).rstrip("/") in message, message
    assert re.search(problem, message), message


def test_weight_files_are_as_readable_as_the_config(tiny_model, tmp_path):
    # safetensors creates its files owner-only; a saved checkpoint keeps the umask's mode
    # for every file, so a shipped or shared checkpoint is readable by its other users
    for sub, shard in (("single", None), ("sharded", 60_000)):
        save_model(tiny_model, tmp_path / sub, max_shard_bytes=shard)
        mode = (tmp_path / sub / "config.json").stat().st_mode & 0o777
        weights = list((tmp_path / sub).glob("*.safetensors"))
        assert weights and all(w.stat().st_mode & 0o777 == mode for w in weights)
