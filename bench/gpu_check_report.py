"""What a bench/gpu_check.sh run did, as JSON: its stages and every test outcome it logged.

    python bench/gpu_check_report.py OUT_DIR     # reads OUT_DIR/raw, writes OUT_DIR/gpu_check.json

gpu_check.sh calls this after every stage, so a run cut short still leaves the record of
what ran. Test outcomes are read from pytest's ``-v`` lines (``path::test[id] PASSED``), which
pytest prints as each test ends: a stage killed by its timeout still names the tests it
finished, and the one it was running (`unfinished`). Standard library only.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

OUTCOME = re.compile(r"^(\S+::\S+)\s+(PASSED|FAILED|ERROR|SKIPPED|XFAIL|XPASS)\b")
COLLECTED = re.compile(r"^(\S+\.py::\S+)$")  # --collect-only -qq (a dry run): the node ids alone


def stages(raw: Path) -> list[dict]:
    """The rows gpu_check.sh appended to raw/stages.tsv: name, rc, seconds, limit, note."""
    path = raw / "stages.tsv"
    rows = []
    if path.exists():
        for line in path.read_text().splitlines():
            name, rc, seconds, limit, note = (line.split("\t") + [""] * 5)[:5]
            rows.append({"stage": name, "rc": None if rc in ("", "-") else int(rc),
                         "seconds": None if seconds in ("", "-") else int(seconds),
                         "limit_s": None if limit in ("", "-") else int(limit), "note": note,
                         "timed_out": rc in ("124", "137")})
    return rows


def tests(log: Path) -> tuple[list[dict], str | None]:
    """Outcomes in a pytest -v log, in the order they finished, and the test still running when the
    log ends (a stage killed by its timeout), if any. A --collect-only log gives "collected" rows."""
    lines = [line.strip() for line in log.read_text(errors="replace").splitlines() if line.strip()]
    out = [{"test": m.group(1), "outcome": m.group(2).lower()} for m in map(OUTCOME.match, lines) if m]
    if not out:
        return [{"test": line, "outcome": "collected"} for line in lines if COLLECTED.match(line)], None
    last = lines[-1] if lines else ""
    return out, last if COLLECTED.match(last) else None


def report(out_dir: Path) -> dict:
    raw = out_dir / "raw"
    meta_path = raw / "meta.json"
    record = json.loads(meta_path.read_text()) if meta_path.exists() else {}
    record["stages"] = stages(raw)
    record["tests"] = {}
    for row in record["stages"]:
        log = raw / f"{row['stage']}.log"
        if row["stage"].startswith(("gpu-tests", "tests-")) and log.exists():
            found, unfinished = tests(log)
            counts = {}
            for t in found:
                counts[t["outcome"]] = counts.get(t["outcome"], 0) + 1
            record["tests"][row["stage"]] = {"counts": counts, "unfinished": unfinished, "results": found}
    names = {p.name for p in out_dir.iterdir() if p.is_file() and not p.name.endswith(".tmp")}
    record["files"] = sorted(names | {"gpu_check.json"})  # the files that come back, this one included
    return record


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print(__doc__.strip().splitlines()[2].strip(), file=sys.stderr)
        return 2
    out_dir = Path(args[0])
    record = report(out_dir)
    tmp = out_dir / "gpu_check.json.tmp"
    tmp.write_text(json.dumps(record, indent=2) + "\n")
    tmp.replace(out_dir / "gpu_check.json")  # never a half-written file
    return 0


if __name__ == "__main__":
    sys.exit(main())
