"""The latest drift verdict of each model, machine-readable: ``<reports dir>/<model>/latest.json``.

Written after every report that reached a verdict (exit code 0 or 1), atomically: a temporary file in the
same folder, then a rename, so a reader never sees half a file. A report that could not judge (exit code
2) leaves the previous file in place; ``finished_at`` says how old it is.

The format is stable, since the service exports it as Prometheus gauges: fields may be added, never renamed
or removed::

    {
      "model": "breast_cancer",                BentoML model name
      "version": "nxn7sohhek4zaax4",           BentoML model version that was judged
      "registered_version": "1",               its MLflow registered model version
      "mlflow_run_id": "e1e02fcafe11...",      the MLflow run that trained it
      "data_digest": "84ef6c2c",               MLflow digest of its training data
      "drift_detected": true,                  the verdict (exit code 1)
      "drift_share": 0.0667,                   drifted features / all features, 0 to 1
      "drifted_features": ["mean radius"],     in feature order
      "rows_compared": 1000,                   rows compared with the reference set
      "rows_seen": 1000,                       rows of this version in the window (>= rows_compared: sampled)
      "prediction_drift": false,               predicted labels or values, or class probabilities, drifted
      "finished_at": "2026-11-23T10:15:00+00:00",
      "report_dir": "/abs/path/reports/breast_cancer/nxn7sohhek4zaax4-20261123T101500Z"
    }
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

LATEST_FILE = "latest.json"


@dataclass(frozen=True)
class Summary:
    model: str
    version: str
    registered_version: str
    mlflow_run_id: str
    data_digest: str
    drift_detected: bool
    drift_share: float
    drifted_features: list[str]
    rows_compared: int
    rows_seen: int
    prediction_drift: bool
    finished_at: str
    report_dir: str


FIELDS = frozenset(Summary.__dataclass_fields__)


def write_latest(reports_dir: Path, summary: Summary) -> Path:
    path = reports_dir / summary.model / LATEST_FILE
    write_json(path, asdict(summary))
    return path


def read_latest(reports_dir: Path, model: str) -> dict[str, Any] | None:
    """The model's latest summary, or None when there is none or it cannot be read as one."""
    return read_json(reports_dir / model / LATEST_FILE, FIELDS)


def write_json(path: Path, data: dict[str, Any]) -> None:
    """Atomically: a reader sees the previous file or this one, never half of one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(
        "w", dir=path.parent, prefix=f".{path.stem}-", suffix=".tmp", delete=False, encoding="utf-8"
    ) as handle:
        try:
            json.dump(data, handle, indent=2)
            handle.flush()
            os.fsync(handle.fileno())
            Path(handle.name).replace(path)
        except BaseException:
            Path(handle.name).unlink(missing_ok=True)
            raise


def read_json(path: Path, fields: frozenset[str]) -> dict[str, Any] | None:
    """A JSON object with at least `fields`, or None when there is none or it cannot be read as one."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict) or not data.keys() >= fields:
        return None
    return data


# The latest live-performance verdict (drift/performance.py), beside latest.json, read the same way.
PERFORMANCE_FILE = "performance.json"


@dataclass(frozen=True)
class PerformanceSummary:
    model: str
    version: str
    registered_version: str
    mlflow_run_id: str
    data_digest: str
    metric: str
    greater_is_better: bool
    live_value: float
    reference_value: float
    max_drop: float
    degraded: bool
    labelled_rows: int
    rows_seen: int
    measured_accuracy: float | None
    estimated_accuracy: float | None
    finished_at: str
    report_dir: str


PERFORMANCE_FIELDS = frozenset(PerformanceSummary.__dataclass_fields__)


def read_latest_performance(reports_dir: Path, model: str) -> dict[str, Any] | None:
    """The model's latest performance summary, or None when there is none or it cannot be read as one."""
    return read_json(reports_dir / model / PERFORMANCE_FILE, PERFORMANCE_FIELDS)


def lineage_line(summary: Summary | PerformanceSummary) -> str:
    """The first line a report prints: the judged version and where it came from."""
    return (
        f"{summary.model} {summary.version}: registered v{summary.registered_version}, "
        f"MLflow run {summary.mlflow_run_id}, data {summary.data_digest}"
    )
