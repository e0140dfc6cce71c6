"""The encode job on a local Ray cluster equals the single-process job, bad rows included."""

import io
import json

import numpy as np
import pytest
from PIL import Image

ray = pytest.importorskip("ray", reason="Ray Data (CI installs it: tests/test_environment.py)")
pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")

import moon3rt  # noqa: E402
import moon3rt.ray  # noqa: E402
from moon3rt.cli import main  # noqa: E402
from moon3rt.jobs import Columns, input_files, output_for, run  # noqa: E402

ROWS = 2000


@pytest.fixture(scope="module")
def cluster():
    ray.init(num_cpus=2, include_dashboard=False, _node_ip_address="127.0.0.1", log_to_driver=False)
    yield
    ray.shutdown()


def catalogue(tmp_path):
    colours = ["red", "navy", "olive", "white", "black"]
    with open(tmp_path / "items.jsonl", "w", encoding="utf-8") as f:
        for i in range(ROWS):
            f.write(json.dumps({"id": f"t{i}", "text": f"{colours[i % 5]} cotton shirt {i}\u2028size {i % 7}"},
                               ensure_ascii=False) + "\n")
        f.write("{broken json\n")
    images = []
    for k, c in enumerate([(200, 30, 30), (20, 40, 160), (30, 160, 60)]):
        buf = io.BytesIO()
        Image.new("RGB", (40 + 8 * k, 32), c).save(buf, format="PNG")
        images.append(buf.getvalue())
    pq.write_table(pa.table({"id": ["p0", "p1", "p2", "p-bad"], "text": ["red tee", None, "green mug", "x"],
                             "image": pa.array(images + [b"\x89PNG not really"], pa.binary())}),
                   tmp_path / "products.parquet")
    return [tmp_path / "items.jsonl", tmp_path / "products.parquet"]


def single_process(inputs, output):
    encoder = moon3rt.load("moon3-tiny", device="cpu")
    files = input_files(inputs)
    out = output_for(output, "float32", 100_000, False)
    run(encoder, files, out, out.open({}), columns=Columns(), chunk_rows=256, encode_kwargs={})
    return pq.read_table(output).to_pydict()


def test_ray_job_equals_the_single_process_job_and_reruns_skip_done_rows(cluster, tmp_path, capsys):
    inputs = catalogue(tmp_path)
    summary = moon3rt.ray.embed(inputs, tmp_path / "ray", rows_per_call=256)
    assert summary["items"] == ROWS + 5 and summary["failures"] == 2 and summary["output_rows"] == ROWS + 5
    got = pq.read_table(tmp_path / "ray").to_pydict()
    want = single_process(inputs, tmp_path / "single")
    assert sorted(got["id"]) == sorted(want["id"])
    by_id = {i: (e, err) for i, e, err in zip(got["id"], got["embedding"], got["error"])}
    for i, e, err in zip(want["id"], want["embedding"], want["error"]):
        ray_e, ray_err = by_id[i]
        if err is None:
            assert ray_err is None, (i, ray_err)
            np.testing.assert_allclose(np.asarray(ray_e), np.asarray(e), atol=1e-6, err_msg=i)
        else:
            assert ray_e is None and ray_err is not None
    errors = {i: err for i, err in zip(got["id"], got["error"]) if err}
    assert errors[f"items.jsonl:{ROWS}"].startswith(f"{inputs[0]} line {ROWS + 1}: not valid JSON")
    assert errors["p-bad"].startswith(f"{inputs[1]} id p-bad: image")
    # a rerun into the same directory embeds only what is not there yet (here: the failed rows)
    assert main(["encode", "--ray", "--input", *map(str, inputs), "--output", str(tmp_path / "ray")]) == 0
    out = capsys.readouterr().out
    assert "encoded 0/2 items (2 failures, 2003 skipped as done)" in out
