"""Against a real Prometheus: Debian's server scrapes a running TorchServe's signals while the load
generator sends normal and then shifted traffic; the drift alert goes pending or firing on the
shifted traffic only, and the alerts of a healthy service stay quiet."""

from __future__ import annotations

import shutil
import subprocess
import time

import pytest
import requests

from marketplace_classifier.ops import serve
from marketplace_classifier.ops.archive import build_archive
from marketplace_classifier.ops.engines import TorchServe
from marketplace_classifier.serving.config import MODEL_CONFIG
from marketplace_classifier.training.data import CleanData
from tests.helpers import write_test_config

pytestmark = pytest.mark.serving
MONITORING = serve.ROOT / "deploy" / "monitoring"
QUIET = ("MarketplaceErrorRatioHigh", "MarketplaceLatencyP99AboveSLO", "MarketplaceWorkerRestarts")


@pytest.fixture(scope="module")
def watched(artifacts, tmp_path_factory):
    """TorchServe serving the text model (drift window 30 s from 30 listings) and a Prometheus
    scraping its signals every second with the project's alert rules."""
    binary = shutil.which("prometheus")
    if binary is None:
        pytest.skip("prometheus is not installed (Debian's prometheus package; make test installs it)")
    work = tmp_path_factory.mktemp("prometheus")
    store = artifacts.parent / "model_store-prometheus"
    build_archive("text", artifacts, store, root=artifacts.parent, model_config=MODEL_CONFIG)
    properties = write_test_config(work / "config.properties", store)
    serve.derive_config(work / "config.properties", work / "config.properties", {"load_models": "text.mar"})
    state = work / "state"
    listen = f"127.0.0.1:{serve.free_port()}"
    prometheus = None
    engine = TorchServe(state, work / "config.properties", store, timeout=300,
                        metrics_options={"window_seconds": 30, "min_listings": 30, "tick_seconds": 1})
    try:
        target = engine.start().signals.removeprefix("http://").removesuffix("/metrics")
        (work / "prometheus.yml").write_text(
            "global: {scrape_interval: 1s, evaluation_interval: 1s}\n"
            f"rule_files: ['{MONITORING / 'alerts.yml'}']\n"
            f"scrape_configs: [{{job_name: marketplace, static_configs: [{{targets: ['{target}']}}]}}]\n")
        command = [binary, f"--config.file={work / 'prometheus.yml'}", f"--storage.tsdb.path={work / 'tsdb'}",
                   f"--web.listen-address={listen}"]
        prometheus = subprocess.Popen(command, stdout=subprocess.DEVNULL,
                                      stderr=(work / "prometheus.log").open("w"))
        yield {"prometheus": f"http://{listen}", "properties": properties, "state": state}
    finally:
        if prometheus is not None:
            prometheus.terminate()
            prometheus.wait(timeout=30)
        engine.stop()


def alerts(base: str) -> dict[str, list[dict]]:
    found: dict[str, list[dict]] = {}
    for alert in requests.get(f"{base}/api/v1/alerts", timeout=10).json()["data"]["alerts"]:
        found.setdefault(alert["labels"]["alertname"], []).append(alert)
    return found


def send(watched: dict, texts: list[str]) -> None:
    key = serve.read_key(watched["state"] / "key_file.json")
    url = f"{watched['properties']['inference_address']}/predictions/text"
    for text in texts:
        response = requests.post(url, data=text.encode(), timeout=60,
                                 headers={"Authorization": f"Bearer {key}", "Content-Type": "text/plain"})
        assert response.status_code == 200


def wait_for(condition, seconds: float):
    """condition()'s first truthy answer within `seconds` (a server still starting counts as no)."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            found = condition()
        except requests.ConnectionError:
            found = None
        if found:
            return found
        time.sleep(1)
    return condition()


def test_drift_fires_on_shifted_traffic_and_stays_quiet_on_normal_traffic(watched, clean_sample):
    data = CleanData.load(clean_sample[0])
    test_texts = list(data.products[data.products["split"] == "test"]["text"])
    base = watched["prometheus"]
    up = wait_for(lambda: requests.get(f"{base}/api/v1/query", params={"query": "up"}, timeout=10)
                  .json()["data"]["result"], 60)
    assert up and up[0]["value"][1] == "1"
    send(watched, test_texts)
    scored = wait_for(lambda: requests.get(f"{base}/api/v1/query", timeout=10, params={
        "query": 'marketplace_drift_psi{signal="text_chars"}'}).json()["data"]["result"], 30)
    assert scored and float(scored[0]["value"][1]) < 0.25  # normal traffic is measured, and calm
    time.sleep(3)
    assert "MarketplaceDrift" not in alerts(base)
    send(watched, ["sofa", "bike", "ps4", "pram", "desk", "lamp"] * 12)  # only very short texts
    fired = wait_for(lambda: [a for a in alerts(base).get("MarketplaceDrift", [])
                              if a["labels"]["signal"] == "text_chars"], 40)
    assert fired and fired[0]["state"] in ("pending", "firing")
    assert not set(QUIET) & set(alerts(base))
