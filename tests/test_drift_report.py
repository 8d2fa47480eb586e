"""The Evidently report on a small mixed table: every feature kind, unseen categories, a lost feature."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from evidently.core.report import Snapshot

from drift import report
from models.schema import Feature, FeatureKind, FeatureSchema
from models.store import StoredModel

SCHEMA = FeatureSchema(
    features=[
        Feature(
            name="age", kind=FeatureKind.NUMERIC, dtype="float64", nullable=False, minimum=18, maximum=90
        ),
        Feature(
            name="income", kind=FeatureKind.NUMERIC, dtype="float64", nullable=True, minimum=0, maximum=1e5
        ),
        Feature(name="member", kind=FeatureKind.BOOLEAN, dtype="bool", nullable=False),
        Feature(
            name="city",
            kind=FeatureKind.CATEGORICAL,
            dtype="object",
            nullable=False,
            categories=["lyon", "nice"],
        ),
    ]
)
MODEL = StoredModel(
    tag="customers:v1",
    name="customers",
    version="v1",
    path=Path(),
    labels={},
    metadata={"task": "classification", "classes": [0, 1]},
    schema=SCHEMA,
)


def table(rows: int, seed: int) -> pd.DataFrame:
    """Rows in reference-set form: prepared features, labels as the model's classes, probabilities."""
    rng = np.random.default_rng(seed)
    malignant = rng.random(rows)
    return pd.DataFrame(
        {
            "age": rng.uniform(20, 80, rows),
            "income": rng.normal(50_000, 10_000, rows),
            "member": rng.integers(0, 2, rows).astype(float),
            "city": rng.choice(["lyon", "nice"], rows).astype(object),
            "_target": rng.integers(0, 2, rows),
            "_prediction": (malignant > 0.5).astype(int),
            "_proba_0": 1 - malignant,
            "_proba_1": malignant,
        }
    )


@pytest.fixture(scope="module")
def built() -> tuple[Snapshot, report.DriftResult]:
    reference = table(400, seed=1)
    current = table(300, seed=2).drop(columns=["_target"])
    current["_prediction"] = current["_prediction"].map(str)  # as the log reader gives them
    current["age"] += 40  # far outside the training range
    current.loc[:99, "city"] = "paris"  # never seen in training
    current["income"] = np.nan  # the feature stopped arriving
    return report.build(MODEL, reference, current, 0.0, "test", {"model": "customers"}, ["customers"])


def test_drifted_features_in_schema_order_including_one_with_no_values(
    built: tuple[Snapshot, report.DriftResult],
) -> None:
    _, result = built
    assert result.drifted_features == ["age", "income", "city"]
    assert result.empty_features == ["income"]
    assert result.drift_share == pytest.approx(0.75)
    assert result.drift_detected
    assert not replace(result, threshold=0.8).drift_detected
    methods = {column.column: column.method for column in result.features}
    assert methods["age"].startswith("K-S")
    assert methods["member"].startswith("Z-test")  # booleans are tested as categories
    assert not result.prediction_drift  # numeric labels in the reference, text in the log: same labels


def test_quality_findings_name_the_column_and_the_problem(built: tuple[Snapshot, report.DriftResult]) -> None:
    _, result = built
    found = {(finding.column, finding.what): finding.count for finding in result.quality}
    assert found[("age", "values outside the training range")] > 100  # ages over 90 of 60..120
    assert found[("city", "unseen categories")] == 100
    assert found[("income", "missing values")] == 300


def test_html_names_the_lineage_and_json_holds_the_results(
    built: tuple[Snapshot, report.DriftResult], tmp_path: Path
) -> None:
    snapshot, _ = built
    report.save(snapshot, tmp_path, {"version": "v1", "mlflow_run_id": "run-xyz"})
    page = (tmp_path / "report.html").read_text()
    assert "run-xyz" in page.split("</table>")[0]
    results = json.loads((tmp_path / "report.json").read_text())
    assert any(metric["config"].get("column") == "age" for metric in results["metrics"])
