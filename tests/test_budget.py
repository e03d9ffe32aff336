"""Round 2 of the outside test, in process: the work budget, photo formats and scans, and the
client errors that used to be 500s. Each test fails on the code before the budget."""

from __future__ import annotations

import base64
import io
import json
from dataclasses import replace

import pytest
from PIL import Image

from marketplace_classifier.ops.hostile import (
    encoded,
    lossless_webp,
    nested_b64,
    ordinary_photo,
    other_formats,
    progressive_jpeg,
    triggers,
    v1_photos,
)
from marketplace_classifier.serving.budget import Cost, WorkBudget, admit, check_request
from marketplace_classifier.serving.payloads import parse_request
from marketplace_classifier.serving.processing import (
    InputError,
    OverBudget,
    decode_image,
    jpeg_scans,
    open_photo,
)
from marketplace_classifier.serving.protocols import read_request
from tests.helpers import FakeContext, handler_dir

TEXT, IMAGE = frozenset({"text"}), frozenset({"image"})
SMALL = WorkBudget(photos_per_request=4, pixels_per_request=2_000_000, photos_per_batch=6,
                   pixels_per_batch=3_000_000, scans_per_photo=12)


# ---------------------------------------------------------------- the budget itself
def test_a_request_over_budget_is_refused_naming_the_budget():
    check_request(Cost(4, 2_000_000), SMALL)
    with pytest.raises(OverBudget, match="5 photos in one request; the work budget is 4 photos"):
        check_request(Cost(5, 10), SMALL)
    with pytest.raises(OverBudget, match="2.5 million pixels .* budget is 2 million per request"):
        check_request(Cost(1, 2_500_000), SMALL)
    assert OverBudget.status == 413


def test_a_batch_admits_its_cheapest_requests_first():
    costs = [Cost(4, 100), Cost(1, 100), Cost(4, 100), Cost(0, 0), Cost(2, 2_000_000)]
    # 0 + 1 + 2 photos fit (3 of 6, 2 M pixels of 3 M); then neither 4-photo request does
    assert admit(costs, SMALL) == [False, True, False, True, True]
    assert admit([Cost(4, 100), Cost(2, 2_999_990), Cost(1, 100)], SMALL) == [True, False, True]


@pytest.mark.parametrize("options", [{"photos_per_request": 0}, {"pixels_per_request": "many"},
                                     {"photos_per_batch": 3, "photos_per_request": 4}])
def test_a_budget_that_admits_nothing_is_refused(options):
    with pytest.raises(ValueError):
        WorkBudget.from_options(options)


def test_the_archive_config_carries_the_budget():
    from marketplace_classifier.serving.config import MODEL_CONFIG

    assert WorkBudget.from_options(MODEL_CONFIG["handler"]) == WorkBudget()


# ---------------------------------------------------------------- photos: scans and formats
def test_jpeg_scans_are_counted_before_decoding():
    assert jpeg_scans(encoded(Image.new("RGB", (64, 64)), "JPEG")) == 1
    assert jpeg_scans(encoded(Image.new("RGB", (64, 64)), "JPEG", progressive=True)) == 10
    repeated = progressive_jpeg((2000, 2000), 500)
    assert jpeg_scans(repeated) == 510
    with pytest.raises(InputError, match="a JPEG of 510 scans; at most 32"):
        open_photo(repeated, max_scans=32)
    assert open_photo(progressive_jpeg((200, 200), 20), max_scans=32).size == (200, 200)


@pytest.mark.parametrize("fmt", sorted(other_formats()))
def test_formats_no_marketplace_photo_comes_in_are_refused_by_name(fmt):
    data = other_formats()[fmt]
    if fmt not in ("PSD", "EPS"):  # Pillow itself would have read these
        Image.open(io.BytesIO(data)).load()
    name = {"PPM": "Netpbm", "IM": "IM image", "EPS": "PostScript", "PSD": "Photoshop",
            "ICO": "Windows icon"}.get(fmt, fmt)
    with pytest.raises(InputError, match=f"{name}.*not a photo; send JPEG, PNG, WebP or GIF"):
        decode_image(data)


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "WEBP", "GIF"])
def test_the_photo_formats_still_decode(fmt):
    assert decode_image(encoded(Image.new("RGB", (40, 30), (9, 99, 199)), fmt)).size == (40, 30)


def test_the_pixel_cap_is_read_from_the_header_of_a_tiny_webp():
    data = lossless_webp(7070)
    assert len(data) < 5000
    assert open_photo(data).size == (7070, 7070)  # header only: nothing decoded yet
    with pytest.raises(InputError, match="7070x7070 pixels"):
        open_photo(data, max_pixels=10_000_000)


# ---------------------------------------------------------------- client errors, not 500s
def test_text_plain_is_text_even_when_it_looks_like_json():
    for title in ("[NEW] PS5 console two pads", "{boxed} oak table"):
        assert parse_request({"body": title}, "text/plain", TEXT, 13).text == title
        assert parse_request({"body": title.encode()}, "text/plain; charset=utf-8", TEXT, 13).text == title
    with pytest.raises(InputError, match="not valid JSON"):
        parse_request({"body": b"[NEW] PS5"}, "application/json", TEXT, 13)
    assert parse_request({"body": b'{"text": "sofa"}'}, None, TEXT, 13).text == "sofa"  # no type: sniffed


@pytest.mark.parametrize("name", [n for n in triggers() if n.startswith("5,000-digit")])
def test_integers_of_thousands_of_digits_are_a_400(name):
    trigger = triggers()[name]
    with pytest.raises(InputError, match="number in it is too long"):
        read_request({"body": trigger.body}, trigger.content_type, TEXT, 13)


def test_deeply_nested_values_are_a_400_not_a_recursion_error():
    with pytest.raises(InputError, match="b64|nested too deeply"):  # the JSON decoder's depth varies
        read_request({"body": nested_b64(985)}, "application/json", IMAGE, 13)
    with pytest.raises(InputError, match="b64"):
        read_request({"body": {"instances": [{"image": {"b64": {"b64": {"b64": "QUJD"}}}}]}},
                     "application/json", IMAGE, 13)
    deep: object = "text"
    for _ in range(5000):
        deep = [deep]
    body = {"inputs": [{"name": deep, "shape": [1], "datatype": "BYTES", "data": ["a"]}]}
    with pytest.raises(InputError, match="nested too deeply|unknown input"):
        read_request({"body": body}, "application/json", TEXT, 13)


def test_inputs_beside_the_body_are_refused_not_preferred():
    with pytest.raises(InputError, match="query string"):
        parse_request({"body": b"PS5 console", "text": b"Oak sofa"}, "text/plain", TEXT, 13)


# ---------------------------------------------------------------- the handler keeps its batch
def handle(handler, bodies: list[bytes], budget: WorkBudget | None = None) -> tuple[list, FakeContext]:
    context = FakeContext(handler_dir(handler), ["application/json"] * len(bodies))
    saved = handler.service.options
    handler.service.options = replace(saved, budget=budget or saved.budget)
    try:
        return handler.handle([{"body": body} for body in bodies], context), context
    finally:
        handler.service.options = saved


def test_requests_over_budget_get_413_and_their_batch_mates_are_answered(handlers_in_process):
    handler = handlers_in_process["image"]
    good = v1_photos([ordinary_photo(1)], 1)
    too_many = v1_photos([ordinary_photo(2)] * 5, 5)
    too_big = v1_photos([lossless_webp(1500)], 1)  # 2.25 M pixels
    scans = v1_photos([progressive_jpeg((300, 300), 20)], 1)
    answers, context = handle(handler, [too_many, good, too_big, scans], SMALL)
    assert "predictions" in answers[1] and 1 not in context.statuses
    assert context.statuses[0][0] == 413 and "5 photos in one request" in answers[0]["error"]
    assert context.statuses[2][0] == 413 and "million pixels" in answers[2]["error"]
    assert context.statuses[3][0] == 400 and "30 scans" in answers[3]["error"]


def test_a_batch_over_budget_refuses_its_dearest_requests_with_503(handlers_in_process):
    handler = handlers_in_process["image"]
    four = v1_photos([ordinary_photo(3)] * 4, 4)
    one = v1_photos([ordinary_photo(4)], 1)
    answers, context = handle(handler, [four, one, four, one], SMALL)
    assert [index for index in range(4) if index in context.statuses] == [2]  # 4 + 1 + 1 fit, not 4 more
    assert context.statuses[2][0] == 503 and "retry" in answers[2]["error"]
    assert answers[2]["grpc_code"] == "UNAVAILABLE"
    assert len(answers[0]["predictions"]) == 1 and len(answers[1]["predictions"]) == 1


def test_the_answer_does_not_depend_on_the_chunk_size(handlers_in_process):
    handler = handlers_in_process["combined"]
    body = json.dumps({"instances": [{"images": [base64.b64encode(ordinary_photo(i)).decode()
                                                  for i in range(5)], "text": "oak table"}] * 3}).encode()
    whole, _ = handle(handler, [body])
    saved = handler.service.options
    handler.service.options = replace(saved, rows_per_forward=2)
    try:
        chunked, _ = handle(handler, [body])
    finally:
        handler.service.options = saved
    for a, b in zip(whole[0]["predictions"], chunked[0]["predictions"], strict=True):
        assert a["category"] == b["category"]
        assert max(abs(a["probabilities"][k] - b["probabilities"][k]) for k in a["probabilities"]) < 1e-5


class RecordingService:
    """What CostBatcher needs of a ListingService: its budget, and answers for the requests it
    reads, runs and refuses (each answer names its request)."""

    def __init__(self, costs: dict[str, Cost], budget: WorkBudget):
        from marketplace_classifier.serving.core import Answer

        self.costs, self.budget, self.batches, self.answer_type = costs, budget, [], Answer

    def read_one(self, request):
        from marketplace_classifier.serving.protocols import PLAIN, Envelope

        return Envelope(PLAIN, request_id=request.fields["body"], cost=self.costs[request.fields["body"]])

    def refuse(self, error):
        from marketplace_classifier.serving.core import ListingService

        return ListingService.refusal(error)

    def prepare_read(self, envelopes):
        self.batches.append([envelope.request_id for envelope in envelopes])
        return envelopes

    def predict(self, envelopes):
        return envelopes

    def answer(self, envelopes):
        return [self.answer_type(200, {"request": envelope.request_id}) for envelope in envelopes]


def test_the_cost_batcher_runs_the_cheapest_first_and_refuses_what_does_not_fit_at_once():
    import asyncio

    from marketplace_classifier.serving.admission import CostBatcher
    from marketplace_classifier.serving.core import Request

    budget = WorkBudget(photos_per_request=32, photos_per_batch=64)
    costs = {f"heavy{i}": Cost(32, 90_000_000) for i in range(4)} | {"ordinary": Cost(1, 500_000)}
    service = RecordingService(costs, budget)
    batcher = CostBatcher(service, max_batch_size=4, batch_wait_s=0.5)  # room for all five to arrive

    async def together():
        names = [f"heavy{i}" for i in range(4)] + ["ordinary"]
        return await asyncio.gather(*(batcher.submit(Request({"body": name})) for name in names))

    answers = dict(zip([f"heavy{i}" for i in range(4)] + ["ordinary"], asyncio.run(together()), strict=True))
    assert answers["ordinary"].status == 200
    assert service.batches[0][0] == "ordinary"  # the cheapest first, in the first batch
    assert len(service.batches) == 1 and len(service.batches[0]) == 2  # 1 + 32 photos of 64 fit
    refused = [name for name, answer in answers.items() if answer.status == 503]
    assert len(refused) == 3 and all(answers[name].headers == {"Retry-After": "1"} for name in refused)
    assert "did not fit" in answers[refused[0]].body["error"]


def test_the_cost_batcher_answers_504_after_the_response_timeout_and_drops_the_unbatched_request():
    import asyncio
    import threading

    from marketplace_classifier.serving.admission import CostBatcher
    from marketplace_classifier.serving.core import Request

    release = threading.Event()

    class SlowService(RecordingService):
        def predict(self, envelopes):
            release.wait(10)  # the model is stuck on the first batch
            return envelopes

    service = SlowService({"first": Cost(1, 1000), "second": Cost(1, 1000)}, WorkBudget())
    batcher = CostBatcher(service, max_batch_size=1, batch_wait_s=0, response_timeout_s=0.3)

    async def both():
        first = asyncio.ensure_future(batcher.submit(Request({"body": "first"})))
        await asyncio.sleep(0.05)  # the first request is in the stuck batch
        second = await batcher.submit(Request({"body": "second"}))
        answers = await asyncio.gather(first), second
        release.set()
        await asyncio.sleep(0.05)
        return answers

    (first,), second = asyncio.run(both())
    for answer in (first, second):
        assert answer.status == 504 and "response timeout (0.3 s)" in answer.body["error"]
        assert answer.body["grpc_code"] == "DEADLINE_EXCEEDED"
    assert service.batches == [["first"]]  # the second never reached the model
    with pytest.raises(ValueError, match="response_timeout_s"):
        CostBatcher(service, 1, 0, response_timeout_s=0)
