"""Hostile input: whatever arrives, the request parser and the handler answer with a result or
a 4xx and a readable message; no exception escapes."""

import io
import json
import os

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from marketplace_classifier.serving.payloads import parse_request
from marketplace_classifier.serving.processing import MAX_FIELD_CHARS, InputError
from marketplace_classifier.serving.protocols import read_request
from tests.helpers import FakeContext, handler_dir

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
    st.dictionaries(st.sampled_from(["image", "image_1", "image_12", "image_0", "images", "text",
                                     "product_name", "product_description", "top_k", "min_confidence",
                                     "other"]), field_values, min_size=1, max_size=4),
    st.builds(lambda photos, extra: {"body": {"images": photos} | extra},
              st.lists(field_values, max_size=14),
              st.dictionaries(st.sampled_from(["image", "text", "min_confidence"]), field_values,
                              max_size=2)),
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


# ---------------------------------------------------------------- findings of the outside test
def status_line_is_safe(context: FakeContext, index: int) -> None:
    code, phrase = context.statuses[index]
    assert 400 <= code < 500 and phrase.isascii() and len(phrase) <= 40 and phrase.isprintable()


@pytest.mark.parametrize("body", [
    {"é": 1}, {"text": "sofa", "ключ": "значение"}, {"k" * 100_000: 1}, {"x" * 7_000_000: 1},
    {"instances": [{"text": "sofa", "名前": 1}]},
    {"inputs": [{"name": "tëxt", "shape": [1], "datatype": "BYTES", "data": ["a"]}]},
    {"inputs": [{"name": "text", "shape": [1], "datatype": "BŸTES", "data": ["a"]}]},
    {"inputs": [{"name": "text", "shape": ["é"], "datatype": "BYTES", "data": ["a"]}]},
])
def test_errors_echo_no_raw_content_into_the_status_line(handlers_in_process, body):
    handler = handlers_in_process["text"]
    context = FakeContext(handler_dir(handler), ["application/json"] * 2)
    answers = handler.handle([{"body": body}, {"body": {"text": "oak table"}}], context)
    status_line_is_safe(context, 0)
    assert answers[0]["error"].isascii() and len(answers[0]["error"]) <= 1100
    assert answers[0]["status"] == 400 and "category" in answers[1]


def test_non_ascii_content_type_and_part_names_get_an_ascii_answer(handlers_in_process):
    handler = handlers_in_process["text"]
    context = FakeContext(handler_dir(handler), ["applicätion/jsön; charset=é", "multipart/form-data"])
    answers = handler.handle([{"body": b"sofa"}, {"tëxt": b"sofa"}], context)
    for index in (0, 1):
        status_line_is_safe(context, index)
        assert answers[index]["error"].isascii()
    assert context.statuses[0][0] == 415 and "unknown field" in answers[1]["error"]


def test_text_is_cut_before_it_is_cleaned_or_tokenized():
    huge = ("kettle " * 2_500_000).encode()  # 17.5 MB
    listing = parse_request({"body": huge}, "text/plain", NEEDS[1], 13)
    assert len(listing.text) <= MAX_FIELD_CHARS and listing.text.startswith("kettle kettle")
    fields = {"product_name": "n" * 50_000, "product_description": "d" * 50_000}
    assert len(parse_request({"body": fields}, "application/json", NEEDS[1], 13).text) \
        <= 2 * MAX_FIELD_CHARS + 1


def test_grpc_answers_end_their_stream_and_http_answers_do_not(handlers_in_process):
    handler = handlers_in_process["text"]
    grpc = FakeContext(handler_dir(handler), ["", ""], grpc=True)
    answers = handler.handle([{"text": b"kettle"}, {"tëxt": b"kettle"}], grpc)
    assert "category" in answers[0] and answers[1]["grpc_code"] == "INVALID_ARGUMENT"
    assert grpc.response_headers == {0: {"ts_stream_next": "false"}, 1: {"ts_stream_next": "false"}}
    http = FakeContext(handler_dir(handler), ["text/plain"])
    handler.handle([{"body": b"kettle"}], http)
    assert http.response_headers == {}


@pytest.mark.parametrize(("count", "nested"), [(6_500_000, False), (65, False), (1, True)])
def test_v2_counts_are_checked_before_rows_are_built(count, nested):
    data = [[[["sofa"]]]] if nested else [""] * count
    body = {"inputs": [{"name": "text", "shape": [len(data)], "datatype": "BYTES", "data": data}]}
    with pytest.raises(InputError, match="at most 64|1 to 64|nested deeper"):
        read_request({"body": body}, "application/json", NEEDS[1], 13)


def test_v2_data_nested_900_deep_is_a_400_not_a_recursion_error(handlers_in_process):
    deep: list = ["sofa"]
    for _ in range(900):
        deep = [deep]
    handler = handlers_in_process["text"]
    context = FakeContext(handler_dir(handler), ["application/json"])
    body = {"inputs": [{"name": "text", "shape": [1], "datatype": "BYTES", "data": deep}]}
    answer = handler.handle([{"body": body}], context)[0]
    assert context.statuses[0][0] == 400 and "nested deeper" in answer["error"]


@pytest.mark.parametrize(("body", "message"), [
    (b"%PDF-1.7\n%\xe2\xe3\xcf\xd3\n1 0 obj", "a PDF document, not a photo"),
    (b'<svg xmlns="http://www.w3.org/2000/svg" width="10" height="10"/>', "an SVG drawing"),
    (b"\x89PNG\r\n\x1a\n" + bytes(40), "not a readable image"),
    (b"just some words", "unrecognised image format"),
])
def test_image_model_names_what_it_was_sent_without_leaking_internals(handlers_in_process, body,
                                                                      message):
    handler = handlers_in_process["image"]
    context = FakeContext(handler_dir(handler), ["application/octet-stream"])
    answer = handler.handle([{"body": body}], context)[0]
    assert context.statuses[0][0] == 400 and message in answer["error"]
    assert "0x" not in answer["error"] and "BytesIO" not in answer["error"]


hostile_keys = st.text(min_size=1, max_size=30) | st.builds(lambda c, n: c * n, st.characters(),
                                                            st.integers(1000, 200_000))
hostile_types = st.text(max_size=40) | st.sampled_from(["application/json", "text/plain; charset=é"])


@settings(max_examples=int(os.environ.get("FUZZ_EXAMPLES", 150)), deadline=None,
          derandomize=os.environ.get("FUZZ_EXAMPLES") is None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(st.dictionaries(hostile_keys, field_values, min_size=1, max_size=3), hostile_types,
       st.sampled_from(["json", "multipart", "v1", "v2"]))
def test_any_key_or_content_type_gets_a_safe_status_line(handlers_in_process, fields, content_type,
                                                        shape):
    handler = handlers_in_process["text"]
    if shape == "json":
        request = {"body": fields}
    elif shape == "multipart":
        request = {key: str(value).encode() for key, value in fields.items()}
    elif shape == "v1":
        request = {"body": {"instances": [fields]}}
    else:
        request = {"body": {"inputs": [{"name": key, "shape": [1], "datatype": key, "data": [value]}
                                       for key, value in fields.items()]}}
    context = FakeContext(handler_dir(handler), [content_type, "text/plain"])
    answers = handler.handle([request, {"body": b"oak dining table"}], context)
    assert "category" in answers[1] and 1 not in context.statuses
    if "error" in answers[0]:
        status_line_is_safe(context, 0)
        assert answers[0]["error"].isascii() and len(answers[0]["error"]) <= 1100
