"""`GrpcClient`: the served models from Python over gRPC, with the same calls and answers as the
HTTP `Client`. TorchServe's `Predictions` carries the listing API's JSON body as its `body` input
(the handler reads it as it reads the REST body); the second engine's Open Inference Protocol
`ModelInfer` carries BYTES tensors (photos as raw bytes). Needs `grpcio`, nothing generated:
the few messages used are described here, field numbers as in each engine's published .proto."""

from __future__ import annotations

import functools
import json
import time
from collections.abc import Callable
from pathlib import Path

from marketplace_classifier.client.base import DEFAULT_REQUEST_BYTES, BaseClient, backoff
from marketplace_classifier.client.errors import (
    TORCHSERVE_TOKEN_REFUSAL,
    BadRequest,
    ClassifierError,
    GatewayTimeout,
    ModelNotFound,
    PayloadTooLarge,
    ServerError,
    ServerUnreachable,
    ServiceUnavailable,
    Unauthorized,
    error_for,
)
from marketplace_classifier.client.types import Classification, Listing

TORCHSERVE_SERVICE = "/org.pytorch.serve.grpc.inference.InferenceAPIsService"
KSERVE_SERVICE = "/inference.GRPCInferenceService"
# the gRPC status (by name) -> the exception of the HTTP status it stands for
ERRORS_BY_CODE: dict[str, type[ClassifierError]] = {
    "INVALID_ARGUMENT": BadRequest,
    "UNAUTHENTICATED": Unauthorized,
    "PERMISSION_DENIED": Unauthorized,
    "NOT_FOUND": ModelNotFound,
    "RESOURCE_EXHAUSTED": PayloadTooLarge,
    "UNAVAILABLE": ServiceUnavailable,
    "DEADLINE_EXCEEDED": GatewayTimeout,
}
# field: (name, number, type, repeated, message type); types as descriptor_pb2.FieldDescriptorProto's
STRING, BYTES, BOOL, INT32, INT64, FLOAT, MESSAGE = 9, 12, 8, 5, 3, 2, 11
TORCHSERVE_MESSAGES = {
    "PredictionsRequest": [("model_name", 1, STRING, False, None), ("model_version", 2, STRING, False, None),
                           ("input", 3, MESSAGE, True, "PredictionsRequest.InputEntry")],
    "PredictionsRequest.InputEntry": [("key", 1, STRING, False, None), ("value", 2, BYTES, False, None)],
    "PredictionResponse": [("prediction", 1, BYTES, False, None)],
    "TorchServeHealthResponse": [("health", 1, STRING, False, None)],
}
OIP_MESSAGES = {
    "ServerReadyResponse": [("ready", 1, BOOL, False, None)],
    "InferParameter": [("bool_param", 1, BOOL, False, None), ("int64_param", 2, INT64, False, None),
                       ("string_param", 3, STRING, False, None)],
    "InferTensorContents": [("bool_contents", 1, BOOL, True, None),
                            ("int_contents", 2, INT32, True, None),
                            ("fp32_contents", 6, FLOAT, True, None),
                            ("bytes_contents", 8, BYTES, True, None)],
    "ModelInferRequest": [("model_name", 1, STRING, False, None), ("id", 3, STRING, False, None),
                          ("parameters", 4, MESSAGE, True, "ModelInferRequest.ParametersEntry"),
                          ("inputs", 5, MESSAGE, True, "ModelInferRequest.InferInputTensor")],
    "ModelInferRequest.ParametersEntry": [("key", 1, STRING, False, None),
                                          ("value", 2, MESSAGE, False, "InferParameter")],
    "ModelInferRequest.InferInputTensor": [("name", 1, STRING, False, None),
                                           ("datatype", 2, STRING, False, None),
                                           ("shape", 3, INT64, True, None),
                                           ("contents", 5, MESSAGE, False, "InferTensorContents")],
    "ModelInferResponse": [("model_name", 1, STRING, False, None),
                           ("model_version", 2, STRING, False, None),
                           ("outputs", 5, MESSAGE, True, "ModelInferResponse.InferOutputTensor")],
    "ModelInferResponse.InferOutputTensor": [("name", 1, STRING, False, None),
                                             ("datatype", 2, STRING, False, None),
                                             ("shape", 3, INT64, True, None),
                                             ("contents", 5, MESSAGE, False, "InferTensorContents")],
}
CONTENTS = {"BYTES": "bytes_contents", "FP32": "fp32_contents", "BOOL": "bool_contents",
            "INT32": "int_contents"}


@functools.cache
def messages(package: str) -> dict[str, type]:
    """The message classes of `package` (TorchServe's or the Open Inference Protocol's)."""
    from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

    table = TORCHSERVE_MESSAGES if package.startswith("org.") else OIP_MESSAGES
    file = descriptor_pb2.FileDescriptorProto(name=f"{package}.client.proto", package=package,
                                              syntax="proto3")
    described: dict[str, descriptor_pb2.DescriptorProto] = {}
    for name, fields in table.items():
        outer, _, inner = name.partition(".")
        message = (described[outer].nested_type.add(name=inner) if inner
                   else file.message_type.add(name=outer))
        if name.endswith("Entry"):
            message.options.map_entry = True
        described[name] = message
        for field_name, number, kind, repeated, type_name in fields:
            message.field.add(name=field_name, number=number, type=kind,
                              label=3 if repeated else 1,
                              type_name=f".{package}.{type_name}" if type_name else None)
    pool = descriptor_pool.DescriptorPool()
    pool.Add(file)
    return {name: message_factory.GetMessageClass(pool.FindMessageTypeByName(f"{package}.{name}"))
            for name in table if "." not in name}


class GrpcClient(BaseClient):
    """Classify listings with one served model over gRPC (TorchServe's port 7070, the second
    engine's 8086).

    >>> client = GrpcClient("127.0.0.1:7070", model="combined", key_file=".serve/key_file.json")
    >>> client.classify(text="Oak dining table, seats six").path_names
    """

    def __init__(
        self,
        target: str,
        model: str = "combined",
        *,
        token: str | None = None,
        key_file: str | Path | None = None,
        api: str = "auto",
        timeout: float = 60.0,
        retries: int = 3,
        max_retry_wait: float = 30.0,
        listings_per_request: int = 16,
        max_request_bytes: int = DEFAULT_REQUEST_BYTES,
        sleep: Callable[[float], None] = time.sleep,
    ):
        import grpc

        super().__init__(model, api=api, token=token, key_file=key_file, timeout=timeout, retries=retries,
                         max_retry_wait=max_retry_wait, listings_per_request=listings_per_request,
                         max_request_bytes=max_request_bytes, sleep=sleep)
        self.target = target.removeprefix("grpc://")
        limit = 2 * max_request_bytes  # answers are small; a request is at most max_request_bytes
        options = [("grpc.max_send_message_length", limit), ("grpc.max_receive_message_length", limit)]
        self.channel = grpc.insecure_channel(self.target, options=options)

    def ready(self) -> bool:
        """Whether the server says it is ready: TorchServe's Ping, else the protocol's ServerReady."""
        import grpc

        metadata = [("authorization", f"Bearer {self.token}")] if self.token else []
        checks = {"torchserve": [(f"{TORCHSERVE_SERVICE}/Ping", "org.pytorch.serve.grpc.inference",
                                  "TorchServeHealthResponse")],
                  "kserve": [(f"{KSERVE_SERVICE}/ServerReady", "inference", "ServerReadyResponse")]}
        for method, package, answer in checks.get(self.api, checks["torchserve"] + checks["kserve"]):
            call = self.channel.unary_unary(method, request_serializer=lambda _: b"",
                                            response_deserializer=messages(package)[answer].FromString)
            try:
                reply = call(None, timeout=self.timeout, metadata=metadata)
            except grpc.RpcError:
                continue
            return bool(getattr(reply, "ready", True))
        return False

    def close(self) -> None:
        self.channel.close()

    def request_kind(self, listing: Listing) -> object:
        """Open Inference Protocol requests share their inputs and parameters across listings."""
        if self.api == "torchserve":
            return None
        texts = tuple(value is not None for value in (listing.text, listing.product_name,
                                                      listing.product_description))
        return texts, bool(listing.images), listing.top_k, listing.min_confidence, listing.explain

    # ------------------------------------------------------------ requests
    def _send(self, listings: list[Listing]) -> list[Classification]:
        if self.api == "kserve":
            return self._answers(self._call(self._kserve, listings), listings)
        if self.api == "torchserve":
            return self._answers(self._call(self._torchserve, listings), listings)
        try:  # unknown yet: TorchServe's service, else (UNIMPLEMENTED) the second engine's
            answers = self._answers(self._call(self._torchserve, listings), listings)
        except ServerError as error:
            if "UNIMPLEMENTED" not in error.message:
                raise
            self.api = "kserve"
            return self._send(listings)
        self.api = "torchserve"
        return answers

    def _call(self, send: Callable[[list[Listing]], list], listings: list[Listing]) -> list:
        """`send` with retries: UNAVAILABLE (the server is full or starting) and a failed
        connection after 1, 2, 4 ... seconds; other refusals raise at once."""
        for attempt in range(self.retries + 1):
            try:
                return send(listings)
            except (ServiceUnavailable, ServerUnreachable) as error:
                if attempt == self.retries:
                    raise
                self.sleep(backoff(attempt, error.retry_after, self.max_retry_wait))
        raise ServiceUnavailable(f"no answer from {self.target}")  # not reached

    def _rpc(self, method: str, request, response_type):
        import grpc

        call = self.channel.unary_unary(method, request_serializer=type(request).SerializeToString,
                                        response_deserializer=response_type.FromString)
        metadata = [("authorization", f"Bearer {self.token}")] if self.token else []
        try:
            return call(request, timeout=self.timeout, metadata=metadata)
        except grpc.RpcError as error:
            raise grpc_error(error.code().name, error.details() or "", self.target) from error

    def _torchserve(self, listings: list[Listing]) -> list:
        types = messages("org.pytorch.serve.grpc.inference")
        body = json.dumps({"instances": [listing.to_json() for listing in listings]}).encode()
        reply = self._rpc(f"{TORCHSERVE_SERVICE}/Predictions",
                          types["PredictionsRequest"](model_name=self.model, input={"body": body}),
                          types["PredictionResponse"])
        try:
            answer = json.loads(reply.prediction)
        except ValueError as error:
            raise ServerError(f"the server's answer is not JSON: {reply.prediction[:200]!r}") from error
        if isinstance(answer, dict) and "error" in answer:  # TorchServe 0.12 sends a refusal with status OK
            raise error_for(int(answer.get("status") or 400), answer)
        return answer.get("predictions") if isinstance(answer, dict) else None

    def _kserve(self, listings: list[Listing]) -> list:
        types = messages("inference")
        reply = self._rpc(f"{KSERVE_SERVICE}/ModelInfer", oip_request(types, self.model, listings),
                          types["ModelInferResponse"])
        return oip_answers(reply)


def grpc_error(code: str, details: str, target: str) -> ClassifierError:
    if code == "UNAVAILABLE" and ("connect" in details.lower() or "refused" in details.lower()):
        return ServerUnreachable(f"cannot reach {target}: is the server running? ({details[:200]})")
    cls = ERRORS_BY_CODE.get(code, ServerError)
    if TORCHSERVE_TOKEN_REFUSAL in details:
        cls = Unauthorized
    elif "ModelNotFoundException" in details:  # TorchServe 0.12 sends an unknown model as INTERNAL
        cls = ModelNotFound
    return cls(f"gRPC {code}: {details[:500]}")


def oip_request(types: dict[str, type], model: str, listings: list[Listing]):
    """One ModelInferRequest for listings of one request_kind: a BYTES tensor per text field,
    photos as an [N, P] BYTES tensor with b"" in the slots a listing does not fill."""
    tensor, contents = types["ModelInferRequest"].InferInputTensor, types["InferTensorContents"]
    request = types["ModelInferRequest"](model_name=model)
    first = listings[0]
    for name in ("text", "product_name", "product_description"):
        if getattr(first, name) is not None:
            values = [getattr(listing, name).encode("utf-8") for listing in listings]
            request.inputs.append(tensor(name=name, datatype="BYTES", shape=[len(listings)],
                                         contents=contents(bytes_contents=values)))
    if first.images:
        width = max(len(listing.images) for listing in listings)
        photos = [photo for listing in listings
                  for photo in (*listing.images, *[b""] * (width - len(listing.images)))]
        request.inputs.append(tensor(name="image", datatype="BYTES", shape=[len(listings), width],
                                     contents=contents(bytes_contents=photos)))
    if first.top_k is not None:
        request.parameters["top_k"].CopyFrom(types["InferParameter"](int64_param=first.top_k))
    if first.explain is not None:
        request.parameters["explain"].CopyFrom(types["InferParameter"](bool_param=first.explain))
    if first.min_confidence is not None:  # the protocol's parameters have no float: its text
        text = str(first.min_confidence)
        request.parameters["min_confidence"].CopyFrom(types["InferParameter"](string_param=text))
    return request


def oip_answers(reply) -> list[dict]:
    """The answers of a ModelInferResponse, one dict per listing as the REST listing API sends."""
    outputs = {}
    for tensor in reply.outputs:
        values = list(getattr(tensor.contents, CONTENTS.get(tensor.datatype, "bytes_contents")))
        outputs[tensor.name] = [v.decode("utf-8") for v in values] if tensor.datatype == "BYTES" else values
    count = len(outputs.get("category", []))
    if not count:
        raise ServerError("the server's answer has no 'category' output")
    return [oip_answer(outputs, row, count, reply.model_version) for row in range(count)]


def oip_answer(outputs: dict[str, list], row: int, count: int, model_version: str) -> dict:
    def cells(name: str) -> list:  # row `row` of a [count, width] output sent row-major
        width = len(outputs[name]) // count
        return outputs[name][row * width:(row + 1) * width]

    answer = {name: outputs[name][row] for name in ("category", "probability", "needs_review")}
    answer["top_k"] = [{"category": category, "probability": probability} for category, probability
                       in zip(cells("top_categories"), cells("top_probabilities"), strict=True)]
    if "path" in outputs:  # "" past the depth of this listing's answer
        answer["path"] = [{"name": name, "probability": probability} for name, probability
                          in zip(cells("path"), cells("path_probabilities"), strict=True) if name]
        answer["confident_depth"] = outputs["confident_depth"][row]
    if "photos" in outputs:
        answer["photos"] = outputs["photos"][row]
    if "probabilities" in outputs and "classes" in outputs:
        answer["probabilities"] = dict(zip(outputs["classes"], cells("probabilities"), strict=True))
    if outputs.get("explanation") and outputs["explanation"][row]:  # JSON text; "" where none was asked
        answer["explanation"] = json.loads(outputs["explanation"][row])
    if model_version:
        answer["model_version"] = model_version
    return answer
