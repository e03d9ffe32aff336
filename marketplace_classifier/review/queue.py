"""The review queue: flagged listings in, one reviewer's claim at a time, decisions out.

A reviewer claims the next open listing (oldest first, or least confident first) for
`LEASE_SECONDS`; the claim is one conditional UPDATE, so two reviewers never hold the same
listing at once, and an abandoned claim lapses. A decision (accept the model's path, or a path
of the taxonomy) is stored with the reviewer, the time and the model version that answered, by
the reviewer who holds the claim only.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import secrets
import time
from dataclasses import dataclass, field

from marketplace_classifier.review.db import Database

LEASE_SECONDS = 300
ORDERS = {"oldest": "added_at, id", "least_confident": "probability, added_at, id"}
SESSION_SECONDS = 8 * 3600
FAILURES_ALLOWED, FAILURE_WINDOW_SECONDS = 5, 15 * 60  # then a name is locked for the rest of the window
SCRYPT = {"n": 2**14, "r": 8, "p": 1}


class ReviewError(ValueError):
    """A queue operation that is not allowed: what, and why."""


class TooManyFailures(ReviewError):
    """A name with FAILURES_ALLOWED failed sign-ins in the window: refused until it passes."""


@dataclass(frozen=True)
class QueuedListing:
    """A flagged listing as a reviewer sees it."""

    id: int
    source: str
    source_id: str
    text: str | None
    product_name: str | None
    product_description: str | None
    model: str
    model_version: str | None
    answer: dict
    probability: float
    status: str
    photo_ids: list[int] = field(default_factory=list)

    @property
    def shown_text(self) -> str:
        """The text the model read: the text, or the name and description."""
        if self.text is not None:
            return self.text
        return " ".join(part for part in (self.product_name, self.product_description) if part)


@dataclass(frozen=True)
class NewListing:
    """A flagged listing to enqueue: where it came from, what it says, what the model answered."""

    source: str
    source_id: str
    model: str
    answer: dict
    text: str | None = None
    product_name: str | None = None
    product_description: str | None = None
    photos: tuple[bytes, ...] = ()


def hash_password(password: str, salt: bytes | None = None) -> str:
    salt = salt or secrets.token_bytes(16)
    digest = hashlib.scrypt(password.encode("utf-8"), salt=salt, **SCRYPT)
    return f"scrypt${salt.hex()}${digest.hex()}"


def password_matches(password: str, stored: str) -> bool:
    try:
        _, salt, _ = stored.split("$")
        expected = hash_password(password, bytes.fromhex(salt))
    except ValueError:
        return False
    return hmac.compare_digest(expected, stored)


def token_hash(token: str) -> str:
    return hashlib.sha256(token.encode("ascii", errors="replace")).hexdigest()


class ReviewQueue:
    def __init__(self, database: Database, clock=time.time):
        self.database, self.clock = database, clock

    # ------------------------------------------------------------ reviewers and sessions
    def add_reviewer(self, name: str, password: str) -> int:
        if not name.strip() or len(name) > 100:
            raise ReviewError("a reviewer's name must be 1 to 100 characters")
        if len(password) < 12:
            raise ReviewError("a password must have at least 12 characters")
        with self.database.transaction() as transaction:
            if transaction.query("SELECT id FROM reviewers WHERE name = ?", (name,)):
                raise ReviewError(f"a reviewer named {name!r} exists already")
            return transaction.insert(
                "INSERT INTO reviewers (name, password_hash, created_at) VALUES (?, ?, ?)",
                (name, hash_password(password), self.clock()))

    def set_password(self, name: str, password: str) -> bool:
        """A reviewer's new password (their sessions end); False when there is no such reviewer."""
        if len(password) < 12:
            raise ReviewError("a password must have at least 12 characters")
        with self.database.transaction() as transaction:
            rows = transaction.query("SELECT id FROM reviewers WHERE name = ?", (name,))
            if not rows:
                return False
            transaction.execute("UPDATE reviewers SET password_hash = ? WHERE id = ?",
                                (hash_password(password), rows[0][0]))
            transaction.execute("DELETE FROM sessions WHERE reviewer_id = ?", (rows[0][0],))
        return True

    def sign_in(self, name: str, password: str) -> tuple[str, str] | None:
        """A new session's (token, CSRF token), or None for a wrong name or password; after
        FAILURES_ALLOWED failures for a name within FAILURE_WINDOW_SECONDS, TooManyFailures
        whatever the password (the right one included, so guessing learns nothing)."""
        since = self.clock() - FAILURE_WINDOW_SECONDS
        failures = self.database.query("SELECT COUNT(*), MIN(failed_at) FROM sign_in_failures "
                                       "WHERE name = ? AND failed_at >= ?", (name, since))[0]
        if int(failures[0]) >= FAILURES_ALLOWED:
            minutes = max(1, round((float(failures[1]) - since) / 60))
            raise TooManyFailures(f"too many failed sign-ins for this name: try again in {minutes} minutes")
        rows = self.database.query("SELECT id, password_hash FROM reviewers WHERE name = ?", (name,))
        if not rows or not password_matches(password, rows[0][1]):
            with self.database.transaction() as transaction:
                transaction.execute("DELETE FROM sign_in_failures WHERE failed_at < ?", (since,))
                transaction.execute("INSERT INTO sign_in_failures (name, failed_at) VALUES (?, ?)",
                                    (name, self.clock()))
            return None
        token, csrf = secrets.token_urlsafe(32), secrets.token_urlsafe(32)
        with self.database.transaction() as transaction:
            transaction.execute("DELETE FROM sessions WHERE expires_at < ?", (self.clock(),))
            transaction.execute(
                "INSERT INTO sessions (token_hash, reviewer_id, csrf, expires_at) VALUES (?, ?, ?, ?)",
                (token_hash(token), rows[0][0], csrf, self.clock() + SESSION_SECONDS))
        return token, csrf

    def session(self, token: str | None) -> tuple[int, str, str] | None:
        """(reviewer id, name, CSRF token) of a live session, else None."""
        if not token:
            return None
        rows = self.database.query(
            "SELECT r.id, r.name, s.csrf FROM sessions s JOIN reviewers r ON r.id = s.reviewer_id "
            "WHERE s.token_hash = ? AND s.expires_at >= ?", (token_hash(token), self.clock()))
        return (int(rows[0][0]), rows[0][1], rows[0][2]) if rows else None

    def sign_out(self, token: str) -> None:
        self.database.execute("DELETE FROM sessions WHERE token_hash = ?", (token_hash(token),))

    # ------------------------------------------------------------ the queue
    def add(self, listing: NewListing) -> int | None:
        """Enqueue a flagged listing; None when it is queued already (same source and id)."""
        probability = float(listing.answer.get("probability", 0.0))
        with self.database.transaction() as transaction:
            if transaction.query("SELECT id FROM listings WHERE source = ? AND source_id = ?",
                                 (listing.source, listing.source_id)):
                return None
            listing_id = transaction.insert(
                "INSERT INTO listings (source, source_id, text, product_name, product_description, model, "
                "model_version, answer, probability, added_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (listing.source, listing.source_id, listing.text, listing.product_name,
                 listing.product_description, listing.model, listing.answer.get("model_version"),
                 json.dumps(listing.answer), probability, self.clock()))
            for position, photo in enumerate(listing.photos):
                transaction.insert("INSERT INTO photos (listing_id, position, data) VALUES (?, ?, ?)",
                                   (listing_id, position, photo))
        return listing_id

    def add_paths(self, paths: list[str]) -> None:
        """The taxonomy's paths a reviewer may pick (every node, not only the leaves)."""
        with self.database.transaction() as transaction:
            known = {row[0] for row in transaction.query("SELECT path FROM taxonomy")}
            for path in sorted(set(paths) - known):
                transaction.execute("INSERT INTO taxonomy (path) VALUES (?)", (path,))

    def paths(self) -> list[str]:
        return [row[0] for row in self.database.query("SELECT path FROM taxonomy ORDER BY path")]

    def counts(self) -> dict[str, int]:
        rows = self.database.query("SELECT status, COUNT(*) FROM listings GROUP BY status")
        return {"open": 0, "decided": 0} | {status: int(count) for status, count in rows}

    def claim_next(self, reviewer_id: int, order: str = "oldest", skipped: int | None = None
                   ) -> QueuedListing | None:
        """The reviewer's listing: the one they hold, else the next open one by `order` (not the
        one they just skipped while others are open), claimed for LEASE_SECONDS; None when
        nothing is left."""
        if order not in ORDERS:
            raise ReviewError(f"order must be one of {', '.join(ORDERS)}")
        now = self.clock()
        held = self.database.query("SELECT id FROM listings WHERE status = 'open' AND claimed_by = ? "
                                   "AND claimed_until >= ? ORDER BY id LIMIT 1", (reviewer_id, now))
        if held:
            return self.listing(int(held[0][0]))
        while True:
            candidates = self.database.query(
                "SELECT id FROM listings WHERE status = 'open' "
                f"AND (claimed_until IS NULL OR claimed_until < ?) ORDER BY {ORDERS[order]} LIMIT 8", (now,))
            if skipped is not None and len(candidates) > 1:
                candidates = [row for row in candidates if row[0] != skipped] + \
                    [row for row in candidates if row[0] == skipped]
            if not candidates:
                return None
            for (listing_id,) in candidates:
                if self._claim(int(listing_id), reviewer_id, now):
                    return self.listing(int(listing_id))

    def _claim(self, listing_id: int, reviewer_id: int, now: float) -> bool:
        """One conditional UPDATE: it succeeds for one reviewer only, whoever asks at once."""
        return self.database.execute(
            "UPDATE listings SET claimed_by = ?, claimed_until = ? WHERE id = ? AND status = 'open' "
            "AND (claimed_until IS NULL OR claimed_until < ?)",
            (reviewer_id, now + LEASE_SECONDS, listing_id, now)) == 1

    def release(self, listing_id: int, reviewer_id: int) -> None:
        """Give a held listing back to the queue (skip)."""
        self.database.execute(
            "UPDATE listings SET claimed_by = NULL, claimed_until = NULL "
            "WHERE id = ? AND claimed_by = ? AND status = 'open'", (listing_id, reviewer_id))

    def listing(self, listing_id: int) -> QueuedListing | None:
        rows = self.database.query(
            "SELECT id, source, source_id, text, product_name, product_description, model, model_version, "
            "answer, probability, status FROM listings WHERE id = ?", (listing_id,))
        if not rows:
            return None
        row = rows[0]
        photos = [int(photo_id) for (photo_id,) in self.database.query(
            "SELECT id FROM photos WHERE listing_id = ? ORDER BY position", (listing_id,))]
        return QueuedListing(int(row[0]), row[1], row[2], row[3], row[4], row[5], row[6], row[7],
                             json.loads(row[8]), float(row[9]), row[10], photos)

    def holder(self, listing_id: int) -> int | None:
        """Who holds a live claim on the listing."""
        rows = self.database.query("SELECT claimed_by FROM listings WHERE id = ? AND status = 'open' "
                                   "AND claimed_until >= ?", (listing_id, self.clock()))
        return int(rows[0][0]) if rows and rows[0][0] is not None else None

    def photo(self, photo_id: int) -> bytes | None:
        rows = self.database.query("SELECT data FROM photos WHERE id = ?", (photo_id,))
        return bytes(rows[0][0]) if rows else None

    def decide(self, listing_id: int, reviewer_id: int, path: str | None) -> None:
        """Accept the model's path (`path` None) or file the listing under `path`, a path of the
        taxonomy; only by the reviewer holding the listing."""
        listing = self.listing(listing_id)
        if listing is None or listing.status != "open":
            raise ReviewError("this listing is not open for review")
        if self.holder(listing_id) != reviewer_id:
            raise ReviewError("this listing is not held by you (claims lapse after "
                              f"{LEASE_SECONDS // 60} minutes): take the next one")
        model_path = " / ".join(level["name"] for level in listing.answer.get("path") or []) \
            or listing.answer.get("category", "")
        if path is not None and path not in set(self.paths()):
            raise ReviewError("pick a category path of the taxonomy")
        chosen = model_path if path is None else path
        accepted = chosen == model_path
        with self.database.transaction() as transaction:
            changed = transaction.execute(
                "UPDATE listings SET status = 'decided', claimed_by = NULL, claimed_until = NULL "
                "WHERE id = ? AND status = 'open' AND claimed_by = ?", (listing_id, reviewer_id))
            if changed != 1:
                raise ReviewError("this listing was decided already")
            transaction.insert(
                "INSERT INTO decisions (listing_id, reviewer_id, decided_at, model_version, accepted, path) "
                "VALUES (?, ?, ?, ?, ?, ?)",
                (listing_id, reviewer_id, self.clock(), listing.model_version, accepted, chosen))

    def decisions(self) -> list[dict]:
        rows = self.database.query(
            "SELECT d.listing_id, r.name, d.decided_at, d.model_version, d.accepted, d.path "
            "FROM decisions d JOIN reviewers r ON r.id = d.reviewer_id ORDER BY d.id")
        return [{"listing_id": int(row[0]), "reviewer": row[1], "decided_at": float(row[2]),
                 "model_version": row[3], "accepted": bool(row[4]), "path": row[5]} for row in rows]
