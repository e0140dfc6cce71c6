"""A real TensorRT engine built on a CPU-only machine, with TensorRT-RTX (pip install
tensorrt-rtx-cu13, in the `test` extra), plus the engine build's and the tensorrt
backend's host-side logic.

TensorRT-RTX builds for a named compute capability without a GPU; loading the engine
needs one, so here the engine is checked by size, by the runtime's header check
(`get_engine_validity`: a well-formed engine is not reported malformed) and by its
build report; its layer count comes from the engine inspector where a GPU is present,
from the parsed network otherwise.

In CI (``CI`` set) a missing tensorrt_rtx fails: it is in the `test` extra, so a skip
would hide a broken install. Elsewhere (e.g. the GPU machine, which has no network to
install it) the engine tests skip and say why. Off x86_64 they always skip: the extra
installs tensorrt-rtx-cu13 only there (a platform marker). An installed but broken
tensorrt_rtx always fails.
"""

import json
import os
import platform
import subprocess
import sys
import warnings
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

onnx = pytest.importorskip("onnx")

from moon3rt.export.build_engine import (
    BuildError,
    ShapeOutOfProfile,
    TensorRTNotFound,
    build_engine,
    check_profiles,
    default_profiles,
    import_tensorrt,
    profile_shapes,
    select_profile,
)
from moon3rt.export.build_engine import (
    main as build_main,
)
from moon3rt.export.export_onnx import export_onnx
from moon3rt.export.onnx_model import example_batch, export_inputs

ROOT = Path(__file__).resolve().parents[1]


def _tensorrt_rtx():
    if platform.machine() != "x86_64":
        pytest.skip(f"the test extra installs tensorrt-rtx-cu13 on x86_64 only; this machine is {platform.machine()}")
    try:
        import tensorrt_rtx
    except ModuleNotFoundError as err:
        if err.name not in ("tensorrt_rtx", "tensorrt_rtx_bindings", "tensorrt_rtx_libs"):
            raise
        message = ("tensorrt_rtx is not installed (pip install tensorrt-rtx-cu13, part of moon3rt[test]); "
                   "the TensorRT-RTX engine build was not run")
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    except Exception as err:  # noqa: BLE001 - installed but broken, whatever the error: say so loudly
        pytest.fail(f"tensorrt_rtx is installed but does not import: {type(err).__name__}: {err}")
    return tensorrt_rtx


@pytest.fixture(scope="module")
def rtx():
    return _tensorrt_rtx()


@pytest.fixture(scope="module")
def graph(tmp_path_factory):
    """moon3-tiny's standard graph with small recorded ranges (T, P up to 1024, B up to 8)."""
    out = tmp_path_factory.mktemp("rtx")
    return export_onnx("moon3-tiny", out / "model.onnx", max_batch_tokens=1024, max_batch_items=8)


def _check_engine(rtx, path: Path) -> tuple:
    data = path.read_bytes()
    assert len(data) > 1_000_000, f"{path} holds only {len(data)} bytes"
    runtime = rtx.Runtime(rtx.Logger(rtx.Logger.ERROR))
    validity, diagnostics = runtime.get_engine_validity(data)
    # without a GPU the engine is INVALID for this machine, but never MALFORMED
    assert not diagnostics & int(rtx.EngineInvalidityDiagnostics.MALFORMED_ENGINE), (validity, diagnostics)
    garbage = runtime.get_engine_validity(b"\0" * len(data))[1]
    assert garbage & int(rtx.EngineInvalidityDiagnostics.MALFORMED_ENGINE)  # the check can tell
    return validity, diagnostics


def test_tensorrt_rtx_builds_the_standard_graph_with_two_profiles(rtx, graph, tmp_path):
    engine = tmp_path / "tiny.bf16.engine"
    report = build_engine(graph, engine, "bf16", profiles=2, timing_cache=tmp_path / "timing.cache",
                          compute_capability=[89, 80], flavour="tensorrt_rtx")
    layers = report.engine_layers if report.engine_layers is not None else report.network_layers
    print(f"TensorRT-RTX {report.tensorrt_version}: {report.engine_bytes / 2**20:.1f} MiB engine in "
          f"{report.build_seconds} s, {len(report.profiles)} profiles, {layers} layers "
          f"({'engine inspector' if report.engine_layers is not None else 'parsed network'})")
    _check_engine(rtx, engine)
    assert report.flavour == "tensorrt_rtx" and report.compute_capabilities == [89, 80]
    assert report.network_layers > 100
    assert report.profiles == [
        {"T": [1, 64, 256], "B": [1, 2, 2], "L": [1, 8, 256], "P": [4, 64, 256], "N": [1, 2, 64], "S": [4, 8, 64]},
        {"T": [1, 256, 1024], "B": [1, 8, 8], "L": [1, 32, 1024], "P": [4, 256, 1024], "N": [1, 8, 256],
         "S": [4, 32, 256]}]
    sidecar = json.loads(engine.with_name(engine.name + ".json").read_text())
    assert sidecar["precision"] == "bf16" and sidecar["inputs"]["position_ids"] == [3, "T"]
    assert any("ignores timing caches" in note for note in report.notes)
    assert not (tmp_path / "timing.cache").exists()
    if not torch.cuda.is_available():
        assert report.engine_layers is None  # an engine cannot be deserialised without a GPU


def test_tensorrt_rtx_fp32_build_from_the_command_line(rtx, graph, tmp_path, capsys):
    engine = tmp_path / "tiny.fp32.engine"
    assert build_main(["--onnx", str(graph), "--engine", str(engine), "--precision", "fp32",
                       "--compute-capability", "86", "--flavour", "tensorrt_rtx"]) == 0
    out = capsys.readouterr().out
    assert "with tensorrt_rtx" in out and "compute capability [86]" in out
    _check_engine(rtx, engine)


def test_tensorrt_rtx_refuses_hopper_and_the_plugin_graph(rtx, graph, tmp_path):
    with pytest.raises(BuildError, match=r"cannot target compute capability \[90\].*needs full TensorRT"):
        build_engine(graph, tmp_path / "e", "fp16", compute_capability=[90], flavour="tensorrt_rtx")
    with pytest.raises(BuildError, match="TensorRT-RTX needs --compute-capability"):
        build_engine(graph, tmp_path / "e", "fp16", flavour="tensorrt_rtx")
    plugins = export_onnx("moon3-tiny", tmp_path / "plugins.onnx", plugins=True)
    with pytest.raises(BuildError, match="plugin graph needs full TensorRT"):
        build_engine(plugins, tmp_path / "e", "fp16", compute_capability=[89], flavour="tensorrt_rtx")
    attention = export_onnx("moon3-tiny", tmp_path / "attention.onnx", attention="onnx")
    with pytest.raises(BuildError, match="opset-23 Attention nodes.*build the standard graph"):
        build_engine(attention, tmp_path / "e", "fp16", compute_capability=[89], flavour="tensorrt_rtx")


def test_tensorrt_rtx_tests_skip_off_x86_64_even_in_ci(monkeypatch):
    monkeypatch.setattr(platform, "machine", lambda: "aarch64")
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.skip.Exception, match="tensorrt-rtx-cu13 on x86_64 only; this machine is aarch64"):
        _tensorrt_rtx()


# ------------------------------------------------------- build options, no TensorRT needed
def test_missing_tensorrt_names_both_flavours_and_how_to_install(monkeypatch, tmp_path, capsys):
    monkeypatch.setitem(sys.modules, "tensorrt", None)
    monkeypatch.setitem(sys.modules, "tensorrt_rtx", None)
    with pytest.raises(TensorRTNotFound) as err:
        import_tensorrt()
    text = str(err.value)
    assert "import tensorrt: pip install tensorrt-cu12" in text and "import tensorrt_rtx: pip install tensorrt-rtx-cu13" in text
    assert build_main(["--onnx", str(tmp_path / "missing.onnx")]) == 2
    assert "neither is importable" in capsys.readouterr().err


def test_help_explains_the_full_tensorrt_path_for_h100():
    proc = subprocess.run([sys.executable, str(ROOT / "export/build_engine.py"), "--help"], capture_output=True,
                          text=True, check=True)
    for phrase in ("H100", "sm_90", "plugin graph", "export_onnx.py --plugins", "tensorrt-rtx-cu13",
                   "--compute-capability", "--timing-cache", "--profiles"):
        assert phrase in proc.stdout, phrase


def test_profiles_from_recorded_ranges_and_out_of_profile_batches():
    dims = {"T": {"min": 1, "opt": 4096, "max": 16384}, "B": {"min": 1, "opt": 16, "max": 64},
            "P": {"min": 4, "opt": 4096, "max": 16384}}
    small, full = default_profiles(dims, 2)
    assert full == {"T": (1, 4096, 16384), "B": (1, 16, 64), "P": (4, 4096, 16384)}
    assert small == {"T": (1, 1024, 4096), "B": (1, 4, 16), "P": (4, 1024, 4096)}
    check_profiles([small, full], dims)
    assert select_profile([small, full], {"T": 900, "B": 3, "P": 64}) == 0
    assert select_profile([small, full], {"T": 5000, "B": 3, "P": 64}) == 1
    with pytest.raises(ShapeOutOfProfile, match=r"T=20000, B=3, P=64 are outside every optimization profile "
                                                r"\(the widest allows T 1..16384, B 1..64, P 4..16384\)"):
        select_profile([small, full], {"T": 20000, "B": 3, "P": 64})
    with pytest.raises(ValueError, match=r"profile 0: B needs 1 <= min <= opt <= max, got \(1, 9, 8\)"):
        check_profiles([{"T": (1, 2, 3), "B": (1, 9, 8), "P": (4, 4, 4)}], dims)
    assert profile_shapes([3, "T"], full) == ((3, 1), (3, 4096), (3, 16384))


def test_gemm_precision_pass_keeps_the_graph_close(graph, tmp_path):
    ort = pytest.importorskip("onnxruntime")
    from moon3rt.export.precision import lower_gemm_precision

    from moon3rt.config import Moon3Config

    cfg = Moon3Config.from_name("moon3-tiny")
    inputs = export_inputs(example_batch(cfg), cfg)
    ref_session = ort.InferenceSession(str(graph), providers=["CPUExecutionProvider"])
    ref = ref_session.run(None, {i.name: inputs[i.name] for i in ref_session.get_inputs()})[0]
    proto = lower_gemm_precision(onnx.load(str(graph)), "fp16")
    onnx.checker.check_model(proto, full_check=True)
    gemms = [n for n in proto.graph.node if n.op_type in ("MatMul", "Gemm")]
    casts = [n for n in proto.graph.node if n.op_type == "Cast" and n.output[0] in {g.input[0] for g in gemms}]
    assert gemms and casts
    session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    got = session.run(None, {i.name: inputs[i.name] for i in session.get_inputs()})[0]
    cos = (got * ref).sum(-1) / np.linalg.norm(got, axis=-1) / np.linalg.norm(ref, axis=-1)
    assert got.dtype == np.float32 and cos.min() > 0.9999, cos


class _FakeTimingConfig:
    """The timing-cache calls of an IBuilderConfig; caches whose blob starts with b"other"
    are refused, as TensorRT refuses one from another version or GPU (ignore_mismatch=False)."""

    def __init__(self):
        self.cache = None

    def create_timing_cache(self, blob):
        return SimpleNamespace(blob=bytes(blob), serialize=lambda: bytes(blob) + b"+timings")

    def set_timing_cache(self, cache, ignore_mismatch):
        assert ignore_mismatch is False
        if cache.blob.startswith(b"other"):
            return False
        self.cache = cache
        return True

    def get_timing_cache(self):
        return self.cache


def test_timing_cache_from_another_tensorrt_or_gpu_is_replaced(tmp_path):
    from moon3rt.export.build_engine import BuildReport, _load_timing_cache, _save_timing_cache

    path = tmp_path / "trt.cache"
    report = BuildReport("e", "tensorrt", "10.13.0", "fp16", [], [])
    config = _FakeTimingConfig()
    assert _load_timing_cache(config, path, "tensorrt", report).blob == b"" and not report.notes  # no file yet
    path.write_bytes(b"mine")
    assert _load_timing_cache(config, path, "tensorrt", report).blob == b"mine" and config.cache.blob == b"mine"
    path.write_bytes(b"other version")
    with pytest.warns(UserWarning, match="does not match this TensorRT version or GPU"):
        cache = _load_timing_cache(config, path, "tensorrt", report)
    assert cache.blob == b"" and config.cache is cache and "building with a fresh one" in report.notes[-1]
    _save_timing_cache(config, path)
    assert path.read_bytes() == b"+timings" and [p.name for p in tmp_path.iterdir()] == ["trt.cache"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert _load_timing_cache(config, None, "tensorrt", report) is None
        assert _load_timing_cache(config, path, "tensorrt_rtx", report) is None


def test_build_engine_builds_on_the_device_it_is_given(monkeypatch, tmp_path):
    from contextlib import contextmanager

    entered = []

    @contextmanager
    def device(d):
        entered.append(str(d))
        yield

    monkeypatch.setitem(sys.modules, "tensorrt", SimpleNamespace(__version__="10.13.0"))
    monkeypatch.setattr(torch.cuda, "device", device)
    with pytest.raises(FileNotFoundError):  # stops at reading the graph, inside the device's scope
        build_engine(tmp_path / "missing.onnx", tmp_path / "e", "fp16", flavour="tensorrt", device="cuda:1")
    assert entered == ["cuda:1"]


# ------------------------------------------------------------------- tensorrt backend
def test_tensorrt_backend_errors_without_cuda_or_tensorrt(monkeypatch):
    import moon3rt
    from moon3rt.backends import tensorrt_backend

    with pytest.raises(ValueError, match="backend='tensorrt' runs engines on a CUDA device, not 'cpu'"):
        moon3rt.load("moon3-tiny", device="cpu", backend="tensorrt")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(RuntimeError, match="needs a CUDA device and torch sees none"):
        tensorrt_backend.require_cuda(torch.device("cuda"))
    monkeypatch.setitem(sys.modules, "tensorrt", None)
    monkeypatch.setitem(sys.modules, "tensorrt_rtx", None)
    with pytest.raises(ImportError, match=r"pip install tensorrt-cu12.*pip install tensorrt-rtx-cu13"):
        tensorrt_backend.require_tensorrt()


def test_tensorrt_backend_binds_graph_inputs_in_engine_dtypes():
    from moon3rt.backends.tensorrt_backend import batch_sizes, prepare_bindings, split_for_engine
    from moon3rt.config import Moon3Config

    cfg = Moon3Config.from_name("moon3-tiny")
    batch = example_batch(cfg)
    inputs = export_inputs(batch, cfg)
    engine = {"input_ids": torch.int64, "position_ids": torch.int64, "token_slot": torch.int32,
              "item_tokens": torch.int64, "item_mask": torch.bool, "pool_index": torch.int64,
              "title_mask": torch.bool, "pixel_values": torch.float16, "patch_slot": torch.int64,
              "image_patches": torch.int64, "image_mask": torch.bool, "patch_pos": torch.int64}
    bound = prepare_bindings(inputs, engine, torch.device("cpu"))
    assert list(bound) == list(engine)
    for name, tensor in bound.items():
        assert tensor.dtype == engine[name] and tensor.is_contiguous()
        assert np.array_equal(tensor.float().numpy(), inputs[name].astype(np.float32)) or name == "pixel_values"
    lengths = batch.cu_seqlens.diff().tolist()
    assert batch_sizes(inputs) == {"T": batch.input_ids.numel(), "B": 2, "L": max(lengths),
                                   "P": batch.pixel_values.shape[0], "N": 2, "S": 12}
    with pytest.raises(ValueError, match=r"takes inputs \['image_rows'\] that the batch does not provide"):
        prepare_bindings(inputs, {**engine, "image_rows": torch.int32}, torch.device("cpu"))
    big = {**inputs, "token_slot": inputs["token_slot"] + 2**31}
    with pytest.raises(ValueError, match="token_slot has values past int32"):
        prepare_bindings(big, engine, torch.device("cpu"))
    # one length bucket (little padding), then cut by the item count or the T + P budget;
    # a tiny attention budget runs every item alone, shortest first
    assert split_for_engine(batch, max_tokens=10_000, max_items=8, merge=2) == [[0, 1]]
    assert split_for_engine(batch, max_tokens=10_000, max_items=1, merge=2) == [[0], [1]]
    assert split_for_engine(batch, max_tokens=max(lengths) + 20, max_items=8, merge=2) == [[0], [1]]
    assert split_for_engine(batch, max_tokens=10_000, max_items=8, merge=2, max_cells=1) == [[1], [0]]


def test_tensorrt_backend_cache_keys(monkeypatch, tmp_path):
    """Engines and timing caches are keyed by flavour, version and compute capability; the
    digest covers the plugin code and the triton version that compiles its kernels."""
    import triton

    from moon3rt.backends import tensorrt_backend as tb
    from moon3rt.config import Moon3Config
    from moon3rt.model import random_model

    assert tb.engine_files("tensorrt", "10.13.0", 90, "bf16", "plugins") == (
        "tensorrt-10.13.0-sm90-bf16-plugins.engine", "tensorrt-10.13.0-sm90.timing.cache")
    named = lambda plugins: {f"{p.parent.name}/{p.name}" for p in tb.engine_sources(plugins)}
    plugin_code = {"export/trt_plugins.py", "export/triton_aot.py", "export/plugin_kernels.py", "kernels/fire.py",
                   "kernels/fusion_attention.py", "export/plugins.py", "export/plugin_model.py"}
    assert plugin_code <= named(True) and not plugin_code & named(False)
    assert {"export/build_engine.py", "export/precision.py"} <= named(False)
    model = random_model(Moon3Config.from_name("moon3-tiny"), seed=0)
    before = {plugins: tb.engine_digest(model, plugins) for plugins in (False, True)}
    monkeypatch.setattr(triton, "__version__", "0.0.0")
    assert tb.engine_digest(model, True) != before[True] and tb.engine_digest(model, False) == before[False]

    # a build goes to the backend's device, with a timing cache named like the engine
    calls = []

    def fake_build(onnx_path, engine_path, precision, **kwargs):
        calls.append(kwargs)
        Path(engine_path).write_bytes(b"engine")
        Path(str(engine_path) + ".json").write_text("{}")

    monkeypatch.setattr("moon3rt.export.export_onnx.export_onnx", lambda model, path, **kw: path)
    monkeypatch.setattr("moon3rt.export.build_engine.build_engine", fake_build)
    backend = object.__new__(tb.TensorRTBackend)
    backend.__dict__.update(device=torch.device("cuda", 1), trt=SimpleNamespace(__version__="10.13.0"),
                            flavour="tensorrt", model=model, cache_dir=tmp_path, precision="fp16", plugins=True,
                            max_batch_tokens=256, max_batch_items=4)
    monkeypatch.setattr(tb.TensorRTBackend, "_compute_capability", lambda self: 90)
    engine = backend._build()
    assert engine.name == "tensorrt-10.13.0-sm90-fp16-plugins.engine" and engine.read_bytes() == b"engine"
    (kwargs,) = calls
    assert kwargs["device"] == torch.device("cuda", 1) and kwargs["compute_capability"] == [90]
    assert kwargs["timing_cache"] == engine.parent / "tensorrt-10.13.0-sm90.timing.cache"
