"""The KServe InferenceServices (deploy/kserve/), offline.

KServe's CRD schema is not among the Kubernetes schemas, and no cluster is reachable, so this checks a
hand-written JSON schema of the InferenceService fields these manifests use, from KServe's v1beta1 API
(pkg/apis/serving/v1beta1: PredictorSpec = PodSpec + ComponentExtensionSpec). It is a subset: unknown
fields are refused (a typo fails), but it does not know every field KServe accepts. The containers
themselves are checked against the real Kubernetes Container schema (kubernetes-validate's)."""

from __future__ import annotations

import copy
import json
from functools import cache
from typing import Any

import importlib_resources
import jsonschema
import pytest
import referencing
import yaml
from kubernetes_validate import latest_version

from deploy.manifests import kustomize, load_documents
from tests.conftest import PROJECT_ROOT, require_tool

INFERENCE_SERVICES = PROJECT_ROOT / "deploy" / "kserve" / "inferenceservice.yaml"
DEFINITIONS = "https://kubernetes.io/api/_definitions.json"

INFERENCE_SERVICE_SCHEMA = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "type": "object",
    "required": ["apiVersion", "kind", "metadata", "spec"],
    "additionalProperties": False,
    "properties": {
        "apiVersion": {"const": "serving.kserve.io/v1beta1"},
        "kind": {"const": "InferenceService"},
        "metadata": {"$ref": f"{DEFINITIONS}#/$defs/io.k8s.apimachinery.pkg.apis.meta.v1.ObjectMeta"},
        "spec": {
            "type": "object",
            "required": ["predictor"],
            "additionalProperties": False,
            "properties": {
                "predictor": {
                    "type": "object",
                    "required": ["containers"],
                    "additionalProperties": False,
                    "properties": {
                        # ComponentExtensionSpec
                        "minReplicas": {"type": "integer", "minimum": 0},
                        "maxReplicas": {"type": "integer", "minimum": 0},
                        "scaleMetric": {"enum": ["cpu", "memory", "concurrency", "rps"]},
                        "scaleTarget": {"type": "integer", "minimum": 1},
                        "containerConcurrency": {"type": "integer", "minimum": 0},
                        "timeout": {"type": "integer", "minimum": 0},
                        # PodSpec (the custom predictor)
                        "serviceAccountName": {"type": "string"},
                        "containers": {
                            "type": "array",
                            "minItems": 1,
                            "items": {"$ref": f"{DEFINITIONS}#/$defs/io.k8s.api.core.v1.Container"},
                        },
                    },
                }
            },
        },
    },
}


@cache
def validator() -> jsonschema.Draft202012Validator:
    """The schema above, resolving Kubernetes types from kubernetes-validate's strict definitions."""
    folder = f"v{latest_version()}-local-strict"
    definitions_file = importlib_resources.files("kubernetes_validate") / "kubernetes-json-schema" / folder
    definitions = json.loads((definitions_file / "_definitions.json").read_text())
    registry = referencing.Registry().with_resource(
        DEFINITIONS, referencing.Resource.from_contents(definitions)
    )
    return jsonschema.Draft202012Validator(INFERENCE_SERVICE_SCHEMA, registry=registry)


@pytest.fixture(scope="module")
def services() -> dict[str, dict[str, Any]]:
    return {item["metadata"]["name"]: item for item in load_documents(INFERENCE_SERVICES)}


def container_of(service: dict[str, Any]) -> dict[str, Any]:
    [container] = service["spec"]["predictor"]["containers"]
    return container


def env_of(service: dict[str, Any]) -> dict[str, str]:
    return {item["name"]: item["value"] for item in container_of(service)["env"]}


def test_both_inference_services_match_the_schema(services: dict[str, dict[str, Any]]) -> None:
    assert set(services) == {"tabserve", "tabserve-grpc"}
    for service in services.values():
        validator().validate(service)


@pytest.mark.parametrize(
    "damage",
    [
        lambda service: service["spec"]["predictor"].update(protocolVersion="v2"),  # a model-runtime field
        lambda service: service["spec"]["predictor"].update(scaleMetric="latency"),
        lambda service: container_of(service).update(imagePullPolicyy="Always"),
        lambda service: container_of(service)["ports"][0].update(containerPort="3000"),
    ],
    ids=["protocolVersion-on-a-custom-predictor", "unknown-scale-metric", "misspelt-field", "port-as-string"],
)
def test_the_schema_refuses_mistakes(services: dict[str, dict[str, Any]], damage: Any) -> None:
    service = copy.deepcopy(services["tabserve"])
    damage(service)
    with pytest.raises(jsonschema.ValidationError):
        validator().validate(service)


def test_both_speak_open_inference_protocol_v2(services: dict[str, dict[str, Any]]) -> None:
    for service in services.values():
        assert container_of(service)["name"] == "kserve-container"  # KServe's custom predictor container
        assert env_of(service)["PROTOCOL"] == "v2"  # what KServe reads for a custom predictor's protocol


def test_rest_and_grpc_each_route_their_one_port(services: dict[str, dict[str, Any]]) -> None:
    """Knative (serverless KServe) routes one port per service: http1 for REST, h2c for gRPC."""
    [rest_port] = container_of(services["tabserve"])["ports"]
    assert (rest_port["name"], rest_port["containerPort"]) == ("http1", 3000)
    assert env_of(services["tabserve"])["TABSERVE_GRPC_PORT"] == "0"
    assert container_of(services["tabserve"])["readinessProbe"]["httpGet"]["path"] == "/v2/health/ready"
    [grpc_port] = container_of(services["tabserve-grpc"])["ports"]
    assert (grpc_port["name"], grpc_port["containerPort"]) == ("h2c", 3001)
    assert env_of(services["tabserve-grpc"])["TABSERVE_GRPC_PORT"] == "3001"


def test_kserve_runs_the_image_of_the_kubernetes_overlay(services: dict[str, dict[str, Any]]) -> None:
    require_tool("kubectl")
    production = kustomize(PROJECT_ROOT / "deploy" / "k8s" / "overlays" / "production")
    [deployment] = [item for item in production if item["kind"] == "Deployment"]
    [container] = deployment["spec"]["template"]["spec"]["containers"]
    for service in services.values():
        assert container_of(service)["image"] == container["image"]
        assert container_of(service)["securityContext"]["runAsNonRoot"] is True


def test_the_manifest_is_plain_yaml_for_kubectl(services: dict[str, dict[str, Any]]) -> None:
    documents = list(yaml.safe_load_all(INFERENCE_SERVICES.read_text()))
    assert [document["kind"] for document in documents] == ["InferenceService", "InferenceService"]
