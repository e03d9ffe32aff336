"""The second engine: KServe's model server (REST v1 and the Open Inference Protocol v2) in front
of Ray Serve, whose replicas run the serving core (marketplace_classifier/serving/core.py) and batch by cost
(marketplace_classifier/serving/admission.py). No JVM and no TorchServe.

Usage: python -m marketplace_classifier.engines.kserve_ray.server --artifacts-dir artifacts [--models image
text combined]
       [--http-port 8085] [--grpc-port 8086 | --no-grpc] [--host 127.0.0.1] [--replicas 2]
       [--max-batch-size 4] [--batch-wait-ms 10] [--state-dir .serve/kserve_ray]
Runs in .venv-engine (`make engine-venv`): KServe pins pandas < 3 and protobuf < 7, the project
newer ones. REST and the Open Inference Protocol's gRPC bind to 127.0.0.1 unless --host says
otherwise; Ray's own ports listen on 127.0.0.1 and need its cluster token, kept in
<state-dir>/ray_token (SECURITY.md). The runtime image
(deploy/kserve/Dockerfile.ray) runs this module.
Ready (`/v2/models/<m>/ready`) once every replica of the model has loaded it.
"""

from __future__ import annotations

import argparse
import os
import secrets
import sys
import time
from pathlib import Path

from marketplace_classifier.project import ROOT as PROJECT_ROOT
from marketplace_classifier.serving.layout import ExportLayout

ROOT = PROJECT_ROOT
MAX_MESSAGE_CHARS = 1000
LOOPBACK = "127.0.0.1"
RAY_TOKEN_FILE = "ray_token"
CONNECTION_LIMIT = 1024  # connections and requests in progress; beyond it uvicorn answers 503
# KServe's model repository API (load/unload without any authentication) and explanations
HIDDEN_PREFIXES, HIDDEN_SUFFIXES = ("/v2/repository",), (":explain",)


def listing_deployment(model_dir: Path, options: dict, replicas: int, plan):
    """A Ray Serve deployment of one exported model: each replica is a ListingService whose
    CostBatcher (serving/admission.py) admits requests by their cost before batching them, as
    TorchServe's workers do per batch, and answers 503 + Retry-After to what does not fit."""
    from ray import serve

    @serve.deployment(name=model_dir.name, num_replicas=replicas, ray_actor_options={"num_cpus": 0},
                      max_ongoing_requests=4 * plan.batch_size)
    class ListingDeployment:
        def __init__(self):
            import logging

            from marketplace_classifier.serving.admission import CostBatcher
            from marketplace_classifier.serving.core import ListingService, ServingOptions

            logging.basicConfig(level=logging.INFO)  # the core's batch lines, in the replica's log
            bind_replica_grpc_to_loopback()
            service = ListingService(model_dir, ServingOptions.from_options(options),
                                     model_name=model_dir.name)
            self.batcher = CostBatcher(service, plan.batch_size, plan.max_batch_delay_ms / 1000,
                                       plan.response_timeout_s)

        async def __call__(self, body) -> tuple[int, dict, dict]:
            from marketplace_classifier.serving.core import Request

            answer = await self.batcher.submit(Request({"body": body}, "application/json"))
            return answer.status, answer.body, answer.headers

    return ListingDeployment


def bind_replica_grpc_to_loopback() -> None:
    """Ray Serve 2.60 binds each replica's inter-deployment gRPC server to "[::]" (hard-coded, no
    setting); on one machine every peer reaches it through the node address, 127.0.0.1, so the
    replica binds it there. Runs in the replica before Ray Serve starts that server."""
    import logging

    from ray.serve._private import replica

    bind = getattr(replica, "add_port_to_grpc_server", None)
    if bind is None:
        logging.getLogger(__name__).warning("Ray Serve changed: its replicas' gRPC port stays on [::]")
        return
    replica.add_port_to_grpc_server = \
        lambda server, address: bind(server, address.replace("[::]", LOOPBACK, 1))


class Refused(Exception):
    """The core's refusal, answered over REST with its own status, JSON body and headers."""

    def __init__(self, status: int, body: dict, headers: dict):
        super().__init__(body.get("error", ""))
        self.status, self.body, self.headers = status, body, headers


async def refused_handler(_, error: Refused):
    from fastapi.responses import JSONResponse

    return JSONResponse(error.body, status_code=error.status, headers=error.headers)


def kserve_model(name: str, handle):
    """KServe's view of one deployment: the request body goes to a replica as plain JSON, and a
    refusal comes back as the core's status and message (never a Ray traceback)."""
    from kserve.errors import InvalidInput, ServerNotReady
    from kserve.metrics import PREDICT_HIST_TIME
    from kserve.model import InferenceModel

    class ListingModel(InferenceModel):
        def __init__(self):
            super().__init__(name)
            self.ready = True  # serve.run returned: every replica has loaded the model

        async def __call__(self, body, headers=None, verb=None):
            over_grpc = getattr(body, "from_grpc", False)
            if hasattr(body, "to_rest"):  # an Open Inference Protocol request KServe decoded
                body, _ = body.to_rest()  # over gRPC, BYTES values stay bytes: photos need no base64
                if not isinstance(body, dict):
                    raise InvalidInput("the binary tensor extension is not accepted: send BYTES inputs "
                                       "as JSON strings (base64 for photos) or gRPC bytes_contents")
            with PREDICT_HIST_TIME.labels(model_name=name).time():  # KServe's own Prometheus histogram
                status, answer, headers = await handle.remote(body)
            if status != 200 and not over_grpc:
                raise Refused(status, answer, headers)
            if status in (503, 504):  # gRPC UNAVAILABLE: a client retries it
                raise ServerNotReady(answer["error"])
            if status != 200:
                raise InvalidInput(answer["error"][:MAX_MESSAGE_CHARS])
            return (grpc_answer(answer) if over_grpc else answer), {}

        def load(self) -> bool:
            return self.ready

    return ListingModel()


def grpc_answer(answer: dict):
    """The core's v2 answer as KServe's InferResponse, which its gRPC servicer turns into
    ModelInferResponse tensors (a plain dict only works over REST)."""
    from kserve.protocol.infer_type import InferOutput, InferResponse

    if "outputs" not in answer:
        raise ValueError("a gRPC request got an answer that is not Open Inference Protocol v2")
    outputs = [InferOutput(o["name"], o["shape"], o["datatype"], o["data"]) for o in answer["outputs"]]
    return InferResponse(answer.get("id", ""), answer["model_name"], outputs,
                         model_version=answer.get("model_version"), from_grpc=True)


def grpc_server(host: str):
    """KServe's Open Inference Protocol gRPC server bound to `host` (KServe's own binds [::], every
    interface, with no way to change it), with KServe's servicer and error interceptor but
    without RepositoryModelLoad/Unload: the gRPC counterpart of hiding `/v2/repository`."""
    from concurrent import futures

    import grpc
    from grpc import aio
    from kserve.protocol.grpc import grpc_predict_v2_pb2_grpc
    from kserve.protocol.grpc.interceptors import ExceptionToStatusInterceptor
    from kserve.protocol.grpc.server import GRPCServer
    from kserve.protocol.grpc.servicer import InferenceServicer

    class WithoutRepository(InferenceServicer):
        async def RepositoryModelLoad(self, request, context):
            await context.abort(grpc.StatusCode.UNIMPLEMENTED, "the model repository API is off")

        async def RepositoryModelUnload(self, request, context):
            await context.abort(grpc.StatusCode.UNIMPLEMENTED, "the model repository API is off")

    class BoundGRPCServer(GRPCServer):
        async def start(self, max_workers):
            from marketplace_classifier.serving.config import MAX_REQUEST_BYTES

            limits = [("grpc.max_send_message_length", MAX_REQUEST_BYTES),
                      ("grpc.max_receive_message_length", MAX_REQUEST_BYTES)]
            self._server = aio.server(futures.ThreadPoolExecutor(max_workers=max_workers),
                                      interceptors=(ExceptionToStatusInterceptor(),), options=limits)
            servicer = WithoutRepository(self._data_plane, self._model_repository_extension)
            grpc_predict_v2_pb2_grpc.add_GRPCInferenceServiceServicer_to_server(servicer, self._server)
            address = f"[{host}]:{self._port}" if ":" in host else f"{host}:{self._port}"
            if self._server.add_insecure_port(address) == 0:
                raise OSError(f"cannot bind gRPC to {address}")
            await self._server.start()
            await self._server.wait_for_termination()

    return BoundGRPCServer


def rest_server(host: str):
    """KServe's RESTServer, bound to `host` (KServe binds 0.0.0.0) and without the model
    repository API (`/v2/repository/...`), which lets anyone who reaches the port unload a model:
    the counterpart of TorchServe's enable_model_api=false. Its front door
    (marketplace_classifier/engines/kserve_ray/front.py)
    caps bodies, their structure and their time, and the time of each request head; uvicorn
    caps the connections."""
    from kserve.protocol.rest.server import RESTServer

    from marketplace_classifier.engines.kserve_ray.front import BodyGuard, HeaderDeadline
    from marketplace_classifier.serving.config import MAX_REQUEST_BYTES

    class BoundRESTServer(RESTServer):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.config.host = host
            self.config.http = HeaderDeadline
            self.config.limit_concurrency = CONNECTION_LIMIT

        def _add_exception_handlers(self, app) -> None:
            super()._add_exception_handlers(app)
            app.add_exception_handler(Refused, refused_handler)

        def _add_middlewares(self, app) -> None:
            from fastapi.responses import JSONResponse

            super()._add_middlewares(app)

            @app.middleware("http")
            async def hide_repository(request, call_next):
                path = request.url.path
                if path.startswith(HIDDEN_PREFIXES) or path.endswith(HIDDEN_SUFFIXES):
                    return JSONResponse({"error": "not found"}, status_code=404)
                return await call_next(request)

            app.add_middleware(BodyGuard, max_bytes=MAX_REQUEST_BYTES)  # the outermost: first to run
            describe_listing_api(app)

    return BoundRESTServer


def describe_listing_api(app) -> None:
    """/openapi.json: the listing API's document (client/openapi.py) in place of KServe's own,
    and /docs: a page of it that loads nothing from elsewhere."""
    from fastapi.responses import HTMLResponse

    from marketplace_classifier.client.openapi import docs_page, document

    spec = document("kserve", server="/")
    app.openapi = lambda: spec
    page = docs_page(spec)
    app.add_api_route("/docs", lambda: HTMLResponse(page), methods=["GET"], include_in_schema=False)


def private_folder(path: Path) -> Path:
    """`path`, created if need be, readable and writable by this user only."""
    path.mkdir(parents=True, exist_ok=True)
    path.chmod(0o700)
    return path


def lock_down_ray(state_dir: Path) -> Path:
    """Ray's settings for one machine, set by the project rather than left to Ray's defaults:
    token authentication on, with its token in a 0600 file of the state folder (not the
    user's ~/.ray); Ray's temporary folder inside the state folder, which is private (Ray makes
    its own folders world-writable: RAY_TEMP's parent keeps others out). Returns Ray's folder."""
    private_folder(state_dir)
    token = state_dir / RAY_TOKEN_FILE
    if not token.exists():
        descriptor = os.open(token, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(descriptor, "w") as stream:
            stream.write(secrets.token_hex(32))
    token.chmod(0o600)
    os.environ |= {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token),
                   # Ray's own Prometheus exporters listen on every interface; the project's
                   # exporter (serving/metrics_exporter.py) serves the signals on loopback
                   "RAY_enable_metrics_collection": "0",
                   # one machine: Ray otherwise swaps the node address 127.0.0.1 for the host's
                   # reachable one (GCS, agents); this is its switch for single-machine clusters
                   "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
    return private_folder(state_dir / "ray")


def make_private(folder: Path) -> None:
    """Take group and other permissions off every folder Ray made (it makes them 0777)."""
    for path in [folder, *folder.rglob("*")]:
        if path.is_dir() and not path.is_symlink():
            path.chmod(0o700)


def chosen_plan(plan, args: argparse.Namespace):
    """The model's serving plan (what an archive of it carries) with the command line's batching."""
    from dataclasses import replace

    return replace(plan, batch_size=args.max_batch_size or plan.batch_size,
                   max_batch_delay_ms=plan.max_batch_delay_ms if args.batch_wait_ms is None
                   else args.batch_wait_ms)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--artifacts-dir", type=Path, default=ROOT / "artifacts")
    parser.add_argument("--models", nargs="+", default=["image", "text", "combined"])
    parser.add_argument("--http-port", type=int, default=8085)
    parser.add_argument("--grpc-port", type=int, default=8086,
                        help="Open Inference Protocol over gRPC (default: %(default)s)")
    parser.add_argument("--no-grpc", action="store_true", help="REST only")
    parser.add_argument("--host", default="127.0.0.1",
                        help="address of REST and gRPC (a pod: 0.0.0.0, behind its NetworkPolicy)")
    parser.add_argument("--replicas", type=int, default=2, help="replicas per model (default: %(default)s)")
    parser.add_argument("--max-batch-size", type=int, default=None,
                        help="requests per batch (default: the archives' batchSize, serving/config.py)")
    parser.add_argument("--batch-wait-ms", type=float, default=None,
                        help="how long a batch waits for more (default: the archives' maxBatchDelay)")
    parser.add_argument("--state-dir", type=Path, default=ROOT / ".serve" / "kserve_ray",
                        help="the engine's own folder (private): Ray's files, its token")
    args = parser.parse_args(argv)
    missing = [m for m in args.models if not ExportLayout(args.artifacts_dir / m).model.exists()]
    if missing:
        print(f"error: {args.artifacts_dir} has no exported {', '.join(missing)} model", file=sys.stderr)
        return 2
    from marketplace_classifier.serving.config import ServingPlan

    sys.argv = sys.argv[:1]  # kserve parses the command line when imported; these are not its options
    started = time.monotonic()
    ray_temp = lock_down_ray(args.state_dir.resolve())  # before Ray is imported: it reads them then
    import kserve.model_server
    import ray
    from ray import serve

    from marketplace_classifier.serving.core import available_cores

    # the replicas import marketplace_classifier/serving/ from the project
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    ray.init(num_cpus=available_cores(), include_dashboard=False, log_to_driver=False,
             _node_ip_address=LOOPBACK, _temp_dir=str(ray_temp))
    serve.start(http_options={"location": "NoServer"})  # KServe's server takes the requests
    models = []
    for name in args.models:
        folder = (args.artifacts_dir / name).resolve()
        # the same plan an archive of this model carries; the replicas share the cores
        plan = chosen_plan(ServingPlan.for_model(name), args)
        options = plan.core_options(available_cores(), args.replicas)
        deployment = listing_deployment(folder, options, args.replicas, plan)
        handle = serve.run(deployment.bind(), name=name, route_prefix=None)
        models.append(kserve_model(name, handle))
    make_private(ray_temp)  # once Ray and every replica have made their folders
    grpc_note = "" if args.no_grpc else f" and grpc://{args.host}:{args.grpc_port}"
    print(f"ready after {time.monotonic() - started:.1f} s: {', '.join(args.models)} on "
          f"http://{args.host}:{args.http_port}{grpc_note}", file=sys.stderr, flush=True)
    kserve.model_server.RESTServer = rest_server(args.host)
    kserve.model_server.GRPCServer = grpc_server(args.host)
    kserve.model_server.ModelServer(http_port=args.http_port, grpc_port=args.grpc_port,
                                    enable_grpc=not args.no_grpc).start(models)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
