"""The handlers in process: request formats, whole batches, and a 4xx for each bad request."""

import base64
import io
import json

import pytest
import torch
from PIL import Image

from marketplace_classifier.serving.exported import ExportedModel
from marketplace_classifier.serving.payloads import parse_request
from marketplace_classifier.serving.processing import InputError
from tests.helpers import FakeContext, handler_dir

NAMES = 13


def jpeg(size=(120, 90), colour=(200, 30, 30)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, colour).save(buffer, "JPEG")
    return buffer.getvalue()


# ------------------------------------------------------------------ parsing
def test_image_arrives_raw_as_base64_json_or_multipart():
    photo = jpeg()
    needs = frozenset({"image"})
    assert parse_request({"body": photo}, "image/jpeg", needs, NAMES).image == photo
    encoded = base64.b64encode(photo).decode()
    assert parse_request({"body": {"image": encoded}}, "application/json", needs, NAMES).image == photo
    as_bytes = json.dumps({"image": encoded, "top_k": 5}).encode()
    listing = parse_request({"body": as_bytes}, "application/json", needs, NAMES)
    assert listing.image == photo and listing.top_k == 5
    assert parse_request({"image": photo}, "multipart/form-data; boundary=x", needs, NAMES).image == photo


def test_text_arrives_plain_as_json_or_as_name_and_description():
    needs = frozenset({"text"})
    assert parse_request({"body": "Oak table"}, "text/plain", needs, NAMES).text == "Oak table"
    assert parse_request({"body": b"Oak table"}, None, needs, NAMES).text == "Oak table"
    fields = {"product_name": "Oak table | in Leeds, West Yorkshire | Gumtree",
              "product_description": "Seats six. Posted by Tom in Tables in Leeds."}
    assert parse_request({"body": fields}, "application/json", needs, NAMES).text == "Oak table Seats six."
    grpc_map = {"text": b"ps5 console", "top_k": b"2"}
    listing = parse_request(grpc_map, "", needs, NAMES)
    assert (listing.text, listing.top_k) == ("ps5 console", 2)


@pytest.mark.parametrize(("request_", "content_type", "needs", "message"), [
    ({"body": b""}, "text/plain", {"text"}, "empty request body"),
    ({"body": b"\xff\xfe\xfa"}, "text/plain", {"text"}, "not valid UTF-8"),
    ({"body": b"   "}, "text/plain", {"text"}, "text is empty"),
    ({"body": b"[1, 2]"}, "application/json", {"text"}, "must be an object"),
    ({"body": b"{\"text\": "}, "application/json", {"text"}, "not valid JSON"),
    ({"body": b"[" * 100000}, "application/json", {"text"}, "nested too deeply"),
    ({"body": {"text": 5}}, "application/json", {"text"}, "must be a string"),
    ({"body": -1}, "application/json", {"image"}, "must be an object"),
    ({"body": 0.0}, None, {"image"}, "must be an object"),
    ({"body": {"colour": "red"}}, "application/json", {"text"}, "unknown field"),
    ({"body": {"image": "%%%"}}, "application/json", {"image"}, "not valid base64"),
    ({"body": {"text": "a", "top_k": 99}}, "application/json", {"text"}, "from 1 to 13"),
    ({"text": b"sofa"}, "multipart/form-data; boundary=x", {"image", "text"}, "no image"),
    ({"image": jpeg()}, "multipart/form-data; boundary=x", {"image", "text"}, "no text"),
    ({"body": b"<a/>"}, "application/xml", {"text"}, "unsupported content type"),
])
def test_bad_requests_are_named(request_, content_type, needs, message):
    with pytest.raises(InputError, match=message):
        parse_request(request_, content_type, frozenset(needs), NAMES)


# ------------------------------------------------------------------ whole batches
def test_every_request_of_a_batch_is_answered(handlers_in_process):
    handler = handlers_in_process["text"]
    texts = ["ps5 console", "oak dining table with six chairs", "kettle", "mountain bike"]
    context = FakeContext(handler_dir(handler), ["text/plain"] * 4)
    answers = handler.handle([{"body": text.encode()} for text in texts], context)
    assert len(answers) == 4 and not context.statuses
    for answer in answers:
        assert set(answer) == {"category", "probability", "top_k", "probabilities", "needs_review",
                               "model_version", "path", "confident_depth"}
        assert answer["path"][0] == {"name": answer["category"], "probability": answer["probability"]}
        assert answer["model_version"] == handler.service.card["version"]  # no version in the manifest
        assert len(answer["probabilities"]) == 13 and len(answer["top_k"]) == 3
        assert abs(sum(answer["probabilities"].values()) - 1) < 1e-4
    single = handler.handle([{"body": texts[1].encode()}], FakeContext(handler_dir(handler), ["text/plain"]))
    assert single[0]["probabilities"] == pytest.approx(answers[1]["probabilities"], abs=1e-5)


def test_bad_requests_get_4xx_while_the_rest_of_the_batch_succeeds(handlers_in_process):
    handler = handlers_in_process["combined"]
    photo = jpeg()
    truncated = photo[: len(photo) // 2]
    requests = [
        {"image": photo, "text": b"sofa"},
        {"image": b"not an image at all", "text": b"sofa"},
        {"image": truncated, "text": b"sofa"},
        {"image": photo},
        {"image": photo, "text": b"kettle", "top_k": b"1"},
    ]
    kinds = ["multipart/form-data; boundary=x"] * len(requests)
    context = FakeContext(handler_dir(handler), kinds)
    answers = handler.handle(requests, context)
    assert set(context.statuses) == {1, 2, 3}
    assert all(code == 400 for code, _ in context.statuses.values())
    assert "not a readable image" in answers[1]["error"] and "no text" in answers[3]["error"]
    assert answers[0]["category"] and len(answers[4]["top_k"]) == 1


def test_decompression_bomb_is_refused(handlers_in_process):
    handler = handlers_in_process["image"]
    buffer = io.BytesIO()
    Image.new("L", (12000, 12000)).save(buffer, "PNG")
    context = FakeContext(handler_dir(handler), ["image/png", "image/jpeg"])
    answers = handler.handle([{"body": buffer.getvalue()}, {"body": jpeg()}], context)
    assert context.statuses[0][0] == 400 and "too large" in answers[0]["error"]
    assert "category" in answers[1]


def test_handler_answer_equals_the_torchscript_model(handlers_in_process, artifacts):
    from marketplace_classifier.serving.processing import model_image_from_bytes

    handler = handlers_in_process["image"]
    photo = jpeg((1000, 750), (20, 120, 220))
    answer = handler.handle([{"body": photo}], FakeContext(handler_dir(handler), ["image/jpeg"]))[0]
    exported = ExportedModel.load(artifacts / "image")
    scripted, settings = exported.model, exported.settings
    assert settings.temperature > 0
    with torch.inference_mode():
        logits = scripted(model_image_from_bytes(photo, settings.image.size)[None])[:, :settings.num_classes]
        expected = torch.softmax(logits / settings.temperature, 1)[0]
    names = json.loads((artifacts / "image" / "index_to_name.json").read_text())
    served = torch.tensor([answer["probabilities"][names[str(i)]] for i in range(13)])
    assert (served - expected).abs().max() <= 1e-4


def test_worker_threads_follow_the_container_cpu_quota(tmp_path):
    from marketplace_classifier.serving.core import available_cores, cgroup_cpu_limit

    (tmp_path / "cpu.max").write_text("150000 100000\n")
    unlimited = available_cores(tmp_path / "no-cgroup")
    assert cgroup_cpu_limit(tmp_path) == 1.5 and available_cores(tmp_path) == min(2, unlimited)
    (tmp_path / "cpu.max").write_text("max 100000\n")
    assert cgroup_cpu_limit(tmp_path) is None
    (tmp_path / "cpu.max").unlink()
    (tmp_path / "cpu").mkdir()
    (tmp_path / "cpu" / "cpu.cfs_quota_us").write_text("100000\n")
    (tmp_path / "cpu" / "cpu.cfs_period_us").write_text("100000\n")
    assert cgroup_cpu_limit(tmp_path) == 1.0 and available_cores(tmp_path) == 1
    (tmp_path / "cpu" / "cpu.cfs_quota_us").write_text("-1\n")
    assert cgroup_cpu_limit(tmp_path) is None and cgroup_cpu_limit(tmp_path / "missing") is None
