"""The benchmark's report: the markdown tables and the chart, made from benchmark.json, so that
the published figures come from a measured run and can be made again from it.

Usage: python -m marketplace_classifier.benchmarks.bench_report [reports/benchmark/benchmark.json]
Rewrites benchmark.md and benchmark.png beside the JSON and prints the table.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from marketplace_classifier.project import ROOT as PROJECT_ROOT

ROOT = PROJECT_ROOT
BATCH_SIZES = (1, 4, 8, 16)
CONCURRENCY = (1, 4, 16)


def load_report(path: Path) -> dict:
    """benchmark.json with its batch sizes and concurrencies as numbers again (JSON made them
    strings)."""
    report = json.loads(Path(path).read_text())
    for row in report["models"].values():
        for key in ("model_limit", "served"):
            row[key] = {int(size): value for size, value in row[key].items()}
    return report


def write_report(report: dict, out: Path) -> str:
    text = markdown(report)
    (out / "benchmark.md").write_text(text)
    plot(report, out / "benchmark.png")
    return text


def markdown(report: dict) -> str:
    batch = report["configured_batch_size"]
    workers = report["workers"]
    lines = [f"Benchmark of {report['date']} on {report['machine']} ({workers} worker(s) per model, "
             f"{report['threads_per_worker']} thread(s) each; items/s unless stated).", "",
             "| model | model limit b=1 / 4 / 8 / 16 | served c=1 / 4 / 16 | served c=16 / "
             f"({workers} x limit b={batch}) | batching off c=16 | on/off | p50 / p95 / p99 ms (c=16) "
             "| naive | served / naive |",
             "|---|---|---|---|---|---|---|---|---|"]
    for model, row in report["models"].items():
        limit = row["model_limit"]
        on = row["served"]
        c16, off = on[16], row["batching_off"]
        served_rates = " / ".join(f"{on[c]['throughput']:.1f}" for c in CONCURRENCY)
        lines.append(
            f"| {model} | {' / '.join(f'{limit[b]:.1f}' for b in BATCH_SIZES)} | "
            f"{served_rates} | "
            f"{c16['throughput'] / (workers * limit[batch]):.2f} | {off['throughput']:.1f} | "
            f"{c16['throughput'] / off['throughput']:.2f} (p99 {c16['p99_ms']:.0f} vs {off['p99_ms']:.0f}) | "
            f"{c16['p50_ms']:.0f} / {c16['p95_ms']:.0f} / {c16['p99_ms']:.0f} | {row['naive']:.1f} | "
            f"{c16['throughput'] / row['naive']:.2f} |")
    share = report.get("image_preprocessing")
    if share:
        lines += ["", f"Image preprocessing of a 1000x750 JPEG: {share['decode_resize_ms']:.1f} ms "
                      f"with draft decoding ({share['decode_resize_full_size_ms']:.1f} ms at full size), "
                      f"{100 * share['share_of_handler_time']:.0f}% of the per-item handler time "
                      f"({share['model_ms_per_item']:.1f} ms model time per item at batch {batch})."]
    lines += ["", *optimisation_lines(report)]
    errors = sum(run["errors"] for row in report["models"].values()
                 for run in [*row["served"].values(), row["batching_off"], row["other_workers"]])
    lines += ["", f"Errors over all served runs: {errors}."]
    return "\n".join(lines) + "\n"


def optimisation_lines(report: dict) -> list[str]:
    """Each optimisation tried, measured in this run: without -> with, items/s."""
    batch = report["configured_batch_size"]
    cores = report["workers"] * report["threads_per_worker"]
    split_name = (f"{report['workers']} worker(s) x {report['threads_per_worker']} thread(s) "
                  f"(vs {report['other_workers']} x {max(1, cores // report['other_workers'])})")
    lines = ["| optimisation | model | measured as | without | with | with / without |",
             "|---|---|---|---|---|---|"]

    def row(name: str, model: str, where: str, without: float, with_: float) -> None:
        lines.append(f"| {name} | {model} | {where} | {without:.1f} | {with_:.1f} | {with_ / without:.2f} |")

    for model, data in report["models"].items():
        layouts, where = data["layouts"], f"in process, b={batch}"
        row("freeze + optimize_for_inference", model, where, layouts["plain"],
            layouts["optimize_for_inference"])
        if "channels_last" in layouts:
            row("channels-last", model, where, layouts["plain"], layouts["channels_last"])
            row("channels-last on top of optimize_for_inference", model, where,
                layouts["optimize_for_inference"], layouts["optimize_for_inference+channels_last"])
        row(split_name, model, "served, c=16", data["other_workers"]["throughput"],
            data["served"][16]["throughput"])
        row("batching (4, 10 ms) vs off", model, "served, c=16", data["batching_off"]["throughput"],
            data["served"][16]["throughput"])
    for variant, pair in report.get("int8_served", {}).items():
        row("int8 text encoder", variant.removesuffix("_int8"), "served, c=16",
            pair["fp32"]["throughput"], pair["int8"]["throughput"])
    share = report.get("image_preprocessing")
    if share:
        lines.append(f"| JPEG draft decoding | image | decode + resize, photos/s | "
                     f"{1000 / share['decode_resize_full_size_ms']:.1f} | "
                     f"{1000 / share['decode_resize_ms']:.1f} | "
                     f"{share['decode_resize_full_size_ms'] / share['decode_resize_ms']:.2f} |")
    return lines


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    batch = report["configured_batch_size"]
    names = list(report["models"])
    series = {f"model limit (b={batch})": [report["models"][m]["model_limit"][batch] for m in names],
              "served, c=16": [report["models"][m]["served"][16]["throughput"] for m in names],
              "batching off, c=16": [report["models"][m]["batching_off"]["throughput"] for m in names],
              "naive baseline": [report["models"][m]["naive"] for m in names]}
    figure, axes = plt.subplots(figsize=(8, 4))
    width = 0.8 / len(series)
    for offset, (label, values) in enumerate(series.items()):
        axes.bar([i + offset * width for i in range(len(names))], values, width, label=label)
    axes.set_xticks([i + 0.4 - width / 2 for i in range(len(names))], names)
    axes.set_ylabel("items / s")
    axes.set_title(f"marketplace-classifier on {report['machine']}")
    axes.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("report", type=Path, nargs="?",
                        default=ROOT / "reports" / "benchmark" / "benchmark.json")
    args = parser.parse_args(argv)
    try:
        report = load_report(args.report)
    except (OSError, json.JSONDecodeError, KeyError) as error:
        print(f"error: {args.report}: cannot read the benchmark report ({error})", file=sys.stderr)
        return 2
    print(write_report(report, args.report.parent), end="")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
