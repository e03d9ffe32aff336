"""Helpers of the end-to-end tests: photos, a test copy of config.properties (free loopback ports) and
the in-process TorchScript answer that a served answer must equal."""

from __future__ import annotations

import hashlib
import io
import json
from pathlib import Path

import torch
from PIL import Image

from marketplace_classifier.ops import serve
from marketplace_classifier.serving.exported import ExportedModel
from marketplace_classifier.serving.model_kinds import TEXT
from marketplace_classifier.serving.processing import free_text, model_image_from_bytes, model_inputs
from marketplace_classifier.serving.taxonomy import Taxonomy

ROOT = Path(__file__).resolve().parents[1]
REAL_DATA = ROOT.parent / "shared" / "data" / "marketplace"
SERVER_BATCH_SIZE = 8
TEXTS = ["ps5 console with two controllers and fifa", "oak dining table", "kettle"]


def photo(colour=(30, 140, 60), size=(640, 480)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, colour).save(buffer, "JPEG")
    return buffer.getvalue()


def write_test_config(path: Path, store: Path) -> dict:
    """config.properties with free ports and the test's model store; everything else as shipped."""
    return serve.loopback_config(path, {"model_store": str(store)})


def in_process(artifacts: Path, model: str, image: bytes | list[bytes] | None, text: str | None,
               runtime: str | None = None) -> torch.Tensor:
    """The exported model's answer for the same listing, without the server, written out step by
    step: each photo through the model, the mean of their log-probabilities, softmax over the
    temperature; a combined listing without photos through `text_only`. The model runs under
    `runtime`: by default the one its folder names, as the server runs it (tests/test_runtimes.py
    proves each runtime within 1e-4 of the TorchScript)."""
    return in_process_parts(artifacts, model, image, text, runtime)[0]


def in_process_parts(artifacts: Path, model: str, image: bytes | list[bytes] | None, text: str | None,
                     runtime: str | None = None) -> tuple[torch.Tensor, torch.Tensor, Taxonomy]:
    """`in_process`'s root probabilities, the levels head's pooled log-probabilities (the model's
    outputs after the roots, pooled the same way; empty for a root-only model) and the taxonomy."""
    exported = ExportedModel.load(artifacts / model, runtime=runtime)
    settings, tokenizer, scripted = exported.settings, exported.tokenizer, exported.model
    classes, taxonomy = settings.num_classes, Taxonomy.from_json(exported.class_names, settings.taxonomy)
    photos = [image] if isinstance(image, bytes) else list(image or [])
    rows = photos if exported.kind.per_photo else [None]
    with torch.inference_mode():
        if exported.kind.answers_text_only and not photos:
            inputs = model_inputs(TEXT, None, [free_text(text)], tokenizer, settings.text)
            logits = scripted.text_only(*inputs)
            root = torch.log_softmax(logits[:, :classes], 1) / settings.text_only_temperature
            root = torch.softmax(root, 1)
            return root[0], torch.log_softmax(logits[:, classes:], 1)[0], taxonomy
        roots, levels = [], []
        for row in rows:
            images = [model_image_from_bytes(row, settings.image.size)] if row is not None else None
            inputs = exported.inputs(images, [free_text(text)] if text is not None else None)
            output = scripted(*inputs)
            roots.append(torch.log_softmax(output[:, :classes], 1)[0])
            levels.append(torch.log_softmax(output[:, classes:], 1)[0])
        mean = torch.stack(roots).mean(0)
        return torch.softmax(mean / settings.temperature, 0), torch.stack(levels).mean(0), taxonomy


def in_process_path(artifacts: Path, model: str, image: bytes | list[bytes] | None, text: str | None,
                    runtime: str | None = None) -> list[dict]:
    """The path the served answer must carry for the same listing, decoded in the test."""
    root, levels, taxonomy = in_process_parts(artifacts, model, image, text, runtime)
    path = taxonomy.decode(root[None], levels[None] if levels.numel() else None)[0]
    return [level.to_json() for level in path]


def v2_paths(answer: dict) -> list[list[dict]]:
    """Every listing's path of an Open Inference Protocol answer (its path and path_probabilities
    outputs, "" beyond the depth of its answer)."""
    outputs = {output["name"]: output for output in answer["outputs"]}
    count, depth = outputs["path"]["shape"]
    names, probabilities = outputs["path"]["data"], outputs["path_probabilities"]["data"]
    return [[{"name": names[row * depth + level], "probability": probabilities[row * depth + level]}
             for level in range(depth) if names[row * depth + level]] for row in range(count)]


def same_path(served: list[dict], expected: list[dict], tolerance: float = 1e-4) -> bool:
    return [level["name"] for level in served] == [level["name"] for level in expected] and all(
        abs(a["probability"] - b["probability"]) <= tolerance for a, b in zip(served, expected, strict=True))


def as_vector(answer: dict, artifacts: Path, model: str) -> torch.Tensor:
    names = json.loads((artifacts / model / "index_to_name.json").read_text())
    return torch.tensor([answer["probabilities"][names[str(i)]] for i in range(len(names))])


def tree_digest(folder: Path) -> dict[str, str]:
    """Relative path -> sha256 of every file below `folder`."""
    return {str(path.relative_to(folder)): hashlib.sha256(path.read_bytes()).hexdigest()
            for path in sorted(folder.rglob("*")) if path.is_file()}


class FakeRequest:
    """TorchServe's RequestProcessor: the headers of one request."""

    def __init__(self, headers: dict):
        self.headers = headers

    def get_request_properties(self) -> dict:
        return self.headers


class FakeContext:
    """The parts of TorchServe's Context a handler uses, for in-process handler tests.
    Requests arrive over HTTP with the given content types, or over gRPC (no headers)."""

    def __init__(self, model_dir: Path, content_types: list[str | None] | None = None,
                 model_yaml_config: dict | None = None, grpc: bool = False):
        self.system_properties = {"model_dir": str(model_dir), "gpu_id": None}
        self.manifest = {"model": {"serializedFile": "model.pt", "modelName": model_dir.name}}
        self.model_yaml_config = model_yaml_config or {"minWorkers": 1, "handler": {}}
        self.content_types = content_types or []
        http = [{"Host": "127.0.0.1", "content-length": "1"} | ({"Content-Type": kind} if kind else {})
                for kind in self.content_types]
        self.request_processor = [FakeRequest({} if grpc else headers) for headers in http]
        self.statuses: dict[int, tuple[int, str]] = {}
        self.response_headers: dict[int, dict[str, str]] = {}

    def set_response_status(self, code: int = 200, phrase: str = "", idx: int = 0) -> None:
        self.statuses[idx] = (code, phrase)

    def set_response_header(self, idx: int, key: str, value: str) -> None:
        self.response_headers.setdefault(idx, {})[key] = value


def handler_dir(handler) -> Path:
    """The model folder an in-process handler was initialised from."""
    return handler.service.model_dir
