"""One training run, stage by stage: data -> candidates -> held-out test -> gate -> registry -> BentoML store.

The held-out rows are kept with the run (and the store entry), so that when this version is champion the
gate can score later versions on them (models/gate.py).

Nothing is written before the data has been validated and both stores have been checked, and a failure
after registration removes the new version (and store entry) again, so a failed run leaves no version,
alias or stored model behind.
"""

from __future__ import annotations

import hashlib
import re
import tempfile
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import bentoml
import matplotlib.pyplot as plt
import mlflow
import pandas as pd
from mlflow import MlflowClient
from mlflow.data.pandas_dataset import PandasDataset, from_pandas
from sklearn.pipeline import Pipeline

from models import card as model_card
from models import registry, store
from models.candidates import candidates
from models.compiled import prove
from models.data import Table, Task, load_default, load_table, resolve_task, split, validate
from models.errors import InputError
from models.evaluation import (
    DEFAULT_METRIC,
    METRICS,
    CandidateScore,
    Metric,
    cross_validate,
    dummy_baseline,
    held_out_answers,
    plots,
    test_metrics,
)
from models.gate import ChampionScores, Decision, HeldOutScores, decide, decide_first
from models.schema import FeatureSchema
from settings import Settings

# BentoML tag names: lowercase letters, digits, '-', '_' and '.', starting and ending with a letter or digit.
MODEL_NAME = re.compile(r"^[a-z0-9]([a-z0-9._-]*[a-z0-9])?$")
# The run's record of the scorer proven for the model (models/compiled.py).
SCORER_RECORD = "scorer.json"
# The run's global importance of the input columns and its held-out evaluation's figure data (models/card.py).
IMPORTANCE_RECORD = "importance.json"
EVALUATION_RECORD = "evaluation.json"
# The run's record of the ONNX export (models/onnx_export.py), and where the ONNX model goes when proven.
ONNX_RECORD = "onnx.json"
ONNX_ARTIFACT = "onnx"
# A run's dataset inputs: the training table (its source and digest) and the labelled live rows added to it.
TRAINING_CONTEXT = "training"
LIVE_CONTEXT = "live"
# Run tag of a retrain: a retrain with the same key (trigger and labelled rows) already ran.
RETRAIN_KEY_TAG = "retrain_key"


@dataclass(frozen=True)
class TrainingOptions:
    data: Path | None = None
    target: str | None = None
    name: str | None = None
    drop: tuple[str, ...] = ()
    task: Task = Task.AUTO
    metric: str | None = None
    margin: float = 0.0
    tolerance: float = 0.02
    force: bool = False
    seed: int = 42
    test_size: float = 0.2
    cv_folds: int = 5
    # Candidate families to cross-validate (models/candidates.py names); empty: all of them.
    estimators: tuple[str, ...] = ()
    # Retraining (lifecycle/retrain.py): labelled live rows added to the table (its feature columns and
    # target), what set the retrain off, and the digest the table must still have.
    live_rows: pd.DataFrame | None = None
    trigger: str | None = None
    expected_digest: str | None = None


@dataclass(frozen=True)
class TrainingResult:
    name: str
    task: Task
    metric: str
    estimator: str
    candidates: list[CandidateScore]
    test_metrics: dict[str, float]
    run_id: str
    registered_version: str
    decision: Decision
    champion_before: str | None
    champion_after: str | None
    bento_tag: str | None
    dataset_digest: str
    gate_figures: dict[str, float] = field(default_factory=dict)
    seconds: float = field(default=0.0)


def model_name(options: TrainingOptions, settings: Settings) -> str:
    if options.name:
        name = options.name
    elif options.data is None:
        name = settings.model_name
    else:
        name = re.sub(r"[^a-z0-9]+", "_", options.data.stem.lower()).strip("_") or "model"
    if not MODEL_NAME.match(name):
        raise InputError(
            f"model name '{name}' is not valid: use lowercase letters, digits, '-', '_' and '.' "
            "(starting and ending with a letter or digit)"
        )
    return name


def chosen_candidates(task: Task, schema: FeatureSchema, options: TrainingOptions) -> dict[str, Pipeline]:
    """The candidates `options.estimators` names, or all of them."""
    pipelines = candidates(task, schema, options.seed)
    unknown = [name for name in options.estimators if name not in pipelines]
    if unknown:
        raise InputError(
            f"no {task.value} estimator {', '.join(map(repr, unknown))}; choose from {', '.join(pipelines)}"
        )
    return {name: pipelines[name] for name in options.estimators} if options.estimators else pipelines


def resolve_metric(requested: str | None, task: Task) -> Metric:
    name = requested or DEFAULT_METRIC[task]
    metric = METRICS.get(name)
    if metric is None or metric.task is not task:
        allowed = ", ".join(m.name for m in METRICS.values() if m.task is task)
        raise InputError(f"--metric '{name}' does not apply to {task}; choose one of: {allowed}")
    return metric


def train(options: TrainingOptions, settings: Settings, progress: Callable[[str], None]) -> TrainingResult:
    started = time.perf_counter()
    name = model_name(options, settings)
    if options.data is not None and not options.target:
        raise InputError("--data needs --target COLUMN")
    if not 0.05 <= options.test_size <= 0.5:
        raise InputError(f"--test-size must be between 0.05 and 0.5, got {options.test_size}")
    if not 0 <= options.tolerance < 1:
        raise InputError(f"--tolerance must be at least 0 and below 1, got {options.tolerance}")

    progress("Loading and checking the data")
    table = (
        load_default()
        if options.data is None
        else load_table(options.data, str(options.target), list(options.drop))
    )
    task = resolve_task(table.target, options.task)
    metric = resolve_metric(options.metric, task)
    table = validate(table, task, options.test_size, options.cv_folds)
    dataset = training_dataset(table, name)
    if options.expected_digest is not None and dataset.digest != options.expected_digest:
        raise InputError(
            f"the training data at {table.source} changed since the champion was trained: digest "
            f"{dataset.digest}, recorded {options.expected_digest}; retrain by hand with `python train.py`"
        )
    live = (
        None
        if options.live_rows is None
        else live_dataset(
            options.live_rows, name, list(map(str, table.features.columns)), str(table.target.name)
        )
    )
    # What the version's lineage names as its data: the table, and the live rows added to it.
    data_digest = dataset.digest
    # The table split as the champion's was (its seed and test size): a retrain never trains on the rows
    # the champion was tested on, so the gate's check on those trusted rows stays a fair test.
    parts = split(table, task, options.test_size, options.seed)
    if live is not None:
        progress(f"  adding {len(live.df)} labelled live rows (digest {live.digest})")
        live_table = Table(
            features=live.df[table.features.columns], target=live.df[table.target.name], source=table.source
        )
        table = validate(with_rows(table, live.df), task, options.test_size, options.cv_folds)
        parts = parts.joined(split(live_table, task, options.test_size, options.seed))
        data_digest = f"{dataset.digest}+{live.digest}"
    schema = FeatureSchema.infer(table.features)
    pipelines = chosen_candidates(task, schema, options)
    X_train, X_test = schema.prepare(parts.X_train), schema.prepare(parts.X_test)
    progress(
        f"  {len(table.target)} rows, {len(schema.features)} features, {task}; "
        f"{len(X_train)} train / {len(X_test)} held-out test rows"
    )

    progress("Checking the MLflow and BentoML stores")
    store.check_writable(settings.bentoml_home)
    client = registry.connect(settings)

    with mlflow.start_run(run_name=f"train-{name}") as run:
        mlflow.log_params(
            {
                "model_name": name,
                "task": task.value,
                "metric": metric.name,
                "seed": options.seed,
                "test_size": options.test_size,
                "cv_folds": options.cv_folds,
                "margin": options.margin,
                "tolerance": options.tolerance,
                "force": options.force,
                "dropped_columns": ",".join(options.drop) or "-",
                "trigger": options.trigger or "-",
                "live_rows": 0 if live is None else len(live.df),
            }
        )
        mlflow.log_input(dataset, context=TRAINING_CONTEXT)
        if live is not None:
            mlflow.log_input(live, context=LIVE_CONTEXT)
        if options.trigger is not None:
            mlflow.set_tags(
                {
                    "trigger": options.trigger,
                    RETRAIN_KEY_TAG: retrain_key(options.trigger, live.digest if live else "-"),
                }
            )

        progress(f"Cross-validating {len(pipelines)} candidates ({options.cv_folds} folds, {metric.name})")
        scores = []
        for candidate, pipeline in pipelines.items():
            with mlflow.start_run(run_name=candidate, nested=True):
                score = cross_validate(
                    candidate, pipeline, X_train, parts.y_train, task, metric, options.cv_folds, options.seed
                )
                mlflow.log_param("estimator", candidate)
                mlflow.log_metrics({f"cv_{metric.name}_mean": score.mean, f"cv_{metric.name}_std": score.std})
            scores.append(score)
            progress(f"  {candidate:<24} {metric.name} {score.mean:.4f} ± {score.std:.4f}")
        best = max(scores, key=lambda s: s.mean if metric.greater_is_better else -s.mean).name

        progress(f"Refitting {best} on the training split and scoring it on the held-out rows")
        model = pipelines[best].fit(X_train, parts.y_train)
        metrics = test_metrics(model, X_test, parts.y_test, task)
        mlflow.log_param("estimator", best)
        mlflow.log_metrics({f"test_{key}": value for key, value in metrics.items()})
        _, scorer = prove(model, schema, X_test, task is Task.CLASSIFICATION)
        progress(f"Scorer: {scorer.scorer}: {scorer.reason} ({scorer.rows_checked} held-out and edge rows)")
        mlflow.log_dict(scorer.as_metadata(), SCORER_RECORD)
        mlflow.set_tag("scorer", scorer.scorer)
        # Imported here: skl2onnx and onnxruntime take over a second to import, and `promote`, which imports
        # this module for its gate, never converts a model.
        from models.onnx_export import export as export_onnx  # noqa: PLC0415

        onnx_model, onnx_outcome = export_onnx(model, schema, X_test, task is Task.CLASSIFICATION)
        progress(f"ONNX: {onnx_outcome.onnx}: {onnx_outcome.reason}")
        mlflow.log_dict(onnx_outcome.as_metadata(), ONNX_RECORD)
        mlflow.set_tag("onnx", onnx_outcome.onnx)
        if onnx_model is not None:
            with tempfile.TemporaryDirectory() as folder:
                (Path(folder) / store.ONNX_FILE).write_bytes(onnx_model)
                mlflow.log_artifact(str(Path(folder) / store.ONNX_FILE), ONNX_ARTIFACT)
        answers = held_out_answers(model, X_test, parts.y_test, task)
        for file_name, figure in plots(answers).items():
            mlflow.log_figure(figure, f"plots/{file_name}")
            plt.close(figure)
        card_started = time.perf_counter()
        importance = model_card.importance(model, X_test, parts.y_test, metric, options.seed)
        evaluation = model_card.evaluation(answers, options.seed)
        mlflow.log_dict(importance, IMPORTANCE_RECORD)
        mlflow.log_dict(evaluation, EVALUATION_RECORD)
        figure = model_card.importance_figure(importance)
        mlflow.log_figure(figure, "plots/permutation_importance.png")
        plt.close(figure)
        top = ", ".join(list(importance["importances"])[:3])
        progress(
            f"Permutation importance ({metric.name}, {importance['repeats']} repeats): most important {top} "
            f"({time.perf_counter() - card_started:.1f} s)"
        )
        classes = model.classes_.tolist() if task is Task.CLASSIFICATION else None
        card = {
            "task": task.value,
            "target": str(table.target.name),
            "classes": classes,
            "feature_schema": schema.model_dump(mode="json", exclude_none=True),
        }
        mlflow.log_dict(card, registry.MODEL_CARD)
        holdout = store.holdout_set(parts.X_test, parts.y_test)
        holdout_digest = registry.log_holdout(holdout, name, table.source, store.TARGET_COLUMN)

        baseline = dummy_baseline(task, X_train, parts.y_train)
        baseline_metrics = test_metrics(baseline, X_test, parts.y_test, task)
        mlflow.log_metrics({f"dummy_test_{key}": value for key, value in baseline_metrics.items()})
        champion = registry.current_champion(client, name)
        decision, gate_figures = gate(
            client, champion, name, schema, card, metric, model, baseline, holdout, options, progress
        )
        mlflow.log_metrics({f"gate_{metric.name}_{key}": value for key, value in gate_figures.items()})

        progress("Registering the model version in MLflow")
        version = registry.log_and_register(
            client, model, name, X_train.head(5), model.predict(X_train.head(5))
        )
        trained_at = datetime.now(UTC).isoformat(timespec="seconds")
        bento_tag = None
        try:
            with tempfile.TemporaryDirectory() as folder:
                # Every version's store folder is kept with its run, so that `promote` and a service that
                # follows the champion can put any version into a BentoML store later, on any machine.
                store.write_folder(
                    Path(folder),
                    model,
                    schema,
                    store.reference_set(
                        model,
                        schema,
                        parts.X_train,
                        parts.y_train,
                        task,
                        settings.reference_rows,
                        options.seed,
                    ),
                    holdout,
                    labels={
                        "mlflow_run_id": run.info.run_id,
                        "registered_model": name,
                        "registered_version": str(version.version),
                        "alias": decision.alias,
                        "task": task.value,
                        "estimator": best,
                    },
                    # BentoML metadata cannot hold None (regression has no classes).
                    metadata={
                        **{key: value for key, value in card.items() if value is not None},
                        "metric": metric.name,
                        "test_metrics": metrics,
                        "estimator": best,
                        "scorer": scorer.as_metadata(),
                        "onnx": onnx_outcome.as_metadata(),
                        "importance": importance,
                        "evaluation": evaluation,
                        "dataset_digest": data_digest,
                        "dataset_source": table.source,
                        "holdout_digest": holdout_digest,
                        "rows": {"train": len(X_train), "test": len(X_test)},
                        "trained_at": trained_at,
                        "training_seconds": round(time.perf_counter() - started, 2),
                        "mlflow_tracking_uri": settings.tracking_uri,
                        "promotion": decision.reason,
                        "gate": {"metric": metric.name, **gate_figures, "failed": list(decision.failed)},
                    },
                    onnx_model=onnx_model,
                )
                mlflow.log_artifacts(folder, registry.STORE_ARTIFACT)
                if decision.promote:
                    progress("Saving the champion to the BentoML model store")
                    bento_tag = store.save_folder(name, Path(folder))
            if decision.promote:
                history = registry.champion_history(client, name) if champion else []
                registry.set_champion(client, name, str(version.version), [*history, str(version.version)])
            else:
                client.set_registered_model_alias(name, decision.alias, str(version.version))
            for key, value in {
                "promotion": "forced"
                if decision.forced
                else ("promoted" if decision.promote else "rejected"),
                "gate_reason": decision.reason,
                "gate_failed": ",".join(decision.failed) or "-",
                "dataset_digest": data_digest,
                "holdout_digest": holdout_digest,
                "bento_tag": bento_tag or "-",
                "trigger": options.trigger or "-",
                "scorer": scorer.scorer,
                "onnx": onnx_outcome.onnx,
            }.items():
                client.set_model_version_tag(name, str(version.version), key, value)
        except BaseException:
            if bento_tag is not None:
                bentoml.models.delete(bento_tag)
            registry.discard_version(client, name, str(version.version))
            raise
        mlflow.set_tags(
            {
                "promotion": decision.alias,
                "forced": str(decision.forced),
                "gate_reason": decision.reason,
                "bento_tag": bento_tag or "-",
            }
        )

    return TrainingResult(
        name=name,
        task=task,
        metric=metric.name,
        estimator=best,
        candidates=scores,
        test_metrics=metrics,
        run_id=run.info.run_id,
        registered_version=str(version.version),
        decision=decision,
        champion_before=champion.version if champion else None,
        champion_after=str(version.version) if decision.promote else (champion.version if champion else None),
        bento_tag=bento_tag,
        dataset_digest=data_digest,
        gate_figures=gate_figures,
        seconds=time.perf_counter() - started,
    )


def training_dataset(table: Table, name: str) -> PandasDataset:
    """The table as the run's `training` dataset input: its source and digest find it again (retraining)."""
    with warnings.catch_warnings():
        # MLflow warns that a local path "can be interpreted in multiple ways"; both ways are the same source.
        warnings.simplefilter("ignore", UserWarning)
        return from_pandas(
            pd.concat([table.features, table.target], axis=1),
            source=table.source,
            targets=str(table.target.name),
            name=name,
        )


def live_dataset(rows: pd.DataFrame, name: str, features: list[str], target: str) -> PandasDataset:
    """Labelled live rows in the table's columns, as the run's `live` dataset input."""
    columns = [*features, target]
    missing = [column for column in columns if column not in rows.columns]
    if missing:
        raise InputError(f"the live rows lack columns of the training table: {', '.join(missing)}")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return from_pandas(
            rows[columns].reset_index(drop=True),
            source="prediction log + feedback",
            targets=target,
            name=f"{name}-live",
        )


def with_rows(table: Table, rows: pd.DataFrame) -> Table:
    target = str(table.target.name)
    return Table(
        features=pd.concat([table.features, rows[table.features.columns]], ignore_index=True),
        target=pd.concat([table.target, rows[target]], ignore_index=True).rename(target),
        source=table.source,
    )


def retrain_key(trigger: str, live_digest: str) -> str:
    """What makes two retrains the same: their trigger and their labelled rows."""
    return hashlib.sha256(f"{trigger}\n{live_digest}".encode()).hexdigest()[:16]


def gate(
    client: MlflowClient,
    champion: registry.Champion | None,
    name: str,
    schema: FeatureSchema,
    card: dict[str, Any],
    metric: Metric,
    model: Pipeline,
    baseline: Pipeline,
    holdout: pd.DataFrame,
    options: TrainingOptions,
    progress: Callable[[str], None],
) -> tuple[Decision, dict[str, float]]:
    """Whether `model` (scored on its own held-out rows `holdout`) takes the champion alias, and the
    figures behind it: one gate for training and for `lifecycle promote`."""
    task = Task(str(card["task"]))
    X_holdout, y_holdout = schema.prepare(holdout), holdout[store.TARGET_COLUMN]
    new_score = test_metrics(model, X_holdout, y_holdout, task)[metric.name]
    baseline_score = test_metrics(baseline, X_holdout, y_holdout, task)[metric.name]
    figures = {"new_rows_new": new_score, "new_rows_baseline": baseline_score}
    if champion is None:
        progress("Comparing with a dummy baseline (no champion yet)")
        progress(f"  held-out rows: {metric.name} new {new_score:.4f}, dummy {baseline_score:.4f}")
        decision = decide_first(metric, new_score, baseline_score, options.force)
    else:
        progress(f"Comparing with champion v{champion.version} and a dummy baseline")
        champion_scores = score_champion(
            client, champion, name, schema, card, metric, model, baseline, holdout
        )
        for rows, held_out in [
            ("new held-out rows", champion_scores.new_rows),
            (f"v{champion.version}'s own held-out rows", champion_scores.trusted_rows),
        ]:
            if held_out is not None:
                progress(
                    f"  {rows}: {metric.name} new {held_out.new:.4f}, champion {held_out.champion:.4f}, "
                    f"dummy {held_out.baseline:.4f}"
                )
        figures |= champion_scores.figures()
        decision = decide(metric, champion_scores, options.margin, options.tolerance, options.force)
    progress(f"  {decision.reason}")
    return decision, figures


def score_champion(
    client: MlflowClient,
    champion: registry.Champion,
    name: str,
    schema: FeatureSchema,
    card: dict[str, Any],
    metric: Metric,
    model: Pipeline,
    baseline: Pipeline,
    holdout: pd.DataFrame,
) -> ChampionScores:
    """Score the champion, the new model and the dummy baseline on the new held-out rows and on the
    champion's own, or say why they cannot be scored."""
    old = champion.card
    if old["task"] != card["task"]:
        return ChampionScores(
            champion.version, incomparable=f"champion is a {old['task']} model, this is {card['task']}"
        )
    old_schema = FeatureSchema.model_validate(old["feature_schema"])
    reason = old_schema.incompatibility(schema)
    if reason is None and old["classes"] is not None:
        old_classes, new_classes = sorted(map(str, old["classes"])), sorted(map(str, card["classes"] or []))
        if old_classes != new_classes:
            reason = f"classes differ: champion {old_classes}, new data {new_classes}"
    if reason is not None:
        return ChampionScores(champion.version, incomparable=reason)
    trusted = registry.load_holdout(client, champion.run_id)
    if isinstance(trusted, str):
        return ChampionScores(champion.version, incomparable=trusted)
    old_pipeline = registry.load_version(name, champion.version)
    task = Task(str(card["task"]))

    def scores(rows: pd.DataFrame) -> HeldOutScores:
        def score(pipeline: Pipeline, its_schema: FeatureSchema) -> float:
            return test_metrics(pipeline, its_schema.prepare(rows), rows[store.TARGET_COLUMN], task)[
                metric.name
            ]

        return HeldOutScores(
            new=score(model, schema),
            champion=score(old_pipeline, old_schema),
            baseline=score(baseline, schema),
        )

    return ChampionScores(champion.version, new_rows=scores(holdout), trusted_rows=scores(trusted))
