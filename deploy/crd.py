"""A CustomResourceDefinition's schema as a JSON Schema, to validate custom resources offline as the API
server does under `kubectl apply`'s strict field validation (the default since Kubernetes 1.27): an unknown
field is an error, not silently dropped.

A CRD's `openAPIV3Schema` is OpenAPI v3 with Kubernetes extensions; the conversion follows kubeconform's
openapi2jsonschema in strict mode. No maintained PyPI package does this for CRDs (the openapi2jsonschema
forks there convert Kubernetes' own OpenAPI document, not CRDs), hence these few lines."""

from __future__ import annotations

import gzip
from pathlib import Path
from typing import Any

import yaml

Schema = dict[str, Any]

# OpenAPI v3 keywords that JSON Schema reads the same way: the ones KServe's CRD uses. (Not all are: OpenAPI
# v3.0's exclusiveMinimum is a boolean, for one, so a keyword is added here only once checked.)
SAME_IN_JSON_SCHEMA = frozenset(
    {"type", "properties", "additionalProperties", "items", "required", "anyOf", "enum", "default"}
    | {"pattern", "format", "minimum", "maximum", "minLength", "maxLength", "minItems"}
)
# Merge strategies for server-side apply, nothing that `kubectl apply` validates fields against.
MERGE_HINTS = frozenset({"x-kubernetes-list-type", "x-kubernetes-list-map-keys", "x-kubernetes-map-type"})
PRESERVE_UNKNOWN_FIELDS = "x-kubernetes-preserve-unknown-fields"
INT_OR_STRING = "x-kubernetes-int-or-string"
KNOWN_KEYWORDS = SAME_IN_JSON_SCHEMA | MERGE_HINTS | {PRESERVE_UNKNOWN_FIELDS, INT_OR_STRING}


class CRDError(ValueError):
    pass


def load_crd(path: Path) -> Schema:
    """The CustomResourceDefinition in a gzipped YAML file (CRDs are megabytes of YAML)."""
    with gzip.open(path, "rt", encoding="utf-8") as stream:
        crd: Schema = yaml.safe_load(stream)
    if crd.get("kind") != "CustomResourceDefinition":
        raise CRDError(f"{path} is a {crd.get('kind')}, not a CustomResourceDefinition")
    return crd


def resource_schema(crd: Schema, api_version: str, kind: str) -> Schema:
    """The strict JSON Schema that a resource of `api_version` (group/version) and `kind` must match, if the
    CRD defines that kind in that group and serves that version: an API server refuses the rest."""
    group, names = crd["spec"]["group"], crd["spec"]["names"]
    versions = crd["spec"]["versions"]
    served = {f"{group}/{version['name']}": version for version in versions if version["served"]}
    if kind != names["kind"]:
        raise CRDError(f"{crd['metadata']['name']} defines kind {names['kind']}, not {kind}")
    if api_version not in served:
        raise CRDError(f"{crd['metadata']['name']} serves {', '.join(served)}, not {api_version}")
    return strict_json_schema(served[api_version]["schema"]["openAPIV3Schema"])


def strict_json_schema(schema: Schema, where: str = "openAPIV3Schema") -> Schema:
    """`schema` (an OpenAPI v3 schema of a CRD) as JSON Schema, refusing unknown fields: an object that
    lists its `properties` takes no others, unless it says x-kubernetes-preserve-unknown-fields. A keyword
    this does not know is an error rather than ignored, so that a new CRD cannot loosen the check unseen."""
    unknown = set(schema) - KNOWN_KEYWORDS
    if unknown:
        raise CRDError(f"{where}: no JSON Schema conversion for {', '.join(sorted(unknown))}")
    converted = dict(schema)
    if "properties" in schema:
        converted["properties"] = {
            name: strict_json_schema(property_schema, f"{where}.{name}")
            for name, property_schema in schema["properties"].items()
        }
        if not schema.get(PRESERVE_UNKNOWN_FIELDS):
            converted.setdefault("additionalProperties", False)
    if "items" in schema:
        converted["items"] = strict_json_schema(schema["items"], f"{where}[]")
    if isinstance(schema.get("additionalProperties"), dict):  # the schema of a map's values (not true/false)
        converted["additionalProperties"] = strict_json_schema(schema["additionalProperties"], f"{where}.*")
    if "anyOf" in schema:
        converted["anyOf"] = [strict_json_schema(option, where) for option in schema["anyOf"]]
    if schema.get(INT_OR_STRING):  # controller-gen writes this anyOf beside it; other generators may not
        converted.setdefault("anyOf", [{"type": "integer"}, {"type": "string"}])
    return converted
