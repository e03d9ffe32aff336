"""Shipping a retrained model: versioned archives with their model card, and the whole rollout
(stage, compare, promote, rollback, retire) on a real TorchServe under continuous REST and gRPC
load. Run alone with `pytest -m rollout`."""

from __future__ import annotations

import json
import threading
import time
from dataclasses import replace
from pathlib import Path

import pytest
import requests

from marketplace_classifier.ops import rollout, serve
from marketplace_classifier.ops.archive import archive_version, build_archive
from marketplace_classifier.ops.engines import TorchServe
from marketplace_classifier.ops.predict import ClientError, grpc_predict
from marketplace_classifier.serving.config import MODEL_CONFIG
from tests.helpers import write_test_config

pytestmark = [pytest.mark.rollout, pytest.mark.serving]
LISTINGS = ["Sony PS4 Pro 1TB with two controllers", "oak dining table with six chairs",
            "Bosch cordless drill, two batteries", "mountain bike, 21 gears", "kettle, boxed",
            "Nike running shoes size 9", "IKEA Kallax shelf unit, white", "baby buggy with rain cover"]


@pytest.fixture(scope="module")
def versions(trained, tmp_path_factory) -> dict:
    """Three exports of the text model in one project folder: the live one (seed 0), a retrained
    one (seed 1) and a deliberately worse one (one epoch at a tiny learning rate), each archived
    under its own version in one model store; the live one as text.mar."""
    from marketplace_classifier.training.export import export
    from marketplace_classifier.training.train import train

    root = tmp_path_factory.mktemp("rollout")
    base = trained["configs"]["text"]
    runs = {"live": trained["paths"]["text"],
            "retrained": train(replace(base, seed=1, checkpoint_dir=str(root / "checkpoints-retrained"))),
            "worse": train(replace(base, epochs=1, lr=1e-6, lexical_lr=1e-6,
                                   checkpoint_dir=str(root / "checkpoints-worse")))}
    store = root / "model_store"
    found = {"root": root, "store": store}
    config = MODEL_CONFIG | {"minWorkers": 1, "maxWorkers": 1}
    for name, checkpoint in runs.items():
        artifacts = root / f"artifacts-{name}"
        export(checkpoint, trained["data_dir"], artifacts, runtime="torchscript")
        version = archive_version(artifacts / "text")
        file_name = "text" if name == "live" else f"text-{version}"
        build_archive("text", artifacts, store, root=root, model_config=config, file_name=file_name)
        found[name] = {"version": version, "archive": store / f"{file_name}.mar", "artifacts": artifacts}
    assert len({found[name]["version"] for name in runs}) == 3  # one version per training run
    return found


@pytest.fixture(scope="module")
def rollout_server(versions):
    work = versions["root"] / "serving"
    work.mkdir()
    write_test_config(work / "config.properties", versions["store"])
    serve.derive_config(work / "config.properties", work / "config.properties", {"load_models": "text.mar"})
    state = work / "state"
    with TorchServe(state, work / "config.properties", versions["store"], timeout=300, rollout=True):
        yield rollout.Server.from_state(work / "config.properties", state)


def reviewed_export(raw: Path, folder: Path) -> Path:
    """Ten listings of the sample filed by a reviewer under their own path, through the review
    queue and its export (what `rollout compare --reviewed` reads)."""
    from marketplace_classifier.review.corrections import export_decisions
    from marketplace_classifier.review.db import Database
    from marketplace_classifier.review.queue import NewListing, ReviewQueue
    from marketplace_classifier.training.cleaning import read_raw_products

    products = read_raw_products(raw / "Products.csv").dropna(subset=["id", "category"])
    products = products.drop_duplicates("id").head(10)
    queue = ReviewQueue(Database(f"sqlite:///{folder / 'review.db'}"))
    queue.database.migrate()
    queue.add_paths(list(products["category"]))
    reviewer = queue.add_reviewer("ann", "a long password!")
    answer = {"category": "Toys", "probability": 0.5, "path": [{"name": "Toys", "probability": 0.5}]}
    for row in products.itertuples():
        queue.add(NewListing("sample", row.id, "text", answer, product_name=row.product_name,
                             product_description=row.product_description))
        queue.decide(queue.claim_next(reviewer).id, reviewer, row.category)
    export_decisions(queue, folder / "reviewed")
    return folder / "reviewed"


class Load:
    """Continuous requests to the default text endpoint, over REST and gRPC, until stopped; every
    answer's status and version recorded."""

    def __init__(self, server: rollout.Server, rest_threads: int = 12, grpc_threads: int = 4):
        self.server, self.stop, self.lock = server, threading.Event(), threading.Lock()
        self.answers: list[tuple[float, str, str | None]] = []  # (time, protocol, version or None)
        self.threads = [threading.Thread(target=self.rest, args=(i,)) for i in range(rest_threads)] + \
            [threading.Thread(target=self.grpc, args=(i,)) for i in range(grpc_threads)]

    def record(self, protocol: str, version: str | None) -> None:
        with self.lock:
            self.answers.append((time.monotonic(), protocol, version))

    def rest(self, index: int) -> None:
        url = f"{self.server.properties['inference_address']}/predictions/text"
        headers = self.server.headers("inference") | {"Content-Type": "text/plain"}
        while not self.stop.is_set():
            text = LISTINGS[index % len(LISTINGS)]
            try:
                response = requests.post(url, data=text.encode(), headers=headers, timeout=60)
                ok = response.status_code == 200
                self.record("rest", response.json().get("model_version") if ok else None)
            except requests.RequestException:
                self.record("rest", None)

    def grpc(self, index: int) -> None:
        target = f"127.0.0.1:{self.server.properties['grpc_inference_port']}"
        token = self.server.headers("inference").get("Authorization", "").removeprefix("Bearer ") or None
        while not self.stop.is_set():
            try:
                fields = {"text": LISTINGS[index % len(LISTINGS)]}
                answer = grpc_predict(target, "text", None, fields, 3, token)
                self.record("grpc", answer.get("model_version"))
            except ClientError:
                self.record("grpc", None)

    def __enter__(self) -> Load:
        for thread in self.threads:
            thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        for thread in self.threads:
            thread.join(timeout=120)


def probabilities(server: rollout.Server, text: str, version: str | None = None) -> dict:
    answer, _ = server.predict("text", json.dumps({"instances": [{"text": text}]}).encode(), version)
    return answer["predictions"][0]["probabilities"]


def test_the_whole_cycle_under_load_fails_no_request_and_every_answer_names_its_version(
        rollout_server, versions, raw_sample):
    live, retrained = versions["live"]["version"], versions["retrained"]["version"]
    before = {text: probabilities(rollout_server, text) for text in LISTINGS}
    assert rollout.live_version(rollout_server, "text") == live
    with Load(rollout_server) as load:
        time.sleep(2)
        staged = rollout.stage(rollout_server, "text", versions["retrained"]["archive"], workers=1)
        assert staged["staged"] == retrained and staged["card"]["version"] == retrained
        reviewed = reviewed_export(raw_sample[0], versions["root"] / "review")
        compared = rollout.compare(rollout_server, "text", raw_sample[0], count=60, margin=0.2,
                                   reviewed=reviewed)
        assert compared["passed"] and compared["listings"] == 60 and 0 <= compared["agreement"] <= 1
        assert compared["levels_agreement"]["level1"] == compared["agreement"]
        assert set(compared["candidate_figures"]["levels_accuracy"]) >= {"level1", "level2"}
        beside = compared["reviewed"]  # the reviewers' listings, reported beside the sample's
        assert beside["listings"] == 10 and beside["data_dir"] == str(reviewed)
        assert set(beside["live_figures"]["levels_accuracy"]) >= {"level1"}
        promoted_at = time.monotonic()
        promoted = rollout.promote(rollout_server, "text", force=False, drain_seconds=2, workers=1)
        assert promoted["live"] == retrained and promoted["switch_seconds"] > 0
        time.sleep(2)
        rolled_back = rollout.rollback(rollout_server, "text", drain_seconds=2, workers=1)
        assert rolled_back["live"] == live
        time.sleep(2)
        assert rollout.retire(rollout_server, "text", retrained) == {"model": "text", "retired": retrained}
        time.sleep(1)
    answered = load.answers
    print(json.dumps({"answers": len(answered), "promote_switch_seconds": promoted["switch_seconds"],
                      "rollback_switch_seconds": rolled_back["switch_seconds"],
                      "rollback_seconds": rolled_back["seconds"]}))  # docs/rollout.md (pytest -s)
    assert {protocol for _, protocol, _ in answered} == {"rest", "grpc"}
    assert len(answered) > 100 and [a for a in answered if a[2] is None] == []  # none failed
    assert {version for _, _, version in answered} == {live, retrained}  # each named its version
    after_switch = [version for at, _, version in answered if promoted_at + promoted["switch_seconds"] + 0.5
                    < at < promoted_at + promoted["switch_seconds"] + 2]
    assert after_switch and set(after_switch) == {retrained}
    # the rollback brought back the old answers exactly
    assert {text: probabilities(rollout_server, text) for text in LISTINGS} == before
    assert [v["version"] for v in rollout.status(rollout_server, "text")["versions"]] == [live]


def test_per_level_figures_score_the_answered_path_against_the_true_one():
    def answer(*names: str) -> dict:
        return {"category": names[0], "path": [{"name": name, "probability": 0.9} for name in names]}

    truths = [("A", "a1", "x"), ("A", "a2"), ("B",), ("B", "b1", "y")]
    answers = [answer("A", "a1", "x"), answer("A", "a1"), answer("B", "b1"), answer("B")]
    assert rollout.level_accuracy(answers, truths) == {"level1": 1.0, "level2": round(1 / 3, 4),
                                                       "level3": 0.5}
    old_answers = [{"category": "A"}, {"category": "A"}, {"category": "C"}, {"category": "B"}]  # no path
    assert rollout.level_agreement(old_answers, answers, 3) == {"level1": 0.75, "level2": 0.25,
                                                                "level3": 0.25}


def test_a_worse_candidate_is_refused_by_compare_and_promote(rollout_server, versions, raw_sample):
    worse = versions["worse"]["version"]
    rollout.stage(rollout_server, "text", versions["worse"]["archive"], workers=1)
    try:
        compared = rollout.compare(rollout_server, "text", raw_sample[0], count=60, margin=0.02)
        assert not compared["passed"] and "worse than the margin" in compared["verdict"]
        with pytest.raises(rollout.RolloutError, match="refusing to promote"):
            rollout.promote(rollout_server, "text", force=False, drain_seconds=0, workers=1)
        assert rollout.live_version(rollout_server, "text") == versions["live"]["version"]
    finally:
        rollout.retire(rollout_server, "text", worse)


def test_status_shows_the_card_of_each_loaded_version(rollout_server, versions, capsys):
    state_dir = rollout_server.state_dir
    assert rollout.main(["status", "--model", "text", "--state-dir", str(state_dir)]) == 0
    shown = json.loads(capsys.readouterr().out)
    (version,) = shown["versions"]
    card = version["card"]
    assert version["version"] == shown["live"] == card["version"] == versions["live"]["version"]
    assert {"data", "code", "training", "calibration", "validation", "test", "export"} <= set(card)
    assert card["data"]["split"]["seed"] == 0 and len(card["data"]["digest"]) == 64
    assert 0 <= card["validation"]["accuracy_95ci"][0] <= card["validation"]["accuracy"] <= \
        card["validation"]["accuracy_95ci"][1] <= 1
    assert card["training"]["wall_seconds"] > 0 and card["export"]["torchscript_max_abs_diff"] <= 1e-4


def test_registration_takes_only_archives_of_the_model_store(rollout_server, versions, tmp_path):
    for url in ("http://127.0.0.1:9/text.mar", "file:///etc/passwd", "../model_store/text.mar"):
        with pytest.raises(rollout.RolloutError, match="TorchServe refused POST /models"):
            rollout_server.manage("POST", "/models", url=url, synchronous="true")
    outside = tmp_path / "text-elsewhere.mar"
    outside.write_bytes(versions["retrained"]["archive"].read_bytes())
    refused = ((outside, "not a file in the model store"), (Path("https://x/t.mar"), "never a URL"))
    for archive, reason in refused:
        with pytest.raises(rollout.RolloutError, match=reason):
            rollout.stage(rollout_server, "text", archive, workers=1)
    assert rollout.main(["stage", "--model", "text", "--engine", "kserve_ray", "--archive", "x.mar"]) == 2


def test_the_registration_api_needs_loopback_and_a_token(tmp_path):
    config = tmp_path / "config.properties"
    serve.derive_config(serve.ROOT / "config.properties", config, {"management_address": "http://0.0.0.0:8081"})
    with pytest.raises(serve.ServeError, match="not 127.0.0.1"):
        serve.rollout_config(config, tmp_path / "out.properties", tmp_path)
    with pytest.raises(serve.ServeError, match="without token authorization"):
        serve.rollout_config(serve.ROOT / "config.properties", tmp_path / "out.properties", tmp_path,
                             disable_token_auth=True)
    written = serve.read_properties(serve.rollout_config(serve.ROOT / "config.properties",
                                                         tmp_path / "out.properties", tmp_path))
    assert written["enable_model_api"] == "true" and written["allowed_urls"] == "^$"
    assert serve.read_properties(serve.ROOT / "config.properties")["enable_model_api"] == "false"
