"""Prometheus metrics of the service, exported on BentoML's /metrics beside its own.

prometheus_client must be imported only after BentoML's worker has set PROMETHEUS_MULTIPROC_DIR (it picks
its storage mode at import), so the metrics are created on first use, once per process.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from datetime import datetime
from typing import Any

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 4096, 16384)


@dataclass(frozen=True)
class ServingMetrics:
    predictions: Any  # Counter: answered rows by model, version and predicted class
    request_seconds: Any  # Histogram: request latency by transport and endpoint
    batch_rows: Any  # Histogram: rows per model call (after adaptive batching)
    validation_errors: Any  # Counter: refused requests by transport and reason
    shed: Any  # Counter: requests refused with 503 / UNAVAILABLE under overload, by transport and reason
    log_dropped: Any  # Counter: prediction-log records that could not be written
    feedback: Any  # Counter: labels of POST /feedback, by outcome (accepted / rejected) and reason
    feedback_dropped: Any  # Counter: accepted labels (or answered ids) that could not be written
    drift_share: Any  # Gauge: share of drifted features in the latest drift report, by model and version
    drift_detected: Any  # Gauge: 1 if the latest drift report found drift, else 0
    drift_report_time: Any  # Gauge: when the latest drift report finished (Unix seconds)
    live_metric: Any  # Gauge: the model's metric on labelled live rows in the latest performance report
    live_estimated_accuracy: Any  # Gauge: accuracy estimated from probabilities on all rows (an estimate)
    live_labelled_rows: Any  # Gauge: labelled live rows the latest performance report judged
    live_degraded: Any  # Gauge: 1 if the latest performance report found the metric degraded
    performance_report_time: Any  # Gauge: when the latest performance report finished (Unix seconds)
    served_version: Any  # Gauge, per worker: 1 for the version each alias's model is served from, else 0
    model_swaps: (
        Any  # Counter: versions that took an alias, by what the worker did (swapped, incompatible...)
    )
    restart_needed: Any  # Gauge: 1 while a version holding the alias cannot be swapped in without a restart
    shadow_dropped: Any  # Counter: batches the shadow challenger did not score (its queue was full)
    auth_refusals: Any  # Counter: calls refused by authentication (serving/auth.py), by transport and reason


@functools.cache
def serving_metrics() -> ServingMetrics:
    from prometheus_client import Counter, Gauge, Histogram  # noqa: PLC0415  (see the module docstring)

    return ServingMetrics(
        predictions=Counter(
            "tabserve_predictions",
            "Rows answered, by model version and predicted class",
            ["model", "version", "predicted"],
        ),
        request_seconds=Histogram(
            "tabserve_request_seconds",
            "Request latency in seconds, by transport and endpoint",
            ["transport", "endpoint"],
            buckets=LATENCY_BUCKETS,
        ),
        batch_rows=Histogram(
            "tabserve_batch_rows",
            "Rows per model call after adaptive batching",
            ["model"],
            buckets=BATCH_BUCKETS,
        ),
        validation_errors=Counter(
            "tabserve_validation_errors",
            "Requests refused as invalid, by transport and reason",
            ["transport", "reason"],
        ),
        shed=Counter(
            "tabserve_shed",
            "Requests refused under overload (503 / UNAVAILABLE, with Retry-After), by transport and reason: "
            "max_concurrency or max_queue_time at admission, overloaded at the batching deadline",
            ["transport", "reason"],
        ),
        log_dropped=Counter(
            "tabserve_prediction_log_dropped", "Prediction-log records that could not be written"
        ),
        feedback=Counter(
            "tabserve_feedback", "Labels sent to POST /feedback, by outcome and reason", ["outcome", "reason"]
        ),
        feedback_dropped=Counter(
            "tabserve_feedback_dropped",
            "Feedback-log lines or answered-request ids that could not be written",
            ["store"],
        ),
        # Set by every API worker from the same file: the most recent value is the right one.
        drift_share=Gauge(
            "tabserve_drift_share",
            "Share of drifted features in the latest drift report",
            ["model", "version"],
            multiprocess_mode="mostrecent",
        ),
        drift_detected=Gauge(
            "tabserve_drift_detected",
            "1 if the latest drift report found drift",
            ["model", "version"],
            multiprocess_mode="mostrecent",
        ),
        drift_report_time=Gauge(
            "tabserve_drift_report_timestamp_seconds",
            "When the latest drift report finished, in Unix seconds",
            ["model", "version"],
            multiprocess_mode="mostrecent",
        ),
        live_metric=Gauge(
            "tabserve_live_metric",
            "The model's metric on labelled live rows in the latest performance report",
            ["model", "version", "metric"],
            multiprocess_mode="mostrecent",
        ),
        live_estimated_accuracy=Gauge(
            "tabserve_live_estimated_accuracy",
            "Accuracy estimated from the predicted class's probability on all live rows (an estimate)",
            ["model", "version"],
            multiprocess_mode="mostrecent",
        ),
        live_labelled_rows=Gauge(
            "tabserve_live_labelled_rows",
            "Labelled live rows judged by the latest performance report",
            ["model", "version"],
            multiprocess_mode="mostrecent",
        ),
        live_degraded=Gauge(
            "tabserve_live_degraded",
            "1 if the latest performance report found the model's metric degraded",
            ["model", "version"],
            multiprocess_mode="mostrecent",
        ),
        performance_report_time=Gauge(
            "tabserve_performance_report_timestamp_seconds",
            "When the latest performance report finished, in Unix seconds",
            ["model", "version"],
            multiprocess_mode="mostrecent",
        ),
        # One series per worker (multiprocess mode "all" adds its pid): each worker swaps on its own.
        served_version=Gauge(
            "tabserve_served_version",
            "1 for the version a worker serves for an alias (champion, or challenger in shadow), else 0",
            ["model", "alias", "version", "registered_version"],
            multiprocess_mode="all",
        ),
        model_swaps=Counter(
            "tabserve_model_swaps",
            "Versions that took the followed alias, by result: swapped, incompatible (a restart is "
            "needed), unusable; and outages of the registry (registry_unreachable)",
            ["model", "alias", "result"],
        ),
        restart_needed=Gauge(
            "tabserve_restart_needed",
            "1 while the version holding the alias cannot be served without a restart (incompatible)",
            ["model", "alias"],
            multiprocess_mode="max",
        ),
        shadow_dropped=Counter(
            "tabserve_shadow_dropped", "Batches the shadow challenger did not score: its queue was full"
        ),
        auth_refusals=Counter(
            "tabserve_auth_refusals",
            "Calls refused by authentication, by transport and reason (missing_key, unknown_key, "
            "no_right, blocked)",
            ["transport", "reason"],
        ),
    )


def export_latest_drift(metrics: ServingMetrics, summary: dict[str, Any]) -> None:
    """The gauges of a drift summary (drift/summary.py: `<reports dir>/<model>/latest.json`)."""
    labels = {"model": summary["model"], "version": summary["version"]}
    metrics.drift_share.labels(**labels).set(float(summary["drift_share"]))
    metrics.drift_detected.labels(**labels).set(1.0 if summary["drift_detected"] else 0.0)
    finished = datetime.fromisoformat(summary["finished_at"]).timestamp()
    metrics.drift_report_time.labels(**labels).set(finished)


def export_latest_performance(metrics: ServingMetrics, summary: dict[str, Any]) -> None:
    """The gauges of a performance summary (drift/performance.py: `<reports dir>/<model>/performance.json`;
    read it with `read_latest_performance`). A regression model has no estimated accuracy."""
    labels = {"model": summary["model"], "version": summary["version"]}
    metrics.live_metric.labels(**labels, metric=summary["metric"]).set(float(summary["live_value"]))
    if summary["estimated_accuracy"] is not None:
        metrics.live_estimated_accuracy.labels(**labels).set(float(summary["estimated_accuracy"]))
    metrics.live_labelled_rows.labels(**labels).set(float(summary["labelled_rows"]))
    metrics.live_degraded.labels(**labels).set(1.0 if summary["degraded"] else 0.0)
    finished = datetime.fromisoformat(summary["finished_at"]).timestamp()
    metrics.performance_report_time.labels(**labels).set(finished)


# Reasons of the refusals counted while one HTTP request was handled. HttpLimits opens a fresh list per
# request and counts a 4xx itself only when nothing below it did (BentoML's own schema validation counts
# nothing); a list, not a flag, because a value set in a task below would not be seen from here.
_counted_refusals: ContextVar[list[str] | None] = ContextVar("counted_refusals", default=None)


def mark_refusal_counted(reason: str) -> None:
    counted = _counted_refusals.get()
    if counted is not None:
        counted.append(reason)


@contextmanager
def refusals_of_this_request() -> Iterator[list[str]]:
    counted: list[str] = []
    token = _counted_refusals.set(counted)
    try:
        yield counted
    finally:
        _counted_refusals.reset(token)
