"""Progress of a long command on standard error: numbered steps, each with the time it took.

Commands whose work is a few steps of unequal length (export, bench) say which step runs and how
long the last one took; work of many equal items uses a tqdm bar instead (cleaning, scoring).
"""

from __future__ import annotations

import sys
import time
from typing import TextIO

from tqdm import tqdm


def duration(seconds: float) -> str:
    """`42.0 s`, `3 min 05 s`: a step's time as a reader wants it."""
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, rest = divmod(int(round(seconds)), 60)
    return f"{minutes} min {rest:02d} s"


class Steps:
    """`export text [2/6] tracing TorchScript (last step 3.1 s)`, then `export text: done in 42.0 s`."""

    def __init__(self, title: str, total: int, stream: TextIO | None = None):
        self.title, self.total, self.stream = title, total, stream
        self.number = 0
        self.started = self.step_started = time.monotonic()

    def _say(self, line: str) -> None:
        tqdm.write(line, file=self.stream or sys.stderr)

    def __call__(self, name: str) -> None:
        now = time.monotonic()
        took = f" (last step {duration(now - self.step_started)})" if self.number else ""
        self.number += 1
        self.step_started = now
        self._say(f"{self.title} [{self.number}/{max(self.total, self.number)}] {name}{took}")

    def done(self) -> float:
        """Say the whole time and return it in seconds."""
        elapsed = time.monotonic() - self.started
        self._say(f"{self.title}: done in {duration(elapsed)}")
        return elapsed
