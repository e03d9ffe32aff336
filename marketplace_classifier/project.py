"""Where the project's own files are: config.properties, model_store/, artifacts/, .serve/."""

from __future__ import annotations

from pathlib import Path

PACKAGE = Path(__file__).resolve().parent


def project_root() -> Path:
    """The checkout this package runs from (a source tree or an editable install), else the
    current folder: an installed package keeps no project files of its own."""
    checkout = PACKAGE.parent
    return checkout if (checkout / "config.properties").is_file() else Path.cwd()


ROOT = project_root()
