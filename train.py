"""Train a tabular model, register it in MLflow, and promote it to the BentoML store if it beats the champion.

\b
    python train.py                                   # scikit-learn's breast-cancer data
    python train.py --data your.csv --target y        # your own CSV or Parquet table
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from models.data import Task
from models.errors import InputError
from models.evaluation import METRICS
from models.store import StoredModel
from models.training import TrainingOptions, TrainingResult, model_name, train
from settings import get_settings

app = typer.Typer(add_completion=False, rich_markup_mode=None, pretty_exceptions_enable=False)
console = Console(stderr=True, highlight=False, soft_wrap=True)
# Our progress lines say what MLflow's INFO lines and download bars would, once per stage; its warnings and
# errors still show.
logging.getLogger("mlflow").setLevel(logging.ERROR)
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")


@app.command(help=__doc__)
def main(
    data: Annotated[
        Path | None,
        typer.Option(help="CSV or Parquet training table. Default: scikit-learn's breast-cancer data."),
    ] = None,
    target: Annotated[
        str | None, typer.Option(help="Target column of --data (required with --data).")
    ] = None,
    name: Annotated[
        str | None,
        typer.Option(
            help="Registered model name, also the BentoML model name. Default: TABSERVE_MODEL_NAME for the "
            "bundled data, the file name for --data."
        ),
    ] = None,
    drop: Annotated[
        list[str] | None,
        typer.Option(help="Column of --data not to use as a feature (repeatable), e.g. an id."),
    ] = None,
    task: Annotated[
        Task, typer.Option(help="auto: classification for text, boolean or few-valued integer targets.")
    ] = Task.AUTO,
    metric: Annotated[
        str | None,
        typer.Option(
            help=f"Selection and promotion metric: one of {', '.join(METRICS)}. "
            "Default: roc_auc (classification), rmse (regression)."
        ),
    ] = None,
    margin: Annotated[
        float, typer.Option(help="How much the new version must beat the champion by, in metric units.")
    ] = 0.0,
    tolerance: Annotated[
        float,
        typer.Option(
            help="How much worse than the champion the new version may score on the champion's own held-out "
            "rows, as a share of the champion's score there (0.02: 2%)."
        ),
    ] = 0.02,
    force: Annotated[
        bool, typer.Option(help="Promote to champion even if the gate says no; recorded as a tag.")
    ] = False,
    seed: Annotated[
        int, typer.Option(help="Seed for the split, the folds, the models and the reference sample.")
    ] = 42,
    test_size: Annotated[
        float, typer.Option(help="Share of rows held out for the final test (0.05-0.5).")
    ] = 0.2,
    cv_folds: Annotated[
        int, typer.Option(min=2, max=20, help="Cross-validation folds for candidate selection.")
    ] = 5,
    estimator: Annotated[
        list[str] | None,
        typer.Option(
            help="Only this candidate family (repeatable): logistic_regression, random_forest, "
            "hist_gradient_boosting (classification); ridge, random_forest, hist_gradient_boosting "
            "(regression). Default: all, the best by cross-validation wins."
        ),
    ] = None,
    if_missing: Annotated[
        bool,
        typer.Option(
            help="Do nothing if the BentoML store already holds a model of this name (for `make serve`)."
        ),
    ] = False,
) -> None:
    options = TrainingOptions(
        data=data,
        target=target,
        name=name,
        drop=tuple(drop or ()),
        task=task,
        metric=metric,
        margin=margin,
        tolerance=tolerance,
        force=force,
        seed=seed,
        test_size=test_size,
        cv_folds=cv_folds,
        estimators=tuple(estimator or ()),
    )
    settings = get_settings()
    try:
        if if_missing and (stored := stored_model(model_name(options, settings))):
            console.print(f"{stored.tag} is in the BentoML store; not training (--if-missing)")
            return
        result = train(options, settings, progress=console.print)
    except InputError as exc:
        console.print(f"error: {exc}", style="red")
        raise typer.Exit(code=1) from None
    print_summary(result)


def print_summary(result: TrainingResult) -> None:
    table = Table(title=f"{result.name}: {result.task} in {result.seconds:.1f} s", show_header=False)
    table.add_row("chosen estimator", result.estimator)
    table.add_row(
        "test metrics", "  ".join(f"{key} {value:.4f}" for key, value in result.test_metrics.items())
    )
    table.add_row("mlflow run", result.run_id)
    table.add_row(
        "registered version", f"{result.name} v{result.registered_version} -> {result.decision.alias}"
    )
    table.add_row("gate", result.decision.reason)
    table.add_row(
        "champion before / after", f"{_version(result.champion_before)} / {_version(result.champion_after)}"
    )
    table.add_row("bentoml store", result.bento_tag or "unchanged (not promoted)")
    table.add_row("data digest", result.dataset_digest)
    Console().print(table)


def stored_model(name: str) -> StoredModel | None:
    try:
        return StoredModel.open(f"{name}:latest")
    except InputError:
        return None


def _version(version: str | None) -> str:
    return f"v{version}" if version else "none"


if __name__ == "__main__":
    app()
