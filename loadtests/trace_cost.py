"""What traces cost a request, measured in this process on the data plane's real path (the tracing hooks,
the coalescer, the in-process model call, the Arrow log's thread) with the default model.

    .venv/bin/python -m loadtests.trace_cost [--requests 4000] [--concurrency 32]

First what the hooks cost a request when off, called alone in a loop (nanoseconds); then three modes, each
in CPU microseconds of the whole process per request (the log's thread and the span exporter's thread
included) and in wall time:
    off        no endpoint: what every request pays (the hooks return at their first line)
    root only  a sampled span per request and nothing of ours: what BentoML's HTTP span costs, for scale
    on         that span and ours (decode, batch.wait, model.call, log.write), encoded as the OTLP exporter
               encodes them; only the post to a collector is left out
"""

from __future__ import annotations

import asyncio
import tempfile
import time
from collections.abc import Sequence
from contextlib import nullcontext
from pathlib import Path
from typing import Annotated, Any

import numpy as np
import typer
from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter, SpanExportResult

from loadtests.rows import held_out
from models.registry import served_model
from models.store import StoredModel
from serving import tracing
from serving.arrowlog import ArrowLog
from serving.dataplane import DataPlane
from serving.metrics import serving_metrics
from serving.model import InProcessModel, RowPredictor
from settings import get_settings

REPEATS = 3


class EncodingExporter(SpanExporter):
    """The OTLP exporter's work on our side of the wire: spans to protobuf bytes, then dropped."""

    def __init__(self) -> None:
        self.spans = 0

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        encode_spans(spans).SerializeToString()
        self.spans += len(spans)
        return SpanExportResult.SUCCESS


def in_process_plane(model: StoredModel, log: ArrowLog) -> tuple[DataPlane, InProcessModel]:
    """The data plane as an API worker builds it by default (service.py `_prepare`): the model in process."""
    settings = get_settings()
    predictor = RowPredictor(model, settings.compiled_scorer)
    call = InProcessModel(predictor, settings.max_batch_rows, settings.max_latency_ms / 1000)
    return DataPlane(model, call, predictor.scorer, log, serving_metrics()), call


async def drive(plane: DataPlane, rows: np.ndarray, requests: int, concurrency: int, root: Any) -> None:
    """`requests` one-row requests, `concurrency` at a time, each under `root()` as under BentoML's span."""

    async def one(index: int) -> None:
        with root(), tracing.request("http"):
            await plane.predict_rows(
                rows[index % len(rows) : index % len(rows) + 1], "http", "/predict", f"r{index}"
            )

    for start in range(0, requests, concurrency):
        await asyncio.gather(*(one(index) for index in range(start, min(start + concurrency, requests))))


def measure(
    model: StoredModel, rows: np.ndarray, requests: int, concurrency: int, mode: str
) -> dict[str, float]:
    provider: TracerProvider | None = None
    exporter = EncodingExporter()
    root: Any = nullcontext
    if mode != "off":
        provider = TracerProvider()  # samples every trace
        provider.add_span_processor(BatchSpanProcessor(exporter))
        root_tracer = provider.get_tracer("root")
        root = lambda: root_tracer.start_as_current_span("POST /predict")  # noqa: E731
    tracing.use(provider if mode == "on" else None)
    with tempfile.TemporaryDirectory() as folder:
        log = ArrowLog(Path(folder), 2**30, 1)
        plane, call = in_process_plane(model, log)
        asyncio.run(drive(plane, rows, concurrency, concurrency, root))  # warm
        cpu, wall = time.process_time(), time.perf_counter()
        asyncio.run(drive(plane, rows, requests, concurrency, root))
        log.close()  # its thread has written every row
        if provider is not None:
            provider.force_flush()  # and the exporter has encoded every span
        cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
        call.close()
    tracing.use(None)
    if provider is not None:
        provider.shutdown()
    return {"cpu_us": cpu / requests * 1e6, "wall_us": wall / requests * 1e6, "spans": exporter.spans}


def hooks_off_ns(calls: int = 200_000) -> float:
    """Every hook one request and its share of a batch pass through, with tracing off."""
    assert tracing._tracer is None
    model = dict.fromkeys(tracing.MODEL_ATTRIBUTES.values(), "x")
    started = time.perf_counter_ns()
    for _ in range(calls):
        with tracing.request("http"):
            tracing.decoded("id", 1, model)
            wait = tracing.wait_started()
            with tracing.model_call(tracing.batch_formed((wait,), 1)):
                pass
            with tracing.log_write((tracing.answered(),), 1):
                pass
    return (time.perf_counter_ns() - started) / calls


def main(
    requests: Annotated[int, typer.Option(help="requests per measurement")] = 4000,
    concurrency: Annotated[int, typer.Option(help="requests in flight together")] = 32,
) -> None:
    """Per-request cost of the traces, off and on."""
    print(f"hooks, off: {hooks_off_ns():.0f} ns/request")
    model = served_model(get_settings())[0]
    rows = model.schema.prepare(held_out()).to_numpy(dtype=np.float64)
    results: dict[str, list[dict[str, float]]] = {"off": [], "root only": [], "on": []}
    for _ in range(REPEATS):  # interleaved, so that a busy moment of the machine falls on every mode
        for mode, runs in results.items():
            runs.append(measure(model, rows, requests, concurrency, mode))
    for mode, runs in results.items():
        cpu = min(run["cpu_us"] for run in runs)
        wall = min(run["wall_us"] for run in runs)
        spans = runs[0]["spans"] / requests
        print(f"{mode:10}  CPU {cpu:7.1f} µs/request  wall {wall:7.1f} µs/request  spans/request {spans:.2f}")


if __name__ == "__main__":
    typer.run(main)
