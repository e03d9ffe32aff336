"""The engines as plug-ins behind one interface (marketplace_classifier/ops/engines.py); what each
does once started is proven by tests/test_engines.py, whose second engine starts through it."""

from __future__ import annotations

import json
import socket
from importlib.metadata import entry_points

import pytest

from marketplace_classifier.ops import engines, serve
from marketplace_classifier.ops.engines import Engine, EngineError, KServeRay, TorchServe, available, create


def test_both_engines_are_plug_ins_registered_by_entry_points():
    registered = {point.name: point.load() for point in entry_points(group=engines.GROUP)}
    assert registered == {"torchserve": TorchServe, "kserve_ray": KServeRay}
    assert available() == registered
    assert all(issubclass(engine, Engine) and engine.title for engine in registered.values())


def test_an_unknown_engine_or_an_option_it_does_not_take_is_refused(tmp_path):
    with pytest.raises(EngineError, match="unknown engine 'triton'; installed: kserve_ray, torchserve"):
        create("triton", tmp_path)
    with pytest.raises(EngineError, match="engine kserve_ray: .*'rollout'"):
        create("kserve_ray", tmp_path, rollout=True)
    engine = create("kserve_ray", tmp_path, port=serve.free_port())
    # each engine keeps its state in its own folder: starting one never touches the other's
    assert engine.state_dir == tmp_path.resolve() / "kserve_ray"
    assert create("torchserve", tmp_path).state_dir == tmp_path.resolve()


def test_status_of_an_engine_that_is_not_running(tmp_path, capsys):
    assert create("kserve_ray", tmp_path, port=serve.free_port()).status() == {
        "engine": "kserve_ray", "running": False}
    config = tmp_path / "config.properties"
    serve.loopback_config(config, {})
    assert engines.main(["status", "--config", str(config), "--state-dir", str(tmp_path)]) == 0
    assert json.loads(capsys.readouterr().out) == {"engine": "torchserve", "running": False}
    assert engines.main(["start", "--engine", "kserve_ray", "--rollout", "--state-dir", str(tmp_path)]) == 2
    refusal = "error: --rollout and --disable-token-auth are TorchServe's options"
    assert capsys.readouterr().err.strip() == refusal


def test_the_signals_port_beside_an_api_is_kept_free_and_a_taken_one_is_named(tmp_path):
    """The signals listen on the port after the metrics API (and after the second engine's
    gRPC): a config written here leaves that port free, and a port taken anyway is refused with
    its number before anything waits on it."""
    properties = serve.loopback_config(tmp_path / "config.properties", {})
    assert serve.port_is_free(serve.signals_port(properties))
    port = serve.free_port(span=3)
    assert all(serve.port_is_free(port + step) for step in range(3))
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", port))
        holder.listen()
        assert not serve.port_is_free(port)
        with pytest.raises(serve.ServeError, match=f"port 127.0.0.1:{port} is already in use"):
            serve.start_exporter(tmp_path / "state", port, ["--artifacts-dir", str(tmp_path)])
    assert not (tmp_path / "state" / serve.EXPORTER_PID).exists()


def test_an_exporter_that_exits_is_reported_at_once_with_its_last_line(tmp_path):
    with pytest.raises(serve.ServeError, match=r"did not answer on .*\(.*(error|usage).*\)"):
        serve.start_exporter(tmp_path / "state", serve.free_port(), ["--no-such-option"])
    assert not (tmp_path / "state" / serve.EXPORTER_PID).exists()
