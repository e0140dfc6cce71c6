"""python -m moon3rt {demo,encode,info}."""

import json
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from moon3rt.cli import main


def write_items(tmp_path):
    Image.new("RGB", (64, 48), (200, 30, 30)).save(tmp_path / "red.jpg")
    lines = [
        json.dumps({"id": "a", "text": "Red tee", "image": "red.jpg"}),
        json.dumps("leather shoes"),
        "{not json",
        json.dumps({"id": "d", "text": "missing", "image": "nope.jpg"}),
        json.dumps({"id": "e", "images": ["red.jpg", "red.jpg"]}),
    ]
    path = tmp_path / "items.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


def test_encode_npy_keeps_rows_aligned_and_reports_failures(tmp_path, capsys):
    out = tmp_path / "vectors.npy"
    assert main(["encode", "--input", str(write_items(tmp_path)), "--output", str(out), "--no-progress"]) == 0
    vectors = np.load(out)
    assert vectors.shape == (5, 48) and vectors.dtype == np.float32
    ok = ~np.isnan(vectors).any(axis=1)
    assert ok.tolist() == [True, True, False, False, True]
    assert np.allclose(np.linalg.norm(vectors[ok], axis=1), 1, atol=1e-5)
    captured = capsys.readouterr()
    assert f"failed: {tmp_path / 'items.jsonl'} line 3 (id 2): not valid JSON" in captured.err
    assert f"failed: {tmp_path / 'items.jsonl'} line 4 (id d): image: file not found" in captured.err
    assert "encoded 3/5 items (2 failures)" in captured.out and "items/s" in captured.out
    summary = json.loads((tmp_path / "vectors.summary.json").read_text())
    assert summary["items"] == 5 and summary["failures"] == 2 and summary["output_rows"] == 5


def test_encode_parquet_has_ids_embeddings_and_errors(tmp_path):
    pq = pytest.importorskip("pyarrow.parquet", reason="the parquet extra (CI installs it: tests/test_environment.py)")
    out = tmp_path / "vectors.parquet"
    assert main(["encode", "--input", str(write_items(tmp_path)), "--output", str(out), "--no-progress",
                 "--dim", "16"]) == 0
    table = pq.read_table(out).to_pydict()
    assert table["id"] == ["a", "1", "2", "d", "e"]
    assert len(table["embedding"][0]) == 16 and table["embedding"][2] is None
    assert table["error"][0] is None and "not found" in table["error"][3]


def test_encode_strict_stops_with_the_bad_items(tmp_path, capsys):
    code = main(["encode", "--input", str(write_items(tmp_path)), "--output", str(tmp_path / "v.npy"),
                 "--strict", "--no-progress"])
    assert code == 2
    err = capsys.readouterr().err
    assert "2 row(s) cannot be embedded" in err and "line 3 (id 2)" in err and "line 4 (id d)" in err
    assert not list(tmp_path.glob("*.npy")) and not list(tmp_path.glob(".*tmp"))


def test_info_prints_its_summary_first_and_json_only_when_asked(capsys):
    assert main(["info", "--model", "moon3-tiny"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("model:       moon3-tiny") and "{" not in out
    for line in ("flavour:     moon3", "FIRE", "(layers [0, 2], rank 8)", "MHMF fusion", "output dim:  48"):
        assert line in out, line
    assert main(["info", "--model", "moon3-tiny", "--json"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("model:") and json.loads(out[out.index("\n{") + 1:])["vision_config"]


def test_help_has_no_markup(capsys):
    for argv in ([], ["encode"], ["info"]):
        with pytest.raises(SystemExit):
            main([*argv, "--help"])
        out = capsys.readouterr().out
        assert "``" not in out and ":func:" not in out and "usage:" in out


def test_bad_model_and_output_give_one_line_errors(tmp_path, capsys):
    assert main(["info", "--model", "no-such-model"]) == 2
    assert "neither a preset" in capsys.readouterr().err
    items = write_items(tmp_path)
    assert main(["encode", "--input", str(items), "--output", str(tmp_path / "v.csv")]) == 2
    assert "must end in .npy or .parquet" in capsys.readouterr().err


def test_demo_prints_a_similarity_table():
    result = subprocess.run([sys.executable, "-m", "moon3rt", "demo"], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "RANDOM weights" in out
    assert "sku-001" in out and "best match for 'red cotton t-shirt'" in out
    assert "embedded 12 items" in out


def test_info_describes_a_large_preset_from_its_shapes(capsys):
    """moon3-2b's 2.2 B random weights are never drawn just to describe the preset."""
    assert main(["info", "--model", "moon3-2b"]) == 0
    out = capsys.readouterr().out
    assert "parameters:  2213.28 M total" in out and "(layers [0, 7, 14, 21], rank 64)" in out


def test_jsonl_splits_on_newline_only(tmp_path):
    """U+2028, U+2029 and U+0085 inside a record stay in it; \\r\\n ends a line like \\n."""
    texts = ["red\u2028tee", "navy\u0085jacket", "olive\u2029mug", "plain shoes"]
    body = "\r\n".join(json.dumps({"id": i, "text": t}, ensure_ascii=False) for i, t in enumerate(texts[:3]))
    body += "\r\n\r\n" + json.dumps(texts[3], ensure_ascii=False) + "\n"  # a blank line, then a bare string
    path = tmp_path / "items.jsonl"
    path.write_bytes(body.encode("utf-8"))
    assert "\u2028" in path.read_text(encoding="utf-8")  # written unescaped, as ensure_ascii=False does
    out = tmp_path / "v.npy"
    assert main(["encode", "--input", str(path), "--output", str(out), "--no-progress"]) == 0
    vectors = np.load(out)
    import moon3rt

    expected = moon3rt.load("moon3-tiny", device="cpu").encode(texts)
    assert vectors.shape == (4, 48)
    np.testing.assert_allclose(vectors, expected, atol=1e-5)  # row k is the k-th non-blank line


def test_bom_and_undecodable_lines_are_reported_by_line_and_skipped_past(tmp_path, capsys):
    path = tmp_path / "items.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + json.dumps({"id": "first", "text": "red tee"}).encode() + b"\n\n"
                     + b'{"id": "latin1", "text": "caf\xe9"}\n' + json.dumps("navy jacket").encode() + b"\n")
    out = tmp_path / "v.npy"
    assert main(["encode", "--input", str(path), "--output", str(out), "--no-progress"]) == 0
    vectors = np.load(out)
    assert (~np.isnan(vectors).any(axis=1)).tolist() == [True, False, True]
    err = capsys.readouterr().err
    assert f"{path} line 3 (id 1): not valid UTF-8 (byte 0xe9" in err


def test_output_is_checked_before_the_model_loads(tmp_path, capsys, monkeypatch):
    import moon3rt

    def no_load(*args, **kwargs):
        raise AssertionError("the model was loaded before the output was checked")

    monkeypatch.setattr(moon3rt, "load", no_load)
    (tmp_path / "afile").write_text("x")
    items = write_items(tmp_path)
    for out in (tmp_path / "afile" / "v.npy", tmp_path / "afile" / "shards"):
        assert main(["encode", "--input", str(items), "--output", str(out), "--no-progress"]) == 2
        assert "a parent is a file" in capsys.readouterr().err
    # a place nobody may create files in, root included
    assert main(["encode", "--input", str(items), "--output", "/proc/moon3rt-vectors.npy", "--no-progress"]) == 2
    assert "cannot write there" in capsys.readouterr().err


def test_ctrl_c_prints_one_line_exits_130_and_leaves_no_output(tmp_path, capsys, monkeypatch):
    import moon3rt

    def interrupted(self, items, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(moon3rt.Encoder, "encode_with_report", interrupted)
    items = write_items(tmp_path)
    for out in ("v.npy", "v.parquet"):
        assert main(["encode", "--input", str(items), "--output", str(tmp_path / out), "--no-progress"]) == 130
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith("interrupted")
        assert sorted(p.name for p in tmp_path.iterdir()) == ["items.jsonl", "red.jpg"]


def test_progress_in_a_log_is_plain_lines_without_carriage_returns(tmp_path, capsys):
    items = write_items(tmp_path)
    assert main(["encode", "--input", str(items), "--output", str(tmp_path / "v.npy"), "--chunk-rows", "2",
                 "--progress-interval", "0"]) == 0
    err = capsys.readouterr().err
    assert "\r" not in err
    assert "encode: 2/5 rows (40%)" in err and "items/s, ETA" in err


def test_shard_directory_output_resumes_and_refuses_to_overwrite(tmp_path, capsys):
    pq = pytest.importorskip("pyarrow.parquet", reason="the parquet extra (CI installs it: tests/test_environment.py)")
    items, out = write_items(tmp_path), tmp_path / "shards"
    argv = ["encode", "--input", str(items), "--output", str(out), "--no-progress", "--shard-rows", "2",
            "--output-dtype", "float16"]
    assert main(argv) == 0
    assert "5 rows in 3 shards" in capsys.readouterr().out
    table = pq.read_table(out)
    assert table.num_rows == 5 and str(table.schema.field("embedding").type.value_type) == "halffloat"
    assert main(argv) == 2
    assert "already holds a job" in capsys.readouterr().err
    assert main([*argv, "--resume"]) == 0
    assert "encoded 0/0 items (0 failures, 5 done before)" in capsys.readouterr().out
    assert main([*argv[:-1], "float32", "--resume"]) == 2
    assert "started with output_dtype='float16'" in capsys.readouterr().err
    summary = json.loads((out / "_summary.json").read_text())
    assert summary["output_rows"] == 5 and summary["shards"] == 3


def test_reasoning_texts_go_to_a_sidecar_or_a_column(tmp_path):
    pq = pytest.importorskip("pyarrow.parquet", reason="the parquet extra (CI installs it: tests/test_environment.py)")
    items = write_items(tmp_path)
    flags = ["--input", str(items), "--no-progress", "--reasoning", "--max-reasoning-tokens", "2"]
    assert main(["encode", *flags, "--output", str(tmp_path / "v.npy")]) == 0
    lines = [json.loads(line) for line in (tmp_path / "v.reasoning.jsonl").read_text().splitlines()]
    assert [line["id"] for line in lines] == ["a", "1", "2", "d", "e"]
    assert isinstance(lines[0]["reasoning"], str) and lines[2]["reasoning"] is None
    for out in ("shards", "v.parquet"):
        assert main(["encode", *flags, "--output", str(tmp_path / out)]) == 0
        table = pq.read_table(tmp_path / out).to_pydict()
        assert table["reasoning"][0] == lines[0]["reasoning"] and table["reasoning"][3] is None
