"""Start, stop or check an engine serving the models: TorchServe with the project's
config.properties (the default), or the second engine, KServe's model server with Ray Serve, from
the exported folders.

Usage: marketplace-classifier serve start|stop|status [--engine torchserve|kserve_ray]
       [--config config.properties] [--model-store model_store] [--artifacts-dir artifacts]
       [--state-dir .serve] [--timeout S] [--disable-token-auth] [--rollout]
TorchServe writes the key file with the inference and management tokens to <state-dir>/key_file.json;
the second engine has no tokens (loopback only: SECURITY.md).

The engines behind one interface: start, stop, ready, status and the
addresses a client calls. Each engine is a plug-in: an entry point of the group
`marketplace_classifier.engines` names its class (pyproject.toml registers `torchserve` and
`kserve_ray`), so another engine is added by a package of its own, not by a branch here.

    engine = create("kserve_ray", state_dir=Path(".serve"), artifacts=Path("artifacts"))
    addresses = engine.start()
    ...
    engine.stop()
"""

from __future__ import annotations

import abc
import argparse
import json
import sys
from dataclasses import asdict, dataclass
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any, ClassVar

import requests

from marketplace_classifier.ops import serve
from marketplace_classifier.serving.config import MODEL_CONFIG, ServingPlan

GROUP = "marketplace_classifier.engines"
DEFAULT_PLAN = ServingPlan.from_model_config(MODEL_CONFIG)  # what every archive carries


class EngineError(serve.ServeError):
    """An engine that is not known, or options it does not take."""


@dataclass(frozen=True)
class Addresses:
    """Where a started engine answers: REST (its base URL), gRPC (host:port or None), the core's
    signals exporter, and, for TorchServe, its management API and the key file of its tokens."""

    rest: str
    grpc: str | None = None
    signals: str | None = None
    management: str | None = None
    key_file: str | None = None
    pid: int | None = None

    def to_json(self) -> dict[str, Any]:
        return {key: value for key, value in asdict(self).items() if value is not None}


class Engine(abc.ABC):
    """One serving engine: its state lives in its own folder inside `state_dir` (engine_state),
    so that two engines started in turn keep separate signals, logs and pid files."""

    name: ClassVar[str]
    title: ClassVar[str]

    def __init__(self, state_dir: Path, timeout: float = 300) -> None:
        self.state_dir = serve.engine_state(Path(state_dir).resolve(), self.name)
        self.timeout = timeout
        self.addresses: Addresses | None = None

    @abc.abstractmethod
    def start(self) -> Addresses:
        """Start the engine and return once every model answers; ServeError otherwise."""

    @abc.abstractmethod
    def stop(self) -> str:
        """Stop the engine (and its signals exporter); what happened, in words."""

    @abc.abstractmethod
    def ready(self) -> bool:
        """Whether every model the engine serves answers now."""

    @classmethod
    @abc.abstractmethod
    def from_cli(cls, state_dir: Path, args: argparse.Namespace) -> Engine:
        """The engine as `marketplace-classifier serve` options describe it."""

    def status(self) -> dict[str, Any]:
        try:
            return {"engine": self.name, "running": True, "ready": self.ready()}
        except requests.ConnectionError:
            return {"engine": self.name, "running": False}

    def __enter__(self) -> Engine:
        try:
            self.start()
        except BaseException:  # a start that failed half-way leaves nothing running
            self.stop()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


class TorchServe(Engine):
    """TorchServe 0.12 with a config.properties and a model store of archives."""

    name, title = "torchserve", "TorchServe 0.12.0"

    def __init__(self, state_dir: Path, config: Path = serve.ROOT / "config.properties",
                 model_store: Path = serve.ROOT / "model_store", timeout: float = 300,
                 disable_token_auth: bool = False, rollout: bool = False,
                 metrics_options: dict | None = None) -> None:
        super().__init__(state_dir, timeout)
        self.config, self.model_store = Path(config), Path(model_store)
        self.disable_token_auth, self.rollout = disable_token_auth, rollout
        self.metrics_options = metrics_options

    @property
    def properties(self) -> dict[str, str]:
        return serve.read_properties(self.config)

    @property
    def key_file(self) -> Path | None:
        key_file = self.state_dir / "key_file.json"
        return key_file if key_file.exists() else None

    @classmethod
    def running(cls, state_dir: Path, config: Path = serve.ROOT / "config.properties") -> TorchServe:
        """The server started in `state_dir`: with the config.properties `start` wrote there
        (its ports and settings as started), else `config`."""
        written = Path(state_dir) / "config.properties"
        return cls(state_dir, written if written.exists() else config)

    def headers(self, kind: str = "inference") -> dict[str, str]:
        """The Authorization header of one of its APIs (none when tokens are off)."""
        return {} if serve.tokens_disabled(self.properties) else serve.auth_headers(self.key_file, kind)

    @classmethod
    def from_cli(cls, state_dir: Path, args: argparse.Namespace) -> TorchServe:
        return cls(state_dir, args.config, args.model_store, args.timeout or 180, args.disable_token_auth,
                   args.rollout)

    def start(self) -> Addresses:
        info = serve.start(self.config, self.model_store, self.state_dir, self.timeout,
                           self.disable_token_auth, self.rollout, self.metrics_options)
        self.addresses = Addresses(info["inference"], info["grpc"], info["signals"], info["management"],
                                   info["key_file"])
        return self.addresses

    def stop(self) -> str:
        return serve.stop(self.state_dir)

    def ready(self) -> bool:
        properties = self.properties
        return all(serve.model_ready(properties, self.key_file, name)
                   for name in serve.model_names(properties))

    def status(self) -> dict[str, Any]:
        return {"engine": self.name} | serve.status(self.config, self.state_dir / "key_file.json")


class KServeRay(Engine):
    """KServe's model server with Ray Serve batching over the serving core, from the exported
    folders, in its own environment (.venv-engine)."""

    name, title = "kserve_ray", "KServe 0.21.0 + Ray Serve 2.60.0"

    def __init__(self, state_dir: Path, artifacts: Path = serve.ROOT / "artifacts", timeout: float = 600,
                 port: int = serve.KSERVE_RAY_PORT, grpc_port: int | None = serve.KSERVE_RAY_GRPC_PORT,
                 replicas: int = DEFAULT_PLAN.workers, batch_size: int = DEFAULT_PLAN.batch_size,
                 batch_wait_ms: float = DEFAULT_PLAN.max_batch_delay_ms) -> None:
        super().__init__(state_dir, timeout)
        self.artifacts, self.port, self.grpc_port = Path(artifacts), port, grpc_port
        self.replicas, self.batch_size, self.batch_wait_ms = replicas, batch_size, batch_wait_ms

    @classmethod
    def from_cli(cls, state_dir: Path, args: argparse.Namespace) -> KServeRay:
        if args.rollout or args.disable_token_auth:
            raise EngineError("--rollout and --disable-token-auth are TorchServe's options")
        return cls(state_dir, args.artifacts_dir, max(args.timeout or 300, 300))

    def start(self) -> Addresses:
        info = serve.start_kserve_ray(self.artifacts, self.state_dir, self.port, self.replicas, self.timeout,
                                      self.batch_size, self.batch_wait_ms, self.grpc_port)
        self.addresses = Addresses(info["rest"], info["grpc"], info["signals"], pid=info["pid"])
        return self.addresses

    def stop(self) -> str:
        return serve.stop_kserve_ray(self.state_dir)

    def ready(self) -> bool:
        return requests.get(f"http://127.0.0.1:{self.port}/v2/health/ready", timeout=5).ok


BUILT_IN: dict[str, type[Engine]] = {TorchServe.name: TorchServe, KServeRay.name: KServeRay}


def available() -> dict[str, type[Engine]]:
    """The engines installed: the entry points of GROUP (plug-ins), over the built-in ones (a
    source tree run without installing has no entry points)."""
    found = dict(BUILT_IN)
    for point in entry_points(group=GROUP):
        engine = point.load()
        if not (isinstance(engine, type) and issubclass(engine, Engine)):
            raise EngineError(f"entry point {point.name} = {point.value} is not an Engine class")
        found[point.name] = engine
    return found


def create(name: str, state_dir: Path, **options: Any) -> Engine:
    """The engine called `name`, with its options (those it does not take are refused)."""
    engines = available()
    if name not in engines:
        raise EngineError(f"unknown engine {name!r}; installed: {', '.join(sorted(engines))}")
    try:
        return engines[name](state_dir, **options)
    except TypeError as error:
        raise EngineError(f"engine {name}: {error}") from error


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("action", choices=("start", "stop", "status"))
    parser.add_argument("--engine", choices=sorted(available()), default=TorchServe.name)
    parser.add_argument("--config", type=Path, default=serve.ROOT / "config.properties")
    parser.add_argument("--model-store", type=Path, default=serve.ROOT / "model_store")
    parser.add_argument("--artifacts-dir", type=Path, default=serve.ROOT / "artifacts",
                        help="the exported folders the second engine serves")
    parser.add_argument("--state-dir", type=Path, default=serve.ROOT / ".serve")
    parser.add_argument("--timeout", type=float, default=None,
                        help="seconds to wait for every model (default: 180 for TorchServe, 300 for "
                             "the second engine)")
    parser.add_argument("--disable-token-auth", action="store_true",
                        help="serve without tokens (anyone who reaches the port may call it)")
    parser.add_argument("--rollout", action="store_true",
                        help="turn on the registration API (loopback, token) for rollout")
    args = parser.parse_args(argv)
    try:
        engine = available()[args.engine].from_cli(args.state_dir, args)
        if args.action == "start":
            print(json.dumps(engine.start().to_json(), indent=2))
        elif args.action == "stop":
            print(engine.stop())
        else:
            print(json.dumps(engine.status(), indent=2))
    except serve.ServeError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
