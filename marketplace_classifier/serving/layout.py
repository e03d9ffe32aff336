"""The exported folder's layout: every file name an export writes and a server reads, in one
place. The folder is written as one unit (serving.files.staged_folder) and checked when loaded
(serving.exported.check_files)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

MODEL_FILE = "model.pt"  # TorchScript of what the server calls
SETTINGS_FILE = "preprocessing.json"  # serving.settings.ModelSettings, with the digests of the rest
LABELS_FILE = "index_to_name.json"  # the one label decoder, written by cleaning and export
REFERENCE_FILE = "reference.json"  # training's distributions, for drift (training/reference.py)
CARD_FILE = "model_card.json"  # what a version is and how it did (training/card.py)
TOKENIZER_FOLDER = "tokenizer"  # the text models' tokenizer, saved beside the model
ONNX_FOLDER = "onnx"  # the ONNX programs and OpenVINO IRs of serving/runtimes.py


@dataclass(frozen=True)
class ExportLayout:
    """One exported folder (artifacts/<model>/) and the paths of its parts."""

    folder: Path

    @property
    def model(self) -> Path:
        return self.folder / MODEL_FILE

    @property
    def settings(self) -> Path:
        return self.folder / SETTINGS_FILE

    @property
    def labels(self) -> Path:
        return self.folder / LABELS_FILE

    @property
    def reference(self) -> Path:
        return self.folder / REFERENCE_FILE

    @property
    def card(self) -> Path:
        return self.folder / CARD_FILE

    @property
    def tokenizer(self) -> Path:
        return self.folder / TOKENIZER_FOLDER

    @property
    def onnx(self) -> Path:
        return self.folder / ONNX_FOLDER

