"""KServe's model server in front of the pod's TorchServe (the runtime image's entrypoint).

KServe's own Python model server (the `kserve` package) takes v1 and v2 REST requests on :8080
and forwards them, as its predictor client does, to TorchServe's `/v1/models/<m>:predict` or
`/v2/models/<m>/infer` on loopback. Two things are this project's: each model is ready only when
TorchServe reports a ready worker for it, and a handler's refusal (4xx) stays a 400 with the
handler's message instead of becoming KServe's generic 500.

Runs in its own virtual environment (KServe pins pandas < 3 and protobuf < 7, the project does
not), so it imports nothing from the project: the standard library, httpx and kserve only.
Usage: python kserve_torchserve.py --ts-config /mnt/models/config/config.properties
       [--protocol v1|v2] [--http-port 8080] [--ready-timeout 600]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import httpx

PROTOCOLS = {"v1": "v1", "v2": "v2"}
MAX_MESSAGE_CHARS = 1000


def read_properties(path: Path) -> dict[str, str]:
    """key=value lines of a Java properties file (this image cannot import ops/serve.py)."""
    lines = (line.strip() for line in Path(path).read_text().splitlines())
    pairs = (line.split("=", 1) for line in lines if line and not line.startswith("#") and "=" in line)
    return {key.strip(): value.strip() for key, value in pairs}


def model_names(properties: dict[str, str]) -> list[str]:
    """The models of the pod's startup snapshot (marketplace_classifier/ops/kserve_storage.py writes it)."""
    snapshot = properties.get("model_snapshot")
    if not snapshot:
        raise SystemExit("error: the TorchServe config has no model_snapshot: lay the storage out "
                         "with marketplace_classifier/ops/kserve_storage.py")
    return list(json.loads(snapshot)["models"])


def host_of(address: str) -> str:
    return address.split("://", 1)[-1].rstrip("/")


def model_ready(management: str, name: str) -> bool:
    """TorchServe's describe-model answer lists at least one READY worker."""
    try:
        with urllib.request.urlopen(f"{management}/models/{name}", timeout=5) as response:
            described = json.loads(response.read())
    except (urllib.error.URLError, OSError, ValueError):
        return False
    return any(worker.get("status") == "READY" for entry in described for worker in entry.get("workers", []))


def wait_until_ready(management: str, names: list[str], timeout: float) -> float:
    """Seconds until every model had a ready worker; exits when `timeout` passes first."""
    started = time.monotonic()
    waiting = list(names)
    while waiting:
        waiting = [name for name in waiting if not model_ready(management, name)]
        if waiting and time.monotonic() - started > timeout:
            raise SystemExit(f"error: TorchServe had no ready worker for {', '.join(waiting)} "
                             f"after {timeout:.0f} s")
        if waiting:
            time.sleep(0.5)
    return time.monotonic() - started


def refusal_message(response: httpx.Response) -> str:
    """The handler's own words from a 4xx body ({"error": ...}), short and ASCII."""
    try:
        message = str(json.loads(response.content).get("error", ""))
    except (ValueError, AttributeError):
        message = ""
    message = message or f"TorchServe refused the request (HTTP {response.status_code})"
    return message.encode("ascii", "backslashreplace").decode("ascii")[:MAX_MESSAGE_CHARS]


def torchserve_model(name: str):
    """One TorchServe model, forwarded to by KServe's predictor client; created once TorchServe
    has a ready worker for it."""
    from kserve import Model
    from kserve.errors import InvalidInput

    class TorchServeModel(Model):
        async def predict(self, payload, headers=None, response_headers=None):
            try:
                return await super().predict(payload, headers, response_headers)
            except httpx.HTTPStatusError as error:
                if 400 <= error.response.status_code < 500:
                    raise InvalidInput(refusal_message(error.response)) from error
                raise

    model = TorchServeModel(name)
    model.ready = True
    return model


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ts-config", type=Path, default=Path("/mnt/models/config/config.properties"),
                        help="TorchServe's config.properties in the pod")
    parser.add_argument("--protocol", choices=sorted(PROTOCOLS),
                        default=os.environ.get("PROTOCOL_VERSION", "v1"),
                        help="KServe protocol of the InferenceService (default: $PROTOCOL_VERSION or v1)")
    parser.add_argument("--http-port", type=int, default=int(os.environ.get("HTTP_PORT", 8080)))
    parser.add_argument("--ready-timeout", type=float, default=600.0,
                        help="seconds to wait for TorchServe's workers")
    args = parser.parse_args(argv)
    sys.argv = sys.argv[:1]  # kserve parses the command line when imported; these are not its options
    from kserve import ModelServer
    from kserve.predictor_config import PredictorConfig

    properties = read_properties(args.ts_config)
    names = model_names(properties)
    seconds = wait_until_ready(properties["management_address"].rstrip("/"), names, args.ready_timeout)
    print(f"TorchServe ready after {seconds:.1f} s: {', '.join(names)}", file=sys.stderr, flush=True)
    config = PredictorConfig(host_of(properties["inference_address"]), PROTOCOLS[args.protocol],
                             predictor_request_timeout_seconds=120)
    server = ModelServer(http_port=args.http_port, enable_grpc=False, predictor_config=config)
    server.start([torchserve_model(name) for name in names])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
