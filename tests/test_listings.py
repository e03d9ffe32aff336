"""One request, one listing: several photos and the text in, one calibrated answer with a review
flag out, in every request format (in process, as a TorchServe worker runs the handler)."""

from __future__ import annotations

import base64

import pytest
import torch

from marketplace_classifier.serving.payloads import DEFAULT_MAX_PHOTOS
from tests.helpers import FakeContext, as_vector, handler_dir, in_process, in_process_path, photo, same_path

COLOURS = [(30, 140, 60), (200, 20, 20), (20, 20, 200), (240, 240, 240), (90, 60, 10), (10, 200, 200),
           (120, 120, 0), (250, 130, 0), (60, 0, 90), (0, 90, 30), (200, 0, 200)]
PHOTOS = [photo(colour, (320 + 16 * i, 240)) for i, colour in enumerate(COLOURS)]
TEXT = "oak dining table with six chairs"
MULTIPART = "multipart/form-data; boundary=x"


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def ask(handler, requests: list[dict], content_type: str = "application/json", grpc: bool = False):
    context = FakeContext(handler_dir(handler), [content_type] * len(requests), grpc=grpc)
    return handler.handle(requests, context), context


def parts(photos: list[bytes], text: str | None = TEXT) -> dict:
    """Multipart parts (or gRPC inputs): image, image_1, image_2, ..."""
    named = {("image" if i == 0 else f"image_{i}"): data for i, data in enumerate(photos)}
    return named | ({"text": text.encode()} if text else {})


@pytest.mark.parametrize("model", ["image", "combined"])
@pytest.mark.parametrize("count", [1, 3, DEFAULT_MAX_PHOTOS])
def test_a_listing_answer_equals_the_torchscript_answer_pooled_over_its_photos(
        handlers_in_process, artifacts, model, count):
    handler = handlers_in_process[model]
    text = TEXT if model == "combined" else None
    (answer,), context = ask(handler, [parts(PHOTOS[:count], text)], MULTIPART)
    assert not context.statuses and answer["photos"] == count
    expected = in_process(artifacts, model, PHOTOS[:count], text)
    assert (as_vector(answer, artifacts, model) - expected).abs().max() <= 1e-4
    assert isinstance(answer["needs_review"], bool)
    assert same_path(answer["path"], in_process_path(artifacts, model, PHOTOS[:count], text))


def test_photo_order_changes_nothing(handlers_in_process):
    handler = handlers_in_process["combined"]
    sent = [PHOTOS[:4], PHOTOS[3::-1], [PHOTOS[2], PHOTOS[0], PHOTOS[3], PHOTOS[1]]]
    answers = [ask(handler, [{"body": {"images": [b64(p) for p in photos], "text": TEXT}}])[0][0]
               for photos in sent]
    assert answers[0] == answers[1] == answers[2]


def test_every_request_format_carries_several_photos(handlers_in_process):
    handler = handlers_in_process["combined"]
    photos = PHOTOS[:3]
    (plain,), _ = ask(handler, [parts(photos)], MULTIPART)
    (grpc,), _ = ask(handler, [parts(photos)], "", grpc=True)
    (as_json,), _ = ask(handler, [{"body": {"images": [b64(p) for p in photos], "text": TEXT}}])
    instances = [{"images": [{"b64": b64(p)} for p in photos], "text": TEXT},
                 {"image": b64(photos[0]), "text": TEXT}]
    (v1,), _ = ask(handler, [{"body": {"instances": instances}}])
    v2_body = {"inputs": [
        {"name": "image", "shape": [2, 3], "datatype": "BYTES", "data": [[b64(p) for p in photos],
                                                                         [b64(photos[0]), "", ""]]},
        {"name": "text", "shape": [2], "datatype": "BYTES", "data": [TEXT, TEXT]}]}
    (v2,), context = ask(handler, [{"body": v2_body}])
    assert not context.statuses
    for answer in (grpc, as_json, v1["predictions"][0]):
        assert answer["probabilities"] == pytest.approx(plain["probabilities"], abs=1e-6)
    outputs = {output["name"]: output for output in v2["outputs"]}
    assert outputs["photos"]["data"] == [3, 1]
    classes = outputs["classes"]["data"]
    assert outputs["probabilities"]["data"][:13] == pytest.approx(
        [plain["probabilities"][name] for name in classes], abs=1e-6)
    assert outputs["probabilities"]["data"][13:] == pytest.approx(
        [v1["predictions"][1]["probabilities"][name] for name in classes], abs=1e-6)


def test_more_photos_than_the_limit_are_refused_naming_it(handlers_in_process):
    handler = handlers_in_process["image"]
    too_many = PHOTOS[:DEFAULT_MAX_PHOTOS + 1]
    for request, content_type in (({"body": {"images": [b64(p) for p in too_many]}}, "application/json"),
                                  (parts(too_many, None), MULTIPART)):
        (answer,), context = ask(handler, [request], content_type)
        assert context.statuses[0][0] == 400
        assert f"at most {DEFAULT_MAX_PHOTOS}" in answer["error"] and "11 photos" in answer["error"]
    body = {"inputs": [{"name": "image", "shape": [1, 11], "datatype": "BYTES",
                        "data": [b64(p) for p in too_many]}]}
    (answer,), context = ask(handler, [{"body": body}])
    assert context.statuses[0][0] == 400 and "P from 1 to 10" in answer["error"]


def test_a_batch_of_listings_with_different_photo_counts_and_one_bad_listing(handlers_in_process, artifacts):
    handler = handlers_in_process["combined"]
    broken = PHOTOS[1][:200]
    listings = [PHOTOS[:1], PHOTOS[1:5], [PHOTOS[0], broken, PHOTOS[2]], PHOTOS[5:7]]
    answers, context = ask(handler, [parts(photos) for photos in listings], MULTIPART)
    assert set(context.statuses) == {2} and context.statuses[2][0] == 400
    assert answers[2]["error"].startswith("photo 2 of 3:")
    for index in (0, 1, 3):
        expected = in_process(artifacts, "combined", listings[index], TEXT)
        assert answers[index]["photos"] == len(listings[index])
        assert (as_vector(answers[index], artifacts, "combined") - expected).abs().max() <= 1e-4


def test_a_combined_listing_without_photos_is_answered_from_its_text(handlers_in_process, artifacts):
    handler = handlers_in_process["combined"]
    answers, context = ask(handler, [{"body": {"text": TEXT}}, parts(PHOTOS[:2])], "application/json")
    assert not context.statuses
    assert answers[0]["answered_from"] == "text only" and answers[0]["photos"] == 0
    assert "answered_from" not in answers[1]
    expected = in_process(artifacts, "combined", None, TEXT)
    assert (as_vector(answers[0], artifacts, "combined") - expected).abs().max() <= 1e-4
    assert same_path(answers[0]["path"], in_process_path(artifacts, "combined", None, TEXT))
    (refused,), context = ask(handlers_in_process["image"], [{"body": {"text": TEXT}}])
    assert context.statuses[0][0] == 400 and "no image" in refused["error"]


def test_the_review_flag_follows_the_threshold_or_the_request(handlers_in_process):
    handler = handlers_in_process["text"]
    threshold = handler.service.settings.review_threshold
    (answer,), _ = ask(handler, [{"body": {"text": TEXT}}])
    assert answer["needs_review"] == (threshold is None or answer["probability"] < threshold)
    (strict, lenient), _ = ask(handler, [{"body": {"text": TEXT, "min_confidence": 1.0}},
                                         {"body": {"text": TEXT, "min_confidence": 0}}])
    assert strict["needs_review"] is (strict["probability"] < 1.0) and lenient["needs_review"] is False
    (bad,), context = ask(handler, [{"body": {"text": TEXT, "min_confidence": "high"}}])
    assert context.statuses[0][0] == 400 and "min_confidence" in bad["error"]


def test_listing_probabilities_pool_log_probabilities():
    from marketplace_classifier.serving.processing import listing_probabilities, pool_photos

    logits = torch.tensor([[2.0, 0.0], [0.0, 2.0], [1.0, 0.0]])
    pooled = pool_photos(logits, torch.tensor([0, 0, 1]), 2)
    assert torch.allclose(pooled[0], torch.log_softmax(logits, 1)[:2].mean(0))
    assert torch.allclose(listing_probabilities(pooled, 2.0)[1], torch.softmax(logits[2] / 2.0, 0))


def test_an_export_without_a_category_tree_answers_one_level_paths(artifacts, tmp_path):
    """Exports made before the category path (no `taxonomy` in preprocessing.json) still serve:
    the same root answer, and a path of one level."""
    import json
    import shutil

    from marketplace_classifier.serving.core import ListingService, Request

    old = tmp_path / "text"
    shutil.copytree(artifacts / "text", old)
    settings = json.loads((old / "preprocessing.json").read_text())
    assert max(len(path.split(" / ")) for path in settings["taxonomy"]["terminals"]) == 3  # the tests' tree
    settings.pop("taxonomy")
    (old / "preprocessing.json").write_text(json.dumps(settings))
    (answer,) = [a.body for a in ListingService(old).handle([Request({"body": {"text": TEXT}},
                                                                     "application/json")])]
    assert [level["name"] for level in answer["path"]] == [answer["category"]]
    assert answer["path"][0]["probability"] == answer["probability"]
    expected = in_process(artifacts, "text", None, TEXT)
    assert (as_vector(answer, artifacts, "text") - expected).abs().max() <= 1e-4
