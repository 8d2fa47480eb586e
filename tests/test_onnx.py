"""models/onnx_export.py: every candidate estimator family, on both tables, is exported to ONNX and proven
equal to scikit-learn by onnxruntime (checked again here on its own session, as a Triton or KServe user would
call it), or recorded as not exported with its reason; a wrong converter is refused, not kept; a training
run logs the ONNX model in MLflow and keeps it in the BentoML model.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from onnx import TensorProto
from skl2onnx.common._container import ModelComponentContainer
from skl2onnx.common._topology import Operator, Scope
from skl2onnx.common.data_types import StringTensorType
from sklearn.impute import SimpleImputer
from sklearn.pipeline import Pipeline

from models.candidates import candidates
from models.compiled import TOLERANCE, proof_rows
from models.data import Task
from models.onnx_export import (
    CONVERTERS,
    EXPORTED,
    NOT_EXPORTED,
    OnnxOutcome,
    export,
    feed,
    impute_numbers,
    predict,
    session,
)
from models.schema import FeatureSchema
from models.store import ONNX_FILE, StoredModel
from tests.conftest import Stores
from tests.tables import breast_cancer_table, mixed_table, with_many_shops

# (table, target): both tables for each task; breast cancer's regression predicts 'mean area' from the other
# columns, its diagnosis then being a category.
TABLES = {
    "breast-cancer": (breast_cancer_table(), "diagnosis"),
    "mixed": (mixed_table(600).drop(columns=["customer_id"]), "segment"),
    "mixed-3-classes": (mixed_table(600, classes=3).drop(columns=["customer_id"]), "segment"),
    "pooled-categories": (with_many_shops().drop(columns=["customer_id"]), "segment"),
    # Integer classes: the label output is INT64 instead of strings.
    "integer-classes": (
        mixed_table(600, classes=3)
        .drop(columns=["customer_id"])
        .assign(segment=lambda frame: frame["segment"].map({"low": 0, "mid": 1, "high": 2})),
        "segment",
    ),
    "breast-cancer-regression": (breast_cancer_table(), "mean area"),
    "mixed-regression": (mixed_table(600, regression=True).drop(columns=["customer_id"]), "spend"),
}
CLASSIFIERS = ["logistic_regression", "random_forest", "hist_gradient_boosting"]
REGRESSORS = ["ridge", "random_forest", "hist_gradient_boosting"]
CASES = [
    (table, family)
    for table in TABLES
    for family in (REGRESSORS if table.endswith("regression") else CLASSIFIERS)
]


def fitted(table: str, family: str) -> tuple[Pipeline, FeatureSchema, pd.DataFrame, bool]:
    """The candidate pipeline fitted on the table's first 450 rows, and the other rows, prepared."""
    frame, target = TABLES[table]
    features = frame.drop(columns=[target])
    schema = FeatureSchema.infer(features)
    prepared = schema.prepare(features)
    task = Task.REGRESSION if table.endswith("regression") else Task.CLASSIFICATION
    pipeline = candidates(task, schema, seed=0)[family]
    pipeline.fit(prepared.head(450), frame[target].head(450))
    return pipeline, schema, prepared.iloc[450:], task is Task.CLASSIFICATION


@pytest.mark.parametrize(("table", "family"), CASES, ids=[f"{table}-{family}" for table, family in CASES])
def test_every_candidate_is_exported_and_equal_to_scikit_learn(table: str, family: str) -> None:
    pipeline, schema, held_out, classification = fitted(table, family)
    model, outcome = export(pipeline, schema, held_out, classification)
    assert model is not None, outcome.reason
    assert (outcome.onnx, outcome.reason) == (
        EXPORTED,
        f"onnxruntime equal to scikit-learn within {TOLERANCE:g}",
    )
    assert outcome.rows_checked == len(held_out) + 4
    assert outcome.max_difference is not None
    assert outcome.max_difference <= TOLERANCE
    assert outcome.label_differences == (0 if classification else None)
    # Checked again on a session of its own, on the proof rows and one row at a time (a [1, 1] input each).
    runner = session(model)
    rows = proof_rows(schema, held_out)
    for frame in (rows, rows.tail(1), rows.head(1)):
        outputs = predict(runner, feed(runner, schema, frame), classification)
        if classification:
            assert np.array_equal(outputs[0], pipeline.predict(frame))
            np.testing.assert_allclose(outputs[1], pipeline.predict_proba(frame), rtol=0, atol=TOLERANCE)
        else:
            np.testing.assert_allclose(outputs[0][:, 0], pipeline.predict(frame), rtol=0, atol=TOLERANCE)
    # The inputs a caller sends: one per feature, in the schema's order, by their ONNX names.
    assert outcome.inputs is not None
    assert [item["feature"] for item in outcome.inputs] == schema.names
    assert [item["name"] for item in outcome.inputs] == [spec.name for spec in runner.get_inputs()]


def test_a_category_that_is_the_empty_string_is_not_exported() -> None:
    """The empty string is how an ONNX string input says 'missing': a model that learnt it as a category
    cannot be told apart from a missing value there."""
    frame, target = TABLES["mixed"]
    frame = frame.assign(city=frame["city"].where(frame["city"] != "lille", ""))
    features = frame.drop(columns=[target])
    schema = FeatureSchema.infer(features)
    prepared = schema.prepare(features)
    pipeline = candidates(Task.CLASSIFICATION, schema, seed=0)["logistic_regression"]
    pipeline.fit(prepared, frame[target])
    model, outcome = export(pipeline, schema, prepared.tail(50), classification=True)
    assert model is None
    assert outcome == OnnxOutcome(
        NOT_EXPORTED, "the empty string is a category, but it is how an ONNX input says missing"
    )


def imputer_losing_its_indicators(
    scope: Scope, operator: Operator, container: ModelComponentContainer
) -> None:
    """What skl2onnx's own SimpleImputer converter does to our numeric columns, without failing: the values
    imputed, the missing-value indicator columns lost (here all zeros, so that the width still fits the
    estimator and the difference is silent)."""
    imputer: SimpleImputer = operator.raw_operator
    if isinstance(operator.inputs[0].type, StringTensorType):  # categories: the right converter
        CONVERTERS[SimpleImputer][0](scope, operator, container)
        return
    missing, imputed = impute_numbers(scope, operator, container)
    zeros = scope.get_unique_variable_name("zeros")
    container.add_initializer(
        zeros,
        TensorProto.DOUBLE,
        [1, len(imputer.indicator_.features_)],
        [0.0] * len(imputer.indicator_.features_),
    )
    shape = scope.get_unique_variable_name("shape")
    container.add_node("Shape", [missing], [shape], start=0, end=1)
    width = scope.get_unique_variable_name("width")
    container.add_initializer(width, TensorProto.INT64, [1], [len(imputer.indicator_.features_)])
    both = scope.get_unique_variable_name("both")
    container.add_node("Concat", [shape, width], [both], axis=0)
    indicators = scope.get_unique_variable_name("indicators")
    container.add_node("Expand", [zeros, both], [indicators])
    container.add_node("Concat", [imputed, indicators], [operator.outputs[0].full_name], axis=1)


@pytest.mark.parametrize("family", ["logistic_regression", "hist_gradient_boosting"])
def test_a_converter_that_loses_the_indicators_is_refused(family: str) -> None:
    pipeline, schema, held_out, _ = fitted("mixed", family)
    converters = {**CONVERTERS, SimpleImputer: (imputer_losing_its_indicators, CONVERTERS[SimpleImputer][1])}
    model, outcome = export(pipeline, schema, held_out, True, converters)
    assert model is None
    assert outcome.onnx == NOT_EXPORTED
    assert outcome.rows_checked == len(held_out) + 4
    assert outcome.max_difference is not None
    assert outcome.max_difference > TOLERANCE
    assert outcome.reason == (
        f"onnxruntime differs from scikit-learn: max difference {outcome.max_difference:.3g} "
        f"(tolerance 1e-06), {outcome.label_differences} of {outcome.rows_checked} labels differ"
    )
    # The same converters with the right imputer: exported, so the difference was the indicators'.
    assert export(pipeline, schema, held_out, True)[1].onnx == EXPORTED


def test_training_logs_the_onnx_model_in_mlflow_and_keeps_it_in_the_store(
    stores: Stores, default_model: subprocess.CompletedProcess[str]
) -> None:
    assert "ONNX: exported: onnxruntime equal to scikit-learn within 1e-06" in default_model.stderr
    stored = StoredModel.open("breast_cancer:latest")
    outcome = stored.metadata["onnx"]
    assert outcome["onnx"] == EXPORTED
    assert outcome["rows_checked"] == stored.metadata["rows"]["test"] + 4
    assert 0 <= outcome["max_difference"] <= TOLERANCE
    assert outcome["label_differences"] == 0
    client = stores.client()
    run_id = stored.labels["mlflow_run_id"]
    assert client.get_run(run_id).data.tags["onnx"] == EXPORTED
    version = client.get_model_version("breast_cancer", stored.labels["registered_version"])
    assert version.tags["onnx"] == EXPORTED
    assert json.loads(Path(client.download_artifacts(run_id, "onnx.json")).read_text()) == outcome
    logged = Path(client.download_artifacts(run_id, f"onnx/{ONNX_FILE}")).read_bytes()
    kept = (stored.path / ONNX_FILE).read_bytes()
    assert logged == kept
    assert ONNX_FILE in stored.metadata["file_digests"]  # checked whenever the model is opened
    # Called as a Triton or KServe user calls it, by the recorded input names: the reference rows' stored
    # probabilities and labels (scikit-learn's, at training) come back.
    reference = stored.load_reference()
    runner = session(kept)
    inputs = {
        item["name"]: reference[item["feature"]].to_numpy(dtype=np.float64).reshape(-1, 1)
        for item in outcome["inputs"]
    }
    assert {item["datatype"] for item in outcome["inputs"]} == {"FP64"}
    labels, probabilities = runner.run(["label", "probabilities"], inputs)
    classes = stored.classes or []
    expected = reference[[f"_proba_{label}" for label in classes]].to_numpy()
    np.testing.assert_allclose(probabilities, expected, rtol=0, atol=TOLERANCE)
    assert np.array_equal(labels, reference["_prediction"].to_numpy())
