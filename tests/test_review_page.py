"""The review page (marketplace_classifier/review/app.py) over HTTP and in a real browser:
Playwright driving Debian's chromium signs in, reviews three listings with the keyboard (two
accepted, one filed under another path), sees the queue shrink, and a listing whose text is
hostile markup renders as text with no script run. Screenshots go to $REVIEW_SCREENSHOTS when set
(docs/review-*.png are made so)."""

from __future__ import annotations

import os
import re
import shutil
import threading
import time
from pathlib import Path

import pytest
import requests

from marketplace_classifier.ops import serve
from marketplace_classifier.ops.hostile import ordinary_photo
from marketplace_classifier.review.db import Database
from marketplace_classifier.review.queue import NewListing, ReviewQueue

PASSWORD = "a long password!"
HOSTILE = '<script>window.__xss = 1</script><img src=x onerror="window.__xss = 2"> sofa'
PATHS = ["Home & Garden", "Home & Garden / Sofas", "Home & Garden / Tables", "Toys", "Toys / Lego"]


def answer(probability: float) -> dict:
    words = [{"word": "sofa", "start": 0, "contribution": 0.8}]
    return {"category": "Home & Garden", "probability": probability, "needs_review": True,
            "model_version": "3", "path": [{"name": "Home & Garden", "probability": probability},
                                           {"name": "Sofas", "probability": probability / 2}],
            "explanation": {"text": {"encoder": {"words": words}}}}


@pytest.fixture(scope="module")
def review_app(tmp_path_factory):
    """The page on a free loopback port over a SQLite queue of four listings (the hostile one
    last), with one reviewer."""
    import uvicorn

    from marketplace_classifier.review.app import create_app

    folder = tmp_path_factory.mktemp("review")
    database = Database(f"sqlite:///{folder / 'review.db'}")
    database.migrate()
    queue = ReviewQueue(database)
    queue.add_paths(PATHS)
    queue.add_reviewer("ann", PASSWORD)
    texts = ["sofa, grey, three seats", "sofa bed with storage", "lego castle 6080", HOSTILE]
    for index, text in enumerate(texts):
        queue.add(NewListing("catalogue", f"id{index}", "combined", answer(0.5 - index / 10), text=text,
                             photos=(ordinary_photo(index),)))
        time.sleep(0.01)  # oldest first is their order of arrival
    port = serve.free_port()
    config = uvicorn.Config(create_app(queue), host="127.0.0.1", port=port, log_level="warning")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            requests.get(base + "/sign-in", timeout=2)
            break
        except requests.ConnectionError:
            time.sleep(0.2)
    yield {"base": base, "queue": queue}
    server.should_exit = True
    thread.join(timeout=10)


def signed_in(base: str) -> tuple[requests.Session, str]:
    session = requests.Session()
    session.post(base + "/sign-in", data={"name": "ann", "password": PASSWORD}, timeout=10)
    csrf = re.search(r'name="csrf" value="([^"]+)"', session.get(base + "/", timeout=10).text).group(1)
    return session, csrf


def test_only_a_signed_in_reviewer_with_the_sessions_form_gets_anything(review_app):
    base = review_app["base"]
    for path in ("/", "/listings/1", "/photos/1"):
        response = requests.get(base + path, allow_redirects=False, timeout=10)
        assert response.status_code in (303, 401), path
        assert response.headers["Content-Security-Policy"].startswith("default-src 'none'")
    wrong = requests.post(base + "/sign-in", data={"name": "ann", "password": "not it at all"}, timeout=10)
    assert wrong.status_code == 401 and "Wrong name or password" in wrong.text
    guesses = [requests.post(base + "/sign-in", data={"name": "mallory", "password": f"guess {index}"},
                             timeout=10).status_code for index in range(6)]
    assert guesses == [401] * 5 + [429]  # the name is locked for a while after five failures
    session, csrf = signed_in(base)
    assert "HttpOnly" in requests.post(base + "/sign-in", data={"name": "ann", "password": PASSWORD},
                                       allow_redirects=False, timeout=10).headers["set-cookie"]
    forged = session.post(base + "/next", data={"csrf": "forged", "order": "oldest"}, timeout=10)
    assert forged.status_code == 403 and "not from your session" in forged.text
    stranger = requests.post(base + "/next", data={"csrf": csrf}, allow_redirects=False, timeout=10)
    assert stranger.status_code == 303 and stranger.headers["location"] == "/sign-in"


def test_listing_text_is_escaped_in_the_page(review_app):
    """The hostile listing's markup reaches the page as text (held by ann for the check, then
    given back)."""
    queue = review_app["queue"]
    hostile = next(queue.listing(i) for i in range(1, 5) if queue.listing(i).text == HOSTILE)
    session, _ = signed_in(review_app["base"])
    ann = queue.session(session.cookies.get("review_session"))[0]
    queue.database.execute("UPDATE listings SET claimed_by = ?, claimed_until = ? WHERE id = ?",
                           (ann, time.time() + 60, hostile.id))
    page = session.get(f"{review_app['base']}/listings/{hostile.id}", timeout=10).text
    queue.release(hostile.id, ann)
    assert "<script>window" not in page and "&lt;script&gt;window.__xss = 1&lt;/script&gt;" in page
    assert "<img src=x" not in page


def chromium() -> str:
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if found is None:
        pytest.skip("Debian's chromium is not installed (make test installs it as root)")
    return found


@pytest.mark.serving
def test_a_reviewer_works_through_the_queue_with_the_keyboard_in_chromium(review_app):
    playwright = pytest.importorskip("playwright.sync_api")
    base, queue = review_app["base"], review_app["queue"]
    shots = Path(os.environ["REVIEW_SCREENSHOTS"]) if os.environ.get("REVIEW_SCREENSHOTS") else None
    dialogs: list[str] = []
    with playwright.sync_playwright() as driver:
        browser = driver.chromium.launch(executable_path=chromium(), args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": 1200, "height": 800})
        page.on("dialog", lambda dialog: (dialogs.append(dialog.message), dialog.dismiss()))
        page.goto(base + "/")
        page.fill("#name", "ann")
        page.fill("#password", PASSWORD)
        page.click("#sign-in-button")
        assert page.inner_text("#open-count") == "4"
        if shots:
            page.screenshot(path=str(shots / "review-queue.png"))
        page.keyboard.press("Enter")  # start, oldest first
        page.wait_for_url(re.compile(r"/listings/\d+"))
        if shots:
            page.screenshot(path=str(shots / "review-listing.png"), full_page=True)
        for _ in range(2):
            current = page.url
            page.keyboard.press("a")  # accept the model's path
            page.wait_for_url(lambda url, seen=current: url != seen)
        assert "lego castle" in page.inner_text("#listing-text")
        page.keyboard.press("c")
        page.keyboard.type("Toys / Lego")
        current = page.url
        page.keyboard.press("Enter")
        page.wait_for_url(lambda url: url != current)
        assert page.inner_text("#open-count") == "1"  # the queue shrank to the hostile listing
        text = page.inner_text("#listing-text")
        assert "<script>window.__xss = 1</script>" in text and "onerror" in text
        assert page.evaluate("window.__xss") is None and dialogs == []
        assert page.locator("script").count() == 1  # ours only, from /static
        if shots:
            page.screenshot(path=str(shots / "review-hostile.png"), full_page=True)
        page.goto(base + "/")
        assert page.inner_text("#decided-count") == "3"
        browser.close()
    decisions = queue.decisions()
    assert [decision["accepted"] for decision in decisions] == [True, True, False]
    assert decisions[2]["path"] == "Toys / Lego" and {d["reviewer"] for d in decisions} == {"ann"}
