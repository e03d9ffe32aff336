"""KServe's inference protocols, understood by the handler itself so batching keeps working.

TorchServe's own KServe envelopes read only the first request of a batch, so archives are
served without them: a request body with `instances` is KServe v1, one with `inputs` is
KServe v2 / Open Inference Protocol, anything else is this project's plain format. One
request may carry several listings; the handler runs every listing of the batch together.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from marketplace_classifier.serving.budget import Cost
from marketplace_classifier.serving.payloads import DEFAULT_MAX_PHOTOS, Listing, parse_fields, read_fields
from marketplace_classifier.serving.processing import InputError, quote, quote_all

if TYPE_CHECKING:
    import torch
    from PIL import Image

PLAIN, V1, V2 = "plain", "v1", "v2"
MAX_LISTINGS = 64  # per request; a bigger request would hold up everyone else's batch
V2_INPUTS = ("image", "text", "product_name", "product_description")
V2_PARAMETERS = ("top_k", "min_confidence", "explain")


@dataclass
class PreparedListing:
    """A listing on its way to the model: first its photos' headers (read, not decoded), each
    with its position as sent, then its photos decoded into model inputs."""

    listing: Listing
    headers: list[tuple[Image.Image, int]] = field(default_factory=list)
    images: list[torch.Tensor] = field(default_factory=list)
    photo_sides: list[int] = field(default_factory=list)  # each photo's longer side, for the signals
    positions: list[int] = field(default_factory=list)  # each decoded photo's position as sent
    explained_rows: int = 0  # the work its explanation adds, in photos (serving/explain.py)

    @property
    def text(self) -> str | None:
        return self.listing.text

    @property
    def cost(self) -> Cost:
        return Cost(len(self.headers) + self.explained_rows,
                    sum(header.width * header.height for header, _ in self.headers))


@dataclass
class Envelope:
    """The listings of one request and how to answer it."""

    protocol: str
    listings: list[Listing] = field(default_factory=list)
    request_id: str | None = None
    items: list[PreparedListing] = field(default_factory=list)  # the listings prepared for the model
    cost: Cost = field(default_factory=Cost)  # the work it asks for (serving/budget.py)


def read_request(request: dict, content_type: str | None, needs: frozenset[str], num_classes: int,
                 max_photos: int = DEFAULT_MAX_PHOTOS, text_only_allowed: bool = False) -> Envelope:
    """One request of a batch, in any of the three formats, or InputError saying what is wrong.
    A listing has 1 to `max_photos` photos (none at all when `text_only_allowed`)."""
    try:
        return _read_request(request, content_type, (needs, num_classes, max_photos, text_only_allowed))
    except RecursionError as error:  # anything that walks a deeply nested value
        raise InputError("the request is nested too deeply") from error


def _read_request(request: dict, content_type: str | None, rules: tuple) -> Envelope:
    needs, max_photos = rules[0], rules[2]
    body = read_fields(request, content_type, needs)
    if "instances" in body:
        rows, protocol, request_id = _v1_rows(body), V1, None
    elif "inputs" in body:
        (rows, request_id), protocol = _v2_rows(body, max_photos), V2
    else:
        return Envelope(PLAIN, [parse_fields(body, *rules)])
    return Envelope(protocol, [_listing(position, row, rules) for position, row in enumerate(rows)],
                    request_id)


def _listing(position: int, row: dict, rules: tuple) -> Listing:
    try:
        return parse_fields(row, *rules)
    except InputError as error:
        raise type(error)(f"instance {position}: {error}") from error


def _count(rows: Sequence, what: str) -> None:
    if not 1 <= len(rows) <= MAX_LISTINGS:
        raise InputError(f"{what} must hold 1 to {MAX_LISTINGS} listings, not {len(rows)}")


# ---------------------------------------------------------------- KServe v1
def _v1_rows(body: dict) -> list[dict]:
    """{"instances": [{"image": {"b64": ...} | base64, "text" | "product_name"..., "top_k"}]}"""
    extra = [key for key in body if key != "instances"]
    if extra:
        raise InputError(f"a KServe v1 request holds only 'instances', not {quote_all(extra)}")
    instances = body["instances"]
    if not isinstance(instances, list):
        raise InputError("'instances' must be a list of listings")
    _count(instances, "'instances'")
    return [_unwrap_b64(instance) for instance in instances]


def _unwrap_b64(instance):
    """KServe v1 marks binary values as {"b64": "..."}."""
    if isinstance(instance, dict) and isinstance(instance.get("image"), dict):
        image = instance["image"]
        if set(image) != {"b64"}:
            raise InputError("'image' must be base64 text or {\"b64\": base64 text}")
        return instance | {"image": image["b64"]}
    return instance


def v1_response(results: list[dict]) -> dict:
    return {"predictions": results}


# ---------------------------------------------------------------- KServe v2 / Open Inference Protocol
def _v2_rows(body: dict, max_photos: int) -> tuple[list[dict], str | None]:
    """BYTES inputs named text, product_name, product_description of shape [N] (or [N, 1]) and
    image (base64) of shape [N] or [N, P]: P photo slots per listing, "" where a listing has
    fewer; `parameters` top_k and min_confidence apply to every listing."""
    inputs, request_id = body["inputs"], body.get("id")
    if not isinstance(inputs, list) or not 1 <= len(inputs) <= len(V2_INPUTS):
        raise InputError(f"'inputs' must be a list of 1 to {len(V2_INPUTS)} tensors")
    if request_id is not None and not (isinstance(request_id, str) and len(request_id) <= 256):
        raise InputError("'id' must be a string of at most 256 characters")
    columns = dict(_v2_column(tensor, max_photos) for tensor in inputs)
    if len(columns) != len(inputs):
        raise InputError("each input name may appear once")
    sizes = {len(values) for values in columns.values()}
    if len(sizes) != 1:
        raise InputError(f"all inputs must have the same first dimension, got {sorted(sizes)}")
    rows = [{name: values[row] for name, values in columns.items()} for row in range(sizes.pop())]
    _count(rows, "the inputs")
    parameters = body.get("parameters") or {}
    if not isinstance(parameters, dict) or set(parameters) - set(V2_PARAMETERS):
        raise InputError(f"'parameters' may only hold {' and '.join(map(repr, V2_PARAMETERS))}")
    rows = [row | {key: parameters[key] for key in V2_PARAMETERS if key in parameters} for row in rows]
    return rows, request_id


def _v2_column(tensor, max_photos: int) -> tuple[str, list]:
    if not isinstance(tensor, dict) or not {"name", "shape", "datatype", "data"} <= set(tensor):
        raise InputError("each input needs 'name', 'shape', 'datatype' and 'data'")
    name, shape, data = tensor["name"], tensor["shape"], tensor["data"]
    if name not in V2_INPUTS:
        raise InputError(f"unknown input {quote(name)}; expected some of {list(V2_INPUTS)}")
    if tensor["datatype"] != "BYTES":
        raise InputError(f"input {name!r} must have datatype BYTES, not {quote(tensor['datatype'])}")
    slots = max_photos if name == "image" else 1
    if not (isinstance(shape, list) and 1 <= len(shape) <= 2
            and all(isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in shape)
            and all(1 <= n <= slots for n in shape[1:])):
        allowed = f"[N] or [N, P] with P from 1 to {max_photos}" if name == "image" else "[N] or [N, 1]"
        raise InputError(f"input {name!r} must have shape {allowed}, not {quote(shape)}")
    if not 1 <= shape[0] <= MAX_LISTINGS:  # before a single row is built
        raise InputError(f"the inputs must hold 1 to {MAX_LISTINGS} listings, not {shape[0]}")
    width = shape[1] if len(shape) == 2 else 1
    values = _column_values(name, data, width)
    if len(values) != shape[0] * width:
        raise InputError(f"input {name!r} has shape {shape} but {len(values)} values")
    if name == "image" and len(shape) == 2:  # one list of photos per listing, empty slots dropped
        return "images", [[v for v in values[row * width:(row + 1) * width] if v not in ("", b"")]
                          for row in range(shape[0])]
    return name, values


def _column_values(name: str, data, width: int) -> list:
    """Row-major values, flat or nested one level ([[v, ...], ...]); refuses anything deeper and
    anything over the cap before building rows."""
    if not isinstance(data, list):
        raise InputError(f"input {name!r}: 'data' must be a list")
    if len(data) > MAX_LISTINGS * width:
        raise InputError(f"input {name!r} holds {len(data)} values; at most {MAX_LISTINGS} listings")
    values = []
    for item in data:
        if isinstance(item, list):
            if len(item) != width or any(isinstance(value, (list, dict)) for value in item):
                raise InputError(f"input {name!r}: 'data' is nested deeper than its shape")
            values.extend(item)
        else:
            values.append(item)
    return values


def v2_response(results: list[dict], class_names: list[str], model_name: str,
                model_version: str | None, request_id: str | None) -> dict:
    """Category, its probability, the review flag, the top k and every class probability, one
    row per listing, and the class names in the order of `probabilities` (an output: the Open
    Inference Protocol allows only strings, numbers and booleans as parameter values)."""
    count, k = len(results), len(results[0]["top_k"])
    outputs = [
        _tensor("category", "BYTES", [count], [r["category"] for r in results]),
        _tensor("probability", "FP32", [count], [r["probability"] for r in results]),
        _tensor("needs_review", "BOOL", [count], [r["needs_review"] for r in results]),
        _tensor("top_categories", "BYTES", [count, k],
                [t["category"] for r in results for t in r["top_k"]]),
        _tensor("top_probabilities", "FP32", [count, k],
                [t["probability"] for r in results for t in r["top_k"]]),
        _tensor("probabilities", "FP32", [count, len(class_names)],
                [r["probabilities"][name] for r in results for name in class_names]),
        _tensor("classes", "BYTES", [len(class_names)], class_names),
    ]
    if "photos" in results[0]:
        outputs.append(_tensor("photos", "INT32", [count], [r["photos"] for r in results]))
    if "path" in results[0]:  # one row per listing, "" and 0 beyond the depth of its answer
        depth = max(len(r["path"]) for r in results)
        cells = [r["path"][level] if level < len(r["path"]) else None
                 for r in results for level in range(depth)]
        outputs += [_tensor("path", "BYTES", [count, depth], [c["name"] if c else "" for c in cells]),
                    _tensor("path_probabilities", "FP32", [count, depth],
                            [c["probability"] if c else 0.0 for c in cells]),
                    _tensor("confident_depth", "INT32", [count], [r["confident_depth"] for r in results])]
    if any("explanation" in r for r in results):  # JSON text per listing, "" where none was asked
        outputs.append(_tensor("explanation", "BYTES", [count],
                               [json.dumps(r["explanation"]) if "explanation" in r else "" for r in results]))
    response = {"model_name": model_name, "outputs": outputs}
    if model_version:
        response["model_version"] = model_version
    if request_id:
        response["id"] = request_id
    return response


def _tensor(name: str, datatype: str, shape: list[int], data: list) -> dict:
    return {"name": name, "datatype": datatype, "shape": shape, "data": data}
