"""The serving core's signals and the drift of live traffic against the training reference."""

from __future__ import annotations

import base64
import hashlib
import io
import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml
from PIL import Image
from prometheus_client import CollectorRegistry, generate_latest

from marketplace_classifier.serving.core import ListingService, Request, ServingOptions
from marketplace_classifier.serving.metrics_exporter import DRIFT_THRESHOLD, DriftCollector, psi
from marketplace_classifier.serving.payloads import Listing
from marketplace_classifier.serving.request_log import RequestLog, folder_bytes
from marketplace_classifier.serving.settings import REFERENCE_FILE, read_card
from marketplace_classifier.serving.signals import Signals


def service_and_drift(artifacts, model: str) -> tuple[ListingService, DriftCollector, CollectorRegistry]:
    registry = CollectorRegistry()
    service = ListingService(artifacts / model, registry=registry)
    reference = json.loads((artifacts / model / REFERENCE_FILE).read_text())
    key = (model, read_card(artifacts / model)["version"])
    drift = DriftCollector(registry.collect, {key: reference}, window_seconds=3600, min_listings=30)
    return service, drift, registry


def scores(drift: DriftCollector) -> dict:
    (found,) = drift.drift().values()
    return found["psi"]


def send_texts(service: ListingService, texts: list[str]) -> None:
    for start in range(0, len(texts), 8):
        batch = [Request({"body": text.encode()}, "text/plain") for text in texts[start:start + 8]]
        answers = service.handle(batch)
        assert all(answer.status == 200 for answer in answers)


def test_psi_is_zero_for_the_same_distribution_and_grows_with_the_shift():
    assert psi([100, 200, 700], [0.1, 0.2, 0.7]) == 0.0
    assert psi([100, 200, 700], [0.1, 0.2, 0.7], reference_count=50) == 0.0
    assert psi([0, 200, 800, 0], [0.0, 0.2, 0.8, 0.0], reference_count=40) == 0.0  # empty on both sides
    assert 0 < psi([200, 200, 600], [0.1, 0.2, 0.7]) < psi([600, 200, 200], [0.1, 0.2, 0.7])
    # what sampling alone gives is taken off: a small window must shift further to count
    assert psi([20, 20, 60], [0.1, 0.2, 0.7], 40) < psi([20, 20, 60], [0.1, 0.2, 0.7])


@pytest.fixture(scope="module")
def fresh_listings(tmp_path_factory):
    """Listings the models never saw, drawn as the training sample was (another seed of the same
    generator): what normal traffic looks like to these models."""
    from marketplace_classifier.training.cleaning import CleaningReport, clean_products, read_raw_products
    from marketplace_classifier.training.sample import SampleConfig, generate

    folder = tmp_path_factory.mktemp("fresh")
    generate(folder, SampleConfig(products=400, seed=11))
    products = clean_products(read_raw_products(folder / "Products.csv"), CleaningReport())
    return folder, products


def test_normal_listings_do_not_drift_and_shifted_texts_do(artifacts, fresh_listings):
    from marketplace_classifier.serving.processing import listing_text

    products = fresh_listings[1]
    texts = [listing_text(name, description) for name, description
             in zip(products["product_name"], products["product_description"], strict=True)]
    service, drift, registry = service_and_drift(artifacts, "text")
    send_texts(service, texts)
    normal = scores(drift)
    assert {"categories", "text_chars", "top_probability", "review_share", "confident_depth"} <= set(normal)
    assert max(normal.values()) < DRIFT_THRESHOLD, normal
    answered = [line for line in generate_latest(registry).decode().splitlines()
                if line.startswith("marketplace_answers_total{")]
    assert answered and all('model="text"' in line and 'category="' in line for line in answered)
    depths = {sample.labels["depth"]: sample.value for family in registry.collect()
              for sample in family.samples if sample.name == "marketplace_confident_depth_total"}
    assert set(depths) <= {"0", "1", "2", "3", "4+"} and sum(depths.values()) == len(texts)

    one_category = [text for text, category in zip(texts, products["root_category"], strict=True)
                    if category == products["root_category"].mode()[0]]
    service, drift, _ = service_and_drift(artifacts, "text")
    send_texts(service, one_category * 4)
    assert scores(drift)["categories"] > DRIFT_THRESHOLD

    service, drift, _ = service_and_drift(artifacts, "text")
    send_texts(service, ["sofa", "bike", "ps4", "pram", "desk"] * 20)  # only very short texts
    assert scores(drift)["text_chars"] > DRIFT_THRESHOLD


def photo(side: int, seed: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (side, side * 3 // 4), (seed * 37 % 255, 90, 160)).save(buffer, "JPEG")
    return buffer.getvalue()


def test_tiny_photos_drift_and_the_photos_as_sent_do_not(artifacts, fresh_listings):
    folder = fresh_listings[0]
    photos = sorted((folder / "images").glob("*.jpg"))[:120]
    service, drift, _ = service_and_drift(artifacts, "image")
    for path in photos:
        answer = service.handle([Request({"body": path.read_bytes()}, "image/jpeg")])[0]
        assert answer.status in (200, 400)  # the generator also writes broken photos on purpose
    assert scores(drift)["photo_side"] < DRIFT_THRESHOLD
    service, drift, _ = service_and_drift(artifacts, "image")
    for seed in range(60):  # a photo pipeline that starts sending thumbnails
        assert service.handle([Request({"body": photo(48, seed)}, "image/jpeg")])[0].status == 200
    assert scores(drift)["photo_side"] > DRIFT_THRESHOLD


def test_refusals_are_counted_by_a_fixed_reason_and_never_by_their_content(artifacts):
    service, _, registry = service_and_drift(artifacts, "text")
    hostile = ("\u202e<script>" + "x" * 100).encode() + b"\xff\xfe"  # not UTF-8
    answers = service.handle([Request({"body": b""}, "text/plain"), Request({"body": hostile}, "text/plain")])
    assert [answer.status for answer in answers] == [400, 400]
    refused = {sample.labels["reason"]: sample.value for family in registry.collect()
               for sample in family.samples if sample.name == "marketplace_refusals_total"}
    assert refused == {"bad_request": 2.0}
    assert "script" not in generate_latest(registry).decode()


MONITORING = Path(__file__).resolve().parents[1] / "deploy" / "monitoring"


def exported_names() -> set[str]:
    """Every series name the service and its exporter can export."""
    registry = CollectorRegistry()
    signals = Signals("text", "v1", registry)
    signals.started()
    signals.answered("Appliances", 0.9, False, 2, 40, [800])
    signals.refused(400)
    signals.batch_seconds(0.1, 1)
    names = {sample.name for family in registry.collect() for sample in family.samples}
    return names | {"marketplace_drift_psi", "marketplace_drift_window_listings",
                    "marketplace_reference_review_share"}


def test_the_dashboard_and_the_rules_use_only_series_the_service_exports():
    known = exported_names()
    dashboard = json.loads((MONITORING / "dashboard.json").read_text())
    expressions = [target["expr"] for panel in dashboard["panels"] for target in panel["targets"]]
    rules = yaml.safe_load((MONITORING / "alerts.yml").read_text())["groups"][0]["rules"]
    expressions += [rule["expr"] for rule in rules]
    assert len(rules) == 6 and len(expressions) > 15
    for expression in expressions:
        for name in re.findall(r"marketplace_[a-z_]+", expression):
            assert name in known, (name, expression)


def test_the_alert_rules_pass_promtool():
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool is not installed (Debian's prometheus package; make test installs it)")
    for command in (["check", "rules", "alerts.yml"], ["test", "rules", "alerts_test.yml"]):
        result = subprocess.run([promtool, *command], cwd=MONITORING, capture_output=True, text=True)
        assert result.returncode == 0, result.stdout + result.stderr


def test_the_request_log_is_off_by_default_sampled_and_capped(artifacts, tmp_path):
    assert ListingService(artifacts / "text", registry=CollectorRegistry()).request_log is None
    options = ServingOptions(request_log_dir=str(tmp_path), request_log_sample=1.0, request_log_max_mb=1)
    service = ListingService(artifacts / "combined", options, registry=CollectorRegistry())
    photo_bytes = photo(320, 1)
    body = json.dumps({"instances": [{"image": {"b64": base64.b64encode(photo_bytes).decode()},
                                      "text": "PS5 console \u00e9"}]}).encode()
    assert service.handle([Request({"body": body}, "application/json")])[0].status == 200
    (path,) = tmp_path.glob("requests-*.jsonl")
    (record,) = [json.loads(line) for line in path.read_text().splitlines()]
    assert record["text"] == "PS5 console \u00e9" and record["model"] == "combined"
    assert record["photos"] == [hashlib.sha256(photo_bytes).hexdigest()]  # the digest, not the photo
    assert set(record["answer"]) == {"category", "probability", "needs_review", "model_version"}
    service.request_log.max_bytes = path.stat().st_size + 10  # room for one line: the older one goes
    assert service.handle([Request({"body": body}, "application/json")])[0].status == 200
    (newer,) = tmp_path.glob("requests-*.jsonl")
    assert len(newer.read_text().splitlines()) == 1 and folder_bytes(tmp_path) <= path.stat().st_size + 10
    sampled = RequestLog(tmp_path / "sampled", 0.25, 2**20, "text", "v1", seed=0)
    written = sum(sampled.record(Listing(text=f"listing {i}"), {"category": "x"}) for i in range(400))
    assert 60 < written < 140


def test_the_request_log_folder_stays_within_its_cap_across_restarts(tmp_path):
    """Five processes in turn (restarts), each writing more than the whole cap: the folder never
    holds more than the cap, and the oldest files are the ones removed."""
    cap, names = 20_000, []
    for restart in range(5):
        log = RequestLog(tmp_path, 1.0, cap, "text", f"v{restart}")
        for index in range(120):
            listing = Listing(text=f"restart {restart} listing {index} " + "x" * 100)
            assert log.record(listing, {"category": "a"})
            assert folder_bytes(tmp_path) <= cap
        names.append(log.path.name)
    left = sorted(path.name for path in tmp_path.glob("requests-*.jsonl"))
    assert names[-1] in left and left == sorted(left, key=lambda name: int(name.split("-")[1]))
    lines = [line for name in left for line in (tmp_path / name).read_text().splitlines()]
    versions = {json.loads(line)["version"] for line in lines}
    assert versions == {"v4"}  # everything older was removed first
