"""Generate the C sources of libmoon3rt_kernels: moon3rt's fused MOON3 kernels compiled
ahead of time by Triton, embedded as byte arrays, with one C launch function each.

    python native/gen_kernels.py --out build/gen --arch 80 --arch 90 --dtype fp32 --dtype bf16

CMake runs this (CMakeLists.txt); it needs torch and triton, and no GPU. CMake first runs
it with ``--check`` at configure time, which only validates the archs (each needs an entry
in triton_aot.PTX_VERSIONS, its minimum PTX ISA) and exits. It writes

- ``moon3rt_kernels.h``: one function per kernel variant, e.g.
  ``int moon3rt_fire_prologue_bf16_r16(moon3rt_stream, unsigned grid_x, unsigned grid_y,
  unsigned grid_z, moon3rt_devptr z_ptr, int32_t stride_zn, ...)``, plus a table of all
  variants (`moon3rt_kernel_count`, `moon3rt_kernel_at`, `moon3rt_find_kernel`);
- ``moon3rt_kernels.c``: a cubin per arch and the lowest arch's PTX per variant, and the
  launch functions (they call `moon3rt_launch` in native/moon3rt_runtime.c);
- ``manifest.json``: every variant's parameters, constexprs, warps and shared memory.

A variant is a kernel with its constexprs fixed: the dtype of its activations, a block
size (FIRE: BLOCK_R, chosen as the kernel's launcher does from the rank; MHMF: H_PAD, the
head count padded, which must be >= the model's heads), and unit strides along the last
dim of every tensor (contiguous rows; row strides stay parameters). The grid is the
caller's, computed as in the kernels' Python launchers (kernels/fire.py,
kernels/fusion_attention.py). Every launch function passes the parameters of the PTX
entry in order; the generator checks that list against the Triton signature.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

os.environ.pop("TRITON_INTERPRET", None)  # compile real kernels even when a test set it
os.environ.setdefault("TRITON_DISABLE_LINE_INFO", "1")  # a third of the cubin's bytes; set it to 0 to keep them

DTYPES = ("fp32", "bf16", "fp16")
ARCHS = (80, 89, 90)
C_TYPES = {"ptr": "moon3rt_devptr", "i32": "int32_t", "i64": "int64_t", "fp32": "float"}


def _precision(dtype: str) -> str:
    return "ieee" if dtype == "fp32" else "tf32"


def variants(dtypes) -> list[dict]:
    """Every (kernel, constexprs) to compile: name, kernel function, signature, constexprs."""
    from moon3rt.kernels.fire import _fire_inject_kernel, _fire_prologue_kernel
    from moon3rt.kernels.fusion_attention import _fusion_pool_kernel, _fusion_scores_kernel

    out = []
    for dt in dtypes:
        x, dot = f"*{dt}", _precision(dt)
        for block_r in (16, 32, 64):
            out.append({
                "name": f"moon3rt_fire_prologue_{dt}_r{block_r}", "fn": _fire_prologue_kernel,
                "signature": {"z_ptr": x, "stride_zn": "i32", "norm_ptr": x, "w_ptr": x, "stride_wr": "i32",
                              "out_ptr": x, "stride_on": "i32", "N": "i32", "K": "i32", "RANK": "i32",
                              "eps": "fp32"},
                "constexprs": {"stride_zk": 1, "stride_norm": 1, "stride_wk": 1, "stride_or": 1, "BLOCK_M": 64,
                               "BLOCK_R": block_r, "BLOCK_K": 32, "DOT_PRECISION": dot},
            })
            out.append({
                "name": f"moon3rt_fire_inject_{dt}_r{block_r}", "fn": _fire_inject_kernel,
                "signature": {"hidden_ptr": x, "stride_ht": "i32", "rows_ptr": "*i32", "r_ptr": x,
                              "stride_rn": "i32", "up_ptr": x, "stride_uk": "i32", "scale_ptr": "*fp32",
                              "N": "i32", "RANK": "i32", "DIM": "i32"},
                "constexprs": {"stride_hd": 1, "stride_rk": 1, "stride_ud": 1, "BLOCK_M": 64, "BLOCK_R": block_r,
                               "BLOCK_D": 64, "DOT_PRECISION": dot},
            })
        for h_pad in (16, 32):
            common = {"x_img_ptr": x, "stride_img_n": "i32", "cu_img_ptr": "*i32", "s_img_ptr": "*fp32",
                      "x_txt_ptr": x, "stride_txt_n": "i32", "cu_txt_ptr": "*i32", "s_txt_ptr": "*fp32",
                      "max_ptr": "*fp32", "sum_ptr": "*fp32"}
            sizes = {"H": "i32", "D": "i32", "N_img": "i32", "N_txt": "i32"}
            units = {"stride_img_d": 1, "stride_txt_d": 1}
            out.append({
                "name": f"moon3rt_fusion_scores_{dt}_h{h_pad}", "fn": _fusion_scores_kernel,
                "signature": {"q_ptr": "*fp32", "stride_qb": "i32", "stride_qh": "i32", **common, **sizes},
                "constexprs": {"stride_qd": 1, **units, "H_PAD": h_pad, "BLOCK_N": 64, "BLOCK_D": 32,
                               "DOT_PRECISION": dot},
            })
            out.append({
                "name": f"moon3rt_fusion_pool_{dt}_h{h_pad}", "fn": _fusion_pool_kernel,
                "signature": {**common, "gate_ptr": "*fp32", "stride_gb": "i32", "stride_gh": "i32",
                              "out_ptr": x, "stride_ob": "i32", "stride_oh": "i32", **sizes},
                "constexprs": {**units, "stride_gm": 1, "H_PAD": h_pad, "BLOCK_N": 64, "BLOCK_D": 64,
                               "DOT_PRECISION": dot},
            })
    for v in out:  # runtime parameters in the kernel's own order
        v["signature"] = {a: v["signature"][a] for a in v["fn"].arg_names if a in v["signature"]}
    return out


def _bytes(data: bytes) -> str:
    rows = [", ".join(f"0x{b:02x}" for b in data[i:i + 16]) for i in range(0, len(data), 16)]
    return "    " + ",\n    ".join(rows)


def generate(out_dir: Path, archs, dtypes) -> dict:
    from moon3rt.export.triton_aot import compile_kernel, entry_parameters, signature_types

    out_dir.mkdir(parents=True, exist_ok=True)
    header, source, manifest = [], [], {"archs": list(archs), "dtypes": list(dtypes), "kernels": []}
    for v in variants(dtypes):
        name, sig = v["name"], v["signature"]
        images, compiled = [], []
        for arch in archs:
            k = compile_kernel(v["fn"], sig, v["constexprs"], 8, arch)
            expected = signature_types(sig) + ["ptr"] * k.hidden
            if list(k.params) != expected:
                raise AssertionError(f"{name} sm_{arch}: PTX takes {list(k.params)}, the launcher passes {expected}")
            compiled.append(k)
        first = compiled[0]
        if any((k.num_warps, k.hidden) != (first.num_warps, first.hidden) for k in compiled):
            # one launch function per variant: warps and parameters must agree across archs (shared
            # memory may not: it is recorded per image)
            raise AssertionError(f"{name}: launch settings differ between archs "
                                 f"{[(k.arch, k.num_warps, k.hidden) for k in compiled]}")
        for k in compiled:
            source.append(f"static const unsigned char {name}_sm{k.arch}[] = {{\n{_bytes(k.cubin)}\n}};")
            images.append((k.arch, 0, k.shared, f"{name}_sm{k.arch}"))
        lowest = min(compiled, key=lambda k: k.arch)
        ptx = lowest.ptx.encode() + b"\0"  # cuModuleLoadData reads PTX as a C string
        source.append(f"static const unsigned char {name}_ptx[] = {{\n{_bytes(ptx)}\n}};")
        images.append((lowest.arch, 1, lowest.shared, f"{name}_ptx"))
        table = ",\n    ".join(f"{{{arch}, {is_ptx}, {shared}, {sym}, sizeof({sym})}}"
                               for arch, is_ptx, shared, sym in images)
        source.append(f"static const moon3rt_image {name}_images[] = {{\n    {table}\n}};")
        described = ", ".join(f"{t} {a}" for a, t in sig.items())
        source.append(
            f"static const moon3rt_kernel {name}_kernel = {{\"{name}\", \"{first.name}\", \"{described}\", "
            f"{len(sig)}, {first.hidden}, {first.num_warps}, {len(images)}, {name}_images}};"
        )
        params = ", ".join(f"{C_TYPES[t]} {a}" for a, t in zip(sig, signature_types(sig)))
        proto = (f"int {name}(moon3rt_stream stream, unsigned grid_x, unsigned grid_y, unsigned grid_z, "
                 f"{params})")
        header.append(f"/* {described} */\n{proto};")
        refs = ", ".join(f"&{a}" for a in sig)
        source.append(f"{proto} {{\n    void *params[] = {{{refs}}};\n"
                      f"    return moon3rt_launch(&{name}_kernel, stream, grid_x, grid_y, grid_z, params);\n}}")
        manifest["kernels"].append({
            "name": name, "entry": first.name, "kernel": v["fn"].__name__, "parameters": sig,
            "constexprs": v["constexprs"], "hidden_parameters": first.hidden,
            "scratch_buffers": list(first.scratch), "num_warps": first.num_warps,
            "shared_bytes": {k.arch: k.shared for k in compiled}, "archs": [k.arch for k in compiled],
            "ptx_arch": lowest.arch, "ptx_version": lowest.ptx_version,
            "ptx_parameters": entry_parameters(lowest.ptx, lowest.name),
        })
    names = [k["name"] for k in manifest["kernels"]]
    table = ",\n    ".join(f"&{n}_kernel" for n in names)
    source.append(f"static const moon3rt_kernel *all_kernels[] = {{\n    {table}\n}};")
    source.append(f"int moon3rt_kernel_count(void) {{ return {len(names)}; }}")
    source.append("const moon3rt_kernel *moon3rt_kernel_at(int i) {\n"
                  f"    return i >= 0 && i < {len(names)} ? all_kernels[i] : NULL;\n}}")
    source.append("const moon3rt_kernel *moon3rt_find_kernel(const char *name) {\n"
                  f"    for (int i = 0; i < {len(names)}; ++i)\n"
                  "        if (strcmp(all_kernels[i]->name, name) == 0) return all_kernels[i];\n"
                  "    return NULL;\n}")
    banner = "/* Generated by native/gen_kernels.py: do not edit. */"
    (out_dir / "moon3rt_kernels.h").write_text(
        f"{banner}\n#ifndef MOON3RT_KERNELS_H\n#define MOON3RT_KERNELS_H\n\n#include \"moon3rt_runtime.h\"\n\n"
        "#ifdef __cplusplus\nextern \"C\" {\n#endif\n\n"
        "int moon3rt_kernel_count(void);\nconst moon3rt_kernel *moon3rt_kernel_at(int i);\n"
        "const moon3rt_kernel *moon3rt_find_kernel(const char *name);\n\n"
        + "\n\n".join(header) + "\n\n#ifdef __cplusplus\n}\n#endif\n#endif\n"
    )
    (out_dir / "moon3rt_kernels.c").write_text(
        f"{banner}\n#include \"moon3rt_kernels.h\"\n\n#include <string.h>\n\n" + "\n\n".join(source) + "\n"
    )
    (out_dir / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="directory for the generated sources")
    parser.add_argument("--arch", type=int, action="append", help=f"compute capability x10 (default {ARCHS})")
    parser.add_argument("--dtype", choices=DTYPES, action="append", help=f"activation dtypes (default {DTYPES})")
    parser.add_argument("--check", action="store_true", help="only check the archs (CMake's configure step)")
    args = parser.parse_args(argv)
    from moon3rt.export.triton_aot import ptx_version

    archs = sorted(set(args.arch or ARCHS))
    try:
        for arch in archs:
            ptx_version(arch)
    except ValueError as err:
        print(f"MOON3RT_ARCHS: {err}", file=sys.stderr)
        return 2
    if args.check:
        return 0
    manifest = generate(Path(args.out), archs, args.dtype or list(DTYPES))
    print(f"generated {len(manifest['kernels'])} kernel variants for sm_{manifest['archs']} in {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
