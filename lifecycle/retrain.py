"""`retrain NAME`: check -> retrain -> gate -> promote -> notify, in one command that cron can run.

check: the latest drift and performance summaries of the champion's version (drift/summary.py: latest.json
and performance.json; those of older versions do not count), or `--force`, name the trigger:
"drift: mean radius, mean texture", "performance: roc_auc 0.7100 < 0.9431", "forced by ana: <reason>".
No trigger: nothing to do.

retrain: the table is the champion's original training data, found through its run's `training` dataset
input (source and digest; refused if the data at the source no longer has that digest) plus the labelled
live rows of the window: feedback joined to the prediction log by (request_id, row) for the champion's
version (drift/performance.py's join), in the champion's columns. It trains through the same candidates and
gate as `python train.py`, with the champion's options (metric, seed, split, folds, dropped columns); the
trigger is a run param, a run tag and a version tag, the live rows a dataset input of context `live`.

promote: only through the gate, trusted rows and dummy baseline included; a version that wins on the new
rows but loses on the champion's own (label noise or a change of concept) is never promoted here: the
webhook gets both scores and a person decides with `lifecycle promote`.

Idempotent: a finished run with the same trigger and the same labelled rows (the `retrain_key` run tag)
means nothing to do. A failure leaves the registry and the stores as they were (models/training.py).

Exit codes: 0 nothing to do, or promoted; 1 trained but refused by the gate; 2 cannot judge or error.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import mlflow
import pandas as pd
from mlflow import MlflowClient

from drift import alerts
from drift.logs import LogStats, LogTarget, find_log_files, parse_window
from drift.performance import find_feedback_files, read_feedback, read_labelled
from drift.summary import read_latest, read_latest_performance
from models import registry, store
from models.data import DEFAULT_SOURCE, Task
from models.errors import InputError
from models.evaluation import METRICS
from models.store import TARGET_COLUMN, StoredModel
from models.training import (
    RETRAIN_KEY_TAG,
    TRAINING_CONTEXT,
    TrainingOptions,
    TrainingResult,
    live_dataset,
    retrain_key,
    train,
)
from settings import Settings

NOTHING_TO_DO = PROMOTED = 0
REFUSED = 1
CANNOT_JUDGE = 2


@dataclass(frozen=True)
class RetrainOptions:
    name: str
    force: bool
    reason: str
    by: str
    window: str  # how far back live rows count: 24h, 7d, all
    min_live_rows: int  # fewer labelled rows: trained on the original table alone
    margin: float
    tolerance: float
    webhook: str | None


def triggers(settings: Settings, champion: StoredModel) -> list[str]:
    """What in the latest reports of the champion's version calls for a retrain."""
    found = []
    version = champion.labels["registered_version"]
    drift = read_latest(settings.drift_reports_dir, champion.name)
    if drift and drift["registered_version"] == version and drift["drift_detected"]:
        found.append("drift: " + ", ".join(drift["drifted_features"]))
    performance = read_latest_performance(settings.drift_reports_dir, champion.name)
    if performance and performance["registered_version"] == version and performance["degraded"]:
        metric = METRICS[performance["metric"]]
        sign = -1 if metric.greater_is_better else 1
        limit = performance["reference_value"] + sign * performance["max_drop"]
        relation = "<" if metric.greater_is_better else ">"
        found.append(f"performance: {metric.name} {performance['live_value']:.4f} {relation} {limit:.4f}")
    return found


def labelled_rows(settings: Settings, champion: StoredModel, window: str, target: str) -> pd.DataFrame:
    """The champion's live rows of the window that got a label, in its feature columns and `target`."""
    span = parse_window(window, None, datetime.now(UTC))
    classes = champion.classes
    feedback = read_feedback(
        find_feedback_files(settings.feedback_dir), span, classes is not None, LogStats()
    )
    live = read_labelled(find_log_files(settings.log_dir), LogTarget.of(champion), span, feedback)
    rows = live.labelled
    labels = rows[TARGET_COLUMN]
    if classes is not None:  # feedback carries labels as text; the table has the classes' own type
        by_text = {str(label): label for label in classes}
        rows = rows[labels.map(str).isin(by_text)]  # a label of no known class cannot be learnt
        labels = rows[TARGET_COLUMN].map(lambda label: by_text[str(label)])
    features = [feature.name for feature in champion.schema.features]
    table = rows[features].assign(**{target: labels})
    # In the order of their values, not of the log files: which worker logged a row must not change the
    # table, its digest or the held-out draw of the retrain.
    return table.sort_values([*features, target], kind="stable").reset_index(drop=True)


def original_data(client: MlflowClient, run_id: str) -> tuple[Path | None, str]:
    """Where the champion's training table came from (None: the bundled data) and its recorded digest."""
    inputs = client.get_run(run_id).inputs
    for item in inputs.dataset_inputs if inputs else []:
        if any(tag.key == "mlflow.data.context" and tag.value == TRAINING_CONTEXT for tag in item.tags):
            uri = str(json.loads(item.dataset.source).get("uri", ""))
            return (None if uri == DEFAULT_SOURCE else Path(uri)), str(item.dataset.digest)
    raise InputError(f"run {run_id} records no training dataset: retrain it by hand with `python train.py`")


def earlier_run(key: str) -> str | None:
    """A finished run of a retrain with the same key, or None."""
    runs = mlflow.search_runs(
        search_all_experiments=True,
        filter_string=f"tags.{RETRAIN_KEY_TAG} = '{key}' and attributes.status = 'FINISHED'",
        output_format="list",
        max_results=1,
    )
    return runs[0].info.run_id if runs else None


def retrain(options: RetrainOptions, settings: Settings, say: Callable[[str], None]) -> int:
    store.check_writable(settings.bentoml_home)  # before anything: the champion is fetched into it
    client = registry.connect(settings)
    champion = registry.current_champion(client, options.name)
    if champion is None:
        raise InputError(f"'{options.name}' has no champion: train one with `python train.py`")
    stored = registry.fetch_version(client, options.name, champion.version)
    found = triggers(settings, stored)
    if options.force:
        found.insert(0, f"forced by {options.by}: {options.reason or '-'}")
    if not found:
        say(f"nothing to do: the latest reports of champion v{champion.version} show no drift or degradation")
        return NOTHING_TO_DO
    trigger = "; ".join(found)
    say(f"trigger: {trigger}")

    run = client.get_run(champion.run_id)
    params = run.data.params
    target = str(champion.card["target"])
    rows = labelled_rows(settings, stored, options.window, target)
    if len(rows) < options.min_live_rows:
        say(f"{len(rows)} labelled live rows (fewer than {options.min_live_rows}): not added")
        rows = rows.iloc[0:0]
    source, digest = original_data(client, champion.run_id)
    features = [feature.name for feature in stored.schema.features]
    live_digest = live_dataset(rows, options.name, features, target).digest if len(rows) else "-"
    key = retrain_key(trigger, live_digest)
    previous = earlier_run(key)
    if previous is not None:
        say(f"nothing to do: run {previous} already retrained for this trigger and these labelled rows")
        return NOTHING_TO_DO

    dropped = params.get("dropped_columns", "-")
    result = train(
        TrainingOptions(
            data=source,
            target=None if source is None else target,
            name=options.name,
            drop=() if dropped == "-" else tuple(dropped.split(",")),
            task=Task(params["task"]),
            metric=params["metric"],
            margin=options.margin,
            tolerance=options.tolerance,
            seed=int(params["seed"]),
            test_size=float(params["test_size"]),
            cv_folds=int(params["cv_folds"]),
            live_rows=rows if len(rows) else None,
            trigger=trigger,
            expected_digest=digest,
        ),
        settings,
        progress=say,
    )
    if result.decision.promote:
        registry.fetch_version(client, options.name, result.registered_version)
        say(f"promoted: v{result.registered_version} is the champion ({result.decision.reason})")
        code = PROMOTED
    else:
        say(f"not promoted: v{result.registered_version} stays challenger ({result.decision.reason})")
        code = REFUSED
    if options.webhook:
        delivery = alerts.post(options.webhook, message(result, trigger))
        say(f"alert {'sent' if delivery.ok else 'FAILED'}: {delivery.detail}")
    return code


def message(result: TrainingResult, trigger: str) -> str:
    """The webhook's text: the outcome with the scores on both sets of held-out rows."""
    figures = result.gate_figures
    scores = []
    for rows, label in (("new_rows", "new held-out rows"), ("trusted_rows", "champion's own held-out rows")):
        if f"{rows}_new" in figures:
            champion = figures.get(f"{rows}_champion")
            versus = f" vs champion {champion:.4f}" if champion is not None else ""
            scores.append(f"{label}: {result.metric} new {figures[f'{rows}_new']:.4f}{versus}")
    outcome = (
        f"v{result.registered_version} promoted"
        if result.decision.promote
        else f"v{result.registered_version} NOT promoted, champion stays v{result.champion_after}"
    )
    text = f"Retrain of {result.name} ({trigger}): {outcome}. {'; '.join(scores)}."
    text += f" Gate: {result.decision.reason}."
    if not result.decision.promote:
        text += (
            f" A person decides: python -m lifecycle promote {result.name} {result.registered_version} "
            "--reason '...' [--force]"
        )
    return text
