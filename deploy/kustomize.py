"""A small `kustomize build` in Python, for checking deploy/k8s/ where no kustomize or kubectl is installed.

    .venv/bin/python -m deploy.kustomize deploy/k8s/overlays/production    # prints the rendered YAML

It knows the directives deploy/k8s uses, with kustomize's meaning: `resources` (files and directories),
`namespace`, `labels` (metadata labels only: includeSelectors / includeTemplates false), `images`, and
strategic-merge `patches` / `patchesStrategicMerge`. Anything else (generators, JSON 6902 patches, name
prefixes, `$patch` directives...) is refused rather than silently skipped, so a rendering either means
what kustomize means or fails. tests/test_deploy_k8s.py compares its output with `kubectl kustomize` where
kubectl exists. Strategic merge knows the list merge keys of the fields these manifests patch (see
MERGE_KEYS); any other list is replaced, as kustomize does for lists without a merge key.
"""

from __future__ import annotations

import copy
import sys
from pathlib import Path
from typing import Any

import yaml

Resource = dict[str, Any]

SUPPORTED = frozenset(
    {"apiVersion", "kind", "resources", "namespace", "labels", "images", "patches", "patchesStrategicMerge"}
)
# Kinds that live outside namespaces: `namespace:` leaves them alone.
CLUSTER_SCOPED = frozenset(
    {
        "Namespace",
        "ClusterRole",
        "ClusterRoleBinding",
        "CustomResourceDefinition",
        "PersistentVolume",
        "StorageClass",
        "PriorityClass",
        "IngressClass",
        "MutatingWebhookConfiguration",
        "ValidatingWebhookConfiguration",
    }
)
# patchMergeKey of the Kubernetes API for the list fields these manifests patch. `ports` means container
# ports (key containerPort) in a pod and service ports (key port) in a Service: decided by the items.
MERGE_KEYS = {
    "containers": "name",
    "initContainers": "name",
    "ephemeralContainers": "name",
    "env": "name",
    "volumes": "name",
    "volumeMounts": "mountPath",
    "imagePullSecrets": "name",
}


class KustomizeError(ValueError):
    pass


def load_documents(path: Path) -> list[Resource]:
    with path.open() as stream:
        return [document for document in yaml.safe_load_all(stream) if document]


def render(directory: Path) -> list[Resource]:
    """The resources `kustomize build DIRECTORY` would output (in the order they are declared)."""
    kustomization_file = directory / "kustomization.yaml"
    if not kustomization_file.is_file():
        raise KustomizeError(f"no kustomization.yaml in {directory}")
    kustomization = yaml.safe_load(kustomization_file.read_text()) or {}
    unknown = set(kustomization) - SUPPORTED
    if unknown:
        raise KustomizeError(f"{kustomization_file}: unsupported directives {sorted(unknown)}")

    resources: list[Resource] = []
    for entry in kustomization.get("resources", []):
        target = (directory / entry).resolve()
        resources.extend(render(target) if target.is_dir() else load_documents(target))

    patches = [directory / path for path in kustomization.get("patchesStrategicMerge", [])]
    for patch in kustomization.get("patches", []):
        if "target" in patch or "path" not in patch:
            raise KustomizeError(
                f"{kustomization_file}: only strategic-merge patches from a file are supported"
            )
        patches.append(directory / patch["path"])
    for patch_file in patches:
        for patch in load_documents(patch_file):
            apply_patch(resources, patch, patch_file)

    for label in kustomization.get("labels", []):
        if label.get("includeSelectors") or label.get("includeTemplates"):
            raise KustomizeError(f"{kustomization_file}: labels on selectors or templates are not supported")
        for resource in resources:
            resource.setdefault("metadata", {}).setdefault("labels", {}).update(label["pairs"])
    for image in kustomization.get("images", []):
        for resource in resources:
            set_image(resource, image)
    if "namespace" in kustomization:
        for resource in resources:
            if resource["kind"] not in CLUSTER_SCOPED:
                resource["metadata"]["namespace"] = kustomization["namespace"]
    return resources


def apply_patch(resources: list[Resource], patch: Resource, origin: Path) -> None:
    matches = [
        resource
        for resource in resources
        if resource["kind"] == patch["kind"] and resource["metadata"]["name"] == patch["metadata"]["name"]
    ]
    if len(matches) != 1:
        raise KustomizeError(
            f"{origin}: patch of {patch['kind']}/{patch['metadata']['name']} matches {len(matches)}"
        )
    merged = strategic_merge(matches[0], patch)
    matches[0].clear()
    matches[0].update(merged)


def strategic_merge(base: Any, patch: Any, field: str = "") -> Any:
    if isinstance(base, dict) and isinstance(patch, dict):
        if any(key.startswith("$") for key in patch):
            raise KustomizeError(f"patch directives are not supported: {sorted(patch)}")
        merged = copy.deepcopy(base)
        for key, value in patch.items():
            if value is None:
                merged.pop(key, None)
            elif key in merged:
                merged[key] = strategic_merge(merged[key], value, key)
            else:
                merged[key] = copy.deepcopy(value)
        return merged
    if isinstance(base, list) and isinstance(patch, list):
        key = merge_key(field, base + patch)
        if key is None:
            return copy.deepcopy(patch)
        merged_list = copy.deepcopy(base)
        for item in patch:
            existing = next(
                (index for index, old in enumerate(merged_list) if old.get(key) == item[key]), None
            )
            if existing is None:
                merged_list.append(copy.deepcopy(item))
            else:
                merged_list[existing] = strategic_merge(merged_list[existing], item, field)
        return merged_list
    return copy.deepcopy(patch)


def merge_key(field: str, items: list[Any]) -> str | None:
    if not items or not all(isinstance(item, dict) for item in items):
        return None
    if field == "ports":
        return "containerPort" if all("containerPort" in item for item in items) else "port"
    return MERGE_KEYS.get(field)


def set_image(node: Any, image: dict[str, str]) -> None:
    """kustomize's image transformer: every container whose image has this name, at any depth."""
    if isinstance(node, list):
        for item in node:
            set_image(item, image)
        return
    if not isinstance(node, dict):
        return
    for key, value in node.items():
        if key in ("containers", "initContainers") and isinstance(value, list):
            for container in value:
                if image_name(container.get("image", "")) == image["name"]:
                    container["image"] = new_image(container["image"], image)
        set_image(value, image)


def image_name(reference: str) -> str:
    name = reference.split("@", 1)[0]
    last = name.rsplit("/", 1)[-1]
    return name[: len(name) - len(last)] + last.split(":", 1)[0]


def new_image(reference: str, image: dict[str, str]) -> str:
    name = image.get("newName", image_name(reference))
    if "digest" in image:
        return f"{name}@{image['digest']}"
    if "newTag" in image:
        return f"{name}:{image['newTag']}"
    return name + reference[len(image_name(reference)) :]


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print("usage: python -m deploy.kustomize DIRECTORY", file=sys.stderr)
        return 2
    yaml.safe_dump_all(render(Path(argv[0])), sys.stdout, sort_keys=False)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
