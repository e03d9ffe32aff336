import zipfile

import pytest
import yaml

from marketplace_classifier.ops.archive import ArchiveError, build_archive
from marketplace_classifier.serving.config import MODEL_CONFIG


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
    assert {key: config[key] for key in ("batchSize", "maxBatchDelay", "minWorkers", "maxWorkers",
                                         "responseTimeout", "deviceType")} == {
        key: MODEL_CONFIG[key] for key in ("batchSize", "maxBatchDelay", "minWorkers", "maxWorkers",
                                           "responseTimeout", "deviceType")}


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
