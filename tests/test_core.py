"""The serving core without any engine, and the TorchServe adapter on top of it."""

from __future__ import annotations

import subprocess
import sys

import pytest

from scripts.hostile import ordinary_photo, v1_photos
from serving.core import ListingService, Request, ServingOptions
from serving.settings import ModelSettings
from tests.helpers import ROOT, FakeContext, handler_dir


@pytest.fixture(scope="module")
def services(artifacts) -> dict[str, ListingService]:
    return {kind: ListingService(artifacts / kind) for kind in ("image", "text", "combined")}


def test_the_core_imports_no_engine():
    code = "import sys, serving.core; print(sorted(m for m in ('ts', 'kserve', 'ray') if m in sys.modules))"
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
    from handlers.image_handler import ImageHandler

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
