#!/bin/sh
# The runtime image's entrypoint: TorchServe on loopback from the pod's config (laid out by
# marketplace_classifier/ops/kserve_storage.py under /mnt/models), then KServe's model server on :8080 in front of
# it, ready once every model has a ready worker. PROTOCOL_VERSION (v1 or v2) comes from the
# InferenceService's env.
set -eu
MODELS=${MODELS_DIR:-/mnt/models}
torchserve --start --ncs --ts-config "$MODELS/config/config.properties" \
    --model-store "$MODELS/model-store"
exec "${KSERVE_PYTHON:-python}" /opt/marketplace/wrapper/kserve_torchserve.py \
    --ts-config "$MODELS/config/config.properties" "$@"
