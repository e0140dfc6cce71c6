"""libmoon3rt_kernels: configured and built with CMake here, loaded with ctypes.

The build needs cmake (>= 3.18), a C compiler and cuda.h (the CUDA toolkit's, else the
copy bundled with triton), but no GPU: Triton compiles the kernels for a named arch and
the library opens libcuda.so.1 only when a kernel is launched. Without cmake or a C
compiler the build tests skip and say what to install; in CI (``CI`` set) they fail,
since CI must have them. On a GPU (`-m gpu`) every kernel variant is launched through
ctypes on torch CUDA tensors and compared with the same kernel launched by Triton.

With ``TENSORRT_ROOT`` naming TensorRT 10 headers (``$TENSORRT_ROOT/include/NvInfer.h``) the
C++ plugin library (native/trt_plugin/) is built too and checked by tests/trt_plugin_check.cpp;
without them that test skips (CI has no TensorRT headers).
"""

import ctypes
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from moon3rt.export.triton_aot import entry_parameters

ROOT = Path(__file__).resolve().parents[1]
CTYPES = {"i32": ctypes.c_int32, "i64": ctypes.c_int64, "fp32": ctypes.c_float}
HAS_CUDA = torch.cuda.is_available()


class Image(ctypes.Structure):
    _fields_ = [("arch", ctypes.c_int), ("is_ptx", ctypes.c_int), ("shared_bytes", ctypes.c_int),
                ("data", ctypes.c_void_p), ("size", ctypes.c_size_t)]


class Kernel(ctypes.Structure):
    _fields_ = [("name", ctypes.c_char_p), ("entry", ctypes.c_char_p), ("signature", ctypes.c_char_p),
                ("num_params", ctypes.c_int), ("num_hidden", ctypes.c_int), ("num_warps", ctypes.c_int),
                ("num_images", ctypes.c_int), ("images", ctypes.POINTER(Image))]


def _triton_cuda_header() -> Path:
    """The cuda.h bundled with triton (for its own launcher)."""
    import triton

    return Path(triton.__file__).parent / "backends/nvidia/include/cuda.h"


def _cuda_header() -> Path | None:
    """The CUDA toolkit's cuda.h, else triton's copy, else None."""
    for base in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if base and (Path(base) / "include/cuda.h").exists():
            return Path(base) / "include/cuda.h"
    nvcc = shutil.which("nvcc")
    if nvcc and (Path(nvcc).resolve().parents[1] / "include/cuda.h").exists():
        return Path(nvcc).resolve().parents[1] / "include/cuda.h"
    return _triton_cuda_header() if _triton_cuda_header().exists() else None


def _c_compiler() -> str | None:
    for name in (os.environ.get("CC"), "cc", "gcc", "clang"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


def _require_build_tools() -> Path:
    """cuda.h's path; skips (fails in CI) without cmake, a C compiler or any cuda.h."""
    header = _cuda_header()
    missing = [what for what, found in (("cmake", shutil.which("cmake")), ("a C compiler", _c_compiler()),
                                        ("cuda.h", header)) if not found]
    if missing:
        message = (f"building libmoon3rt_kernels needs cmake >= 3.18, a C compiler and cuda.h; missing: "
                   f"{', '.join(missing)} (apt install cmake gcc; cuda.h comes with the CUDA toolkit or triton)")
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    return header


def _cmake(*args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    return subprocess.run(["cmake", *args], env=env, capture_output=True, text=True, check=False)


def _configure_args(build: Path, archs: str, dtypes: str, header: Path) -> list[str]:
    return ["-S", str(ROOT), "-B", str(build), f"-DPython3_EXECUTABLE={sys.executable}", f"-DMOON3RT_ARCHS={archs}",
            f"-DMOON3RT_DTYPES={dtypes}", f"-DMOON3RT_CUDA_INCLUDE_DIR={header.parent}"]


@pytest.fixture(scope="module")
def native(tmp_path_factory):
    """(library, manifest) built for this GPU's arch (sm_90 without one), fp32 (+ bf16 on a GPU)."""
    header = _require_build_tools()
    arch = "".join(map(str, torch.cuda.get_device_capability())) if HAS_CUDA else "90"
    dtypes = "fp32;bf16" if HAS_CUDA else "fp32"
    build = tmp_path_factory.mktemp("native-build")
    for args in (_configure_args(build, arch, dtypes, header), ["--build", str(build), "-j", "2"]):
        proc = _cmake(*args)
        assert proc.returncode == 0, f"cmake {' '.join(args)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    library = build / "libmoon3rt_kernels.so"
    manifest = json.loads((build / "gen/manifest.json").read_text())
    return library, manifest


def _bind(lib, spec):
    fn = getattr(lib, spec["name"])
    fn.restype = ctypes.c_int
    fn.argtypes = [ctypes.c_void_p] + [ctypes.c_uint] * 3 + [
        ctypes.c_uint64 if t.startswith("*") else CTYPES[t] for t in spec["parameters"].values()]
    return fn


def test_library_loads_without_a_gpu_and_exports_every_kernel(native):
    library, manifest = native
    lib = ctypes.CDLL(str(library))
    undefined = subprocess.run(["nm", "-D", "--undefined-only", str(library)], capture_output=True, text=True,
                               check=True).stdout
    assert " cu" not in undefined  # no driver symbol is linked: libcuda is opened at the first launch
    lib.moon3rt_kernel_count.restype = ctypes.c_int
    lib.moon3rt_kernel_at.restype = ctypes.POINTER(Kernel)
    lib.moon3rt_find_kernel.restype = ctypes.POINTER(Kernel)
    specs = manifest["kernels"]
    assert lib.moon3rt_kernel_count() == len(specs) == 10 * len(manifest["dtypes"])
    for i, spec in enumerate(specs):
        _bind(lib, spec)  # the launch function exists
        k = lib.moon3rt_kernel_at(i).contents
        assert k.name.decode() == spec["name"] and k.entry.decode() == spec["entry"]
        assert lib.moon3rt_find_kernel(spec["name"].encode()).contents.entry == k.entry
        # one hidden pointer per scratch buffer in the compiled kernel's metadata
        hidden = len(spec["scratch_buffers"])
        assert k.num_params == len(spec["parameters"]) and k.num_hidden == spec["hidden_parameters"] == hidden
        assert k.num_warps == spec["num_warps"] == 8
        images = [k.images[j] for j in range(k.num_images)]
        assert {str(im.arch): im.shared_bytes for im in images if not im.is_ptx} == spec["shared_bytes"]
        assert sorted(im.arch for im in images if not im.is_ptx) == manifest["archs"]
        (ptx,) = [im for im in images if im.is_ptx]
        text = ctypes.string_at(ptx.data, ptx.size).rstrip(b"\0").decode()
        # the embedded PTX's entry takes exactly what the C function passes, scratch pointers last
        want = ["ptr" if t.startswith("*") else t for t in spec["parameters"].values()] + ["ptr"] * hidden
        assert entry_parameters(text, spec["entry"]) == want, spec["name"]
        for im in images:
            if not im.is_ptx:
                assert ctypes.string_at(im.data, 4) == b"\x7fELF"  # a cubin
    assert not lib.moon3rt_kernel_at(len(specs))


def test_configure_refuses_an_arch_without_a_ptx_isa_and_finds_tritons_cuda_h(tmp_path):
    """An arch outside triton_aot.PTX_VERSIONS stops CMake at configure time, before any
    compiling; triton's bundled cuda.h is enough to configure and to compile the runtime."""
    _require_build_tools()
    triton_header = _triton_cuda_header()
    proc = _cmake(*_configure_args(tmp_path / "build", "90;75", "fp32", triton_header))
    assert proc.returncode != 0
    error = " ".join(proc.stderr.split())  # CMake wraps messages
    assert "MOON3RT_ARCHS: compute capability 75 is not supported for ahead-of-time kernels" in error, error
    assert f"cuda.h: {triton_header.parent}" in proc.stdout, proc.stdout[-3000:]
    compile_runtime = [_c_compiler(), "-fsyntax-only", f"-I{triton_header.parent}",
                       str(ROOT / "native/moon3rt_runtime.c")]
    proc = subprocess.run(compile_runtime, capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]


def _tensorrt_headers() -> Path:
    """$TENSORRT_ROOT/include, holding NvInfer.h; skips otherwise (also in CI, which has none)."""
    root = os.environ.get("TENSORRT_ROOT")
    if not root or not (Path(root) / "include/NvInfer.h").exists():
        pytest.skip("TENSORRT_ROOT does not name TensorRT headers ($TENSORRT_ROOT/include/NvInfer.h), which the C++ "
                    "plugin library needs; the PyPI TensorRT packages ship none (docs/TENSORRT.md)")
    return Path(root) / "include"


def test_trt_plugin_library_builds_against_tensorrt_headers(tmp_path):
    """CMake builds libmoon3rt_trt_plugins from TENSORRT_ROOT's headers without a warning; it
    exports only getCreators, links no TensorRT library, and tests/trt_plugin_check.cpp, run
    without TensorRT's runtime, finds its creators, attributes, types and aliasing as specified."""
    include = _tensorrt_headers()
    header = _require_build_tools()
    cxx = next((shutil.which(c) for c in (os.environ.get("CXX"), "c++", "g++", "clang++") if c and shutil.which(c)),
               None)
    if cxx is None:
        pytest.skip("building the C++ plugin library needs a C++17 compiler (apt install g++)")
    build = tmp_path / "build"
    proc = _cmake(*_configure_args(build, "90", "fp32", header), f"-DTENSORRT_ROOT={include.parent}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "building moon3rt_trt_plugins" in proc.stdout and "Warning" not in proc.stderr, proc.stderr[-3000:]
    proc = _cmake("--build", str(build), "--target", "moon3rt_trt_plugins", "-j", "2")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "warning" not in (proc.stdout + proc.stderr).lower(), proc.stdout[-3000:] + proc.stderr[-3000:]
    library = build / "libmoon3rt_trt_plugins.so"
    exported = subprocess.run(["nm", "-D", "--defined-only", str(library)], capture_output=True, text=True,
                              check=True).stdout.split()
    assert [s for s in exported if len(s) > 1 and not s.startswith("0")] == ["getCreators"]
    assert "nvinfer" not in subprocess.run(["ldd", str(library)], capture_output=True, text=True, check=True).stdout
    check = tmp_path / "trt_plugin_check"
    proc = subprocess.run([cxx, "-std=c++17", "-Wall", "-Wextra", "-Werror", "-isystem", str(include), "-isystem",
                           str(header.parent), str(ROOT / "tests/trt_plugin_check.cpp"), "-o", str(check),
                           f"-L{build}", "-lmoon3rt_trt_plugins", f"-Wl,-rpath,{build}"],
                          capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    proc = subprocess.run([str(check), "fp32"], capture_output=True, text=True, check=False)
    assert proc.returncode == 0 and proc.stdout.endswith("ok\n"), proc.stdout + proc.stderr


def test_configure_without_tensorrt_headers_warns(tmp_path):
    """A TENSORRT_ROOT without headers gives CMake's warning and no plugin target."""
    header = _require_build_tools()
    empty = tmp_path / "no-tensorrt"
    empty.mkdir()
    proc = _cmake(*_configure_args(tmp_path / "build", "90", "fp32", header), f"-DTENSORRT_ROOT={empty}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    error = " ".join(proc.stderr.split())
    assert f"TENSORRT_ROOT={empty}: no TensorRT headers" in error and "is not built" in error, error
    assert "moon3rt_trt_plugins" not in (tmp_path / "build/Makefile").read_text()


def test_launch_without_a_driver_returns_an_error(native):
    if HAS_CUDA:
        pytest.skip("a CUDA device is present: the launches are checked by the gpu test")
    library, manifest = native
    lib = ctypes.CDLL(str(library))
    lib.moon3rt_error_string.restype = ctypes.c_char_p
    spec = manifest["kernels"][0]
    launch = _bind(lib, spec)
    args = [0 if t.startswith("*") else 1 for t in spec["parameters"].values()]
    code = launch(None, 1, 1, 1, *args)
    if not lib.moon3rt_driver_available():
        assert code == -1 and b"libcuda.so.1" in lib.moon3rt_error_string(code)
    else:  # a driver without a device: the driver's own error code
        assert code != 0


# ---------------------------------------------------------------------------- on a GPU
def _variant(manifest, kernel, dtype, block):
    suffix = {"fire_prologue": "r", "fire_inject": "r", "fusion_scores": "h", "fusion_pool": "h"}[kernel]
    name = f"moon3rt_{kernel}_{dtype}_{suffix}{block}"
    return next(k for k in manifest["kernels"] if k["name"] == name)


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_native_launches_match_triton(native, dtype):
    import triton
    from moon3rt.kernels.fire import fire_inject_, fire_prologue
    from moon3rt.kernels.fusion_attention import fusion_attention

    library, manifest = native
    lib = ctypes.CDLL(str(library))
    name = {torch.float32: "fp32", torch.bfloat16: "bf16"}[dtype]
    stream = torch.cuda.current_stream().cuda_stream
    g = torch.Generator(device="cuda").manual_seed(0)
    dev = {"device": "cuda", "dtype": dtype}

    # FIRE prologue: N = 300 rows, K = 5120, rank 64
    z = torch.randn(300, 5120, generator=g, device="cuda").to(dtype)
    norm = (1 + 0.1 * torch.randn(5120, generator=g, device="cuda")).to(dtype)
    w = (torch.randn(64, 5120, generator=g, device="cuda") / 70).to(dtype)
    out = torch.empty(300, 64, **dev)
    fn = _bind(lib, _variant(manifest, "fire_prologue", name, 64))
    assert fn(stream, triton.cdiv(300, 64), 1, 1, z.data_ptr(), z.stride(0), norm.data_ptr(), w.data_ptr(),
              w.stride(0), out.data_ptr(), out.stride(0), 300, 5120, 64, 1e-6) == 0
    torch.cuda.synchronize()
    torch.testing.assert_close(out, fire_prologue(z, norm, w, 1e-6))  # same kernel: equal up to rounding

    # FIRE injection into 300 of 1000 rows of d = 1536
    hidden = torch.randn(1000, 1536, generator=g, device="cuda").to(dtype)
    rows = torch.randperm(1000, generator=g, device="cuda")[:300].to(torch.int32)  # the plugin graph's index type
    up = (torch.randn(64, 1536, generator=g, device="cuda") / 8).to(dtype)
    alpha = torch.tensor([0.3], device="cuda")
    want = hidden.clone()
    fire_inject_(want, rows, out, up, alpha)
    scale = torch.tanh(alpha)
    fn = _bind(lib, _variant(manifest, "fire_inject", name, 64))
    assert fn(stream, triton.cdiv(300, 64), triton.cdiv(1536, 64), 1, hidden.data_ptr(), hidden.stride(0),
              rows.data_ptr(), out.data_ptr(), out.stride(0), up.data_ptr(), up.stride(0), scale.data_ptr(),
              300, 64, 1536) == 0
    torch.cuda.synchronize()
    torch.testing.assert_close(hidden, want)

    # MHMF pooling: 5 items, 8 heads, d = 1536, some empty segments
    lens_img, lens_txt = [256, 0, 64, 300, 1], [30, 12, 0, 7, 0]
    cu = lambda lens: torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int32,
                                   device="cuda")
    cu_img, cu_txt = cu(lens_img), cu(lens_txt)
    x_img = torch.randn(sum(lens_img), 1536, generator=g, device="cuda").to(dtype)
    x_txt = torch.randn(sum(lens_txt), 1536, generator=g, device="cuda").to(dtype)
    q = torch.randn(5, 8, 1536, generator=g, device="cuda") / 40
    gate = torch.randn(5, 8, 2, generator=g, device="cuda")
    want = fusion_attention(q, x_img, cu_img, x_txt, cu_txt, gate)
    s_img = torch.empty(8, x_img.shape[0], device="cuda")
    s_txt = torch.empty(8, x_txt.shape[0], device="cuda")
    row_max, row_sum = torch.empty(5, 2, 8, device="cuda"), torch.empty(5, 2, 8, device="cuda")
    mix = torch.empty(5, 8, 1536, **dev)
    sizes = (8, 1536, x_img.shape[0], x_txt.shape[0])
    common = (x_img.data_ptr(), x_img.stride(0), cu_img.data_ptr(), s_img.data_ptr(), x_txt.data_ptr(),
              x_txt.stride(0), cu_txt.data_ptr(), s_txt.data_ptr(), row_max.data_ptr(), row_sum.data_ptr())
    fn = _bind(lib, _variant(manifest, "fusion_scores", name, 16))
    assert fn(stream, 5, 2, 1, q.data_ptr(), q.stride(0), q.stride(1), *common, *sizes) == 0
    fn = _bind(lib, _variant(manifest, "fusion_pool", name, 16))
    assert fn(stream, triton.cdiv(1536, 64), 5, 1, *common, gate.data_ptr(), gate.stride(0), gate.stride(1),
              mix.data_ptr(), mix.stride(0), mix.stride(1), *sizes) == 0
    torch.cuda.synchronize()
    torch.testing.assert_close(mix, want)
