"""The KServe InferenceServices (deploy/kserve/inferenceservice.yaml), offline, against KServe's own CRD.

Each is validated as the API server validates it under `kubectl apply` (strict field validation: an
unknown field is an error): apiVersion and kind must be the group, a served version and the kind of
KServe's InferenceService CRD, and the resource must match that version's openAPIV3Schema, converted to
JSON Schema by deploy/crd.py. The CRD embeds Kubernetes' PodSpec and Container, so it checks the
containers too; metadata, which a CRD leaves to the API server, is checked against Kubernetes' ObjectMeta
(kubernetes-validate's strict schemas). The CRD is KServe's released file, kept in deploy/kserve/crd/ with
its source (README.md) and release (VERSION). Not checked offline: KServe's admission webhooks, duplicate
keys in list-maps, formats (int32, date-time). The Kubernetes manifests (deploy/k8s, as kustomize renders
them) are validated against the Kubernetes schemas by tests/test_deploy_k8s.py."""

from __future__ import annotations

import copy
import gzip
import hashlib
import json
import re
from collections.abc import Callable
from functools import cache
from typing import Any

import importlib_resources
import jsonschema
import pytest
import referencing
import yaml
from kubernetes_validate import latest_version

from deploy.crd import CRDError, load_crd, resource_schema, strict_json_schema
from deploy.manifests import kustomize, load_documents
from tests.conftest import PROJECT_ROOT, require_tool

INFERENCE_SERVICES = PROJECT_ROOT / "deploy" / "kserve" / "inferenceservice.yaml"
CRD_FOLDER = PROJECT_ROOT / "deploy" / "kserve" / "crd"
CRD_FILE = CRD_FOLDER / "serving.kserve.io_inferenceservices.yaml.gz"
KSERVE_VERSION = (CRD_FOLDER / "VERSION").read_text().strip()
DEFINITIONS = "https://kubernetes.io/api/_definitions.json"
OBJECT_META = f"{DEFINITIONS}#/$defs/io.k8s.apimachinery.pkg.apis.meta.v1.ObjectMeta"

Resource = dict[str, Any]


@cache
def kserve_crd() -> Resource:
    return load_crd(CRD_FILE)


@cache
def kubernetes_definitions() -> referencing.Registry[Any]:
    """Kubernetes' own types, from kubernetes-validate's strict schemas of the newest Kubernetes it knows."""
    folder = importlib_resources.files("kubernetes_validate") / "kubernetes-json-schema"
    definitions_file = folder / f"v{latest_version()}-local-strict" / "_definitions.json"
    definitions = json.loads(definitions_file.read_text())
    return referencing.Registry().with_resource(DEFINITIONS, referencing.Resource.from_contents(definitions))


@cache
def validator(api_version: str, kind: str) -> jsonschema.Draft202012Validator:
    """KServe's schema for this apiVersion and kind (CRDError if its CRD does not serve them)."""
    schema = resource_schema(kserve_crd(), api_version, kind)
    schema["properties"]["metadata"] = {"$ref": OBJECT_META}  # the CRD says only `type: object`
    return jsonschema.Draft202012Validator(schema, registry=kubernetes_definitions())


def schema_errors(resource: Resource) -> list[jsonschema.ValidationError]:
    return list(validator(resource["apiVersion"], resource["kind"]).iter_errors(resource))


@pytest.fixture(scope="module")
def services() -> dict[str, Resource]:
    return {item["metadata"]["name"]: item for item in load_documents(INFERENCE_SERVICES)}


def predictor(service: Resource) -> Resource:
    predictor_spec: Resource = service["spec"]["predictor"]
    return predictor_spec


def container_of(service: Resource) -> Resource:
    container: Resource
    [container] = predictor(service)["containers"]
    return container


def env_of(service: Resource) -> dict[str, str]:
    return {item["name"]: item["value"] for item in container_of(service)["env"]}


def test_the_crd_is_the_released_file_its_readme_names() -> None:
    """The file is byte for byte the one README.md names, of a KServe release (not a release candidate)."""
    readme = (CRD_FOLDER / "README.md").read_text()
    with gzip.open(CRD_FILE, "rb") as stream:
        sha256 = hashlib.sha256(stream.read()).hexdigest()
    assert f"`{sha256}`" in readme, "the CRD file is not the one deploy/kserve/crd/README.md names"
    assert re.fullmatch(r"v\d+\.\d+\.\d+", KSERVE_VERSION), KSERVE_VERSION
    assert f"| tag | `{KSERVE_VERSION}`" in readme
    generator = kserve_crd()["metadata"]["annotations"]["controller-gen.kubebuilder.io/version"]
    assert f"controller-gen {generator}" in readme


def test_both_inference_services_match_kserves_crd(services: dict[str, Resource]) -> None:
    assert set(services) == {"tabserve", "tabserve-grpc"}
    for name, service in services.items():
        errors = [f"{error.json_path}: {error.message}" for error in schema_errors(service)]
        assert errors == [], f"{name} against KServe {KSERVE_VERSION}'s InferenceService CRD"


@pytest.mark.parametrize(
    ("damage", "path", "keyword", "message"),
    [
        # A field of KServe's model specs (predictor.model), not of a custom predictor's PodSpec.
        (
            lambda s: predictor(s).update(protocolVersion="v2"),
            "$.spec.predictor",
            "additionalProperties",
            "'protocolVersion' was unexpected",
        ),
        (
            lambda s: predictor(s).update(scaleMetric="latency"),
            "$.spec.predictor.scaleMetric",
            "enum",
            "'latency' is not one of",
        ),
        (
            lambda s: predictor(s).update(minReplicas="1"),
            "$.spec.predictor.minReplicas",
            "type",
            "'1' is not of type 'integer'",
        ),
        (
            lambda s: container_of(s).update(imagePullPolicyy="Always"),
            "$.spec.predictor.containers[0]",
            "additionalProperties",
            "'imagePullPolicyy' was unexpected",
        ),
        (
            lambda s: container_of(s)["ports"][0].update(containerPort="3000"),
            "$.spec.predictor.containers[0].ports[0].containerPort",
            "type",
            "'3000' is not of type 'integer'",
        ),
        (  # YAML's `value: 0` is a number: Kubernetes wants every environment value as a string.
            lambda s: container_of(s)["env"][2].update(value=0),
            "$.spec.predictor.containers[0].env[2].value",
            "type",
            "0 is not of type 'string'",
        ),
        (
            lambda s: s["metadata"].update(label={"app": "tabserve"}),
            "$.metadata",
            "additionalProperties",
            "'label' was unexpected",
        ),
        (lambda s: s.update(specs={}), "$", "additionalProperties", "'specs' was unexpected"),
    ],
    ids=[
        "protocolVersion-on-a-custom-predictor",
        "unknown-scale-metric",
        "replicas-as-string",
        "misspelt-container-field",
        "port-as-string",
        "env-value-as-number",
        "misspelt-metadata-field",
        "unknown-top-level-field",
    ],
)
def test_the_crd_refuses_mistakes(
    services: dict[str, Resource], damage: Callable[[Resource], None], path: str, keyword: str, message: str
) -> None:
    """Each mistake fails, and for its own reason: one error, at the damaged field, of the expected kind."""
    service = copy.deepcopy(services["tabserve"])
    damage(service)
    [error] = schema_errors(service)
    assert (error.json_path, error.validator) == (path, keyword)
    assert message in error.message


@pytest.mark.parametrize(
    ("api_version", "kind", "message"),
    [
        ("serving.kserve.io/v1alpha1", "InferenceService", "serves serving.kserve.io/v1beta1, not"),
        ("kserve.io/v1beta1", "InferenceService", "serves serving.kserve.io/v1beta1, not"),
        ("serving.kserve.io/v1beta1", "Inferenceservice", "defines kind InferenceService, not"),
    ],
    ids=["unserved-version", "other-group", "misspelt-kind"],
)
def test_the_crd_refuses_other_kinds_and_versions(api_version: str, kind: str, message: str) -> None:
    """apiVersion and kind are read from the CRD (group, served versions, kind), not written down here."""
    with pytest.raises(CRDError, match=message):
        validator(api_version, kind)


def test_an_openapi_keyword_the_conversion_does_not_know_is_an_error() -> None:
    """A newer CRD with a keyword deploy/crd.py does not convert fails loudly instead of checking less."""
    with pytest.raises(CRDError, match=r"openAPIV3Schema\.spec: no JSON Schema conversion for nullable"):
        strict_json_schema({"type": "object", "properties": {"spec": {"type": "object", "nullable": True}}})


def test_both_speak_open_inference_protocol_v2(services: dict[str, Resource]) -> None:
    for service in services.values():
        assert container_of(service)["name"] == "kserve-container"  # KServe's custom predictor container
        assert env_of(service)["PROTOCOL"] == "v2"  # what KServe reads for a custom predictor's protocol


def test_rest_and_grpc_each_route_their_one_port(services: dict[str, Resource]) -> None:
    """Knative (serverless KServe) routes one port per service: http1 for REST, h2c for gRPC."""
    [rest_port] = container_of(services["tabserve"])["ports"]
    assert (rest_port["name"], rest_port["containerPort"]) == ("http1", 3000)
    assert env_of(services["tabserve"])["TABSERVE_GRPC_PORT"] == "0"
    assert container_of(services["tabserve"])["readinessProbe"]["httpGet"]["path"] == "/v2/health/ready"
    [grpc_port] = container_of(services["tabserve-grpc"])["ports"]
    assert (grpc_port["name"], grpc_port["containerPort"]) == ("h2c", 3001)
    assert env_of(services["tabserve-grpc"])["TABSERVE_GRPC_PORT"] == "3001"


def test_kserve_runs_the_image_of_the_kubernetes_overlay(services: dict[str, Resource]) -> None:
    require_tool("kubectl")
    production = kustomize(PROJECT_ROOT / "deploy" / "k8s" / "overlays" / "production")
    [deployment] = [item for item in production if item["kind"] == "Deployment"]
    [container] = deployment["spec"]["template"]["spec"]["containers"]
    for service in services.values():
        assert container_of(service)["image"] == container["image"]
        assert container_of(service)["securityContext"]["runAsNonRoot"] is True


def test_the_manifest_is_plain_yaml_for_kubectl(services: dict[str, Resource]) -> None:
    documents = list(yaml.safe_load_all(INFERENCE_SERVICES.read_text()))
    assert [document["kind"] for document in documents] == ["InferenceService", "InferenceService"]
