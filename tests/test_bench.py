import json

from scripts import bench


def test_bench_runs_on_tiny_settings_and_reports_every_row(trained, artifacts, tmp_path):
    out = tmp_path / "benchmark"
    report = bench.run(artifacts, trained["work"] / "checkpoints", out, scale=0.05)
    saved = json.loads((out / "benchmark.json").read_text())
    assert set(saved["models"]) == {"image", "text", "combined"}
    for row in report["models"].values():
        assert set(row["model_limit"]) == set(bench.BATCH_SIZES)
        assert all(rate > 0 for rate in row["model_limit"].values())
        assert set(row["served"]) == set(bench.CONCURRENCY)
        assert all(run["errors"] == 0 and run["requests"] > 0 for run in row["served"].values())
        assert row["batching_off"]["errors"] == 0 and row["naive"] > 0
    assert 0 < report["image_preprocessing"]["share_of_handler_time"] < 1
    table = (out / "benchmark.md").read_text()
    assert table.count("\n| ") == 4 and "batching off" in table
    assert (out / "benchmark.png").read_bytes()[:4] == b"\x89PNG"
