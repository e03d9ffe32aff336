"""The opt-in request log: a sampled, size-capped JSON-lines record of answered listings (their
text fields, their photos' sha256 digests, never the photos, and the answer), for the rollout's
comparisons and for retraining. One file per worker process under the folder the setting names
(`request_log_dir`); SECURITY.md says what it stores."""

from __future__ import annotations

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


class RequestLog:
    """Appends one line per sampled answered listing to <folder>/requests-<pid>.jsonl, until the
    file reaches `max_bytes`; then it stops and says so once."""

    def __init__(self, folder: Path, sample: float, max_bytes: int, model: str, version: str | None,
                 seed: int | None = None):
        self.path = Path(folder) / f"requests-{os.getpid()}.jsonl"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.sample, self.max_bytes = sample, max_bytes
        self.model, self.version = model, version
        self.random, self.lock, self.full = random.Random(seed), threading.Lock(), False

    def record(self, listing, answer: dict) -> bool:
        """Write `listing` and its answer if sampled and there is room; True when written."""
        if self.full or self.random.random() >= self.sample:
            return False
        line = json.dumps({
            "time": round(time.time(), 3), "model": self.model, "version": self.version,
            "text": (listing.text or "")[:MAX_TEXT_CHARS],
            "photos": [hashlib.sha256(photo).hexdigest() for photo in listing.images],
            "answer": {key: answer[key] for key in ANSWER_FIELDS if key in answer},
        }, ensure_ascii=True) + "\n"
        with self.lock:
            size = self.path.stat().st_size if self.path.exists() else 0
            if size + len(line) > self.max_bytes:
                self.full = True
                logger.warning("request log %s reached its cap of %d bytes: no more records", self.path,
                               self.max_bytes)
                return False
            with self.path.open("a", encoding="ascii") as stream:
                stream.write(line)
        return True
