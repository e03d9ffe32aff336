"""The serving core, free of any engine.

Built from an exported model folder (`model.pt`, `preprocessing.json`, `index_to_name.json`,
`tokenizer/`), a `ListingService` turns an engine's requests into listings or refusals, answers
a batch of listings, and owns the limits and the error messages. Each engine's adapter maps its
own lifecycle onto three steps, as TorchServe's BaseHandler and KServe's Model do:

    batch = service.prepare(requests)   # parse, check the work budget, admit, decode photos
    service.predict(batch)              # every listing of the batch through the model together
    answers = service.answer(batch)     # one Answer (status, JSON body, headers) per request
"""

from __future__ import annotations

import functools
import logging
import math
import os
import time
from dataclasses import dataclass, field, fields
from pathlib import Path

import torch
from PIL import Image

from marketplace_classifier.serving.budget import Cost, WorkBudget, admit, batch_full, check_request
from marketplace_classifier.serving.errors import refusal
from marketplace_classifier.serving.explain import Explainer, explained_rows
from marketplace_classifier.serving.exported import ExportedModel
from marketplace_classifier.serving.payloads import DEFAULT_MAX_PHOTOS, Listing
from marketplace_classifier.serving.processing import (
    DEFAULT_MAX_PIXELS,
    InputError,
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
from marketplace_classifier.serving.protocols import (
    V1,
    V2,
    Envelope,
    PreparedListing,
    read_request,
    v1_response,
    v2_response,
)
from marketplace_classifier.serving.request_log import RequestLog
from marketplace_classifier.serving.settings import read_card
from marketplace_classifier.serving.signals import Signals
from marketplace_classifier.serving.taxonomy import Taxonomy

logger = logging.getLogger(__name__)



@dataclass(frozen=True)
class ServingOptions:
    """How one model is served; an engine reads them from its own configuration (TorchServe: the
    `handler:` section of the archive's model-config.yaml)."""

    max_image_pixels: int = DEFAULT_MAX_PIXELS
    max_photos: int = DEFAULT_MAX_PHOTOS
    # Photo rows per forward pass: a batch's rows run in chunks of this many, so that a worker's
    # memory does not grow with the batch (activations of 64 photos at once cost gigabytes).
    rows_per_forward: int = 16
    autocast: bool = True  # bf16 on CUDA
    optimize_for_inference: bool = False  # TorchScript freezing and oneDNN kernels on CPU
    threads: int = 0  # torch threads (and the ONNX runtimes'); 0: the engine decides
    runtime: str = ""  # torchscript, onnxruntime or openvino; "": the one preprocessing.json names
    request_log_dir: str = ""  # a folder: the opt-in request log (serving/request_log.py); "": off
    request_log_sample: float = 0.1  # share of answered listings it records
    request_log_max_mb: int = 100  # the folder's total, all processes and restarts; oldest files go first
    budget: WorkBudget = field(default_factory=WorkBudget)

    @classmethod
    def from_options(cls, options: dict) -> ServingOptions:
        """Flat options (e.g. model-config.yaml's `handler:`); unknown keys belong to the engine."""
        own = {option.name: type(getattr(cls(), option.name))(options[option.name])
               for option in fields(cls) if option.name != "budget" and option.name in options}
        return cls(**own, budget=WorkBudget.from_options(options))


@dataclass
class Request:
    """One request as an engine received it: a body under "body" (or "data") or named parts
    (multipart, a gRPC input map), and its content type ("" or None when it has none)."""

    fields: dict
    content_type: str | None = None


@dataclass
class Answer:
    status: int
    body: dict
    headers: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Refusal:
    """Why one request of a batch is not answered, and at which step; the others go on."""

    error: Exception
    stage: str = "parsing"


@dataclass
class Batch:
    """A batch on its way through the core: per request an Envelope or its Refusal, then the
    probabilities of every listing of the admitted ones."""

    requests: list[Envelope | Refusal]
    probabilities: torch.Tensor | None = None  # the roots', calibrated
    levels: torch.Tensor | None = None  # the levels head's pooled log-probabilities (serving/taxonomy.py)
    started: float = field(default_factory=time.perf_counter)

    @property
    def envelopes(self) -> list[Envelope]:
        return [request for request in self.requests if isinstance(request, Envelope)]

    @property
    def items(self) -> list[PreparedListing]:
        return [item for request in self.envelopes for item in request.items]


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
    """Cores this process may use: its CPU affinity, capped by the cgroup quota."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    limit = cgroup_cpu_limit(root)
    return max(1, min(cores, math.ceil(limit))) if limit else cores


def trim_heap() -> None:
    """Give the heap's free pages back to the operating system (glibc's malloc_trim; nothing
    elsewhere): after large bodies, memory that a worker freed but kept would otherwise count
    against its container's limit until reused."""
    libc = _glibc()
    if libc is not None:
        libc.malloc_trim(0)


@functools.cache
def _glibc():
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    library = ctypes.CDLL(name) if name else None
    return library if library is not None and hasattr(library, "malloc_trim") else None


def device_for(gpu_id: int | str | None) -> torch.device:
    """The GPU an engine gave this worker, or the CPU where there is none."""
    if gpu_id is not None and str(gpu_id) != "" and torch.cuda.is_available():
        return torch.device(f"cuda:{int(gpu_id)}")
    return torch.device("cpu")


def listing_chunks(photo_counts: list[int], step: int) -> list[int]:
    """Where each chunk of whole listings ends: a chunk closes once it holds `step` photos or
    more (one listing larger than `step` is a chunk of its own)."""
    ends, photos = [], 0
    for index, count in enumerate(photo_counts):
        photos += count
        if photos >= step:
            ends.append(index + 1)
            photos = 0
    if not ends or ends[-1] != len(photo_counts):
        ends.append(len(photo_counts))
    return ends


class ListingService:
    """One exported model, served: batch-aware, every request parsed on its own, bad ones
    refused with a status and an `error` body, the good ones through the model together."""

    def __init__(self, model_dir: Path, options: ServingOptions | None = None,
                 device: torch.device | None = None, model_name: str = "", model_version: str | None = None,
                 registry=None):
        self.model_dir, self.options = Path(model_dir), options or ServingOptions()
        self.device = device or torch.device("cpu")
        if self.options.threads:
            torch.set_num_threads(self.options.threads)
        exported = ExportedModel.load(self.model_dir, self.device, self.options.optimize_for_inference,
                                      runtime=self.options.runtime or None)
        self.runtime = exported.runtime
        logger.info("serving %s under %s on %s", self.model_dir.name, self.runtime, self.device)
        self.settings, self.kind, self.model = exported.settings, exported.kind, exported.model
        self.index_to_name, self.class_names = exported.index_to_name, exported.class_names
        self.taxonomy = Taxonomy.from_json(self.class_names, self.settings.taxonomy)
        self.needs, self.tokenizer = self.kind.needs, exported.tokenizer
        self.card = read_card(self.model_dir)
        # the engine's version of the model (TorchServe: the archive's), else the card's
        self.model_version = model_version or (self.card or {}).get("version")
        self.model_name = model_name or self.model_dir.name
        self.signals = Signals(self.model_name, self.model_version, registry)  # registry: the process's
        self.signals.started()
        self.request_log = RequestLog(Path(self.options.request_log_dir), self.options.request_log_sample,
                                      self.options.request_log_max_mb * 2**20, self.model_name,
                                      self.model_version) if self.options.request_log_dir else None
        self.autocast = self.device.type == "cuda" and self.options.autocast
        # a fused model exported with `listings` runs each listing's text once, not once a photo
        self.text_once = self.kind.text_once_per_listing and hasattr(self.model, "listings")
        # a combined listing without photos is answered by the text branch, where exported
        self.answers_text_only = self.settings.text_only_temperature is not None and \
            hasattr(self.model, "text_only")
        self.explainer = Explainer(self)

    @property
    def budget(self) -> WorkBudget:
        return self.options.budget

    # ------------------------------------------------------------ the three steps
    def handle(self, requests: list[Request]) -> list[Answer]:
        batch = self.prepare(requests)
        self.predict(batch)
        return self.answer(batch)

    def prepare(self, requests: list[Request]) -> Batch:
        """Parse each request, check its work against the budget, admit the batch's cheapest
        requests within the batch budget, then decode the admitted ones' photos."""
        started = time.perf_counter()
        return self.prepare_read([self.read_one(request, index) for index, request in enumerate(requests)],
                                 started)

    def read_one(self, request: Request, index: int = 0) -> Envelope | Refusal:
        """One request parsed and its cost known (photo headers read, nothing decoded), or its
        Refusal."""
        return self.guarded(index, "parsing", lambda: self.read(request))

    def prepare_read(self, parsed: list[Envelope | Refusal], started: float | None = None) -> Batch:
        """Requests already read (`read_one`): the batch's cheapest within the batch budget
        admitted, their photos decoded."""
        admitted = self.admit(parsed)
        return Batch([self.decode(index, request) for index, request in enumerate(admitted)],
                     started=started or time.perf_counter())

    def predict(self, batch: Batch) -> Batch:
        """One row of probabilities per listing of the admitted requests: its photos' answers
        pooled, then the temperature fitted on the validation listings."""
        items = batch.items
        logger.info("batch_size=%d valid=%d listings=%d", len(batch.requests), len(batch.envelopes),
                    len(items))
        if items:
            batch.probabilities, batch.levels = self.listing_probabilities(items)
        return batch

    def answer(self, batch: Batch) -> list[Answer]:
        """One Answer per request, in its own protocol; refusals get their status and a body."""
        answers, start = [], 0
        for request in batch.requests:
            if isinstance(request, Refusal):
                answers.append(self.refusal(request.error))
                self.signals.refused(answers[-1].status)
                continue
            end = start + len(request.items)
            rows = batch.probabilities[start:end]
            levels = batch.levels[start:end] if batch.levels is not None else [None] * len(rows)
            start = end
            results = [self.describe(row, item, level) for row, item, level
                       in zip(rows, request.items, levels, strict=True)]
            for result, item in zip(results, request.items, strict=True):
                self.observe(result, item)
                if self.request_log is not None:
                    self.request_log.record(item.listing, result)
            answers.append(Answer(200, self.format_response(request, results)))
        self.signals.batch_seconds(time.perf_counter() - batch.started, len(answers))
        return answers

    def observe(self, result: dict, item: PreparedListing) -> None:
        """An answered listing in the service's signals (marketplace_classifier/serving/signals.py)."""
        self.signals.answered(result["category"], result["probability"], result["needs_review"],
                              len(item.images) if self.kind.uses_image else None,
                              len(item.text or "") if self.kind.uses_text else None,
                              item.photo_sides, result["confident_depth"])

    # ------------------------------------------------------------ reading and admitting
    def read(self, request: Request) -> Envelope:
        envelope = read_request(request.fields, request.content_type, self.needs, len(self.index_to_name),
                                self.options.max_photos, self.answers_text_only)
        if self.kind.uses_image:  # the count first, before a single header is read
            check_request(Cost(sum(len(listing.images) for listing in envelope.listings)), self.budget)
        envelope.items = [self.open(listing) for listing in envelope.listings]
        for item in envelope.items:
            if item.listing.explain:
                item.explained_rows = explained_rows(len(item.listing.images), self.kind.uses_text, item.text)
        envelope.cost = sum((item.cost for item in envelope.items), Cost())
        check_request(envelope.cost, self.budget)
        return envelope

    def admit(self, requests: list[Envelope | Refusal]) -> list[Envelope | Refusal]:
        """The batch within its work budget: requests that do not fit beside their cheaper
        batch-mates are refused (503, retry) before any photo is decoded."""
        positions = [index for index, request in enumerate(requests) if isinstance(request, Envelope)]
        admitted = admit([requests[index].cost for index in positions], self.budget)
        answered = list(requests)
        for index, fits in zip(positions, admitted, strict=True):
            if not fits:
                answered[index] = Refusal(batch_full(requests[index].cost, self.budget), "admission")
        return answered

    def decode(self, index: int, request: Envelope | Refusal) -> Envelope | Refusal:
        """An admitted request with its photos decoded into model inputs."""
        if isinstance(request, Refusal):
            return request

        def decode_all() -> Envelope:
            for item in request.items:
                item.images = [self.photo(item, header) for header in item.headers]
                item.headers = []  # the headers hold the photos' bytes; done with them
            return request

        return self.guarded(index, "decoding", decode_all)

    @staticmethod
    def guarded(index: int, stage: str, work):
        """`work()`, or the Refusal that explains why one request of the batch failed: it must
        not fail the others."""
        try:
            return work()
        except InputError as error:
            return Refusal(error, stage)
        except Exception as error:
            logger.error("request %d of the batch failed in %s: %s", index, stage, type(error).__name__)
            return Refusal(error, stage)

    def open(self, listing: Listing) -> PreparedListing:
        """A listing's photos as headers, in the order of their bytes (so that the order they
        were sent in changes nothing), each with its position as sent."""
        item = PreparedListing(listing)
        if self.kind.uses_image:
            order = sorted(range(len(listing.images)), key=listing.images.__getitem__)
            item.headers = [(self.labelled(listing, position, lambda data: open_photo(
                data, self.options.max_image_pixels, self.budget.scans_per_photo)), position)
                for position in order]
            item.photo_sides = [max(header.width, header.height) for header, _ in item.headers]
            item.positions = [position for _, position in item.headers]
        return item

    def photo(self, item: PreparedListing, photo: tuple[Image.Image, int]) -> torch.Tensor:
        header, position = photo
        size = self.settings.image.size
        picture = self.labelled(item.listing, position, lambda data: load_photo(header, data, size))
        return image_to_tensor(fit_to_square(picture, size))

    @staticmethod
    def labelled(listing: Listing, position: int, work):
        """`work(photo bytes)`, its refusal naming the photo."""
        try:
            return work(listing.images[position])
        except InputError as error:
            raise type(error)(f"photo {position + 1} of {len(listing.images)}: {error}") from error

    # ------------------------------------------------------------ the model
    def collate(self, items: list[PreparedListing]) -> tuple[tuple[torch.Tensor, ...], torch.Tensor]:
        """The model inputs (on the CPU), one row per photo (per listing for the text model), and
        the listing each row belongs to."""
        if self.kind.per_photo:
            rows = [(index, image) for index, item in enumerate(items) for image in item.images]
        else:
            rows = [(index, None) for index in range(len(items))]
        images = [image for _, image in rows] if self.kind.uses_image else None
        texts = [items[index].text for index, _ in rows] if self.kind.uses_text else None
        inputs = model_inputs(self.kind, images, texts, self.tokenizer, self.settings.text)
        return inputs, torch.tensor([i for i, _ in rows])

    def run(self, method, inputs: tuple[torch.Tensor, ...]) -> torch.Tensor:
        """`method` of the TorchScript model on the worker's device; float32 logits on the CPU."""
        with torch.inference_mode(), torch.autocast("cuda", torch.bfloat16, enabled=self.autocast):
            return method(*(tensor.to(self.device) for tensor in inputs)).float().cpu()

    def run_in_chunks(self, method, inputs: tuple[torch.Tensor, ...]) -> torch.Tensor:
        """`run` over at most `rows_per_forward` rows at a time; the rows are independent."""
        rows, step = len(inputs[0]), self.options.rows_per_forward
        return torch.cat([self.run(method, tuple(tensor[start:start + step] for tensor in inputs))
                          for start in range(0, rows, step)])

    def run_listings(self, items: list[PreparedListing]) -> tuple[torch.Tensor, torch.Tensor]:
        """A fused model's logits per photo with each listing's text run once (its `listings`
        method), whole listings at a time up to about `rows_per_forward` photos; and the listing
        of each photo."""
        logits, listing_of_photo, start = [], [], 0
        for end in listing_chunks([len(item.images) for item in items], self.options.rows_per_forward):
            chunk = items[start:end]
            images = torch.stack([image for item in chunk for image in item.images])
            rows = torch.tensor([row for row, item in enumerate(chunk) for _ in item.images])
            text = text_inputs(self.tokenizer, [item.text for item in chunk], self.settings.text)
            logits.append(self.run(self.model.listings, (images, rows, *text)))
            listing_of_photo.append(rows + start)
            start = end
        return torch.cat(logits), torch.cat(listing_of_photo)

    def listing_probabilities(self, items: list[PreparedListing]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Per listing, the roots' calibrated probabilities, and the levels head's pooled
        log-probabilities (None for a root-only model)."""
        classes, below = self.settings.num_classes, len(self.taxonomy.terminals)
        probabilities = torch.empty(len(items), classes)
        levels = torch.zeros(len(items), below) if below else None
        with_rows = [i for i, item in enumerate(items) if item.images or not self.kind.per_photo]
        if with_rows:
            chosen = [items[i] for i in with_rows]
            if self.text_once:
                logits, listing_of_row = self.run_listings(chosen)
            else:
                inputs, listing_of_row = self.collate(chosen)
                logits = self.run_in_chunks(self.model, inputs)
            pooled = pool_photos(logits[:, :classes], listing_of_row, len(chosen))
            probabilities[with_rows] = listing_probabilities(pooled, self.settings.temperature)
            if levels is not None:
                levels[with_rows] = pool_photos(logits[:, classes:], listing_of_row, len(chosen))
        text_only = sorted(set(range(len(items))) - set(with_rows))
        if text_only:
            inputs = text_inputs(self.tokenizer, [items[i].text for i in text_only], self.settings.text)
            logits = self.run_in_chunks(self.model.text_only, inputs)
            probabilities[text_only] = listing_probabilities(torch.log_softmax(logits[:, :classes], 1),
                                                             self.settings.text_only_temperature)
            if levels is not None:
                levels[text_only] = torch.log_softmax(logits[:, classes:], 1)
        return probabilities, levels

    # ------------------------------------------------------------ answers
    def describe(self, row: torch.Tensor, item: PreparedListing, levels: torch.Tensor | None = None) -> dict:
        """The answer, its path down the category tree and how deep it is confident, whether to
        file it automatically, and what it was made from."""
        listing = item.listing
        answer = describe_probabilities(row.tolist(), self.index_to_name, listing.top_k)
        threshold = listing.min_confidence if listing.min_confidence is not None \
            else self.settings.review_threshold
        answer["needs_review"] = needs_review(answer["probability"], threshold)
        path = self.taxonomy.decode(row[None], None if levels is None else levels[None])[0]
        answer["path"] = [level.to_json() for level in path]
        answer["confident_depth"] = self.taxonomy.confident_depth(path, threshold)
        if self.model_version:  # which version answered, for rollouts (marketplace_classifier/ops/rollout.py)
            answer["model_version"] = self.model_version
        if self.kind.uses_image:
            answer["photos"] = len(item.images)
            if not item.images:
                answer["answered_from"] = "text only"
        if listing.explain:
            answer["explanation"] = self.explanation(item, row)
        return answer

    def explanation(self, item: PreparedListing, row: torch.Tensor) -> dict:
        """The listing's explanation; one that fails says so in the answer and spares the batch."""
        try:
            return self.explainer.explain(item, row, self.kind.uses_image and not item.images)
        except Exception as error:
            logger.error("explaining a listing failed: %s", type(error).__name__)
            return {"error": f"the explanation failed ({type(error).__name__}); the answer stands"}

    def format_response(self, envelope: Envelope, results: list[dict]) -> dict:
        if envelope.protocol == V1:
            return v1_response(results)
        if envelope.protocol == V2:
            return v2_response(results, self.class_names, self.model_name, self.model_version,
                               envelope.request_id)
        return results[0]

    @staticmethod
    def refusal(error: Exception) -> Answer:
        """A refusal's status, JSON body and headers (marketplace_classifier/serving/errors.py)."""
        return Answer(*refusal(error))

    def refuse(self, error: Exception) -> Answer:
        """The answer to a request refused outside a batch (an engine's own admission), counted
        in the signals as a batch's refusals are."""
        answer = self.refusal(error)
        self.signals.refused(answer.status)
        return answer
