"""Where the project's own files are: config.properties, model_store/, artifacts/, .serve/."""

from __future__ import annotations

from pathlib import Path

PACKAGE = Path(__file__).resolve().parent
ROOT = PACKAGE.parent  # the checkout this package runs from (an editable install's source tree)
