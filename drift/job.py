"""One drift report from start to finish, as `report` runs it once and `schedule` runs it repeatedly.

Open the model version, read its window of the prediction log, run the Evidently report, write the report
folder, latest.json and the workspace snapshot, print the summary, alert. Exit codes: 0 no drift, 1 drift,
2 cannot judge (raised as `InputError` with the reason).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING

from drift import alerts
from drift.logs import LogStats, LogTarget, Window, find_log_files, parse_window, read_log
from drift.summary import Summary, lineage_line, write_latest
from models.errors import InputError
from models.store import StoredModel
from settings import Settings

if TYPE_CHECKING:
    from drift.report import DriftResult

NO_DRIFT, DRIFT, CANNOT_JUDGE = 0, 1, 2
SHOWN = 10  # drifted features and quality findings listed on screen; the report has them all


@dataclass(frozen=True)
class ReportOptions:
    model_tag: str
    log_dir: Path
    files: tuple[Path, ...]  # explicit log files; when given, log_dir is not searched
    since: str | None  # None: 24h for the log directory, everything for explicit files
    until: str | None
    max_rows: int
    min_rows: int
    drift_share: float
    seed: int
    webhook: str | None


def run_report(options: ReportOptions, settings: Settings, say: Callable[[str], None]) -> int:
    started = datetime.now(UTC)
    since = options.since if options.since is not None else ("all" if options.files else "24h")
    window = parse_window(since, options.until, started)
    model = StoredModel.open(options.model_tag)
    missing = [path for path in options.files if not path.is_file()]
    if missing:
        raise InputError(f"no such log file: {missing[0]}")
    files = list(options.files) or find_log_files(options.log_dir)
    if not files:
        raise InputError(
            f"no prediction log in {options.log_dir} (files predictions-*.arrows): is the service writing "
            "there? Set TABSERVE_PREDICTION_LOG_DIR or pass --log-dir"
        )
    sample = read_log(files, LogTarget.of(model), window, options.max_rows, options.seed)
    stats = sample.stats
    if stats.seen < options.min_rows:
        raise InputError(
            f"cannot judge {model.tag}: {stats.seen} rows of this version from {window.describe()} "
            f"(at least {options.min_rows} needed, --min-rows); read {stats.describe()}"
        )

    # Imported here: evidently takes seconds to import, which runs that stop early should not pay.
    from drift import report  # noqa: PLC0415

    lineage = model.lineage
    stamp = started.strftime("%Y%m%dT%H%M%SZ")
    snapshot, result = report.build(
        model,
        model.load_reference(),
        sample.frame,
        options.drift_share,
        name=f"{model.name} {model.version} drift {stamp}",
        metadata={
            **lineage,
            "started": started.isoformat(timespec="seconds"),
            "window": window.describe(),
            "rows": _rows_text(stats),
            "log": stats.describe(),
        },
        tags=[model.name, model.version, f"v{lineage['registered_version']}"],
    )
    directory = new_report_dir(settings.drift_reports_dir / model.name, f"{model.version}-{stamp}")
    report.save(
        snapshot,
        directory,
        header={
            **lineage,
            "started": started.isoformat(timespec="seconds"),
            "window": window.describe(),
            "rows": _rows_text(stats),
            "log": stats.describe(),
            "verdict": _verdict(result),
        },
    )
    summary = Summary(
        **lineage,
        drift_detected=result.drift_detected,
        drift_share=round(result.drift_share, 4),
        drifted_features=result.drifted_features,
        rows_compared=stats.compared,
        rows_seen=stats.seen,
        prediction_drift=result.prediction_drift,
        finished_at=datetime.now(UTC).isoformat(timespec="seconds"),
        report_dir=str(directory.resolve()),
    )
    write_latest(settings.drift_reports_dir, summary)
    report.add_to_workspace(
        snapshot,
        settings.evidently_workspace,
        project=model.name,
        description=f"Drift reports of {model.name}: live inputs against each version's reference set",
    )
    for line in _screen(summary, result, stats, window, settings):
        say(line)
    if result.drift_detected and options.webhook:
        delivery = alerts.post(options.webhook, alerts.drift_message(summary, window.describe()))
        if delivery.ok:
            say(f"alert sent to the webhook ({delivery.detail})")
        else:
            say(f"warning: the webhook failed after {delivery.attempts} attempts ({delivery.detail})")
    return DRIFT if result.drift_detected else NO_DRIFT


def new_report_dir(parent: Path, name: str) -> Path:
    parent.mkdir(parents=True, exist_ok=True)
    for attempt in range(1, 100):
        directory = parent / (name if attempt == 1 else f"{name}-{attempt}")
        try:
            directory.mkdir()
        except FileExistsError:
            continue  # two reports in the same second
        return directory
    raise InputError(f"cannot create a report folder in {parent}")


def _rows_text(stats: LogStats) -> str:
    if stats.compared < stats.seen:
        return f"{stats.compared:,} compared: a uniform random sample of the window's {stats.seen:,} rows"
    return f"{stats.compared:,} compared (all rows in the window)"


def _verdict(result: DriftResult) -> str:
    drifted = len(result.drifted_features)
    rule = f"share {result.drift_share:.2f}; " + (
        f"threshold {result.threshold:g}" if result.threshold else "threshold: any drifted feature"
    )
    head = "DRIFT" if result.drift_detected else "no drift"
    return f"{head}: {drifted} of {len(result.feature_names)} features drifted ({rule})"


def _screen(
    summary: Summary, result: DriftResult, stats: LogStats, window: Window, settings: Settings
) -> list[str]:
    lines = [
        lineage_line(summary),
        f"window {window.describe()}: {_rows_text(stats)}",
        f"read {stats.describe()}",
        _verdict(result),
    ]
    scores = {column.column: column for column in result.features}
    for name in result.drifted_features[:SHOWN]:
        column = scores.get(name)
        lines.append(
            f"  {name:<28} {column.method} {column.score:.4g} (threshold {column.threshold:g})"
            if column
            else f"  {name:<28} no value in the window"
        )
    if len(result.drifted_features) > SHOWN:
        lines.append(f"  ... and {len(result.drifted_features) - SHOWN} more")
    drifted_predictions = [c for c in result.predictions if c.drifted]
    lines.append(
        "prediction drift: "
        + (
            ", ".join(f"{c.column} ({c.method} {c.score:.4g})" for c in drifted_predictions)
            if drifted_predictions
            else "none"
        )
    )
    for finding in result.quality[:SHOWN]:
        lines.append(
            f"data quality: {finding.column}: {finding.count:,} {finding.what} ({finding.share:.1%})"
        )
    if result.untested_features:
        lines.append(f"not tested (no value in the reference set): {', '.join(result.untested_features)}")
    lines += [
        f"report: {summary.report_dir}/report.html",
        f"summary: {settings.drift_reports_dir / summary.model / 'latest.json'}",
        f"snapshots: evidently ui --workspace {settings.evidently_workspace}",
    ]
    return lines
