"""ONNX export of the whole forward and the onnxruntime backend against the torch reference (fp32)."""

import json
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from crafted import packed, prepared
from moon3rt.export.export_onnx import ExportError, export_onnx, fp32_model, main  # noqa: E402
from moon3rt.export.onnx_model import OUTPUT, export_inputs  # noqa: E402

import moon3rt  # noqa: E402
from moon3rt.batching import pack  # noqa: E402
from moon3rt.config import Moon3Config  # noqa: E402
from moon3rt.model import Moon3Model, random_model  # noqa: E402
from moon3rt.prompt import PromptBuilder, load_tokenizer  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
TOKENIZER = ROOT / "moon3rt/assets/moon3-tiny/tokenizer.json"
CATALOGUE = ROOT / "moon3rt/assets/catalogue"
ATOL = 2e-6  # fp32 max abs error on the un-normalised vectors (|y| ~ 0.5)
MIN_COSINE = 0.9999
LONG_TITLE = "slim fit stretch denim jacket with brass buttons, " * 6

# items as (title, [(height, width) of each image])
BATCHES = {
    "1-item-1-image": [("Red cotton crew-neck t-shirt", [(60, 90)])],
    "3-items-mixed": [("two views", [(37, 101), (113, 47)]), ("navy linen shirt, size M", []), (None, [(75, 75)])],
    "7-items-mixed": [
        ("a", []), (LONG_TITLE, [(56, 56)]), ("green ceramic mug", [(90, 60), (60, 90)]), (None, [(120, 80)]),
        ("white leather sneakers, low top", []), ("b", [(70, 70), (56, 112)]), ("black backpack", [(64, 64)]),
    ],
    "text-only": [("navy linen shirt", []), (LONG_TITLE, []), ("x", []), ("brown suede shoes, size 42", [])],
    "1-large-5-small": [("a", [(56, 56)]), ("large photo", [(224, 224)]), (None, [(56, 84)]),
                        ("small one", [(60, 60)]), ("b", [(56, 56), (84, 56)]), ("c", [(70, 56)])],
    "image-only": [(None, [(56, 56)]), (None, [(120, 80), (64, 64)])],
}
INPUTS = ("input_ids", "position_ids", "token_slot", "item_tokens", "item_mask", "title_mask", "pool_index")
VISION = ("pixel_values", "patch_slot", "image_patches", "image_mask", "patch_pos")


def tiny(pooling="emb_token", backbone=False, flavour=None):
    cfg = Moon3Config.from_name("moon3-tiny")
    if backbone:
        cfg.moon3 = None
    else:
        cfg.moon3.pooling = pooling
    cfg.flavour = flavour or cfg.flavour
    return random_model(cfg.validate(), seed=3)


def run(session, batch, cfg, vision=True):
    inputs = export_inputs(batch, cfg, vision=vision)
    return session.run([OUTPUT], {i.name: inputs[i.name] for i in session.get_inputs()})[0]


def compare(session, model, batch, vision=True, name=""):
    got = run(session, batch, model.cfg, vision)
    with torch.no_grad():
        ref = model(batch).numpy()
    err = np.abs(got - ref).max()
    cos = ((got * ref).sum(-1) / np.linalg.norm(got, axis=-1) / np.linalg.norm(ref, axis=-1)).min()
    print(f"{name}: B={batch.num_items} T={batch.input_ids.numel()} max abs error {err:.2e}, min cosine {cos:.7f}")
    assert got.shape == ref.shape and got.dtype == np.float32
    assert err <= ATOL and cos > MIN_COSINE, f"{name}: max abs error {err:.3g} (atol {ATOL}), min cosine {cos:.7f}"


@pytest.fixture(scope="module")
def model():
    return tiny()


@pytest.fixture(scope="module")
def builder(model):
    return PromptBuilder(model.cfg, load_tokenizer(TOKENIZER))


@pytest.fixture(scope="module")
def exported(model, tmp_path_factory):
    """(full graph path, text-only graph path) of the tiny model."""
    out = tmp_path_factory.mktemp("onnx")
    return export_onnx(model, out / "model.onnx"), export_onnx(model, out / "text.onnx", vision=False)


@pytest.fixture(scope="module")
def sessions(exported):
    return tuple(ort.InferenceSession(str(p), providers=["CPUExecutionProvider"]) for p in exported)


def test_graph_passes_checker_with_dynamic_dims_and_metadata(exported, model):
    full, text = exported
    for path, names in ((full, INPUTS + VISION), (text, INPUTS)):
        onnx.checker.check_model(str(path), full_check=True)
        proto = onnx.load(str(path))
        dims = {i.name: [d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim] for i in proto.graph.input}
        assert tuple(dims) == names
        assert dims["input_ids"] == ["T"] and dims["position_ids"] == [3, "T"] and dims["pool_index"] == ["B"]
        assert dims["item_tokens"] == ["B", "L"] and dims["token_slot"] == ["T"]
        ops = {n.op_type for n in proto.graph.node}
        assert not ops & {"Loop", "If", "Scan", "NonZero", "Attention"}, ops
        assert {o.domain: o.version for o in proto.opset_import}[""] == 17
        meta = {p.key: p.value for p in proto.metadata_props}
        sidecar = json.loads(path.with_suffix(".json").read_text())
        assert json.loads(meta["moon3rt.dims"]) == sidecar["dims"]
        assert [i["name"] for i in sidecar["inputs"]] == list(dims)
        assert sidecar["outputs"][0]["shape"] == ["B", model.cfg.output_dim]
    sidecar = json.loads(full.with_suffix(".json").read_text())
    assert sidecar["dims"]["P"] == {"min": 4, "opt": 4096, "max": 16384}
    assert sidecar["dims"]["S"] == {"min": 4, "opt": 256, "max": 256}  # moon3-tiny's largest image: 256 patches
    shapes = {i["name"]: i["shape"] for i in sidecar["inputs"]}
    assert shapes["pixel_values"] == ["P", 1176] and shapes["image_patches"] == ["N", "S"]


@pytest.mark.parametrize("case", list(BATCHES))
def test_onnxruntime_matches_torch(sessions, model, builder, case):
    compare(sessions[0], model, packed(builder, BATCHES[case]), name=case)


def test_text_only_graph(sessions, model, builder):
    compare(sessions[1], model, packed(builder, BATCHES["text-only"]), vision=False, name="text-only graph")
    with pytest.raises(ValueError, match="text-only graph cannot take images"):
        export_inputs(packed(builder, BATCHES["1-item-1-image"]), model.cfg, vision=False)


def test_item_alone_equals_item_in_batch(sessions, model, builder):
    items = prepared(builder, BATCHES["7-items-mixed"])

    together = run(sessions[0], pack(items), model.cfg)
    alone = np.concatenate([run(sessions[0], pack([item]), model.cfg) for item in items])
    assert np.abs(together - alone).max() <= ATOL


@pytest.mark.parametrize("variant", ["last", "mean", "backbone", "gme"])
def test_every_pooling_and_flavour_exports(variant, builder, tmp_path):
    if variant in ("last", "mean"):
        net = tiny(pooling=variant)
    else:  # no moon3 block: no FIRE, MHMF or projection; gme also has 1-D positions
        net = tiny(backbone=True, flavour="gme" if variant == "gme" else "qwen2-vl")
    path = export_onnx(net, tmp_path / "model.onnx")
    assert not {n.op_type for n in onnx.load(str(path)).graph.node} & {"Loop", "If", "Scan", "NonZero"}
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    local = PromptBuilder(net.cfg, load_tokenizer(TOKENIZER))
    compare(session, net, packed(local, BATCHES["3-items-mixed"]), name=variant)
    compare(session, net, packed(local, BATCHES["text-only"]), name=f"{variant} text-only")


def test_bf16_model_exports_in_fp32(builder, tmp_path):
    net = random_model(Moon3Config.from_name("moon3-tiny"), seed=3, dtype=torch.bfloat16)
    path = export_onnx(net, tmp_path / "model.onnx")
    assert json.loads(path.with_suffix(".json").read_text())["source_dtype"] == "bfloat16"
    assert next(net.parameters()).dtype == torch.bfloat16  # the model itself is left as it was
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    # the graph is the bf16 weights evaluated in fp32
    compare(session, fp32_model(net), packed(builder, BATCHES["3-items-mixed"]), name="bf16 weights, fp32 graph")
    with torch.no_grad():
        bf16 = net(packed(builder, BATCHES["3-items-mixed"])).numpy()
    got = run(session, packed(builder, BATCHES["3-items-mixed"]), net.cfg)
    cos = (got * bf16).sum(-1) / np.linalg.norm(got, axis=-1) / np.linalg.norm(bf16, axis=-1)
    print(f"bf16 torch vs fp32 graph: min cosine {cos.min():.5f}")
    assert cos.min() > 0.99


def test_dynamo_exporter_gives_the_same_graph_inputs_and_results(model, builder, tmp_path, exported):
    pytest.importorskip("onnxscript", reason="the dynamo exporter (CI installs it: tests/test_environment.py)")
    path = export_onnx(model, tmp_path / "dynamo.onnx", opset=18, dynamo=True)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    reference = ort.InferenceSession(str(exported[0]), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == [i.name for i in reference.get_inputs()]
    compare(session, model, packed(builder, BATCHES["7-items-mixed"]), name="dynamo exporter")
    compare(session, model, packed(builder, BATCHES["text-only"]), name="dynamo exporter, text-only")


def test_large_weights_go_to_one_external_data_file(model, builder, tmp_path, monkeypatch):
    import moon3rt.export.export_onnx as exporter

    monkeypatch.setattr(exporter, "PROTOBUF_LIMIT", 1)  # as if the weights passed 2 GiB
    path = export_onnx(model, tmp_path / "big.onnx")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["big.json", "big.onnx", "big.onnx.data"]
    assert path.stat().st_size < 200_000  # the graph alone
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    compare(session, model, packed(builder, BATCHES["3-items-mixed"]), name="external data")


def test_api_onnxruntime_backend_matches_torch(monkeypatch, tmp_path):
    monkeypatch.setenv("MOON3RT_CACHE", str(tmp_path))
    rows = [json.loads(line) for line in (CATALOGUE / "items.jsonl").read_text().splitlines()]
    items = [{"text": r["text"], "image": CATALOGUE / r["image"]} for r in rows]
    items += ["navy linen shirt", {"image": CATALOGUE / "green_mug.png"},
              {"text": "two views", "images": [CATALOGUE / "red_dress.jpg", CATALOGUE / "green_mug.png"]}]
    ref = moon3rt.load("moon3-tiny", device="cpu").encode(items)
    encoder = moon3rt.load("moon3-tiny", device="cpu", backend="onnxruntime")
    assert encoder.backend.name == "onnxruntime"
    got = encoder.encode(items)
    assert np.abs(got - ref).max() <= ATOL
    path = encoder.backend.model_path
    assert path.parent.parent == tmp_path / "onnx" and path.exists()
    # a budget smaller than one item: every item runs alone, same vectors
    encoder.backend.max_attention_cells = 1
    short = ref[:, :32] / np.linalg.norm(ref[:, :32], axis=-1, keepdims=True)
    assert np.abs(encoder.encode(items, dim=32) - short).max() <= ATOL
    # a second encoder finds the export in the cache instead of exporting again
    stamp = path.stat().st_mtime_ns
    again = moon3rt.load("moon3-tiny", device="cpu", backend="onnxruntime")
    assert np.abs(again.encode(items[:2]) - ref[:2]).max() <= ATOL
    assert again.backend.model_path == path and path.stat().st_mtime_ns == stamp


def test_buckets_never_change_an_items_vector(model, builder, tmp_path):
    """Alone, in one part, or in length buckets under any budget: the same vector per item."""
    from moon3rt.backends.onnxruntime_backend import OnnxRuntimeBackend

    items = prepared(builder, BATCHES["1-large-5-small"] + BATCHES["7-items-mixed"])
    backend = OnnxRuntimeBackend(model, torch.device("cpu"), cache_dir=tmp_path)
    alone = np.concatenate([backend.embed(pack([item])).numpy() for item in items])
    with torch.no_grad():
        ref = np.concatenate([model(pack([item])).numpy() for item in items])
    assert np.abs(alone - ref).max() <= ATOL
    order = np.random.default_rng(0).permutation(len(items))
    batch = pack([items[i] for i in order])
    seen = set()
    whole = run(backend.session(), batch, model.cfg)  # the whole batch in one graph call, padded as it comes
    assert np.abs(whole - alone[order]).max() <= 1e-6
    for cells in (1, 5_000, 10_000, 10**9):
        backend.max_attention_cells = cells
        parts = backend.parts(batch)
        assert sorted(i for part in parts for i in part) == list(range(len(items)))
        seen.add(len(parts))
        got = backend.embed(batch).numpy()
        err = np.abs(got - alone[order]).max()
        print(f"budget {cells} cells: {len(parts)} parts, max abs error vs alone {err:.2e}")
        assert err <= 1e-6, (cells, err)
    assert len(seen) == 4  # the budgets did cut the batch differently


def test_one_large_image_does_not_pad_the_small_ones(model, builder):
    from moon3rt.batching import attention_buckets, padded_cost, segment_lengths

    batch = packed(builder, BATCHES["1-large-5-small"])
    tokens, images = segment_lengths(batch, 2)
    assert images[1] == [256] and all(max(p) <= 48 for i, p in enumerate(images) if i != 1)
    parts = attention_buckets(tokens, images, max_cells=10**9)
    assert [1] in parts and len(parts) == 2  # the large image's item runs apart from the five small ones
    together = padded_cost(tokens, images)
    split = sum(padded_cost([tokens[b] for b in p], [images[b] for b in p]) for p in parts)
    assert split < together / 2


def test_take_items_equals_packing_those_items(builder):
    from moon3rt.batching import take_items

    items = prepared(builder, BATCHES["7-items-mixed"])
    batch = pack(items)
    for indices in ([3], [6, 0, 2], [1, 4], list(range(7))[::-1]):
        got, want = take_items(batch, indices, 2), pack([items[i] for i in indices])
        for field in ("input_ids", "position_ids", "cu_seqlens", "pool_index", "title_index", "cu_titles",
                      "cu_images", "pixel_values", "image_grid_thw"):
            a, b = getattr(got, field), getattr(want, field)
            assert (a is None and b is None) or torch.equal(a, b), (indices, field)


def test_attention_buckets_respect_the_budget_and_padding():
    from moon3rt.batching import attention_buckets, padded_cost

    tokens = [10, 200, 12, 11, 190, 9, 50]
    images = [[16], [256, 64], [], [16, 16], [256], [], [64]]
    for cells in (1, 5_000, 60_000, 200_000, 10**9):
        parts = attention_buckets(tokens, images, cells)
        assert sorted(i for p in parts for i in p) == list(range(7)) and all(p == sorted(p) for p in parts)
        for p in parts:
            cost = padded_cost([tokens[b] for b in p], [images[b] for b in p])
            exact = sum(tokens[b] ** 2 + sum(x * x for x in images[b]) for b in p)
            assert len(p) == 1 or (cost <= cells and cost <= 1.5 * exact), (cells, p)
    assert attention_buckets(tokens, images, 1) == [[i] for i in sorted(range(7), key=lambda b: tokens[b])]
    with pytest.raises(ValueError, match="max_cells must be positive"):
        attention_buckets(tokens, images, 0)


def test_session_options_are_explicit_and_recorded(model, tmp_path, monkeypatch):
    from moon3rt.backends.onnxruntime_backend import OnnxRuntimeBackend

    threads = torch.get_num_threads()
    backend = OnnxRuntimeBackend(model, torch.device("cpu"), cache_dir=tmp_path)
    options = backend.session_options()
    assert options.intra_op_num_threads == threads
    assert options.get_session_config_entry("session.intra_op.allow_spinning") == "0"
    assert backend.settings["intra_op_num_threads"] == threads and backend.settings["allow_spinning"] is False
    assert backend.settings["attention"] == "ops"
    monkeypatch.setenv("MOON3RT_ORT_THREADS", "3")
    monkeypatch.setenv("MOON3RT_ORT_SPIN", "1")
    spun = OnnxRuntimeBackend(model, torch.device("cpu"), cache_dir=tmp_path)
    assert spun.session_options().intra_op_num_threads == 3 and spun.settings["allow_spinning"] is True
    assert OnnxRuntimeBackend(model, torch.device("cpu"), threads=2).session_options().intra_op_num_threads == 2
    with pytest.raises(ValueError, match="intra-op threads must be positive, got 0"):
        OnnxRuntimeBackend(model, torch.device("cpu"), threads=0)
    monkeypatch.setenv("MOON3RT_ORT_ATTENTION", "flash")
    with pytest.raises(ValueError, match=r"MOON3RT_ORT_ATTENTION must be one of \('ops', 'onnx'\), got 'flash'"):
        OnnxRuntimeBackend(model, torch.device("cpu"))


# ------------------------------------------------------------- opset-23 Attention
@pytest.fixture(scope="module")
def attention_graph(model, tmp_path_factory):
    return export_onnx(model, tmp_path_factory.mktemp("attention") / "model.onnx", attention="onnx")


def test_attention_op_graph_matches_torch(attention_graph, model, builder):
    onnx.checker.check_model(str(attention_graph), full_check=True)
    proto = onnx.load(str(attention_graph))
    assert {o.domain: o.version for o in proto.opset_import}[""] == 23
    attention = [n for n in proto.graph.node if n.op_type == "Attention"]
    # one per vision block and decoder layer, and no score-sized Softmax left outside them
    cfg = model.cfg
    assert len(attention) == cfg.vision.depth + cfg.text.num_hidden_layers
    assert json.loads(attention_graph.with_suffix(".json").read_text())["opset"] == 23
    session = ort.InferenceSession(str(attention_graph), providers=["CPUExecutionProvider"])
    for case in ("3-items-mixed", "text-only", "image-only", "1-large-5-small"):
        compare(session, model, packed(builder, BATCHES[case]), name=f"Attention-23 {case}")


def test_attention_op_backend_and_bad_options(model, builder, tmp_path, monkeypatch):
    from moon3rt.backends.onnxruntime_backend import OnnxRuntimeBackend

    monkeypatch.setenv("MOON3RT_ORT_ATTENTION", "onnx")
    backend = OnnxRuntimeBackend(model, torch.device("cpu"), cache_dir=tmp_path)
    batch = packed(builder, BATCHES["3-items-mixed"])
    with torch.no_grad():
        assert (backend.embed(batch) - model(batch)).abs().max().item() <= ATOL
    assert backend.model_path.parent.name.endswith("-attention-onnx") and backend.settings["attention"] == "onnx"
    with pytest.raises(ExportError, match="attention='onnx' writes opset 23"):
        export_onnx(model, tmp_path / "m.onnx", opset=17, attention="onnx")
    with pytest.raises(ExportError, match="needs the TorchScript-based exporter and the standard graph"):
        export_onnx(model, tmp_path / "m.onnx", attention="onnx", plugins=True)
    with pytest.raises(ExportError, match="attention must be one of"):
        export_onnx(model, tmp_path / "m.onnx", attention="sdpa")


def test_cli_exports_and_verifies(tmp_path, capsys):
    assert main(["--model", "moon3-tiny", "--out", str(tmp_path / "m.onnx"), "--verify"]) == 0
    out = capsys.readouterr().out
    assert "max abs error" in out and (tmp_path / "m.json").exists()
    error = float(out.rsplit("max abs error", 1)[1].split(",")[0])
    assert error <= ATOL


# ------------------------------------------------------------------------- bad input
def test_unsupported_opset_and_model_are_clear_errors(model, tmp_path, capsys):
    with pytest.raises(ExportError, match=r"opset 11 is not supported: use 12\.\.20"):
        export_onnx(model, tmp_path / "m.onnx", opset=11)
    with pytest.raises(ExportError, match="neither a preset"):
        export_onnx("moon3-huge", tmp_path / "m.onnx")
    with torch.device("meta"):
        hollow = Moon3Model(Moon3Config.from_name("moon3-tiny"))
    with pytest.raises(ExportError, match="meta device"):
        export_onnx(hollow, tmp_path / "m.onnx")
    broken = tiny()
    broken.cfg.moon3.pooling = "cls"  # a config edited after the model was built
    with pytest.raises(ValueError, match="moon3.pooling='cls' is not one of"):
        export_onnx(broken, tmp_path / "m.onnx")
    assert main(["--model", "moon3-tiny", "--out", str(tmp_path / "m.onnx"), "--opset", "9"]) == 2
    assert "opset 9 is not supported" in capsys.readouterr().err


def test_mismatched_image_tokens_are_rejected(model, builder):
    batch = packed(builder, BATCHES["1-item-1-image"])
    batch.input_ids[torch.nonzero(batch.input_ids == model.cfg.image_token_id)[0]] = 11
    with pytest.raises(ValueError, match=r"<\|image_pad\|> tokens but \d+ merged image tokens"):
        export_inputs(batch, model.cfg)


def test_missing_onnxruntime_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    with pytest.raises(ImportError, match=r"pip install 'moon3rt\[onnx\]'"):
        moon3rt.load("moon3-tiny", device="cpu", backend="onnxruntime")
