"""Lay out the storage folder KServe's TorchServe runtime mounts at /mnt/models.

    <out>/config/config.properties   TorchServe settings for the pod (written here)
    <out>/model-store/<model>.mar    the archives, copied from model_store/

Usage: marketplace-classifier kserve-storage [--model-store model_store] [--out kserve-storage]
       [--model image text combined] [--batch-size 4] [--max-batch-delay 10] [--workers 1]
Then upload <out> to what the InferenceService's storageUri names (a PVC, S3 or GCS folder).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

from marketplace_classifier.ops import serve
from marketplace_classifier.ops.archive import MODELS, add_batching_options, batching_config
from marketplace_classifier.project import ROOT as PROJECT_ROOT
from marketplace_classifier.serving.config import MODEL_CONFIG

ROOT = PROJECT_ROOT
MOUNT = "/mnt/models"  # where KServe's storage initializer puts the storageUri's contents
SNAPSHOT_KEYS = ("minWorkers", "maxWorkers", "batchSize", "maxBatchDelay", "responseTimeout")

POD_HEADER = """\
# TorchServe inside a KServe pod, derived by marketplace_classifier/ops/kserve_storage.py from the project's
# config.properties (below, with the pod's changes). KServe's model server (the runtime image's
# wrapper, deploy/kserve/wrapper/) takes requests on :8080 and forwards them to TorchServe here,
# on loopback: nothing else in the cluster reaches TorchServe's APIs. The wrapper calls
# TorchServe without a token (its readiness poll and its predict calls), so token authorization
# is off inside the pod; KServe's ingress is where to authenticate. The handlers read KServe v1
# and v2 bodies themselves, batch by batch; TorchServe's own envelopes read only the first
# request of a batch, so the TS_SERVICE_ENVELOPE variable that KServe's runtime sets must not
# take effect: environment overrides stay off.
"""


def pod_changes(bind: str, mount: str, snapshot: dict) -> dict[str, str]:
    """What differs in the pod from the project's config.properties."""
    return {"inference_address": f"http://{bind}:8085", "management_address": f"http://{bind}:8085",
            # read-only, scraped by Prometheus through the pod IP (deploy/kserve/networkpolicy.yaml)
            "metrics_address": "http://0.0.0.0:8082", "grpc_inference_address": bind,
            "grpc_management_address": bind, "disable_token_authorization": "true",
            "enable_envvars_config": "false", "number_of_netty_threads": "4", "job_queue_size": "100",
            "load_models": "all", "model_store": f"{mount}/model-store",
            "model_snapshot": json.dumps(snapshot, separators=(",", ":"))}


class StorageError(RuntimeError):
    """The storage folder cannot be laid out from what was given."""


def model_snapshot(models: list[str], model_config: dict) -> dict:
    """The models TorchServe loads at start, with their batching (the archive defaults)."""
    entry = {key: model_config[key] for key in SNAPSHOT_KEYS}
    return {"name": "startup.cfg", "modelCount": len(models),
            "models": {model: {"1.0": {"defaultVersion": True, "marName": f"{model}.mar", **entry}}
                       for model in models}}


def lay_out(model_store: Path, out: Path, models: list[str], model_config: dict = MODEL_CONFIG,
            bind: str = "127.0.0.1", mount: str = MOUNT) -> Path:
    """Copy the archives and write the pod's config.properties; return the config's path."""
    archives = [Path(model_store) / f"{model}.mar" for model in models]
    missing = [str(path) for path in archives if not path.is_file()]
    if missing:
        raise StorageError(f"missing archive(s) {', '.join(missing)}: "
                           "run `marketplace-classifier archive` first")
    (out / "config").mkdir(parents=True, exist_ok=True)
    (out / "model-store").mkdir(parents=True, exist_ok=True)
    for archive in archives:
        shutil.copy2(archive, out / "model-store" / archive.name)
    config = out / "config" / "config.properties"
    serve.derive_config(ROOT / "config.properties", config,
                        pod_changes(bind, mount, model_snapshot(models, model_config)), header=POD_HEADER)
    return config


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--model-store", type=Path, default=ROOT / "model_store")
    parser.add_argument("--out", type=Path, default=ROOT / "kserve-storage")
    parser.add_argument("--model", nargs="+", default=list(MODELS),
                        help="archives to serve (default: image text combined)")
    add_batching_options(parser)
    args = parser.parse_args(argv)
    try:
        path = lay_out(args.model_store, args.out, args.model, batching_config(args))
    except StorageError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(f"wrote {path} and {len(args.model)} archive(s) under {args.out / 'model-store'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
