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
    assert "item 2: line 3 is not valid JSON" in captured.err
    assert "item 3: image: file not found" in captured.err
    assert "encoded 3/5 items (2 failures)" in captured.out and "items/s" in captured.out


def test_encode_parquet_has_ids_embeddings_and_errors(tmp_path):
    pq = pytest.importorskip("pyarrow.parquet", reason="the parquet extra (CI installs it: tests/test_environment.py)")
    out = tmp_path / "vectors.parquet"
    assert main(["encode", "--input", str(write_items(tmp_path)), "--output", str(out), "--no-progress",
                 "--dim", "16"]) == 0
    table = pq.read_table(out).to_pydict()
    assert table["id"] == ["a", "1", "line 3", "d", "e"]
    assert len(table["embedding"][0]) == 16 and table["embedding"][2] is None
    assert table["error"][0] is None and "not found" in table["error"][3]


def test_encode_strict_stops_with_the_bad_items(tmp_path, capsys):
    code = main(["encode", "--input", str(write_items(tmp_path)), "--output", str(tmp_path / "v.npy"),
                 "--strict", "--no-progress"])
    assert code == 2
    err = capsys.readouterr().err
    assert "2 item(s) cannot be embedded" in err and "item 2" in err and "item 3" in err


def test_info_lists_modules(capsys):
    assert main(["info", "--model", "moon3-tiny-random"]) == 0
    out = capsys.readouterr().out
    for line in ("flavour:     moon3", "FIRE", "(layers [0, 2], rank 8)", "MHMF fusion", "output dim:  48"):
        assert line in out, line


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
    assert "RANDOM weights" not in out  # the default is the trained model
    assert "best match for 'leather shoes': sku-004" in out and "best match for 'red cotton t-shirt'" in out
    assert "embedded 12 items" in out


def test_info_describes_a_large_preset_from_its_shapes(capsys):
    """moon3-2b's 2.2 B random weights are never drawn just to describe the preset."""
    assert main(["info", "--model", "moon3-2b"]) == 0
    out = capsys.readouterr().out
    assert "parameters:  2213.28 M total" in out and "(layers [0, 7, 14, 21], rank 64)" in out
