import json
import random
import re
import time

import pytest

from marketplace_classifier.benchmarks import bench, bench_report


@pytest.mark.serving
def test_bench_runs_on_tiny_settings_and_reports_every_row(trained, artifacts, tmp_path, capsys):
    out = tmp_path / "benchmark"
    report = bench.run(artifacts, trained["work"] / "checkpoints", out, scale=0.05)
    progress = capsys.readouterr().err.splitlines()  # one numbered line per step, then the time
    steps = [line for line in progress if line.startswith("bench [")]
    assert steps[0].startswith("bench [1/") and "image: model limit" in steps[0]
    assert [int(line.split("[")[1].split("/")[0]) for line in steps] == list(range(1, len(steps) + 1))
    assert progress[-1].startswith("bench: done in ")
    saved = json.loads((out / "benchmark.json").read_text())
    assert set(saved["models"]) == {"image", "text", "combined"}
    for row in report["models"].values():
        assert set(row["model_limit"]) == set(bench.BATCH_SIZES)
        assert all(rate > 0 for rate in row["model_limit"].values())
        assert set(row["served"]) == set(bench.CONCURRENCY)
        assert all(run["errors"] == 0 and run["requests"] > 0 for run in row["served"].values())
        assert row["batching_off"]["errors"] == 0 and row["naive"] > 0
        assert row["other_workers"]["errors"] == 0 and row["other_workers"]["requests"] > 0
        assert {"plain", "optimize_for_inference"} <= set(row["layouts"])
    assert "channels_last" in report["models"]["image"]["layouts"]
    assert 0 < report["image_preprocessing"]["share_of_handler_time"] < 1
    table = (out / "benchmark.md").read_text()
    assert "batching off" in table and "| optimisation |" in table
    for model in ("image", "text", "combined"):
        assert any(line.startswith(f"| {model} | ") for line in table.splitlines())
        assert re.search(rf"\| \d+ worker\(s\) x \d+ thread\(s\) \(vs \d+ x \d+\) \| {model} \|", table)
    assert "| channels-last | image |" in table
    assert (out / "benchmark.png").read_bytes()[:4] == b"\x89PNG"
    (out / "benchmark.md").unlink()
    assert bench_report.main([str(out / "benchmark.json")]) == 0  # the report remade from the JSON
    assert (out / "benchmark.md").read_text() == table


def test_model_speed_measures_every_exported_model(artifacts, capsys):
    from marketplace_classifier.benchmarks import model_speed

    folders = [artifacts / kind for kind in ("image", "text", "combined")]
    assert model_speed.main([*map(str, folders), "--seconds", "0.2", "--listing-photos", "1", "3"]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    models = [row for row in rows if "items_per_second" in row]
    assert [row["folder"] for row in models] == [str(folder) for folder in folders]
    assert all(row["items_per_second"] > 0 for row in models)
    listings = [row for row in rows if "photos_per_listing" in row]  # the combined model's
    assert [(row["folder"], row["photos_per_listing"]) for row in listings] == \
        [(str(artifacts / "combined"), 1), (str(artifacts / "combined"), 3)]
    assert all(row["text_per_photo"] > 0 and row["text_per_listing"] > 0 for row in listings)


def test_bench_report_names_an_unreadable_report(tmp_path, capsys):
    assert bench_report.main([str(tmp_path / "missing.json")]) == 2
    assert capsys.readouterr().err.startswith("error: ")


def test_the_engines_comparison_sends_each_model_only_what_it_takes(trained):
    from marketplace_classifier.benchmarks.engines_bench import (
        compared_payloads,
        held_out_listings,
        largest_difference,
    )

    listings = held_out_listings(trained["data_dir"], 3)
    assert len(listings) == 3 and all(listing["images"] and listing["text"] for listing in listings)
    for model, keys in (("image", {"images"}), ("text", {"text"}), ("combined", {"images", "text"})):
        bodies = [json.loads(payload["data"]) for payload in compared_payloads(model, listings)]
        assert [set(body["instances"][0]) for body in bodies] == [keys] * 3
    generated = compared_payloads("text", None)
    assert generated == compared_payloads("text", None) and len(generated) > 3  # seeded
    assert largest_difference([{"a": 0.5, "b": 0.5}], [{"a": 0.25, "b": 0.75}]) == 0.25


def test_the_runtimes_benchmark_measures_the_machine_the_models_and_one_worker(artifacts):
    from marketplace_classifier.benchmarks import runtimes_bench
    from marketplace_classifier.benchmarks.load import make_request
    from marketplace_classifier.serving.settings import RUNTIMES

    assert all(runtimes_bench.peak_gflops(runtime, seconds=0.05, size=256) > 0 for runtime in RUNTIMES)
    assert runtimes_bench.peak_gflops("openvino", seconds=0.05, size=256, bf16=True) > 0
    rng = random.Random(0)
    for model in ("image", "text", "combined"):
        requests = [make_request(model, rng) for _ in range(4)]
        assert runtimes_bench.flops_per_item(artifacts / model, requests) > 0
        stages = runtimes_bench.stage_profile(artifacts / model, None, requests, rounds=1)
        assert set(stages) == {"parse_and_decode", "tokenize_and_collate", "model", "answer"}
        assert stages["model"] > 0 and min(stages.values()) >= 0
    image = [make_request("image", rng)]
    assert runtimes_bench.flops_per_item(artifacts / "image", image * 2) == \
        pytest.approx(runtimes_bench.flops_per_item(artifacts / "image", image))  # per item, not per call


def test_the_runtimes_benchmark_reads_the_cpu_time_of_the_processes_it_is_given():
    import subprocess
    import sys

    import psutil

    from marketplace_classifier.benchmarks import runtimes_bench

    busy = subprocess.Popen([sys.executable, "-c", "import time\nend = time.process_time() + 1.5\n"
                             "while time.process_time() < end: pass\ntime.sleep(30)"])
    try:
        processes = [psutil.Process(busy.pid)]
        before = runtimes_bench.cpu_seconds(processes)
        deadline = time.monotonic() + 30
        while runtimes_bench.cpu_seconds(processes)[busy.pid] - before[busy.pid] < 1.0 and \
                time.monotonic() < deadline:
            time.sleep(0.2)
        spent = runtimes_bench.cpu_seconds(processes)[busy.pid] - before[busy.pid]
        assert 1.0 <= spent <= 2.0  # its own CPU time, not this process's or the wall clock's
    finally:
        busy.kill()
        busy.wait()
    assert runtimes_bench.cpu_seconds(processes) == {}  # a process that has gone counts for nothing
