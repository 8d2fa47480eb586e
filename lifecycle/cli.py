"""The model lifecycle.

\b
    python -m lifecycle status                          # the served model's registered versions
    python -m lifecycle status breast_cancer --url http://127.0.0.1:3000
    python -m lifecycle promote breast_cancer 4 --reason "concept changed: new labelling rule"
    python -m lifecycle rollback breast_cancer --reason "v4 misbehaves in production"
    python -m lifecycle retrain breast_cancer --window 24h    # from cron: exit 0 / 1 / 2
    python -m lifecycle schedule breast_cancer --every 6h     # long-lived
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import asdict
from datetime import UTC, datetime
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from drift.logs import parse_window
from drift.schedule import parse_interval, run_every
from drift.shadow import ShadowComparison, compare_shadow
from lifecycle import promotion
from lifecycle.retrain import CANNOT_JUDGE, RetrainOptions, retrain
from lifecycle.status import Served, served, serving_verdict, versions
from models import registry
from models.errors import InputError
from settings import Settings, get_settings

app = typer.Typer(
    add_completion=False,
    rich_markup_mode=None,
    pretty_exceptions_enable=False,
    no_args_is_help=True,
    help=__doc__,
)
# As train.py: our progress lines instead of MLflow's INFO lines and download bars.
logging.getLogger("mlflow").setLevel(logging.ERROR)
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
out = Console(highlight=False, soft_wrap=True)
err = Console(stderr=True, highlight=False, soft_wrap=True)


Name = Annotated[str | None, typer.Argument(help="Registered model name. Default: TABSERVE_MODEL_NAME.")]
By = Annotated[str | None, typer.Option(help="Who makes the move, for the record. Default: the user name.")]
Margin = Annotated[
    float, typer.Option(help="How much the version must beat the champion by on its held-out rows.")
]
Tolerance = Annotated[
    float,
    typer.Option(help="How much worse than the champion it may score on the champion's own held-out rows."),
]
Webhook = Annotated[
    str | None,
    typer.Option(
        help="Slack- or Discord-compatible webhook told of every retrain's outcome, with both "
        "scores. Default: TABSERVE_DRIFT_WEBHOOK_URL."
    ),
]
Window = Annotated[
    str, typer.Option(help="How far back labelled live rows count: a duration (24h, 7d) or 'all'.")
]
MinLiveRows = Annotated[
    int, typer.Option(min=2, help="Fewest labelled live rows worth adding; fewer: the original table alone.")
]


@app.callback()
def lifecycle() -> None:
    """Move, inspect and retrain a model's champion."""


@app.command()
def status(
    name: Name = None,
    url: Annotated[
        str | None, typer.Option(help="A running service to ask what it serves, e.g. http://127.0.0.1:3000")
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")] = False,
    shadow_window: Annotated[
        str,
        typer.Option(help="How far back the shadow challenger's rows count: a duration (24h, 7d) or 'all'."),
    ] = "24h",
) -> None:
    """The registered versions (newest first) with aliases, held-out score and promotion decision, the
    moves of the champion alias, and how the shadow challenger compares with the champion on live rows
    (TABSERVE_SHADOW); with --url, whether that service serves the champion (exit 1 if it does not, or
    does not answer)."""
    settings = get_settings()
    model = name or settings.model_name
    try:
        found = versions(registry.connect(settings), model)
        window = parse_window(shadow_window, None, datetime.now(UTC))
    except InputError as exc:
        err.print(f"error: {exc}")
        raise typer.Exit(2) from None
    service: Served | None = served(url) if url else None
    serves_champion, verdict = serving_verdict(found, service) if service else (True, None)
    moves = promotion.history(model)
    shadow = compare_shadow(settings.log_dir, settings.feedback_dir, window)
    if as_json:
        document: dict[str, Any] = {
            "model": model,
            "versions": [asdict(status) for status in found],
            "moves": [asdict(move) for move in moves],
            "shadow": asdict(shadow) if shadow.rows else None,
        }
        if service is not None:
            document |= {"served": service.answer, "verdict": verdict}
        out.print_json(json.dumps(document))
    else:
        table = Table(title=f"{model}: registered versions", title_justify="left")
        for column in ("version", "aliases", "created (UTC)", "held-out score", "promotion", "bento tag"):
            table.add_column(column, overflow="fold")
        for item in found:
            created = datetime.fromtimestamp(item.created_ms / 1000, UTC).strftime("%Y-%m-%d %H:%M")
            score = f"{item.metric} {item.score:.4f}" if item.score is not None else "-"
            aliases = ", ".join(item.aliases) or "-"
            table.add_row(f"v{item.version}", aliases, created, score, item.promotion, item.bento_tag)
        out.print(table)
        for item in found:
            trigger = f" (trigger: {item.trigger})" if item.trigger != "-" else ""
            out.print(f"v{item.version}: {item.reason}{trigger}")
        for move in moves:
            forced = " (forced)" if move.forced else ""
            out.print(
                f"{move.at} {move.kind}{forced} v{move.from_version or '-'} -> v{move.to_version} "
                f"by {move.by}: {move.reason}"
            )
        if shadow.rows:
            out.print(shadow_line(shadow))
        if verdict:
            out.print(verdict)
    if not serves_champion:
        raise typer.Exit(1)


@app.command()
def promote(
    name: Annotated[str, typer.Argument(help="Registered model name.")],
    version: Annotated[str, typer.Argument(help="The registered version to make champion.")],
    reason: Annotated[str, typer.Option(help="Why, for the record (required with --force).")] = "",
    force: Annotated[bool, typer.Option(help="Promote even if the gate says no (needs --reason).")] = False,
    by: By = None,
    margin: Margin = 0.0,
    tolerance: Tolerance = 0.02,
) -> None:
    """Make VERSION the champion if it passes the training gate against the current champion (exit 0);
    refused: exit 1; cannot judge (unknown version, damaged files or held-out rows): exit 2."""
    settings = get_settings()

    def move(client: Any) -> promotion.Move | promotion.Refusal:
        return promotion.promote(
            client, name, version, reason, promotion.who(by), force, margin, tolerance, err.print
        )

    _report(settings, move)


@app.command()
def rollback(
    name: Name = None,
    reason: Annotated[str, typer.Option(help="Why, for the record.")] = "",
    by: By = None,
) -> None:
    """Move the champion alias back to the version that held it before (exit 0), if that version's files
    and held-out rows are intact, its schema and classes fit, and it beats the dummy baseline on its own
    held-out rows; refused: exit 1; nothing to roll back to: exit 2."""
    settings = get_settings()
    model = name or settings.model_name
    _report(settings, lambda client: promotion.rollback(client, model, reason, promotion.who(by), err.print))


def shadow_line(shadow: ShadowComparison) -> str:
    champions = ", ".join(f"v{version}" for version in shadow.champion_versions)
    if shadow.agreement is not None:
        compared = f"agreed with champion {champions} on {shadow.agreement:.1%} of {shadow.rows:,} rows"
    else:
        compared = f"differed from champion {champions} by {shadow.mean_abs_difference:.4g} on average over "
        compared += f"{shadow.rows:,} rows"
    line = f"shadow: challenger v{shadow.challenger_version} {compared}"
    if shadow.labelled_rows:
        line += (
            f"; on {shadow.labelled_rows:,} labelled rows, {shadow.metric} champion "
            f"{shadow.champion_metric:.4f}, challenger {shadow.challenger_metric:.4f}"
        )
    return line


def _report(settings: Settings, move: Any) -> None:
    try:
        outcome = move(registry.connect(settings))
    except InputError as exc:
        err.print(f"error: {exc}")
        raise typer.Exit(2) from None
    if isinstance(outcome, promotion.Refusal):
        err.print(f"refused: {outcome.reason}")
        raise typer.Exit(1)
    forced = " (forced)" if outcome.forced else ""
    out.print(
        f"{outcome.kind}{forced}: {outcome.model} champion v{outcome.from_version or '-'} -> "
        f"v{outcome.to_version}, by {outcome.by} at {outcome.at}: {outcome.reason}; recorded in MLflow run "
        f"{outcome.run_id}"
    )
    out.print(f"gate: {outcome.gate_reason}")


@app.command(name="retrain")
def retrain_command(
    name: Name = None,
    force: Annotated[bool, typer.Option(help="Retrain without a trigger in the reports.")] = False,
    reason: Annotated[str, typer.Option(help="Why, with --force: part of the recorded trigger.")] = "",
    by: By = None,
    window: Window = "24h",
    min_live_rows: MinLiveRows = 30,
    margin: Margin = 0.0,
    tolerance: Tolerance = 0.02,
    webhook: Webhook = None,
) -> None:
    """Check the latest drift and performance reports of the champion; on a trigger (or --force) retrain
    on its original data plus the labelled live rows, through the gate. Exit 0: nothing to do or
    promoted; 1: trained, refused by the gate; 2: cannot judge or error."""
    settings = get_settings()
    try:
        options = _retrain_options(
            settings, name, force, reason, by, window, min_live_rows, margin, tolerance, webhook
        )
    except InputError as exc:
        err.print(f"error: {exc}")
        raise typer.Exit(CANNOT_JUDGE) from None
    raise typer.Exit(_retrain_once(options, settings))


@app.command()
def schedule(
    name: Name = None,
    every: Annotated[str, typer.Option(help="Interval between retrain checks: 30m, 6h, 1d, ...")] = "6h",
    force: Annotated[bool, typer.Option(help="Retrain at every interval, trigger or not.")] = False,
    window: Window = "24h",
    min_live_rows: MinLiveRows = 30,
    margin: Margin = 0.0,
    tolerance: Tolerance = 0.02,
    webhook: Webhook = None,
) -> None:
    """Run `retrain` now and then at every interval, in this process, until SIGTERM or Ctrl-C."""
    settings = get_settings()
    try:
        interval = parse_interval(every)
        reason = f"schedule every {every}"
        options = _retrain_options(
            settings, name, force, reason, "schedule", window, min_live_rows, margin, tolerance, webhook
        )
    except InputError as exc:
        err.print(f"error: {exc}")
        raise typer.Exit(CANNOT_JUDGE) from None

    def one_run() -> None:
        err.print(f"retrain finished with exit code {_retrain_once(options, settings)}")

    run_every(interval, one_run, err.print)


def _retrain_options(
    settings: Settings,
    name: str | None,
    force: bool,
    reason: str,
    by: str | None,
    window: str,
    min_live_rows: int,
    margin: float,
    tolerance: float,
    webhook: str | None,
) -> RetrainOptions:
    parse_window(window, None, datetime.now(UTC))  # a bad window fails now, not at every run
    url = webhook or settings.drift_webhook_url
    if url and not url.startswith(("http://", "https://")):
        raise InputError(f"--webhook must be an http:// or https:// URL, got {url!r}")
    return RetrainOptions(
        name=name or settings.model_name,
        force=force,
        reason=reason,
        by=promotion.who(by),
        window=window,
        min_live_rows=min_live_rows,
        margin=margin,
        tolerance=tolerance,
        webhook=url,
    )


def _retrain_once(options: RetrainOptions, settings: Settings) -> int:
    try:
        return retrain(options, settings, err.print)
    except InputError as exc:
        err.print(f"error: {exc}")
        return CANNOT_JUDGE
