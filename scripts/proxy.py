"""Start, stop or reload nginx in front of a running TorchServe (deploy/nginx/nginx.conf.template).

Usage: python scripts/proxy.py start|stop|reload|render [--config config.properties] [--state-dir .serve]
       [--listen 127.0.0.1:8000] [--grpc-listen 127.0.0.1:7000] [--max-connections 64]
       [--client-timeout 30]
Clients call the proxy's address with the same inference token (Authorization: Bearer <key> from
<state-dir>/key_file.json); `reload` picks up a renewed key. Needs nginx (apt-get install nginx-light).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from scripts import serve

ROOT = serve.ROOT
TEMPLATE = ROOT / "deploy" / "nginx" / "nginx.conf.template"
TEMP_FOLDERS = ("body", "proxy", "fastcgi", "uwsgi", "scgi")
TOKEN = re.compile(r"[A-Za-z0-9_.~+/=-]{8,200}")  # nothing that could end the nginx string
MODEL_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")


class ProxyError(RuntimeError):
    """nginx could not be configured, started or stopped as asked."""


@dataclass(frozen=True)
class ProxySettings:
    listen: str = "127.0.0.1:8000"
    grpc_listen: str = "127.0.0.1:7000"
    max_body: str = "20m"  # TorchServe's max_request_size
    max_connections: int = 64  # per client address
    client_timeout: int = 30  # seconds between two reads or writes of one client
    keepalive_timeout: int = 30
    upstream_timeout: int = 70  # above the models' 60 s responseTimeout


def nginx_binary() -> str:
    found = shutil.which("nginx") or ("/usr/sbin/nginx" if Path("/usr/sbin/nginx").exists() else None)
    if found is None:
        raise ProxyError("nginx not found: apt-get install nginx-light")
    return found


def upstreams(properties: dict) -> tuple[str, str]:
    """TorchServe's inference REST and gRPC addresses, as host:port."""
    rest = urlsplit(properties["inference_address"])
    if rest.scheme != "http":
        raise ProxyError("the proxy forwards to TorchServe over plain HTTP on loopback; "
                         f"inference_address is {properties['inference_address']}")
    grpc_host = properties.get("grpc_inference_address", "127.0.0.1")
    return f"{rest.hostname}:{rest.port}", f"{grpc_host}:{properties.get('grpc_inference_port', '7070')}"


def render(properties: dict, token: str, state: Path, settings: ProxySettings) -> str:
    """The nginx configuration for this TorchServe, its models and its current inference token."""
    if not TOKEN.fullmatch(token):
        raise ProxyError("the inference key has characters this configuration cannot quote")
    models = serve.model_names(properties)
    if not models or not all(MODEL_NAME.fullmatch(name) for name in models):
        raise ProxyError(f"model names must be letters, digits, '-' or '_': {models}")
    rest, grpc = upstreams(properties)
    values = {
        "USER": "user nobody nogroup;" if os.geteuid() == 0 else "",  # workers never run as root
        "STATE": str(state), "TOKEN": token, "MODELS": "|".join(models),
        "REST_UPSTREAM": rest, "GRPC_UPSTREAM": grpc, "LISTEN": settings.listen,
        "GRPC_LISTEN": settings.grpc_listen, "MAX_BODY": settings.max_body,
        "MAX_CONNECTIONS": str(settings.max_connections),
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


def write_config(config: Path, state: Path, settings: ProxySettings) -> Path:
    """Render the configuration into `state` (nginx.conf, temp folders) and check it with nginx -t."""
    properties = serve.read_properties(config)
    token = serve.read_key(state / "key_file.json")
    proxy_state = (state / "proxy").resolve()
    for folder in TEMP_FOLDERS:
        (proxy_state / "tmp" / folder).mkdir(parents=True, exist_ok=True)
        if os.geteuid() == 0:
            shutil.chown(proxy_state / "tmp" / folder, "nobody", "nogroup")
    conf = proxy_state / "nginx.conf"
    conf.write_text(render(properties, token, proxy_state, settings))
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


def start(config: Path, state: Path, settings: ProxySettings) -> dict:
    if running_pid(state):
        raise ProxyError(f"a proxy is already running from {state / 'proxy'}: stop it first")
    conf = write_config(config, state, settings)
    started = subprocess.run([nginx_binary(), "-c", str(conf), "-p", str(conf.parent)],
                             capture_output=True, text=True)
    if started.returncode != 0:
        raise ProxyError(f"nginx did not start: {started.stderr.strip()[-500:]}")
    return {"rest": f"http://{settings.listen}", "grpc": settings.grpc_listen, "config": str(conf),
            "logs": str(conf.parent)}


def reload(config: Path, state: Path, settings: ProxySettings) -> dict:
    """Re-render (a renewed token, changed limits) and let nginx switch over without dropping
    connections."""
    pid = running_pid(state)
    if pid is None:
        raise ProxyError("no proxy is running: start it first")
    conf = write_config(config, state, settings)
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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("action", choices=("start", "stop", "reload", "render"))
    parser.add_argument("--config", type=Path, default=ROOT / "config.properties")
    parser.add_argument("--state-dir", type=Path, default=ROOT / ".serve")
    defaults = ProxySettings()
    parser.add_argument("--listen", default=defaults.listen, help="REST address (default: %(default)s)")
    parser.add_argument("--grpc-listen", default=defaults.grpc_listen,
                        help="gRPC address (default: %(default)s)")
    parser.add_argument("--max-connections", type=int, default=defaults.max_connections,
                        help="open connections per client address (default: %(default)s)")
    parser.add_argument("--client-timeout", type=int, default=defaults.client_timeout,
                        help="seconds a client may stay silent while sending or reading "
                             "(default: %(default)s)")
    args = parser.parse_args(argv)
    settings = ProxySettings(listen=args.listen, grpc_listen=args.grpc_listen,
                             max_connections=args.max_connections, client_timeout=args.client_timeout)
    state = args.state_dir.resolve()
    try:
        if args.action == "start":
            print(json.dumps(start(args.config, state, settings), indent=2))
        elif args.action == "reload":
            print(json.dumps(reload(args.config, state, settings), indent=2))
        elif args.action == "render":
            print(render(serve.read_properties(args.config), serve.read_key(state / "key_file.json"),
                         state / "proxy", settings))
        else:
            print(stop(state))
    except (ProxyError, serve.ServeError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
