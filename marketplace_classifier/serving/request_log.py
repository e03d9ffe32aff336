"""The opt-in request log: a sampled, size-capped JSON-lines record of answered listings (their
text fields, their photos' sha256 digests, never the photos, and the answer), for the rollout's
comparisons and for retraining. Files per worker process under the folder the setting names
(`request_log_dir`), the folder capped as a whole; SECURITY.md says what it stores."""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import random
import threading
import time
from pathlib import Path

logger = logging.getLogger(__name__)
MAX_TEXT_CHARS = 10_000  # as much of a text field as serving itself reads
ANSWER_FIELDS = ("category", "probability", "needs_review", "model_version")
FILES_PER_CAP = 10


class RequestLog:
    """Appends one line per sampled answered listing to <folder>/requests-<time>-<pid>.jsonl. The
    folder as a whole stays within `max_bytes` across every process and restart writing to it:
    before each line, the oldest files (by the time in their names) are removed until it fits;
    a process starts a new file once its own holds a FILES_PER_CAP-th of the cap."""

    def __init__(self, folder: Path, sample: float, max_bytes: int, model: str, version: str | None,
                 seed: int | None = None):
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.sample, self.max_bytes = sample, max_bytes
        self.file_bytes = max(1, max_bytes // FILES_PER_CAP)
        self.model, self.version = model, version
        self.random, self.lock = random.Random(seed), threading.Lock()
        self.path = self.new_file()

    def new_file(self) -> Path:
        return self.folder / f"requests-{time.time_ns()}-{os.getpid()}.jsonl"

    def record(self, listing, answer: dict) -> bool:
        """Write `listing` and its answer if sampled; True when written."""
        if self.random.random() >= self.sample:
            return False
        line = json.dumps({
            "time": round(time.time(), 3), "model": self.model, "version": self.version,
            "text": (listing.text or "")[:MAX_TEXT_CHARS],
            "photos": [hashlib.sha256(photo).hexdigest() for photo in listing.images],
            "answer": {key: answer[key] for key in ANSWER_FIELDS if key in answer},
        }, ensure_ascii=True) + "\n"
        if len(line) > self.max_bytes:
            return False
        with self.lock:
            if self.path.exists() and self.path.stat().st_size + len(line) > self.file_bytes:
                self.path = self.new_file()
            self.make_room(len(line))
            with self.path.open("a", encoding="ascii") as stream:
                stream.write(line)
        return True

    def make_room(self, needed: int) -> None:
        """Remove the folder's oldest files until `needed` more bytes stay within the cap."""
        files = []
        for path in sorted(self.folder.glob("requests-*.jsonl")):
            with contextlib.suppress(FileNotFoundError):  # another process removed it
                files.append((path, path.stat().st_size))
        total = sum(size for _, size in files)
        for path, size in files:
            if total + needed <= self.max_bytes:
                return
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
                logger.info("request log: removed %s to stay within %d bytes", path.name, self.max_bytes)
            total -= size


def folder_bytes(folder: Path) -> int:
    """What a request-log folder holds, all processes' files together."""
    return sum(path.stat().st_size for path in Path(folder).glob("requests-*.jsonl"))
