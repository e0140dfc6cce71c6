"""The plugin graph (FIRE and MHMF as moon3rt custom nodes), its registry, the Triton
adapters TensorRT launches, their PTX and the TensorRT plugin definitions, all on a CPU.

What cannot run here (no TensorRT, no GPU): TensorRT parsing and building the plugin
graph, and the plugin kernels on a device. The TensorRT side is checked against a fake
`tensorrt.plugin` that enforces the schema rules of the real one (see _FAKE_TRT)."""

import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from crafted import packed
from moon3rt.export.export_onnx import ExportError, export_onnx
from moon3rt.export.export_onnx import main as export_main
from moon3rt.export.onnx_model import OUTPUT, export_inputs
from moon3rt.export.plugin_kernels import plugin_launch, run_plugin
from moon3rt.export.plugin_model import stable_partition
from moon3rt.export.plugins import (
    DOMAIN,
    PLUGINS,
    PluginGraphError,
    check_plugin_graph,
    fusion_pool_ref,
    fusion_scores_ref,
    plugin_nodes,
    reference_evaluator,
)
from moon3rt.export.triton_aot import (
    PTX_VERSIONS,
    check_triton_version,
    entry_parameters,
    ptx_version,
    strip_hidden_parameters,
)
from moon3rt.kernels.fire import fire_inject_ref, fire_prologue_ref
from moon3rt.kernels.fusion_attention import fusion_attention_ref
from moon3rt.kernels.testing import interpreter_or_cuda

from moon3rt.config import Moon3Config
from moon3rt.model import random_model
from moon3rt.prompt import PromptBuilder, load_tokenizer

ROOT = Path(__file__).resolve().parents[1]
TOKENIZER = ROOT / "moon3rt/assets/moon3-tiny/tokenizer.json"
ATOL = 1e-5
DEVICE = interpreter_or_cuda()
# items as (title, [(height, width) of each image]); item 3 has no title, item 1 no image
ITEMS = [("two views", [(37, 101), (113, 47)]), ("navy linen shirt, size M", []), (None, [(75, 75)]),
         ("green ceramic mug", [(90, 60)]), ("x", [])]


def tiny(**moon3):
    cfg = Moon3Config.from_name("moon3-tiny-random")
    for key, value in moon3.items():
        setattr(cfg.moon3, key, value)
    return random_model(cfg.validate(), seed=5)


@pytest.fixture(scope="module")
def model():
    return tiny()


@pytest.fixture(scope="module")
def builder(model):
    return PromptBuilder(model.cfg, load_tokenizer(TOKENIZER))


@pytest.fixture(scope="module")
def graphs(model, tmp_path_factory):
    out = tmp_path_factory.mktemp("plugin-graph")
    return {"standard": export_onnx(model, out / "standard.onnx"),
            "plugins": export_onnx(model, out / "plugins.onnx", plugins=True),
            "text-plugins": export_onnx(model, out / "text.onnx", vision=False, plugins=True)}


# ------------------------------------------------------------------------ the graph
def test_plugin_graph_nodes_match_the_registry(graphs, model):
    proto = onnx.load(str(graphs["plugins"]))
    onnx.checker.check_model(proto, full_check=True)
    fire = model.cfg.moon3.fire
    assert check_plugin_graph(proto) == {"FirePrologue": 1, "FireInject": len(fire.layers), "FusionScores": 1,
                                         "FusionPool": 1}
    assert any(o.domain == DOMAIN and o.version == 1 for o in proto.opset_import)
    nodes = plugin_nodes(proto)
    attrs = [{a.name: onnx.helper.get_attribute_value(a) for a in n.attribute} for n in nodes]
    for node, attr in zip(nodes, attrs):
        assert node.domain == DOMAIN and attr["plugin_namespace"] == b"moon3rt" and attr["plugin_version"] == b"1"
        assert attr["aot"] == 1  # TensorRT's parser then takes the plugin's ahead-of-time implementation
        assert len(node.input) == len(PLUGINS[node.op_type].inputs)
        assert len(node.output) == len(PLUGINS[node.op_type].outputs)
    by_op = {}
    for node, attr in zip(nodes, attrs):
        by_op.setdefault(node.op_type, []).append(attr)
    assert by_op["FirePrologue"][0]["eps"] == pytest.approx(fire.eps)
    assert [a["layer"] for a in by_op["FireInject"]] == list(fire.layers)
    assert by_op["FusionScores"][0]["num_heads"] == by_op["FusionPool"][0]["num_heads"] == 4
    # the plugin graph keeps the standard graph's interface and stays loop-free
    standard = onnx.load(str(graphs["standard"]))
    io = lambda p: [(v.name, v.type.tensor_type.elem_type) for v in (*p.graph.input, *p.graph.output)]
    assert io(proto) == io(standard)
    assert proto.graph.output[0].type.tensor_type.shape.dim[1].dim_value == model.cfg.output_dim
    assert not {n.op_type for n in proto.graph.node} & {"Loop", "If", "Scan", "NonZero"}
    sidecar = json.loads(graphs["plugins"].with_suffix(".json").read_text())
    assert sidecar["graph"] == "full+plugins"


def test_text_only_plugin_graph_has_no_fire(graphs):
    proto = onnx.load(str(graphs["text-plugins"]))
    assert check_plugin_graph(proto) == {"FusionScores": 1, "FusionPool": 1}
    assert "pixel_values" not in [i.name for i in proto.graph.input]


def test_registry_check_names_every_problem(graphs):
    proto = onnx.load(str(graphs["plugins"]))
    nodes = plugin_nodes(proto)
    next(a for a in nodes[0].attribute if a.name == "eps").name = "epsilon"  # FirePrologue's eps
    nodes[1].domain = "com.example"  # a FireInject outside the domain
    nodes[-1].op_type = "FusionPoolV2"
    with pytest.raises(PluginGraphError) as err:
        check_plugin_graph(proto)
    text = str(err.value)
    assert "attributes ['aot', 'epsilon', 'plugin_namespace', 'plugin_version'], expected ['aot', 'eps'," in text
    assert "FireInject in domain 'com.example', expected 'moon3rt'" in text
    assert "FusionPoolV2): no such op in the plugin registry" in text


@pytest.mark.parametrize("graph", ["plugins", "text-plugins"])
def test_plugin_graph_with_reference_ops_equals_standard_graph(graphs, model, builder, graph):
    """The custom nodes evaluated by their torch references give the standard graph's output."""
    spec = ITEMS if graph == "plugins" else [item for item in ITEMS if not item[1]]
    batch = packed(builder, spec)
    inputs = export_inputs(batch, model.cfg, vision=graph == "plugins")
    evaluator = reference_evaluator(str(graphs[graph]))
    got = evaluator.run([OUTPUT], {name: inputs[name] for name in evaluator.input_names})[0]
    session = ort.InferenceSession(str(graphs["standard"]), providers=["CPUExecutionProvider"])
    full = export_inputs(batch, model.cfg)  # the standard graph has the vision inputs
    standard = session.run([OUTPUT], {i.name: full[i.name] for i in session.get_inputs()})[0]
    with torch.no_grad():
        ref = model(batch).numpy()
    print(f"{graph}: plugin graph vs standard graph {np.abs(got - standard).max():.2e}, vs torch "
          f"{np.abs(got - ref).max():.2e}")
    assert got.shape == ref.shape
    assert np.abs(got - standard).max() <= ATOL and np.abs(got - ref).max() <= ATOL


def test_pooling_variants_and_backbone_export_plugin_graphs(builder, tmp_path):
    batch = packed(builder, ITEMS[:3])
    for name, net, nodes in (("mean", tiny(pooling="mean"), {"FirePrologue", "FireInject", "FusionScores"}),
                             ("backbone", _backbone(), set())):
        path = export_onnx(net, tmp_path / f"{name}.onnx", plugins=True)
        proto = onnx.load(str(path))
        assert nodes <= set(check_plugin_graph(proto)) and (nodes or not plugin_nodes(proto))
        evaluator = reference_evaluator(proto)
        inputs = export_inputs(batch, net.cfg)
        got = evaluator.run([OUTPUT], {n: inputs[n] for n in evaluator.input_names})[0]
        with torch.no_grad():
            assert np.abs(got - net(batch).numpy()).max() <= ATOL, name


def _backbone():
    cfg = Moon3Config.from_name("moon3-tiny-random")
    cfg.moon3 = None
    return random_model(cfg.validate(), seed=5)


def test_plugin_export_cli_verifies_and_dynamo_is_refused(tmp_path, capsys):
    assert export_main(["--model", "moon3-tiny-random", "--out", str(tmp_path / "p.onnx"), "--plugins", "--verify"]) == 0
    out = capsys.readouterr().out
    assert "reference evaluator" in out and float(out.rsplit("max abs error", 1)[1].split(",")[0]) <= ATOL
    with pytest.raises(ExportError, match="plugin graph needs the TorchScript-based exporter"):
        export_onnx("moon3-tiny-random", tmp_path / "d.onnx", opset=18, dynamo=True, plugins=True)


def test_stable_partition_packs_masked_tokens_first():
    g = torch.Generator().manual_seed(0)
    for n in (1, 2, 7, 64):
        mask = torch.rand(n, generator=g) < 0.4
        order, count = stable_partition(mask)
        want = torch.cat([torch.nonzero(mask).flatten(), torch.nonzero(~mask).flatten()])
        assert torch.equal(order, want) and count.tolist() == [int(mask.sum())]


# ----------------------------------------------------------- references and adapters
def _fusion_case(lengths_img, lengths_txt, heads=4, dim=40, seed=0):
    g = torch.Generator().manual_seed(seed)
    batch = len(lengths_img)
    cu = lambda lens: torch.tensor([0, *np.cumsum(lens)], dtype=torch.int32)
    q = 0.3 * torch.randn(batch, heads, dim, generator=g)
    # one extra row past the last segment: the graph's buffers are longer than cu[B]
    x_img = torch.randn(sum(lengths_img) + 1, dim, generator=g)
    x_txt = torch.randn(sum(lengths_txt) + 1, dim, generator=g)
    gate = torch.randn(batch, heads, 2, generator=g)
    return q, x_img, cu(lengths_img), x_txt, cu(lengths_txt), gate


FUSION_CASES = [([5, 0, 3], [0, 4, 2]), ([1], [1]), ([0, 0], [0, 3]), ([70, 2], [65, 0])]


@pytest.mark.parametrize("lengths_img, lengths_txt", FUSION_CASES)
def test_fusion_scores_then_pool_is_fusion_attention(lengths_img, lengths_txt):
    q, x_img, cu_img, x_txt, cu_txt, gate = _fusion_case(lengths_img, lengths_txt)
    s_img, s_txt, row_max, row_sum = fusion_scores_ref(q, x_img, cu_img, x_txt, cu_txt)
    got = fusion_pool_ref(x_img, cu_img, s_img, x_txt, cu_txt, s_txt, row_max, row_sum, gate)
    torch.testing.assert_close(got, fusion_attention_ref(q, x_img, cu_img, x_txt, cu_txt, gate), atol=1e-6, rtol=1e-5)
    # the kernels TensorRT launches, through their adapters (Triton's interpreter on a CPU)
    args = [t.to(DEVICE) for t in (q, x_img, cu_img, x_txt, cu_txt)]
    k_img, k_txt, k_max, k_sum = run_plugin("FusionScores", args, {"num_heads": q.shape[1]})
    torch.testing.assert_close(k_max.cpu(), row_max, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(k_sum.cpu(), row_sum, atol=1e-5, rtol=1e-5)
    mix = run_plugin("FusionPool", [args[1], args[2], k_img, args[3], args[4], k_txt, k_max, k_sum, gate.to(DEVICE)],
                     {"num_heads": q.shape[1]})[0]
    torch.testing.assert_close(mix.cpu(), got, atol=1e-5, rtol=1e-5)


def test_fire_adapters_match_references():
    g = torch.Generator().manual_seed(1)
    z, norm = 3 * torch.randn(13, 72, generator=g), 1 + 0.1 * torch.randn(72, generator=g)
    w_down = torch.randn(8, 72, generator=g) / 8
    r = run_plugin("FirePrologue", [t.to(DEVICE) for t in (z, norm, w_down)], {"eps": 1e-6})[0]
    torch.testing.assert_close(r.cpu(), fire_prologue_ref(z, norm, w_down, 1e-6), atol=1e-5, rtol=1e-5)
    hidden, up = torch.randn(50, 40, generator=g), torch.randn(8, 40, generator=g) / 3
    rows = torch.randperm(50, generator=g)[:13].to(torch.int32)
    alpha = torch.tensor([0.4])
    want = hidden.clone()
    fire_inject_ref(want, rows.long(), r.cpu(), up, alpha)
    node = PLUGINS["FireInject"].reference(hidden, rows, r.cpu(), up, torch.tanh(alpha))
    torch.testing.assert_close(node, want)
    inplace = hidden.clone().to(DEVICE)
    out = run_plugin("FireInject", [inplace, rows.to(DEVICE), r, up.to(DEVICE), torch.tanh(alpha).to(DEVICE)],
                     {"layer": 0})[0]
    assert out.data_ptr() == inplace.data_ptr()  # aliased: updated in place, as TensorRT runs it
    torch.testing.assert_close(out.cpu(), want, atol=1e-5, rtol=1e-5)


class SymDim:
    """A stand-in for TensorRT's symbolic dims: records the arithmetic done on it."""

    def __init__(self, text):
        self.text = text

    def __add__(self, other):
        return SymDim(f"({self.text} + {other})")

    def __floordiv__(self, other):
        return SymDim(f"{self.text} // {other}")

    def __repr__(self):
        return self.text


def test_launch_grid_is_symbolic_in_dynamic_dims():
    n, b = SymDim("N"), SymDim("B")
    prologue = plugin_launch("FirePrologue", [(n, 5120), (5120,), (64, 5120)], {"eps": 1e-6})
    assert repr(prologue.grid[0]) == "(N + 63) // 64" and prologue.grid[1:] == (1, 1)
    assert prologue.constexprs == {"EPS": 1e-6, "BLOCK_M": 64, "BLOCK_R": 64, "BLOCK_K": 32, "DOT_PRECISION": "ieee"}
    scores = plugin_launch("FusionScores", [(b, 8, 1536), (SymDim("T"), 1536), (SymDim("B1"),), (SymDim("T"), 1536),
                                            (SymDim("B1"),)], {"num_heads": 8})
    assert scores.grid == (b, 2, 1) and scores.constexprs["H_PAD"] == 16 and scores.num_warps == 8
    pool_shapes = [(SymDim("T"), 1536)] * 8 + [(b, 8, 2)]
    assert plugin_launch("FusionPool", pool_shapes, {"num_heads": 8}).grid == (24, b, 1)
    assert list(prologue.signature) == ["z_ptr", "norm_weight_ptr", "w_down_ptr", "N", "K", "RANK", "r_ptr"]
    with pytest.raises(ValueError, match="MHMF heads must be fixed when the engine is built"):
        plugin_launch("FusionScores", [(b, SymDim("H"), 64), (n, 64), (b,), (n, 64), (b,)], {"num_heads": 8})
    with pytest.raises(ValueError, match="num_heads=4 but its inputs have 8 heads"):
        plugin_launch("FusionPool", pool_shapes, {"num_heads": 4})


# ------------------------------------------------------------------ PTX, ahead of time
def _no_interpreter_env():
    return {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}


# model -> archs: moon3-2b's sizes (rank 64, d = 1536) are where shared memory is largest
PTX_CASES = {"moon3-tiny-random": (80, 90), "moon3-2b": (90,)}


@pytest.fixture(scope="module", params=list(PTX_CASES))
def plugin_ptx(request, tmp_path_factory):
    """PTX of the four plugin kernels for a model's sizes and archs, compiled in a process
    without Triton's interpreter (the CLI the docs give)."""
    model, archs = request.param, PTX_CASES[request.param]
    out = tmp_path_factory.mktemp(f"ptx-{model}")
    command = [sys.executable, "-m", "moon3rt.export.triton_aot", "--model", model, "--out", str(out)]
    for arch in archs:
        command += ["--arch", str(arch)]
    proc = subprocess.run(command, env=_no_interpreter_env(), capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out, json.loads((out / "manifest.json").read_text()), model, archs


def test_plugin_ptx_takes_exactly_the_plugin_launch_arguments(plugin_ptx):
    out, manifest, model, archs = plugin_ptx
    assert manifest["ptx_versions"] == {str(a): 80 for a in archs}
    assert {(k["op_type"], k["arch"]) for k in manifest["kernels"]} == {(op, a) for op in PLUGINS for a in archs}
    for k in manifest["kernels"]:
        spec = PLUGINS[k["op_type"]]
        # TensorRT's AOT launch: input pointers, extra int32 args, output pointers, nothing else
        want = ["ptr"] * len(spec.inputs) + ["i32"] * len(spec.extra_args) + ["ptr"] * len(spec.outputs)
        ptx = (out / k["file"]).read_text()
        assert entry_parameters(ptx, k["entry"]) == want == k["parameter_types"], k["op_type"]
        assert k["parameters"] == ([f"{t.name}_ptr" for t in spec.inputs] + [e[0] for e in spec.extra_args]
                                   + [f"{t.name}_ptr" for t in spec.outputs])
        # one hidden pointer removed per scratch buffer of the compiled kernel's metadata
        assert k["hidden_parameters_removed"] == len(k["scratch_buffers"]) > 0
        assert ".version 8.0" in ptx and f".target sm_{k['arch']}{'a' if k['arch'] == 90 else ''}" in ptx
        # TensorRT launches AOT plugin kernels without opting in to more than 48 KiB
        assert k["num_warps"] == 8 and 0 < k["shared_bytes"] <= 49152, (model, k["op_type"], k["shared_bytes"])
    eps = next(k for k in manifest["kernels"] if k["op_type"] == "FirePrologue")["constexprs"]["EPS"]
    assert eps == pytest.approx(Moon3Config.from_name(model).moon3.fire.eps)  # a float attribute, specialised
    if model == "moon3-2b":  # FireInject at rank 64 needs 64 KiB with Triton's default 3 stages
        inject = next(k for k in manifest["kernels"] if k["op_type"] == "FireInject")
        assert inject["constexprs"]["BLOCK_R"] == 64 and inject["num_stages"] <= 2


def _ptxas() -> str | None:
    """The CUDA toolkit's ptxas, else the one bundled with triton."""
    import triton

    for candidate in (shutil.which("ptxas"), "/usr/local/cuda/bin/ptxas",
                      str(Path(triton.__file__).parent / "backends/nvidia/bin/ptxas")):
        if candidate and Path(candidate).exists():
            return candidate
    return None


def test_plugin_ptx_assembles_with_ptxas(plugin_ptx):
    ptxas = _ptxas()
    if ptxas is None:
        pytest.skip("no ptxas on this machine (no CUDA toolkit, and triton's bundled one is missing)")
    out, manifest, _, _ = plugin_ptx
    for k in manifest["kernels"]:
        arch = f"sm_{k['arch']}{'a' if k['arch'] == 90 else ''}"
        command = [ptxas, f"-arch={arch}", str(out / k["file"]), "-o", str(out / f"{k['file']}.cubin")]
        proc = subprocess.run(command, capture_output=True, text=True, check=False)
        assert proc.returncode == 0, f"{' '.join(command)} failed:\n{proc.stderr[-3000:]}"


_LIMITS_SCRIPT = textwrap.dedent('''
    import json, re
    from moon3rt.config import Moon3Config
    from moon3rt.export import triton_aot
    from moon3rt.export.triton_aot import PluginSharedMemoryError, compile_plugin, plugin_shapes
    report = {}
    # MHMF with more than 16 heads (H_PAD 32): 56 KiB with Triton's default 3 stages
    cfg = Moon3Config.from_name("moon3-2b")
    cfg.moon3.fusion.num_heads = 32
    shapes, attrs = plugin_shapes(cfg)["FusionPool"]
    kernel, launch = compile_plugin("FusionPool", shapes, attrs, 90)
    report["pool32"] = [launch.constexprs["H_PAD"], kernel.shared, kernel.num_stages]
    # a kernel over the limit is refused, naming what it needs
    shapes, attrs = plugin_shapes(Moon3Config.from_name("moon3-2b"))["FireInject"]
    try:
        compile_plugin("FireInject", shapes, attrs, 90, max_shared=1024)
    except PluginSharedMemoryError as err:
        report["refused"] = str(err)
    # per-arch PTX ISA: Blackwell needs 8.6 (sm_100a) and 8.7 (sm_120a)
    for arch in (100, 120):
        kernel, _ = compile_plugin("FireInject", shapes, attrs, arch)
        report[arch] = [re.search(r"\\.version (\\S+)", kernel.ptx).group(1), kernel.ptx_version]
    # an arch outside the table is refused before Triton compiles anything (its LLVM would abort)
    try:
        compile_plugin("FireInject", shapes, attrs, 75)
    except ValueError as err:
        report["unknown_arch"] = str(err)
    print(json.dumps(report))
''')


def test_plugin_kernels_fit_48_kib_and_take_each_archs_ptx_isa():
    proc = subprocess.run([sys.executable, "-c", _LIMITS_SCRIPT], env=_no_interpreter_env(), capture_output=True,
                          text=True, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    h_pad, shared, stages = report["pool32"]
    assert h_pad == 32 and shared <= 49152 and stages <= 2, report["pool32"]
    assert re.search(r"FireInject \(fire_inject_plugin, sm_90, .*'BLOCK_R': 64.*\) needs \d+ B with num_stages=2, "
                     r"\d+ B with num_stages=1 of shared memory; a TensorRT AOT plugin kernel gets at most 1024 B",
                     report["refused"]), report["refused"]
    assert report["100"] == ["8.6", 86] and report["120"] == ["8.7", 87]
    assert "compute capability 75 is not supported" in report["unknown_arch"]
    assert "[80, 86, 89, 90, 100, 120]" in report["unknown_arch"]


def test_ptx_isa_per_arch_and_triton_floor():
    assert [ptx_version(a) for a in (80, 86, 89, 90, 100, 120)] == [80, 80, 80, 80, 86, 87]
    known = re.escape(str(sorted(PTX_VERSIONS)))
    for arch in (75, 103, 121):
        with pytest.raises(ValueError, match=rf"compute capability {arch} is not supported.*{known}"):
            ptx_version(arch)
    for ok in ("3.6.0", "3.9.0", "3.10.0+git1234"):
        check_triton_version(ok)
    with pytest.raises(RuntimeError, match=r"needs triton >= 3.6, found 3.5.1"):
        check_triton_version("3.5.1")


def test_hidden_parameters_are_only_dropped_when_unused():
    ptx = textwrap.dedent("""\
        .visible .entry k(
        \t.param .u64 .ptr .global .align 1 k_param_0,
        \t.param .u32 k_param_1,
        \t.param .u64 .ptr .global .align 1 k_param_2
        )
        {
        \tld.param.b64 %rd1, [k_param_0];
        \tld.param.b32 %r1, [k_param_1];
        }
        """)
    stripped = strip_hidden_parameters(ptx, "k", 1)
    assert entry_parameters(stripped, "k") == ["ptr", "i32"] and "k_param_2" not in stripped
    with pytest.raises(ValueError, match="hidden parameter k_param_1 is used"):
        strip_hidden_parameters(ptx, "k", 2)


# ---------------------------------------------------------------- TensorRT plugin code
def test_trt_plugins_name_what_to_install_without_tensorrt(monkeypatch):
    from moon3rt.export import trt_plugins

    monkeypatch.setitem(sys.modules, "tensorrt", None)
    with pytest.raises(trt_plugins.TensorRTMissing, match=r"full TensorRT >= 10.9.*pip install tensorrt-cu12.*"
                                                          r"TensorRT-RTX \(`import tensorrt_rtx`\) cannot build"):
        trt_plugins.register_plugins()


# A fake `tensorrt` / `tensorrt.plugin` with the rules the real register/aot_impl enforce
# (tensorrt/plugin/_validate.py): annotated TensorDesc inputs first, then typed attributes;
# aot_impl takes (inputs, attributes, outputs, tactic) and returns
# (name, PTX, KernelLaunchParams, SymIntExprs); dims are ints here.
_FAKE_TRT = textwrap.dedent('''
    import inspect, sys, types, typing
    trt = types.ModuleType("tensorrt"); trt.__version__ = "10.13.0"
    trt.float32, trt.int32 = "float32", "int32"
    trtp = types.ModuleType("tensorrt.plugin")
    class TensorDesc:
        def __init__(self, shape_expr=(), dtype=None, alias=None):
            self.shape_expr, self.dtype, self.alias = tuple(shape_expr), dtype, alias
        def aliased(self):
            return TensorDesc(self.shape_expr, self.dtype, alias=self)
    class KernelLaunchParams:
        grid_x = grid_y = grid_z = block_x = shared_mem = None
    class SymExprs(tuple): pass
    class SymIntExprs(SymExprs):
        @classmethod
        def from_tuple(cls, values): return cls(values)
    class SymInt32(int): pass
    REG, AOT = {}, {}
    def register(name):
        def deco(fn):
            sig = inspect.signature(fn)
            kinds = [p.annotation is TensorDesc for p in sig.parameters.values()]
            assert kinds == sorted(kinds, reverse=True), "TensorDescs first, then attributes"
            assert all(p.annotation in (int, float, str, bool, TensorDesc) for p in sig.parameters.values())
            assert typing.get_origin(sig.return_annotation) is tuple
            REG[name] = fn; return fn
        return deco
    def aot_impl(name):
        def deco(fn):
            names = list(inspect.signature(fn).parameters)
            reg = list(inspect.signature(REG[name]).parameters)
            assert names == reg + ["outputs", "tactic"], (names, reg)
            assert len(typing.get_args(inspect.signature(fn).return_annotation)) == 4
            AOT[name] = fn; return fn
        return deco
    def from_shape_expr(shape, dtype): return TensorDesc(shape, dtype)
    for n, v in dict(TensorDesc=TensorDesc, KernelLaunchParams=KernelLaunchParams, SymExprs=SymExprs,
                     SymIntExprs=SymIntExprs, SymInt32=SymInt32, register=register, aot_impl=aot_impl,
                     from_shape_expr=from_shape_expr, REG=REG, AOT=AOT).items():
        setattr(trtp, n, v)
    trt.plugin = trtp
    sys.modules["tensorrt"], sys.modules["tensorrt.plugin"] = trt, trtp
''')

_REGISTER_SCRIPT = _FAKE_TRT + textwrap.dedent('''
    import json, os
    os.environ["MOON3RT_TRT_ARCH"] = "90"
    from moon3rt.export.trt_plugins import register_plugins
    from moon3rt.export.triton_aot import plugin_shapes, entry_parameters
    from moon3rt.config import Moon3Config
    from moon3rt.export.plugins import PLUGINS
    ids = register_plugins()
    report = {"ids": ids}
    for op, (shapes, attrs) in plugin_shapes(Moon3Config.from_name("moon3-tiny-random")).items():
        name = "moon3rt::" + op
        descs = [TensorDesc(s, t.dtype) for s, t in zip(shapes, PLUGINS[op].inputs)]
        outs = REG[name](*descs, **attrs)
        kernel, ptx, params, extra = AOT[name](*descs, *attrs.values(), outs, 0)
        report[op] = {"outputs": [list(o.shape_expr) for o in outs], "aliased": [o.alias is not None for o in outs],
                      "kernel": kernel, "params": entry_parameters(ptx, kernel), "extra": list(extra),
                      "grid": [params.grid_x, params.grid_y, params.grid_z], "block": params.block_x,
                      "shared": params.shared_mem, "target": ".target sm_90a" in ptx}
    # aot_impl refuses a kernel above the shared memory TensorRT gives it (the limit lowered here)
    from moon3rt.export import triton_aot
    triton_aot.MAX_PLUGIN_SHARED = 1024
    shapes, attrs = plugin_shapes(Moon3Config.from_name("moon3-tiny-random"))["FireInject"]
    descs = [TensorDesc(s, t.dtype) for s, t in zip(shapes, PLUGINS["FireInject"].inputs)]
    try:
        AOT["moon3rt::FireInject"](*descs, *attrs.values(), REG["moon3rt::FireInject"](*descs, **attrs), 0)
    except triton_aot.PluginSharedMemoryError as err:
        report["refused"] = str(err)
    print(json.dumps(report))
''')


def test_trt_plugin_definitions_against_the_tensorrt_plugin_schema():
    """register_plugins with a schema-checking fake tensorrt.plugin: every output descriptor,
    the PTX aot_impl hands TensorRT, its grid and its extra args, for moon3-tiny's sizes."""
    proc = subprocess.run([sys.executable, "-c", _REGISTER_SCRIPT], env=_no_interpreter_env(), capture_output=True,
                          text=True, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report["ids"] == sorted(f"moon3rt::{op}" for op in PLUGINS)
    tokens, items, heads, d = 64, 2, 4, 64
    assert report["FirePrologue"]["outputs"] == [[tokens, 8]] and report["FirePrologue"]["extra"] == [tokens, 128, 8]
    assert report["FireInject"]["aliased"] == [True] and report["FireInject"]["extra"] == [tokens, 8, d]
    assert report["FusionScores"]["outputs"] == [[heads, tokens], [heads, tokens], [items, 2, heads], [items, 2, heads]]
    assert report["FusionScores"]["grid"] == [items, 2, 1] and report["FusionPool"]["grid"] == [1, items, 1]
    assert report["FusionPool"]["outputs"] == [[items, heads, d]]
    for op, spec in PLUGINS.items():
        r = report[op]
        want = ["ptr"] * len(spec.inputs) + ["i32"] * len(spec.extra_args) + ["ptr"] * len(spec.outputs)
        assert r["params"] == want and r["block"] == 256 and r["target"] and r["shared"] > 0, op
        assert re.fullmatch(r"[a-z_]+_plugin", r["kernel"])
    assert "gets at most 1024 B (TensorRT launches it without opting in to more)" in report["refused"]


def test_plugin_kernels_are_built_for_the_gpu_the_engine_is_built_on(monkeypatch):
    from moon3rt.export.trt_plugins import build_arch

    capability = {0: (9, 0), 1: (8, 9)}
    asked = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_device_capability",
                        lambda device: asked.append(device) or capability[torch.device(device).index])
    monkeypatch.delenv("MOON3RT_TRT_ARCH", raising=False)
    assert build_arch() == 90 and build_arch("cuda:1") == 89 and build_arch(torch.device("cuda", 1)) == 89
    assert asked == [torch.device("cuda", 0), torch.device("cuda", 1), torch.device("cuda", 1)]
    monkeypatch.setenv("MOON3RT_TRT_ARCH", "89")
    assert build_arch("cuda:1") == 89
    with pytest.raises(ValueError, match=r"MOON3RT_TRT_ARCH=89 but the engine is built on cuda:0, a GPU of compute "
                                         r"capability 90.*set it to 90"):
        build_arch()
    monkeypatch.setenv("MOON3RT_TRT_ARCH", "sm90")
    with pytest.raises(ValueError, match="expected a compute capability x10"):
        build_arch()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setenv("MOON3RT_TRT_ARCH", "90")
    assert build_arch() == 90  # no GPU: compiled for the named arch (checking plugins on a CPU)
    monkeypatch.delenv("MOON3RT_TRT_ARCH")
    with pytest.raises(RuntimeError, match="needs a CUDA device or MOON3RT_TRT_ARCH"):
        build_arch()
