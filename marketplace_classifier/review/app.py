"""The review page: FastAPI with server-rendered Jinja2 pages (no front-end build, no script but
one static file of keyboard shortcuts), on 127.0.0.1 by default.

Listing text is hostile input. Jinja2 escapes every value; the text's highlighted words are
built as escaped segments, never as markup from the text; the Content-Security-Policy allows
scripts and styles from this origin only (no inline script, no inline style), images from this
origin only. Every form carries the session's CSRF token and every POST checks it; the session
cookie is HttpOnly and SameSite=Strict; only signed-in reviewers see anything but the sign-in.
"""

from __future__ import annotations

import hmac
from pathlib import Path
from urllib.parse import quote

from fastapi import FastAPI, Form, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from fastapi.staticfiles import StaticFiles
from fastapi.templating import Jinja2Templates

from marketplace_classifier.review.queue import ORDERS, ReviewError, ReviewQueue, TooManyFailures

HERE = Path(__file__).parent
COOKIE = "review_session"
SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; "
                               "form-action 'self'; frame-ancestors 'none'; base-uri 'none'",
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}
PHOTO_TYPES = {b"\xff\xd8\xff": "image/jpeg", b"\x89PNG": "image/png", b"GIF8": "image/gif",
               b"RIFF": "image/webp"}
TOP_WORDS = 5


def highlighted(text: str, explanation: dict | None) -> list[tuple[str, str]]:
    """The text as (segment, class) pairs: the words the explanation weighed most marked `for`
    or `against` the answer, the rest plain. The template escapes every segment."""
    words = (((explanation or {}).get("text") or {}).get("encoder") or {}).get("words") or []
    lexical = (((explanation or {}).get("text") or {}).get("lexical") or {}).get("terms") or []
    weights = {term["term"]: term["contribution"] for term in lexical}
    marks: dict[int, tuple[int, str]] = {}

    def weight(word: dict) -> float:  # the encoder's occlusion and the word's exact lexical part
        return word["contribution"] + weights.get(word["word"].lower(), 0.0)

    for word in sorted(words, key=lambda word: abs(weight(word)), reverse=True)[:TOP_WORDS]:
        start = int(word["start"])
        if start >= 0 and text[start:start + len(word["word"])] == word["word"]:
            marks[start] = (start + len(word["word"]), "for" if weight(word) >= 0 else "against")
    segments, position = [], 0
    for start in sorted(marks):
        end, kind = marks[start]
        if start < position:
            continue
        segments += [(text[position:start], ""), (text[start:end], kind)]
        position = end
    segments.append((text[position:], ""))
    return [(segment, kind) for segment, kind in segments if segment]


def photo_type(data: bytes) -> str | None:
    return next((media for signature, media in PHOTO_TYPES.items() if data.startswith(signature)), None)


def create_app(queue: ReviewQueue) -> FastAPI:
    """The review web app over `queue`."""
    app = FastAPI(title="marketplace-classifier review", docs_url=None, redoc_url=None, openapi_url=None)
    templates = Jinja2Templates(directory=str(HERE / "templates"))
    app.mount("/static", StaticFiles(directory=str(HERE / "static")), name="static")

    @app.middleware("http")
    async def security_headers(request: Request, call_next):
        response = await call_next(request)
        response.headers.update(SECURITY_HEADERS)
        return response

    def reviewer(request: Request):
        return queue.session(request.cookies.get(COOKIE))

    def page(request: Request, name: str, status: int = 200, **context) -> HTMLResponse:
        return templates.TemplateResponse(request, name, context, status_code=status)

    def to_sign_in() -> RedirectResponse:
        return RedirectResponse("/sign-in", status_code=303)

    def checked(request: Request, csrf: str):
        """The signed-in reviewer if the form's CSRF token is the session's, else None."""
        session = reviewer(request)
        if session is None or not hmac.compare_digest(session[2].encode(), (csrf or "").encode()):
            return None
        return session

    def refused(request: Request) -> Response:
        """Not signed in: to the sign-in page; signed in but the form's token is not the
        session's (a forged or stale form): 403."""
        session = reviewer(request)
        if session is None:
            return to_sign_in()
        return page(request, "gone.html", status=403, reviewer=session[1], csrf=session[2],
                    message="This form is not from your session: reload the page and try again.")

    def listing_page(request: Request, session, listing_id: int, order: str, status: int = 200,
                     error: str | None = None) -> Response:
        """A listing the reviewer holds, with its marked text and the taxonomy to pick from;
        409 when it is not theirs (decided, held by another, or their claim lapsed)."""
        listing = queue.listing(listing_id)
        if listing is None or queue.holder(listing_id) != session[0]:
            return page(request, "gone.html", status=409, reviewer=session[1], csrf=session[2])
        explanation = listing.answer.get("explanation")
        return page(request, "listing.html", status=status, reviewer=session[1], csrf=session[2],
                    listing=listing, segments=highlighted(listing.shown_text, explanation),
                    explanation=explanation or {}, paths=queue.paths(),
                    order=order if order in ORDERS else "oldest", counts=queue.counts(), error=error)

    @app.get("/sign-in", response_class=HTMLResponse)
    def sign_in_page(request: Request):
        return page(request, "sign_in.html", error=None)

    @app.post("/sign-in")
    def sign_in(request: Request, name: str = Form(""), password: str = Form("")):
        try:
            session = queue.sign_in(name[:100], password[:1000])
        except TooManyFailures as error:
            return page(request, "sign_in.html", status=429, error=str(error).capitalize() + ".")
        if session is None:
            return page(request, "sign_in.html", status=401, error="Wrong name or password.")
        response = RedirectResponse("/", status_code=303)
        response.set_cookie(COOKIE, session[0], httponly=True, samesite="strict", path="/")
        return response

    @app.post("/sign-out")
    def sign_out(request: Request, csrf: str = Form("")):
        if checked(request, csrf) is not None:
            queue.sign_out(request.cookies.get(COOKIE, ""))
        response = to_sign_in()
        response.delete_cookie(COOKIE, path="/")
        return response

    @app.get("/", response_class=HTMLResponse)
    def home(request: Request):
        session = reviewer(request)
        if session is None:
            return to_sign_in()
        return page(request, "queue.html", reviewer=session[1], csrf=session[2], counts=queue.counts(),
                    orders=list(ORDERS))

    @app.post("/next")
    def next_listing(request: Request, csrf: str = Form(""), order: str = Form("oldest")):
        session = checked(request, csrf)
        if session is None:
            return refused(request)
        listing = queue.claim_next(session[0], order if order in ORDERS else "oldest")
        if listing is None:
            return RedirectResponse("/", status_code=303)
        return RedirectResponse(f"/listings/{listing.id}?order={quote(order)}", status_code=303)

    @app.get("/listings/{listing_id}", response_class=HTMLResponse)
    def show(request: Request, listing_id: int, order: str = "oldest"):
        session = reviewer(request)
        if session is None:
            return to_sign_in()
        return listing_page(request, session, listing_id, order)

    @app.post("/listings/{listing_id}")
    def decide(request: Request, listing_id: int, csrf: str = Form(""), action: str = Form(""),
               path: str = Form(""), order: str = Form("oldest")):
        session = checked(request, csrf)
        if session is None:
            return refused(request)
        try:
            if action == "skip":
                queue.release(listing_id, session[0])
            else:
                queue.decide(listing_id, session[0], None if action == "accept" else path.strip()[:500])
        except ReviewError as error:
            return listing_page(request, session, listing_id, order, status=400, error=str(error))
        following = queue.claim_next(session[0], order if order in ORDERS else "oldest",
                                     skipped=listing_id if action == "skip" else None)
        if following is None:
            return RedirectResponse("/", status_code=303)
        return RedirectResponse(f"/listings/{following.id}?order={quote(order)}", status_code=303)

    @app.get("/photos/{photo_id}")
    def photo(request: Request, photo_id: int):
        if reviewer(request) is None:
            return Response(status_code=401)
        data = queue.photo(photo_id)
        media = photo_type(data) if data else None
        if media is None:
            return Response(status_code=404)
        return Response(data, media_type=media)

    return app
