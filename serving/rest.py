"""What the HTTP transport needs beyond BentoML's `@bentoml.api` methods: `GET /model`; the JSON bodies of
those methods parsed and refused here, one clear 400 per bad body (`json_body`); and a middleware that
refuses what the endpoints cannot take before any parsing (wrong content type: 415; body over the limit:
413) and times and counts requests.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any, Final

import orjson
from _bentoml_sdk.io_models import IODescriptor, IORootModel
from bentoml._internal.service.openapi.specification import Info, OpenAPISpecification
from fastapi.routing import APIRoute
from pydantic import TypeAdapter, ValidationError
from starlette.requests import Request
from starlette.responses import Response

from models.store import StoredModel
from serving.dataplane import DataPlane
from serving.errors import ServingError
from serving.metrics import refusals_of_this_request, serving_metrics

Scope = dict[str, Any]
JSON_ENDPOINTS = frozenset({"/predict", "/predict_batch"})
UPLOAD_ENDPOINT = "/predict_file"
TIMED_ENDPOINTS = JSON_ENDPOINTS | {UPLOAD_ENDPOINT}
# Problems named in a refused body's "error" text and listed in its "detail".
NAMED_PROBLEMS = 5
LISTED_PROBLEMS = 100


class HttpLimits:
    def __init__(self, app: Any, max_body_bytes: int, max_upload_bytes: int) -> None:
        self.app = app
        self.max_body_bytes = max_body_bytes
        self.max_upload_bytes = max_upload_bytes

    async def __call__(self, scope: Scope, receive: Any, send: Any) -> None:
        path = scope.get("path", "")
        if scope["type"] != "http" or path not in TIMED_ENDPOINTS:
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        headers = {key.decode("latin-1"): value.decode("latin-1") for key, value in scope["headers"]}
        refusal = self._refusal(path, headers)
        status_seen: list[int] = []

        async def send_and_watch(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                status_seen.append(message["status"])
            await send(message)

        with refusals_of_this_request() as counted:
            if refusal is not None:
                await _send_error(send_and_watch, *refusal)
            else:
                await self.app(scope, receive, send_and_watch)
        metrics = serving_metrics()
        status = status_seen[0] if status_seen else 500
        if 400 <= status < 500 and not counted:
            reason = refusal[2] if refusal else "invalid_request" if status == 400 else f"http_{status}"
            metrics.validation_errors.labels(transport="http", reason=reason).inc()
        metrics.request_seconds.labels(transport="http", endpoint=path).observe(time.perf_counter() - started)

    def _refusal(self, path: str, headers: dict[str, str]) -> tuple[int, str, str] | None:
        length = headers.get("content-length", "")
        limit = self.max_upload_bytes if path == UPLOAD_ENDPOINT else self.max_body_bytes
        if length.isdigit() and int(length) > limit:
            return 413, f"request body of {length} bytes is over the limit of {limit}", "body_too_large"
        media_type = headers.get("content-type", "").split(";")[0].strip().lower()
        if path in JSON_ENDPOINTS and media_type != "application/json":
            shown = media_type or "none"
            return 415, f"Content-Type must be application/json, got {shown}", "unsupported_media_type"
        return None


async def _send_error(send: Any, status: int, message: str, _reason: str) -> None:
    body = orjson.dumps({"error": message})
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())],
        }
    )
    await send({"type": "http.response.body", "body": body})


def model_info_route(current_plane: Callable[[], DataPlane]) -> APIRoute:
    async def model_info(_request: Request) -> Response:
        return Response(orjson.dumps(current_plane().model_info()), media_type="application/json")

    return APIRoute(
        "/model",
        model_info,
        methods=["GET"],
        summary="The served model: name, version, alias, MLflow run, metrics, feature schema, classes",
        response_class=Response,
        openapi_extra={
            "responses": {
                "200": {
                    "description": "The model",
                    "content": {"application/json": {"schema": {"type": "object"}}},
                }
            }
        },
    )


def openapi_info(model: StoredModel) -> Info:
    """The OpenAPI page's title, version and description: this service and the model it serves."""
    metadata, labels = model.metadata, model.labels
    metric = metadata["metric"]
    classes = ", ".join(map(str, model.classes)) if model.classes else None
    description = f"""\
Predictions of **{model.name}** ({model.task.value}{f": {classes}" if classes else ""}), a scikit-learn \
pipeline (`{metadata["estimator"]}`) served with BentoML. Every answer names the model version, its MLflow \
run and its training-data digest.

| model | |
| --- | --- |
| BentoML tag | `{model.tag}` |
| MLflow registered model | `{labels["registered_model"]}` version {labels["registered_version"]} \
(alias `{labels["alias"]}`) |
| MLflow run | `{labels["mlflow_run_id"]}` |
| training data digest | `{metadata["dataset_digest"]}` |
| held-out {metric} | {metadata["test_metrics"][metric]:.4f} |
| trained at | {metadata["trained_at"]} |

`/predict` takes one record keyed by the training column names, `/predict_batch` a list of them,
`/predict_file` a CSV or Parquet table; `GET /model` describes the model. The Open Inference Protocol (KServe
v2) is served at `/v2` over REST and on the gRPC port. A refused request gets a 4xx whose JSON body's
`error` names each field and its problem."""
    return Info(title=f"tabserve: {model.name}", version=model.version, description=description)


# The 400 body of the JSON APIs as `InvalidBody` and `error_response` write it; BentoML documents its own
# (whose "detail" it says is a string), under this name, for every API.
REFUSAL_SCHEMA: Final = {
    "type": "object",
    "title": "InvalidArgument",
    "required": ["error"],
    "properties": {
        "error": {"type": "string", "description": "what was wrong with the request, field by field"},
        "detail": {
            "type": "array",
            "description": "each problem: where (a field name, or a record's index and field name), what",
            "items": {
                "type": "object",
                "required": ["loc", "msg", "type"],
                "properties": {
                    "loc": {"type": "array", "items": {"anyOf": [{"type": "string"}, {"type": "integer"}]}},
                    "msg": {"type": "string"},
                    "type": {"type": "string"},
                },
            },
        },
    },
}
_REFUSAL = {"content": {"application/json": {"schema": {"$ref": "#/components/schemas/InvalidArgument"}}}}
JSON_REFUSALS: Final = {
    413: {"description": "The body is over TABSERVE_MAX_BODY_BYTES", **_REFUSAL},
    415: {"description": "The Content-Type is not application/json", **_REFUSAL},
    503: {"description": "The model is overloaded: retry later", **_REFUSAL},
}


def document_refusals(spec: OpenAPISpecification) -> None:
    """What the JSON APIs answer when they refuse a request, in the OpenAPI spec BentoML generated: the body
    as it is, the status codes of HttpLimits and of the data plane, and that a body is required."""
    assert isinstance(spec.components, dict)  # generate_spec passes a plain dict of schemas
    spec.components["schemas"]["InvalidArgument"] = REFUSAL_SCHEMA
    for path in JSON_ENDPOINTS:
        operation = spec.paths[path].post
        assert isinstance(operation, dict)  # as BentoML builds its APIs' operations
        operation["responses"].update(JSON_REFUSALS)
        operation["requestBody"]["required"] = True


def error_response(error: ServingError) -> Response:
    return Response(
        orjson.dumps({"error": error.message}), status_code=error.status, media_type="application/json"
    )


# ---- JSON bodies of the BentoML APIs ----------------------------------------------------------------------


class InvalidBody:
    """What a `json_body` input hands its API method in place of the value when the body is not one."""

    def __init__(self, error: ValidationError) -> None:
        self.error = error

    def response(self) -> Response:
        problems = self.error.errors(include_url=False, include_context=False, include_input=False)
        named = "; ".join(f"{_where(p['loc'])}{p['msg']}" for p in problems[:NAMED_PROBLEMS])
        more = len(problems) - NAMED_PROBLEMS
        body = {
            "error": f"invalid request body: {named}" + (f"; and {more} more" if more > 0 else ""),
            "detail": [
                {"loc": p["loc"], "msg": p["msg"], "type": p["type"]} for p in problems[:LISTED_PROBLEMS]
            ],
        }
        return Response(orjson.dumps(body), status_code=400, media_type="application/json")


def _where(loc: tuple[int | str, ...]) -> str:
    """('mean radius',) -> "'mean radius': "; (3, 'mean radius') -> "record 3, 'mean radius': " (records
    counted from 0, as the list's indices); () -> "" (the body as a whole, e.g. JSON that does not parse)."""
    parts = [f"record {part}" if isinstance(part, int) else repr(part) for part in loc]
    return f"{', '.join(parts)}: " if parts else ""


def json_body(value_type: Any, title: str) -> type[IODescriptor]:
    """The input spec of a `@bentoml.api` whose body is one JSON value of `value_type`: the OpenAPI schema
    BentoML gives that type, but the body parsed and validated here in one pass by pydantic's JSON parser,
    and a body that fails handed to the method as an `InvalidBody` to answer.

    BentoML's own parsing of a list body uses `json.loads`, whose errors (truncated JSON, bad UTF-8, a
    5,000-digit number, deep nesting) escape as 500s; its 400s are headed with internal class names ("30
    validation error for RecordIODescriptor"); and it logs a traceback for every refused request."""
    adapter: TypeAdapter[Any] = TypeAdapter(value_type)

    class JsonBody(IORootModel[value_type]):
        __root_input__ = True  # the body is the value itself, not an object of named arguments

        @classmethod
        async def from_http_request(cls, request: Request, _serde: Any) -> IODescriptor:
            try:
                value = adapter.validate_json(await request.body())
            except ValidationError as error:
                value = InvalidBody(error)
            return cls.model_construct(root=value)

    JsonBody.__name__ = JsonBody.__qualname__ = title
    return JsonBody
