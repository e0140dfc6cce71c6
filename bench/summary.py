"""What a person reads after a benchmark: the stdout report, and the product's goals marked met / missed."""

from __future__ import annotations

import reporting
from runners import PEERS

# The product's goals (H100/H200, bf16, moon3-2b, batch 64), marked met / missed in every result file.
GOAL_BATCH, GOAL_ITEMS_PER_S, GOAL_VS_TRANSFORMERS, GOAL_VS_COMPILE, GOAL_SINGLE_P50_MS = 64, 240, 2.0, 1.2, 10.0
GOAL_CARDS, GOAL_DTYPE, GOAL_MODEL = ("H100", "H200"), "bfloat16", "moon3-2b"
GOAL_PCT_BANDWIDTH, GOAL_VS_SDPA = 80.0, 1.15  # kernels: memory-bound >= 80% of copy bandwidth; attention <= 1.15x SDPA


def goal_setting_applies(device_name: str, dtype: str, model: str) -> bool:
    """Whether a run is in the goals' setting: an H100/H200, bf16, moon3-2b."""
    return any(card in (device_name or "") for card in GOAL_CARDS) and dtype == GOAL_DTYPE and model == GOAL_MODEL


def goal(name: str, measured, wanted: float, higher: bool, applies: bool, **extra) -> dict:
    """One goal: "met" / "missed" when measured, "not measured" otherwise; `applies` says whether the
    run is the goals' setting (otherwise the status is informational)."""
    met = None if measured is None else (measured >= wanted if higher else measured < wanted)
    status = "not measured" if met is None else ("met" if met else "missed")
    return {"goal": name, "target": (">= " if higher else "< ") + f"{wanted:g}",
            "measured": measured, "met": met, "status": status, "applies": applies, **extra}


def verdict(rows: list[dict], applies: bool) -> dict:
    """Counts of met / missed / not measured goals and one sentence a person can read."""
    counts = {status: sum(1 for r in rows if r["status"] == status) for status in ("met", "missed", "not measured")}
    where = "in the goals' setting" if applies else "outside the goals' setting (informational only)"
    text = (f"{counts['met']} of {len(rows)} goals met, {counts['missed']} missed, {counts['not measured']} not "
            f"measured, {where}")
    return {"applies": applies, **counts, "total": len(rows), "text": text}


def goals(report: dict) -> list[dict]:
    """The throughput goals (H100/H200, bf16, moon3-2b, batch 64) beside what this run measured."""
    env, cfg = report.get("environment", {}), report.get("config", {})
    applies = goal_setting_applies(env.get("device_name", ""), cfg.get("dtype", ""), cfg.get("model", ""))
    rows = {(r["backend"], r["batch_size"]): r["items_per_s"] for r in report["results"]}
    ours = [r for r in report["results"] if r["backend"] not in PEERS and r["batch_size"] == GOAL_BATCH]
    target = "triton" if any(r["backend"] == "triton" for r in ours) else (
        max(ours, key=lambda r: r["items_per_s"])["backend"] if ours else None)
    if target is None:
        target = "triton" if "triton" in report["single_item"] else next(
            (b for b in report["single_item"] if b not in PEERS), None)
    value = rows.get((target, GOAL_BATCH))

    def ratio(peer):
        base = rows.get((peer, GOAL_BATCH))
        return value / base if value is not None and base else None

    single = report["single_item"].get(target, {}).get("p50_ms") if target else None
    return [goal(name, measured, wanted, higher, applies, backend=target) for name, measured, wanted, higher in (
        (f"items/s at batch {GOAL_BATCH}", value, GOAL_ITEMS_PER_S, True),
        (f"x transformers at batch {GOAL_BATCH}", ratio("transformers"), GOAL_VS_TRANSFORMERS, True),
        (f"x torch.compile at batch {GOAL_BATCH}", ratio("torch.compile"), GOAL_VS_COMPILE, True),
        ("single-item p50 ms", single, GOAL_SINGLE_P50_MS, False),
    )]


def kernel_goals(record: dict) -> list[dict]:
    """The kernel goals beside a bench_kernels run: every memory-bound op at >= 80% of the measured copy
    bandwidth, vision attention within 15% of SDPA's flash kernel on the same segments."""
    applies = goal_setting_applies(record.get("device", ""), record.get("dtype", ""), record.get("model", ""))
    out = []
    for row in record["results"]:
        if row.get("flops") == 0 and "error" not in row:
            out.append(goal(f"{row['op']}: % of copy bandwidth", row.get("pct_limit"), GOAL_PCT_BANDWIDTH, True,
                            applies, op=row["op"]))
        if row["op"] == "varlen_attention vision":
            sdpa = row.get("sdpa_padded_ms")
            ratio = row["triton_ms"] / sdpa if sdpa and "triton_ms" in row else None
            out.append(goal("varlen_attention vision: time / SDPA flash", ratio, GOAL_VS_SDPA, False, applies,
                            op=row["op"]))
    return out


def print_report(report: dict) -> None:
    env, cfg, wl, fl = report["environment"], report["config"], report["workload"], report["flops"]
    print(f"moon3rt throughput  {report['timestamp']}  commit {env['git_commit']}")
    print(f"device {env['device_name']} ({env['device']}), driver {env['driver'] or '-'}, CUDA {env['cuda'] or '-'}, "
          f"torch {env['torch']}, triton {env['triton'] or '-'}, transformers {env['transformers'] or '-'}, "
          f"{env['torch_threads']} torch threads / {env['cpu_count']} CPUs, load average {env['load_average']}")
    print(f"model {cfg['model']} {cfg['dtype']}; item = {cfg['image_size']}x{cfg['image_size']} image "
          f"({wl['patches_per_item']:.0f} patches, {wl['merged_image_tokens_per_item']:.0f} merged tokens) + "
          f"{wl['title_tokens_per_item']:.1f} title tokens = {wl['decoder_tokens_per_item']:.1f} decoder tokens; "
          f"{fl['per_item'] / 1e9:.3f} GFLOP/item")
    for note in report["notes"]:
        print(f"note: {note}")
    c = report["ceiling"]
    print(f"roofline: {c['dtype']} matmul {c['shape'][0]}^3 measured at {c['tflops']:.3f} TFLOP/s")
    ref = fl["reference_2b"]
    print(f"FLOP count check, moon3-2b reference item (1024 patches, {ref['decoder_tokens']} decoder tokens): "
          f"{ref['tflop']:.3f} TFLOP, {100 * ref['vision_share']:.1f}% vision tower + merger "
          f"(DESIGN.md: ~{ref['design_md_tflop']} TFLOP, 65%; difference {100 * ref['relative_difference']:+.1f}%)")
    print()
    for chk in report["checks"]:
        print(f"check {chk['backend']:<14} min cosine {chk['min_cosine']:.6f} vs {chk['against']} "
              f"(> {chk['threshold']}): {'ok' if chk['passed'] else 'FAILED, not timed'}")
    for s in report["skipped"]:
        print(f"skipped {s['backend']}{' batch ' + str(s['batch_size']) if 'batch_size' in s else ''}: {s['reason']}")
    print()
    print("model part (preprocessed, packed batches; host-to-device copy included):")
    print(reporting.results_table(report["results"]))
    mem = {r["memory_kind"] for r in report["results"]}
    print(f"(peak memory: {', '.join(sorted(mem))}; +MiB = peak minus memory in use when the measurement "
          "started; transformers computes the backbone only: no FIRE, MHMF or projection)")
    print()
    rows = [[name + ("*" if v.get("source") else ""), f"{v['p50_ms']:.2f}", f"{v['p99_ms']:.2f}", str(v["calls"])]
            for name, v in report["single_item"].items()]
    print(reporting.table(["single item", "p50 ms", "p99 ms", "calls"], rows))
    print()
    rows = [[r["backend"], str(r["batch_size"]), str(r["items"]), f"{r['items_per_s']:.1f}", str(r["num_workers"])]
            for r in report["end_to_end"]]
    print(reporting.table(["encode() end to end", "batch", "items", "items/s", "workers"], rows))
    print()
    if report.get("reasoning"):
        rows = [[r["backend"], str(r["batch_size"]), str(r["reasoning_tokens"]), f"{r['items_per_s']:.1f}",
                 f"{r['generated_tokens_per_s']:.0f}", str(r["decode_steps"]), f"{r['decode_gb_per_s']:.1f}",
                 f"{r['decode_pct_bandwidth']:.1f}" if "decode_pct_bandwidth" in r else "-"]
                for r in report["reasoning"]]
        print(reporting.table(["reasoning mode", "batch", "budget", "items/s", "gen tok/s", "steps",
                               "decode GB/s", "% bandwidth"], rows))
        print(f"(bandwidth measured by a device copy: {report.get('bandwidth_gbs', 0):.0f} GB/s; decode traffic = "
              "decoder weights + LM head + cached K/V read once per step)")
        print()
    rows = [[fmt.upper(), f"{v['image_size']}x{v['image_size']}", f"{v['mean_file_bytes'] / 1024:.1f}",
             f"{v['images_per_s_per_core']:.1f}"] for fmt, v in report["preprocess"].items()]
    print(reporting.table(["preprocess (decode+resize+patchify+tokenise)", "size", "KiB", "images/s/core"], rows))
    print()
    applies = goal_setting_applies(env["device_name"], cfg["dtype"], cfg["model"])
    setting = "" if applies else "; this run is not that setting: informational"
    print(f"goals (H100/H200 bf16 {GOAL_MODEL} batch {GOAL_BATCH}{setting}):")
    rows = [[g["goal"], g["target"], g["backend"] or "-", "-" if g["measured"] is None else f"{g['measured']:.2f}",
             g["status"]] for g in report["goals"]]
    print(reporting.table(["goal", "target", "backend", "measured", "status"], rows))
    if report.get("goals_verdict"):
        print(report["goals_verdict"]["text"])
    print()
    for kind, path in report["files"].items():
        if kind != "png_tool":
            print(f"{kind}: {path}")
