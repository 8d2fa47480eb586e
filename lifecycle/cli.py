"""The model lifecycle.

\b
    python -m lifecycle status                          # the served model's registered versions
    python -m lifecycle status breast_cancer --url http://127.0.0.1:3000
"""

from __future__ import annotations

import json
from dataclasses import asdict
from datetime import UTC, datetime
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from lifecycle.status import Served, served, serving_verdict, versions
from models import registry
from models.errors import InputError
from settings import get_settings

app = typer.Typer(
    add_completion=False,
    rich_markup_mode=None,
    pretty_exceptions_enable=False,
    no_args_is_help=True,
    help=__doc__,
)
out = Console(highlight=False, soft_wrap=True)
err = Console(stderr=True, highlight=False, soft_wrap=True)


@app.callback()
def lifecycle() -> None:
    """Subcommands, even while there is only one."""


@app.command()
def status(
    name: Annotated[
        str | None, typer.Argument(help="Registered model name. Default: TABSERVE_MODEL_NAME.")
    ] = None,
    url: Annotated[
        str | None, typer.Option(help="A running service to ask what it serves, e.g. http://127.0.0.1:3000")
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")] = False,
) -> None:
    """The registered versions (newest first) with aliases, held-out score and promotion decision; with
    --url, whether that service serves the champion (exit 1 if it does not, or does not answer)."""
    settings = get_settings()
    model = name or settings.model_name
    try:
        found = versions(registry.connect(settings), model)
    except InputError as exc:
        err.print(f"error: {exc}")
        raise typer.Exit(2) from None
    service: Served | None = served(url) if url else None
    serves_champion, verdict = serving_verdict(found, service) if service else (True, None)
    if as_json:
        document: dict[str, Any] = {"model": model, "versions": [asdict(status) for status in found]}
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
            out.print(f"v{item.version}: {item.reason}")
        if verdict:
            out.print(verdict)
    if not serves_champion:
        raise typer.Exit(1)
