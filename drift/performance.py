"""Live performance: the model's metric on labelled live rows against the reference set (Evidently), and an
estimate from its probabilities where labels are missing.

Feedback (one JSON line per label, written by the service's ``POST /feedback``) is joined to the prediction
log by ``(request_id, row)`` over the window, for the judged model version only. A later label of the same
row replaces an earlier one. Evidently's ``ClassificationPreset`` or ``RegressionPreset`` then compares the
labelled live rows with the reference rows (training rows with their true target and the model's
predictions). The verdict is on the model's own metric (``metric`` in its store metadata): degraded when the
live value is worse than the reference value by more than ``max_drop`` (in the metric's units).

The estimate (classification only) is confidence-based, in the spirit of CBPE: if the probabilities are
calibrated, a row's chance of being right is the probability of its predicted class, so the expected
accuracy is their mean over every logged row of the window, labelled or not. It needs no label, so it covers
the rows that have none; it is an estimate, and says nothing of a change of concept (the probabilities do
not know the labels moved). Exit codes: 0 healthy, 1 degraded, 2 cannot judge (raised as `InputError`).

``<reports dir>/<model>/performance.json`` keeps the latest verdict (fields may be added, never renamed)::

    {
      "model": "breast_cancer", "version": "nxn7sohhek4zaax4", "registered_version": "1",
      "mlflow_run_id": "e1e02fcafe11...", "data_digest": "84ef6c2c",
      "metric": "roc_auc",                     the model's metric (greater_is_better says its direction)
      "greater_is_better": true,
      "live_value": 0.9712,                    on the labelled live rows
      "reference_value": 0.9981,               on the reference rows
      "max_drop": 0.05,                        the allowed loss
      "degraded": false,                       the verdict (exit code 1)
      "labelled_rows": 114,                    live rows of this version with a label, in the window
      "rows_seen": 1000,                       live rows of this version in the window
      "measured_accuracy": 0.9561,             accuracy on the labelled rows (null for regression)
      "estimated_accuracy": 0.9702,            ESTIMATE on all rows seen (null for regression)
      "finished_at": "2026-11-23T10:15:00+00:00",
      "report_dir": "/abs/path/reports/breast_cancer/performance-nxn7sohhek4zaax4-20261123T101500Z"
    }
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Callable, Iterable
from contextlib import ExitStack
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import orjson
import pandas as pd
from sklearn.exceptions import UndefinedMetricWarning

from drift import alerts
from drift.job import new_report_dir
from drift.logs import (
    LogStats,
    LogTarget,
    Row,
    Window,
    find_log_files,
    log_lines,
    open_in_window,
    parse_window,
    rows_frame,
    rows_of_version,
)
from drift.summary import PERFORMANCE_FILE, PerformanceSummary, lineage_line, write_json
from models.errors import InputError
from models.evaluation import METRICS
from models.store import PREDICTION_COLUMN, PROBABILITY_PREFIX, TARGET_COLUMN, StoredModel
from settings import Settings

if TYPE_CHECKING:
    from evidently.core.report import Snapshot

HEALTHY, DEGRADED = 0, 1
FEEDBACK_FILE = re.compile(r"^feedback-.+\.jsonl(\.\d+)?$")
Key = tuple[str, int]  # (request_id, row)


@dataclass(frozen=True)
class PerformanceOptions:
    model_tag: str
    log_dir: Path
    feedback_dir: Path
    since: str | None  # None: 24h
    until: str | None
    min_rows: int
    max_drop: float
    webhook: str | None


def find_feedback_files(directory: Path) -> list[Path]:
    """Every worker's feedback log and its rotated copies, oldest copy first (as `find_log_files`)."""
    if not directory.is_dir():
        return []

    def order(path: Path) -> tuple[str, int]:
        stem, _, rotation = path.name.partition(".jsonl")
        return stem, -int(rotation[1:] or 0)

    return sorted((path for path in directory.iterdir() if FEEDBACK_FILE.match(path.name)), key=order)


def read_feedback(
    files: Iterable[Path], window: Window, classification: bool, stats: LogStats
) -> dict[Key, Any]:
    """The latest label of each (request_id, row): the one with the latest ``ts``, or the later line on a tie.

    A label is never older than its prediction, so files last modified before the window are not opened.
    """
    field = "label" if classification else "value"
    latest: dict[Key, tuple[datetime, Any]] = {}
    with ExitStack() as stack:
        handles = [stack.enter_context(h) for h in open_in_window(files, Window(since=window.since), stats)]
        for line in log_lines(handles, stats):
            try:
                record = orjson.loads(line)
                moment = datetime.fromisoformat(record["ts"])
                key = (record["request_id"], record["row"])
                label = record[field]
                valid = isinstance(key[0], str) and type(key[1]) is int
                valid &= isinstance(label, str) if classification else type(label) in (int, float)
            except (orjson.JSONDecodeError, TypeError, KeyError, ValueError):
                valid = False
            if not valid:
                stats.corrupt += 1
                continue
            moment = moment if moment.tzinfo else moment.replace(tzinfo=UTC)
            if key not in latest or moment >= latest[key][0]:
                latest[key] = (moment, label)
    return {key: label for key, (_, label) in latest.items()}


@dataclass(frozen=True)
class LiveRows:
    labelled: pd.DataFrame  # the log's columns (features, prediction, probabilities) and TARGET_COLUMN
    seen: int  # rows of the version in the window, labelled or not
    confidence: float | None  # mean probability of the predicted class over all rows seen (classification)
    stats: LogStats


def read_labelled(
    files: Iterable[Path], target: LogTarget, window: Window, feedback: dict[Key, Any]
) -> LiveRows:
    """Stream the window's rows of the version, keeping those with a label; every row counts in the estimate.

    A line without ``row`` (written before rows were numbered) takes its position among the consecutive
    lines of its ``request_id``: the service writes a request's lines together, in order.
    """
    stats = LogStats()
    kept: list[Row] = []
    truths: list[Any] = []
    confidence_sum, confident_rows = 0.0, 0
    previous_id, position = None, 0
    for request_id, logged_index, row in rows_of_version(files, target, window, stats):
        position = position + 1 if request_id == previous_id else 0
        previous_id = request_id
        index = position if logged_index is None else logged_index
        if target.classes is not None and np.isfinite(row[3]).all():  # without probabilities: no say
            confidence_sum += float(row[3].max())
            confident_rows += 1
        label = feedback.get((request_id, index)) if isinstance(request_id, str) else None
        if label is not None:
            kept.append(row)
            truths.append(label)
    stats.compared = len(kept)
    truth = pd.Series(truths, dtype=object if target.classes is not None else np.float64)
    frame = rows_frame(kept, target).assign(**{TARGET_COLUMN: truth})
    confidence = confidence_sum / confident_rows if confident_rows else None
    return LiveRows(labelled=frame, seen=stats.seen, confidence=confidence, stats=stats)


@dataclass(frozen=True)
class Evaluation:
    snapshot: Snapshot
    live_value: float
    reference_value: float
    live_accuracy: float | None


def evaluate(
    model: StoredModel, reference: pd.DataFrame, live: pd.DataFrame, name: str, metadata: dict[str, str]
) -> Evaluation:
    """Evidently's preset on the live rows against the reference rows, and the model's metric on both."""
    from evidently import (  # noqa: PLC0415  (seconds to import: see run_performance)
        BinaryClassification,
        DataDefinition,
        Dataset,
        MulticlassClassification,
        Regression,
        Report,
    )
    from evidently import metrics as ev  # noqa: PLC0415
    from evidently.presets import ClassificationPreset, RegressionPreset  # noqa: PLC0415

    metric = model.metadata["metric"]
    if model.classes is None:
        definition = DataDefinition(
            regression=[Regression(target=TARGET_COLUMN, prediction=PREDICTION_COLUMN)]
        )
        columns = [TARGET_COLUMN, PREDICTION_COLUMN]
        preset: Any = RegressionPreset()
        judged: Any = {"rmse": ev.RMSE, "mae": ev.MAE, "r2": ev.R2Score}[metric]()
    else:
        labels = [str(label) for label in model.classes]
        # Evidently names probability columns by their class; labels are compared as text, as in the log.
        renamed = {f"{PROBABILITY_PREFIX}{label}": label for label in labels}
        reference = reference.rename(columns=renamed)
        live = live.rename(columns=renamed)
        for frame in (reference, live):
            frame[TARGET_COLUMN] = frame[TARGET_COLUMN].map(str)
            frame[PREDICTION_COLUMN] = frame[PREDICTION_COLUMN].map(str)
        columns = [TARGET_COLUMN, PREDICTION_COLUMN, *labels]
        task: Any = (
            # The positive class is the second, as scikit-learn's roc_auc in training takes it.
            BinaryClassification(
                target=TARGET_COLUMN,
                prediction_labels=PREDICTION_COLUMN,
                prediction_probas=labels[1],
                pos_label=labels[1],
            )
            if len(labels) == 2
            else MulticlassClassification(
                target=TARGET_COLUMN, prediction_labels=PREDICTION_COLUMN, prediction_probas=labels
            )
        )
        definition = DataDefinition(classification=[task])
        preset = ClassificationPreset()
        judged = {
            "accuracy": ev.Accuracy,
            "f1_macro": ev.F1ByLabel,  # averaged over the classes below: macro F1
            "roc_auc": ev.RocAuc,
            "log_loss": ev.LogLoss,
        }[metric]()

    def dataset(frame: pd.DataFrame) -> Any:
        return Dataset.from_pandas(frame[columns], data_definition=definition)

    with warnings.catch_warnings():
        # Evidently's regression code warns of a pandas deprecation, and scikit-learn of R² on its one-row
        # groups; neither changes a figure the report or the verdict uses.
        warnings.simplefilter("ignore", FutureWarning)
        warnings.simplefilter("ignore", UndefinedMetricWarning)
        snapshot = Report([preset, judged], metadata=metadata, include_tests=True).run(
            dataset(live), dataset(reference), name=name
        )
        # The snapshot holds the current dataset's values only: the reference value is a run of its own.
        reference_run = Report([judged]).run(dataset(reference), None)
    accuracy = _value(snapshot, "Accuracy") if model.classes is not None else None
    return Evaluation(
        snapshot=snapshot,
        live_value=_value(snapshot, type(judged).__name__),
        reference_value=_value(reference_run, type(judged).__name__),
        live_accuracy=accuracy,
    )


def _value(snapshot: Snapshot, kind: str) -> float:
    [value] = [m["value"] for m in snapshot.dict()["metrics"] if m["config"]["type"].endswith(f":{kind}")]
    if isinstance(value, dict):  # by label (F1ByLabel: macro mean) or mean and std (MAE)
        return float(value["mean"]) if "mean" in value else float(np.mean(list(value.values())))
    return float(value)


def run_performance(options: PerformanceOptions, settings: Settings, say: Callable[[str], None]) -> int:
    started = datetime.now(UTC)
    window = parse_window(options.since if options.since is not None else "24h", options.until, started)
    model = StoredModel.open(options.model_tag)
    metric = METRICS[model.metadata["metric"]]
    files = find_log_files(options.log_dir)
    if not files:
        raise InputError(
            f"no prediction log in {options.log_dir} (files predictions-*.jsonl): is the service writing "
            "there? Set TABSERVE_PREDICTION_LOG_DIR or pass --log-dir"
        )
    feedback_stats = LogStats()
    feedback_files = find_feedback_files(options.feedback_dir)
    feedback = read_feedback(feedback_files, window, model.classes is not None, feedback_stats)
    live = read_labelled(files, LogTarget.of(model), window, feedback)
    labelled = len(live.labelled)
    if labelled < options.min_rows:
        raise InputError(
            f"cannot judge {model.tag}: {labelled} labelled rows of this version from {window.describe()} "
            f"(at least {options.min_rows} needed, --min-rows); {live.seen:,} rows seen, "
            f"{len(feedback):,} labels in {len(feedback_files)} feedback file(s) in {options.feedback_dir}"
        )

    lineage = model.lineage
    stamp = started.strftime("%Y%m%dT%H%M%SZ")
    header = {
        **lineage,
        "started": started.isoformat(timespec="seconds"),
        "window": window.describe(),
        "rows": f"{labelled:,} labelled of {live.seen:,} seen",
        "log": live.stats.describe(),
        "feedback": f"{len(feedback):,} labels; read {feedback_stats.describe()}",
    }
    # Imported here: evidently takes seconds to import, which runs that stop early should not pay.
    from drift import report  # noqa: PLC0415

    result = evaluate(
        model,
        model.load_reference(),
        live.labelled,
        f"{model.name} {model.version} performance {stamp}",
        header,
    )
    loss = -metric.improvement(result.live_value, result.reference_value)
    degraded = loss > options.max_drop
    directory = new_report_dir(
        settings.drift_reports_dir / model.name, f"performance-{model.version}-{stamp}"
    )
    summary = PerformanceSummary(
        **lineage,
        metric=metric.name,
        greater_is_better=metric.greater_is_better,
        live_value=round(result.live_value, 4),
        reference_value=round(result.reference_value, 4),
        max_drop=options.max_drop,
        degraded=degraded,
        labelled_rows=labelled,
        rows_seen=live.seen,
        measured_accuracy=None if result.live_accuracy is None else round(result.live_accuracy, 4),
        estimated_accuracy=None if live.confidence is None else round(live.confidence, 4),
        finished_at=datetime.now(UTC).isoformat(timespec="seconds"),
        report_dir=str(directory.resolve()),
    )
    report.save(result.snapshot, directory, header={**header, "verdict": verdict(summary)})
    # Evidently's JSON has no room for our figures: the summary goes beside it.
    write_json(directory / "summary.json", asdict(summary))
    write_json(settings.drift_reports_dir / model.name / PERFORMANCE_FILE, asdict(summary))
    report.add_to_workspace(
        result.snapshot,
        settings.evidently_workspace,
        project=model.name,
        description=f"Drift reports of {model.name}: live inputs against each version's reference set",
    )
    for line in _screen(summary, live, header["feedback"], window, settings):
        say(line)
    if degraded and options.webhook:
        delivery = alerts.post(options.webhook, alerts.performance_message(summary, window.describe()))
        if delivery.ok:
            say(f"alert sent to the webhook ({delivery.detail})")
        else:
            say(f"warning: the webhook failed after {delivery.attempts} attempts ({delivery.detail})")
    return DEGRADED if degraded else HEALTHY


def verdict(summary: PerformanceSummary) -> str:
    head = "DEGRADED" if summary.degraded else "healthy"
    return (
        f"{head}: {summary.metric} {summary.live_value:.4f} on {summary.labelled_rows:,} labelled live rows "
        f"vs {summary.reference_value:.4f} on the reference rows (at most {summary.max_drop:g} worse allowed)"
    )


def _screen(
    summary: PerformanceSummary, live: LiveRows, feedback: str, window: Window, settings: Settings
) -> list[str]:
    lines = [
        lineage_line(summary),
        f"window {window.describe()}: {summary.labelled_rows:,} labelled rows of {summary.rows_seen:,} seen",
        f"read {live.stats.describe()}",
        f"feedback: {feedback}",
        verdict(summary),
    ]
    if summary.estimated_accuracy is not None:
        lines.append(
            f"accuracy: measured {summary.measured_accuracy:.4f} on the labelled rows; ESTIMATED "
            f"{summary.estimated_accuracy:.4f} on all {summary.rows_seen:,} rows (mean probability of the "
            "predicted class: an estimate, assuming calibrated probabilities)"
        )
    lines += [
        f"report: {summary.report_dir}/report.html",
        f"summary: {settings.drift_reports_dir / summary.model / PERFORMANCE_FILE}",
        f"snapshots: evidently ui --workspace {settings.evidently_workspace}",
    ]
    return lines
