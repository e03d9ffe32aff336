"""The listing API as an OpenAPI 3.1 document, generated from the dataclasses the client sends
and reads (client/types.py) and the refusal body every engine answers with (serving/errors.py's
shape): one description for TorchServe (/predictions/<model>) and the second engine
(/v1/models/<model>:predict). `marketplace-classifier openapi` writes it; docs/openapi.json is
its TorchServe edition, and the second engine serves its own at /openapi.json."""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import types
import typing
from html import escape
from pathlib import Path

from marketplace_classifier.client.types import (
    BranchShare,
    Choice,
    Classification,
    EncoderExplanation,
    Explanation,
    Level,
    LexicalExplanation,
    Listing,
    PhotoExplanation,
    Term,
    TextExplanation,
    Word,
)

OPENAPI_VERSION = "3.1.0"
SCHEMAS = (Listing, Level, Choice, Classification, Explanation, TextExplanation, LexicalExplanation, Term,
           EncoderExplanation, Word, BranchShare, PhotoExplanation)
ERROR_STATUSES = {
    "400": "the request or one of its listings is invalid",
    "401": "missing or wrong token",
    "404": "no such model",
    "413": "more work than one request may cost (photos, pixels, bytes)",
    "415": "a content type other than JSON, multipart or raw bytes",
    "503": "the server is full or starting: retry after Retry-After seconds",
    "504": "the model did not answer within the response timeout",
}
PATHS = {"torchserve": "/predictions/{model}", "kserve": "/v1/models/{model}:predict"}
MAX_LISTINGS = 64


def type_schema(hint) -> dict:
    """The JSON Schema of one field's type hint."""
    origin, arguments = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        options = [type_schema(argument) for argument in arguments if argument is not type(None)]
        schema = options[0] if len(options) == 1 else {"anyOf": options}
        return {"anyOf": [schema, {"type": "null"}]} if type(None) in arguments else schema
    if origin is tuple or origin is list:
        return {"type": "array", "items": type_schema(arguments[0])}
    if origin is dict:
        return {"type": "object", "additionalProperties": type_schema(arguments[1])}
    if dataclasses.is_dataclass(hint):
        return {"$ref": f"#/components/schemas/{hint.__name__}"}
    simple = {
        str: {"type": "string"},
        bytes: {"type": "string", "contentEncoding": "base64"},
        int: {"type": "integer"},
        float: {"type": "number"},
        bool: {"type": "boolean"},
    }
    return dict(simple[hint])


def dataclass_schema(cls) -> dict:
    """An object schema of a dataclass: a property per field (its metadata's doc, bounds and
    format), required where the field has no default or is marked always_sent."""
    hints = typing.get_type_hints(cls)
    properties, required = {}, []
    for item in dataclasses.fields(cls):
        schema = type_schema(hints[item.name])
        meta = item.metadata
        if "doc" in meta:
            schema["description"] = meta["doc"]
        for bound in ("minimum", "maximum"):
            if bound in meta:
                schema[bound] = meta[bound]
        properties[item.name] = schema
        no_default = item.default is dataclasses.MISSING and item.default_factory is dataclasses.MISSING
        if no_default or meta.get("always_sent"):
            required.append(item.name)
    schema = {
        "type": "object",
        "description": (cls.__doc__ or "").split("\n\n")[0].replace("\n", " ").strip(),
        "properties": properties,
    }
    return schema | ({"required": required} if required else {})


def components() -> dict:
    schemas = {cls.__name__: dataclass_schema(cls) for cls in SCHEMAS}
    schemas["Listing"]["minProperties"] = 1
    schemas["ListingsRequest"] = {
        "type": "object",
        "description": "Several listings in one request (KServe v1), answered in order.",
        "properties": {
            "instances": {
                "type": "array",
                "items": {"$ref": "#/components/schemas/Listing"},
                "minItems": 1,
                "maxItems": MAX_LISTINGS,
            }
        },
        "required": ["instances"],
        "additionalProperties": False,
    }
    schemas["ListingsAnswer"] = {
        "type": "object",
        "properties": {
            "predictions": {"type": "array", "items": {"$ref": "#/components/schemas/Classification"}}
        },
        "required": ["predictions"],
    }
    schemas["Refusal"] = {
        "type": "object",
        "description": "Why a request was refused (ASCII, at most 1,000 characters).",
        "properties": {
            "error": {"type": "string"},
            "status": {"type": "integer"},
            "grpc_code": {"type": "string"},
        },
        "required": ["error", "status"],
    }
    return {"schemas": schemas, "securitySchemes": {"token": {"type": "http", "scheme": "bearer"}}}


def operation(engine: str) -> dict:
    ref = "#/components/schemas/"
    one_or_many = (
        {"oneOf": [{"$ref": ref + "Listing"}, {"$ref": ref + "ListingsRequest"}]}
        if engine == "torchserve"
        else {"$ref": ref + "ListingsRequest"}
    )
    answers = (
        {"oneOf": [{"$ref": ref + "Classification"}, {"$ref": ref + "ListingsAnswer"}]}
        if engine == "torchserve"
        else {"$ref": ref + "ListingsAnswer"}
    )
    content = {"application/json": {"schema": one_or_many}}
    if engine == "torchserve":
        content["multipart/form-data"] = {
            "schema": {
                "type": "object",
                "description": "One listing: its photos as parts image, image_1, ... and its text fields",
                "properties": {
                    "image": {"type": "string", "contentMediaType": "application/octet-stream"},
                    "text": {"type": "string"},
                    "product_name": {"type": "string"},
                    "product_description": {"type": "string"},
                    "top_k": {"type": "string"},
                    "min_confidence": {"type": "string"},
                },
            }
        }
    responses = {
        "200": {
            "description": "one answer per listing, in the order sent",
            "content": {"application/json": {"schema": answers}},
        }
    }
    for status, description in ERROR_STATUSES.items():
        responses[status] = {
            "description": description,
            "content": {"application/json": {"schema": {"$ref": ref + "Refusal"}}},
        }
    responses["503"]["headers"] = {
        "Retry-After": {"description": "seconds to wait before retrying", "schema": {"type": "integer"}}
    }
    return {
        "post": {
            "operationId": "classify",
            "summary": "Classify listings into their category path",
            "parameters": [
                {
                    "name": "model",
                    "in": "path",
                    "required": True,
                    "schema": {"type": "string", "enum": ["image", "text", "combined"]},
                }
            ],
            "requestBody": {"required": True, "content": content},
            "responses": responses,
        }
    }


def document(engine: str = "torchserve", server: str = "http://127.0.0.1:8080") -> dict:
    """The OpenAPI document of the listing API on `engine` ("torchserve" or "kserve")."""
    if engine not in PATHS:
        raise ValueError(f"engine must be one of {', '.join(PATHS)}")
    from marketplace_classifier import __version__

    return {
        "openapi": OPENAPI_VERSION,
        "info": {
            "title": "marketplace-classifier listing API",
            "version": __version__,
            "description": "Classify second-hand marketplace listings (photos, text or both) into "
            "their category path: root, sub-category, leaf.",
        },
        "servers": [{"url": server}],
        "security": [{"token": []}] if engine == "torchserve" else [],
        "paths": {PATHS[engine]: operation(engine)},
        "components": components(),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="Write the listing API's OpenAPI document.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--engine", choices=tuple(PATHS), default="torchserve")
    parser.add_argument(
        "--server", default="http://127.0.0.1:8080", help="the server's address in the document"
    )
    parser.add_argument("--out", type=Path, help="the file to write (default: standard output)")
    args = parser.parse_args(argv)
    text = json.dumps(document(args.engine, args.server), indent=2) + "\n"
    if args.out:
        args.out.write_text(text)
    else:
        sys.stdout.write(text)
    return 0


def docs_page(spec: dict) -> str:
    """A self-contained HTML page of the document (no script, nothing fetched from elsewhere):
    the operations with their answers, then each schema's properties."""
    lines = [
        f"<!doctype html><html><head><meta charset='utf-8'><title>{escape(spec['info']['title'])}</title>"
        "<style>body{font-family:sans-serif;max-width:60em;margin:2em auto}td,th{padding:.2em .6em;"
        "text-align:left;vertical-align:top}code{background:#eee}</style></head><body>",
        f"<h1>{escape(spec['info']['title'])} {escape(spec['info']['version'])}</h1>",
        f"<p>{escape(spec['info']['description'])} The document itself: <a href='/openapi.json'>"
        "openapi.json</a>.</p>",
    ]
    for path, methods in spec["paths"].items():
        for method, op in methods.items():
            lines.append(
                f"<h2><code>{escape(method.upper())} {escape(path)}</code></h2><p>{escape(op['summary'])}"
                f"; bodies: {escape(', '.join(op['requestBody']['content']))}</p><table>"
            )
            lines += [
                f"<tr><th>{escape(code)}</th><td>{escape(answer['description'])}</td></tr>"
                for code, answer in op["responses"].items()
            ]
            lines.append("</table>")
    for name, schema in spec["components"]["schemas"].items():
        lines.append(
            f"<h3 id='{escape(name)}'>{escape(name)}</h3><p>{escape(schema.get('description', ''))}</p>"
            "<table><tr><th>field</th><th>type</th><th>required</th><th>meaning</th></tr>"
        )
        required = set(schema.get("required", ()))
        for field_name, field_schema in schema.get("properties", {}).items():
            lines.append(
                f"<tr><td><code>{escape(field_name)}</code></td><td>{escape(type_name(field_schema))}</td>"
                f"<td>{'yes' if field_name in required else ''}</td>"
                f"<td>{escape(field_schema.get('description', ''))}</td></tr>"
            )
        lines.append("</table>")
    return "\n".join(lines + ["</body></html>"])


def type_name(schema: dict) -> str:
    if "$ref" in schema:
        return schema["$ref"].rsplit("/", 1)[1]
    if "anyOf" in schema:
        return " or ".join(type_name(option) for option in schema["anyOf"])
    if schema.get("type") == "array":
        return f"list of {type_name(schema['items'])}"
    if schema.get("type") == "object" and "additionalProperties" in schema:
        return f"map to {type_name(schema['additionalProperties'])}"
    return str(schema.get("type", "any"))
