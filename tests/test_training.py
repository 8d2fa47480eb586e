"""train.py end to end, through the real CLI, into real MLflow (SQLite) and BentoML stores."""

from __future__ import annotations

import json
import subprocess
from dataclasses import dataclass
from pathlib import Path

import bentoml
import numpy as np
import pandas as pd
import pytest
from bentoml.exceptions import NotFound
from mlflow.exceptions import MlflowException

from models.schema import FeatureKind
from models.store import StoredModel
from serving.model import RowPredictor
from tests.conftest import Stores, assert_ok, run_train
from tests.tables import breast_cancer_table, mixed_table, shuffle_labels


def champion_version(stores: Stores, name: str) -> str:
    return str(stores.client().get_model_version_by_alias(name, "champion").version)


def version_tags(stores: Stores, name: str, version: str) -> dict[str, str]:
    return dict(stores.client().get_model_version(name, version).tags)


def test_default_run_trains_registers_and_stores_the_champion(
    stores: Stores, default_model: subprocess.CompletedProcess[str]
) -> None:
    assert "Cross-validating 3 candidates" in default_model.stderr
    assert "first version: no champion yet" in default_model.stderr
    assert "breast_cancer v1 -> champion" in default_model.stdout
    client = stores.client()
    version = client.get_model_version_by_alias("breast_cancer", "champion")
    run = client.get_run(version.run_id)
    assert {"test_accuracy", "test_f1_macro", "test_roc_auc", "test_log_loss"} <= set(run.data.metrics)
    assert run.data.metrics["test_roc_auc"] > 0.95
    candidates = client.search_runs(
        [run.info.experiment_id], filter_string=f"tags.mlflow.parentRunId = '{run.info.run_id}'"
    )
    assert {c.data.params["estimator"] for c in candidates} == {
        "logistic_regression",
        "random_forest",
        "hist_gradient_boosting",
    }
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id, "plots")}
    assert artifacts == {
        "plots/confusion_matrix.png",
        "plots/roc_curve.png",
        "plots/permutation_importance.png",
    }
    inputs = {item.tags[0].value: item.dataset for item in run.inputs.dataset_inputs}
    assert set(inputs) == {"training", "testing"}  # the table, and its held-out rows (tests/test_store.py)
    assert "load_breast_cancer" in str(inputs["training"].source)
    assert inputs["training"].digest == version.tags["dataset_digest"]
    # The compiled scorer was proven on the held-out rows and 4 edge rows (models/compiled.py).
    stored = StoredModel.open("breast_cancer:latest")
    scorer = stored.metadata["scorer"]
    assert scorer["scorer"] == run.data.tags["scorer"] == version.tags["scorer"] == "compiled"
    assert scorer["rows_checked"] == stored.metadata["rows"]["test"] + 4
    assert 0 <= scorer["max_difference"] <= 1e-6
    assert json.loads(Path(client.download_artifacts(run.info.run_id, "scorer.json")).read_text()) == scorer
    # The model card's data (models/card.py): logged with the run, stored with the model.
    for record, key in [("importance.json", "importance"), ("evaluation.json", "evaluation")]:
        logged = json.loads(Path(client.download_artifacts(run.info.run_id, record)).read_text())
        assert logged == stored.metadata[key]
    importance = stored.metadata["importance"]
    assert (importance["metric"], importance["rows"]) == ("roc_auc", stored.metadata["rows"]["test"])
    assert sorted(importance["importances"]) == sorted(stored.schema.names)
    evaluation = stored.metadata["evaluation"]
    assert evaluation["labels"] == ["benign", "malignant"]
    assert sum(map(sum, evaluation["matrix"])) == stored.metadata["rows"]["test"]
    # The MLflow store lives in the configured data directory, not in the working directory.
    assert (stores.data_dir / "mlflow.db").is_file()
    assert any((stores.data_dir / "mlartifacts").iterdir())


@pytest.mark.parametrize(("classes", "metric"), [(2, "roc_auc"), (3, "f1_macro")])
def test_own_csv_with_text_booleans_and_missing_values(
    stores: Stores, tmp_path: Path, classes: int, metric: str
) -> None:
    path = tmp_path / "customers.csv"
    mixed_table(rows=400, classes=classes).to_csv(path, index=False)
    name = f"customers-{classes}"
    result = run_train(
        stores,
        "--data",
        str(path),
        "--target",
        "segment",
        "--drop",
        "customer_id",
        "--name",
        name,
        "--metric",
        metric,
    )
    assert_ok(result)
    stored = StoredModel.open(f"{name}:latest")
    kinds = {feature.name: feature.kind for feature in stored.schema.features}
    assert kinds == {
        "age": FeatureKind.NUMERIC,
        "income": FeatureKind.NUMERIC,
        "city": FeatureKind.CATEGORICAL,
        "member": FeatureKind.BOOLEAN,
    }
    assert len(stored.classes or []) == classes
    assert stored.metadata["metric"] == metric
    # Importance of the input columns: a city is shuffled whole, not its one-hot columns one by one.
    importance = stored.metadata["importance"]
    assert importance["metric"] == metric
    assert sorted(importance["importances"]) == sorted(kinds)
    assert len(stored.metadata["evaluation"]["matrix"]) == classes
    # Missing values and a city never seen in training are both served.
    unseen = pd.DataFrame([{"age": None, "income": 30000.0, "city": "atlantis", "member": None}])
    prediction = stored.predict(unseen)
    assert prediction.probabilities is not None
    assert prediction.probabilities.sum() == pytest.approx(1.0)
    # The served model call gives the same answers with the compiled scorer as with scikit-learn.
    assert stored.metadata["scorer"]["scorer"] == "compiled"
    compiled, plain = RowPredictor(stored, compiled=True), RowPredictor(stored, compiled=False)
    assert (compiled.scorer["scorer"], plain.scorer["scorer"]) == ("compiled", "scikit-learn")
    assert plain.scorer["reason"] == "turned off (TABSERVE_COMPILED_SCORER=false)"
    rows = stored.schema.prepare(pd.concat([unseen, mixed_table(rows=50, seed=3)[list(kinds)]])).to_numpy(
        dtype=object
    )
    np.testing.assert_allclose(compiled(rows), plain(rows), rtol=0, atol=1e-12)


def test_continuous_target_trains_a_regression(stores: Stores, tmp_path: Path) -> None:
    path = tmp_path / "spend.parquet"
    mixed_table(rows=300, regression=True).to_parquet(path, index=False)
    args = ("--data", str(path), "--target", "spend", "--drop", "customer_id", "--estimator", "ridge")
    result = run_train(stores, *args)
    assert_ok(result)
    assert "Cross-validating 1 candidates" in result.stderr  # progress lines go to stderr
    stored = StoredModel.open("spend:latest")  # the name defaults to the file's name
    assert stored.task == "regression"
    assert stored.metadata["estimator"] == "ridge"
    assert set(stored.metadata["test_metrics"]) == {"rmse", "mae", "r2"}
    assert stored.metadata["test_metrics"]["r2"] > 0.5
    run = stores.client().get_run(stored.labels["mlflow_run_id"])
    artifacts = {a.path for a in stores.client().list_artifacts(run.info.run_id, "plots")}
    assert artifacts == {
        "plots/actual_vs_predicted.png",
        "plots/residuals.png",
        "plots/permutation_importance.png",
    }
    evaluation = stored.metadata["evaluation"]
    assert (evaluation["kind"], evaluation["rows"]) == ("residuals", stored.metadata["rows"]["test"])
    assert len(evaluation["predicted"]) == len(evaluation["actual"]) == min(200, evaluation["rows"])
    assert stored.metadata["importance"]["metric"] == "rmse"


def test_promotion_gate_lifecycle(stores: Stores, tmp_path: Path) -> None:
    """Same data again -> a tie, challenger; a different feature set -> cannot compare, refused unless
    --force."""
    name = "gate"
    path = tmp_path / "clean.csv"
    breast_cancer_table().to_csv(path, index=False)

    def train(*extra: str) -> subprocess.CompletedProcess[str]:
        args = ("--data", str(path), "--target", "diagnosis", "--name", name, "--cv-folds", "3")
        result = run_train(stores, *args, *extra)
        assert_ok(result)
        return result

    train()
    assert champion_version(stores, name) == "1"

    tie = train()
    assert "not better: on the new held-out rows roc_auc" in tie.stderr
    assert "(gain +0.0000 does not exceed margin 0.0000)" in tie.stderr
    assert "unchanged (not promoted)" in tie.stdout
    assert champion_version(stores, name) == "1"
    assert str(stores.client().get_model_version_by_alias(name, "challenger").version) == "2"
    assert version_tags(stores, name, "2")["promotion"] == "rejected"
    assert version_tags(stores, name, "2")["gate_failed"] == "champion_new_rows"
    assert StoredModel.open(f"{name}:latest").labels["registered_version"] == "1"

    refused = train("--drop", "mean radius")
    assert (
        "cannot compare with champion v1: feature columns differ: missing ['mean radius']" in refused.stderr
    )
    assert champion_version(stores, name) == "1"

    train("--drop", "mean radius", "--force")
    assert champion_version(stores, name) == "4"
    assert version_tags(stores, name, "4")["promotion"] == "forced"
    assert "mean radius" not in StoredModel.open(f"{name}:latest").schema.names


@dataclass(frozen=True)
class GateTable:
    """A table to train on, a copy with 60% of its labels shuffled, and a smaller and a larger sample of
    the same distribution (disjoint, so that neither model was trained on the other's held-out rows)."""

    clean: pd.DataFrame
    noisy: pd.DataFrame
    smaller: pd.DataFrame
    larger: pd.DataFrame
    target: str
    drop: tuple[str, ...] = ()

    def train(
        self, stores: Stores, tmp_path: Path, name: str, which: str, *extra: str
    ) -> subprocess.CompletedProcess[str]:
        path = tmp_path / f"{name}-{which}.csv"
        getattr(self, which).to_csv(path, index=False)
        args = ["--data", str(path), "--target", self.target, "--name", name, "--cv-folds", "3"]
        for column in self.drop:
            args += ["--drop", column]
        result = run_train(stores, *args, *extra)
        assert_ok(result)
        return result


def gate_table(table: str) -> GateTable:
    # Shuffle seeds for which the gate before the trusted rows promoted the noisy version: it won on the new
    # (noisy) held-out rows, as in issue #12.
    if table == "breast_cancer":
        clean = breast_cancer_table()
        smaller = clean.sample(frac=0.2, random_state=0)
        return GateTable(
            clean,
            shuffle_labels(clean, "diagnosis", 0.6, seed=2),
            smaller,
            clean.drop(smaller.index),
            "diagnosis",
        )
    clean = mixed_table(rows=400)
    return GateTable(
        clean,
        shuffle_labels(clean, "segment", 0.6, seed=4),
        mixed_table(rows=300, seed=0),
        mixed_table(rows=1200, seed=1),
        "segment",
        ("customer_id",),
    )


GATE_TABLES = ["breast_cancer", "customers"]  # numeric only; numeric, text and boolean with missing values


@pytest.mark.parametrize("table", GATE_TABLES)
def test_retraining_on_corrupted_labels_does_not_move_the_champion(
    stores: Stores, tmp_path: Path, table: str
) -> None:
    name, data = f"noisy-{table.replace('_', '-')}", gate_table(table)
    data.train(stores, tmp_path, name, "clean")
    noisy = data.train(stores, tmp_path, name, "noisy")

    assert champion_version(stores, name) == "1"
    assert "but loses on champion v1's own held-out rows roc_auc" in noisy.stderr
    assert "label noise or a change of concept: a person decides with --force" in noisy.stderr
    assert "unchanged (not promoted)" in noisy.stdout
    tags = version_tags(stores, name, "2")
    assert tags["promotion"] == "rejected"
    assert tags["gate_failed"] == "champion_trusted_rows"
    assert "own held-out rows" in tags["gate_reason"]
    run = stores.client().get_run(stores.client().get_model_version(name, "2").run_id)
    assert run.data.tags["gate_reason"] == tags["gate_reason"]
    figures = {key.removeprefix("gate_roc_auc_"): value for key, value in run.data.metrics.items()}
    # What fooled the old gate: the noisy version wins on the noisy held-out rows...
    assert figures["new_rows_new"] > figures["new_rows_champion"] > figures["new_rows_baseline"]
    # ... and what the champion's own rows show.
    assert (
        figures["trusted_rows_champion"] - figures["trusted_rows_new"]
        > 0.02 * figures["trusted_rows_champion"]
    )
    assert run.data.params["tolerance"] == "0.02"
    assert StoredModel.open(f"{name}:latest").labels["registered_version"] == "1"

    forced = data.train(stores, tmp_path, name, "noisy", "--force")
    assert "forced; wins on the new held-out rows" in forced.stderr
    assert champion_version(stores, name) == "3"
    assert version_tags(stores, name, "3")["promotion"] == "forced"
    stored = StoredModel.open(f"{name}:latest")
    assert stored.labels["registered_version"] == "3"
    assert stored.metadata["promotion"] == version_tags(stores, name, "3")["gate_reason"]
    assert stored.metadata["promotion"].startswith("forced; wins on the new held-out rows")
    assert stored.metadata["gate"]["failed"] == ["champion_trusted_rows"]
    assert stored.metadata["gate"]["trusted_rows_champion"] == figures["trusted_rows_champion"]


@pytest.mark.parametrize("table", GATE_TABLES)
def test_more_rows_of_the_same_distribution_are_promoted(stores: Stores, tmp_path: Path, table: str) -> None:
    name, data = f"more-{table.replace('_', '-')}", gate_table(table)
    data.train(stores, tmp_path, name, "smaller")
    larger = data.train(stores, tmp_path, name, "larger")
    assert "better: on the new held-out rows roc_auc" in larger.stderr
    assert champion_version(stores, name) == "2"
    assert version_tags(stores, name, "2")["promotion"] == "promoted"
    assert version_tags(stores, name, "2")["gate_failed"] == "-"
    assert StoredModel.open(f"{name}:latest").labels["registered_version"] == "2"


# case -> (file name, its content (None: no file), target column, what the one-line error says)
BAD_INPUTS: dict[str, tuple[str, bytes | pd.DataFrame | None, str, str]] = {
    "missing file": ("absent.csv", None, "segment", "data file not found"),
    "empty file": ("empty.csv", b"", "segment", "data file is empty"),
    "unreadable file": ("bad.parquet", b"\x00not parquet", "segment", "cannot read"),
    "unknown target": ("t.csv", mixed_table(rows=60), "nope", "target column 'nope' not in"),
    "one class": ("t.csv", mixed_table(rows=60).assign(segment="low"), "segment", "has only one class"),
    "too few rows": ("t.csv", mixed_table(rows=12), "segment", "too few rows"),
}


@pytest.mark.parametrize("case", BAD_INPUTS)
def test_bad_input_fails_in_one_line_and_writes_nothing(stores: Stores, tmp_path: Path, case: str) -> None:
    file_name, content, target, message = BAD_INPUTS[case]
    path = tmp_path / file_name
    if isinstance(content, pd.DataFrame):
        content.to_csv(path, index=False)
    elif content is not None:
        path.write_bytes(content)
    name = "bad-" + case.replace(" ", "-")
    result = run_train(stores, "--data", str(path), "--target", target, "--name", name)
    assert_refused(stores, result, name, message)


def test_an_unknown_estimator_fails_in_one_line_and_writes_nothing(stores: Stores) -> None:
    name = "bad-estimator"
    result = run_train(stores, "--name", name, "--estimator", "random_forest", "--estimator", "svm")
    message = "no classification estimator 'svm'; choose from logistic_regression, random_forest"
    assert_refused(stores, result, name, message)


def test_unwritable_store_fails_before_training(stores: Stores, tmp_path: Path) -> None:
    blocker = tmp_path / "not-a-directory"
    blocker.write_text("a file where the store's folder should be")
    name = "bad-store"
    result = run_train(stores, "--name", name, env=stores.env(BENTOML_HOME=str(blocker / "bentoml")))
    assert_refused(stores, result, name, "BentoML store at")


def assert_refused(stores: Stores, result: subprocess.CompletedProcess[str], name: str, message: str) -> None:
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert lines[-1].startswith("error: ")
    assert message in lines[-1]
    assert "Traceback" not in result.stderr
    with pytest.raises(MlflowException):
        stores.client().get_registered_model(name)
    with pytest.raises(NotFound):
        bentoml.models.get(f"{name}:latest")
