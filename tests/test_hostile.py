"""Hostile input: whatever arrives, the request parser and the handler answer with a result or
a 4xx and a readable message; no exception escapes."""

import io
import json
import os

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from handlers.payloads import parse_request
from handlers.processing import InputError
from tests.conftest import FakeContext, handler_dir

NEEDS = [frozenset({"image"}), frozenset({"text"}), frozenset({"image", "text"})]
CONTENT_TYPES = st.sampled_from([None, "", "application/json", "text/plain", "image/jpeg",
                                 "application/octet-stream", "multipart/form-data; boundary=x",
                                 "application/xml", "application/x-www-form-urlencoded"])
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True) | st.text(max_size=50),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=10), children,
                                                                      max_size=4),
    max_leaves=20)
field_values = st.one_of(st.binary(max_size=200), st.text(max_size=200), st.integers(), json_values)
requests = st.one_of(
    st.builds(lambda body: {"body": body}, st.binary(max_size=500)),
    st.builds(lambda body: {"data": body}, st.text(max_size=500)),
    st.builds(lambda value: {"body": value}, json_values),
    st.builds(lambda value: {"body": json.dumps(value).encode()}, json_values),
    st.dictionaries(st.sampled_from(["image", "text", "product_name", "product_description", "top_k",
                                     "other"]), field_values, min_size=1, max_size=4),
)


def ends_well(call) -> None:
    try:
        call()
    except InputError as error:
        assert str(error) and 400 <= error.status < 500


@settings(max_examples=int(os.environ.get("FUZZ_EXAMPLES", 300)), deadline=None,
          derandomize=os.environ.get("FUZZ_EXAMPLES") is None)  # reproducible in CI
@given(requests, CONTENT_TYPES, st.sampled_from(NEEDS))
def test_parser_answers_or_names_the_problem(request, content_type, needs):
    ends_well(lambda: parse_request(request, content_type, needs, 13))


def test_deep_nesting_and_control_characters():
    ends_well(lambda: parse_request({"body": b"{\"text\": " + b"[" * 50000}, "application/json",
                                    NEEDS[1], 13))
    listing = parse_request({"body": "sofa\x00\x07 with \x1b[31m cushions\u200b"}, "text/plain",
                            NEEDS[1], 13)
    assert listing.text.isprintable() and "sofa" in listing.text
    long_text = "table " * 200_000
    assert parse_request({"body": long_text.encode()}, "text/plain", NEEDS[1], 13).text


def png_header_claiming(width: int, height: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("L", (1, 1)).save(buffer, "PNG")
    data = bytearray(buffer.getvalue())
    data[16:24] = width.to_bytes(4, "big") + height.to_bytes(4, "big")  # the IHDR size fields
    return bytes(data)


@settings(max_examples=60, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.binary(max_size=2000), st.integers(1, 60_000), st.integers(1, 60_000))
def test_image_handler_never_lets_an_exception_escape(handlers_in_process, noise, width, height):
    handler = handlers_in_process["image"]
    photo = io.BytesIO()
    Image.new("RGB", (40, 30), (9, 99, 199)).save(photo, "JPEG")
    good = photo.getvalue()
    bodies = [noise, good[: max(1, len(good) * (width % 9) // 10)], png_header_claiming(width, height),
              b"\xff\xd8\xff" + noise, good]
    context = FakeContext(handler_dir(handler), ["image/jpeg"] * len(bodies))
    answers = handler.handle([{"body": body} for body in bodies], context)
    assert len(answers) == len(bodies) and "category" in answers[-1]
    for index, answer in enumerate(answers):
        if "error" in answer:
            code, _ = context.statuses[index]
            assert 400 <= code < 500 and answer["error"]
        else:
            assert index not in context.statuses and len(answer["probabilities"]) == 13
