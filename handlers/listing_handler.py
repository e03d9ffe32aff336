"""The TorchServe handler shared by the three models; each model module only says what it needs."""

from __future__ import annotations

import logging
import math
import os
import time
from http import HTTPStatus
from pathlib import Path

import torch
from ts.metrics.metric_type_enum import MetricTypes
from ts.torch_handler.base_handler import BaseHandler

from handlers.budget import Cost, WorkBudget, admit, batch_full, check_request
from handlers.payloads import DEFAULT_MAX_PHOTOS, Listing
from handlers.processing import (
    DEFAULT_MAX_PIXELS,
    InputError,
    ascii_message,
    describe_probabilities,
    fit_to_square,
    image_to_tensor,
    listing_probabilities,
    load_photo,
    model_inputs,
    needs_review,
    open_photo,
    pool_photos,
    text_inputs,
)
from handlers.protocols import V1, V2, Envelope, read_request, v1_response, v2_response
from handlers.settings import ModelSettings

logger = logging.getLogger(__name__)

MAX_ERROR_CHARS = 1000
# gRPC status names for the HTTP codes a handler answers with, for clients of the gRPC API
# (TorchServe 0.12 sends every per-request answer with gRPC status OK: see SECURITY.md).
GRPC_CODES = {400: "INVALID_ARGUMENT", 404: "NOT_FOUND", 413: "RESOURCE_EXHAUSTED",
              415: "INVALID_ARGUMENT", 500: "INTERNAL", 503: "UNAVAILABLE"}
# HTTP/1.1 requests always carry these after TorchServe's aggregator; gRPC requests carry none.
HTTP_ONLY_HEADERS = ("host", "content-length", "transfer-encoding")
# Photo rows per forward pass: a batch's rows run in chunks of this many, so that a worker's
# memory does not grow with the batch (activations of 64 photos at once cost gigabytes).
DEFAULT_ROWS_PER_FORWARD = 16


def cgroup_cpu_limit(root: Path = Path("/sys/fs/cgroup")) -> float | None:
    """The container's CPU quota in cores (cgroup v2 cpu.max, or v1 cfs quota/period); None
    when there is none. os.cpu_count() sees the node's cores, not the pod's limit."""
    try:
        if (root / "cpu.max").exists():
            quota, period = (root / "cpu.max").read_text().split()[:2]
            return None if quota == "max" else int(quota) / int(period)
        v1 = root / "cpu"
        if (v1 / "cpu.cfs_quota_us").exists():
            quota = int((v1 / "cpu.cfs_quota_us").read_text())
            return None if quota <= 0 else quota / int((v1 / "cpu.cfs_period_us").read_text())
    except (OSError, ValueError):
        return None
    return None


def available_cores(root: Path = Path("/sys/fs/cgroup")) -> int:
    """Cores this worker's process may use: its CPU affinity, capped by the cgroup quota."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    limit = cgroup_cpu_limit(root)
    return max(1, min(cores, math.ceil(limit))) if limit else cores


def optimise_for_device(model, device: torch.device, enabled: bool):
    """Freeze and apply optimize_for_inference (conv-BN folding, oneDNN kernels) on CPU.

    Only on CPU: the oneDNN layout it chooses does not run on CUDA. Whether it pays is measured
    per model by `make bench` (docs/benchmark.md); the archives turn it on where it did.
    """
    if not enabled or device.type != "cpu":
        return model
    methods = ["text_only"] if hasattr(model, "text_only") else []  # besides forward
    frozen = torch.jit.freeze(model.eval(), preserved_attrs=methods)
    return torch.jit.optimize_for_inference(frozen, other_methods=methods)


class ListingHandler(BaseHandler):
    """Batch-aware: every request of a batch is parsed on its own, bad ones get a 4xx and an
    `error` body, the good ones go through the model together."""

    needs: frozenset[str] = frozenset()

    def initialize(self, context) -> None:
        super().initialize(context)  # TorchScript on cuda:<gpu_id> when given, else CPU
        model_dir = Path(context.system_properties["model_dir"])
        self.settings = ModelSettings.load(model_dir)
        self.index_to_name = self.mapping  # BaseHandler read index_to_name.json
        if not self.index_to_name or len(self.index_to_name) != self.settings.num_classes:
            raise ValueError(f"index_to_name.json in {model_dir} must name the model's "
                             f"{self.settings.num_classes} classes")
        options = (getattr(self, "model_yaml_config", None) or {}).get("handler", {}) or {}
        self.max_pixels = int(options.get("max_image_pixels", DEFAULT_MAX_PIXELS))
        self.max_photos = int(options.get("max_photos", DEFAULT_MAX_PHOTOS))
        self.budget = WorkBudget.from_options(options)
        self.rows_per_forward = int(options.get("rows_per_forward", DEFAULT_ROWS_PER_FORWARD))
        self.autocast = self.device.type == "cuda" and bool(options.get("autocast", True))
        self.model = optimise_for_device(self.model, self.device,
                                         bool(options.get("optimize_for_inference", False)))
        # a combined listing without photos is answered by the text branch, where exported
        self.answers_text_only = self.settings.text_only_temperature is not None and \
            hasattr(self.model, "text_only")
        self.tokenizer = self.load_tokenizer(model_dir) if "text" in self.needs else None
        self.set_threads(options)

    def load_tokenizer(self, model_dir: Path):
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(str(model_dir / self.settings.text.tokenizer),
                                             local_files_only=True)

    def set_threads(self, options: dict) -> None:
        """Share the cores between workers; TorchServe leaves every worker on all of them."""
        workers = int((getattr(self, "model_yaml_config", None) or {}).get("minWorkers", 1) or 1)
        threads = int(options.get("threads", 0)) or max(1, available_cores() // workers)
        torch.set_num_threads(threads)

    # ------------------------------------------------------------ hooks
    def handle(self, data: list, context) -> list:
        started = time.perf_counter()
        self.context = context
        requests = self.admit([self.parse(index, request) for index, request in enumerate(data)])
        requests = [self.decode(index, request) for index, request in enumerate(requests)]
        valid = [request for request in requests if isinstance(request, Envelope)]
        items = [item for request in valid for item in request.items]
        probabilities = self.inference(items) if items else None
        logger.info("batch_size=%d valid=%d listings=%d", len(data), len(valid), len(items))
        responses = self.respond(requests, probabilities)
        self.record_metrics(started, len(data), len(items))
        return responses

    def record_metrics(self, started: float, requests: int, listings: int) -> None:
        """TorchServe's HandlerTime, as BaseHandler.handle emits it, and the batch's size."""
        metrics = getattr(self.context, "metrics", None)
        if metrics is None:
            return
        metrics.add_time("HandlerTime", round((time.perf_counter() - started) * 1000, 2), None, "ms")
        for name, value in (("RequestsPerBatch", requests), ("ListingsPerBatch", listings)):
            metrics.add_metric(name, value, unit="count", metric_type=MetricTypes.GAUGE)

    def parse(self, index: int, request: dict):
        """One request -> an Envelope whose `items` are its listings with their photos' headers
        read (not decoded) and its cost checked against the budget, or the exception explaining
        why not."""
        return self.guarded(index, "parsing", lambda: self.read(index, request))

    def read(self, index: int, request: dict) -> Envelope:
        content_type = self.request_headers(index).get("content-type")
        envelope = read_request(request, content_type, self.needs, len(self.index_to_name),
                                self.max_photos, self.answers_text_only)
        if "image" in self.needs:  # the count first, before a single header is read
            check_request(Cost(sum(len(listing.images) for listing in envelope.listings)), self.budget)
        envelope.items = [self.open(listing) for listing in envelope.listings]
        envelope.cost = sum((Cost(len(item["photos"]), sum(p.width * p.height for p, _ in item["photos"]))
                             for item in envelope.items), Cost())
        check_request(envelope.cost, self.budget)
        return envelope

    def admit(self, requests: list) -> list:
        """The batch within its work budget: requests that do not fit beside their cheaper
        batch-mates are refused (503, retry) before any photo is decoded."""
        positions = [index for index, request in enumerate(requests) if isinstance(request, Envelope)]
        admitted = admit([requests[index].cost for index in positions], self.budget)
        answered = list(requests)
        for index, fits in zip(positions, admitted, strict=True):
            if not fits:
                answered[index] = batch_full(requests[index].cost, self.budget)
        return answered

    def decode(self, index: int, request):
        """An admitted request with its photos decoded into model inputs."""
        if not isinstance(request, Envelope):
            return request

        def decode_all() -> Envelope:
            for item in request.items:
                item["images"] = [self.photo(item, position) for position in range(len(item["photos"]))]
                item["photos"] = None
            return request

        return self.guarded(index, "decoding", decode_all)

    @staticmethod
    def guarded(index: int, stage: str, work):
        """`work()`, or the exception that explains why one request of the batch failed: it
        must not fail the others."""
        try:
            return work()
        except InputError as error:
            return error
        except Exception as error:
            logger.error("request %d of the batch failed in %s: %s", index, stage, type(error).__name__)
            return error

    def open(self, listing: Listing) -> dict:
        """A listing's photos as headers, in the order of their bytes (so that the order they
        were sent in changes nothing), each with its position as sent."""
        item: dict = {"listing": listing, "text": listing.text, "images": [], "photos": []}
        if "image" in self.needs:
            order = sorted(range(len(listing.images)), key=listing.images.__getitem__)
            item["photos"] = [(self.labelled(listing, position, lambda data: open_photo(
                data, self.max_pixels, self.budget.scans_per_photo)), position) for position in order]
        return item

    def photo(self, item: dict, index: int) -> torch.Tensor:
        header, position = item["photos"][index]
        listing: Listing = item["listing"]
        size = self.settings.image.size
        picture = self.labelled(listing, position, lambda data: load_photo(header, data, size))
        return image_to_tensor(fit_to_square(picture, size))

    @staticmethod
    def labelled(listing: Listing, position: int, work):
        """`work(photo bytes)`, its refusal naming the photo."""
        try:
            return work(listing.images[position])
        except InputError as error:
            raise type(error)(f"photo {position + 1} of {len(listing.images)}: {error}") from error

    def collate(self, items: list[dict]) -> tuple[tuple[torch.Tensor, ...], torch.Tensor]:
        """The model inputs (on the CPU), one row per photo (per listing for the text model), and
        the listing each row belongs to."""
        if "image" not in self.needs:
            rows = [(index, None) for index in range(len(items))]
        else:
            rows = [(index, image) for index, item in enumerate(items) for image in item["images"]]
        images = [image for _, image in rows] if "image" in self.needs else None
        texts = [items[index]["text"] for index, _ in rows] if "text" in self.needs else None
        inputs = model_inputs(self.settings.model, images, texts, self.tokenizer, self.settings.text)
        return inputs, torch.tensor([i for i, _ in rows])

    def run(self, method, inputs: tuple[torch.Tensor, ...]) -> torch.Tensor:
        """`method` of the TorchScript model on the worker's device; float32 logits on the CPU."""
        with torch.inference_mode(), torch.autocast("cuda", torch.bfloat16, enabled=self.autocast):
            return method(*(tensor.to(self.device) for tensor in inputs)).float().cpu()

    def run_in_chunks(self, method, inputs: tuple[torch.Tensor, ...]) -> torch.Tensor:
        """`run` over at most `rows_per_forward` rows at a time; the rows are independent."""
        rows, step = len(inputs[0]), self.rows_per_forward
        return torch.cat([self.run(method, tuple(tensor[start:start + step] for tensor in inputs))
                          for start in range(0, rows, step)])

    def inference(self, items: list[dict]) -> torch.Tensor:
        """One row of probabilities per listing: its photos' answers pooled, then the temperature
        fitted on the validation listings."""
        probabilities = torch.empty(len(items), self.settings.num_classes)
        with_rows = [i for i, item in enumerate(items) if item["images"] or "image" not in self.needs]
        if with_rows:
            chosen = [items[i] for i in with_rows]
            inputs, listing_of_row = self.collate(chosen)
            pooled = pool_photos(self.run_in_chunks(self.model, inputs), listing_of_row, len(chosen))
            probabilities[with_rows] = listing_probabilities(pooled, self.settings.temperature)
        text_only = sorted(set(range(len(items))) - set(with_rows))
        if text_only:
            inputs = text_inputs(self.tokenizer, [items[i]["text"] for i in text_only], self.settings.text)
            logits = self.run_in_chunks(self.model.text_only, inputs)
            probabilities[text_only] = listing_probabilities(torch.log_softmax(logits, 1),
                                                             self.settings.text_only_temperature)
        return probabilities

    def describe(self, row: torch.Tensor, item: dict) -> dict:
        """Today's answer, plus whether to file it automatically and what it was made from."""
        listing: Listing = item["listing"]
        answer = describe_probabilities(row.tolist(), self.index_to_name, listing.top_k)
        threshold = listing.min_confidence if listing.min_confidence is not None \
            else self.settings.review_threshold
        answer["needs_review"] = needs_review(answer["probability"], threshold)
        if "image" in self.needs:
            answer["photos"] = len(item["images"])
            if not item["images"]:
                answer["answered_from"] = "text only"
        return answer

    def request_headers(self, index: int) -> dict[str, str]:
        """The HTTP headers of request `index`, names in lower case (none for gRPC)."""
        processors = getattr(self.context, "request_processor", None) or []
        properties = processors[index].get_request_properties() if index < len(processors) else {}
        return {str(name).lower(): value for name, value in properties.items()
                if isinstance(value, str)}  # per-part properties are dicts

    def is_grpc(self, index: int) -> bool:
        return not any(name in self.request_headers(index) for name in HTTP_ONLY_HEADERS)

    def respond(self, requests: list, probabilities) -> list[dict]:
        """One response per request, in its own protocol; errors get their status and a body."""
        responses, start = [], 0
        for index, request in enumerate(requests):
            if self.is_grpc(index):
                # The last (only) answer of a gRPC stream: without it StreamPredictions kills
                # the worker (TorchServe 0.12 reads this header unchecked).
                self.context.set_response_header(index, "ts_stream_next", "false")
            if isinstance(request, Exception):
                responses.append(self.error_response(index, request))
                continue
            rows = probabilities[start:start + len(request.items)]
            start += len(request.items)
            results = [self.describe(row, item) for row, item in zip(rows, request.items, strict=True)]
            responses.append(self.format_response(request, results))
        return responses

    def format_response(self, envelope: Envelope, results: list[dict]):
        if envelope.protocol == V1:
            return v1_response(results)
        if envelope.protocol == V2:
            model = self.context.manifest.get("model", {})
            names = [self.index_to_name[str(i)] for i in range(len(self.index_to_name))]
            return v2_response(results, names, model.get("modelName", ""),
                               model.get("modelVersion"), envelope.request_id)
        return results[0]

    def error_response(self, index: int, error: Exception) -> dict:
        """The status line carries only the standard reason phrase (ASCII, short: TorchServe
        frames it by characters but sends bytes); the JSON body says what was wrong."""
        code = error.status if isinstance(error, InputError) else 500
        message = str(error) if isinstance(error, InputError) else f"internal error: {type(error).__name__}"
        message = ascii_message(message, MAX_ERROR_CHARS)
        self.context.set_response_status(code, HTTPStatus(code).phrase, index)
        if code == HTTPStatus.SERVICE_UNAVAILABLE:
            self.context.set_response_header(index, "Retry-After", "1")
        return {"error": message, "status": code, "grpc_code": GRPC_CODES.get(code, "UNKNOWN")}
