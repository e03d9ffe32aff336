"""Shared fixtures: one small generated sample and its cleaned copy per test session."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from training.cleaning import clean
from training.sample import SampleConfig, generate
from training.splits import write_splits

SAMPLE_PRODUCTS = 200
REAL_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "marketplace"


def tree_digest(folder: Path) -> dict[str, str]:
    """Relative path -> sha256 of every file below `folder`."""
    return {str(path.relative_to(folder)): hashlib.sha256(path.read_bytes()).hexdigest()
            for path in sorted(folder.rglob("*")) if path.is_file()}


@pytest.fixture(scope="session")
def raw_sample(tmp_path_factory) -> tuple[Path, dict]:
    folder = tmp_path_factory.mktemp("raw")
    summary = generate(folder, SampleConfig(products=SAMPLE_PRODUCTS, seed=3))
    return folder, summary


@pytest.fixture(scope="session")
def clean_sample(raw_sample, tmp_path_factory) -> tuple[Path, object]:
    """Cleaned at a small image size (64) to keep the suite fast; split by product."""
    out = tmp_path_factory.mktemp("clean")
    report = clean(raw_sample[0], out, size=64, workers=2)
    write_splits(out, 0.2, 0.2, seed=0)
    return out, report
