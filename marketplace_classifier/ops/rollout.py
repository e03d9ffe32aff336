"""Ship a retrained model without dropping a request: stage a new version beside the live one,
compare them on the same listings, promote, roll back, retire (TorchServe's model versions).

Usage: python -m marketplace_classifier.ops.rollout status   [--model text]
       python -m marketplace_classifier.ops.rollout stage    --model text --archive
       model_store/text-<version>.mar
       python -m marketplace_classifier.ops.rollout compare  --model text --data-dir <marketplace folder>
       [--reviewed <review export>]
       [--margin 0.01]
       python -m marketplace_classifier.ops.rollout promote  --model text [--force]
       python -m marketplace_classifier.ops.rollout rollback --model text
       python -m marketplace_classifier.ops.rollout retire   --model text --version <version>
The server must have been started with `marketplace-classifier serve start --rollout` (the
registration API on, on 127.0.0.1, with its token; archives only from the model store). Each step
prints one JSON object; a refusal prints one `error:` line and exits 2.
"""

from __future__ import annotations

import argparse
import base64
import json
import random
import re
import sys
import time
import zipfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import requests

from marketplace_classifier.ops import serve
from marketplace_classifier.ops.archive import ARCHIVE_NAME
from marketplace_classifier.ops.engines import TorchServe
from marketplace_classifier.serving.files import atomic_write
from marketplace_classifier.serving.model_kinds import MODEL_KINDS, model_kind
from marketplace_classifier.serving.settings import CARD_FILE

ROOT = serve.ROOT
STATE_FILE = "rollout.json"
DEFAULT_MARGIN = 0.01  # accuracy per listing a candidate may lose against the live version
MAX_PHOTOS = 10
URL_SCHEME = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*:")
SWITCH_CHECKS = 8  # consecutive answers from the new default that end a switch


class RolloutError(RuntimeError):
    """A step that cannot or must not be done; the message says why."""


# ------------------------------------------------------------------ the server and the state
class Server:
    """A running TorchServe (its Engine: addresses, tokens) and the rollout's own state file."""

    def __init__(self, engine: TorchServe):
        self.engine = engine
        store = Path(self.properties.get("model_store", "model_store"))
        self.model_store = store if store.is_absolute() else ROOT / store

    @classmethod
    def from_state(cls, config: Path, state_dir: Path) -> Server:
        """The server started in `state_dir` (`marketplace-classifier serve start --rollout`)."""
        return cls(TorchServe.running(Path(state_dir), config))

    @property
    def state_dir(self) -> Path:
        return self.engine.state_dir

    @property
    def properties(self) -> dict[str, str]:
        return self.engine.properties

    def headers(self, kind: str) -> dict:
        return self.engine.headers(kind)

    def manage(self, method: str, path: str, timeout: float = 300, **params) -> dict | list:
        """A management API call; RolloutError with TorchServe's own message when refused."""
        url = f"{self.properties['management_address']}{path}"
        try:
            response = requests.request(method, url, params=params, headers=self.headers("management"),
                                        timeout=timeout)
        except requests.ConnectionError as error:
            raise RolloutError(f"TorchServe's management API at {url} does not answer: "
                               "is the server running (marketplace-classifier serve start --rollout)?"
                               ) from error
        if response.status_code >= 400:
            message = _json(response).get("message") or response.text[:300]
            raise RolloutError(f"TorchServe refused {method} {path}: {response.status_code} {message}")
        return _json(response)

    def versions(self, model: str) -> list[dict]:
        described = self.manage("GET", f"/models/{model}/all")
        return described if isinstance(described, list) else [described]

    def predict(self, model: str, body: bytes, version: str | None = None) -> tuple[dict, float]:
        """One answer (body parsed) and its latency in seconds, from `version` or the default."""
        path = f"/predictions/{model}" + (f"/{version}" if version else "")
        started = time.perf_counter()
        response = requests.post(f"{self.properties['inference_address']}{path}", data=body, timeout=120,
                                 headers=self.headers("inference") | {"Content-Type": "application/json"})
        elapsed = time.perf_counter() - started
        if response.status_code != 200:
            raise RolloutError(f"{path} answered {response.status_code}: {response.text[:300]}")
        return response.json(), elapsed

    def load_state(self) -> dict:
        path = self.state_dir / STATE_FILE
        return json.loads(path.read_text()) if path.exists() else {"models": {}}

    def save_state(self, state: dict) -> None:
        text = json.dumps(state, indent=2) + "\n"
        atomic_write(self.state_dir / STATE_FILE, lambda temporary: temporary.write_text(text))


def _json(response: requests.Response):
    try:
        return response.json()
    except ValueError:
        return {}


def model_state(state: dict, model: str) -> dict:
    return state["models"].setdefault(model, {"history": []})


def live_version(server: Server, model: str) -> str:
    """The version the default endpoint answers with (every answer names its version)."""
    answer, _ = server.predict(model, probe_body(model))
    version = answer["predictions"][0].get("model_version")
    if not version:
        raise RolloutError(f"the live {model} model does not name its version: rebuild its archive "
                           "from an export with a model card (marketplace-classifier export)")
    return version


def probe_body(model: str) -> bytes:
    """A small listing every model of this kind answers."""
    from marketplace_classifier.ops.hostile import ordinary_photo

    listing = {"text": "Sony PS4 Pro 1TB with two controllers"} if model_kind(model).uses_text else {}
    if model_kind(model).uses_image:
        listing["image"] = {"b64": base64.b64encode(ordinary_photo(0)).decode()}
    return json.dumps({"instances": [listing]}).encode()


# ------------------------------------------------------------------ archives
def archive_manifest(path: Path) -> dict:
    """An archive's MANIFEST.json and model card (None when it carries none)."""
    with zipfile.ZipFile(path) as archive:
        manifest = json.loads(archive.read("MAR-INF/MANIFEST.json"))
        card = json.loads(archive.read(CARD_FILE)) if CARD_FILE in archive.namelist() else None
    model = manifest["model"]
    return {"model": model["modelName"], "version": model["modelVersion"], "card": card}


def store_archive(server: Server, archive: Path) -> Path:
    """`archive` if it is a plain .mar file in the model store; RolloutError naming what is wrong
    otherwise (a URL, a path outside the store, a name TorchServe would read as a path)."""
    text = str(archive)
    if URL_SCHEME.match(text):  # pathlib makes "https://x" "https:/x": the scheme is what tells
        raise RolloutError(f"refusing {text!r}: archives are registered from the model store only, "
                           "never a URL")
    store = server.model_store.resolve()
    resolved = (archive if archive.is_absolute() else Path.cwd() / archive).resolve()
    if resolved.parent != store:
        raise RolloutError(f"refusing {text!r}: it is not a file in the model store {store}; "
                           "build it there with marketplace-classifier archive --versioned")
    if resolved.suffix != ".mar" or not ARCHIVE_NAME.fullmatch(resolved.stem):
        raise RolloutError(f"refusing {text!r}: an archive name is letters, digits, '.', '_' and '-', "
                           "ending in .mar")
    if not resolved.is_file():
        raise RolloutError(f"{resolved} does not exist")
    return resolved


# ------------------------------------------------------------------ the steps
def status(server: Server, model: str) -> dict:
    state = model_state(server.load_state(), model)
    versions = []
    for described in server.versions(model):
        archive = server.model_store / described.get("modelUrl", "")
        card = archive_manifest(archive)["card"] if archive.is_file() else None
        versions.append({"version": described["modelVersion"], "archive": described.get("modelUrl"),
                         "workers": len(described.get("workers", [])), "card": card})
    return {"model": model, "live": live_version(server, model), "previous": state.get("previous"),
            "candidate": state.get("candidate"), "versions": versions}


def stage(server: Server, model: str, archive: Path, workers: int) -> dict:
    path = store_archive(server, archive)
    manifest = archive_manifest(path)
    if manifest["model"] != model:
        raise RolloutError(f"{path.name} holds the {manifest['model']} model, not {model}")
    registered = {described["modelVersion"] for described in server.versions(model)}
    if manifest["version"] in registered:
        raise RolloutError(f"{model} version {manifest['version']} is already registered")
    server.manage("POST", "/models", url=path.name, initial_workers=workers, synchronous="true")
    state = server.load_state()
    model_state(state, model).update(candidate=manifest["version"], compare=None)
    server.save_state(state)
    return {"model": model, "staged": manifest["version"], "live": live_version(server, model),
            "workers": workers, "card": manifest["card"]}


def marketplace_listings(folder: Path, count: int, uses_image: bool, seed: int = 0) -> list[dict]:
    """Up to `count` listings of a folder in the marketplace layout (Products.csv, Images.csv,
    images/), cleaned as training cleans them: name, description, photos, root category."""
    from marketplace_classifier.serving.taxonomy import split_path
    from marketplace_classifier.training.cleaning import (
        CleaningReport,
        clean_products,
        read_raw_images,
        read_raw_products,
    )

    products = clean_products(read_raw_products(folder / "Products.csv"), CleaningReport())
    images = read_raw_images(folder / "Images.csv")
    photos = {product: [folder / "images" / f"{image}.jpg" for image in group["id"]]
              for product, group in images.groupby("product_id")}
    listings = []
    for row in products.itertuples():
        paths = [path for path in photos.get(row.id, []) if path.is_file()][:MAX_PHOTOS]
        if uses_image and not paths:
            continue
        listings.append({"product_name": row.product_name, "product_description": row.product_description,
                         "photos": paths if uses_image else [], "label": str(row.root_category),
                         "path": split_path(row.category)})
    random.Random(seed).shuffle(listings)
    return listings[:count]


def listing_body(listing: dict) -> bytes:
    row = {"product_name": listing["product_name"], "product_description": listing["product_description"]}
    if listing["photos"]:
        row["images"] = [{"b64": base64.b64encode(path.read_bytes()).decode()} for path in listing["photos"]]
    return json.dumps({"instances": [row]}).encode()


def answers_of(server: Server, model: str, version: str, bodies: list[bytes]
               ) -> tuple[list[dict], list[float]]:
    with ThreadPoolExecutor(4) as pool:
        pairs = list(pool.map(lambda body: server.predict(model, body, version), bodies))
    return [answer["predictions"][0] for answer, _ in pairs], [latency for _, latency in pairs]


def answered_names(answer: dict) -> tuple[str, ...]:
    """The names of an answer's category path (only the root for an answer without one)."""
    return tuple(level["name"] for level in answer.get("path") or [{"name": answer["category"]}])


def level_accuracy(answers: list[dict], truths: list[tuple[str, ...]]) -> dict[str, float]:
    """Per level L: of the listings whose true path has L levels or more, the share whose
    answered path starts with the true first L (a shorter answer is wrong at L)."""
    depth = max((len(truth) for truth in truths), default=0)
    figures = {}
    for level in range(1, depth + 1):
        scored = [(answered_names(a)[:level], truth[:level]) for a, truth in zip(answers, truths, strict=True)
                  if len(truth) >= level]
        figures[f"level{level}"] = round(sum(answer == truth for answer, truth in scored) / len(scored), 4)
    return figures


def level_agreement(live: list[dict], candidate: list[dict], depth: int) -> dict[str, float]:
    """Per level L: the share of listings whose two answered paths agree on their first L names."""
    return {f"level{level}": round(sum(answered_names(a)[:level] == answered_names(b)[:level]
                                       for a, b in zip(live, candidate, strict=True)) / len(live), 4)
            for level in range(1, depth + 1)}


def figures(answers: list[dict], latencies: list[float], labels: list[str],
            truths: list[tuple[str, ...]] | None = None) -> dict:
    ordered = sorted(latencies)
    return {"accuracy": round(sum(a["category"] == label for a, label in zip(answers, labels, strict=True))
                              / len(labels), 4),
            "levels_accuracy": level_accuracy(answers, truths or [(label,) for label in labels]),
            "filed_automatically": round(sum(not a["needs_review"] for a in answers) / len(answers), 4),
            "p50_ms": round(1000 * ordered[len(ordered) // 2], 1),
            "p95_ms": round(1000 * ordered[min(len(ordered) - 1, int(0.95 * len(ordered)))], 1)}


def compare(server: Server, model: str, data_dir: Path, count: int, margin: float,
            reviewed: Path | None = None) -> dict:
    """Both versions on `count` listings of `data_dir` (the gate: the candidate's root accuracy
    within `margin` of the live one's) and, with `reviewed`, on the listings reviewers filed
    (`marketplace-classifier review export`), reported beside them."""
    state = server.load_state()
    candidate = model_state(state, model).get("candidate")
    if not candidate:
        raise RolloutError(f"no {model} candidate is staged: run `rollout stage` first")
    live = live_version(server, model)
    result = {"model": model, "live": live, "candidate": candidate, "data_dir": str(data_dir)}
    result |= both_versions(server, model, (live, candidate), data_dir, count)
    if reviewed is not None:
        result["reviewed"] = {"data_dir": str(reviewed)} | both_versions(server, model, (live, candidate),
                                                                         reviewed, count)
    result["margin"] = margin
    drop = result["live_figures"]["accuracy"] - result["candidate_figures"]["accuracy"]
    result["passed"] = drop <= margin
    result["verdict"] = (f"candidate accuracy {result['candidate_figures']['accuracy']:.3f} against live "
                         f"{result['live_figures']['accuracy']:.3f}: "
                         + ("within" if result["passed"] else "worse than") + f" the margin of {margin:.3f}")
    model_state(state, model)["compare"] = result
    server.save_state(state)
    return result


def both_versions(server: Server, model: str, versions: tuple[str, str], folder: Path, count: int) -> dict:
    """The live and candidate versions' answers on up to `count` listings of `folder`: their
    agreement and each one's figures against the folder's categories."""
    listings = marketplace_listings(folder, count, model_kind(model).uses_image)
    if not listings:
        raise RolloutError(f"{folder} holds no listing the {model} model can answer")
    bodies = [listing_body(listing) for listing in listings]
    labels = [listing["label"] for listing in listings]
    truths = [listing["path"] for listing in listings]
    live_answers, live_latency = answers_of(server, model, versions[0], bodies)
    new_answers, new_latency = answers_of(server, model, versions[1], bodies)
    depth = max(len(answered_names(answer)) for answer in live_answers + new_answers)
    return {"listings": len(listings),
            "agreement": round(sum(a["category"] == b["category"] for a, b in
                                   zip(live_answers, new_answers, strict=True)) / len(listings), 4),
            "levels_agreement": level_agreement(live_answers, new_answers, depth),
            "live_figures": figures(live_answers, live_latency, labels, truths),
            "candidate_figures": figures(new_answers, new_latency, labels, truths)}


def switch_default(server: Server, model: str, version: str, timeout: float = 60) -> float:
    """Make `version` the default, then the seconds until SWITCH_CHECKS answers in a row came from it."""
    started = time.perf_counter()
    server.manage("PUT", f"/models/{model}/{version}/set-default")
    streak = 0
    while streak < SWITCH_CHECKS:
        if time.perf_counter() - started > timeout:
            raise RolloutError(f"the default {model} endpoint still answers from another version after "
                               f"{timeout:.0f}s")
        streak = streak + 1 if live_version(server, model) == version else 0
    return round(time.perf_counter() - started, 3)


def scale(server: Server, model: str, version: str, workers: int) -> None:
    server.manage("PUT", f"/models/{model}/{version}", min_worker=workers, max_worker=workers,
                  synchronous="true")


def promote(server: Server, model: str, force: bool, drain_seconds: float, workers: int,
            keep_workers: int = 0) -> dict:
    """Make the compared candidate the default; the replaced version keeps `keep_workers` workers
    (0 frees its memory; 1 makes a rollback as fast as the switch itself)."""
    state = server.load_state()
    mine = model_state(state, model)
    candidate, compared = mine.get("candidate"), mine.get("compare")
    if not candidate:
        raise RolloutError(f"no {model} candidate is staged: run `rollout stage` first")
    live = live_version(server, model)
    if not force:
        if not compared or compared["candidate"] != candidate or compared["live"] != live:
            raise RolloutError(f"{model} {candidate} has not been compared with the live {live}: run "
                               "`rollout compare` (or promote with --force)")
        if not compared["passed"]:
            raise RolloutError(f"refusing to promote {model} {candidate}: {compared['verdict']} "
                               "(--force promotes it anyway)")
    scale(server, model, candidate, workers)
    seconds = switch_default(server, model, candidate)
    time.sleep(drain_seconds)  # requests queued for the old version finish before its workers go
    scale(server, model, live, keep_workers)
    mine.update(previous=live, candidate=None, compare=None)
    mine["history"].append({"promoted": candidate, "replaced": live, "at": time.time(),
                            "switch_seconds": seconds})
    server.save_state(state)
    return {"model": model, "live": candidate, "previous": live, "switch_seconds": seconds, "forced": force}


def rollback(server: Server, model: str, drain_seconds: float, workers: int, keep_workers: int = 0) -> dict:
    state = server.load_state()
    mine = model_state(state, model)
    previous = mine.get("previous")
    if not previous:
        raise RolloutError(f"{model} has no previous version to roll back to")
    live = live_version(server, model)
    started = time.perf_counter()
    scale(server, model, previous, workers)
    seconds = switch_default(server, model, previous)
    time.sleep(drain_seconds)
    scale(server, model, live, keep_workers)
    mine.update(previous=live, candidate=None, compare=None)
    mine["history"].append({"rolled_back_to": previous, "replaced": live, "at": time.time(),
                            "switch_seconds": seconds})
    server.save_state(state)
    return {"model": model, "live": previous, "previous": live, "switch_seconds": seconds,
            "seconds": round(time.perf_counter() - started, 3)}


def retire(server: Server, model: str, version: str) -> dict:
    if version == live_version(server, model):
        raise RolloutError(f"{model} {version} is the live version: promote or roll back to another "
                           "before retiring it")
    server.manage("DELETE", f"/models/{model}/{version}")
    state = server.load_state()
    mine = model_state(state, model)
    for key in ("previous", "candidate"):
        if mine.get(key) == version:
            mine[key] = None
    server.save_state(state)
    return {"model": model, "retired": version}


# ------------------------------------------------------------------ the command line
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("step", choices=("status", "stage", "compare", "promote", "rollback", "retire"))
    parser.add_argument("--model", choices=MODEL_KINDS, required=True, help="the model to act on")
    parser.add_argument("--engine", choices=("torchserve", "kserve_ray"), default="torchserve")
    parser.add_argument("--archive", type=Path, help="stage: a .mar file in the model store")
    parser.add_argument("--version", help="retire: the version to unregister")
    parser.add_argument("--data-dir", type=Path, help="compare: a folder in the marketplace layout")
    parser.add_argument("--count", type=int, default=200, help="compare: listings sent to both versions")
    parser.add_argument("--reviewed", type=Path,
                        help="compare: reviewers' decisions (marketplace-classifier review export), reported "
                             "beside --data-dir")
    parser.add_argument("--margin", type=float, default=DEFAULT_MARGIN,
                        help="compare: accuracy per listing the candidate may lose (default 0.01)")
    parser.add_argument("--force", action="store_true", help="promote: even if compare found it worse")
    parser.add_argument("--workers", type=int, default=2, help="workers of the version being made live")
    parser.add_argument("--keep-workers", type=int, default=0,
                        help="promote/rollback: workers the replaced version keeps (1: rollback in seconds)")
    parser.add_argument("--drain-seconds", type=float, default=2.0,
                        help="wait after a switch before the old version's workers are scaled down")
    parser.add_argument("--config", type=Path, default=ROOT / "config.properties")
    parser.add_argument("--state-dir", type=Path, default=ROOT / ".serve")
    args = parser.parse_args(argv)
    try:
        if args.engine != "torchserve":
            raise RolloutError("the second engine serves exported folders without versions: replace a model "
                               "there by restarting it on the new folder (ops/serve.py); rollouts with "
                               "stage, compare, promote and rollback are TorchServe's (see the README)")
        server = Server.from_state(args.config, args.state_dir)
        print(json.dumps(run_step(server, args), indent=2))
    except RolloutError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


def run_step(server: Server, args: argparse.Namespace) -> dict:
    if args.step == "status":
        return status(server, args.model)
    if args.step == "stage":
        if args.archive is None:
            raise RolloutError("stage needs --archive (a .mar file in the model store)")
        return stage(server, args.model, args.archive, args.workers)
    if args.step == "compare":
        if args.data_dir is None or not (args.data_dir / "Products.csv").exists():
            raise RolloutError("compare needs --data-dir, a folder in the marketplace layout "
                               "(Products.csv, Images.csv, images/)")
        return compare(server, args.model, args.data_dir, args.count, args.margin, args.reviewed)
    if args.step == "promote":
        return promote(server, args.model, args.force, args.drain_seconds, args.workers, args.keep_workers)
    if args.step == "rollback":
        return rollback(server, args.model, args.drain_seconds, args.workers, args.keep_workers)
    if args.version is None:
        raise RolloutError("retire needs --version")
    return retire(server, args.model, args.version)


if __name__ == "__main__":
    raise SystemExit(main())
