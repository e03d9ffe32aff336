"""An Open Inference Protocol gRPC client for the second engine, on KServe's own generated
messages (so it runs in .venv-engine, like the server).

Usage: .venv-engine/bin/python -m marketplace_classifier.engines.kserve_ray.grpc_client --target
127.0.0.1:8086 < request.json
The request is the REST v2 body plus "model": BYTES inputs with photos as base64 (sent as raw
bytes over gRPC), texts as strings (or {"b64": ...} for raw bytes), and "parameters" top_k /
min_confidence. Prints the answer as the REST v2 body, or {"code": ..., "details": ...} and exits 1
when the server refuses. A JSON list of requests gets a JSON list of answers (one channel).
"""

from __future__ import annotations

import argparse
import base64
import json
import sys


def infer_request(body: dict):
    """The ModelInferRequest of a REST-shaped v2 body."""
    from kserve.protocol.grpc import grpc_predict_v2_pb2 as pb

    request = pb.ModelInferRequest(model_name=body["model"], id=body.get("id", ""))
    for tensor in body["inputs"]:
        values = [_bytes(value, tensor["name"] == "image") for value in tensor["data"]]
        request.inputs.append(pb.ModelInferRequest.InferInputTensor(
            name=tensor["name"], datatype=tensor["datatype"], shape=tensor["shape"],
            contents=pb.InferTensorContents(bytes_contents=values)))
    for key, value in (body.get("parameters") or {}).items():
        # KServe's InferParameter has no float field: a number that is not whole goes as its text
        if isinstance(value, bool):
            parameter = pb.InferParameter(bool_param=value)
        elif isinstance(value, int):
            parameter = pb.InferParameter(int64_param=value)
        else:
            parameter = pb.InferParameter(string_param=str(value))
        request.parameters[key].CopyFrom(parameter)
    return request


def _bytes(value, photo: bool) -> bytes:
    if isinstance(value, dict):  # {"b64": ...}: these exact bytes
        return base64.b64decode(value["b64"])
    return base64.b64decode(value) if photo else str(value).encode("utf-8")


def answer_body(response) -> dict:
    """A ModelInferResponse as the REST v2 body (the same outputs, names and order)."""
    contents = {"BYTES": "bytes_contents", "FP32": "fp32_contents", "BOOL": "bool_contents",
                "INT32": "int_contents"}
    outputs = []
    for tensor in response.outputs:
        data = list(getattr(tensor.contents, contents[tensor.datatype]))
        if tensor.datatype == "BYTES":
            data = [value.decode("utf-8") for value in data]
        outputs.append({"name": tensor.name, "datatype": tensor.datatype, "shape": list(tensor.shape),
                        "data": data})
    body = {"model_name": response.model_name, "outputs": outputs}
    if response.id:
        body["id"] = response.id
    return body


def answers(target: str, bodies: list[dict], timeout: float = 60) -> list[dict]:
    """Each request's answer, or {"code": ..., "details": ...} where the server refused it."""
    import grpc
    from kserve.protocol.grpc import grpc_predict_v2_pb2_grpc as services

    results = []
    with grpc.insecure_channel(target) as channel:
        stub = services.GRPCInferenceServiceStub(channel)
        for body in bodies:
            try:
                results.append(answer_body(stub.ModelInfer(infer_request(body), timeout=timeout)))
            except grpc.RpcError as error:
                results.append({"code": error.code().name, "details": error.details()})
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--target", default="127.0.0.1:8086")
    # not --timeout: KServe parses the process's arguments when it is imported, and would take
    # --timeout for its own --timeout-keep-alive (an int)
    parser.add_argument("--deadline", type=float, default=60, help="seconds for each request")
    args = parser.parse_args(argv)
    try:
        request = json.load(sys.stdin)
        results = answers(args.target, request if isinstance(request, list) else [request], args.deadline)
    except (ValueError, KeyError, TypeError) as error:
        print(f"error: the request on stdin is not a v2 body with 'model': {error}", file=sys.stderr)
        return 2
    print(json.dumps(results if isinstance(request, list) else results[0]))
    return 1 if any("code" in result for result in results) else 0


if __name__ == "__main__":
    raise SystemExit(main())
