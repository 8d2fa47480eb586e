"""Drift alerts: one short JSON message to a Slack- or Discord-compatible webhook.

The body carries the text twice, ``{"text": ..., "content": ...}``: Slack reads ``text``, Discord reads
``content``. Transient failures (connection errors, timeouts, HTTP 429 and 5xx) are retried with exponential
backoff, at most 4 attempts within about 15 seconds; any other answer is final. The caller reports a failed
delivery as a warning: an alert never changes a report's outcome.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import httpx
from tenacity import Retrying, retry_if_exception_type, stop_after_attempt, stop_after_delay, wait_exponential
from tenacity.wait import wait_base

from drift.summary import Summary
from models.errors import first_line

if TYPE_CHECKING:
    from drift.summary import PerformanceSummary

DISCORD_LIMIT = 2000  # characters of `content` Discord accepts


@dataclass(frozen=True)
class Delivery:
    ok: bool
    attempts: int
    detail: str  # the last answer or error


class _TransientError(Exception):
    pass


def drift_message(summary: Summary, window: str) -> str:
    features = ", ".join(summary.drifted_features)
    return (
        f"Drift in {summary.model} v{summary.registered_version} ({summary.version}): "
        f"{len(summary.drifted_features)} drifted features (share {summary.drift_share:.2f}): {features}. "
        f"Prediction drift: {'yes' if summary.prediction_drift else 'no'}. "
        f"{summary.rows_compared:,} rows compared, {window}. "
        f"MLflow run {summary.mlflow_run_id}, data {summary.data_digest}. "
        f"Report: {summary.report_dir}/report.html"
    )


def performance_message(summary: PerformanceSummary, window: str) -> str:
    estimate = (
        f" Estimated accuracy on all {summary.rows_seen:,} rows (from probabilities): "
        f"{summary.estimated_accuracy:.4f}."
        if summary.estimated_accuracy is not None
        else ""
    )
    return (
        f"Performance degraded in {summary.model} v{summary.registered_version} ({summary.version}): "
        f"{summary.metric} {summary.live_value:.4f} on {summary.labelled_rows:,} labelled live rows vs "
        f"{summary.reference_value:.4f} on the reference rows (at most {summary.max_drop:g} worse allowed), "
        f"{window}.{estimate} MLflow run {summary.mlflow_run_id}, data {summary.data_digest}. "
        f"Report: {summary.report_dir}/report.html"
    )


def post(
    url: str,
    text: str,
    attempts: int = 4,
    deadline_seconds: float = 15.0,
    wait: wait_base | None = None,
    timeout_seconds: float = 5.0,
) -> Delivery:
    body = {"text": text, "content": text[:DISCORD_LIMIT]}
    retrying = Retrying(
        stop=stop_after_attempt(attempts) | stop_after_delay(deadline_seconds),
        wait=wait or wait_exponential(multiplier=0.5, max=4),
        retry=retry_if_exception_type((httpx.TransportError, _TransientError)),
        reraise=True,
    )
    try:
        for attempt in retrying:
            with attempt:
                response = httpx.post(url, json=body, timeout=timeout_seconds)
                if response.status_code == 429 or response.status_code >= 500:
                    raise _TransientError(f"HTTP {response.status_code}")
    except (httpx.HTTPError, httpx.InvalidURL, _TransientError) as exc:
        return Delivery(False, retrying.statistics.get("attempt_number", 1), first_line(exc))
    tries = retrying.statistics.get("attempt_number", 1)
    return Delivery(response.is_success, tries, f"HTTP {response.status_code}")
