"""Explanations on request (marketplace_classifier/serving/explain.py): the lexical terms' exact
contributions add up to the branch's logit, the branches' shares split the answer's margin, a
photo cell's value is the occlusion it names, the occlusions count in the work budget, and the
same explanation comes back on every protocol of both engines."""

from __future__ import annotations

import base64
import json
import math
from pathlib import Path

import pytest
import requests
import torch

from marketplace_classifier.client import Client, GrpcClient, Listing, PayloadTooLarge
from marketplace_classifier.ops.hostile import ordinary_photo
from marketplace_classifier.serving.core import ListingService, Request
from marketplace_classifier.serving.explain import (
    GREY,
    GRID,
    MAX_EXPLAINED_PHOTOS,
    MAX_OCCLUDED_WORDS,
    log_odds,
)
from marketplace_classifier.serving.processing import lexical_batch

PHOTOS = [ordinary_photo(seed) for seed in range(3)]
TEXTS = ["Sony PS5 console with two controllers, boxed", "solid oak dining table seats six",
         "Kinderwagen grün, wenig benutzt ✓"]


@pytest.fixture(scope="module")
def services(artifacts) -> dict[str, ListingService]:
    return {kind: ListingService(artifacts / kind) for kind in ("image", "text", "combined")}


def explained(service: ListingService, text: str | None = None, photos: list[bytes] = ()) -> dict:
    fields: dict = {"explain": b"true"}
    if text is not None:
        fields["text"] = text.encode()
    fields |= {("image" if i == 0 else f"image_{i}"): photo for i, photo in enumerate(photos)}
    answer = service.handle([Request(fields, "multipart/form-data")])[0]
    assert answer.status == 200, answer.body
    return answer.body


def scripted(artifacts: Path, kind: str):
    return torch.jit.load(str(artifacts / kind / "model.pt"), map_location="cpu")


def test_the_lexical_terms_add_up_to_the_branchs_logit(artifacts, services):
    """Checked against the exported TorchScript's own lexical branch, run on the text's hashed
    terms: the listed terms, the rest and the bias give its logit of the answer."""
    for kind, photos in (("text", []), ("combined", PHOTOS[:1]), ("combined", [])):
        module = scripted(artifacts, kind)
        branch = getattr(module, "text_model", module).lexical
        for text in TEXTS:
            answer = explained(services[kind], text, photos)
            lexical = answer["explanation"]["text"]["lexical"]
            index = services[kind].class_names.index(answer["category"])
            with torch.inference_mode():
                inputs = lexical_batch([text], services[kind].settings.text.lexical)
                logit = float(branch(*inputs)[0, index])
            total = sum(term["contribution"] for term in lexical["terms"]) + lexical["other_terms"]
            assert lexical["logit"] == pytest.approx(logit, abs=1e-4)
            assert total + lexical["bias"] == pytest.approx(logit, abs=1e-4), (kind, text)
            positives = [term["contribution"] for term in lexical["terms"] if term["contribution"] > 0]
            assert positives == sorted(positives, reverse=True)


def test_the_branches_shares_split_the_answers_margin(artifacts, services):
    """share(lexical) x margin = the lexical branch's weighted margin, from the TorchScript's mix
    and lexical branch; the margin from the answer's probabilities and the temperature."""
    service, module = services["combined"], scripted(artifacts, "combined")
    for photos, mix, temperature in ((PHOTOS[:2], module.mix, service.settings.temperature),
                                     ([], module.text_model.mix, service.settings.text_only_temperature)):
        answer = explained(service, TEXTS[0], photos)
        shares = {share["branch"]: share["share"] for share in answer["explanation"]["branches"]}
        assert sum(shares.values()) == pytest.approx(1.0, abs=1e-6)
        probabilities = torch.tensor([answer["probabilities"][name] for name in service.class_names])
        best, runner_up = torch.topk(probabilities, 2).indices.tolist()
        margin = temperature * math.log(probabilities[best] / probabilities[runner_up])
        with torch.inference_mode():
            inputs = lexical_batch([TEXTS[0]], service.settings.text.lexical)
            lexical = module.text_model.lexical(*inputs)[0]
        lexical = torch.log_softmax(lexical[:service.settings.num_classes], 0)
        lexical_margin = float(mix[1] * (lexical[best] - lexical[runner_up]))
        assert shares["lexical"] * margin == pytest.approx(lexical_margin, abs=1e-3)
        assert ("photos and text encoder" in shares) == bool(photos)


def test_a_photo_cell_is_the_occlusion_it_names_and_photos_are_bounded(artifacts, services):
    """Of three photos the first as sent is explained; its top-left cell's value is the drop in
    the answer's log-odds when that cell of the prepared photo is grey, through the TorchScript."""
    service = services["image"]
    answer = explained(service, photos=PHOTOS)
    photos = answer["explanation"]["photos"]
    assert len(photos) == MAX_EXPLAINED_PHOTOS < len(PHOTOS) and photos[0]["photo"] == 1
    assert len(photos[0]["cells"]) == GRID and all(len(row) == GRID for row in photos[0]["cells"])
    assert photos[0]["milliseconds"] > 0
    prepared = service.prepare([Request({"image": PHOTOS[0]}, "multipart/form-data")]).items[0].images[0]
    occluded = prepared.clone()
    side = round(prepared.shape[-1] / GRID)
    occluded[:, :side, :side] = GREY
    index = service.class_names.index(answer["category"])
    with torch.inference_mode():
        output = scripted(artifacts, "image")(torch.stack([prepared, occluded])).float()
    odds = log_odds(torch.log_softmax(output[:, :service.settings.num_classes], 1), index)
    assert photos[0]["cells"][0][0] == pytest.approx(float(odds[0] - odds[1]), abs=1e-3)


def test_the_encoder_words_are_the_first_words_of_the_text(services):
    text = " ".join(f"word{i}" for i in range(MAX_OCCLUDED_WORDS + 5))
    words = explained(services["text"], text)["explanation"]["text"]["encoder"]["words"]
    assert [w["word"] for w in words] == text.split()[:MAX_OCCLUDED_WORDS]
    assert all(text[w["start"]:w["start"] + len(w["word"])] == w["word"] for w in words)
    assert all(math.isfinite(w["contribution"]) for w in words)


def test_an_explanation_costs_its_occlusions_in_the_work_budget(services):
    service = services["text"]
    long_text = " ".join(["word"] * 40)
    instances = [{"text": long_text}] * 9  # 16 words occluded each: 4 photos' work each
    plain = service.handle([v1_request(instances)])
    assert plain[0].status == 200
    refused = service.handle([v1_request([item | {"explain": True} for item in instances])])
    assert refused[0].status == 413 and "photos in one request" in refused[0].body["error"]
    bad = service.handle([Request({"text": b"kettle", "explain": b"maybe"}, "multipart/form-data")])
    assert bad[0].status == 400 and "explain" in bad[0].body["error"]
    unasked = service.handle([Request({"text": b"kettle"}, "multipart/form-data")])[0].body
    assert "explanation" not in unasked


def v1_request(instances: list[dict]) -> Request:
    return Request({"body": json.dumps({"instances": instances}).encode()}, "application/json")


# ---------------------------------------------------------------- through both engines
@pytest.fixture(scope="module", params=["torchserve", "kserve_ray"])
def engine(request):
    if request.param == "torchserve":
        server = request.getfixturevalue("server")
        properties = server["properties"]
        return {"name": "torchserve", "url": properties["inference_address"],
                "grpc": f"127.0.0.1:{properties['grpc_inference_port']}", "api": "torchserve",
                "options": {"key_file": server["state"] / "key_file.json"}, "token": server["token"]}
    engine = request.getfixturevalue("kserve_ray")
    return {"name": "kserve_ray", "url": engine["base"], "grpc": engine["grpc"], "api": "kserve",
            "options": {}, "token": None}


def same_explanation(served: dict, expected: dict) -> bool:
    """The same terms and words with contributions within 1e-3 (the runtime runs the occlusions)."""
    def numbers(value):
        if isinstance(value, dict):
            return {key: numbers(item) for key, item in value.items() if key != "milliseconds"}
        if isinstance(value, list):
            return [numbers(item) for item in value]
        return round(value, 3) if isinstance(value, float) else value

    def close(a, b) -> bool:
        if isinstance(a, dict):
            return a.keys() == b.keys() and all(close(a[key], b[key]) for key in a)
        if isinstance(a, list):
            return len(a) == len(b) and all(close(x, y) for x, y in zip(a, b, strict=True))
        if isinstance(a, float):
            return abs(a - b) <= 1e-3
        return a == b

    return close(numbers(served), numbers(expected))


@pytest.mark.serving
@pytest.mark.engines
def test_every_protocol_of_both_engines_serves_the_in_process_explanation(engine, services):
    expected = explained(services["combined"], TEXTS[0], PHOTOS[:1])["explanation"]
    listing = Listing.of(TEXTS[0], PHOTOS[:1], explain=True)
    with Client(engine["url"], "combined", timeout=120, **engine["options"]) as client:
        served = client.classify_listing(listing)
        plain = client.classify(text=TEXTS[0], photos=PHOTOS[:1])
    with GrpcClient(engine["grpc"], "combined", api=engine["api"], timeout=120,
                    **engine["options"]) as client:
        over_grpc = client.classify_listing(listing)
    assert plain.explanation is None
    raw = http_answers(engine)
    for answer in (served, over_grpc):
        assert answer.explanation is not None and answer.explanation.category == expected["category"]
    for body in raw:
        assert same_explanation(body, expected), (engine["name"], body, expected)
    assert same_explanation(json_of(served.explanation), expected)
    assert same_explanation(json_of(over_grpc.explanation), expected)


def json_of(explanation) -> dict:
    import dataclasses

    def plain(value):
        if isinstance(value, tuple):
            return [plain(item) for item in value]
        if isinstance(value, dict):
            return {key: plain(item) for key, item in value.items() if item not in (None, ())}
        return value

    return plain(dataclasses.asdict(explanation))


def http_answers(engine: dict) -> list[dict]:
    """The explanation over REST as a KServe v2 body (a parameter) and, on TorchServe, as a
    multipart part."""
    headers = {"Authorization": f"Bearer {engine['token']}"} if engine["token"] else {}
    photo = base64.b64encode(PHOTOS[0]).decode()
    v2 = {"inputs": [{"name": "image", "datatype": "BYTES", "shape": [1], "data": [photo]},
                     {"name": "text", "datatype": "BYTES", "shape": [1], "data": [TEXTS[0]]}],
          "parameters": {"explain": True}}
    url = (f"{engine['url']}/predictions/combined" if engine["name"] == "torchserve"
           else f"{engine['url']}/v2/models/combined/infer")
    answer = requests.post(url, json=v2, headers=headers, timeout=120).json()
    outputs = {output["name"]: output["data"] for output in answer["outputs"]}
    found = [json.loads(outputs["explanation"][0])]
    if engine["name"] == "torchserve":
        form = requests.post(url, files={"image": ("p.jpg", PHOTOS[0])},
                             data={"text": TEXTS[0], "explain": "true"}, headers=headers, timeout=120)
        found.append(form.json()["explanation"])
    return found


@pytest.mark.serving
@pytest.mark.engines
def test_an_over_budget_explanation_is_refused_by_the_engine(engine):
    listings = [Listing.of(" ".join(["word"] * 40), PHOTOS[:2], explain=True)] * 2  # 22 photos' work each
    with Client(engine["url"], "combined", timeout=120, **engine["options"]) as client, \
            pytest.raises(PayloadTooLarge, match="photos in one request"):
        client.classify_chunk(listings)
