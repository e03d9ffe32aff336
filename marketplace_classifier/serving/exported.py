"""The one loader of an exported model folder (model.pt, preprocessing.json, index_to_name.json,
tokenizer/): the serving core, the benchmarks and the tests all read a folder here."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from marketplace_classifier.serving.files import file_digest
from marketplace_classifier.serving.layout import MODEL_FILE
from marketplace_classifier.serving.model_kinds import KINDS, ModelKind, model_kind
from marketplace_classifier.serving.processing import model_inputs
from marketplace_classifier.serving.runtimes import OnnxModel, load_onnx_model, onnx_files
from marketplace_classifier.serving.settings import (
    LABELS_FILE,
    RUNTIMES,
    SETTINGS_FILE,
    TORCHSCRIPT,
    ModelSettings,
    SettingsError,
    read_index_to_name,
)

logger = logging.getLogger(__name__)
# what an export may hold beside forward (ModelKind.extra_methods), kept by optimise_for_device
EXTRA_METHODS = tuple(sorted({name for kind in KINDS.values() for name in kind.extra_methods}))


def optimise_for_device(model: torch.jit.ScriptModule, device: torch.device, enabled: bool
                        ) -> torch.jit.ScriptModule:
    """Freeze and apply optimize_for_inference (conv-BN folding, oneDNN kernels) on CPU.

    Only on CPU: the oneDNN layout it chooses does not run on CUDA. Whether it pays is measured
    per model by `make bench` (docs/benchmark.md); the archives turn it on where it did.
    """
    if not enabled or device.type != "cpu":
        return model
    methods = [name for name in EXTRA_METHODS if hasattr(model, name)]  # freezing drops the rest
    frozen = torch.jit.freeze(model.eval(), preserved_attrs=methods)
    return torch.jit.optimize_for_inference(frozen, other_methods=methods)


@dataclass
class ExportedModel:
    """An exported folder, loaded: its settings and kind, labels, TorchScript and tokenizer."""

    folder: Path
    settings: ModelSettings
    kind: ModelKind
    index_to_name: dict[str, str]
    model: torch.jit.ScriptModule | OnnxModel
    tokenizer: object | None
    runtime: str = TORCHSCRIPT

    @classmethod
    def load(cls, folder: Path, device: torch.device | None = None, optimize_for_inference: bool = False,
             runtime: str | None = None, threads: int = 0, int8: bool | None = None,
             bf16: bool | None = None) -> ExportedModel:
        """Read `folder` (SettingsError or FileNotFoundError naming what is wrong) and its model
        under `runtime` (default: the one preprocessing.json names) on `device` (default CPU).
        TorchScript is frozen and fused when `optimize_for_inference`; the ONNX runtimes run on
        the CPU with `threads` threads (0: torch's count), and a GPU worker serves the TorchScript.
        `int8`, `bf16`: the int8 ONNX programs, OpenVINO's bfloat16 (default: where the folder
        chose them for this runtime)."""
        folder, device = Path(folder), device or torch.device("cpu")
        settings = ModelSettings.load(folder)
        kind = model_kind(settings.model)
        index_to_name = read_index_to_name(folder / LABELS_FILE, settings.num_classes)
        runtime = chosen_runtime(settings, runtime, device)
        if int8 is None:
            int8 = settings.onnx_int8 and runtime == settings.runtime
        if bf16 is None:
            bf16 = settings.onnx_bf16 and runtime == settings.runtime
        check_files(folder, settings, files_read(folder, settings, kind, runtime, int8))
        if runtime == TORCHSCRIPT:
            model = load_torchscript(folder, device, optimize_for_inference)
        else:
            model = load_onnx_model(folder, kind, runtime, threads or torch.get_num_threads(), int8, bf16)
        tokenizer = load_tokenizer(folder, settings) if kind.uses_text else None
        return cls(folder, settings, kind, index_to_name, model, tokenizer, runtime)

    @property
    def class_names(self) -> list[str]:
        return [self.index_to_name[str(i)] for i in range(self.settings.num_classes)]

    def inputs(self, images: Sequence[torch.Tensor] | None, texts: Sequence[str] | None
               ) -> tuple[torch.Tensor, ...]:
        """What this model is called with for these decoded photos and/or texts."""
        return model_inputs(self.kind, images, texts, self.tokenizer, self.settings.text)


def files_read(folder: Path, settings: ModelSettings, kind: ModelKind, runtime: str,
               int8: bool) -> list[Path]:
    """The files a load under `runtime` reads besides preprocessing.json."""
    paths = [folder / LABELS_FILE]
    if runtime == TORCHSCRIPT:
        paths.append(folder / MODEL_FILE)
    else:
        paths += onnx_files(folder, kind, int8, runtime)
    if kind.uses_text:
        paths += [path for path in sorted((folder / settings.text.tokenizer).rglob("*")) if path.is_file()]
    return paths


def check_files(folder: Path, settings: ModelSettings, paths: list[Path]) -> None:
    """Refuse a folder whose files are not those exported with its preprocessing.json (a copy or
    a re-export that mixed two versions). Folders exported before digests are read unchecked."""
    if settings.files is None:
        logger.warning("%s: exported without file digests, its files are not checked (export it again)",
                       folder)
        return
    for path in paths:
        if not path.exists():
            continue  # the loader names what is missing
        relative = path.relative_to(folder).as_posix()
        expected = settings.files.get(relative)
        if expected is None or file_digest(path) != expected:
            raise SettingsError(f"{path} is not the file exported with {folder / SETTINGS_FILE} "
                                f"({'not among its files' if expected is None else 'its SHA-256 differs'}): "
                                "the folder mixes two exports; export it again")


def chosen_runtime(settings: ModelSettings, asked: str | None, device: torch.device) -> str:
    """The runtime to serve: the one asked for, else the folder's; TorchScript on a GPU."""
    runtime = asked or settings.runtime
    if runtime not in RUNTIMES:
        raise ValueError(f"unknown runtime {runtime!r}; choose one of {', '.join(RUNTIMES)}")
    if runtime != TORCHSCRIPT and device.type != "cpu":
        logger.warning("%s runs on the CPU only here: serving the TorchScript on %s", runtime, device)
        return TORCHSCRIPT
    return runtime


def load_torchscript(folder: Path, device: torch.device, optimize_for_inference: bool
                     ) -> torch.jit.ScriptModule:
    if not (folder / MODEL_FILE).exists():
        raise FileNotFoundError(f"{folder} has no {MODEL_FILE}: export the model first")
    model = torch.jit.load(str(folder / MODEL_FILE), map_location=device).eval()
    return optimise_for_device(model, device, optimize_for_inference)


def load_tokenizer(folder: Path, settings: ModelSettings):
    """The tokenizer saved beside the model (never downloaded)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(Path(folder) / settings.text.tokenizer), local_files_only=True)
