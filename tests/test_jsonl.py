"""The one JSON-lines reader behind encode, eval and the training data."""

import gzip
import json

import pytest

from moon3rt.jsonl import decode_line, json_lines, numbered_lines


def records_with_separators() -> bytes:
    titles = ["a\u2028b", "c\u0085d", "e\u2029f"]  # json.dumps(ensure_ascii=False) leaves these raw
    lines = [json.dumps({"id": i, "text": t}, ensure_ascii=False) for i, t in enumerate(titles)]
    return b"\xef\xbb\xbf" + lines[0].encode() + b"\r\n\n" + b"\n".join(x.encode() for x in lines[1:]) + b"\n  \n"


@pytest.mark.parametrize("gz", [False, True])
def test_records_end_at_newline_only(tmp_path, gz):
    data = records_with_separators()
    path = tmp_path / ("items.jsonl.gz" if gz else "items.jsonl")
    path.write_bytes(gzip.compress(data) if gz else data)
    got = [(n, decode_line(raw)) for n, raw in json_lines(path)]
    assert [n for n, _ in got] == [1, 3, 4]  # the BOM is dropped, blank lines are skipped, numbers kept
    assert [obj["text"] for _, obj in got] == ["a\u2028b", "c\u0085d", "e\u2029f"]
    assert [n for n, _ in numbered_lines(data.split(b"\n"))] == [1, 3, 4]  # bytes in memory (Ray) alike


def test_bad_lines_say_why():
    with pytest.raises(ValueError, match=r"not valid UTF-8 \(byte 0xff at column 2\)"):
        decode_line(b'"\xff"')
    with pytest.raises(ValueError, match="not valid JSON"):
        decode_line(b"{nope")


def test_eval_reads_a_title_holding_a_line_separator(tmp_path):
    from moon3rt.eval import _lines

    path = tmp_path / "products.jsonl"
    path.write_bytes(records_with_separators() + b"{bad\n")
    problems: list[str] = []
    assert [obj["id"] for _, obj in _lines(path, problems)] == [0, 1, 2]
    assert problems == [f"{path}:6: not valid JSON: Expecting property name enclosed in double quotes (column 2)"]
