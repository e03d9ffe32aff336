"""How the three models are served by default, whichever script builds or starts them: batching,
workers, timeouts and the serving core's options (serving/core.py, ServingOptions). TorchServe
reads them from each archive's model-config.yaml (ops/archive.py writes them there)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace

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


@dataclass(frozen=True)
class ServingPlan:
    """How one model is served, on either engine: its workers (TorchServe) or replicas (Ray Serve),
    batching, timeout, and the core's options with each worker's share of the cores. The archiver
    writes it into model-config.yaml, TorchServe's handler reads it back from there, and the second
    engine builds it from the same defaults: one place decides, every adapter reads."""

    workers: int
    batch_size: int
    max_batch_delay_ms: float
    response_timeout_s: float
    options: dict = field(default_factory=dict)

    @classmethod
    def from_model_config(cls, config: dict) -> ServingPlan:
        """The plan a model-config.yaml (or MODEL_CONFIG) describes."""
        return cls(int(config.get("minWorkers", 1) or 1), int(config.get("batchSize", 1) or 1),
                   float(config.get("maxBatchDelay", 0) or 0), float(config.get("responseTimeout", 60) or 60),
                   dict(config.get("handler") or {}))

    @classmethod
    def for_model(cls, kind: str, config: dict = MODEL_CONFIG) -> ServingPlan:
        """The defaults of `config` with the options that measured better for this model kind."""
        plan = cls.from_model_config(config)
        return replace(plan, options=plan.options | MODEL_HANDLER_OPTIONS.get(kind, {}))

    def model_config(self, base: dict = MODEL_CONFIG) -> dict:
        """`base` (an archive's model-config.yaml) with this plan's core options."""
        return base | {"handler": self.options}

    def core_options(self, cores: int, workers: int | None = None) -> dict:
        """The core's options for one worker: its threads, unless set, are its share of `cores`
        (the cores this process may use: serving.core.available_cores) among `workers`."""
        if self.options.get("threads"):
            return dict(self.options)
        return self.options | {"threads": max(1, cores // (workers or self.workers))}
