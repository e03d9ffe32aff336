"""Export a trained model as TorchScript with everything its handler reads."""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import warnings
from dataclasses import replace
from pathlib import Path

import torch

from marketplace_classifier.progress import Steps
from marketplace_classifier.serving.files import atomic_write, folder_digests, staged_folder
from marketplace_classifier.serving.layout import ExportLayout
from marketplace_classifier.serving.model_kinds import ModelKind
from marketplace_classifier.serving.settings import (
    LABELS_FILE,
    REFERENCE_FILE,
    RUNTIMES,
    SETTINGS_FILE,
    TORCHSCRIPT,
    ImageSettings,
    ModelSettings,
    write_card,
    write_index_to_name,
)
from marketplace_classifier.training.calibration import (
    DEFAULT_TARGET_PRECISION,
    text_only_temperature,
    validation_answers,
)
from marketplace_classifier.training.card import model_card
from marketplace_classifier.training.checkpoints import config_from, load_checkpoint
from marketplace_classifier.training.config import TrainConfig
from marketplace_classifier.training.data import CleanData
from marketplace_classifier.training.examples import (
    example_batches,
    listings_example,
    listings_example_per_photo,
    sample_inputs,
)
from marketplace_classifier.training.export_runtimes import FASTEST, MEASURE_SECONDS, export_runtimes
from marketplace_classifier.training.levels import calibrated_taxonomy, split_paths
from marketplace_classifier.training.reference import reference_distributions
from marketplace_classifier.training.tasks import make_task, taxonomy_of, text_settings
from marketplace_classifier.training.text_encoder import load_tokenizer

PARITY_TOLERANCE = 1e-4


class ExportError(RuntimeError):
    """The exported program does not reproduce the trained model."""


def preprocessing_settings(config: TrainConfig, model, num_classes: int, answers: dict | None = None,
                           int8: bool = False, runtime: dict | None = None) -> ModelSettings:
    """The single source of what the handler must do before and after the model; `answers`:
    the temperatures and review threshold chosen on validation (see `answer_settings`)."""
    image, kind = None, config.kind
    if kind.uses_image:
        image_model = kind.image_part(model)
        image = ImageSettings(config.image_size, tuple((image_model.mean.flatten() / 255).tolist()),
                              tuple((image_model.std.flatten() / 255).tolist()))
    text = text_settings(config) if kind.uses_text else None
    return ModelSettings(config.model, num_classes, image, text, int8_text_encoder=int8, **(answers or {}),
                         **(runtime or {}))


def answer_settings(model, config: TrainConfig, data: CleanData, target_precision: float, task=None) -> dict:
    """The temperatures and review threshold chosen on the validation listings, for
    preprocessing.json (calibration.validation_answers; the combined model's text-only answer
    has its own temperature)."""
    task = task or make_task(model.eval(), config, data, torch.device("cpu"))
    text_only = text_only_temperature(model, config, data) if config.kind.answers_text_only else None
    answers = validation_answers(model, config, data, target_precision, task) | {
        "target_precision": target_precision, "text_only_temperature": text_only}
    taxonomy = taxonomy_of(config, data)
    if taxonomy is not None and taxonomy.terminals and len(data.samples(config.model, "val")):
        paths = split_paths(model, config, data, taxonomy, "val", task, answers["temperature"])
        answers["taxonomy"] = calibrated_taxonomy(taxonomy, paths, target_precision).to_json()
    return answers


def traced_methods(config: TrainConfig, example: tuple) -> dict[str, tuple]:
    """What the TorchScript file holds: forward, and the kind's extra methods (the combined
    model's text_only takes the text inputs alone; its listings the photos with one text row per
    listing)."""
    methods = {"forward": example}
    if config.kind.answers_text_only:
        methods["text_only"] = example[1:]
    if config.kind.text_once_per_listing:
        methods["listings"] = listings_example(example)
    return methods


def check_parity(expected: list[torch.Tensor], scripted, batches: list[tuple]) -> float:
    """Worst difference between the eager outputs `expected` and the scripted ones."""
    worst = 0.0
    with torch.inference_mode():
        for inputs, eager in zip(batches, expected, strict=True):
            worst = max(worst, (eager - scripted(*inputs)).abs().max().item())
    if worst > PARITY_TOLERANCE:
        shapes = [tuple(tensor.shape) for tensor in batches[-1]]
        raise ExportError(f"TorchScript differs from the eager model by {worst:.2e} "
                          f"(> {PARITY_TOLERANCE}) on inputs shaped like {shapes}")
    return worst


def check_fresh_process(model_path: Path, batches: list[tuple], expected: list[torch.Tensor]) -> None:
    """Load the file in a new interpreter with map_location=cpu and compare its outputs."""
    with tempfile.TemporaryDirectory() as folder:
        probe = Path(folder) / "probe.pt"
        torch.save({"batches": batches, "expected": expected}, probe)
        script = ("import sys, torch\n"
                  "m = torch.jit.load(sys.argv[1], map_location='cpu')\n"
                  "d = torch.load(sys.argv[2])\n"
                  "with torch.inference_mode():\n"
                  "    pairs = zip(d['batches'], d['expected'])\n"
                  "    worst = max((m(*b) - e).abs().max().item() for b, e in pairs)\n"
                  f"sys.exit(0 if worst <= {PARITY_TOLERANCE} else 3)\n")
        result = subprocess.run([sys.executable, "-c", script, str(model_path), str(probe)],
                                capture_output=True, text=True)
    if result.returncode != 0:
        raise ExportError(f"{model_path} failed to load or reproduce outputs in a fresh process: "
                          f"{result.stderr.strip().splitlines()[-1:] or result.returncode}")


def quantise_text_encoder(model: torch.nn.Module, kind: ModelKind) -> torch.nn.Module:
    """Dynamic int8 quantisation of the text encoder's linear layers (an opt-in CPU variant)."""
    text_model = kind.text_part(model)
    text_model.encoder = torch.ao.quantization.quantize_dynamic(
        text_model.encoder, {torch.nn.Linear}, dtype=torch.qint8)
    return model


@torch.inference_mode()
def split_accuracy(model, config: TrainConfig, data: CleanData, tokenizer) -> float:
    """Accuracy on the test split through the whole model (no cached features)."""
    samples = data.samples(config.model, "test")
    correct = 0
    for start in range(0, len(samples), 32):
        chosen = samples.iloc[start:start + 32]
        predictions = model(*sample_inputs(config, data, chosen, tokenizer))[:, :data.num_classes].argmax(1)
        correct += int((predictions == torch.tensor(chosen["label"].to_numpy())).sum())
    return correct / max(len(samples), 1)


def export(checkpoint_path: Path, data_dir: Path, artifacts_dir: Path, int8: bool = False,
           target_precision: float = DEFAULT_TARGET_PRECISION, runtime: str = FASTEST,
           measure_seconds: float = MEASURE_SECONDS, try_reduced_precision: bool = True) -> dict:
    """Write artifacts/<model>/ (or <model>_int8/ with the text encoder quantised): model.pt,
    index_to_name.json, preprocessing.json, tokenizer/, and onnx/ with the programs ONNX Runtime
    and OpenVINO run. `runtime`: what preprocessing.json names for serving, `fastest` (measured
    here) or one of serving.settings.RUNTIMES; `torchscript` writes no onnx/."""
    if runtime != FASTEST and runtime not in RUNTIMES:
        raise ValueError(f"unknown runtime {runtime!r}; choose {FASTEST} or one of {', '.join(RUNTIMES)}")
    if int8 and runtime not in (FASTEST, TORCHSCRIPT):
        raise ValueError("--int8 quantises the TorchScript text encoder: use it with --runtime torchscript")
    model, checkpoint = load_checkpoint(checkpoint_path)
    config = config_from(checkpoint["config"])
    if int8 and not config.kind.uses_text:
        raise ValueError("--int8 quantises the text encoder: use it with the text or combined model")
    steps = Steps(f"export {config.model}", 4 + int(int8) + int(not int8 and runtime != TORCHSCRIPT))
    steps("loading the checkpoint and data; calibrating on validation")
    data = CleanData.load(Path(data_dir))
    tokenizer = load_tokenizer(config.text_encoder) if config.kind.uses_text else None
    config = replace(config, data_dir=str(data_dir))
    task = make_task(model.eval(), config, data, torch.device("cpu"))
    answers = answer_settings(model, config, data, target_precision, task)
    card = model_card(model, checkpoint_path, checkpoint, config, data, answers, task)
    result = {"model": config.model, "version": card["version"]} | answers
    if int8:
        steps("quantising the text encoder (accuracy on test before and after)")
        result["fp32_test_accuracy"] = split_accuracy(model, config, data, tokenizer)
        model = quantise_text_encoder(model, config.kind)
        result["int8_test_accuracy"] = split_accuracy(model, config, data, tokenizer)
    steps("tracing TorchScript and checking it against the model")
    batches = example_batches(config, data, tokenizer)
    with torch.inference_mode(), warnings.catch_warnings():
        # Shape-derived constants (e.g. 'same' padding for the fixed image size) are intended.
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit is what TorchServe 0.12 loads
        scripted = torch.jit.trace_module(model, traced_methods(config, batches[1]), check_trace=False)
    with torch.inference_mode():
        expected = [model(*inputs) for inputs in batches]
    worst = check_parity(expected, scripted, batches)
    if config.kind.answers_text_only:  # listings without a photo are answered by it
        with torch.inference_mode():
            texts_alone = [inputs[1:] for inputs in batches]
            worst = max(worst, check_parity([model.text_only(*b) for b in texts_alone],
                                            scripted.text_only, texts_alone))
    if config.kind.text_once_per_listing:  # the same answers as forward, the text run once
        with torch.inference_mode():
            as_listings = [listings_example(inputs) for inputs in batches]
            worst = max(worst, check_parity([model.listings(*b) for b in as_listings],
                                            scripted.listings, as_listings))
            worst = max(worst, check_parity(expected, scripted.listings,
                                            [listings_example_per_photo(b) for b in batches]))
    out = Path(artifacts_dir) / (config.model + ("_int8" if int8 else ""))
    with staged_folder(out) as staging:  # the previous export serves until this one is complete
        layout = ExportLayout(staging)
        atomic_write(layout.model, lambda temporary: scripted.save(str(temporary)))
        check_fresh_process(layout.model, batches, expected)
        chosen = None
        if not int8 and runtime != TORCHSCRIPT:
            steps("ONNX programs: parity, accuracy gates and speed of each runtime")
            chosen = export_runtimes(model, config, data, tokenizer, batches, scripted, staging, runtime,
                                     PARITY_TOLERANCE, measure_seconds, try_reduced_precision)
            result |= chosen
        card["export"] = {"torchscript_max_abs_diff": worst, "int8_text_encoder": int8,
                          "runtime": (chosen or {}).get("runtime", TORCHSCRIPT),
                          "onnx_int8": (chosen or {}).get("onnx_int8", False),
                          "onnx_bf16": (chosen or {}).get("onnx_bf16", False),
                          "runtime_choice": (chosen or {}).get("runtime_choice")}
        steps("model card and reference distributions (for drift)")
        write_card(card, staging)
        reference = reference_distributions(model, config, data, answers, task)
        text = json.dumps(reference, indent=2) + "\n"
        atomic_write(staging / REFERENCE_FILE, lambda temporary: temporary.write_text(text))
        write_index_to_name(checkpoint["index_to_name"], staging / LABELS_FILE)
        if tokenizer is not None:
            tokenizer.save_pretrained(str(layout.tokenizer))
        settings = preprocessing_settings(config, model, len(checkpoint["index_to_name"]), answers, int8,
                                          chosen)
        replace(settings, files=folder_digests(staging, leave_out=(SETTINGS_FILE,))).save(staging)
        steps("writing preprocessing.json and swapping the folder in")
    steps.done()
    return result | {"path": str(ExportLayout(out).model), "max_abs_diff": worst}
