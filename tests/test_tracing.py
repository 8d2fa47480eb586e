"""Traces (serving/tracing.py): a real `bentoml serve` exporting over OTLP/HTTP to a collector on loopback
that decodes what it receives as OTLP's own protobuf messages; and, off, a server that sends nothing and a
request path that never enters the span code."""

from __future__ import annotations

import asyncio
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import FrameType
from typing import Any

import httpx
import numpy as np
import pytest
import tritonclient.grpc as triton_grpc
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, KeyValue

from loadtests.trace_cost import in_process_plane
from models.data import load_default
from models.store import StoredModel
from serving import tracing
from serving.arrowlog import ArrowLog
from tests.conftest import Stores, free_port, start_server, wait_ready

ROWS = 3
OURS = ("decode", "batch.wait", "model.call", "log.write")
GRPC_SPAN = "inference.GRPCInferenceService/ModelInfer"
SPANS_WAIT_SECONDS = 30


@dataclass
class Span:
    name: str
    trace_id: str
    span_id: str
    parent_id: str
    kind: int
    attributes: dict[str, Any]
    links: list[tuple[str, str, dict[str, Any]]]  # trace id, span id, attributes


def _value(value: AnyValue) -> Any:
    return getattr(value, value.WhichOneof("value"))


def _attributes(pairs: list[KeyValue]) -> dict[str, Any]:
    return {pair.key: _value(pair.value) for pair in pairs}


@dataclass
class Collector:
    """A loopback OTLP/HTTP trace receiver: POST /v1/traces with an ExportTraceServiceRequest."""

    spans: list[Span] = field(default_factory=list)
    posts: int = 0

    def __post_init__(self) -> None:
        collector = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                collector.receive(self.path, self.headers.get("Content-Type", ""), body)
                self.send_response(200)
                self.send_header("Content-Type", "application/x-protobuf")
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def receive(self, path: str, content_type: str, body: bytes) -> None:
        assert (path, content_type) == ("/v1/traces", "application/x-protobuf")
        self.posts += 1
        request = ExportTraceServiceRequest.FromString(body)
        for resource in request.resource_spans:
            for scope in resource.scope_spans:
                self.spans.extend(
                    Span(
                        span.name,
                        span.trace_id.hex(),
                        span.span_id.hex(),
                        span.parent_span_id.hex(),
                        span.kind,
                        _attributes(list(span.attributes)),
                        [
                            (link.trace_id.hex(), link.span_id.hex(), _attributes(list(link.attributes)))
                            for link in span.links
                        ],
                    )
                    for span in scope.spans
                )

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture(scope="module")
def collector() -> Iterator[Collector]:
    receiver = Collector()
    yield receiver
    receiver.close()


@contextmanager
def serve(stores: Stores, folder: Path, **env: str) -> Iterator[tuple[str, str]]:
    """A real `bentoml serve` with one API worker: its URL and gRPC target."""
    port, grpc_port = free_port(), free_port()
    environment = stores.env(
        BENTOML_HOME=str(stores.server_home(folder / "home")),
        TABSERVE_GRPC_HOST="127.0.0.1",
        TABSERVE_GRPC_PORT=str(grpc_port),
        TABSERVE_PREDICTION_LOG_DIR=str(folder / "predictions"),
        TABSERVE_FEEDBACK_LOG_DIR=str(folder / "feedback"),
        TABSERVE_API_WORKERS="1",
        OTEL_BSP_SCHEDULE_DELAY="100",  # ms: the span processor's export interval
        **env,
    )
    output = folder / "server-output.txt"
    process = start_server(environment, port, output)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_ready(process, url, output)
        yield url, f"127.0.0.1:{grpc_port}"
    finally:
        process.terminate()
        process.wait(timeout=60)


@pytest.fixture(scope="module")
def features() -> np.ndarray:
    return load_default().features.iloc[:ROWS].to_numpy(dtype=np.float64)


def send_both(url: str, grpc_target: str, features: np.ndarray, stored: StoredModel) -> None:
    """One HTTP /predict and one gRPC ModelInfer, each named by the client."""
    record = dict(zip(stored.schema.names, features[0].tolist(), strict=True))
    answer = httpx.post(f"{url}/predict", json=record, headers={"X-Request-Id": "traced-http"}, timeout=30)
    assert answer.status_code == 200, answer.text
    client = triton_grpc.InferenceServerClient(grpc_target)
    tensor = triton_grpc.InferInput("rows", list(features.shape), "FP64")
    tensor.set_data_from_numpy(features)
    assert client.infer(stored.name, [tensor], request_id="traced-grpc").get_response().id == "traced-grpc"


def request_spans(collector: Collector, request_id: str) -> dict[str, Span]:
    """Our four spans of one request, once all have arrived (the log's come last)."""
    deadline = time.monotonic() + SPANS_WAIT_SECONDS
    while True:
        found: dict[str, Span] = {}
        for span in list(collector.spans):
            own = span.attributes.get(tracing.REQUEST_ID) == request_id
            linked = any(attributes.get(tracing.REQUEST_ID) == request_id for *_, attributes in span.links)
            if span.name in OURS and (own or linked):
                found[span.name] = span
        if set(found) == set(OURS) or time.monotonic() > deadline:
            return found
        time.sleep(0.2)


@pytest.fixture(scope="module")
def stored(default_model: Any) -> StoredModel:
    return StoredModel.open("breast_cancer:latest")


def test_http_and_grpc_requests_are_traced_over_otlp(
    stores: Stores,
    default_model: Any,
    stored: StoredModel,
    collector: Collector,
    features: np.ndarray,
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    folder = tmp_path_factory.mktemp("traced")
    with serve(stores, folder, TABSERVE_OTLP_ENDPOINT=collector.url) as (url, grpc_target):
        send_both(url, grpc_target, features, stored)
        for request_id, transport, rows in (("traced-http", "http", 1), ("traced-grpc", "grpc", ROWS)):
            spans = request_spans(collector, request_id)
            assert set(spans) == set(OURS), f"{request_id}: only {sorted(spans)} arrived"
            decode = spans["decode"]
            by_id = {span.span_id: span for span in collector.spans if span.trace_id == decode.trace_id}
            # The request's span: BentoML's HTTP server span, or the gRPC server span made for the call.
            request = by_id[decode.parent_id]
            assert request.kind == 2  # SERVER
            assert (request.name == GRPC_SPAN) if transport == "grpc" else ("/predict" in request.name)
            assert request.attributes[tracing.REQUEST_ID] == request_id
            assert request.attributes[tracing.TRANSPORT] == transport
            assert request.attributes[tracing.ROWS] == rows
            assert request.attributes["tabserve.model.name"] == stored.name
            assert request.attributes["tabserve.registered_version"] == stored.labels["registered_version"]
            assert request.attributes["tabserve.mlflow_run_id"] == stored.lineage["mlflow_run_id"]
            for name in ("decode", "batch.wait"):
                assert spans[name].parent_id == request.span_id
                assert spans[name].attributes[tracing.REQUEST_ID] == request_id
            # Shared spans: under the first request they serve (here the only one), linked to each.
            call = spans["model.call"]
            for shared in (call, spans["log.write"]):
                assert (shared.trace_id, shared.parent_id) == (request.trace_id, request.span_id)
                assert (request.trace_id, request.span_id, {tracing.REQUEST_ID: request_id}) in shared.links
                assert shared.attributes["tabserve.model.name"] == stored.name
                assert shared.attributes[tracing.BATCH_REQUESTS] >= 1
            assert call.attributes[tracing.BATCH_ROWS] >= rows
            wait = spans["batch.wait"]
            assert (call.trace_id, call.span_id, {}) in wait.links
            assert wait.attributes[tracing.BATCH_ROWS] == call.attributes[tracing.BATCH_ROWS]
            for span in spans.values():
                assert span.attributes[tracing.MODEL_VERSION] == stored.version


def test_off_the_server_sends_nothing(
    stores: Stores,
    default_model: Any,
    stored: StoredModel,
    features: np.ndarray,
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    """No TABSERVE_OTLP_ENDPOINT: nothing is exported, though OpenTelemetry's variables name a collector."""
    quiet = Collector()
    try:
        folder = tmp_path_factory.mktemp("untraced")
        otel = {"OTEL_EXPORTER_OTLP_ENDPOINT": quiet.url, "OTEL_TRACES_EXPORTER": "otlp"}
        with serve(stores, folder, **otel) as (url, grpc_target):
            send_both(url, grpc_target, features, stored)
            time.sleep(2)  # twenty export intervals
        assert (quiet.posts, quiet.spans) == (0, [])
    finally:
        quiet.close()


def test_off_the_request_path_never_enters_the_span_code(
    stored: StoredModel, features: np.ndarray, tmp_path: Path
) -> None:
    """Every function called while requests are answered in process, on every thread: of serving/tracing.py
    only the hooks' first lines run, and no OpenTelemetry code at all."""
    assert tracing._tracer is None
    called: set[tuple[str, str]] = set()

    def profile(frame: FrameType, event: str, _arg: Any) -> None:
        if event == "call":
            called.add((frame.f_code.co_filename, frame.f_code.co_name))

    threading.setprofile(profile)  # the log's and the model's threads, started below
    try:
        log = ArrowLog(tmp_path, 2**20, 1)
        plane, call = in_process_plane(stored, log)

        async def answer_concurrently() -> None:
            async def one(index: int) -> None:
                with tracing.request("http"):
                    await plane.predict_rows(features[index : index + 1], "http", "/predict", f"r{index}")

            sys.setprofile(profile)
            try:
                await asyncio.gather(*(one(index) for index in range(ROWS)))
            finally:
                sys.setprofile(None)

        asyncio.run(answer_concurrently())
        log.close()
        call.close()
    finally:
        threading.setprofile(None)  # type: ignore[arg-type]
    assert log.dropped == 0
    entered = {name for filename, name in called if filename == tracing.__file__}
    assert entered == {
        "request",
        "decoded",
        "wait_started",
        "batch_formed",
        "model_call",
        "answered",
        "log_write",
    }
    assert not [filename for filename, _ in called if "opentelemetry" in filename]
