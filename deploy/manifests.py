"""The Kubernetes manifests (deploy/k8s, deploy/kserve) as Python objects, for the tests and the smoke test:
a kustomization as `kubectl kustomize DIRECTORY` renders it (kubectl embeds kustomize; offline), a plain
file as it is."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path
from typing import Any

import yaml

Resource = dict[str, Any]


class ManifestError(RuntimeError):
    pass


def load_documents(path: Path) -> list[Resource]:
    with path.open() as stream:
        return [document for document in yaml.safe_load_all(stream) if document]


def kustomize(directory: Path) -> list[Resource]:
    """The resources `kubectl kustomize DIRECTORY` outputs (what `kubectl apply -k` would apply)."""
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        raise ManifestError(f"kubectl is not installed: it renders {directory} (`kubectl kustomize`)")
    result = subprocess.run(
        [kubectl, "kustomize", str(directory)], capture_output=True, text=True, timeout=60, check=False
    )
    if result.returncode != 0:
        raise ManifestError(f"kubectl kustomize {directory} failed: {result.stderr.strip()}")
    return [document for document in yaml.safe_load_all(result.stdout) if document]
