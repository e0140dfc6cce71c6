"""Catalogue jobs: streaming readers, shards, resume after crashes, --only-new, bad rows."""

import gzip
import io
import json

import numpy as np
import pytest
from PIL import Image

pa = pytest.importorskip("pyarrow", reason="the parquet extra (CI installs it: tests/test_environment.py)")
pq = pytest.importorskip("pyarrow.parquet")

import moon3rt  # noqa: E402
from moon3rt.jobs import Columns, input_files, output_for, run  # noqa: E402
from moon3rt.jobs.idset import existing_ids, output_files  # noqa: E402
from moon3rt.jobs.sinks import MANIFEST, ShardedOutput  # noqa: E402

TEXTS = [f"product {i}: {c} cotton shirt, size {i % 5}" for i, c in enumerate(["red", "navy", "olive", "white"] * 5)]


@pytest.fixture(scope="module")
def encoder():
    return moon3rt.load("moon3-tiny", device="cpu")


def jpeg(colour, size=(40, 32)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, colour).save(buf, format="JPEG")
    return buf.getvalue()


def job(encoder, inputs, output, *, resume=False, shard_rows=1000, chunk_rows=4, columns=None, existing=None,
        dim=None):
    files = input_files(inputs)
    out = output_for(output, "float32", shard_rows, resume)
    done = out.open({"inputs": [str(f) for f in files], "dim": dim, "shard_rows": shard_rows, "chunk_rows": chunk_rows})
    return run(encoder, files, out, done, columns=columns or Columns(), chunk_rows=chunk_rows, existing=existing,
               encode_kwargs={"batch_size": 3, "dim": dim})


def read_output(path):
    table = pq.read_table(path)
    vectors = {i: np.asarray(e, dtype=np.float32) if e is not None else None
               for i, e in zip(table["id"].to_pylist(), table["embedding"].to_pylist())}
    return table.to_pydict(), vectors


def write_text_jsonl(path, texts=TEXTS):
    path.write_text("".join(json.dumps({"id": f"sku-{i}", "text": t}) + "\n" for i, t in enumerate(texts)))
    return path


def test_jsonl_plain_and_gz_stream_equal_encode(encoder, tmp_path):
    plain = write_text_jsonl(tmp_path / "a.jsonl")
    gz = tmp_path / "b.jsonl.gz"
    with gzip.open(gz, "wt") as f:
        f.write(plain.read_text())
    reference = encoder.encode(TEXTS)
    for name, source in (("plain", plain), ("gz", gz)):
        summary = job(encoder, [source], tmp_path / name)
        assert summary.items == len(TEXTS) and summary.failures == 0 and summary.shards == 1
        _, vectors = read_output(tmp_path / name)
        got = np.stack([vectors[f"sku-{i}"] for i in range(len(TEXTS))])
        np.testing.assert_allclose(got, reference, atol=1e-5)


def test_parquet_path_and_binary_image_columns(encoder, tmp_path):
    colours = [(200, 30, 30), (20, 40, 160), (30, 160, 60)]
    for k, c in enumerate(colours):
        (tmp_path / f"img{k}.jpg").write_bytes(jpeg(c))
    titles = ["red tee", "navy jacket", "green mug"]
    pq.write_table(pa.table({"sku": ["p0", "p1", "p2"], "title": titles,
                             "photo": [f"img{k}.jpg" for k in range(3)]}), tmp_path / "paths.parquet")
    pq.write_table(pa.table({"sku": ["b0", "b1", "b2"], "title": titles,
                             "photo": pa.array([jpeg(c) for c in colours], pa.binary())}), tmp_path / "bytes.parquet")
    cols = Columns(id="sku", text="title", image="photo")
    reference = encoder.encode([{"text": t, "image": jpeg(c)} for t, c in zip(titles, colours)])
    for name, prefix in (("paths", "p"), ("bytes", "b")):
        summary = job(encoder, [tmp_path / f"{name}.parquet"], tmp_path / f"out-{name}", columns=cols)
        assert summary.failures == 0, summary.failure_samples
        _, vectors = read_output(tmp_path / f"out-{name}")
        np.testing.assert_allclose(np.stack([vectors[f"{prefix}{k}"] for k in range(3)]), reference, atol=1e-5)


def test_shards_rotate_and_the_manifest_records_ranges(encoder, tmp_path):
    source = write_text_jsonl(tmp_path / "items.jsonl", TEXTS[:7])
    summary = job(encoder, [source], tmp_path / "out", shard_rows=3, chunk_rows=2)
    assert summary.shards == 3 and summary.output_rows == 7
    manifest = json.loads((tmp_path / "out" / MANIFEST).read_text())
    assert [s["rows"] for s in manifest["shards"]] == [3, 3, 1] and manifest["complete"]
    assert [s["ranges"] for s in manifest["shards"]] == [[[str(source), 0, 3]], [[str(source), 3, 6]],
                                                          [[str(source), 6, 7]]]
    assert [pq.read_table(tmp_path / "out" / s["file"]).num_rows for s in manifest["shards"]] == [3, 3, 1]
    assert not list((tmp_path / "out").glob(".*"))  # no temporary file left


class Crash(Exception):
    pass


# chunks completed before the crash; a shard is 3 chunks (2 + 2 + 1 rows): 3 ends one, 1, 4 and 8 are mid-shard
@pytest.mark.parametrize("crash_at", [1, 3, 4, 8])
def test_resume_after_a_crash_gives_every_row_once_with_identical_vectors(encoder, tmp_path, monkeypatch, crash_at):
    source = write_text_jsonl(tmp_path / "items.jsonl")
    job(encoder, [source], tmp_path / "clean", shard_rows=5, chunk_rows=2)
    _, clean = read_output(tmp_path / "clean")
    calls = {"n": 0}
    real = type(encoder).encode_with_report

    def flaky(self, items, **kwargs):
        calls["n"] += 1
        if calls["n"] > crash_at:
            raise Crash
        return real(self, items, **kwargs)

    monkeypatch.setattr(type(encoder), "encode_with_report", flaky)
    with pytest.raises(Crash):
        job(encoder, [source], tmp_path / "out", shard_rows=5, chunk_rows=2)
    monkeypatch.setattr(type(encoder), "encode_with_report", real)
    kept = sorted(p.name for p in (tmp_path / "out").glob("part-*.parquet"))
    assert len(kept) == crash_at // 3  # only complete shards survive the crash
    assert not list((tmp_path / "out").glob(".part-*"))
    with pytest.raises(ValueError, match="--resume"):
        job(encoder, [source], tmp_path / "out", shard_rows=5, chunk_rows=2)
    summary = job(encoder, [source], tmp_path / "out", shard_rows=5, chunk_rows=2, resume=True)
    assert summary.resumed_rows == len(kept) * 5 and summary.items == len(TEXTS) - len(kept) * 5
    table, resumed = read_output(tmp_path / "out")
    assert sorted(table["id"]) == sorted(f"sku-{i}" for i in range(len(TEXTS)))  # each row exactly once
    for key, vector in clean.items():
        assert np.array_equal(resumed[key], vector), key  # bit-identical


def test_a_shard_renamed_but_not_recorded_is_redone(encoder, tmp_path, monkeypatch):
    source = write_text_jsonl(tmp_path / "items.jsonl")
    saves = {"n": 0}
    real = ShardedOutput._save_manifest

    def dies_on_third(self):
        saves["n"] += 1
        if saves["n"] == 3:  # 1: at open, 2: after part-00000
            raise Crash  # part-00001.parquet is on disk, the manifest does not list it
        real(self)

    monkeypatch.setattr(ShardedOutput, "_save_manifest", dies_on_third)
    with pytest.raises(Crash):
        job(encoder, [source], tmp_path / "out", shard_rows=5, chunk_rows=5)
    monkeypatch.setattr(ShardedOutput, "_save_manifest", real)
    assert (tmp_path / "out" / "part-00001.parquet").exists()
    (tmp_path / "out" / ".part-00002.parquet.tmp").write_bytes(b"cut off")
    job(encoder, [source], tmp_path / "out", shard_rows=5, chunk_rows=5, resume=True)
    table, _ = read_output(tmp_path / "out")
    assert sorted(table["id"]) == sorted(f"sku-{i}" for i in range(len(TEXTS)))
    assert not list((tmp_path / "out").glob(".part-*"))


def test_resume_refuses_different_settings(encoder, tmp_path):
    source = write_text_jsonl(tmp_path / "items.jsonl", TEXTS[:3])
    job(encoder, [source], tmp_path / "out", dim=16)
    with pytest.raises(ValueError, match="started with dim=16"):
        job(encoder, [source], tmp_path / "out", dim=32, resume=True)


def test_only_new_embeds_ids_absent_from_the_existing_output(encoder, tmp_path):
    job(encoder, [write_text_jsonl(tmp_path / "day1.jsonl", TEXTS[:8])], tmp_path / "day1")
    day2 = write_text_jsonl(tmp_path / "day2.jsonl", TEXTS[:12])
    existing = existing_ids(output_files(tmp_path / "day1"))
    assert len(existing) == 8
    summary = job(encoder, [day2], tmp_path / "day2", existing=existing)
    assert summary.skipped_existing == 8 and summary.items == 4
    table, vectors = read_output(tmp_path / "day2")
    assert table["id"] == [f"sku-{i}" for i in range(8, 12)]
    np.testing.assert_allclose(vectors["sku-9"], encoder.encode([TEXTS[9]])[0], atol=1e-5)


def test_bad_rows_in_every_format_are_reported_with_file_and_line_or_row(encoder, tmp_path):
    (tmp_path / "a.jsonl").write_bytes(b'{"id": "ok", "text": "red tee"}\n{broken\n\n{"id": "img", "image": "nope.jpg"}\n')
    with gzip.open(tmp_path / "b.jsonl.gz", "wb") as f:
        f.write(b'{"id": "gz-ok", "text": "mug"}\n\xff\xfe not utf-8\n')
    pq.write_table(pa.table({"id": ["pq-ok", "pq-bytes", "pq-null"], "text": ["navy jacket", "x", None],
                             "image": pa.array([None, b"not an image", None], pa.binary())}),
                   tmp_path / "c.parquet")
    summary = job(encoder, [tmp_path], tmp_path / "out")
    assert summary.items == 8 and summary.failures == 5
    table, vectors = read_output(tmp_path / "out")
    errors = dict(zip(table["id"], table["error"]))
    assert errors["ok"] is None and errors["gz-ok"] is None and errors["pq-ok"] is None
    assert errors["a.jsonl:1"].startswith(f"{tmp_path / 'a.jsonl'} line 2: not valid JSON")
    assert errors["img"].startswith(f"{tmp_path / 'a.jsonl'} line 4: image") and "not found" in errors["img"]
    assert errors["b.jsonl.gz:1"].startswith(f"{tmp_path / 'b.jsonl.gz'} line 2: not valid UTF-8 (byte 0xff")
    assert errors["pq-bytes"].startswith(f"{tmp_path / 'c.parquet'} row 1: image")
    assert errors["pq-null"] == f"{tmp_path / 'c.parquet'} row 2: 'text' and 'image' are both null"
    assert vectors["img"] is None and vectors["ok"] is not None
    samples = {(s["id"], s["line"], s["row"]) for s in summary.failure_samples}
    assert ("img", 4, 2) in samples and ("pq-null", None, 2) in samples


def test_parquet_without_the_named_columns_is_refused_by_name(encoder, tmp_path):
    from moon3rt.jobs.job import check_inputs

    pq.write_table(pa.table({"title": ["a"]}), tmp_path / "x.parquet")
    with pytest.raises(ValueError, match="no 'text' or 'image' column.*--text-column"):
        check_inputs(input_files([tmp_path / "x.parquet"]), Columns(), {})


def test_truncated_titles_are_counted_in_the_summary_not_warned_per_chunk(encoder, tmp_path, recwarn):
    long_title = " ".join(["very long title words"] * encoder.config.max_text_tokens)
    source = write_text_jsonl(tmp_path / "items.jsonl", [long_title, "short", long_title, long_title])
    summary = job(encoder, [source], tmp_path / "out", chunk_rows=2)
    assert summary.truncated == 3 and summary.failures == 0
    assert "3 titles truncated" in summary.line(48)
    assert not [w for w in recwarn if "truncated" in str(w.message)]
