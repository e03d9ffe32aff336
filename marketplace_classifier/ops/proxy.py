"""Start, stop or reload nginx in front of either engine (deploy/nginx/nginx.conf.template): a
running TorchServe, or the second engine (KServe's server with Ray Serve).

Usage: marketplace-classifier proxy start|stop|reload|render [--engine torchserve|kserve_ray]
       [--config config.properties] [--state-dir .serve] [--artifacts-dir artifacts]
       [--engine-url 127.0.0.1:8085] [--engine-grpc 127.0.0.1:8086]
       [--listen 127.0.0.1:8000] [--grpc-listen 127.0.0.1:7000] [--max-connections 64]
       [--client-timeout 30] [--header-timeout 10]
In front of TorchServe, clients send its inference token (Authorization: Bearer <key> from
<state-dir>/key_file.json); `reload` picks up a renewed key. The second engine has no tokens of
its own, so the proxy makes one (<state-dir>/kserve_ray/proxy_key, 0600) and asks clients for
it. `GET /ping` answers the engine's health to anyone (a load balancer's health check has no
token). Needs nginx (apt-get install nginx-light).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import secrets
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from marketplace_classifier.ops import serve
from marketplace_classifier.serving.config import MAX_REQUEST_BYTES
from marketplace_classifier.serving.layout import ExportLayout

ROOT = serve.ROOT
TEMPLATE = ROOT / "deploy" / "nginx" / "nginx.conf.template"
TEMP_FOLDERS = ("body", "proxy", "fastcgi", "uwsgi", "scgi")
TOKEN = re.compile(r"[A-Za-z0-9_.~+/=-]{8,200}")  # nothing that could end the nginx string
MODEL_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")
PROXY_KEY = "proxy_key"


class ProxyError(RuntimeError):
    """nginx could not be configured, started or stopped as asked."""


@dataclass(frozen=True)
class ProxySettings:
    listen: str = "127.0.0.1:8000"
    grpc_listen: str = "127.0.0.1:7000"
    max_body: str = f"{MAX_REQUEST_BYTES // 2**20}m"  # what the engines read at most
    max_connections: int = 64  # per client address
    # Every connection nginx holds, open or half-sent; far above what the total cap admits, so
    # that clients that never finish their request head cannot take the last ones (they are
    # dropped after header_timeout).
    worker_connections: int = 16384
    # Connections whose request is being served, all clients together: each may hold a second
    # connection to the engine, so this stays well below worker_connections.
    total_connections: int = 4096
    header_timeout: int = 10  # seconds to send a whole request head
    client_timeout: int = 30  # seconds between two reads or writes of one client
    keepalive_timeout: int = 30
    upstream_timeout: int = 70  # above the models' 60 s responseTimeout

    def __post_init__(self) -> None:
        if not 0 < self.total_connections * 2 < self.worker_connections:
            raise ProxyError("total_connections must be below half of worker_connections (each may "
                             "hold a connection to the engine)")


@dataclass(frozen=True)
class Routes:
    """What one engine exposes through the proxy: prediction paths, gRPC methods, health."""

    predict: str  # a regex over the path; {models} stands for the model names
    grpc: str
    health: str


ROUTES = {
    "torchserve": Routes(
        predict=r"^/predictions/({models})(/[0-9][0-9.]{{0,30}})?$",
        grpc=r"^/org\.pytorch\.serve\.grpc\.inference\.InferenceAPIsService/(Predictions|StreamPredictions)$",
        health="/ping"),
    "kserve_ray": Routes(
        predict=r"^/v1/models/({models}):predict$|^/v2/models/({models})/infer$",
        grpc=r"^/inference\.GRPCInferenceService/(ModelInfer|ModelReady|ServerReady)$",
        health="/v2/health/ready"),
}


@dataclass(frozen=True)
class Upstream:
    """The engine behind the proxy: its addresses, models, the token clients must send, and the
    one the proxy sends for health checks ("" where the engine has none)."""

    engine: str
    rest: str  # host:port
    grpc: str
    models: tuple[str, ...]
    client_token: str
    engine_token: str = ""


def torchserve_upstream(config: Path, state: Path) -> Upstream:
    """TorchServe of `config`, its inference token read from `state` (key_file.json)."""
    properties = serve.read_properties(config)
    rest = urlsplit(properties["inference_address"])
    if rest.scheme != "http":
        raise ProxyError("the proxy forwards to TorchServe over plain HTTP on loopback; "
                         f"inference_address is {properties['inference_address']}")
    grpc_host = properties.get("grpc_inference_address", "127.0.0.1")
    token = serve.read_key(state / "key_file.json")
    return Upstream("torchserve", f"{rest.hostname}:{rest.port}",
                    f"{grpc_host}:{properties.get('grpc_inference_port', '7070')}",
                    tuple(serve.model_names(properties)), token, token)


def kserve_ray_upstream(rest: str, grpc: str, models: list[str], state: Path) -> Upstream:
    """The second engine at `rest` and `grpc`; the token clients send is the proxy's own."""
    return Upstream("kserve_ray", rest, grpc, tuple(models), proxy_key(state))


def proxy_key(state: Path) -> str:
    """The proxy's token for an engine without tokens, made once, readable by this user only."""
    path = state / PROXY_KEY
    if not path.exists():
        state.mkdir(parents=True, exist_ok=True)
        descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(descriptor, "w") as stream:
            stream.write(secrets.token_urlsafe(32))
    return path.read_text().strip()


def nginx_binary() -> str:
    found = shutil.which("nginx") or ("/usr/sbin/nginx" if Path("/usr/sbin/nginx").exists() else None)
    if found is None:
        raise ProxyError("nginx not found: apt-get install nginx-light")
    return found


def render(upstream: Upstream, state: Path, settings: ProxySettings) -> str:
    """The nginx configuration for this engine, its models and its tokens."""
    for token in filter(None, (upstream.client_token, upstream.engine_token)):
        if not TOKEN.fullmatch(token):
            raise ProxyError("a token has characters this configuration cannot quote")
    models = list(upstream.models)
    if not models or not all(MODEL_NAME.fullmatch(name) for name in models):
        raise ProxyError(f"model names must be letters, digits, '-' or '_': {models}")
    routes = ROUTES[upstream.engine]
    health_auth = f'"Bearer {upstream.engine_token}"' if upstream.engine_token else '""'
    values = {
        "USER": "user nobody nogroup;" if os.geteuid() == 0 else "",  # workers never run as root
        "STATE": str(state), "TOKEN": upstream.client_token, "ENGINE": upstream.engine,
        "PREDICT_PATHS": routes.predict.format(models="|".join(models)), "GRPC_METHODS": routes.grpc,
        "HEALTH_PATH": routes.health, "HEALTH_AUTHORIZATION": health_auth,
        "REST_UPSTREAM": upstream.rest, "GRPC_UPSTREAM": upstream.grpc, "LISTEN": settings.listen,
        "GRPC_LISTEN": settings.grpc_listen, "MAX_BODY": settings.max_body,
        "MAX_CONNECTIONS": str(settings.max_connections),
        "WORKER_CONNECTIONS": str(settings.worker_connections),
        "MAX_FILES": str(2 * settings.worker_connections + 64),
        "TOTAL_CONNECTIONS": str(settings.total_connections),
        "HEADER_TIMEOUT": str(settings.header_timeout),
        "CLIENT_TIMEOUT": str(settings.client_timeout),
        "KEEPALIVE_TIMEOUT": str(settings.keepalive_timeout),
        "UPSTREAM_TIMEOUT": str(settings.upstream_timeout),
    }
    text = TEMPLATE.read_text()
    for name, value in values.items():
        text = text.replace("{{" + name + "}}", value)
    left = re.findall(r"\{\{[A-Z_]+\}\}", text)
    if left:
        raise ProxyError(f"the template names settings this script does not fill: {sorted(set(left))}")
    return text


def write_config(upstream: Upstream, state: Path, settings: ProxySettings) -> Path:
    """Render the configuration into `state` (nginx.conf, temp folders) and check it with nginx -t."""
    proxy_state = (state / "proxy").resolve()
    for folder in TEMP_FOLDERS:
        (proxy_state / "tmp" / folder).mkdir(parents=True, exist_ok=True)
        if os.geteuid() == 0:
            shutil.chown(proxy_state / "tmp" / folder, "nobody", "nogroup")
    conf = proxy_state / "nginx.conf"
    conf.write_text(render(upstream, proxy_state, settings))
    conf.chmod(0o600)  # it holds the token
    check = subprocess.run([nginx_binary(), "-t", "-q", "-c", str(conf), "-p", str(proxy_state)],
                           capture_output=True, text=True)
    if check.returncode != 0:
        raise ProxyError(f"nginx refused the configuration: {check.stderr.strip()[-500:]}")
    return conf


def running_pid(state: Path) -> int | None:
    pid_file = state / "proxy" / "nginx.pid"
    if not pid_file.exists():
        return None
    try:
        pid = int(pid_file.read_text().strip())
        os.kill(pid, 0)
    except (ValueError, ProcessLookupError):
        return None
    return pid


def start(upstream: Upstream, state: Path, settings: ProxySettings) -> dict:
    if running_pid(state):
        raise ProxyError(f"a proxy is already running from {state / 'proxy'}: stop it first")
    conf = write_config(upstream, state, settings)
    started = subprocess.run([nginx_binary(), "-c", str(conf), "-p", str(conf.parent)],
                             capture_output=True, text=True)
    if started.returncode != 0:
        raise ProxyError(f"nginx did not start: {started.stderr.strip()[-500:]}")
    return {"rest": f"http://{settings.listen}", "grpc": settings.grpc_listen, "config": str(conf),
            "logs": str(conf.parent)}


def reload(upstream: Upstream, state: Path, settings: ProxySettings) -> dict:
    """Re-render (a renewed token, changed limits) and let nginx switch over without dropping
    connections."""
    pid = running_pid(state)
    if pid is None:
        raise ProxyError("no proxy is running: start it first")
    conf = write_config(upstream, state, settings)
    subprocess.run([nginx_binary(), "-s", "reload", "-c", str(conf), "-p", str(conf.parent)], check=True,
                   capture_output=True)
    return {"reloaded": str(conf)}


def stop(state: Path, timeout: float = 10) -> str:
    pid = running_pid(state)
    if pid is None:
        return "no proxy running"
    os.kill(pid, 15)  # fast shutdown
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and running_pid(state):
        time.sleep(0.1)
    return "proxy stopped"


def upstream_of(args: argparse.Namespace, state: Path) -> Upstream:
    if args.engine == "torchserve":
        return torchserve_upstream(args.config, state)
    folders = args.artifacts_dir.iterdir() if args.artifacts_dir.is_dir() else []
    models = sorted(folder.name for folder in folders if ExportLayout(folder).model.exists())
    return kserve_ray_upstream(args.engine_url, args.engine_grpc, models, state)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("action", choices=("start", "stop", "reload", "render"))
    parser.add_argument("--engine", choices=tuple(ROUTES), default="torchserve")
    parser.add_argument("--config", type=Path, default=ROOT / "config.properties")
    parser.add_argument("--state-dir", type=Path, default=ROOT / ".serve")
    parser.add_argument("--artifacts-dir", type=Path, default=ROOT / "artifacts",
                        help="the second engine's models: the exported folders it serves")
    parser.add_argument("--engine-url", default=f"127.0.0.1:{serve.KSERVE_RAY_PORT}",
                        help="the second engine's REST host:port (default: %(default)s)")
    parser.add_argument("--engine-grpc", default=f"127.0.0.1:{serve.KSERVE_RAY_GRPC_PORT}",
                        help="the second engine's gRPC host:port (default: %(default)s)")
    defaults = ProxySettings()
    parser.add_argument("--listen", default=defaults.listen, help="REST address (default: %(default)s)")
    parser.add_argument("--grpc-listen", default=defaults.grpc_listen,
                        help="gRPC address (default: %(default)s)")
    parser.add_argument("--max-connections", type=int, default=defaults.max_connections,
                        help="open connections per client address (default: %(default)s)")
    parser.add_argument("--client-timeout", type=int, default=defaults.client_timeout,
                        help="seconds a client may stay silent while sending or reading "
                             "(default: %(default)s)")
    parser.add_argument("--header-timeout", type=int, default=defaults.header_timeout,
                        help="seconds a client has to send a request head (default: %(default)s)")
    args = parser.parse_args(argv)
    state = serve.engine_state(args.state_dir.resolve(), args.engine)
    try:
        settings = ProxySettings(listen=args.listen, grpc_listen=args.grpc_listen,
                                 max_connections=args.max_connections, client_timeout=args.client_timeout,
                                 header_timeout=args.header_timeout)
        if args.action == "stop":
            print(stop(state))
            return 0
        upstream = upstream_of(args, state)
        if args.action == "start":
            print(json.dumps(start(upstream, state, settings) | {"token_file": token_file(upstream, state)},
                             indent=2))
        elif args.action == "reload":
            print(json.dumps(reload(upstream, state, settings), indent=2))
        else:
            print(render(upstream, state / "proxy", settings))
    except (ProxyError, serve.ServeError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


def token_file(upstream: Upstream, state: Path) -> str:
    """Where clients of the proxy find the token they send."""
    return str(state / ("key_file.json" if upstream.engine == "torchserve" else PROXY_KEY))


if __name__ == "__main__":
    raise SystemExit(main())
