"""Every Python block of the README runs as written, and prints what its comments say.

A block is run on its own (a fresh namespace, from the repository root), as a reader
would paste it. A line ``print(x)  # text`` states what it prints: the printed text must
equal ``text``, so shapes and outputs in the README stay true when the code or the
default model changes.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parent.parent / "README.md"
BLOCK = re.compile(r"^```python\n(.*?)^```", re.DOTALL | re.MULTILINE)
STATED = re.compile(r"^\s*print\(.*\)\s*#\s*(.*?)\s*$")


def python_blocks() -> list[str]:
    return BLOCK.findall(README.read_text(encoding="utf-8"))


def test_the_readme_has_python_blocks():
    assert len(python_blocks()) >= 2


@pytest.mark.parametrize("number", range(len(python_blocks())))
def test_readme_python_block_runs_as_written(number, monkeypatch):
    code = python_blocks()[number]
    printed: list[str] = []

    def record(*args, sep=" ", end="\n", file=None, flush=False):
        printed.append(sep.join(str(a) for a in args))

    monkeypatch.chdir(README.parent)
    exec(compile(code, f"README.md python block {number + 1}", "exec"), {"__name__": "__readme__", "print": record})
    stated = [m.group(1) for line in code.splitlines() if (m := STATED.match(line))]
    assert printed[: len(stated)] == stated, f"block {number + 1} printed {printed}, the README says {stated}"
