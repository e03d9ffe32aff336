import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import yaml

from marketplace_classifier.ops.archive import ArchiveError, build_archive
from marketplace_classifier.serving.config import MODEL_CONFIG, ServingPlan

ROOT = Path(__file__).resolve().parents[1]


def test_archive_holds_everything_the_handler_reads(artifacts):
    path = build_archive("text", artifacts, artifacts.parent / "store", root=artifacts.parent)
    with zipfile.ZipFile(path) as archive:
        names = set(archive.namelist())
        config = yaml.safe_load(archive.read("model-config.yaml"))
    core = [f"marketplace_classifier/serving/{name}.py"
            for name in ("core", "processing", "payloads", "settings", "budget", "files")]
    handler = "marketplace_classifier/engines/torchserve/listing_handler.py"
    assert {"model.pt", "text_handler.py", handler, *core, "marketplace_classifier/__init__.py",
            "index_to_name.json", "preprocessing.json", "requirements.txt",
            "tokenizer/tokenizer.json", "MAR-INF/MANIFEST.json"} <= names
    assert config["handler"] == ServingPlan.for_model("text").options
    assert {key: config[key] for key in ("batchSize", "maxBatchDelay", "minWorkers", "maxWorkers",
                                         "responseTimeout", "deviceType")} == {
        key: MODEL_CONFIG[key] for key in ("batchSize", "maxBatchDelay", "minWorkers", "maxWorkers",
                                           "responseTimeout", "deviceType")}


def test_the_handler_imports_from_the_archive_alone(artifacts, tmp_path):
    """A TorchServe worker finds marketplace_classifier in the archive's folder first; in a serving
    image it is the only copy, so the archive must hold every module its handler imports."""
    path = build_archive("combined", artifacts, artifacts.parent / "store", root=artifacts.parent)
    with zipfile.ZipFile(path) as archive:
        archive.extractall(tmp_path / "model")
    model = str(tmp_path / "model")
    probe = f"""
import importlib, sys
sys.meta_path[:] = [finder for finder in sys.meta_path if "editable" not in type(finder).__module__]
sys.path[:] = [{model!r}] + [entry for entry in sys.path if entry and entry != {str(ROOT)!r}]
handler = importlib.import_module("combined_handler")
import marketplace_classifier.serving.core
loaded = [module.__file__ for name, module in sys.modules.items()
          if name.startswith("marketplace_classifier")]
assert all(file.startswith({model!r}) for file in loaded), loaded
print(handler.CombinedHandler.__name__, len(loaded))
"""
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd=tmp_path,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split()[0] == "CombinedHandler" and int(done.stdout.split()[1]) > 10


def test_archive_refuses_paths_outside_the_project_and_missing_files(artifacts, tmp_path):
    root = artifacts.parent
    with pytest.raises(ArchiveError, match="outside the project"):
        build_archive("image", tmp_path, root / "store", root=root)
    with pytest.raises(ArchiveError, match="outside the project"):
        build_archive("image", artifacts, tmp_path / "store", root=root)
    with pytest.raises(ArchiveError, match="outside the project"):
        build_archive("image", root / ".." / tmp_path.name, root / "store", root=root)
    (root / "empty_artifacts" / "image").mkdir(parents=True)
    with pytest.raises(ArchiveError, match="model.pt is missing"):
        build_archive("image", root / "empty_artifacts", root / "store", root=root)
    with pytest.raises(ArchiveError, match="unknown model"):
        build_archive("audio", artifacts, root / "store", root=root)


def test_configs_are_derived_in_one_way(tmp_path):
    from marketplace_classifier.ops import serve

    source = tmp_path / "source.properties"
    source.write_text("# a comment=with equals\ninference_address=http://127.0.0.1:8080\nmodel_store=a\n")
    written = serve.derive_config(source, tmp_path / "derived.properties",
                                  {"model_store": "b", "load_models": "text.mar"})
    assert written == {"inference_address": "http://127.0.0.1:8080", "model_store": "b",
                       "load_models": "text.mar"}
    assert (tmp_path / "derived.properties").read_text().startswith("# a comment=with equals\n")
