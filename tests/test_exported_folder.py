"""The exported folder as one unit: written beside the old one and swapped in whole, its files
checked against the digests in its preprocessing.json when loaded."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from marketplace_classifier.ops.hostile import ordinary_photo
from marketplace_classifier.serving.core import ListingService, Request, ServingOptions
from marketplace_classifier.serving.exported import ExportedModel
from marketplace_classifier.serving.files import PARTIAL, folder_digests, remove_abandoned, staged_folder
from marketplace_classifier.serving.settings import (
    LABELS_FILE,
    SETTINGS_FILE,
    TORCHSCRIPT,
    ModelSettings,
    SettingsError,
)

ROOT = Path(__file__).resolve().parents[1]


def answer(folder: Path) -> dict:
    service = ListingService(folder, ServingOptions(runtime=TORCHSCRIPT))
    (result,) = service.handle([Request({"body": ordinary_photo(3)}, "image/jpeg")])
    assert result.status == 200, result.body
    return result.body["probabilities"]


def test_an_export_lists_the_digest_of_every_file_it_wrote(artifacts):
    for model in ("image", "text", "combined"):
        folder = artifacts / model
        settings = ModelSettings.load(folder)
        assert settings.files == folder_digests(folder, leave_out=(SETTINGS_FILE,))
        assert {"model.pt", LABELS_FILE, "model_card.json", "reference.json"} <= set(settings.files)
        assert not list(artifacts.glob(f".{model}{PARTIAL}*"))


def test_a_folder_mixing_two_exports_is_refused(artifacts, tmp_path):
    folder = tmp_path / "text"
    shutil.copytree(artifacts / "text", folder)
    ExportedModel.load(folder, runtime=TORCHSCRIPT)
    shutil.copy2(artifacts / "combined" / "model.pt", folder / "model.pt")
    with pytest.raises(SettingsError, match=r"model\.pt is not the file exported .* SHA-256 differs"):
        ExportedModel.load(folder, runtime=TORCHSCRIPT)
    shutil.copy2(artifacts / "text" / "model.pt", folder / "model.pt")
    labels = json.loads((folder / LABELS_FILE).read_text())
    (folder / LABELS_FILE).write_text(json.dumps(dict(reversed(list(labels.items())))))
    with pytest.raises(SettingsError, match="index_to_name.json is not the file exported"):
        ExportedModel.load(folder, runtime=TORCHSCRIPT)


def test_a_staged_folder_replaces_the_old_whole_or_not_at_all(tmp_path):
    target = tmp_path / "image"
    target.mkdir()
    (target / "model.pt").write_text("old")
    (target / "only-in-old.json").write_text("old")
    with pytest.raises(RuntimeError), staged_folder(target) as staging:
        (staging / "model.pt").write_text("new")
        raise RuntimeError("killed mid-way")
    assert sorted(path.name for path in target.iterdir()) == ["model.pt", "only-in-old.json"]
    with staged_folder(target) as staging:
        (staging / "model.pt").write_text("new")
        assert (target / "model.pt").read_text() == "old"  # the old one serves until the swap
    assert [path.name for path in target.iterdir()] == ["model.pt"]
    assert (target / "model.pt").read_text() == "new"
    assert sorted(path.name for path in tmp_path.iterdir()) == ["image"]  # nothing left beside it


def test_a_killed_re_export_leaves_the_previous_folder_serving(trained, artifacts, tmp_path):
    root = tmp_path / "artifacts"
    shutil.copytree(artifacts / "image", root / "image")
    before, files = answer(root / "image"), ModelSettings.load(root / "image").files
    command = [sys.executable, "-m", "marketplace_classifier.training",
               "export", "--model", "image", "--runtime", TORCHSCRIPT,
               "--data-dir", str(trained["data_dir"]), "--artifacts-dir", str(root),
               "--checkpoint-dir", str(trained["work"] / "checkpoints")]
    log = tmp_path / "export.log"
    with log.open("wb") as output:
        export = subprocess.Popen(command, cwd=ROOT, stdout=output, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 300
    while not list(root.glob(f".image{PARTIAL}*/model.pt")):  # killed once the new model is written
        assert export.poll() is None, log.read_text()[-2000:]
        assert time.monotonic() < deadline, "the export never wrote its model"
        time.sleep(0.05)
    os.kill(export.pid, signal.SIGKILL)
    export.wait()
    assert ModelSettings.load(root / "image").files == files
    assert answer(root / "image") == before
    (abandoned,) = root.glob(f".image{PARTIAL}*")
    assert remove_abandoned(root / "image") == [abandoned] and not abandoned.exists()
