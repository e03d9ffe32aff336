"""The listing API's OpenAPI document (marketplace_classifier/client/openapi.py): it validates as
OpenAPI 3.1, docs/openapi.json is its current TorchServe edition, the second engine serves its
own with a docs page, and real answers and refusals of both engines conform to it."""

from __future__ import annotations

import base64
import json

import pytest
import requests

from marketplace_classifier.client.openapi import document
from marketplace_classifier.ops.hostile import ordinary_photo
from tests.helpers import ROOT, TEXTS

PHOTO = base64.b64encode(ordinary_photo(0)).decode()


def validator(spec: dict, schema_name: str):
    from jsonschema import Draft202012Validator
    from referencing import Registry, Resource
    from referencing.jsonschema import DRAFT202012

    registry = Registry().with_resource("urn:listing-api", Resource.from_contents(spec, DRAFT202012))
    return Draft202012Validator(
        {"$ref": f"urn:listing-api#/components/schemas/{schema_name}"}, registry=registry
    )


def conforms(spec: dict, schema_name: str, body: dict) -> list[str]:
    return [
        f"{list(error.absolute_path)}: {error.message}"
        for error in validator(spec, schema_name).iter_errors(body)
    ]


@pytest.mark.parametrize("engine", ["torchserve", "kserve"])
def test_the_document_is_valid_openapi(engine):
    from openapi_spec_validator import validate

    validate(document(engine))


def test_the_published_document_is_the_generated_one():
    published = json.loads((ROOT / "docs" / "openapi.json").read_text())
    assert published == document("torchserve"), "run: marketplace-classifier openapi --out docs/openapi.json"


@pytest.mark.serving
@pytest.mark.engines
def test_torchserve_answers_and_refusals_conform(server):
    spec = document("torchserve")
    url = server["properties"]["inference_address"] + "/predictions/{model}"
    headers = {"Authorization": f"Bearer {server['token']}"}
    many = {"instances": [{"text": TEXTS[0], "images": [PHOTO]}, {"text": TEXTS[1]}]}
    answer = requests.post(url.format(model="combined"), json=many, headers=headers, timeout=120)
    assert answer.status_code == 200 and conforms(spec, "ListingsAnswer", answer.json()) == []
    one = requests.post(url.format(model="image"), json={"images": [PHOTO]}, headers=headers, timeout=120)
    assert one.status_code == 200 and conforms(spec, "Classification", one.json()) == []
    refused = requests.post(url.format(model="text"), json={"text": 5}, headers=headers, timeout=120)
    assert refused.status_code == 400 and conforms(spec, "Refusal", refused.json()) == []
    assert conforms(spec, "Listing", many["instances"][0]) == []


@pytest.mark.serving
@pytest.mark.engines
def test_the_second_engine_serves_the_document_and_its_answers_conform(kserve_ray):
    base = kserve_ray["base"]
    spec = requests.get(base + "/openapi.json", timeout=30).json()
    assert (
        spec["paths"] == document("kserve")["paths"]
        and spec["components"] == document("kserve")["components"]
    )
    page = requests.get(base + "/docs", timeout=30)
    assert page.status_code == 200 and "<script" not in page.text and "Classification" in page.text
    body = {"instances": [{"text": TEXTS[0], "images": [PHOTO]}, {"product_name": "sofa"}]}
    answer = requests.post(base + "/v1/models/combined:predict", json=body, timeout=120)
    assert answer.status_code == 200 and conforms(spec, "ListingsAnswer", answer.json()) == []
    refused = requests.post(base + "/v1/models/text:predict", json={"instances": [{"text": 5}]}, timeout=120)
    assert refused.status_code == 400 and conforms(spec, "Refusal", refused.json()) == []
