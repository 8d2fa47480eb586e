"""What the HTTP transport needs beyond BentoML's `@bentoml.api` methods (which are POST-only and parse
the body before user code runs): `GET /model`, and a middleware that refuses what the endpoints cannot take
before any parsing (wrong content type: 415; body over the limit: 413) and times and counts requests.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import orjson
from fastapi.routing import APIRoute
from starlette.requests import Request
from starlette.responses import Response

from serving.dataplane import DataPlane
from serving.metrics import refusals_of_this_request, serving_metrics

Scope = dict[str, Any]
JSON_ENDPOINTS = frozenset({"/predict", "/predict_batch"})
UPLOAD_ENDPOINT = "/predict_file"
TIMED_ENDPOINTS = JSON_ENDPOINTS | {UPLOAD_ENDPOINT}


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
