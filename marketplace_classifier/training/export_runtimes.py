"""Export a trained model's ONNX programs beside its TorchScript, check them under ONNX Runtime and
OpenVINO, try int8, and choose the fastest runtime by measurement (marketplace_classifier/serving/runtimes.py
runs it)."""

from __future__ import annotations

import logging
import subprocess
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

from marketplace_classifier.project import ROOT as PROJECT_ROOT
from marketplace_classifier.serving.files import atomic_write
from marketplace_classifier.serving.model_kinds import LEXICAL_INPUTS, ModelKind
from marketplace_classifier.serving.runtimes import (
    OnnxModel,
    bf16_supported,
    load_onnx_model,
    onnx_files,
    onnx_methods,
    onnx_path,
)
from marketplace_classifier.serving.settings import (
    ONNXRUNTIME,
    OPENVINO,
    RUNTIMES,
    TORCHSCRIPT,
    runtime_label,
)
from marketplace_classifier.training.config import TrainConfig
from marketplace_classifier.training.data import CleanData
from marketplace_classifier.training.examples import listings_example, sample_inputs

ONNX_RUNTIMES = (ONNXRUNTIME, OPENVINO)
FASTEST = "fastest"
OPSET = 17
PRECISION_MAX_DROP = 0.005  # listing accuracy on validation an int8 or bf16 variant may lose and be chosen
MEASURE_SECONDS = 3.0
# A variant that lost validation accuracy is served only when it is this much faster than the best
# lossless one in the same measurement: single-thread timings on a shared machine vary by 10-20%
# between runs, so a smaller lead could be noise bought with a real accuracy loss.
LOSSY_MIN_SPEEDUP = 1.25
CALIBRATION_PHOTOS = 300  # training photos NNCF calibrates the image model's int8 ranges on


class RuntimeExportError(RuntimeError):
    """An ONNX program does not reproduce the trained model, or cannot be written."""


@dataclass(frozen=True)
class MethodCall:
    """One exported method: its name, its inputs' names and a real example of them."""

    name: str
    inputs: tuple[str, ...]
    example: tuple[torch.Tensor, ...]


def method_calls(kind: ModelKind, forward_batch: tuple) -> list[MethodCall]:
    """The ONNX programs of `kind`, each with inputs made from one real batch of forward's inputs."""
    names = kind.script_inputs(lexical=len(forward_batch) > len(kind.script_inputs(lexical=False)))
    calls = {"forward": MethodCall("forward", names, forward_batch),
             "text_only": MethodCall("text_only", names[1:], forward_batch[1:]),
             "listings": MethodCall("listings", (names[0], "listing_of_photo", *names[1:]),
                                    listings_example(forward_batch))}
    return [calls[method] for method in onnx_methods(kind)]


def dynamic_axes(inputs: tuple[str, ...]) -> dict[str, dict[int, str]]:
    """Rows vary for every input; token and lexical-term lengths vary, each on its own."""
    axes = {}
    for name in inputs:
        if name in ("images", "listing_of_photo"):
            axes[name] = {0: "photos"}
        else:
            axes[name] = {0: "texts", 1: "terms" if name in LEXICAL_INPUTS else "tokens"}
    return axes | {"logits": {0: "rows"}}


class _Method(torch.nn.Module):
    """One method of a model as a module's forward, which is what the exporter traces."""

    def __init__(self, model: torch.nn.Module, method: str):
        super().__init__()
        self.model, self.method = model, method

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
        return getattr(self.model, self.method)(*inputs)


def export_onnx(model: torch.nn.Module, call: MethodCall, path: Path) -> Path:
    """`call`'s method of the eager `model` as an ONNX program at `path` (written atomically)."""
    wrapper = _Method(model, call.name).eval()  # the exporter restores the mode it finds, recursively

    def write(temporary: Path) -> None:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the TorchScript-based exporter's deprecation and tracer notes
            # The TorchScript-based exporter: torch 2.14's dynamo exporter took 10x longer per method
            # and is not needed for these graphs (no data-dependent control flow).
            torch.onnx.export(wrapper, call.example, str(temporary), input_names=list(call.inputs),
                              output_names=["logits"], dynamic_axes=dynamic_axes(call.inputs),
                              opset_version=OPSET, dynamo=False)

    atomic_write(path, write)
    model.eval()
    return path


def quantise_onnx(source: Path, target: Path) -> Path:
    """Dynamic int8 quantisation of an ONNX program's MatMuls (the text encoder's linear layers;
    the heads are Gemm and the image backbone Conv, which stay float)."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    root, level = logging.getLogger(), logging.getLogger().level
    root.setLevel(logging.ERROR)  # the quantiser logs a pre-processing tip as a warning on every call
    try:
        return atomic_write(target, lambda temporary: quantize_dynamic(
            str(source), str(temporary), weight_type=QuantType.QInt8, op_types_to_quantize=["MatMul"]))
    finally:
        root.setLevel(level)


def method_batches(kind: ModelKind, method: str, batches: list[tuple]) -> list[tuple]:
    """forward's real batches as the inputs of `method`."""
    if method == "text_only":
        return [batch[1:] for batch in batches]
    if method == "listings":
        return [listings_example(batch) for batch in batches]
    return batches


def check_onnx_parity(model: torch.nn.Module, onnx_model: OnnxModel, kind: ModelKind, batches: list[tuple],
                      tolerance: float) -> float:
    """Worst difference between the eager model and `onnx_model`, method by method, on real
    batches; for a fused model also forward against the programs (its listings, a photo each)."""
    worst, checks = 0.0, [(method, method_batches(kind, method, batches)) for method in onnx_methods(kind)]
    if "forward" not in onnx_methods(kind):
        checks.append(("forward", batches))
    with torch.inference_mode():
        for method, inputs in checks:
            program = onnx_model if method == "forward" else getattr(onnx_model, method)
            for batch in inputs:
                difference = (getattr(model, method)(*batch) - program(*batch)).abs().max().item()
                worst = max(worst, difference)
                if not difference <= tolerance:
                    shapes = [tuple(tensor.shape) for tensor in batch]
                    raise RuntimeExportError(
                        f"{method} under {next(iter(onnx_model.methods.values())).runtime} differs from the "
                        f"eager model by {difference:.2e} (> {tolerance}) on inputs shaped like {shapes}")
    return worst


FRESH_PROCESS_SCRIPT = """\
import sys, torch
from marketplace_classifier.serving.model_kinds import model_kind
from marketplace_classifier.serving.runtimes import load_onnx_model
folder, kind, runtime, tolerance, probe = sys.argv[1:6]
model = load_onnx_model(folder, model_kind(kind), runtime)
data = torch.load(probe)
worst = max((model(*batch) - expected).abs().max().item()
            for batch, expected in zip(data["batches"], data["expected"]))
sys.exit(0 if worst <= float(tolerance) else 3)
"""


def check_onnx_fresh_process(folder: Path, kind: ModelKind, runtime: str, batches: list[tuple],
                             expected: list[torch.Tensor], tolerance: float) -> None:
    """Load the ONNX programs under `runtime` in a new interpreter and compare forward's outputs."""
    import tempfile

    with tempfile.TemporaryDirectory() as temporary:
        probe = Path(temporary) / "probe.pt"
        torch.save({"batches": batches, "expected": expected}, probe)
        result = subprocess.run([sys.executable, "-c", FRESH_PROCESS_SCRIPT, str(folder), kind.name, runtime,
                                 str(tolerance), str(probe)], capture_output=True, text=True,
                                cwd=PROJECT_ROOT)
    if result.returncode != 0:
        raise RuntimeExportError(f"the ONNX programs in {folder} failed to load or reproduce outputs under "
                                 f"{runtime} in a fresh process: "
                                 f"{result.stderr.strip().splitlines()[-1:] or result.returncode}")


def items_per_second(program, batches: list[tuple], seconds: float = MEASURE_SECONDS) -> float:
    """Rows per second of `program` over real batches (each size and padded length in turn), on
    the threads torch is set to, after a warm-up call of each."""
    with torch.inference_mode():
        for batch in batches:
            program(*batch)
        rows, calls, started = 0, 0, time.perf_counter()
        while time.perf_counter() - started < seconds or calls < len(batches):
            batch = batches[calls % len(batches)]
            program(*batch)
            rows, calls = rows + len(batch[0]), calls + 1
    return rows / (time.perf_counter() - started)


@torch.inference_mode()
def listing_accuracy(program, config: TrainConfig, data: CleanData, tokenizer, split: str) -> float:
    """Accuracy per listing on `split` through `program` (a listing's photos pooled as served)."""
    samples = data.samples(config.model, split)
    logits = [program(*sample_inputs(config, data, samples.iloc[start:start + 16], tokenizer))
              for start in range(0, len(samples), 16)]
    return pooled_accuracy(logits, samples, config.kind, data.num_classes)


def pooled_accuracy(logits: list[torch.Tensor], samples, kind: ModelKind, num_classes: int) -> float:
    """Root accuracy per listing of the outputs of `samples` (rows of CleanData.samples, in order):
    each listing's rows pooled by calibration.pool_by_listing, as the server pools photos."""
    from marketplace_classifier.training.calibration import pool_by_listing

    if not logits:
        return 0.0
    listing = samples["product_id"] if kind.per_photo else samples["id"]
    labels = torch.tensor(samples["label"].to_numpy())
    _, pooled, listing_labels = pool_by_listing(torch.cat(logits)[:, :num_classes], labels, listing)
    return (pooled.argmax(1) == listing_labels).float().mean().item()


def export_runtimes(model: torch.nn.Module, config: TrainConfig, data: CleanData, tokenizer,
                    batches: list[tuple], scripted, folder: Path, runtime: str, tolerance: float,
                    seconds: float = MEASURE_SECONDS, try_reduced_precision: bool = True) -> dict:
    """Write folder/onnx/, check it under both ONNX runtimes, try the reduced-precision variants
    (int8, bfloat16) behind the accuracy gate, measure every runtime and variant on the real
    batches, and say which to serve: `runtime` when it names one, else the fastest that passed.
    Returns what preprocessing.json records."""
    kind, threads = config.kind, torch.get_num_threads()
    for call in method_calls(kind, batches[1]):
        export_onnx(model, call, onnx_path(folder, call.name))
    with torch.inference_mode():
        expected = [model(*batch) for batch in batches]
    torch.set_num_threads(1)
    speed = {TORCHSCRIPT: items_per_second(scripted, batches, seconds)}
    parity = {}
    for name in ONNX_RUNTIMES:
        onnx_model = load_onnx_model(folder, kind, name, threads=1)
        parity[name] = check_onnx_parity(model, onnx_model, kind, batches, tolerance)
        check_onnx_fresh_process(folder, kind, name, batches, expected, tolerance)
        speed[name] = items_per_second(onnx_model, batches, seconds)
    sizes = "/".join(str(len(batch[0])) for batch in batches)
    choice = {"measured_on": f"real batches of {sizes} rows in turn, one thread, rows/s",
              "max_abs_diff": parity}
    # int8 where it may pay: the text encoder's matmuls (dynamic, ONNX Runtime), or the image
    # model's convolutions (static, NNCF's calibration, OpenVINO); and OpenVINO's bfloat16
    int8_runtime = ONNXRUNTIME if kind.uses_text else OPENVINO
    gates = {"int8_gate": (Variant(int8_runtime, int8=True),
                           lambda: int8_gate(model, config, data, tokenizer, folder, int8_runtime)),
             "bf16_gate": (Variant(OPENVINO, bf16=True), lambda: bf16_gate(config, data, tokenizer, folder))}
    for name, (variant, gate) in gates.items():
        choice[name] = gate() if try_reduced_precision else "not tried"
        if try_reduced_precision and choice[name]["adopted"]:
            speed[variant.name] = items_per_second(variant.load(folder, kind), batches, seconds)
    torch.set_num_threads(threads)
    choice["items_per_second"] = {name: round(rate, 2) for name, rate in speed.items()}
    if runtime == FASTEST:
        losses = {variant.name: validation_loss(choice[name]) for name, (variant, _) in gates.items()
                  if isinstance(choice[name], dict) and choice[name]["adopted"]}
        choice["lossy_min_speedup"] = LOSSY_MIN_SPEEDUP
        chosen = Variant.named(fastest_preferring_no_loss(speed, losses))
    elif runtime in RUNTIMES:
        chosen = Variant(runtime)
    else:
        raise ValueError(f"unknown runtime {runtime!r}; choose fastest or one of {', '.join(RUNTIMES)}")
    choice["chosen"] = chosen.label
    return {"runtime": chosen.runtime, "onnx_int8": chosen.int8, "onnx_bf16": chosen.bf16,
            "runtime_choice": choice}


def validation_loss(gate: dict) -> float:
    """What an adopted variant lost against its float programs on validation (0 when nothing)."""
    accuracy = gate["validation_listing_accuracy"]
    reduced = next(name for name in accuracy if name != "fp32")
    return max(0.0, accuracy["fp32"] - accuracy[reduced])


def fastest_preferring_no_loss(speed: dict[str, float], losses: dict[str, float],
                               margin: float = LOSSY_MIN_SPEEDUP) -> str:
    """The fastest variant that loses nothing on validation, unless one that loses some is at least
    `margin` times faster (then the fastest of those). `speed`: rows/s by variant name; `losses`:
    the reduced-precision variants' validation loss (the float ones, absent, lose nothing)."""
    lossless = {name: rate for name, rate in speed.items() if losses.get(name, 0.0) <= 0}
    lossy = {name: rate for name, rate in speed.items() if name not in lossless}
    best = max(lossless, key=lossless.get)
    if lossy:
        fastest_lossy = max(lossy, key=lossy.get)
        if lossy[fastest_lossy] >= margin * lossless[best]:
            return fastest_lossy
    return best


@dataclass(frozen=True)
class Variant:
    """A runtime, with int8 programs or OpenVINO's bfloat16 where a precision gate adopted them."""

    runtime: str
    int8: bool = False
    bf16: bool = False

    @classmethod
    def named(cls, name: str) -> Variant:
        """The variant a `name` stands for: `openvino`, `onnxruntime_int8`, `openvino_bf16`..."""
        runtime, _, precision = name.partition("_")
        return cls(runtime, int8=precision == "int8", bf16=precision == "bf16")

    @property
    def label(self) -> str:
        return runtime_label(self.runtime, self.int8, self.bf16)

    @property
    def name(self) -> str:
        return self.label.replace(" ", "_")

    def load(self, folder: Path, kind: ModelKind) -> OnnxModel:
        return load_onnx_model(folder, kind, self.runtime, threads=1, int8=self.int8, bf16=self.bf16)


def quantise_image_program(source: Path, target: Path, config: TrainConfig, data: CleanData,
                           photos: int = CALIBRATION_PHOTOS) -> Path:
    """Static int8 quantisation of an image program with NNCF, calibrated on training photos, saved
    as an OpenVINO IR (float32 weights kept where NNCF leaves them)."""
    import nncf
    import openvino

    from marketplace_classifier.training.features import load_model_image

    samples = data.samples(config.model, "train")
    chosen = samples.sample(min(photos, len(samples)), random_state=0)
    batches = [load_model_image(data.image_path(image), config.image_size)[None].numpy()
               for image in chosen["id"]]
    calibration = nncf.Dataset(batches, lambda images: {"images": images})
    quantised = nncf.quantize(openvino.Core().read_model(str(source)), calibration, subset_size=len(batches))
    # an IR is two files (.xml, .bin): written straight into the export's staged folder, which is
    # swapped in whole (serving.files.staged_folder)
    openvino.save_model(quantised, str(target), compress_to_fp16=False)
    return target


def int8_gate(model: torch.nn.Module, config: TrainConfig, data: CleanData, tokenizer, folder: Path,
              runtime: str = ONNXRUNTIME) -> dict:
    """The int8 programs against the float ones under `runtime` (precision_gate); a refused
    variant's files are deleted."""
    for method in onnx_methods(config.kind):
        if runtime == OPENVINO:
            quantise_image_program(onnx_path(folder, method), onnx_path(folder, method, True, OPENVINO),
                                   config, data)
        else:
            quantise_onnx(onnx_path(folder, method), onnx_path(folder, method, int8=True))
    gate = precision_gate(Variant(runtime, int8=True), config, data, tokenizer, folder)
    if not gate["adopted"]:
        for path in onnx_files(folder, config.kind, True, runtime):
            path.unlink()
    return gate


def bf16_gate(config: TrainConfig, data: CleanData, tokenizer, folder: Path) -> dict:
    """The float programs under OpenVINO computing in bfloat16 against float32 (precision_gate);
    not tried on a CPU without bfloat16 units, where the hint would change nothing."""
    if not bf16_supported():
        return {"runtime": OPENVINO, "adopted": False,
                "not_tried": "this CPU has no bfloat16 units; OpenVINO would compute in float32"}
    return precision_gate(Variant(OPENVINO, bf16=True), config, data, tokenizer, folder)


def precision_gate(variant: Variant, config: TrainConfig, data: CleanData, tokenizer, folder: Path) -> dict:
    """A reduced-precision variant against the float programs under its runtime: listing accuracy
    on the validation split; adopted when it drops by PRECISION_MAX_DROP or less (then, for the
    report, the test split is read once for both)."""
    reduced = "int8" if variant.int8 else "bf16"

    def accuracy(name: str, split: str) -> float:
        program = (variant if name == reduced else Variant(variant.runtime)).load(folder, config.kind)
        return listing_accuracy(program, config, data, tokenizer, split)

    on_validation = {name: accuracy(name, "val") for name in ("fp32", reduced)}
    adopted = on_validation["fp32"] - on_validation[reduced] <= PRECISION_MAX_DROP
    gate = {"runtime": variant.runtime, "max_drop": PRECISION_MAX_DROP, "adopted": adopted,
            "validation_listing_accuracy": {name: round(value, 4) for name, value in on_validation.items()}}
    if adopted:  # the test split is read once a variant is chosen, for the report
        gate["test_listing_accuracy"] = {name: round(accuracy(name, "test"), 4) for name in ("fp32", reduced)}
    return gate
