"""The Makefile's housekeeping targets, run by make itself in a scratch tree."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DEMO = ["data/demo/raw/Products.csv", "checkpoints/image/best.pt", "checkpoints/combined/best.pt",
        "artifacts/text/model.pt", "artifacts/text_int8/model.pt", "model_store/image.mar",
        "reports/summary.md", "reports/combined/metrics.json", "runs/text/events"]
KEPT = ["data/real/splits.csv", "checkpoints/real/text/best.pt", "artifacts/real/image/model.pt",
        "model_store/real/image.mar", "reports/real/summary.md", "reports/memory/memory.md",
        "runs/real/text/events", "cache/features/abc.pt"]


def make(folder: Path, target: str) -> None:
    subprocess.run(["make", "--no-print-directory", target], cwd=folder, check=True, capture_output=True)


@pytest.mark.skipif(shutil.which("make") is None, reason="make is not installed")
def test_clean_demo_removes_the_demos_outputs_only_and_clean_all_the_rest(tmp_path):
    shutil.copy(ROOT / "Makefile", tmp_path / "Makefile")
    for relative in DEMO + KEPT:
        (tmp_path / relative).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / relative).write_text("x")
    make(tmp_path, "clean-demo")
    assert [path for path in DEMO if (tmp_path / path).exists()] == []
    assert [path for path in KEPT if not (tmp_path / path).exists()] == []
    make(tmp_path, "clean-all")
    assert [path for path in KEPT if (tmp_path / path).exists()] == []
    assert (tmp_path / "Makefile").exists()
