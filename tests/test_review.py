"""The review queue (marketplace_classifier/review/) on SQLite and on a real PostgreSQL (Debian's
server, started by the test): the same migrations and queue behaviour on both; flagged
listings ingested from bulk scoring with their explanation; decisions exported as a marketplace
export that cleaning reads."""

from __future__ import annotations

import json
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest

from marketplace_classifier.ops.hostile import ordinary_photo
from marketplace_classifier.review.db import MIGRATIONS, Database
from marketplace_classifier.review.queue import (
    FAILURE_WINDOW_SECONDS,
    FAILURES_ALLOWED,
    LEASE_SECONDS,
    NewListing,
    ReviewError,
    ReviewQueue,
    TooManyFailures,
)
from tests.postgres import postgres_binaries, running_postgres

ANSWER = {"category": "Home & Garden", "probability": 0.41, "needs_review": True, "model_version": "7",
          "path": [{"name": "Home & Garden", "probability": 0.41}, {"name": "Sofas", "probability": 0.2}]}
PHOTOS = [ordinary_photo(index) for index in range(6)]
PATHS = ["Home & Garden", "Home & Garden / Sofas", "Home & Garden / Tables", "Toys"]


@pytest.fixture(scope="session")
def postgres_url():
    if postgres_binaries() is None:
        pytest.skip("PostgreSQL is not installed (Debian's postgresql; make test installs it as root)")
    with running_postgres() as url:
        yield url


class Clock:
    def __init__(self):
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture(params=["sqlite", "postgresql"])
def database(request, tmp_path) -> Database:
    if request.param == "sqlite":
        database = Database(f"sqlite:///{tmp_path / 'review.db'}")
    else:
        url = request.getfixturevalue("postgres_url")
        database = Database(url)
        database.migrate()
        with database.transaction() as transaction:  # each test starts from an empty schema
            for table in ("decisions", "photos", "listings", "sessions", "reviewers", "taxonomy",
                          "sign_in_failures", "schema_migrations"):
                transaction.execute(f"DROP TABLE IF EXISTS {table}")
    yield database
    database.close()


def queue_with(database: Database, listings: int = 3, clock: Clock | None = None) -> ReviewQueue:
    database.migrate()
    queue = ReviewQueue(database, clock or Clock())
    queue.add_paths(PATHS)
    for index in range(listings):
        answer = ANSWER | {"probability": 0.5 - index / 10}
        queue.add(NewListing("catalogue", f"id{index}", "combined", answer, text=f"listing {index}",
                             photos=(PHOTOS[index],)))
    return queue


def test_migrations_apply_once_and_record_their_version(database):
    assert database.migrate() == [version for version, _, _ in MIGRATIONS]
    assert database.migrate() == []
    assert database.version() == MIGRATIONS[-1][0]


def test_a_listing_is_queued_once_and_claimed_by_one_reviewer_at_a_time(database):
    clock = Clock()
    queue = queue_with(database, 3, clock)
    assert queue.add(NewListing("catalogue", "id0", "combined", ANSWER, text="again")) is None
    first, second = (queue.add_reviewer(name, "a long password!") for name in ("ann", "bob"))
    claimed = [queue.claim_next(first), queue.claim_next(second)]
    assert claimed[0].source_id == "id0" and claimed[1].source_id == "id1"  # oldest first
    assert queue.claim_next(first).id == claimed[0].id  # what you hold, until you decide
    least = queue.claim_next(queue.add_reviewer("cy", "a long password!"), order="least_confident")
    assert least.source_id == "id2"
    with pytest.raises(ReviewError, match="not held by you"):
        queue.decide(claimed[0].id, second, None)
    clock.now += LEASE_SECONDS + 1  # ann's claim lapses: bob may take it
    assert queue.claim_next(second).id in (claimed[0].id, claimed[1].id)


def test_concurrent_claims_never_share_a_listing(database):
    queue = queue_with(database, 6)
    reviewers = [queue.add_reviewer(f"r{index}", "a long password!") for index in range(6)]
    start = threading.Barrier(len(reviewers))

    def claim(reviewer: int) -> int:
        start.wait()
        return queue.claim_next(reviewer).id

    with ThreadPoolExecutor(len(reviewers)) as pool:
        claimed = list(pool.map(claim, reviewers))
    assert len(set(claimed)) == len(reviewers)


def test_a_decision_is_stored_with_reviewer_time_and_version_and_checked(database):
    clock = Clock()
    queue = queue_with(database, 2, clock)
    ann = queue.add_reviewer("ann", "a long password!")
    first = queue.claim_next(ann)
    with pytest.raises(ReviewError, match="pick a category path"):
        queue.decide(first.id, ann, "Home & Garden / <script>")
    queue.decide(first.id, ann, "Home & Garden / Tables")
    second = queue.claim_next(ann)
    queue.decide(second.id, ann, None)
    with pytest.raises(ReviewError, match="not open"):
        queue.decide(second.id, ann, None)
    assert queue.decisions() == [
        {"listing_id": first.id, "reviewer": "ann", "decided_at": clock.now, "model_version": "7",
         "accepted": False, "path": "Home & Garden / Tables"},
        {"listing_id": second.id, "reviewer": "ann", "decided_at": clock.now, "model_version": "7",
         "accepted": True, "path": "Home & Garden / Sofas"}]
    assert queue.counts() == {"open": 0, "decided": 2} and queue.claim_next(ann) is None


def test_sign_in_sessions_and_passwords(database):
    clock = Clock()
    queue = queue_with(database, 0, clock)
    with pytest.raises(ReviewError, match="at least 12"):
        queue.add_reviewer("ann", "short")
    ann = queue.add_reviewer("ann", "a long password!")
    assert queue.sign_in("ann", "wrong password!!") is None and queue.sign_in("nobody", "x") is None
    token, csrf = queue.sign_in("ann", "a long password!")
    assert queue.session(token) == (ann, "ann", csrf)
    stored = database.query("SELECT password_hash FROM reviewers")[0][0]
    assert "a long password!" not in stored and stored.startswith("scrypt$")
    assert database.query("SELECT COUNT(*) FROM sessions WHERE token_hash = ?", (token,))[0][0] == 0
    clock.now += 9 * 3600
    assert queue.session(token) is None
    queue.sign_out(token)


def test_failed_sign_ins_lock_a_name_for_a_while(database):
    clock = Clock()
    queue = queue_with(database, 0, clock)
    queue.add_reviewer("ann", "a long password!")
    for _ in range(FAILURES_ALLOWED):
        assert queue.sign_in("ann", "not the password") is None
    with pytest.raises(TooManyFailures, match="try again in 15 minutes"):
        queue.sign_in("ann", "a long password!")  # the right password too: guessing learns nothing
    assert queue.sign_in("bob", "any password at all") is None  # another name is not locked
    clock.now += FAILURE_WINDOW_SECONDS + 1
    assert queue.sign_in("ann", "a long password!") is not None


def test_decisions_export_as_a_marketplace_export_that_cleaning_reads(database, tmp_path):
    from marketplace_classifier.review.corrections import export_decisions
    from marketplace_classifier.training.cleaning import read_raw_images, read_raw_products

    queue = queue_with(database, 2)
    ann = queue.add_reviewer("ann", "a long password!")
    queue.decide(queue.claim_next(ann).id, ann, "Toys")
    assert export_decisions(queue, tmp_path / "reviewed") == 1
    read = read_raw_products(tmp_path / "reviewed" / "Products.csv")
    images = read_raw_images(tmp_path / "reviewed" / "Images.csv")
    assert list(read["category"]) == ["Toys"] and list(read["id"]) == ["id0"]
    assert list(images["product_id"]) == ["id0"]
    photo = tmp_path / "reviewed" / "images" / f"{images['id'].iloc[0]}.jpg"
    assert photo.read_bytes() == PHOTOS[0]
    with pytest.raises(ReviewError, match="not empty"):
        export_decisions(queue, tmp_path / "reviewed")


def test_flagged_listings_are_ingested_once_with_their_explanation(artifacts, raw_sample, tmp_path):
    """Bulk scoring of the sample export, then its flagged rows into the queue, answered again
    by the exported model with an explanation."""
    from marketplace_classifier.benchmarks.bulk_bench import subset_export
    from marketplace_classifier.ops.bulk import BulkRun, InProcessScorer
    from marketplace_classifier.review.ingest import Ingester, taxonomy_paths

    export = subset_export(raw_sample[0], 40, tmp_path / "export")
    scores = tmp_path / "scores.jsonl"
    BulkRun(export, scores, "combined", InProcessScorer(artifacts / "combined"), 16, 1, progress=False).run()
    flagged = [json.loads(line) for line in scores.open() if json.loads(line)["needs_review"]]
    assert flagged, "the sample's scores flag some listings"
    queue = ReviewQueue(Database(f"sqlite:///{tmp_path / 'review.db'}"))
    queue.database.migrate()
    ingester = Ingester(queue, artifacts / "combined", "catalogue")
    counts = ingester.from_scores(scores, export)
    assert counts["added"] == counts["flagged"] == len(flagged) and counts["missing"] == 0
    assert ingester.from_scores(scores, export)["added"] == 0
    assert set(taxonomy_paths(artifacts / "combined")) == set(queue.paths())
    listing = queue.listing(1)
    assert listing.answer["explanation"]["text"]["lexical"]["terms"]
    assert listing.answer["path"] and listing.photo_ids and listing.model_version


def test_reviewed_listings_join_the_training_split_only(clean_sample, tmp_path):
    """A reviewed listing the data holds out (validation or test) is left out; one it trains on
    takes the reviewer's path; a new one joins the training split with its photo."""
    from marketplace_classifier.review.corrections import export_decisions
    from marketplace_classifier.training.cleaning import clean
    from marketplace_classifier.training.data import CleanData

    base = CleanData.load(clean_sample[0])
    held_out = base.products[base.products["split"] == "val"].iloc[0]
    trained = base.products[base.products["split"] == "train"].iloc[0]
    other_path = next(path for path in base.products["category"]
                      if path.split(" / ")[0] != trained["root_category"])
    photo_id = base.images[base.images["product_id"] == trained["id"]]["id"].iloc[0]
    photo = base.image_path(photo_id).read_bytes()
    queue = queue_with(Database(f"sqlite:///{tmp_path / 'review.db'}"), 0)
    queue.add_paths([held_out["category"], other_path, trained["category"]])
    ann = queue.add_reviewer("ann", "a long password!")
    for source_id, row, path in ((held_out["id"], held_out, held_out["category"]),
                                 (trained["id"], trained, other_path),
                                 ("new-listing", trained, trained["category"])):
        queue.add(NewListing("catalogue", source_id, "combined", ANSWER, product_name=row["product_name"],
                             product_description=row["product_description"], photos=(photo,)))
        queue.decide(queue.claim_next(ann).id, ann, path)
    export_decisions(queue, tmp_path / "reviewed")
    clean(tmp_path / "reviewed", tmp_path / "reviewed-clean", size=base.image_size, workers=1)
    data = CleanData.load(clean_sample[0], tmp_path / "reviewed-clean")
    assert data.reviewed == {"added": 1, "corrected": 1, "left_out_held_out": 1, "left_out_unknown_root": 0}
    by_id = data.products.set_index("id")
    assert by_id.loc["new-listing", "split"] == "train" and by_id.loc[trained["id"], "category"] == other_path
    assert by_id.loc[held_out["id"], "category"] == held_out["category"]
    assert (data.products["split"] != "train").sum() == (base.products["split"] != "train").sum()
    new_photos = data.images[data.images["product_id"] == "new-listing"]["id"]
    assert len(new_photos) == 1 and data.image_path(new_photos.iloc[0]).is_file()
    assert "reviewed-clean" in str(data.image_path(new_photos.iloc[0]))


def test_flagged_lines_of_the_request_log_are_ingested(artifacts, tmp_path):
    """The request log keeps text and photo digests: a text model's flagged answers are
    enqueued (explained again from their text), its unflagged ones are not."""
    from marketplace_classifier.review.ingest import Ingester
    from marketplace_classifier.serving.payloads import Listing as ServedListing
    from marketplace_classifier.serving.request_log import RequestLog

    log = RequestLog(tmp_path / "log", 1.0, 2**20, "text", "1")
    log.record(ServedListing(text="kettle, boxed"), {"category": "Home & Garden", "probability": 0.4,
                                                     "needs_review": True})
    log.record(ServedListing(text="oak table"), {"category": "Home & Garden", "probability": 0.99,
                                                 "needs_review": False})
    queue = ReviewQueue(Database(f"sqlite:///{tmp_path / 'review.db'}"))
    queue.database.migrate()
    counts = Ingester(queue, artifacts / "text", "requests").from_request_log(tmp_path / "log")
    assert counts == {"flagged": 1, "added": 1, "queued_already": 0, "without_photos": 0}
    listing = queue.listing(1)
    assert listing.text == "kettle, boxed" and listing.answer["explanation"]["text"]["lexical"]["terms"]
