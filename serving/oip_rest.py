"""Open Inference Protocol (KServe v2) over REST: thin Starlette routes under /v2, served by service.py.

Decoding and encoding are in serving.oip.codec, everything else in the data plane.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import orjson
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from serving import tracing
from serving.auth import current_caller
from serving.dataplane import DataPlane
from serving.errors import BadInputError, ServingError
from serving.oip.codec import decode_rest_request, encode_rest_response, error_body

TRANSPORT = "oip_rest"
HEADER_LENGTH = "inference-header-content-length"


def json_response(content: object, status: int = 200) -> Response:
    return Response(orjson.dumps(content), status_code=status, media_type="application/json")


def routes(current_plane: Callable[[], DataPlane]) -> list[Route]:
    async def server_metadata(_request: Request) -> Response:
        return json_response(current_plane().server_metadata())

    async def live(_request: Request) -> Response:
        return json_response({"live": True})

    async def ready(_request: Request) -> Response:
        is_ready = current_plane().is_ready()
        return json_response({"ready": is_ready}, 200 if is_ready else 503)

    async def model_metadata(request: Request) -> Response:
        plane = current_plane()
        try:
            plane.check_model(request.path_params["model"], request.path_params.get("version"))
        except ServingError as error:
            return _error(plane, error)
        return json_response(plane.model_metadata())

    async def model_ready(request: Request) -> Response:
        plane = current_plane()
        try:
            plane.check_model(request.path_params["model"], request.path_params.get("version"))
        except ServingError as error:
            return _error(plane, error)
        return json_response(
            {"name": plane.name, "ready": plane.is_ready()}, 200 if plane.is_ready() else 503
        )

    async def infer(request: Request) -> Response:
        started = time.perf_counter()
        plane = current_plane()
        try:
            with tracing.request(TRANSPORT):
                plane.check_model(request.path_params["model"], request.path_params.get("version"))
                header_length = request.headers.get(HEADER_LENGTH)
                # isdigit() alone accepts digits int() refuses, such as '²'.
                if header_length is not None and not (header_length.isascii() and header_length.isdigit()):
                    raise BadInputError(
                        f"{HEADER_LENGTH} must be a byte count, got '{header_length}'", "binary_length"
                    )
                length = int(header_length) if header_length else None
                decoded = decode_rest_request(await request.body(), length)
                outputs, request_id, parameters = await plane.infer(decoded, TRANSPORT, current_caller())
        except ServingError as error:
            return _error(plane, error)
        body, headers = encode_rest_response(
            plane.name, plane.version, request_id, outputs, decoded.binary_outputs, parameters
        )
        plane.observe(TRANSPORT, "infer", started)
        return Response(body, headers=headers)

    def model_routes(prefix: str) -> list[Route]:
        return [
            Route(prefix, model_metadata, methods=["GET"]),
            Route(f"{prefix}/ready", model_ready, methods=["GET"]),
            Route(f"{prefix}/infer", infer, methods=["POST"]),
        ]

    return [
        Route("/v2", server_metadata, methods=["GET"]),
        Route("/v2/health/live", live, methods=["GET"]),
        Route("/v2/health/ready", ready, methods=["GET"]),
        *model_routes("/v2/models/{model}/versions/{version}"),
        *model_routes("/v2/models/{model}"),
    ]


def _error(plane: DataPlane, error: ServingError) -> Response:
    plane.refused(error, TRANSPORT)
    return Response(
        error_body(error.message),
        status_code=error.status,
        headers=error.headers,
        media_type="application/json",
    )
