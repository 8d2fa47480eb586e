"""Kubernetes manifests (deploy/k8s/), offline: the base and the production overlay as `kubectl kustomize`
renders them, every resource validated against the Kubernetes OpenAPI schemas (kubernetes-validate,
strict: unknown fields are errors), and the resources fit together (probes, ports, users, volumes,
selectors, grace period). The image's behaviour under these settings (read-only root, uid 1034, the
CronJob's command) is checked by the container smoke test."""

from __future__ import annotations

import copy
import re
import subprocess
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from deploy import guide
from deploy.manifests import ManifestError, kustomize, load_documents
from serving.auth import RIGHTS, parse_keys
from tests.conftest import PROJECT_ROOT, help_of, require_tool

K8S = PROJECT_ROOT / "deploy" / "k8s"
BASE = K8S / "base"
PRODUCTION = K8S / "overlays" / "production"
# The oldest Kubernetes still maintained upstream when this was written, and the newest the schemas know.
VERSIONS = ("1.31", kubernetes_validate.latest_version())
STATE = "/var/lib/tabserve"


def base_files() -> list[Path]:
    kustomization = yaml.safe_load((BASE / "kustomization.yaml").read_text())
    return [BASE / name for name in kustomization["resources"]]


def by_kind(resources: list[dict[str, Any]], kind: str, name: str | None = None) -> dict[str, Any]:
    [resource] = [
        resource
        for resource in resources
        if resource["kind"] == kind and name in (None, resource["metadata"]["name"])
    ]
    return resource


@pytest.fixture(scope="module")
def base() -> list[dict[str, Any]]:
    require_tool("kubectl")
    return kustomize(BASE)


@pytest.fixture(scope="module")
def production() -> list[dict[str, Any]]:
    require_tool("kubectl")
    return kustomize(PRODUCTION)


def pod_spec(resource: dict[str, Any]) -> dict[str, Any]:
    owner = resource["spec"]["jobTemplate"]["spec"] if resource["kind"] == "CronJob" else resource["spec"]
    spec: dict[str, Any] = owner["template"]["spec"]
    return spec


def service_grace_seconds() -> int:
    """How long the service drains after SIGTERM (service.py's GRACE_SECONDS), read without importing it."""
    match = re.search(r"^GRACE_SECONDS\s*=\s*(\d+)", (PROJECT_ROOT / "service.py").read_text(), re.MULTILINE)
    assert match, "GRACE_SECONDS is no longer in service.py: point this test at its new home"
    return int(match.group(1))


@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize("path", base_files(), ids=lambda path: path.name)
def test_every_base_manifest_validates(path: Path, version: str) -> None:
    for resource in load_documents(path):
        kubernetes_validate.validate(resource, version, strict=True)


@pytest.mark.parametrize("version", VERSIONS)
def test_the_rendered_production_overlay_validates(production: list[dict[str, Any]], version: str) -> None:
    kinds = {resource["kind"] for resource in production}
    assert kinds >= {"Namespace", "Deployment", "Service", "HorizontalPodAutoscaler", "CronJob", "ConfigMap"}
    for resource in production:
        kubernetes_validate.validate(resource, version, strict=True)


def test_the_validator_rejects_a_misspelt_field(base: list[dict[str, Any]]) -> None:
    deployment = copy.deepcopy(by_kind(base, "Deployment"))
    deployment["spec"]["template"]["spec"]["containers"][0]["readinesProbe"] = {
        "httpGet": {"path": "/readyz"}
    }
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, VERSIONS[-1], strict=True)


def test_the_base_carries_the_kustomization_label(base: list[dict[str, Any]]) -> None:
    for resource in base:
        assert resource["metadata"]["labels"]["app.kubernetes.io/part-of"] == "tabserve", resource["kind"]


def test_a_broken_kustomization_is_an_error_that_says_why(tmp_path: Path) -> None:
    require_tool("kubectl")
    (tmp_path / "kustomization.yaml").write_text("resources:\n  - missing.yaml\n")
    with pytest.raises(ManifestError, match=r"kubectl kustomize .* failed: .*missing\.yaml"):
        kustomize(tmp_path)


def test_the_overlay_sets_namespace_image_and_production_sizes(
    base: list[dict[str, Any]], production: list[dict[str, Any]]
) -> None:
    for resource in production:
        if resource["kind"] != "Namespace":
            assert resource["metadata"]["namespace"] == "tabserve", resource["kind"]
    images = {
        resource["metadata"]["name"]: container["image"]
        for resource in production
        if resource["kind"] in ("Deployment", "CronJob")
        for container in pod_spec(resource)["containers"]
    }
    # The service image serves; the CronJobs run the jobs image of the same build.
    assert images == {
        "tabserve": "registry.example.com/ml/tabserve:1.0.0",
        "tabserve-drift": "registry.example.com/ml/tabserve-jobs:1.0.0",
        "tabserve-retrain": "registry.example.com/ml/tabserve-jobs:1.0.0",
    }
    deployment = by_kind(production, "Deployment")
    assert deployment["spec"]["replicas"] == 3
    [container] = pod_spec(deployment)["containers"]
    assert container["resources"]["requests"] == {"cpu": "1", "memory": "1536Mi"}
    # A strategic merge: what the patch does not mention is kept.
    [base_container] = pod_spec(by_kind(base, "Deployment"))["containers"]
    assert container["readinessProbe"] == base_container["readinessProbe"]
    assert container["env"] == base_container["env"]
    assert by_kind(production, "HorizontalPodAutoscaler")["spec"]["minReplicas"] == 3
    assert by_kind(production, "PersistentVolumeClaim")["spec"]["storageClassName"]


def test_the_guides_render_command_prints_what_the_guide_shows() -> None:
    """docs/deployment.md's `kubectl kustomize` example, run as written: its output is the guide's."""
    require_tool("kubectl")
    block = guide.block("tests/test_deploy_k8s.py", "render")
    [command] = block.commands
    result = subprocess.run(
        ["bash", "-o", "pipefail", "-c", command],
        cwd=PROJECT_ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    assert result.stdout.splitlines() == block.output


def test_the_deployment_probes_bentomls_health_endpoints(base: list[dict[str, Any]]) -> None:
    [container] = pod_spec(by_kind(base, "Deployment"))["containers"]
    ports = {port["name"]: port["containerPort"] for port in container["ports"]}
    assert ports == {"http": 3000, "grpc": 3001}
    assert container["livenessProbe"]["httpGet"] == {"path": "/livez", "port": "http"}
    assert container["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "http"}
    assert container["startupProbe"]["httpGet"]["path"] == "/livez"
    env = {item["name"]: item.get("value") for item in container["env"]}
    assert env["TABSERVE_GRPC_PORT"] == "3001"


def test_pods_run_as_the_images_user_on_a_read_only_root(base: list[dict[str, Any]]) -> None:
    for resource in (r for r in base if r["kind"] in ("Deployment", "CronJob")):  # drift and retrain
        kind = f"{resource['kind']} {resource['metadata']['name']}"
        spec = pod_spec(resource)
        assert spec["securityContext"]["runAsNonRoot"] is True
        assert spec["securityContext"]["runAsUser"] == 1034  # BentoML's `bentoml` user in the image
        assert spec["securityContext"]["fsGroup"] == 1034
        [container] = spec["containers"]
        assert container["securityContext"]["readOnlyRootFilesystem"] is True
        assert container["securityContext"]["allowPrivilegeEscalation"] is False
        assert container["securityContext"]["capabilities"]["drop"] == ["ALL"]
        mounts = {mount["mountPath"]: mount["name"] for mount in container["volumeMounts"]}
        volumes = {volume["name"]: volume for volume in spec["volumes"]}
        assert "emptyDir" in volumes[mounts["/tmp"]], f"{kind}: /tmp must be writable"
        assert volumes[mounts[STATE]]["persistentVolumeClaim"]["claimName"] == "tabserve-data"


def test_termination_grace_outlasts_the_services_drain(base: list[dict[str, Any]]) -> None:
    spec = pod_spec(by_kind(base, "Deployment"))
    [container] = spec["containers"]
    pause = int(container["lifecycle"]["preStop"]["exec"]["command"][-1])
    assert spec["terminationGracePeriodSeconds"] > pause + service_grace_seconds()


def test_each_pod_logs_predictions_to_its_own_folder(base: list[dict[str, Any]]) -> None:
    """Log files are named by process id, and PIDs repeat from container to container."""
    [container] = pod_spec(by_kind(base, "Deployment"))["containers"]
    env = container["env"]
    names = [item["name"] for item in env]
    log_dir = next(item["value"] for item in env if item["name"] == "TABSERVE_PREDICTION_LOG_DIR")
    assert log_dir == f"{STATE}/predictions/$(POD_NAME)"
    # Kubernetes expands $(POD_NAME) only if it is defined earlier in the list.
    assert names.index("POD_NAME") < names.index("TABSERVE_PREDICTION_LOG_DIR")
    assert next(item for item in env if item["name"] == "POD_NAME")["valueFrom"]["fieldRef"] == {
        "fieldPath": "metadata.name"
    }


def test_the_service_and_its_selectors_reach_the_pods(base: list[dict[str, Any]]) -> None:
    deployment = by_kind(base, "Deployment")
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert deployment["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    service = by_kind(base, "Service")
    assert service["spec"]["selector"].items() <= pod_labels.items()
    assert {(port["port"], port["targetPort"]) for port in service["spec"]["ports"]} == {
        (3000, "http"),
        (3001, "grpc"),
    }
    assert (
        by_kind(base, "PodDisruptionBudget")["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    )
    target = by_kind(base, "HorizontalPodAutoscaler")["spec"]["scaleTargetRef"]
    assert (target["kind"], target["name"]) == ("Deployment", deployment["metadata"]["name"])


def test_the_drift_cronjob_reads_every_pods_log_from_the_bento(base: list[dict[str, Any]]) -> None:
    cronjob = by_kind(base, "CronJob", "tabserve-drift")
    [container] = pod_spec(cronjob)["containers"]
    script = container["args"][-1]
    assert container["args"][:2] == ["sh", "-c"]
    assert "python -m drift report" in script
    assert '"$TABSERVE_PREDICTION_LOG_DIR"/*/predictions-*' in script
    env = {item["name"]: item["value"] for item in container["env"]}
    assert env["TABSERVE_PREDICTION_LOG_DIR"] == f"{STATE}/predictions"
    # Outside `bentoml serve`, the code is found from the bento's source folder and the model through a
    # BentoML home (writable, in /tmp) that links to the bento's models.
    assert container["workingDir"] == "/home/bentoml/bento/src"
    assert env["BENTOML_HOME"].startswith("/tmp/")
    assert 'ln -sfn /home/bentoml/bento/models "$BENTOML_HOME/models"' in script
    [rule] = cronjob["spec"]["jobTemplate"]["spec"]["podFailurePolicy"]["rules"]
    assert rule["onExitCodes"]["values"] == [1, 2]  # drift, cannot judge: answers, not crashes to retry


def test_the_drift_report_command_exists() -> None:
    assert "--file" in help_of("drift", "report")


def test_the_retrain_cronjob_runs_the_loop_once_at_a_time_into_a_writable_store(
    base: list[dict[str, Any]],
) -> None:
    cronjob = by_kind(base, "CronJob", "tabserve-retrain")
    assert cronjob["spec"]["concurrencyPolicy"] == "Forbid"  # two retrains would race for the registry
    [container] = pod_spec(cronjob)["containers"]
    assert container["args"][:4] == ["python", "-m", "lifecycle", "retrain"]
    env = {item["name"]: item["value"] for item in container["env"]}
    # New versions go to a store on the shared volume: the image's own is read-only.
    assert env["BENTOML_HOME"].startswith(f"{STATE}/")
    assert env["TABSERVE_PREDICTION_LOG_DIR"] == f"{STATE}/predictions"
    mounts = {mount["mountPath"] for mount in container["volumeMounts"]}
    assert STATE in mounts
    [rule] = cronjob["spec"]["jobTemplate"]["spec"]["podFailurePolicy"]["rules"]
    assert rule["onExitCodes"]["values"] == [1, 2]  # refused by the gate, cannot judge: not retried


def test_the_retrain_command_exists() -> None:
    assert "--window" in help_of("lifecycle", "retrain")


def test_the_service_reads_its_api_keys_from_a_mounted_secret(base: list[dict[str, Any]]) -> None:
    """Mounted whole (never through subPath, which the kubelet never updates), so that a rotated key reaches
    the pods without a restart; every line of the example parses as the service reads it."""
    spec = pod_spec(by_kind(base, "Deployment"))
    [container] = spec["containers"]
    env = {item["name"]: item.get("value") for item in container["env"]}
    [mount] = [
        mount for mount in container["volumeMounts"] if mount["mountPath"] == env["TABSERVE_AUTH_KEYS_FILE"]
    ]
    assert mount["readOnly"] is True
    assert "subPath" not in mount
    volume = {volume["name"]: volume for volume in spec["volumes"]}[mount["name"]]
    secret = by_kind(base, "Secret", volume["secret"]["secretName"])
    assert "optional" not in volume["secret"]  # auth on with no keys would be a pod that serves nobody
    for file_name, text in secret["stringData"].items():
        keys = parse_keys(text, file_name)
        assert keys, file_name
        assert all(key.rights <= set(RIGHTS) for key in keys)
