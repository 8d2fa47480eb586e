"""What the BentoML store holds after training: lineage, schema, reference set, and the very same model as
MLflow's."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import mlflow.pyfunc
import numpy as np
import pandas as pd
import pytest

from models import evaluation, registry
from models.candidates import candidates
from models.data import Task, load_default
from models.schema import FeatureSchema
from models.store import (
    PREDICTION_COLUMN,
    PROBABILITY_PREFIX,
    TARGET_COLUMN,
    StoredModel,
    holdout_set,
    reference_set,
    reproduction_problem,
    write_files,
)
from tests.conftest import PROJECT_ROOT, Stores
from tests.tables import mixed_table


@pytest.fixture(scope="module")
def stored(default_model: subprocess.CompletedProcess[str]) -> StoredModel:
    return StoredModel.open("breast_cancer:latest")


def test_labels_carry_the_mlflow_lineage(stores: Stores, stored: StoredModel) -> None:
    champion = stores.client().get_model_version_by_alias("breast_cancer", "champion")
    assert stored.labels == {
        "mlflow_run_id": champion.run_id,
        "registered_model": "breast_cancer",
        "registered_version": str(champion.version),
        "alias": "champion",
        "task": "classification",
        "estimator": stored.metadata["estimator"],
    }
    assert champion.tags["bento_tag"] == stored.tag


def test_metadata_describes_the_model_and_its_data(stores: Stores, stored: StoredModel) -> None:
    meta = stored.metadata
    run = stores.client().get_run(stored.labels["mlflow_run_id"])
    assert meta["task"] == "classification"
    assert meta["classes"] == ["benign", "malignant"]
    assert meta["test_metrics"] == pytest.approx(
        {k[5:]: v for k, v in run.data.metrics.items() if k.startswith("test_")}
    )
    assert meta["dataset_digest"] == run.inputs.dataset_inputs[0].dataset.digest
    assert meta["training_seconds"] > 0
    assert meta["trained_at"].startswith("20")
    assert meta["rows"] == {"train": 455, "test": 114}
    radius = next(f for f in meta["feature_schema"]["features"] if f["name"] == "mean radius")
    assert radius == {
        "name": "mean radius",
        "kind": "numeric",
        "dtype": "float64",
        "nullable": False,
        "minimum": pytest.approx(6.981),
        "maximum": pytest.approx(28.11),
        "categories": [],
    }


def test_reference_set_is_training_rows_with_the_models_predictions(stored: StoredModel) -> None:
    reference = stored.load_reference()
    assert len(reference) == 455  # all training rows: fewer than the 1,000-row cap
    assert list(reference.columns[:30]) == stored.schema.names
    assert set(reference[TARGET_COLUMN]) == {"benign", "malignant"}
    again = stored.predict(reference[stored.schema.names])
    assert reference[PREDICTION_COLUMN].tolist() == again.labels.tolist()
    assert again.probabilities is not None
    assert np.array_equal(reference[f"{PROBABILITY_PREFIX}malignant"].to_numpy(), again.probabilities[:, 1])


def test_stored_model_predicts_exactly_as_the_mlflow_model(stored: StoredModel) -> None:
    rows = stored.schema.prepare(load_default().features)
    logged = registry.load_version("breast_cancer", stored.labels["registered_version"])
    assert np.array_equal(stored.pipeline.predict_proba(rows), logged.predict_proba(rows))
    pyfunc_uri = f"models:/breast_cancer/{stored.labels['registered_version']}"
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MLFLOW_ALLOW_PICKLE_DESERIALIZATION", "true")
        served_by_mlflow = mlflow.pyfunc.load_model(pyfunc_uri).predict(rows)
    assert np.array_equal(np.asarray(served_by_mlflow), stored.pipeline.predict(rows))


def test_bentoml_cli_shows_labels_and_metadata(stores: Stores, stored: StoredModel) -> None:
    bentoml = Path(sys.executable).parent / "bentoml"
    shown = subprocess.run(
        [str(bentoml), "models", "get", "breast_cancer:latest", "-o", "json"],
        cwd=PROJECT_ROOT,
        env=stores.env(),
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
    )
    info = json.loads(shown.stdout)
    assert info["labels"]["registered_version"] == stored.labels["registered_version"]
    assert info["metadata"]["dataset_digest"] == stored.metadata["dataset_digest"]
    listed = subprocess.run(
        [str(bentoml), "models", "list"],
        env=stores.env(),
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
    )
    assert stored.tag in listed.stdout


def test_held_out_rows_are_kept_in_the_store_and_in_mlflow_under_one_digest(
    stores: Stores, stored: StoredModel
) -> None:
    holdout = stored.load_holdout()
    assert len(holdout) == stored.metadata["rows"]["test"]
    assert list(holdout.columns) == [*stored.schema.names, TARGET_COLUMN]
    client = stores.client()
    in_mlflow = registry.load_holdout(client, stored.labels["mlflow_run_id"])
    assert isinstance(in_mlflow, pd.DataFrame)
    pd.testing.assert_frame_equal(in_mlflow, holdout)
    [recorded] = [
        item.dataset
        for item in client.get_run(stored.labels["mlflow_run_id"]).inputs.dataset_inputs
        if item.tags[0].value == registry.HOLDOUT_CONTEXT
    ]
    assert recorded.digest == stored.metadata["holdout_digest"]
    assert (
        recorded.digest
        == client.get_model_version("breast_cancer", stored.labels["registered_version"]).tags[
            "holdout_digest"
        ]
    )
    # The rows the run's test metrics were computed on.
    scored = evaluation.test_metrics(
        stored.pipeline, stored.schema.prepare(holdout), holdout[TARGET_COLUMN], stored.task
    )
    assert scored == pytest.approx(stored.metadata["test_metrics"])


def test_a_version_is_fetched_into_an_empty_store_from_its_mlflow_run(
    stores: Stores, stored: StoredModel, tmp_path: Path
) -> None:
    """A store that is not the one the version was trained into (an image's, a retrain job's first run):
    the version's store folder comes from its MLflow run, with the same files and labels."""
    version = stored.labels["registered_version"]
    fetch = (
        "from models import registry; from settings import get_settings; "
        f"model = registry.fetch_version(registry.connect(get_settings()), 'breast_cancer', '{version}'); "
        "print(model.tag, model.path)"
    )
    result = subprocess.run(
        [sys.executable, "-c", fetch],
        cwd=PROJECT_ROOT,
        env=stores.env(BENTOML_HOME=str(tmp_path / "empty-store")),
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    tag, path = result.stdout.split()
    assert Path(path).is_relative_to(tmp_path / "empty-store")
    assert tag != stored.tag  # a new copy in the other store, of the same version
    for file in (
        "pipeline.joblib",
        "feature_schema.json",
        "reference.parquet",
        "holdout.parquet",
        "model.onnx",
    ):
        assert (Path(path) / file).read_bytes() == (stored.path / file).read_bytes(), file


def test_reference_rows_read_back_as_the_model_was_given_them(tmp_path: Path) -> None:
    """Missing categories come back from Parquet as None; the model was given NaN, and its imputer takes
    only NaN: read as None, a model with categories never reproduced its stored predictions, so a service
    following the champion refused every new version of it."""
    table = mixed_table(300)
    X, y = table.drop(columns=["segment", "customer_id"]), table["segment"]
    schema = FeatureSchema.infer(X)
    pipeline = candidates(Task.CLASSIFICATION, schema, seed=0)["logistic_regression"]
    pipeline.fit(schema.prepare(X), y)
    reference = reference_set(pipeline, schema, X, y, Task.CLASSIFICATION, rows=300, seed=0)
    assert reference["city"].isna().any()
    write_files(tmp_path, pipeline, schema, reference, holdout_set(X, y))
    metadata = {"task": "classification", "classes": pipeline.classes_.tolist()}
    model = StoredModel("mixed:test", "mixed", "test", tmp_path, {}, metadata, schema)
    read = model.load_reference()
    assert all(isinstance(value, float) for value in read["city"][read["city"].isna()])  # NaN, not None
    assert reproduction_problem(model) is None
