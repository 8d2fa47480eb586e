"""Drift reports of live inputs against each model's reference set (Evidently), alerts, test traffic.

\b
    python -m drift report                     # the served model version, last 24 h of the prediction log
    python -m drift report --since 1h --webhook https://hooks.slack.com/services/...
    python -m drift performance --since 24h    # labelled live rows (feedback) against the reference set
    python -m drift schedule --every 1h        # the same report every hour, in one process
    python -m drift simulate shift --features "mean radius,mean texture" --k 2
    python -m drift bench                      # 1,000,000 logged rows: this job against bare Evidently
    python -m drift show-log --last 5          # the prediction log's latest rows, as JSON lines

Exit codes of report: 0 no drift, 1 drift, 2 cannot judge (too few rows, no log, unknown model version).
Exit codes of performance: 0 healthy, 1 degraded, 2 cannot judge (too few labelled rows, no log, unknown
model version).
"""

from __future__ import annotations

import heapq
import secrets
import sys
import time
from collections.abc import Callable, Iterable
from datetime import UTC, datetime
from operator import itemgetter
from pathlib import Path
from typing import Annotated, Any

import orjson
import typer
from rich.console import Console

from drift import bench as benchmark
from drift import simulate as traffic
from drift.job import CANNOT_JUDGE, ReportOptions, run_report
from drift.logs import find_log_files, log_records, parse_window
from drift.performance import PerformanceOptions, run_performance
from drift.schedule import parse_interval, run_every
from models.errors import InputError, first_line
from models.registry import served_model
from models.store import StoredModel
from settings import Settings, get_settings

app = typer.Typer(
    add_completion=False,
    rich_markup_mode=None,
    pretty_exceptions_enable=False,
    no_args_is_help=True,
    help=__doc__,
)
out = Console(highlight=False, soft_wrap=True)
err = Console(stderr=True, highlight=False, soft_wrap=True)

Model = Annotated[
    str | None,
    typer.Option(
        "--model",
        help="BentoML tag of the model version. Default: the served one (TABSERVE_MODEL_TAG, else the "
        "registry's champion of TABSERVE_MODEL_NAME).",
    ),
]
LogDir = Annotated[
    Path | None,
    typer.Option(
        help="Prediction log directory. Default: TABSERVE_PREDICTION_LOG_DIR or <data dir>/predictions."
    ),
]
Files = Annotated[
    list[Path] | None,
    typer.Option("--file", help="Log file to read instead of the log directory (repeatable)."),
]
Until = Annotated[
    str | None, typer.Option(help="Window end: a duration before now (1h) or an ISO time. Default: now.")
]
MaxRows = Annotated[
    int | None,
    typer.Option(
        min=10,
        help="Most rows compared; a larger window is reservoir-sampled. "
        "Default: TABSERVE_DRIFT_MAX_ROWS (100000).",
    ),
]
MinRows = Annotated[
    int | None,
    typer.Option(min=1, help="Fewest rows judged; fewer exit 2. Default: TABSERVE_DRIFT_MIN_ROWS (50)."),
]
DriftShare = Annotated[
    float | None,
    typer.Option(
        min=0.0,
        max=1.0,
        help="Share of drifted features that means drift (0: any one feature; 0.5: Evidently's dataset "
        "drift rule). Default: TABSERVE_DRIFT_SHARE (0).",
    ),
]
Seed = Annotated[
    int, typer.Option(help="Seed of the sample taken when the window has more than --max-rows rows.")
]
Webhook = Annotated[
    str | None,
    typer.Option(
        help="Slack- or Discord-compatible webhook URL to alert when drift is found. "
        "Default: TABSERVE_DRIFT_WEBHOOK_URL."
    ),
]


@app.command()
def report(
    model: Model = None,
    log_dir: LogDir = None,
    file: Files = None,
    since: Annotated[
        str | None,
        typer.Option(
            help="Window start: a duration before now (24h, 90m, 7d), an ISO time, or 'all'. "
            "Default: 24h; all with --file."
        ),
    ] = None,
    until: Until = None,
    max_rows: MaxRows = None,
    min_rows: MinRows = None,
    drift_share: DriftShare = None,
    seed: Seed = 0,
    webhook: Webhook = None,
) -> None:
    """Compare a window of the prediction log with the model version's reference set.

    Writes report.html and report.json under the reports directory, latest.json beside them, and a
    snapshot to the Evidently workspace; prints a summary. Exit 0: no drift, 1: drift, 2: cannot judge.
    """
    settings = get_settings()
    code = _guarded(
        lambda: run_report(
            _options(
                settings, model, log_dir, file, since, until, max_rows, min_rows, drift_share, seed, webhook
            ),
            settings,
            out.print,
        )
    )
    raise typer.Exit(code)


@app.command()
def performance(
    model: Model = None,
    log_dir: LogDir = None,
    feedback_dir: Annotated[
        Path | None,
        typer.Option(
            help="Feedback log directory. Default: TABSERVE_FEEDBACK_LOG_DIR or <data dir>/feedback."
        ),
    ] = None,
    since: Annotated[
        str | None,
        typer.Option(
            help="Window start: a duration before now (24h, 90m, 7d), an ISO time, or 'all'. Default: 24h."
        ),
    ] = None,
    until: Until = None,
    min_rows: Annotated[
        int | None,
        typer.Option(
            min=1,
            help="Fewest labelled rows judged; fewer exit 2. Default: TABSERVE_PERFORMANCE_MIN_ROWS (50).",
        ),
    ] = None,
    max_drop: Annotated[
        float | None,
        typer.Option(
            min=0.0,
            help="How much worse than on the reference rows the model's metric may be, in metric units. "
            "Default: TABSERVE_PERFORMANCE_MAX_DROP (0.05).",
        ),
    ] = None,
    webhook: Annotated[
        str | None,
        typer.Option(
            help="Slack- or Discord-compatible webhook URL to alert when performance degraded. "
            "Default: TABSERVE_DRIFT_WEBHOOK_URL."
        ),
    ] = None,
) -> None:
    """Judge the model version on the live rows that got a label (feedback joined by request id and row).

    Writes report.html, report.json and summary.json under the reports directory, performance.json beside
    them, and a snapshot to the Evidently workspace; prints the verdict beside the accuracy estimated from
    the probabilities of all rows. Exit 0: healthy, 1: degraded, 2: cannot judge.
    """
    settings = get_settings()

    def run() -> int:
        options = PerformanceOptions(
            model_tag=model or served_tag(settings),
            log_dir=log_dir or settings.log_dir,
            feedback_dir=feedback_dir or settings.feedback_dir,
            since=since,
            until=until,
            min_rows=min_rows or settings.performance_min_rows,
            max_drop=settings.performance_max_drop if max_drop is None else max_drop,
            webhook=_webhook(webhook, settings),
        )
        return run_performance(options, settings, out.print)

    raise typer.Exit(_guarded(run))


@app.command()
def schedule(
    every: Annotated[str, typer.Option(help="Interval between reports: 30m, 1h, 1d, ...")] = "1h",
    model: Model = None,
    log_dir: LogDir = None,
    file: Files = None,
    since: Annotated[
        str | None,
        typer.Option(
            help="Window start of each report: a duration before its start (24h), an ISO time, or 'all'. "
            "Default: --every, so that each report judges the rows since the previous one."
        ),
    ] = None,
    until: Until = None,
    max_rows: MaxRows = None,
    min_rows: MinRows = None,
    drift_share: DriftShare = None,
    seed: Seed = 0,
    webhook: Webhook = None,
) -> None:
    """Run the report now and then at every interval, in this process, until SIGTERM or Ctrl-C."""
    settings = get_settings()
    try:
        interval = parse_interval(every)
        window = since if since is not None else every
        parse_window(window, until, datetime.now(UTC))  # bad options fail now, not at every run
        options = _options(
            settings, model, log_dir, file, window, until, max_rows, min_rows, drift_share, seed, webhook
        )
    except InputError as exc:
        err.print(f"error: {exc}", style="red")
        raise typer.Exit(CANNOT_JUDGE) from None

    def one_report() -> None:
        code = _guarded(lambda: run_report(options, settings, out.print))
        err.print(f"report finished with exit code {code}")

    run_every(interval, one_report, err.print)


def _options(
    settings: Settings,
    model: str | None,
    log_dir: Path | None,
    files: list[Path] | None,
    since: str | None,
    until: str | None,
    max_rows: int | None,
    min_rows: int | None,
    drift_share: float | None,
    seed: int,
    webhook: str | None,
) -> ReportOptions:
    return ReportOptions(
        model_tag=model or served_tag(settings),
        log_dir=log_dir or settings.log_dir,
        files=tuple(files or ()),
        since=since,
        until=until,
        max_rows=max_rows or settings.drift_max_rows,
        min_rows=min_rows or settings.drift_min_rows,
        drift_share=settings.drift_share if drift_share is None else drift_share,
        seed=seed,
        webhook=_webhook(webhook, settings),
    )


def _webhook(webhook: str | None, settings: Settings) -> str | None:
    url = webhook or settings.drift_webhook_url
    if url and not url.startswith(("http://", "https://")):
        raise InputError(f"--webhook must be an http:// or https:// URL, got {url!r}")
    return url


@app.command()
def simulate(
    scenario: Annotated[traffic.Scenario, typer.Argument(help="What to change in the rows.")] = (
        traffic.Scenario.BASELINE
    ),
    rows: Annotated[int, typer.Option(min=1, max=1_000_000, help="Rows to send.")] = 1000,
    rate: Annotated[float, typer.Option(min=0.1, max=100_000, help="Most rows per second.")] = 50.0,
    batch: Annotated[
        int, typer.Option(min=1, max=10_000, help="Rows per request: 1 uses /predict, more /predict_batch.")
    ] = 1,
    url: Annotated[str, typer.Option(help="The service's HTTP address.")] = "http://127.0.0.1:3000",
    grpc: Annotated[
        str | None, typer.Option(help="Send over gRPC to this host:port instead, e.g. 127.0.0.1:3001.")
    ] = None,
    features: Annotated[
        str | None, typer.Option(help='Comma-separated features to change, e.g. "mean radius,mean texture".')
    ] = None,
    k: Annotated[
        float,
        typer.Option(
            help="shift: standard deviations to move the features by; concept (regression): the true value's."
        ),
    ] = 2.0,
    share: Annotated[float, typer.Option(min=0.0, max=1.0, help="Fraction of the rows to change.")] = 1.0,
    seed: Annotated[
        int | None,
        typer.Option(help="Seed for drawing and changing the rows. Default: a new one each run, printed."),
    ] = None,
    feedback: Annotated[
        float,
        typer.Option(
            min=0.0,
            max=1.0,
            help="Share of the answered rows whose true label (or value) is then sent to POST /feedback "
            "at --url (also with --grpc).",
        ),
    ] = 0.0,
    model: Model = None,
) -> None:
    """Send rows of the model's reference set, changed by a scenario, to a running service, and optionally
    their true labels after them."""
    settings = get_settings()
    chosen = [name.strip() for name in (features or "").split(",") if name.strip()]

    def run() -> int:
        stored = StoredModel.open(model or served_tag(settings))
        # A fresh seed by default: the same seed again sends the same rows, and repeated rows would make
        # the report's tests overconfident.
        chosen_seed = secrets.randbelow(2**31) if seed is None else seed
        plan = traffic.traffic(stored, scenario, rows, chosen, k, share, chosen_seed)
        sender: traffic.Sender = (
            traffic.GrpcSender(grpc, stored.schema) if grpc else traffic.HttpSender(url, batch)
        )
        try:
            sender.check(stored)
            for note in [*plan.notes, f"seed {chosen_seed} (--seed {chosen_seed} sends the same rows again)"]:
                err.print(note)
            err.print(
                f"sending {rows:,} rows to {sender.destination}, {batch} per request, at most {rate:g}/s"
            )
            tally = traffic.run(plan.frame, sender, batch, rate, _every(5.0, _progress))
        finally:
            sender.close()
        _print_tally(tally, batch)
        if not feedback:
            return 1 if tally.failed else 0
        labels = traffic.send_feedback(
            url, tally.answered, plan.truth, feedback, chosen_seed, regression=stored.classes is None
        )
        _print_feedback(labels)
        return 1 if tally.failed or labels.failed else 0

    raise typer.Exit(_guarded(run))


def _every(seconds: float, show: Callable[[traffic.Tally], None]) -> Callable[[traffic.Tally], None]:
    last = [time.monotonic()]

    def maybe(tally: traffic.Tally) -> None:
        if time.monotonic() - last[0] >= seconds:
            last[0] = time.monotonic()
            show(tally)

    return maybe


def _progress(tally: traffic.Tally) -> None:
    err.print(f"  {tally.accepted + tally.refused + tally.failed + tally.skipped:,} rows sent")


def _print_tally(tally: traffic.Tally, batch: int) -> None:
    sent = tally.accepted + tally.refused + tally.failed + tally.skipped
    speed = sent / tally.seconds if tally.seconds else 0.0
    stopped = " (interrupted)" if tally.interrupted else ""
    out.print(f"sent {sent:,} rows in {tally.requests:,} requests{stopped}")
    out.print(f"  in {tally.seconds:.1f} s ({speed:.0f} rows/s)")
    out.print(f"  accepted {tally.accepted:,} (answered, in the prediction log)")
    refused = f"  refused  {tally.refused:,} (bad input for the service, not logged)"
    if batch > 1 and tally.refused:
        refused += "; a batch is refused whole when one of its records is bad"
    out.print(refused)
    if tally.skipped:
        out.print(f"  skipped  {tally.skipped:,} (a missing text or boolean value cannot be sent over gRPC)")
    out.print(f"  failed   {tally.failed:,}")
    for reason, count in tally.reasons.most_common(5):
        out.print(f"    {count:,} rows: {reason}")


def _print_feedback(tally: traffic.FeedbackTally) -> None:
    out.print(f"feedback: sent {tally.sent:,} true labels in {tally.requests:,} request(s) to POST /feedback")
    out.print(f"  kept     {tally.kept:,} (in the feedback log)")
    out.print(f"  refused  {tally.refused:,} (the service's reasons below)")
    out.print(f"  failed   {tally.failed:,}")
    for reason, count in tally.reasons.most_common(5):
        out.print(f"    {count:,} labels: {reason}")


@app.command("show-log")
def show_log(
    log_dir: LogDir = None,
    file: Files = None,
    last: Annotated[
        int | None, typer.Option(min=1, help="Only the last N records (of the newest files).")
    ] = None,
) -> None:
    """Print the prediction log as JSON lines, one object per answered row, whichever format wrote it: for
    jq, grep and people. The log itself is Arrow record batches (serving/arrowlog.py)."""
    files = list(file or []) or find_log_files(log_dir or get_settings().log_dir)
    records: Iterable[dict[str, Any]] = log_records(files)
    if last is not None:  # held in memory: only the latest `last`
        records = sorted(heapq.nlargest(last, records, key=itemgetter("ts")), key=itemgetter("ts"))
    for record in records:
        sys.stdout.buffer.write(orjson.dumps(record) + b"\n")


@app.command()
def bench(
    rows: Annotated[int, typer.Option(min=1000, help="Rows in the generated log.")] = 1_000_000,
    directory: Annotated[
        Path | None, typer.Option("--dir", help="Where to write the log. Default: a temporary directory.")
    ] = None,
    keep: Annotated[bool, typer.Option(help="Keep the generated log and reports.")] = False,
    model: Model = None,
) -> None:
    """Time the report job end to end on a generated log against bare Evidently on the same rows in memory."""
    settings = get_settings()
    raise typer.Exit(
        _guarded(
            lambda: benchmark.run(model or served_tag(settings), rows, directory, keep, err.print, out.print)
        )
    )


@app.command("bench-bare", hidden=True)
def bench_bare(model: str, rows: int, seed: int, result: Path) -> None:
    """The bench's baseline, in its own process: DataDriftPreset on the generated rows, already in memory."""
    get_settings()
    benchmark.bare(model, rows, seed, result)


def served_tag(settings: Settings) -> str:
    """The version the service serves (the registry's champion), whose log rows the reports judge."""
    return served_model(settings)[0].tag


def _guarded(action: Callable[[], int]) -> int:
    """Bad input and unwritable places end in one line and exit code 2, never a traceback."""
    try:
        return action()
    except InputError as exc:
        err.print(f"error: {exc}", style="red")
    except OSError as exc:
        where = f" {exc.filename}" if exc.filename else ""
        err.print(f"error:{where} {exc.strerror or first_line(exc)}", style="red")
    return CANNOT_JUDGE
