"""The CPU runtimes: ONNX programs exported beside the TorchScript, checked, measured and chosen at
export; the serving core runs whichever the folder names (the served tests run the conftest
exports' runtimes under both engines)."""

from __future__ import annotations

import shutil
from dataclasses import replace

import pytest
import torch

from marketplace_classifier.ops.archive import required_files, stage
from marketplace_classifier.ops.hostile import ordinary_photo, v1_photos
from marketplace_classifier.serving.config import MODEL_CONFIG
from marketplace_classifier.serving.core import ListingService, Request, ServingOptions
from marketplace_classifier.serving.exported import ExportedModel, chosen_runtime
from marketplace_classifier.serving.runtimes import bf16_supported, load_onnx_model, onnx_path
from marketplace_classifier.serving.settings import (
    ONNXRUNTIME,
    OPENVINO,
    TORCHSCRIPT,
    ModelSettings,
    SettingsError,
)
from marketplace_classifier.training import export_runtimes
from marketplace_classifier.training.checkpoints import config_from, load_checkpoint
from marketplace_classifier.training.data import CleanData
from marketplace_classifier.training.examples import example_batches
from marketplace_classifier.training.export import export
from marketplace_classifier.training.export_runtimes import (
    RuntimeExportError,
    Variant,
    bf16_gate,
    check_onnx_fresh_process,
    check_onnx_parity,
    export_onnx,
    fastest_preferring_no_loss,
    int8_gate,
    method_calls,
    validation_loss,
)
from marketplace_classifier.training.text_encoder import load_tokenizer


@pytest.fixture(scope="module")
def text_fastest(trained, tmp_path_factory):
    """The tiny text model exported as `marketplace-classifier export` does by default."""
    root = tmp_path_factory.mktemp("runtimes") / "artifacts"
    export(trained["paths"]["text"], trained["data_dir"], root, measure_seconds=0.2)
    return root / "text"


def loaded(trained, model: str):
    """The eager model, its config, the clean data, its tokenizer and real example batches."""
    model, checkpoint = load_checkpoint(trained["paths"][model])
    config = replace(config_from(checkpoint["config"]), data_dir=str(trained["data_dir"]))
    data = CleanData.load(trained["data_dir"])
    tokenizer = load_tokenizer(config.text_encoder) if config.kind.uses_text else None
    return model.eval(), config, data, tokenizer, example_batches(config, data, tokenizer)


def test_export_names_the_fastest_runtime_it_measured(text_fastest):
    settings = ModelSettings.load(text_fastest)
    choice = settings.runtime_choice
    speeds = choice["items_per_second"]
    assert {TORCHSCRIPT, ONNXRUNTIME, OPENVINO} <= set(speeds) and all(rate > 0 for rate in speeds.values())
    losses = {variant: validation_loss(choice[gate]) for variant, gate in
              (("onnxruntime_int8", "int8_gate"), ("openvino_bf16", "bf16_gate")) if variant in speeds}
    expected = Variant.named(fastest_preferring_no_loss(speeds, losses, choice["lossy_min_speedup"]))
    assert (settings.runtime, settings.onnx_int8, settings.onnx_bf16) == (expected.runtime, expected.int8,
                                                                          expected.bf16)
    gate = choice["int8_gate"]
    int8_file = onnx_path(text_fastest, "forward", int8=True)
    assert gate["adopted"] == ("onnxruntime_int8" in speeds) == int8_file.exists()
    assert choice["bf16_gate"]["adopted"] == ("openvino_bf16" in speeds)
    assert max(choice["max_abs_diff"].values()) <= 1e-4
    assert ExportedModel.load(text_fastest).runtime == settings.runtime


def test_a_variant_that_lost_accuracy_is_chosen_only_when_clearly_faster():
    speeds = {"torchscript": 40.0, "openvino": 41.0, "onnxruntime_int8": 64.1, "openvino_bf16": 58.5}
    # the fresh machine's case: int8 lost 0.4 points and was 10% faster than the lossless bf16
    lost = {"onnxruntime_int8": 0.004, "openvino_bf16": 0.0}
    assert fastest_preferring_no_loss(speeds, lost) == "openvino_bf16"
    assert fastest_preferring_no_loss(speeds | {"onnxruntime_int8": 73.2},
                                      {"onnxruntime_int8": 0.004}) == "onnxruntime_int8"  # just over 1.25x
    assert fastest_preferring_no_loss(speeds, {}) == "onnxruntime_int8"  # nothing lost: plain fastest
    assert fastest_preferring_no_loss(speeds, {"onnxruntime_int8": 0.004, "openvino_bf16": 0.001},
                                      margin=1.6) == "openvino"
    gate = {"adopted": True, "validation_listing_accuracy": {"fp32": 0.8254, "int8": 0.8228}}
    assert validation_loss(gate) == pytest.approx(0.0026)
    gate["validation_listing_accuracy"]["int8"] = 0.83  # a gain is no loss
    assert validation_loss(gate) == 0.0


def listing_requests(model: str) -> list[Request]:
    photos = [ordinary_photo(seed) for seed in range(3)]
    return {
        "image": [Request({"body": photos[0]}, "image/jpeg"),
                  Request({"body": v1_photos(photos, 3)}, "application/json")],
        "text": [Request({"body": "oak dining table, seats six"}, "text/plain"),
                 Request({"body": "PS5 console with two pads"}, "text/plain")],
        "combined": [Request({"body": v1_photos(photos[:3], 3, "ps5 console")}, "application/json"),
                     Request({"body": v1_photos(photos[:1], 1, "kettle")}, "application/json"),
                     Request({"body": {"text": "kettle, boxed"}}, "application/json")],
    }[model]


def probabilities(answers) -> list[list[float]]:
    rows = []
    for answer in answers:
        assert answer.status == 200, answer.body
        for item in answer.body.get("predictions", [answer.body]):
            rows.append([item["probabilities"][name] for name in sorted(item["probabilities"])])
    return rows


@pytest.mark.parametrize("model", ["image", "text", "combined"])
def test_every_runtime_answers_as_the_torchscript_does(artifacts, text_fastest, model):
    folder = text_fastest if model == "text" else artifacts / model
    requests = listing_requests(model)
    expected = probabilities(ListingService(folder, ServingOptions(runtime=TORCHSCRIPT)).handle(requests))
    for runtime in (ONNXRUNTIME, OPENVINO):
        service = ListingService(folder, ServingOptions(runtime=runtime))
        assert service.runtime == runtime
        service.model = ExportedModel.load(folder, runtime=runtime, int8=False, bf16=False).model  # float32
        served = probabilities(service.handle(requests))
        worst = max(abs(a - b) for row, other in zip(served, expected, strict=True)
                    for a, b in zip(row, other, strict=True))
        assert worst <= 1e-4, (runtime, worst)


def test_the_int8_gate_adopts_within_its_margin_and_refuses_beyond_it(trained, tmp_path, monkeypatch):
    model, config, data, tokenizer, batches = loaded(trained, "text")
    for call in method_calls(config.kind, batches[1]):
        export_onnx(model, call, onnx_path(tmp_path, call.name))
    monkeypatch.setattr(export_runtimes, "PRECISION_MAX_DROP", 1.0)
    adopted = int8_gate(model, config, data, tokenizer, tmp_path)
    assert adopted["adopted"] and onnx_path(tmp_path, "forward", int8=True).exists()
    assert set(adopted["test_listing_accuracy"]) == {"fp32", "int8"}
    accuracy = adopted["validation_listing_accuracy"]
    assert 0 <= accuracy["int8"] <= 1 and 0 <= accuracy["fp32"] <= 1
    monkeypatch.setattr(export_runtimes, "PRECISION_MAX_DROP", -1.0)  # no variant can pass
    refused = int8_gate(model, config, data, tokenizer, tmp_path)
    assert not refused["adopted"] and "test_listing_accuracy" not in refused  # test split unread
    assert not onnx_path(tmp_path, "forward", int8=True).exists()


def test_the_image_models_static_int8_is_calibrated_gated_and_served(trained, tmp_path, monkeypatch):
    model, config, data, tokenizer, batches = loaded(trained, "image")
    (call,) = method_calls(config.kind, batches[1])
    export_onnx(model, call, onnx_path(tmp_path, "forward"))
    int8_program = onnx_path(tmp_path, "forward", True, OPENVINO)
    monkeypatch.setattr(export_runtimes, "PRECISION_MAX_DROP", 1.0)
    adopted = int8_gate(model, config, data, tokenizer, tmp_path, OPENVINO)
    assert adopted["adopted"] and adopted["runtime"] == OPENVINO
    assert int8_program.exists() and int8_program.with_suffix(".bin").stat().st_size > 0
    with torch.inference_mode():
        answered = load_onnx_model(tmp_path, config.kind, OPENVINO, int8=True)(*batches[2])
        expected = model(*batches[2])
    assert answered.shape == expected.shape  # int8: close to the float answers, not equal
    assert (answered.argmax(1) == expected.argmax(1)).float().mean() >= 0.5
    monkeypatch.setattr(export_runtimes, "PRECISION_MAX_DROP", -1.0)
    assert not int8_gate(model, config, data, tokenizer, tmp_path, OPENVINO)["adopted"]
    assert not int8_program.exists() and not int8_program.with_suffix(".bin").exists()


def test_the_bf16_gate_adopts_within_its_margin_where_the_cpu_has_bf16(trained, tmp_path, monkeypatch):
    # the text model: the tiny image model's features are all but dead, its logits the same for every photo
    model, config, data, tokenizer, batches = loaded(trained, "text")
    (call,) = method_calls(config.kind, batches[1])
    export_onnx(model, call, onnx_path(tmp_path, "forward"))
    if not bf16_supported():  # the hint would compute in float32: nothing to gate
        gate = bf16_gate(config, data, tokenizer, tmp_path)
        assert not gate["adopted"] and "no bfloat16 units" in gate["not_tried"]
        return
    monkeypatch.setattr(export_runtimes, "PRECISION_MAX_DROP", 1.0)
    adopted = bf16_gate(config, data, tokenizer, tmp_path)
    assert adopted["adopted"] and adopted["runtime"] == OPENVINO
    accuracy = adopted["validation_listing_accuracy"]
    assert set(adopted["test_listing_accuracy"]) == set(accuracy) == {"fp32", "bf16"}
    with torch.inference_mode():
        in_bf16 = load_onnx_model(tmp_path, config.kind, OPENVINO, bf16=True)(*batches[2])
        in_fp32 = load_onnx_model(tmp_path, config.kind, OPENVINO)(*batches[2])
        expected = model(*batches[2])
    assert (in_fp32 - expected).abs().max() <= 1e-4
    assert (in_bf16 - expected).abs().max() > 1e-4  # the hint took effect: bf16, not float32
    assert (in_bf16.argmax(1) == expected.argmax(1)).float().mean() >= 0.5
    monkeypatch.setattr(export_runtimes, "PRECISION_MAX_DROP", -1.0)
    refused = bf16_gate(config, data, tokenizer, tmp_path)
    assert not refused["adopted"] and "test_listing_accuracy" not in refused  # test split unread


def test_a_folder_that_chose_bf16_is_served_in_bf16_and_only_under_openvino(artifacts, tmp_path):
    folder = tmp_path / "image"
    shutil.copytree(artifacts / "image", folder)
    settings = ModelSettings.load(folder)
    replace(settings, onnx_bf16=True).save(folder)
    served = ExportedModel.load(folder)
    in_bf16 = "bf16" if bf16_supported() else "f32"  # a CPU without bf16 units serves it in float32
    assert served.runtime == OPENVINO and served.model.methods["forward"].precision == in_bf16
    assert ModelSettings.load(folder).runtime_label == "openvino bf16"
    elsewhere = ExportedModel.load(folder, runtime=ONNXRUNTIME)  # another runtime: its float programs
    assert elsewhere.model.methods["forward"].precision == "f32"
    with pytest.raises(ValueError, match="OpenVINO's precision hint"):
        load_onnx_model(folder, served.kind, ONNXRUNTIME, bf16=True)


def test_a_program_that_differs_from_the_model_is_refused(trained, tmp_path):
    model, config, _, _, batches = loaded(trained, "image")
    (call,) = method_calls(config.kind, batches[1])
    export_onnx(model, call, onnx_path(tmp_path, "forward"))
    onnx_model = load_onnx_model(tmp_path, config.kind, ONNXRUNTIME)
    assert check_onnx_parity(model, onnx_model, config.kind, batches, 1e-4) <= 1e-4
    with torch.no_grad():
        model.head[-1].bias += 0.5  # the eager model moves on; the program does not
    with pytest.raises(RuntimeExportError, match="differs from the eager model"):
        check_onnx_parity(model, onnx_model, config.kind, batches, 1e-4)


def test_the_fresh_process_check_passes_a_good_program_and_refuses_a_broken_one(artifacts, tmp_path):
    exported = ExportedModel.load(artifacts / "image", runtime=TORCHSCRIPT)
    images = torch.randint(0, 256, (2, 3, exported.settings.image.size, exported.settings.image.size),
                           dtype=torch.uint8)
    with torch.inference_mode():
        expected = [exported.model(images)]
    folder = tmp_path / "image"
    shutil.copytree(artifacts / "image", folder)
    check_onnx_fresh_process(folder, exported.kind, OPENVINO, [(images,)], expected, 1e-4)
    onnx_path(folder, "forward").write_bytes(b"not an onnx program")
    with pytest.raises(RuntimeExportError, match="fresh process"):
        check_onnx_fresh_process(folder, exported.kind, OPENVINO, [(images,)], expected, 1e-4)


def test_settings_refuse_an_unknown_runtime_and_int8_torchscript(artifacts):
    settings = ModelSettings.load(artifacts / "image").to_json()
    with pytest.raises(SettingsError, match="unknown runtime 'tensorrt'"):
        ModelSettings.from_json(settings | {"runtime": "tensorrt"})
    with pytest.raises(SettingsError, match="onnx_int8 needs an ONNX runtime"):
        ModelSettings.from_json(settings | {"runtime": TORCHSCRIPT, "onnx_int8": True})
    with pytest.raises(SettingsError, match="onnx_bf16 is OpenVINO's precision hint, not onnxruntime's"):
        ModelSettings.from_json(settings | {"runtime": ONNXRUNTIME, "onnx_bf16": True})
    with pytest.raises(ValueError, match="unknown runtime 'fast'"):
        ListingService(artifacts / "image", ServingOptions(runtime="fast"))


def test_a_gpu_worker_serves_the_torchscript_and_a_cpu_one_the_chosen_runtime(artifacts):
    settings = ModelSettings.load(artifacts / "image")
    assert settings.runtime == OPENVINO  # tests/conftest.py EXPORT_RUNTIMES
    assert chosen_runtime(settings, None, torch.device("cuda", 0)) == TORCHSCRIPT
    assert chosen_runtime(settings, None, torch.device("cpu")) == OPENVINO
    assert chosen_runtime(settings, ONNXRUNTIME, torch.device("cpu")) == ONNXRUNTIME


def test_the_archive_carries_the_programs_of_its_runtime(artifacts, tmp_path):
    def carried(model: str) -> set[str]:
        return {path.relative_to(artifacts / model).as_posix() for path in required_files(artifacts, model)}

    assert {"onnx/forward.onnx", "model.pt"} <= carried("image")
    assert {"onnx/listings.onnx", "onnx/text_only.onnx"} <= carried("combined")
    assert not [path for path in required_files(artifacts, "text") if "onnx" in path.parts]  # torchscript
    stage("combined", artifacts, tmp_path / "extra", MODEL_CONFIG)
    assert (tmp_path / "extra" / "onnx" / "listings.onnx").stat().st_size == \
        onnx_path(artifacts / "combined", "listings").stat().st_size
    assert (tmp_path / "extra" / "marketplace_classifier" / "serving" / "runtimes.py").exists()
