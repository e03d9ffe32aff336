"""Processes of the two engines, for ops/engines.py (the Engine interface and the `serve`
command): TorchServe with a config.properties and its archives, and the second engine, KServe's
model server with Ray Serve (engines/kserve_ray/server.py), from the exported folders; configs
derived from config.properties, keys, readiness, the signals exporter, each engine's state folder.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from urllib.parse import urlparse

import requests

from marketplace_classifier.client.base import read_token
from marketplace_classifier.project import ROOT as PROJECT_ROOT

ROOT = PROJECT_ROOT


class ServeError(RuntimeError):
    """TorchServe could not be started, reached or stopped as asked."""


LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")
EXPORTER_PID = "exporter.pid"


def read_properties(path: Path) -> dict[str, str]:
    properties = {}
    for line in Path(path).read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#") and "=" in line:
            key, value = line.split("=", 1)
            properties[key.strip()] = value.strip()
    return properties


def derive_config(source: Path, destination: Path, changes: dict[str, str], header: str = ""
                  ) -> dict[str, str]:
    """Write `source` with the settings in `changes` replaced (or added at the end), comments and
    everything else kept, after the comment `header`; return the written settings. The one way
    configs are derived."""
    lines, seen = header.splitlines(), set()
    for line in Path(source).read_text().splitlines():
        key = line.split("=", 1)[0].strip()
        if not line.lstrip().startswith("#") and "=" in line and key in changes:
            line, _ = f"{key}={changes[key]}", seen.add(key)
        lines.append(line)
    lines += [f"{key}={value}" for key, value in changes.items() if key not in seen]
    Path(destination).write_text("\n".join(lines) + "\n")
    return read_properties(destination)


def port_is_free(port: int) -> bool:
    """Whether a TCP port on 127.0.0.1 can be listened on now (with SO_REUSEADDR, as the servers
    started here bind: a connection that merely used the port does not hold it)."""
    with socket.socket() as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def free_port(span: int = 1) -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now, with the `span - 1` ports after it free
    too: a server whose companions listen beside it (the signals after the metrics API, the
    second engine's gRPC and signals after its REST) gets room for them."""
    while True:
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        if port + span <= 65536 and all(port_is_free(port + step) for step in range(1, span)):
            return port


def loopback_config(destination: Path, changes: dict[str, str]) -> dict[str, str]:
    """config.properties with every API on a free loopback port (so that it runs beside another
    server), plus `changes`; everything else as shipped."""
    ports = {key: f"http://127.0.0.1:{free_port()}" for key in ("inference_address", "management_address")}
    ports["metrics_address"] = f"http://127.0.0.1:{free_port(span=2)}"  # the signals on the port after
    ports |= {key: str(free_port()) for key in ("grpc_inference_port", "grpc_management_port")}
    return derive_config(ROOT / "config.properties", destination, ports | changes)


def model_names(properties: dict) -> list[str]:
    """The models a config loads: its model_snapshot's, else those named in load_models."""
    if properties.get("model_snapshot"):
        return list(json.loads(properties["model_snapshot"])["models"])
    return [name.strip().removesuffix(".mar") for name in properties.get("load_models", "").split(",")
            if name.strip() and name.strip() not in ("all", "ALL")]


def tokens_disabled(properties: dict) -> bool:
    return properties.get("disable_token_authorization", "false").strip().lower() == "true"


def read_key(key_file: Path, kind: str = "inference") -> str:
    """TorchServe's `kind` token, as the client reads it (client/http.py), or ServeError."""
    try:
        return read_token(key_file, kind)
    except ValueError as error:
        raise ServeError(str(error)) from error


def auth_headers(key_file: Path | None, kind: str = "inference") -> dict[str, str]:
    if key_file is None or not Path(key_file).exists():
        return {}
    return {"Authorization": f"Bearer {read_key(key_file, kind)}"}


def torchserve_binary() -> str:
    found = shutil.which("torchserve") or str(Path(sys.executable).parent / "torchserve")
    if not Path(found).exists():
        raise ServeError("torchserve is not installed in this environment (pip install torchserve)")
    return found


def raise_open_file_limit() -> None:
    """Let the server hold as many connections as the system allows: TorchServe 0.12 never
    times out an idle HTTP connection, so each one holds a file descriptor (see SECURITY.md)."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard if hard != resource.RLIM_INFINITY
                                                    else max(soft, 1_048_576), hard))


def rollout_config(config: Path, destination: Path, model_store: Path, disable_token_auth: bool = False
                   ) -> Path:
    """`config` with TorchServe's registration API on, for ops/rollout.py: refused unless the
    management API listens on loopback only and needs its token. allowed_urls stays `^$`: in
    TorchServe 0.12 a URL that matches it is downloaded into the store, and a name that matches
    nothing is read from the store (by its last path component; `..` refused), so the store's own
    files are all that can be registered."""
    properties = read_properties(config)
    host = urlparse(properties.get("management_address", "")).hostname
    if host not in LOOPBACK_HOSTS:
        raise ServeError(f"refusing --rollout: the management API listens on {host!r}, not 127.0.0.1")
    if disable_token_auth or tokens_disabled(properties):
        raise ServeError("refusing --rollout without token authorization: registering a model runs its code")
    derive_config(config, destination, {"enable_model_api": "true", "allowed_urls": "^$",
                                        "model_store": str(model_store.resolve())},
                  header="# written by `marketplace-classifier serve start --rollout` (rollout reads it)")
    return destination


def start_exporter(state_dir: Path, port: int, sources: list[str], options: dict | None = None
                   ) -> str:
    """serving/metrics_exporter.py over the workers' metrics folder, on 127.0.0.1:`port`."""
    if not port_is_free(port):
        raise ServeError(f"the metrics exporter's port 127.0.0.1:{port} is already in use (the port "
                         "after the metrics API's, or two after the second engine's REST): free it or "
                         "move the API")
    command = [sys.executable, "-m", "marketplace_classifier.serving.metrics_exporter", "--port", str(port),
               "--multiproc-dir", str(state_dir / "metrics"), *sources]
    for name, value in (options or {}).items():
        command += [f"--{name.replace('_', '-')}", str(value)]
    (state_dir / "logs").mkdir(parents=True, exist_ok=True)
    with (state_dir / "logs" / "exporter.log").open("a") as log:
        process = subprocess.Popen(command, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
                                   start_new_session=True)
    (state_dir / EXPORTER_PID).write_text(str(process.pid))
    url = f"http://127.0.0.1:{port}/metrics"
    deadline = time.monotonic() + 60
    while process.poll() is None and time.monotonic() < deadline:
        try:
            if requests.get(url, timeout=2).ok:
                return url
        except requests.ConnectionError:
            pass
        time.sleep(0.3)
    stop_exporter(state_dir)
    said = (state_dir / "logs" / "exporter.log").read_text(errors="replace").strip().splitlines()[-1:]
    raise ServeError(f"the metrics exporter did not answer on {url} ({'; '.join(said) or 'no output'}): "
                     f"see {state_dir}/logs/exporter.log")


def stop_exporter(state_dir: Path) -> None:
    pid_file = state_dir / EXPORTER_PID
    if pid_file.exists():
        with contextlib.suppress(ProcessLookupError):  # it has already gone
            os.killpg(int(pid_file.read_text()), signal.SIGTERM)
        pid_file.unlink()


def signals_port(properties: dict) -> int:
    """Where the serving core's signals and drift are served (serving/metrics_exporter.py): on
    127.0.0.1, the port after TorchServe's metrics API (8083 with the shipped config)."""
    return (urlparse(properties.get("metrics_address", "http://127.0.0.1:8082")).port or 8082) + 1


def fresh_metrics_folder(state_dir: Path) -> Path:
    """The folder the workers' metrics go to (PROMETHEUS_MULTIPROC_DIR), emptied: counts of a
    previous run must not add to this one's."""
    folder = state_dir / "metrics"
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    return folder


def start(config: Path, model_store: Path, state_dir: Path, timeout: float = 180,
          disable_token_auth: bool = False, rollout: bool = False, metrics_options: dict | None = None
          ) -> dict:
    """Start TorchServe and wait until every model in load_models has a ready worker; with
    `rollout`, the registration API on (rollout_config)."""
    if shutil.which("java") is None:
        raise ServeError("java not found: TorchServe needs Java 17 (apt-get install openjdk-17-jre-headless)")
    if rollout:
        state_dir.mkdir(parents=True, exist_ok=True)
        config = rollout_config(config, state_dir / "config.properties", model_store, disable_token_auth)
    properties = read_properties(config)
    missing = [name for name in model_names(properties) if not (model_store / f"{name}.mar").exists()]
    if missing:
        raise ServeError(f"{model_store} lacks {', '.join(m + '.mar' for m in missing)}: "
                         "run `marketplace-classifier archive` first")
    state_dir.mkdir(parents=True, exist_ok=True)
    env = server_environment(state_dir) | {
        "LOG_LOCATION": str(state_dir / "logs"), "METRICS_LOCATION": str(state_dir / "logs"),
        "PROMETHEUS_MULTIPROC_DIR": str(fresh_metrics_folder(state_dir))}
    command = [torchserve_binary(), "--start", "--ts-config", str(config.resolve()),
               "--model-store", str(model_store.resolve()), "--ncs"]
    if disable_token_auth:
        command.append("--disable-token-auth")
    output = state_dir / "torchserve.out"
    with output.open("w") as sink:  # not a pipe: the server keeps it open for its whole life
        result = subprocess.run(command, cwd=state_dir, env=env, stdout=sink, stderr=subprocess.STDOUT,
                                preexec_fn=raise_open_file_limit)
    said = output.read_text(errors="replace")
    if result.returncode != 0 or "already running" in said:
        raise ServeError(f"torchserve --start failed: {said.strip()[-400:]}")
    key_file = None if disable_token_auth or tokens_disabled(properties) else state_dir / "key_file.json"
    wait_ready(properties, key_file, timeout, state_dir)
    if key_file is not None:
        key_file.chmod(0o600)  # the tokens are secrets: readable by this user only
    sources = ["--model-store", str(model_store.resolve())]
    metrics = start_exporter(state_dir, signals_port(properties), sources, metrics_options)
    return {"inference": properties["inference_address"], "management": properties["management_address"],
            "signals": metrics,
            "grpc": f"{properties.get('grpc_inference_address', '127.0.0.1')}:"
                    f"{properties.get('grpc_inference_port', '7070')}",
            "key_file": str(key_file) if key_file else None, "logs": str(state_dir / "logs")}


def model_ready(properties: dict, key_file: Path | None, name: str) -> bool:
    url = f"{properties['management_address']}/models/{name}"
    try:
        headers = auth_headers(key_file, "management")
    except (ValueError, KeyError):  # the server is still writing its key file
        return False
    try:
        response = requests.get(url, headers=headers, timeout=5)
    except requests.ConnectionError:
        return False
    if response.status_code != 200:
        return False
    workers = [worker for model in response.json() for worker in model.get("workers", [])]
    return bool(workers) and all(worker.get("status") == "READY" for worker in workers)


def worker_pids(properties: dict, key_file: Path | None, models: list[str]) -> dict[str, list[int]]:
    """The process ids of each model's workers, from the management API: a restarted worker
    shows as a changed list."""
    headers = auth_headers(key_file, "management")
    return {model: sorted(worker["pid"] for entry in requests.get(
        f"{properties['management_address']}/models/{model}", headers=headers, timeout=30).json()
        for worker in entry["workers"]) for model in models}


def wait_ready(properties: dict, key_file: Path | None, timeout: float, state_dir: Path) -> None:
    deadline = time.monotonic() + timeout
    pending = model_names(properties)
    while pending and time.monotonic() < deadline:
        if key_file is None or key_file.exists():
            pending = [name for name in pending if not model_ready(properties, key_file, name)]
        if pending:
            time.sleep(1)
    if pending:
        log = state_dir / "logs" / "ts_log.log"
        tail = log.read_text(errors="replace").splitlines()[-15:] if log.exists() else []
        raise ServeError(f"models {pending} not ready after {timeout:.0f}s; last log lines:\n"
                         + "\n".join(tail))


ENGINE_PYTHON = ROOT / ".venv-engine" / "bin" / "python"
ENGINE_MODULE = "marketplace_classifier.engines.kserve_ray.server"
KSERVE_RAY_PORT = 8085
KSERVE_RAY_GRPC_PORT = 8086
SIGNALS_PORT_OFFSET = 2  # the second engine's signals: 8087 beside REST 8085 and gRPC 8086


def start_kserve_ray(artifacts: Path, state_dir: Path, port: int, replicas: int, timeout: float,
                     batch_size: int, batch_wait_ms: float, grpc_port: int | None) -> dict:
    """Start the second engine in the background from the exported folders and wait until every
    model is loaded (`/v2/health/ready`). `grpc_port` None: REST only. `state_dir` is the
    engine's own (engine_state: its metrics, exporter, Ray's files and token), never TorchServe's."""
    if not ENGINE_PYTHON.exists():
        raise ServeError("the second engine's environment is missing: run `make engine-venv`")
    state_dir.mkdir(parents=True, exist_ok=True)
    state_dir.chmod(0o700)
    log = state_dir / "kserve_ray.log"
    command = [str(ENGINE_PYTHON), "-m", ENGINE_MODULE, "--artifacts-dir", str(Path(artifacts).resolve()),
               "--http-port", str(port), "--replicas", str(replicas), "--max-batch-size", str(batch_size),
               "--batch-wait-ms", str(batch_wait_ms), "--state-dir", str(state_dir)]
    command += ["--no-grpc"] if grpc_port is None else ["--grpc-port", str(grpc_port)]
    # the replicas (Ray's worker processes) inherit where to write their signals
    env = os.environ | {"PROMETHEUS_MULTIPROC_DIR": str(fresh_metrics_folder(state_dir))}
    with log.open("w") as sink:
        process = subprocess.Popen(command, cwd=ROOT, stdout=sink, stderr=subprocess.STDOUT,
                                   start_new_session=True, env=env)
    (state_dir / "kserve_ray.pid").write_text(str(process.pid))
    url, deadline = f"http://127.0.0.1:{port}", time.monotonic() + timeout
    while process.poll() is None and time.monotonic() < deadline:
        try:
            if requests.get(f"{url}/v2/health/ready", timeout=5).ok:
                grpc = None if grpc_port is None else f"127.0.0.1:{grpc_port}"
                signals = start_exporter(state_dir, port + SIGNALS_PORT_OFFSET,
                                         ["--artifacts-dir", str(Path(artifacts).resolve())])
                return {"rest": url, "grpc": grpc, "pid": process.pid, "log": str(log), "signals": signals}
        except requests.ConnectionError:
            pass
        time.sleep(0.5)
    stop_kserve_ray(state_dir)
    tail = log.read_text(errors="replace").splitlines()[-15:]
    raise ServeError(f"the second engine did not get ready after {timeout:.0f}s; last log lines:\n"
                     + "\n".join(tail))


def engine_state(state_dir: Path, engine: str) -> Path:
    """Each engine's own state folder: TorchServe's is `state_dir` itself (key file, logs,
    metrics/, exporter.pid), the second engine's a folder inside it, so that starting one never
    empties the other's metrics folder or overwrites its exporter's pid file."""
    return state_dir if engine == "torchserve" else state_dir / engine


def stop_kserve_ray(state_dir: Path, timeout: float = 60) -> str:
    """Stop the second engine: KServe's server and the Ray cluster it started."""
    stop_exporter(state_dir)
    pid_file = state_dir / "kserve_ray.pid"
    if not pid_file.exists():
        return "no second engine running"
    import psutil

    try:
        driver = psutil.Process(int(pid_file.read_text()))
        driver.send_signal(signal.SIGINT)  # KServe stops, and the driver's exit ends its Ray cluster
        if not psutil.wait_procs([driver], timeout=timeout)[0]:
            os.killpg(driver.pid, signal.SIGKILL)
    except (psutil.NoSuchProcess, ProcessLookupError):
        pass
    pid_file.unlink()
    return "second engine stopped"


def server_environment(state_dir: Path) -> dict[str, str]:
    """The environment TorchServe starts and stops with: its temporary folder (where it keeps its
    pid file and unpacks archives) inside the state folder, so that each state folder has its own
    server and two can run side by side on different ports."""
    temporary = state_dir / "tmp"
    temporary.mkdir(parents=True, exist_ok=True)
    temporary.chmod(0o700)
    return os.environ | {"TMPDIR": str(temporary), "TEMP": str(temporary.resolve())}


def stop(state_dir: Path) -> str:
    state_dir.mkdir(parents=True, exist_ok=True)
    stop_exporter(state_dir)
    result = subprocess.run([torchserve_binary(), "--stop"], cwd=state_dir, capture_output=True,
                            text=True, env=server_environment(state_dir))
    return (result.stdout + result.stderr).strip()


def status(config: Path, key_file: Path) -> dict:
    properties = read_properties(config)
    try:
        ping = requests.get(f"{properties['inference_address']}/ping",
                            headers=auth_headers(key_file), timeout=5)
    except requests.ConnectionError:
        return {"running": False}
    key = key_file if key_file.exists() else None
    return {"running": True, "ping": ping.json() if ping.ok else ping.status_code,
            "models": {name: model_ready(properties, key, name) for name in model_names(properties)}}
