"""Bulk scoring (marketplace_classifier/ops/bulk.py): a marketplace export, a CSV or a JSONL scored
in-process, through a server and on Ray Data with the same answers; bad rows reported in the
output; a run killed with SIGKILL resumes with no listing lost or written twice."""

from __future__ import annotations

import csv
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from marketplace_classifier.benchmarks.bulk_bench import subset_export
from marketplace_classifier.client import Client
from marketplace_classifier.ops import serve
from marketplace_classifier.ops.bulk import BulkRun, InProcessScorer, ServedScorer
from marketplace_classifier.ops.bulk_io import BulkError, Journal, read_rows
from marketplace_classifier.ops.bulk_ray import local_cluster, score_on_cluster
from tests.helpers import ROOT

MODEL = "combined"
TOLERANCE = 1e-5


@pytest.fixture(scope="module")
def catalogue(raw_sample, tmp_path_factory) -> Path:
    """The generated export's first 40 products with photos, as a marketplace export."""
    return subset_export(raw_sample[0], 40, tmp_path_factory.mktemp("catalogue") / "export")


@pytest.fixture(scope="module")
def in_process_answers(catalogue, artifacts, tmp_path_factory) -> dict[int, dict]:
    out = tmp_path_factory.mktemp("bulk") / "answers.jsonl"
    counts = BulkRun(
        catalogue, out, MODEL, InProcessScorer(artifacts / MODEL, threads=2), batch_size=8, progress=False
    ).run()
    missing = sum(not all(photo.exists() for photo in row.photos) for row in read_rows(catalogue))
    assert missing > 0  # the generator leaves some photos out, as the real export does
    assert counts == {"listings": 40, "resumed_from": 0, "answered": 40 - missing, "errors": missing}
    return by_row(out)


def by_row(path: Path) -> dict[int, dict]:
    records = [json.loads(line) for line in path.read_text().splitlines()]
    assert len(records) == len({record["row"] for record in records}), "a row written twice"
    return {record["row"]: record for record in records}


def assert_same_answers(first: dict[int, dict], second: dict[int, dict]) -> None:
    assert sorted(first) == sorted(second)
    for row, answer in first.items():
        other = second[row]
        assert answer["error"] == other["error"]
        if answer["error"] is not None:
            continue
        assert (answer["id"], answer["path"], answer["category"]) == (
            other["id"],
            other["path"],
            other["category"],
        )
        assert abs(answer["probability"] - other["probability"]) <= TOLERANCE
        assert all(
            abs(a - b) <= TOLERANCE
            for a, b in zip(answer["path_probabilities"], other["path_probabilities"], strict=True)
        )


def test_every_listing_of_an_export_is_answered_once_with_its_path_and_version(in_process_answers, catalogue):
    assert sorted(in_process_answers) == list(range(40))
    ids = [row.id for row in read_rows(catalogue)]
    rows = list(read_rows(catalogue))
    for row, record in in_process_answers.items():
        assert record["id"] == ids[row] and record["model"] == MODEL
        if not all(photo.exists() for photo in rows[row].photos):  # reported with its reason
            assert "No such file" in record["error"] and record["category"] is None
            continue
        assert record["error"] is None
        assert record["model_version"] and record["path"].split(" / ")[0] == record["category"]
        assert record["truth"] and 1 <= len(record["path_probabilities"]) <= 3


def test_bad_rows_are_reported_with_their_reason_and_the_run_goes_on(catalogue, artifacts, tmp_path):
    listings = tmp_path / "listings.jsonl"
    photo = next((catalogue / "images").iterdir())
    shutil.copy(photo, tmp_path / "ok.jpg")
    (tmp_path / "broken.jpg").write_bytes(b"this is not a photo")
    lines = [
        json.dumps({"id": "a", "text": "oak dining table", "photos": ["ok.jpg"]}),
        json.dumps({"id": "b", "text": "kettle", "photos": ["missing.jpg"]}),
        "{not json",
        json.dumps({"id": "d", "product_name": "sofa", "photos": ["broken.jpg"]}),
        json.dumps({"id": "e", "text": "   "}),
        json.dumps({"id": "f", "product_name": "lamp", "product_description": "brass"}),
    ]
    listings.write_text("\n".join(lines) + "\n")
    out = tmp_path / "answers.csv"
    counts = BulkRun(
        listings, out, MODEL, InProcessScorer(artifacts / MODEL), batch_size=4, progress=False
    ).run()
    assert counts["answered"] == 2 and counts["errors"] == 4
    with out.open(newline="") as stream:
        rows = {row["row"]: row for row in csv.DictReader(stream)}
    assert rows["0"]["error"] == "" and rows["5"]["error"] == "" and rows["5"]["category"]
    assert "missing.jpg" in rows["1"]["error"] and "line 3 is not a listing" in rows["2"]["error"]
    assert "photo 1 of 1" in rows["3"]["error"] and rows["3"]["status"] == "400"
    assert "needs text" in rows["4"]["error"]
    assert not (tmp_path / "answers.csv.partial.jsonl").exists()


def test_a_run_killed_mid_way_resumes_without_loss_or_duplicates(
    catalogue, artifacts, in_process_answers, tmp_path
):
    out = tmp_path / "answers.jsonl"
    command = [
        sys.executable,
        "-m",
        "marketplace_classifier.ops.score",
        "--input",
        str(catalogue),
        "--out",
        str(out),
        "--model",
        MODEL,
        "--artifacts-dir",
        str(artifacts),
        "--batch-size",
        "2",
        "--threads",
        "1",
    ]
    process = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and process.poll() is None:
        if out.exists() and out.read_bytes().count(b"\n") >= 6:
            break
        time.sleep(0.05)
    assert process.poll() is None, process.stderr.read().decode()[-2000:]
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    written = by_row(out) if out.read_bytes().endswith(b"\n") else None
    assert written is None or 6 <= len(written) < 40
    with out.open("ab") as stream:  # as if the kill had cut a line in two
        stream.write(b'{"row": 39, "id": "torn')
    run = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]
    assert "from an earlier run" in run.stderr
    assert_same_answers(in_process_answers, by_row(out))


def test_the_output_formats_hold_the_same_answers(catalogue, artifacts, in_process_answers, tmp_path):
    pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    out = tmp_path / "answers.parquet"
    BulkRun(catalogue, out, MODEL, InProcessScorer(artifacts / MODEL), batch_size=16, progress=False).run()
    records = {record["row"]: record for record in pq.read_table(out).to_pylist()}
    assert_same_answers(in_process_answers, records)
    with pytest.raises(BulkError, match="already written"):
        BulkRun(catalogue, out, MODEL, InProcessScorer(artifacts / MODEL), progress=False).run()


def test_a_missing_model_or_input_is_one_readable_line(tmp_path, artifacts):
    for arguments, expected in (
        (["--input", str(tmp_path / "nothing.csv")], "no input at"),
        (["--input", str(tmp_path), "--artifacts-dir", str(tmp_path)], "Products.csv"),
        (["--input", "x.txt", "--out", "y.xlsx"], "cannot write y.xlsx"),
    ):
        command = [
            sys.executable,
            "-m",
            "marketplace_classifier.ops.score",
            "--out",
            str(tmp_path / "o.jsonl"),
            *arguments,
        ]
        run = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=120)
        assert run.returncode == 2 and expected in run.stderr and "Traceback" not in run.stderr, run.stderr


@pytest.mark.serving
@pytest.mark.engines
def test_served_scoring_gives_the_in_process_answers(catalogue, in_process_answers, server, tmp_path):
    out = tmp_path / "served.jsonl"
    client = Client(
        server["properties"]["inference_address"],
        MODEL,
        key_file=server["state"] / "key_file.json",
        timeout=120,
    )
    counts = BulkRun(
        catalogue, out, MODEL, ServedScorer(client), batch_size=4, concurrency=3, progress=False
    ).run()
    assert counts["answered"] + counts["errors"] == 40 and counts["errors"] > 0
    assert_same_answers(in_process_answers, by_row(out))


@pytest.mark.ray
def test_ray_data_on_a_two_node_cluster_gives_the_in_process_answers(
    catalogue, artifacts, in_process_answers, tmp_path
):
    """A real local cluster: `ray start --head` and a second `ray start --address` on this
    machine, one CPU each; an actor on each node scores the export through the same core."""
    if not serve.ENGINE_PYTHON.exists():
        pytest.skip("the second engine's environment is missing: make engine-venv (make test builds it)")
    out = tmp_path / "ray.jsonl"
    with local_cluster(nodes=2, cpus_per_node=1) as address:
        run, placement = score_on_cluster(
            catalogue, out, MODEL, artifacts, address, batch_size=4, timeout=600
        )
    assert run.returncode == 0, run.stderr[-3000:]
    assert len(placement) == 2 and sum(placement.values()) == 40, placement  # both nodes' actors scored
    assert_same_answers(in_process_answers, by_row(out))


def test_the_journal_cuts_a_torn_line_and_never_writes_a_row_twice(tmp_path):
    journal = Journal(tmp_path / "j.jsonl")
    journal.open()
    journal.append([{"row": 0}, {"row": 1}])
    with journal.path.open("a") as stream:
        stream.write('{"row": 2, "torn')
    again = Journal(journal.path)
    assert again.open() == {0, 1}
    again.append([{"row": 1}, {"row": 2}])
    assert [record["row"] for record in again.records()] == [0, 1, 2]
