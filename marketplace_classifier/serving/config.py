"""How the three models are served by default, whichever script builds or starts them: batching,
workers, timeouts and the serving core's options (serving/core.py, ServingOptions). TorchServe
reads them from each archive's model-config.yaml (ops/archive.py writes them there)."""

from __future__ import annotations

from dataclasses import asdict

from marketplace_classifier.serving.budget import WorkBudget

# Chosen by measurement (`make bench`, marketplace_classifier/benchmarks/tune.py); docs/benchmark.md gives
# the figures.
MODEL_CONFIG = {
    "minWorkers": 2, "maxWorkers": 2, "batchSize": 4, "maxBatchDelay": 10,
    "responseTimeout": 60, "deviceType": "gpu",
    # the work budget (marketplace_classifier/serving/budget.py) is written out so that each archive shows it
    "handler": {"autocast": True, "max_image_pixels": 50_000_000} | asdict(WorkBudget()),
}
# Handler options that measured better for one model only (see marketplace_classifier/serving/core.py,
# ServingOptions).
MODEL_HANDLER_OPTIONS = {"image": {"optimize_for_inference": True},
                         "combined": {"optimize_for_inference": True}}
# The largest request body any engine reads (config.properties' max_request_size for TorchServe,
# the second engine's REST and gRPC limits, the proxy's client_max_body_size): a 10 MB photo,
# base64-encoded in JSON, stays under it. tests/test_engines.py keeps them equal.
MAX_REQUEST_BYTES = 20 * 1024 * 1024
