"""What the HTTP transport needs beyond BentoML's `@bentoml.api` methods: `GET /model`; the JSON bodies of
those methods parsed and refused here, one clear 400 per bad body (`json_body`); a middleware that refuses
what no endpoint can take before any parsing (wrong content type: 415; a body over the limit, counted as it
arrives: 413; a body that takes too long to arrive: 408) and times and counts requests; the authentication
middleware, with auth on (`HttpAuth`); and limits on the size of a request's head (431) and on the time it
takes to arrive (408, or a close when nothing came).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any, Final

import orjson
import uvicorn.protocols.http.auto
from _bentoml_sdk.io_models import IODescriptor, IORootModel
from bentoml._internal.service.openapi.specification import Info, OpenAPISpecification
from fastapi.routing import APIRoute
from pydantic import TypeAdapter, ValidationError
from starlette.datastructures import Headers
from starlette.requests import Request
from starlette.responses import Response
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from models.store import StoredModel
from serving.admission import Admission, OverloadedError, Place
from serving.auth import Access, Gate, Refusal, calling_as, presented_key
from serving.errors import ServingError
from serving.metrics import refusals_of_this_request, serving_metrics

Scope = dict[str, Any]
# The prediction APIs: admitted by the worker's admission control (serving/admission.py). Not the
# explanations: they cost 5x a prediction, seconds at a version's first (its explainer is built then), and
# would make the worker measure itself slow and refuse predictions (they have their own bound instead, the
# rows waiting for the explain thread: serving/explaining.py).
PREDICTION_ENDPOINTS = frozenset({"/predict", "/predict_batch"})
# The APIs that take a JSON body of records: the predictions, and their explanations (the same bodies).
JSON_ENDPOINTS = PREDICTION_ENDPOINTS | {"/explain", "/explain_batch"}
UPLOAD_ENDPOINT = "/predict_file"
TIMED_ENDPOINTS = JSON_ENDPOINTS | {UPLOAD_ENDPOINT}
# The request line and headers together; browsers and proxies send a few KiB (nginx allows 32 KiB).
MAX_HEAD_BYTES = 64 * 1024
# How long a request body may take to arrive whole, from the first read: a client that trickles it holds a
# connection and a worker's memory for nothing. Below the request timeout (service.py, `traffic`: 60 s),
# which would cancel the read and answer 504, blaming the server for the client's slowness.
MAX_BODY_SECONDS = 30
# Refusals sent before the body was read to its end: the connection closes, or the server would go on
# reading (and discarding) whatever the client still sends.
CLOSING_STATUSES = frozenset({408, 413})
# Problems named in a refused body's "error" text and listed in its "detail".
NAMED_PROBLEMS = 5
LISTED_PROBLEMS = 100


class HttpLimits:
    def __init__(self, app: Any, max_body_bytes: int, max_upload_bytes: int) -> None:
        self.app = app
        self.max_body_bytes = max_body_bytes
        self.max_upload_bytes = max_upload_bytes

    async def __call__(self, scope: Scope, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope.get("path", "")
        if path not in TIMED_ENDPOINTS:
            # Any other route that takes a body (OIP REST's infer): the same body limit; it times itself.
            refusal = self._declared_too_large(path, scope)
            if refusal is None:
                body, refusal = await self._read_body(receive, self.max_body_bytes)
            if refusal is not None:
                await _send_error(send, *refusal)
                transport = "oip_rest" if path.startswith("/v2/") else "http"
                serving_metrics().validation_errors.labels(transport=transport, reason=refusal[2]).inc()
                return
            await self.app(scope, _replaying(body, receive), send)
            return
        started = time.perf_counter()
        refusal = self._declared_too_large(path, scope) or self._wrong_media_type(path, scope)
        if refusal is None and path in JSON_ENDPOINTS:
            body, refusal = await self._read_body(receive, self.max_body_bytes)
            receive = _replaying(body, receive)
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

    def _declared_too_large(self, path: str, scope: Scope) -> tuple[int, str, str] | None:
        length = _header(scope, b"content-length")
        limit = self.max_upload_bytes if path == UPLOAD_ENDPOINT else self.max_body_bytes
        if length.isascii() and length.isdigit() and int(length) > limit:
            return 413, f"request body of {length} bytes is over the limit of {limit}", "body_too_large"
        return None

    @staticmethod
    def _wrong_media_type(path: str, scope: Scope) -> tuple[int, str, str] | None:
        # Only a POST carries the body: any other method is the router's to refuse, with 405 and Allow.
        if path not in JSON_ENDPOINTS or scope["method"] != "POST":
            return None
        media_type = _header(scope, b"content-type").split(";")[0].strip().lower()
        if media_type != "application/json":
            shown = media_type or "none"
            return 415, f"Content-Type must be application/json, got {shown}", "unsupported_media_type"
        return None

    @staticmethod
    async def _read_body(receive: Any, limit: int) -> tuple[bytes, tuple[int, str, str] | None]:
        """The whole body, read before the app runs, counting the bytes that arrive: a chunked body declares
        no length, and the app would read all of it."""
        pieces: list[bytes] = []
        size = 0
        too_large = (413, f"request body is over the limit of {limit} bytes", "body_too_large")
        try:
            async with asyncio.timeout(MAX_BODY_SECONDS):
                while True:
                    message = await receive()
                    if message["type"] != "http.request":  # the client went away
                        break
                    pieces.append(message.get("body", b""))
                    size += len(pieces[-1])
                    if size > limit:
                        return b"", too_large
                    if not message.get("more_body", False):
                        break
        except TimeoutError:
            return b"", (408, f"request body did not arrive within {MAX_BODY_SECONDS} s", "body_timeout")
        return b"".join(pieces), None


class HttpAuth:
    """Authentication of HTTP and OIP REST calls: the gate (serving/auth.py) decides, this answers its
    refusals (401 with `WWW-Authenticate: Bearer`, 403, 429 with `Retry-After`) before the body is read, and
    lets an admitted call run as its key's name. Added only with auth on, outside HttpLimits."""

    def __init__(self, app: Any, gate: Gate) -> None:
        self.app = app
        self.gate = gate

    async def __call__(self, scope: Scope, receive: Any, send: Any) -> None:
        if scope["type"] != "http":  # lifespan; this service has no websocket routes
            await self.app(scope, receive, send)
            return
        path = scope.get("path", "")
        headers = Headers(scope=scope)
        verdict = self.gate.check(
            "oip_rest" if path.startswith("/v2") else "http",
            _client_address(scope),
            presented_key(headers.get("authorization"), headers.get("x-api-key")),
            self.gate.http_access(path),
        )
        if verdict.refusal is not None:
            extra = [(b"www-authenticate", b"Bearer")] if verdict.refusal.status == 401 else []
            if verdict.refusal is Refusal.BLOCKED:
                extra.append((b"retry-after", str(verdict.retry_after).encode()))
            await _send_error(send, verdict.refusal.status, verdict.message, verdict.refusal.reason, extra)
            return
        with calling_as(verdict.caller):
            await self.app(scope, receive, send)


def _client_address(scope: Scope) -> str:
    """The client's address as uvicorn gives it: the peer, or X-Forwarded-For's when the peer is a trusted
    proxy (uvicorn's FORWARDED_ALLOW_IPS, 127.0.0.1 by default)."""
    client = scope.get("client")
    return str(client[0]) if client else "unknown"


class AdmissionGate:
    """Each prediction request (the JSON APIs, OIP REST infer) admitted by the worker's `Admission`
    (serving/admission.py), or answered 503 with Retry-After at once, before its body is read. In front of
    BentoML's own middlewares (see `serve_http`): a refusal must cost as little as it can, or refusing
    under overload takes the CPU that the admitted requests need. Uploads to /predict_file are not gated:
    their time is their size's, not the queue's."""

    def __init__(self, app: Any, admission: Admission) -> None:
        self.app = app
        self.admission = admission

    async def __call__(self, scope: Scope, receive: Any, send: Any) -> None:
        transport = _predicting_transport(scope["path"]) if scope["type"] == "http" else None
        if transport is None:
            await self.app(scope, receive, send)
            return
        try:
            place = self.admission.admit(transport)
        except OverloadedError as error:
            headers = [(name.lower().encode(), value.encode()) for name, value in error.headers.items()]
            await _send_error(send, error.status, error.message, error.reason, headers)
            return
        with place:
            await self.app(scope, _starting_when_whole(receive, place), send)


def _starting_when_whole(receive: Any, place: Place) -> Any:
    """A `receive` that starts the request's work (`Place.start`) when the last piece of its body arrives."""

    async def receive_and_watch() -> dict[str, Any]:
        message: dict[str, Any] = await receive()
        if message["type"] == "http.request" and not message.get("more_body", False):
            place.start()
        return message

    return receive_and_watch


def _predicting_transport(path: str) -> str | None:
    if path in PREDICTION_ENDPOINTS:
        return "http"
    if path.startswith("/v2/models/") and path.endswith("/infer"):
        return "oip_rest"
    return None


def _header(scope: Scope, name: bytes) -> str:
    for key, value in scope["headers"]:
        if key == name:
            return str(value.decode("latin-1"))
    return ""


def _replaying(body: bytes, receive: Any) -> Any:
    """A `receive` that gives the app the body already read, then waits on the client as usual."""
    pending = [{"type": "http.request", "body": body, "more_body": False}]

    async def replay() -> dict[str, Any]:
        return pending.pop() if pending else await receive()

    return replay


async def _send_error(
    send: Any, status: int, message: str, _reason: str, headers: list[tuple[bytes, bytes]] | None = None
) -> None:
    body = orjson.dumps({"error": message})
    closing = [(b"connection", b"close")] if status in CLOSING_STATUSES else []
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
                *(headers or []),
                *closing,
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})


def model_info_route(current_info: Callable[[], dict[str, Any]]) -> APIRoute:
    async def model_info(_request: Request) -> Response:
        return Response(orjson.dumps(current_info()), media_type="application/json")

    return APIRoute(
        "/model",
        model_info,
        methods=["GET"],
        summary="The served model: name, version, alias, MLflow run, metrics, feature schema, classes, "
        "following the registry",
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
    408: {"description": f"The body did not arrive whole within {MAX_BODY_SECONDS} s", **_REFUSAL},
    413: {"description": "The body is over TABSERVE_MAX_BODY_BYTES", **_REFUSAL},
    415: {"description": "The Content-Type is not application/json", **_REFUSAL},
    503: {
        "description": "The service is overloaded: retry after the seconds that Retry-After gives",
        "headers": {"Retry-After": {"schema": {"type": "integer"}, "description": "seconds"}},
        **_REFUSAL,
    },
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


SECURITY_SCHEMES: Final = {
    "bearer": {"type": "http", "scheme": "bearer"},
    "apiKey": {"type": "apiKey", "in": "header", "name": "X-API-Key"},
}
AUTH_REFUSALS: Final = {
    401: {"description": "No API key, or not a valid one", **_REFUSAL},
    429: {"description": "Too many invalid keys from this address: retry after Retry-After", **_REFUSAL},
}
NO_RIGHT: Final = {403: {"description": "The API key lacks the right this call needs", **_REFUSAL}}


def document_authentication(spec: OpenAPISpecification, access: Callable[[str], Access]) -> None:
    """With auth on: the two ways to send a key, and on each operation that needs one (as `access` says,
    serving/auth.py), that it does and what a refusal answers."""
    assert isinstance(spec.components, dict)  # as document_refusals
    spec.components["securitySchemes"] = SECURITY_SCHEMES
    for path, item in spec.paths.items():
        needs = access(path)
        if needs is Access.OPEN:
            continue
        for method in ("get", "put", "post", "delete", "patch"):
            operation = getattr(item, method, None)
            if isinstance(operation, dict):
                operation["security"] = [{name: []} for name in SECURITY_SCHEMES]
                refusals = AUTH_REFUSALS if needs is Access.ANY_KEY else {**AUTH_REFUSALS, **NO_RIGHT}
                operation.setdefault("responses", {}).update(refusals)


def error_response(error: ServingError) -> Response:
    return Response(
        orjson.dumps({"error": error.message}),
        status_code=error.status,
        headers=error.headers,
        media_type="application/json",
    )


# ---- JSON bodies of the BentoML APIs ----------------------------------------------------------------------


class InvalidBody:
    """What a `json_body` input hands its API method in place of the value when the body is not one."""

    def __init__(self, error: ValidationError) -> None:
        self.error = error

    def response(self) -> Response:
        problems = self.error.errors(include_url=False, include_context=False, include_input=False)
        body = {
            "error": f"invalid request body: {named_problems(self.error)}",
            "detail": [
                {"loc": p["loc"], "msg": p["msg"], "type": p["type"]} for p in problems[:LISTED_PROBLEMS]
            ],
        }
        return Response(orjson.dumps(body), status_code=400, media_type="application/json")


def named_problems(error: ValidationError) -> str:
    """The first problems of a validation error, each under the field it is about, in one line."""
    problems = error.errors(include_url=False, include_context=False, include_input=False)
    named = "; ".join(f"{_where(p['loc'])}{p['msg']}" for p in problems[:NAMED_PROBLEMS])
    more = len(problems) - NAMED_PROBLEMS
    return named + (f"; and {more} more" if more > 0 else "")


def _where(loc: tuple[int | str, ...]) -> str:
    """('mean radius',) -> "'mean radius': "; (3, 'mean radius') -> "record 3, 'mean radius': " (records
    counted from 0, as the list's indices); () -> "" (the body as a whole, e.g. JSON that does not parse)."""
    parts = [f"record {part}" if isinstance(part, int) else repr(part) for part in loc]
    return f"{', '.join(parts)}: " if parts else ""


def json_body(
    value_type: Any, title: str, fast_parse: Callable[[bytes], Any] | None = None
) -> type[IODescriptor]:
    """The input spec of a `@bentoml.api` whose body is one JSON value of `value_type`: the OpenAPI schema
    BentoML gives that type, but the body parsed and validated here in one pass by pydantic's JSON parser,
    and a body that fails handed to the method as an `InvalidBody` to answer. `fast_parse`, where given,
    reads the body first: what it returns goes to the method as it is, and only where it returns None does
    pydantic parse the body.

    BentoML's own parsing of a list body uses `json.loads`, whose errors (truncated JSON, bad UTF-8, a
    5,000-digit number, deep nesting) escape as 500s; its 400s are headed with internal class names ("30
    validation error for RecordIODescriptor"); and it logs a traceback for every refused request."""
    adapter: TypeAdapter[Any] = TypeAdapter(value_type)

    class JsonBody(IORootModel[value_type]):
        __root_input__ = True  # the body is the value itself, not an object of named arguments

        @classmethod
        async def from_http_request(cls, request: Request, _serde: Any) -> IODescriptor:
            body = await request.body()
            value = fast_parse(body) if fast_parse is not None else None
            if value is None:  # not sure it is valid: the request model decides, and says why not
                try:
                    value = adapter.validate_json(body)
                except ValidationError as error:
                    value = InvalidBody(error)
            return cls.model_construct(root=value)

    JsonBody.__name__ = JsonBody.__qualname__ = title
    return JsonBody


# ---- the request head -------------------------------------------------------------------------------------


class HeadLimitedHttpToolsProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with limits on a request's head (request line and headers):

    - its size: httptools buffers a head of any size (a 128 MB header was read for 21 s, then answered 200).
      uvicorn's h11 protocol has such a limit, but uvicorn picks httptools when it is installed, and BentoML
      passes uvicorn no option to choose. A head over MAX_HEAD_BYTES gets 431 and the connection closes: as
      soon as that many bytes have come without the head being complete, or once a head that came whole is
      parsed.
    - its time (`head_seconds`): uvicorn waits for a head for ever, so a client that connects and sends
      nothing, or a head a byte at a time (slowloris), holds a connection for as long as it likes; uvicorn's
      keep-alive timeout starts only after a response. The head must arrive whole within `head_seconds` of
      the connection's opening or of the previous response. Past it, a connection that sent part of a head
      gets 408 and is closed; one that sent nothing is closed without an answer, as nginx's
      client_header_timeout does (a browser's idle preconnection was asked nothing). The body is not timed
      here: HttpLimits gives it MAX_BODY_SECONDS, and /predict_file its upload_idle_seconds.
    """

    head_seconds: float = 10.0

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._head_bytes: int | None = None  # bytes received since the request began; None: no head begun
        self._head_too_large = False
        self._head_deadline: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._start_head_deadline()

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_head_deadline()
        super().connection_lost(exc)

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._head_bytes = 0

    def on_headers_complete(self) -> None:
        self._cancel_head_deadline()
        self._head_bytes = None
        if len(self.url) + sum(len(name) + len(value) + 4 for name, value in self.headers) > MAX_HEAD_BYTES:
            # Raised from a parser callback, this stops the parser; uvicorn answers with send_400_response.
            self._head_too_large = True
            raise HeadTooLargeError
        super().on_headers_complete()

    def on_response_complete(self) -> None:
        # A pipelined request already has its head: only an empty pipeline waits for the next one.
        awaits_head = not self.pipeline
        super().on_response_complete()
        if awaits_head and not self.transport.is_closing():
            self._start_head_deadline()

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        if self._head_bytes is None or self.transport.is_closing():
            return
        self._head_bytes += len(data)
        if self._head_bytes > MAX_HEAD_BYTES:
            self._head_too_large = True
            self.send_400_response("")

    def send_400_response(self, msg: str) -> None:
        if not self._head_too_large:
            super().send_400_response(msg)
            return
        self._refuse(
            b"431 Request Header Fields Too Large",
            f"request line and headers are over the limit of {MAX_HEAD_BYTES} bytes",
        )

    def _start_head_deadline(self) -> None:
        self._cancel_head_deadline()
        self._head_deadline = self.loop.call_later(self.head_seconds, self._head_too_late)

    def _cancel_head_deadline(self) -> None:
        if self._head_deadline is not None:
            self._head_deadline.cancel()
            self._head_deadline = None

    def _head_too_late(self) -> None:
        self._head_deadline = None
        if self.transport.is_closing():
            return
        if self._head_bytes is None:  # nothing of a request came: no one to answer
            self.transport.close()
            return
        self._refuse(
            b"408 Request Timeout",
            f"request line and headers did not arrive within {self.head_seconds:g} s",
        )

    def _refuse(self, status_line: bytes, message: str) -> None:
        """Answer with `status_line` and `message` as JSON, before any request began, and close."""
        body = orjson.dumps({"error": message})
        self.transport.write(
            b"HTTP/1.1 "
            + status_line
            + b"\r\ncontent-type: application/json\r\n"
            + b"content-length: %d\r\nconnection: close\r\n\r\n" % len(body)
            + body
        )
        self.transport.close()


class HeadTooLargeError(Exception):
    pass


def serve_http(admission: Admission, head_seconds: float) -> None:
    """Make uvicorn, which BentoML's workers start after importing the service, serve HTTP/1.1 with
    `HeadLimitedHttpToolsProtocol` (heads due within `head_seconds`), each request going through
    `AdmissionGate` before anything of BentoML's: uvicorn resolves its protocol by this name when its config
    loads. (A middleware added to the service runs after BentoML's, whose metrics, tracing and timeout made
    a refusal cost half of an answer.)"""

    class AdmittingHttpToolsProtocol(HeadLimitedHttpToolsProtocol):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self.app = AdmissionGate(self.app, admission)

    AdmittingHttpToolsProtocol.head_seconds = head_seconds
    uvicorn.protocols.http.auto.AutoHTTPProtocol = AdmittingHttpToolsProtocol
