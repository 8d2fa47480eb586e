"""The Evidently 0.7 report: live rows against the model version's reference set.

Three parts, all with Evidently's default tests:
- data drift of every feature: `DataDriftPreset`, whose per-column test depends on the column's type and
  the reference size (K-S for numbers, chi-square or Z-test for categories and for numbers with at most 5
  values, when the reference has at most 1,000 rows; Wasserstein and Jensen-Shannon distances above that).
  Booleans count as categories.
- data quality: missing values per feature, values outside the training range (numbers), categories never
  seen in training (where the stored list of seen categories is complete).
- prediction drift: the predicted labels (or values) and each class probability against the reference
  predictions.

A feature with no value at all in the window cannot be tested; it counts as drifted, since live data that
lost a feature has changed more than any test could say.

The verdict: drift when at least one feature drifted and the share of drifted features reaches the
threshold (0 = any one feature; Evidently's own dataset-drift rule is 0.5). Prediction drift and quality
findings are reported beside it, not folded into it.
"""

from __future__ import annotations

import html
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
from evidently import DataDefinition, Dataset, Report
from evidently.core.report import Snapshot
from evidently.metrics import MissingValueCount, OutListValueCount, OutRangeValueCount, ValueDrift
from evidently.presets import DataDriftPreset
from evidently.tests import Reference, eq
from evidently.ui.workspace import Workspace

from models.schema import MAX_STORED_CATEGORIES, FeatureKind
from models.store import PREDICTION_COLUMN, PROBABILITY_PREFIX, TARGET_COLUMN, StoredModel


@dataclass(frozen=True)
class ColumnDrift:
    column: str
    method: str
    score: float
    threshold: float
    drifted: bool


@dataclass(frozen=True)
class QualityFinding:
    """A quality count that differs from the reference's (Evidently's default test: within 10%)."""

    column: str
    what: str  # "missing values", "values outside the training range", "unseen categories"
    count: int
    share: float


@dataclass(frozen=True)
class DriftResult:
    features: list[ColumnDrift]  # features that could be tested, schema order
    empty_features: list[str]  # no value in the window: counted as drifted
    untested_features: list[str]  # no value in the reference: nothing to compare with
    predictions: list[ColumnDrift]
    quality: list[QualityFinding]
    feature_names: list[str]  # all of them, schema order
    threshold: float

    @property
    def drifted_features(self) -> list[str]:
        drifted = {c.column for c in self.features if c.drifted} | set(self.empty_features)
        return [name for name in self.feature_names if name in drifted]

    @property
    def drift_share(self) -> float:
        return len(self.drifted_features) / len(self.feature_names)

    @property
    def drift_detected(self) -> bool:
        return bool(self.drifted_features) and self.drift_share >= self.threshold

    @property
    def prediction_drift(self) -> bool:
        return any(column.drifted for column in self.predictions)


def build(
    model: StoredModel,
    reference: pd.DataFrame,
    current: pd.DataFrame,
    threshold: float,
    name: str,
    metadata: dict[str, str],
    tags: list[str],
) -> tuple[Snapshot, DriftResult]:
    schema = model.schema
    classification = model.classes is not None
    reference = reference.drop(columns=[TARGET_COLUMN])
    if classification:
        # Labels may be numbers or booleans in the reference and text in the log: compare them as text.
        reference[PREDICTION_COLUMN] = reference[PREDICTION_COLUMN].map(str)
    probabilities = [c for c in reference.columns if c.startswith(PROBABILITY_PREFIX)]
    definition = DataDefinition(
        numerical_columns=[
            *schema.names_of(FeatureKind.NUMERIC),
            *probabilities,
            *([] if classification else [PREDICTION_COLUMN]),
        ],
        categorical_columns=[
            *schema.names_of(FeatureKind.CATEGORICAL),
            *schema.names_of(FeatureKind.BOOLEAN),
            *([PREDICTION_COLUMN] if classification else []),
        ],
    )

    def comparable(column: str) -> bool:
        return bool(current[column].notna().any() and reference[column].notna().any())

    tested = [f for f in schema.names if comparable(f)]
    empty = [f for f in schema.names if not current[f].notna().any()]
    untested = [f for f in schema.names if f not in tested and f not in empty]
    metrics: list[Any] = []
    if tested:
        # Evidently's dataset-drift test fails at share >= drift_share; "any feature" is one column's share.
        metrics.append(DataDriftPreset(columns=tested, drift_share=max(threshold, 1 / len(tested))))
    metrics += [ValueDrift(column=c) for c in [PREDICTION_COLUMN, *probabilities] if comparable(c)]
    metrics += _quality_metrics(model, current)
    columns = [*schema.names, PREDICTION_COLUMN, *probabilities]
    with warnings.catch_warnings():
        # scipy warns about zero expected counts when a category is new; the test result (drift) is right.
        warnings.simplefilter("ignore", RuntimeWarning)
        snapshot = Report(metrics, metadata=metadata, tags=tags, include_tests=True).run(
            Dataset.from_pandas(current[columns], data_definition=definition),
            Dataset.from_pandas(reference[columns], data_definition=definition),
            name=name,
        )
    drifts, quality = _results(snapshot)
    result = DriftResult(
        features=[drifts[f] for f in tested],
        empty_features=empty,
        untested_features=untested,
        predictions=[drifts[c] for c in [PREDICTION_COLUMN, *probabilities] if c in drifts],
        quality=quality,
        feature_names=schema.names,
        threshold=threshold,
    )
    return snapshot, result


def _quality_metrics(model: StoredModel, current: pd.DataFrame) -> list[Any]:
    metrics: list[Any] = []
    for feature in model.schema.features:
        name = feature.name
        metrics.append(MissingValueCount(column=name, share_tests=_as_in_reference()))
        if not current[name].notna().any():
            continue  # shares of nothing: Evidently would divide by zero
        low, high = feature.minimum, feature.maximum
        if feature.kind is FeatureKind.NUMERIC and low is not None and high is not None:
            metrics.append(
                OutRangeValueCount(column=name, left=low, right=high, share_tests=_as_in_reference())
            )
        # A truncated list of seen categories would call the rest "unseen".
        if feature.kind is FeatureKind.CATEGORICAL and len(feature.categories) < MAX_STORED_CATEGORIES:
            values = list(feature.categories)
            metrics.append(OutListValueCount(column=name, values=values, share_tests=_as_in_reference()))
    return metrics


def _as_in_reference() -> list[Any]:
    """Evidently's default quality test, on the share only: its count test would compare the counts of a
    window and of the reference set, which differ in size."""
    return [eq(Reference(relative=0.1))]


_QUALITY = {
    "MissingValueCount": "missing values",
    "OutRangeValueCount": "values outside the training range",
    "OutListValueCount": "unseen categories",
}


def _results(snapshot: Snapshot) -> tuple[dict[str, ColumnDrift], list[QualityFinding]]:
    """Per-column drift and the quality counts that failed their test, from Evidently's JSON results."""
    data = snapshot.dict()
    failed = {t["metric_config"]["metric_id"] for t in data["tests"] if t["status"] == "FAIL"}
    drifts: dict[str, ColumnDrift] = {}
    quality: list[QualityFinding] = []
    for metric in data["metrics"]:
        config = metric["config"]
        kind = config["type"].rsplit(":", 1)[-1]
        if kind == "ValueDrift":
            drifts[config["column"]] = ColumnDrift(
                column=config["column"],
                method=config["method"],
                score=float(metric["value"]),
                threshold=float(config["threshold"]),
                drifted=metric["id"] in failed,
            )
        elif kind in _QUALITY and metric["id"] in failed and metric["value"]["count"] > 0:
            quality.append(
                QualityFinding(
                    column=config["column"],
                    what=_QUALITY[kind],
                    count=int(metric["value"]["count"]),
                    share=float(metric["value"]["share"]),
                )
            )
    return drifts, quality


def save(snapshot: Snapshot, directory: Path, header: dict[str, str]) -> None:
    """report.html (with `header` on top: Evidently's HTML shows no metadata) and report.json."""
    rows = "".join(
        f"<tr><th style='text-align:left;padding-right:1em'>{html.escape(key)}</th>"
        f"<td>{html.escape(value)}</td></tr>"
        for key, value in header.items()
    )
    banner = f"<div style='font-family:sans-serif;padding:1em 2em'><table>{rows}</table></div>"
    page = snapshot.get_html_str(as_iframe=False).replace("<body>", f"<body>{banner}", 1)
    (directory / "report.html").write_text(page, encoding="utf-8")
    (directory / "report.json").write_text(snapshot.json(), encoding="utf-8")


def add_to_workspace(snapshot: Snapshot, workspace_dir: Path, project: str, description: str) -> None:
    """One Evidently project per model; `evidently ui --workspace DIR` shows its snapshots."""
    workspace = Workspace.create(str(workspace_dir))
    found = workspace.search_project(project)
    target = found[0] if found else workspace.create_project(project, description=description)
    workspace.add_run(target.id, snapshot)
