"""Classify a listing's photo, text, or both with the served models, over REST or gRPC.

Usage: marketplace-classifier predict --model image|text|combined [--image PHOTO ...]
           [--text TEXT | --name NAME --description DESCRIPTION] [--url URL] [--timeout S]
           [--protocol rest|grpc] [--engine torchserve|kserve_ray] [--top-k 3] [--min-confidence P]
One listing per call, with all its photos: one answer. It goes through the Python client
(marketplace_classifier/client/): REST to --url (default: TorchServe's inference address in
config.properties, or the second engine's), gRPC to the engine's gRPC address; the token comes
from TorchServe's key file.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

import requests

from marketplace_classifier.client import Classification, ClassifierError, Client, Listing
from marketplace_classifier.client.grpc import GrpcClient
from marketplace_classifier.ops.serve import (
    KSERVE_RAY_GRPC_PORT,
    ROOT,
    read_key,
    read_properties,
)
from marketplace_classifier.serving.model_kinds import MODEL_KINDS

ENGINES = ("torchserve", "kserve_ray")
KSERVE_RAY_URL = "http://127.0.0.1:8085"


class ClientError(RuntimeError):
    """The server refused the request or could not be reached."""


def text_fields(text: str | None, name: str | None, description: str | None) -> dict[str, str]:
    if text is not None:
        return {"text": text}
    return {key: value for key, value in (("product_name", name), ("product_description", description))
            if value is not None}


def photo_parts(photos: bytes | list[bytes] | None) -> dict[str, bytes]:
    """A listing's photos under the names the handler reads: image, image_1, image_2, ..."""
    photos = [photos] if isinstance(photos, bytes) else list(photos or [])
    return {("image" if index == 0 else f"image_{index}"): data for index, data in enumerate(photos)}


def rest_predict(base_url: str, model: str, photos: bytes | list[bytes] | None, fields: dict,
                 top_k: int, token: str | None, timeout: float = 60) -> dict:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    url = f"{base_url}/predictions/{model}"
    try:
        if photos:
            parts = {name: ("photo", data, "application/octet-stream")
                     for name, data in photo_parts(photos).items()}
            response = requests.post(url, files=parts, data=fields | {"top_k": str(top_k)},
                                     headers=headers, timeout=timeout)
        else:
            response = requests.post(url, json=fields | {"top_k": top_k}, headers=headers,
                                     timeout=timeout)
    except requests.ConnectionError as error:
        raise ClientError(f"cannot reach {url}: is the server running?") from error
    body = _json(response.content)
    if response.status_code >= 400:
        raise ClientError(f"HTTP {response.status_code}: {body.get('error') or body.get('message') or body}")
    return body


def grpc_stubs():
    try:
        import inference_pb2
        import inference_pb2_grpc
    except ImportError:  # not generated at install time: generate now, beside the project
        from marketplace_classifier.ops.grpc_stubs import generate

        out = ROOT / "build" / "grpc"
        generate(out)
        sys.path.insert(0, str(out))
        import inference_pb2
        import inference_pb2_grpc
    return inference_pb2, inference_pb2_grpc


def grpc_predict(target: str, model: str, photos: bytes | list[bytes] | None, fields: dict,
                 top_k: int, token: str | None, timeout: float = 60) -> dict:
    import grpc

    messages, services = grpc_stubs()
    inputs = {key: value.encode("utf-8") for key, value in fields.items()}
    inputs["top_k"] = str(top_k).encode()
    inputs |= photo_parts(photos)
    metadata = [("authorization", f"Bearer {token}")] if token else []
    with grpc.insecure_channel(target) as channel:
        stub = services.InferenceAPIsServiceStub(channel)
        try:
            reply = stub.Predictions(messages.PredictionsRequest(model_name=model, input=inputs),
                                     metadata=metadata, timeout=timeout)
        except grpc.RpcError as error:
            raise ClientError(f"gRPC {error.code().name}: {error.details()}") from error
    body = _json(reply.prediction)
    if "error" in body:  # TorchServe 0.12 sends a handler's refusal with gRPC status OK
        raise ClientError(f"gRPC {body.get('grpc_code', 'UNKNOWN')}: {body['error']}")
    return body


def _json(content: bytes) -> dict:
    try:
        return json.loads(content)
    except ValueError:
        return {"error": content[:200].decode("utf-8", errors="replace")}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--model", choices=MODEL_KINDS, required=True)
    parser.add_argument("--image", type=Path, action="append", default=[],
                        help="a photo of the listing (repeat for each photo)")
    parser.add_argument("--text", help="name and description as one text")
    parser.add_argument("--name", help="product name")
    parser.add_argument("--description", help="product description")
    parser.add_argument("--url", help="the server's REST address (default: TorchServe's inference_address "
                                      "in --config, or --engine-url for the second engine)")
    parser.add_argument("--timeout", type=float, default=60.0, help="seconds to wait for the answer")
    parser.add_argument("--retries", type=int, default=3, help="retries of a 503 or a lost connection")
    parser.add_argument("--protocol", choices=("rest", "grpc"), default="rest")
    parser.add_argument("--engine", choices=ENGINES, default="torchserve",
                        help="the engine serving the models (kserve_ray: REST at --engine-url, gRPC at "
                             "--engine-grpc)")
    parser.add_argument("--engine-url", default=KSERVE_RAY_URL)
    parser.add_argument("--engine-grpc", default=f"127.0.0.1:{KSERVE_RAY_GRPC_PORT}")
    parser.add_argument("--top-k", type=int, default=3)
    parser.add_argument("--min-confidence", type=float,
                        help="file automatically at or above this probability (default: the threshold chosen "
                             "at export)")
    parser.add_argument("--explain", action="store_true",
                        help="add why the model answered what it did (the words and photo areas that "
                             "weighed most)")
    parser.add_argument("--config", type=Path, default=ROOT / "config.properties")
    parser.add_argument("--key-file", type=Path, default=ROOT / ".serve" / "key_file.json",
                        help="TorchServe's key file, read when it exists")
    parser.add_argument("--token", help="the token to send instead of the key file's (e.g. the proxy's)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        listing = Listing.of(args.text, args.image, name=args.name, description=args.description,
                             top_k=args.top_k, min_confidence=args.min_confidence,
                             explain=args.explain or None)
        answer = answer_json((rest_answer if args.protocol == "rest" else grpc_answer)(args, listing))
    except (ClientError, ClassifierError, OSError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    answer.pop("probabilities", None)
    print(json.dumps(answer, indent=2))
    if answer.get("path"):
        print(f"path: {path_line(answer['path'], answer.get('confident_depth', len(answer['path'])))}",
              file=sys.stderr)
    if answer.get("explanation"):
        print(f"why: {why_line(answer['explanation'])}", file=sys.stderr)
    return 0


def rest_answer(args: argparse.Namespace, listing: Listing) -> Classification:
    """The answer through the Python client, at --url or the engine's address."""
    if args.engine == "kserve_ray":
        url, api = args.url or args.engine_url, "kserve"
    else:
        url, api = args.url or read_properties(args.config)["inference_address"], "torchserve"
    token = args.token or (read_key(args.key_file) if args.engine == "torchserve" and args.key_file.exists()
                           else None)
    with Client(url, args.model, token=token, api=api, timeout=args.timeout, retries=args.retries) as client:
        return client.classify_listing(listing)


def grpc_answer(args: argparse.Namespace, listing: Listing) -> Classification:
    """The answer through the Python gRPC client, at the engine's gRPC address."""
    if args.engine == "kserve_ray":
        target, api, token = args.engine_grpc, "kserve", args.token
    else:
        properties = read_properties(args.config)
        target, api = (f"{properties.get('grpc_inference_address', '127.0.0.1')}:"
                       f"{properties.get('grpc_inference_port', '7070')}"), "torchserve"
        token = args.token or (read_key(args.key_file) if args.key_file.exists() else None)
    with GrpcClient(target, args.model, token=token, api=api, timeout=args.timeout,
                    retries=args.retries) as client:
        return client.classify_listing(listing)


def answer_json(answer: Classification) -> dict:
    """A typed answer as the server's JSON (fields it did not send left out)."""
    return {name: value for name, value in dataclasses.asdict(answer).items() if value is not None}


def why_line(explanation: dict) -> str:
    """The lexical terms for and against the answer, and each branch's part of the answer's
    margin over the runner-up, in one line."""
    if explanation.get("error"):
        return explanation["error"]
    terms = ((explanation.get("text") or {}).get("lexical") or {}).get("terms") or []
    parts = [", ".join(f"{term['term']} ({term['contribution']:+.2f})" for term in terms)] if terms else []
    parts += [f"{share['branch']} {share.get('contribution', 0.0):+.2f}"
              for share in explanation.get("branches") or []]
    if explanation.get("photos"):
        parts.append(f"{len(explanation['photos'])} photo heat map(s) in the JSON")
    return f"{explanation.get('category')}: " + "; ".join(parts)


def path_line(path: list[dict], confident_depth: int) -> str:
    """`Root / Sub / Leaf` with the confident part in [ ] and each level's probability."""
    names = [f"{level['name']} ({level['probability']:.2f})" for level in path]
    confident = " / ".join(names[:confident_depth])
    rest = " / ".join(names[confident_depth:])
    return " / ".join(part for part in (f"[{confident}]" if confident else "", rest) if part)


if __name__ == "__main__":
    raise SystemExit(main())
