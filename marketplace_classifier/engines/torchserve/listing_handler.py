"""The TorchServe adapter: the serving core (serving/core.py) on BaseHandler's hooks. Each model's
module (image_, text_, combined_handler.py) is only the file its archive names."""

from __future__ import annotations

import os
import time
from http import HTTPStatus
from pathlib import Path

from ts.handler_utils.timer import timed
from ts.metrics.metric_type_enum import MetricTypes
from ts.torch_handler.base_handler import BaseHandler

from marketplace_classifier.serving.config import ServingPlan
from marketplace_classifier.serving.core import (
    Batch,
    ListingService,
    Request,
    ServingOptions,
    available_cores,
    device_for,
    trim_heap,
)

# HTTP/1.1 requests always carry these after TorchServe's aggregator; gRPC requests carry none.
HTTP_ONLY_HEADERS = ("host", "content-length", "transfer-encoding")
TS_DECODE_SETTING = "TS_DECODE_INPUT_REQUEST"
LARGE_BATCH_BYTES = 4 * 2**20


def request_bytes(request) -> int:
    """The bytes one request of TorchServe's batch carried (its body or its parts)."""
    values = request.values() if isinstance(request, dict) else []
    return sum(len(value) for value in values if isinstance(value, (bytes, bytearray, str)))


class ListingHandler(BaseHandler):
    """preprocess: the batch's requests read, budgeted and decoded; inference: every admitted
    listing through the model; postprocess: one answer per request, refusals with their status.
    Each hook is timed as BaseHandler's are (`handler: {profile: true}` in model-config.yaml)."""

    needs: frozenset[str] = frozenset()  # what the model of this handler's archive is given

    def initialize(self, context) -> None:
        # TorchServe's worker json.loads every application/json body before the handler sees it
        # (20 MB of `[{},{},...]` is 6.6 million objects); it reads this setting per request, so
        # from here on bodies arrive as bytes and the core counts their values first.
        os.environ[TS_DECODE_SETTING] = "false"
        properties = context.system_properties
        config = getattr(context, "model_yaml_config", None) or {}
        # the plan the archive carries; its workers share the cores (TorchServe leaves each on all)
        plan = ServingPlan.from_model_config(config)
        options = ServingOptions.from_options(plan.core_options(available_cores()))
        model = (getattr(context, "manifest", None) or {}).get("model", {})
        self.service = ListingService(Path(properties["model_dir"]), options,
                                      device_for(properties.get("gpu_id")), model.get("modelName", ""),
                                      model.get("modelVersion"))
        if self.needs and self.needs != self.service.needs:
            raise ValueError(f"{type(self).__name__} serves models given {sorted(self.needs)}; the exported "
                             f"model in {properties['model_dir']} is a {self.service.settings.model} model")
        self.device, self.model = self.service.device, self.service.model
        self.initialized = True

    def handle(self, data: list, context) -> list[dict]:
        """BaseHandler.handle without its describe/explain switches, which read headers a client
        can set."""
        started = time.perf_counter()
        self.context = context
        batch = self.inference(self.preprocess(data))
        answers = self.postprocess(batch)
        self.record_metrics(started, len(data), len(batch.items))
        if sum(map(request_bytes, data)) >= LARGE_BATCH_BYTES:
            # TorchServe's worker reads a body with recv(whole length) calls, each a buffer of
            # the body's size shrunk to what arrived: the heap they fragment is given back here
            # (four refused 20 MB bodies otherwise leave 85 MB a worker)
            trim_heap()
        return answers

    @timed
    def preprocess(self, data: list) -> Batch:
        return self.service.prepare([Request(request, self.request_headers(index).get("content-type"))
                                     for index, request in enumerate(data)])

    @timed
    def inference(self, batch: Batch, *args, **kwargs) -> Batch:
        return self.service.predict(batch)

    @timed
    def postprocess(self, batch: Batch) -> list[dict]:
        bodies = []
        for index, answer in enumerate(self.service.answer(batch)):
            if self.is_grpc(index):
                # The last (only) answer of a gRPC stream: without it StreamPredictions kills
                # the worker (TorchServe 0.12 reads this header unchecked).
                self.context.set_response_header(index, "ts_stream_next", "false")
            if answer.status != HTTPStatus.OK:
                # only the standard reason phrase: TorchServe frames it by characters but sends bytes
                self.context.set_response_status(answer.status, HTTPStatus(answer.status).phrase, index)
            for name, value in answer.headers.items():
                self.context.set_response_header(index, name, value)
            bodies.append(answer.body)
        return bodies

    def record_metrics(self, started: float, requests: int, listings: int) -> None:
        """TorchServe's HandlerTime, as BaseHandler.handle emits it, and the batch's size."""
        metrics = getattr(self.context, "metrics", None)
        if metrics is None:
            return
        metrics.add_time("HandlerTime", round((time.perf_counter() - started) * 1000, 2), None, "ms")
        for name, value in (("RequestsPerBatch", requests), ("ListingsPerBatch", listings)):
            metrics.add_metric(name, value, unit="count", metric_type=MetricTypes.GAUGE)

    def request_headers(self, index: int) -> dict[str, str]:
        """The HTTP headers of request `index`, names in lower case (none for gRPC)."""
        processors = getattr(self.context, "request_processor", None) or []
        properties = processors[index].get_request_properties() if index < len(processors) else {}
        return {str(name).lower(): value for name, value in properties.items()
                if isinstance(value, str)}  # per-part properties are dicts

    def is_grpc(self, index: int) -> bool:
        return not any(name in self.request_headers(index) for name in HTTP_ONLY_HEADERS)
