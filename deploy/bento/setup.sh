#!/bin/sh
# Runs as root while the image is built (bentofile.yaml: docker.setup_script), before BentoML switches to
# the runtime user `bentoml`.
#
# The service's state (prediction log, drift reports, Evidently workspace, and the compose stack's MLflow
# store) lives under /var/lib/tabserve, owned by that user. The directories exist in the image so that a
# named volume mounted there (Docker, podman) starts with the same owner: the non-root process can write.
set -eu
STATE=/var/lib/tabserve
mkdir -p "$STATE/predictions" "$STATE/reports" "$STATE/workspace" "$STATE/mlflow"
chown -R bentoml:bentoml "$STATE"
