"""The serving core without any engine, and the TorchServe adapter on top of it."""

from __future__ import annotations

import subprocess
import sys

import pytest

from marketplace_classifier.ops.hostile import ordinary_photo, v1_photos
from marketplace_classifier.serving.core import ListingService, Request, ServingOptions, listing_chunks
from marketplace_classifier.serving.settings import ModelSettings
from tests.helpers import ROOT, FakeContext, handler_dir


@pytest.fixture(scope="module")
def services(artifacts) -> dict[str, ListingService]:
    return {kind: ListingService(artifacts / kind) for kind in ("image", "text", "combined")}


def test_the_core_imports_no_engine():
    code = ("import sys, marketplace_classifier.serving.core; "
            "print(sorted(m for m in ('ts', 'kserve', 'ray') if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT,
                            check=True)
    assert result.stdout.strip() == "[]"


def test_the_core_answers_as_the_torchserve_adapter_does(services, handlers_in_process):
    photos = [ordinary_photo(seed) for seed in range(3)]
    requests = {
        "image": [Request({"body": photos[0]}, "image/jpeg"), Request({"body": v1_photos(photos, 3)},
                                                                       "application/json")],
        "text": [Request({"body": "oak dining table"}, "text/plain"), Request({"body": b""}, "text/plain")],
        "combined": [Request({"body": v1_photos(photos[:2], 2, "ps5 console")}, "application/json"),
                     Request({"body": {"text": "kettle"}}, "application/json")],
    }
    for kind, batch in requests.items():
        answers = services[kind].handle(batch)
        handler = handlers_in_process[kind]
        context = FakeContext(handler_dir(handler), [request.content_type for request in batch])
        bodies = handler.handle([request.fields for request in batch], context)
        assert [answer.body for answer in answers] == bodies
        assert {i: answer.status for i, answer in enumerate(answers) if answer.status != 200} == \
            {i: code for i, (code, _) in context.statuses.items()}
    assert services["text"].handle([Request({"body": b""}, "text/plain")])[0].body["error"] == \
        "empty request body"


def test_refusals_carry_their_status_body_and_headers(services):
    busy = ServingOptions.from_options({"photos_per_request": 2, "photos_per_batch": 2})
    service = services["image"]
    saved, service.options = service.options, busy
    try:
        two, three = v1_photos([ordinary_photo(1)] * 2, 2), v1_photos([ordinary_photo(2)] * 3, 3)
        answers = service.handle([Request({"body": body}, "application/json") for body in (two, two, three)])
    finally:
        service.options = saved
    assert [answer.status for answer in answers] == [200, 503, 413]
    assert answers[1].headers == {"Retry-After": "1"} and answers[1].body["grpc_code"] == "UNAVAILABLE"
    assert answers[2].body["error"].startswith("3 photos in one request")


def test_options_come_from_flat_engine_settings():
    options = ServingOptions.from_options({"max_photos": 4, "rows_per_forward": 8, "photos_per_request": 12,
                                           "minWorkers": 2, "autocast": False})
    assert (options.max_photos, options.rows_per_forward, options.autocast) == (4, 8, False)
    assert options.budget.photos_per_request == 12 and options.budget.photos_per_batch == 64


def test_an_archive_whose_handler_does_not_fit_its_model_is_refused(artifacts):
    from marketplace_classifier.engines.torchserve.image_handler import ImageHandler

    with pytest.raises(ValueError, match="is a text model"):
        ImageHandler().initialize(FakeContext(artifacts / "text"))


def test_headers_a_client_sets_do_not_switch_the_handler_to_explain_or_describe(handlers_in_process):
    handler = handlers_in_process["text"]
    context = FakeContext(handler_dir(handler), ["text/plain"])
    context.request_processor[0].headers |= {"explain": "True", "describe": "True"}
    answer = handler.handle([{"body": b"oak dining table"}], context)[0]
    assert answer["category"] and 0 not in context.statuses


def test_the_core_reads_the_model_kind_from_its_export(services, artifacts):
    for kind, service in services.items():
        assert service.settings == ModelSettings.load(artifacts / kind)
        assert service.needs == {"image": {"image"}, "text": {"text"}, "combined": {"image", "text"}}[kind]


def test_listing_chunks_keep_listings_whole():
    assert listing_chunks([3, 3, 3, 1], 4) == [2, 4]
    assert listing_chunks([9, 1, 1], 4) == [1, 3]
    assert listing_chunks([1, 1], 16) == [2]


def test_the_text_runs_once_per_listing_with_the_answers_it_had_once_per_photo(services, artifacts):
    """The combined export's `listings` (each listing's text once) against forward (the text
    beside every photo), over listings of 1, 3 and 6 photos, split into chunks of whole listings;
    the frozen and fused model the archives serve keeps `listings` too."""
    service = services["combined"]
    assert service.text_once and hasattr(service.model, "listings")
    fused = ServingOptions.from_options({"optimize_for_inference": True})  # as the archives serve it
    served = ListingService(artifacts / "combined", fused)
    assert served.text_once and hasattr(served.model, "listings")
    photos = [ordinary_photo(seed) for seed in range(6)]
    batch = [Request({"body": v1_photos(photos[:count], count, text)}, "application/json")
             for count, text in ((1, "ps5 console"), (3, "oak dining table"), (6, "kettle and toaster"))]
    once = service.handle(batch)
    saved = service.options, service.text_once
    service.options = ServingOptions.from_options({"rows_per_forward": 4})
    chunked = service.handle(batch)
    service.text_once = False  # forward, one text row per photo
    try:
        per_photo = service.handle(batch)
    finally:
        service.options, service.text_once = saved
    for answers in (chunked, per_photo, served.handle(batch)):
        for mine, theirs in zip(once, answers, strict=True):
            (a,), (b,) = mine.body["predictions"], theirs.body["predictions"]
            assert a["photos"] == b["photos"]
            differences = [abs(p - b["probabilities"][name]) for name, p in a["probabilities"].items()]
            assert max(differences) <= 1e-5
