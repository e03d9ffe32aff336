"""One serving plan for both engines (serving/config.py, ServingPlan): what the archiver writes,
TorchServe's handler reads back and the second engine builds from the same defaults."""

from __future__ import annotations

from marketplace_classifier.serving.config import MODEL_CONFIG, MODEL_HANDLER_OPTIONS, ServingPlan


def test_the_plan_reads_the_defaults_and_each_kinds_own_options():
    plan = ServingPlan.from_model_config(MODEL_CONFIG)
    assert (plan.workers, plan.batch_size, plan.max_batch_delay_ms, plan.response_timeout_s) == (
        MODEL_CONFIG["minWorkers"], MODEL_CONFIG["batchSize"], MODEL_CONFIG["maxBatchDelay"],
        MODEL_CONFIG["responseTimeout"])
    assert plan.options == MODEL_CONFIG["handler"]
    image = ServingPlan.for_model("image")
    assert image.options == MODEL_CONFIG["handler"] | MODEL_HANDLER_OPTIONS["image"]
    assert ServingPlan.for_model("text").options == MODEL_CONFIG["handler"]
    assert image.model_config() == MODEL_CONFIG | {"handler": image.options}  # what an archive holds
    assert ServingPlan.from_model_config(image.model_config()) == image  # and reads back


def test_each_worker_gets_its_share_of_the_cores_unless_threads_are_set():
    plan = ServingPlan.for_model("text", MODEL_CONFIG | {"minWorkers": 2})
    assert plan.core_options(cores=2)["threads"] == 1 and plan.core_options(cores=8)["threads"] == 4
    assert plan.core_options(cores=8, workers=1)["threads"] == 8  # the second engine's replicas
    assert plan.core_options(cores=1)["threads"] == 1  # never none
    pinned = ServingPlan.from_model_config(MODEL_CONFIG | {"handler": {"threads": 3}})
    assert pinned.core_options(cores=16)["threads"] == 3
    assert ServingPlan.from_model_config({}).workers == 1  # a model-config.yaml without workers
