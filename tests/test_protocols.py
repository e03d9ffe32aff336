"""KServe v1 and v2 (Open Inference Protocol) bodies, read by the handler itself, batch-aware."""

import base64
import io

import pytest
from PIL import Image

from marketplace_classifier.serving.processing import InputError
from marketplace_classifier.serving.protocols import MAX_LISTINGS, V1, V2, read_request
from tests.helpers import FakeContext, handler_dir

BOTH = frozenset({"image", "text"})


def jpeg(colour=(200, 30, 30)) -> str:
    buffer = io.BytesIO()
    Image.new("RGB", (96, 72), colour).save(buffer, "JPEG")
    return base64.b64encode(buffer.getvalue()).decode()


def v2_request(**columns) -> dict:
    return {"id": "r-1", "inputs": [{"name": name, "shape": [len(values)], "datatype": "BYTES",
                                     "data": values} for name, values in columns.items()]}


def test_v1_instances_become_listings():
    photo = jpeg()
    body = {"instances": [{"image": {"b64": photo}, "text": "sofa"},
                          {"image": photo, "product_name": "Kettle", "top_k": 2}]}
    envelope = read_request({"body": body}, "application/json", BOTH, 13)
    assert envelope.protocol == V1 and len(envelope.listings) == 2
    assert envelope.listings[0].image == base64.b64decode(photo)
    assert (envelope.listings[1].text, envelope.listings[1].top_k) == ("Kettle", 2)


def test_v2_columns_become_rows():
    body = v2_request(image=[jpeg(), jpeg((0, 0, 255))], text=["sofa", "kettle"]) | {
        "parameters": {"top_k": 5}}
    envelope = read_request({"body": body}, "application/json", BOTH, 13)
    assert envelope.protocol == V2 and envelope.request_id == "r-1"
    assert [listing.text for listing in envelope.listings] == ["sofa", "kettle"]
    assert all(listing.top_k == 5 for listing in envelope.listings)
    nested = {"inputs": [{"name": "text", "shape": [2, 1], "datatype": "BYTES", "data": [["a"], ["b"]]}]}
    assert len(read_request({"body": nested}, None, frozenset({"text"}), 13).listings) == 2


@pytest.mark.parametrize(("body", "message"), [
    ({"instances": []}, "1 to 64 listings"),
    ({"instances": [{"text": "a"}] * (MAX_LISTINGS + 1)}, "1 to 64 listings"),
    ({"instances": {"text": "a"}}, "must be a list"),
    ({"instances": [{"text": "a"}], "extra": 1}, "only 'instances'"),
    ({"instances": [{"text": "a"}, {"colour": "red"}]}, "instance 1: unknown field"),
    ({"instances": [{"text": "a"}, "sofa"]}, "instance 1: a listing must be an object"),
    ({"inputs": []}, "list of 1 to"),
    ({"inputs": [{"name": "text", "shape": [1], "datatype": "FP32", "data": [1.0]}]}, "BYTES"),
    ({"inputs": [{"name": "price", "shape": [1], "datatype": "BYTES", "data": ["1"]}]}, "unknown input"),
    ({"inputs": [{"name": "text", "shape": [2], "datatype": "BYTES", "data": ["a"]}]}, "1 values"),
    ({"inputs": [{"name": "text", "shape": [1, 3], "datatype": "BYTES", "data": ["a"]}]}, "shape"),
    ({"inputs": [{"name": "text", "datatype": "BYTES", "data": ["a"]}]}, "needs 'name', 'shape'"),
    (v2_request(text=["a", "b"], product_name=["c"]), "same first dimension"),
    (v2_request(text=["a"]) | {"parameters": {"temperature": 2}}, "only hold 'top_k'"),
    (v2_request(text=["a"]) | {"parameters": {"top_k": 0}}, "instance 0: field 'top_k'"),
    (v2_request(text=["a"]) | {"id": 7}, "'id' must be a string"),
])
def test_bad_envelopes_are_named(body, message):
    with pytest.raises(InputError, match=message):
        read_request({"body": body}, "application/json", frozenset({"text"}), 13)


def test_one_batch_mixes_formats_and_every_listing_matches_its_plain_answer(handlers_in_process):
    handler = handlers_in_process["combined"]
    photos, texts = [jpeg(), jpeg((0, 0, 255)), jpeg((0, 200, 0))], ["sofa", "ps5 games", "kettle"]
    plain = handler.handle([{"body": {"image": p, "text": t}} for p, t in zip(photos, texts, strict=True)],
                           FakeContext(handler_dir(handler), ["application/json"] * 3))
    batch = [
        {"body": {"instances": [{"image": {"b64": photos[0]}, "text": texts[0]},
                                {"image": photos[1], "text": texts[1]}]}},
        {"body": v2_request(image=photos, text=texts) | {"parameters": {"top_k": 2}}},
        {"body": v2_request(image=photos[:1], text=["sofa"]) | {"inputs": []}},  # bad
        {"body": {"image": photos[2], "text": texts[2]}},
    ]
    context = FakeContext(handler_dir(handler), ["application/json"] * 4)
    v1, v2, bad, single = handler.handle(batch, context)
    assert set(context.statuses) == {2} and context.statuses[2][0] == 400 and "error" in bad

    assert [p["category"] for p in v1["predictions"]] == [a["category"] for a in plain[:2]]
    for served, expected in zip(v1["predictions"], plain, strict=False):
        assert served["probabilities"] == pytest.approx(expected["probabilities"], abs=1e-5)
    assert single["probabilities"] == pytest.approx(plain[2]["probabilities"], abs=1e-5)

    outputs = {output["name"]: output for output in v2["outputs"]}
    assert v2["id"] == "r-1" and v2["model_name"] == "combined"
    assert outputs["category"]["data"] == [answer["category"] for answer in plain]
    assert outputs["top_categories"]["shape"] == [3, 2]
    probabilities = outputs["probabilities"]
    classes = outputs["classes"]["data"]
    assert probabilities["shape"] == [3, 13] and len(classes) == 13 and "parameters" not in probabilities
    assert outputs["needs_review"]["datatype"] == "BOOL" and outputs["photos"]["data"] == [1, 1, 1]
    for row, answer in enumerate(plain):
        values = probabilities["data"][row * 13:(row + 1) * 13]
        assert values == pytest.approx([answer["probabilities"][name] for name in classes], abs=1e-5)
