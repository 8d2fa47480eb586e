"""Traces: OpenTelemetry spans per request, exported over OTLP when an endpoint is set (otlp_endpoint).

The spans of one request, each a child of the request's span (BentoML's HTTP server span, or the gRPC
server span made here):

    decode      from the transport's handler to rows in schema order (body parsed, values validated)
    batch.wait  the request waiting in the coalescer for the model call that takes its rows
    model.call  one per model call, shared by the requests whose rows it scores
    log.write   one per record batch the log's thread writes (the request itself only queues its rows)

A shared span (model.call, log.write) is a child of the oldest request it serves, links to every request
it serves (the link names the request id) and says how many rows and requests it took (`batch.rows`,
`batch.requests`); each request's batch.wait links to its model.call and carries the same two counts.
The request's span gets `tabserve.request_id`, `tabserve.transport`, `tabserve.rows` and the model's
(`tabserve.model.name`, `tabserve.model.version`, `tabserve.registered_version`, `tabserve.mlflow_run_id`),
so that a trace can be found by request id; decode and batch.wait carry the request id and the model
version, the shared spans the model's attributes. Fewer attributes per span: setting one costs a few
microseconds in the SDK (loadtests/trace_cost.py measures the whole).

Spans go through BentoML's tracer provider (its `tracing` service config, built by `bentoml_config`), so
that they share its sampler and exporter and hang under its HTTP spans. Off (no endpoint), `_tracer` is None
and every hook returns at its first line: no span, context or attribute is made on the request path. A
request the sampler leaves out makes no spans either.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from contextlib import AbstractContextManager, contextmanager, nullcontext
from contextvars import ContextVar
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from serving.errors import ServingError

if TYPE_CHECKING:
    from opentelemetry.context import Context
    from opentelemetry.trace import Span, SpanContext, Tracer, TracerProvider

    from settings import Settings

REQUEST_ID = "tabserve.request_id"
TRANSPORT = "tabserve.transport"
ROWS = "tabserve.rows"
BATCH_ROWS, BATCH_REQUESTS = "batch.rows", "batch.requests"
MODEL_VERSION = "tabserve.model.version"
# Lineage key (serving/dataplane.py DataPlane.lineage) -> span attribute.
MODEL_ATTRIBUTES = {
    "model": "tabserve.model.name",
    "version": MODEL_VERSION,
    "registered_version": "tabserve.registered_version",
    "mlflow_run_id": "tabserve.mlflow_run_id",
}
# The OTLP/HTTP exporter posts to its endpoint as given; OTEL_EXPORTER_OTLP_ENDPOINT, which users know
# better, names the collector and has this path added.
OTLP_HTTP_PATH = "/v1/traces"

_tracer: Tracer | None = None
_OFF: AbstractContextManager[None] = nullcontext()  # what the hooks return when there is nothing to trace


@dataclass
class RequestTrace:
    """One traced request, held in a context variable from its transport's handler on."""

    context: Context  # the request's span's: its own spans are children of it
    span: Span  # the request's span (BentoML's HTTP span, or the gRPC span made here)
    attributes: dict[str, Any]  # the request span's: transport; request id, rows and model once decoded
    tags: dict[str, Any]  # what each of its own spans carries: the request id and the model version
    decode: Span | None  # open until the rows reach the data plane's model call

    def answered(self) -> Answered:
        return Answered(self.span.get_span_context(), self.attributes)


@dataclass
class WaitTrace:
    """A request's batch.wait span, ended when its batch starts."""

    request: RequestTrace
    span: Span


@dataclass(frozen=True)
class Answered:
    """What the log's thread needs to trace a request's rows: its span, to link to, and its attributes."""

    span_context: SpanContext
    attributes: Mapping[str, Any]  # the request's, complete once decoded


_current: ContextVar[RequestTrace | None] = ContextVar("tabserve_request_trace", default=None)


def bentoml_config(settings: Settings) -> dict[str, Any]:
    """BentoML's `tracing` service config for our settings: {} when off (BentoML then exports nothing)."""
    if settings.otlp_endpoint is None:
        return {}
    endpoint = settings.otlp_endpoint
    if settings.otlp_protocol == "http" and urlsplit(endpoint).path in ("", "/"):
        endpoint = endpoint.rstrip("/") + OTLP_HTTP_PATH
    return {
        "tracing": {
            "exporter_type": "otlp",
            "sample_rate": settings.trace_sample_rate,
            "otlp": {"protocol": settings.otlp_protocol, "endpoint": endpoint},
        }
    }


def start(settings: Settings) -> None:
    """In each API worker: trace with BentoML's tracer provider, if an endpoint is set."""
    if settings.otlp_endpoint is None:
        return
    # Imported here: BentoML's container builds the SDK's provider, needed only when traces are on.
    from bentoml._internal.configuration.containers import BentoMLContainer  # noqa: PLC0415

    use(BentoMLContainer.tracer_provider.get())


def use(provider: TracerProvider | None) -> None:
    """Trace with `provider` from now on; None: off."""
    global _tracer  # noqa: PLW0603  (the one switch every hook reads)
    _tracer = provider.get_tracer("tabserve") if provider is not None else None


def model_attributes(lineage: Mapping[str, str]) -> dict[str, str]:
    """The model's span attributes, made once per data plane."""
    return {attribute: lineage[key] for key, attribute in MODEL_ATTRIBUTES.items()}


# ---- the request path -------------------------------------------------------------------------------------


def request(transport: str) -> AbstractContextManager[None]:
    """Around an HTTP or OIP REST request's handling, where BentoML's server span is current."""
    if _tracer is None:
        return _OFF
    return _traced_request(_tracer, transport, None, None)


def grpc_request(
    transport: str, method: str, metadata: Iterable[tuple[str, Any]]
) -> AbstractContextManager[None]:
    """Around a gRPC call's handling: its server span is made here, a child of the caller's trace context
    (W3C `traceparent` metadata) when it sends one."""
    if _tracer is None:
        return _OFF
    return _traced_request(_tracer, transport, method, metadata)


@contextmanager
def _traced_request(
    tracer: Tracer, transport: str, method: str | None, metadata: Iterable[tuple[str, Any]] | None
) -> Iterator[None]:
    from opentelemetry import context, propagate, trace  # noqa: PLC0415

    own_span: Span | None = None
    if method is None:
        parent = context.get_current()
    else:
        service, _, name = method.lstrip("/").partition("/")
        caller = propagate.extract({key: value for key, value in metadata or () if isinstance(value, str)})
        own_span = tracer.start_span(
            method.lstrip("/"),
            context=caller,
            kind=trace.SpanKind.SERVER,
            attributes={"rpc.system": "grpc", "rpc.service": service, "rpc.method": name},
        )
        parent = trace.set_span_in_context(own_span, caller)
    span = trace.get_current_span(parent)
    if not span.get_span_context().trace_flags.sampled:  # never exported: not worth its spans
        try:
            yield
        finally:
            if own_span is not None:
                own_span.end()
        return
    state = RequestTrace(parent, span, {TRANSPORT: transport}, {}, tracer.start_span("decode", parent))
    token = _current.set(state)
    try:
        yield
    except BaseException as error:
        span.record_exception(error)
        if not isinstance(error, ServingError) or error.status >= 500:  # a refusal is the client's
            span.set_status(trace.StatusCode.ERROR, f"{type(error).__name__}: {error}")
        raise
    finally:
        _current.reset(token)
        if state.decode is not None:  # refused before its rows reached the model
            state.decode.set_status(trace.StatusCode.ERROR, "the request's rows never reached the model")
            state.decode.end()
        if own_span is not None:
            own_span.end()


def decoded(request_id: str, rows: int, model: Mapping[str, str]) -> None:
    """The rows are in the data plane: decode ends, and the request's attributes are known."""
    state = _current.get()
    if state is None or state.decode is None:
        return
    state.attributes.update({REQUEST_ID: request_id, ROWS: rows, **model})
    state.tags = {REQUEST_ID: request_id, MODEL_VERSION: model[MODEL_VERSION]}
    state.decode.set_attributes(state.tags)
    state.decode.end()
    state.decode = None
    state.span.set_attributes(state.attributes)


def wait_started() -> WaitTrace | None:
    """The request joins the coalescer's queue."""
    state = _current.get()
    if state is None or _tracer is None:
        return None
    return WaitTrace(state, _tracer.start_span("batch.wait", state.context, attributes=state.tags))


def wait_ended(wait: WaitTrace | None, error: BaseException) -> None:
    """The request left the queue without a model call (shed: it waited too long)."""
    if wait is not None:
        from opentelemetry.trace import StatusCode  # noqa: PLC0415

        wait.span.record_exception(error)
        wait.span.set_status(StatusCode.ERROR, str(error))
        wait.span.end()


def batch_formed(waits: Iterable[WaitTrace | None], rows: int) -> Span | None:
    """A model call takes the rows of these waiting requests: their waits end, linked to its span, which
    is returned (None when none of them is traced) for `model_call` to run under."""
    if _tracer is None:
        return None
    waits = list(waits)
    traced = [wait for wait in waits if wait is not None]
    if not traced:
        return None
    counts = {BATCH_ROWS: rows, BATCH_REQUESTS: len(waits)}
    call = _shared_span(_tracer, "model.call", [wait.request.answered() for wait in traced], counts)
    for wait in traced:
        wait.span.set_attributes(counts)
        wait.span.add_link(call.get_span_context())
        wait.span.end()
    return call


def model_call(span: Span | None) -> AbstractContextManager[Any]:
    """Around a model call whose span `batch_formed` started: ended when the call is."""
    if span is None:
        return _OFF
    from opentelemetry import trace  # noqa: PLC0415

    return trace.use_span(span, end_on_exit=True)


def answered() -> Answered | None:
    """The request's rows go to the log's queue: what the log's thread traces them by."""
    state = _current.get()
    if state is None:
        return None
    return state.answered()


def log_write(requests: Iterable[Answered | None], rows: int) -> AbstractContextManager[Any]:
    """Around the log's thread writing one record batch of these requests' rows."""
    if _tracer is None:
        return _OFF
    requests = list(requests)
    traced = [request for request in requests if request is not None]
    if not traced:
        return _OFF
    from opentelemetry import trace  # noqa: PLC0415

    counts = {BATCH_ROWS: rows, BATCH_REQUESTS: len(requests)}
    return trace.use_span(_shared_span(_tracer, "log.write", traced, counts), end_on_exit=True)


def _shared_span(tracer: Tracer, name: str, requests: list[Answered], counts: dict[str, int]) -> Span:
    """A span for several requests: a child of the first one's span, linked to each (the link says which
    request), with the model attributes of the first (a batch is one version's)."""
    from opentelemetry import trace  # noqa: PLC0415

    first = requests[0]
    parent = trace.set_span_in_context(trace.NonRecordingSpan(first.span_context))
    links = [trace.Link(r.span_context, {REQUEST_ID: r.attributes.get(REQUEST_ID, "")}) for r in requests]
    model = {key: first.attributes[key] for key in MODEL_ATTRIBUTES.values() if key in first.attributes}
    return tracer.start_span(name, parent, links=links, attributes={**model, **counts})
