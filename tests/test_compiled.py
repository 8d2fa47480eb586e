"""models/compiled.py: the numpy preprocessing gives the estimator exactly what the fitted ColumnTransformer
gives it, on training rows and on edge rows (missing everywhere, unseen and pooled categories, values far
beyond the training range), for both tables and with and without scaling; every candidate estimator scores
as scikit-learn does; a model it cannot compile, or a scorer that differs, is left to scikit-learn.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pandas as pd
import pytest
from sklearn.ensemble import (
    HistGradientBoostingClassifier,
    HistGradientBoostingRegressor,
    RandomForestClassifier,
    RandomForestRegressor,
)
from sklearn.linear_model import LogisticRegression, Ridge
from sklearn.neighbors import KNeighborsClassifier
from sklearn.pipeline import Pipeline

from models import compiled as compiled_module
from models.candidates import preprocessor
from models.compiled import (
    CompiledPipeline,
    Outcome,
    compile_pipeline,
    compile_preprocessing,
    edge_rows,
    prove,
)
from models.schema import FeatureSchema
from tests.tables import breast_cancer_table, mixed_table, with_many_shops


def prove_on_breast_cancer() -> tuple[CompiledPipeline | None, Outcome]:
    """A logistic regression fitted on the first 450 rows, proven on the other 119 (and 4 edge rows)."""
    table = breast_cancer_table()
    features = table.drop(columns=["diagnosis"])
    schema = FeatureSchema.infer(features)
    prepared = schema.prepare(features)
    pipeline = Pipeline(
        [("preprocess", preprocessor(schema, True)), ("model", LogisticRegression(max_iter=5000))]
    )
    pipeline.fit(prepared.head(450), table["diagnosis"].head(450))
    return prove(pipeline, schema, prepared.tail(119), classification=True)


@pytest.mark.parametrize(
    ("table", "target"),
    [(breast_cancer_table(), "diagnosis"), (mixed_table(600), "segment"), (with_many_shops(), "segment")],
    ids=["breast-cancer", "mixed", "pooled-categories"],
)
@pytest.mark.parametrize("scale", [True, False], ids=["scaled", "unscaled"])
def test_numpy_preprocessing_equals_the_column_transformer(
    table: pd.DataFrame, target: str, scale: bool
) -> None:
    features = table.drop(columns=[target])
    schema = FeatureSchema.infer(features)
    prepared = schema.prepare(features)
    pipeline = Pipeline(
        [("preprocess", preprocessor(schema, scale)), ("model", LogisticRegression(max_iter=5000))]
    ).fit(prepared, table[target])
    compiled = compile_preprocessing(pipeline, schema)
    for frame in (prepared, edge_rows(schema, prepared)):
        rows = frame.to_numpy(dtype=object)
        expected = pipeline[0].transform(schema.frame_of_rows(rows))
        assert np.array_equal(compiled.transform(rows), expected)


@pytest.mark.parametrize(
    ("table", "target", "estimator"),
    [
        (breast_cancer_table(), "diagnosis", LogisticRegression(max_iter=5000)),
        (mixed_table(600, classes=3), "segment", LogisticRegression(max_iter=5000)),
        (mixed_table(600, regression=True), "spend", Ridge(alpha=1.0)),
    ],
    ids=["binary", "three-classes", "regression"],
)
def test_linear_models_score_as_scikit_learn(table: pd.DataFrame, target: str, estimator: object) -> None:
    features = table.drop(columns=[target])
    schema = FeatureSchema.infer(features)
    prepared = schema.prepare(features)
    pipeline = Pipeline([("preprocess", preprocessor(schema, True)), ("model", estimator)])
    pipeline.fit(prepared, table[target])
    compiled = compile_pipeline(pipeline, schema)
    for frame in (prepared, edge_rows(schema, prepared)):
        rows = frame.to_numpy(dtype=object)
        model_input = schema.frame_of_rows(rows)
        expected = pipeline.predict(model_input) if target == "spend" else pipeline.predict_proba(model_input)
        np.testing.assert_allclose(compiled(rows), expected, rtol=0, atol=1e-12)


TREES = [
    (RandomForestClassifier(50, min_samples_leaf=2, random_state=0), "segment", 2),
    (RandomForestClassifier(50, min_samples_leaf=2, random_state=0), "segment", 3),
    (RandomForestRegressor(50, min_samples_leaf=2, random_state=0), "spend", 0),
    (HistGradientBoostingClassifier(max_iter=30, random_state=0), "segment", 2),
    (HistGradientBoostingClassifier(max_iter=30, random_state=0), "segment", 3),
    (HistGradientBoostingRegressor(max_iter=30, random_state=0), "spend", 0),
]


@pytest.mark.parametrize(
    ("estimator", "target", "classes"),
    TREES,
    ids=["forest-2", "forest-3", "forest-regressor", "boosting-2", "boosting-3", "boosting-regressor"],
)
def test_tree_ensembles_score_as_scikit_learn(estimator: object, target: str, classes: int) -> None:
    table = mixed_table(600, classes=max(classes, 2), regression=not classes)
    features = table.drop(columns=[target])
    schema = FeatureSchema.infer(features)
    prepared = schema.prepare(features)
    pipeline = Pipeline([("preprocess", preprocessor(schema, False)), ("model", estimator)])
    pipeline.fit(prepared.head(450), table[target].head(450))
    compiled = compile_pipeline(pipeline, schema)
    assert set(compiled.paths()) == {"numpy", "large batches"}
    for frame in (prepared.tail(150), edge_rows(schema, prepared)):
        rows = frame.to_numpy(dtype=object)
        model_input = schema.frame_of_rows(rows)
        expected = pipeline.predict_proba(model_input) if classes else pipeline.predict(model_input)
        for score in compiled.paths().values():
            # Leaves are found exactly; only the order of the sums may differ.
            np.testing.assert_allclose(score(rows), expected, rtol=0, atol=1e-12)


def test_a_model_that_cannot_be_compiled_is_served_by_scikit_learn_with_its_reason() -> None:
    table = mixed_table(200)
    features = table.drop(columns=["segment"])
    schema = FeatureSchema.infer(features)
    prepared = schema.prepare(features)
    pipeline = Pipeline([("preprocess", preprocessor(schema, True)), ("model", KNeighborsClassifier())])
    pipeline.fit(prepared, table["segment"])
    compiled, outcome = prove(pipeline, schema, prepared.tail(40), classification=True)
    assert compiled is None
    assert outcome.scorer == "scikit-learn"
    assert outcome.reason == "no compiled scorer for KNeighborsClassifier"


@pytest.mark.parametrize(
    ("error", "reason"),
    [
        (2e-6, "differs from scikit-learn by 2e-06 (more than 1e-06; numpy)"),
        (0.6, "a label differs from scikit-learn's (numpy)"),
    ],
)
def test_a_compiled_scorer_that_differs_is_not_used(
    monkeypatch: pytest.MonkeyPatch, error: float, reason: str
) -> None:
    # A scorer that is off by `error`: what a wrong formula in this module would give.
    def off_by_error(pipeline: Pipeline, schema: FeatureSchema) -> CompiledPipeline:
        right = compile_pipeline(pipeline, schema)
        return replace(right, estimator=lambda matrix: right.estimator(matrix) + np.array([error, -error]))

    monkeypatch.setattr(compiled_module, "compile_pipeline", off_by_error)
    compiled, outcome = prove_on_breast_cancer()
    assert compiled is None
    assert (outcome.scorer, outcome.reason, outcome.rows_checked) == ("scikit-learn", reason, 123)


def test_a_linear_model_is_proven_on_held_out_and_edge_rows() -> None:
    compiled, outcome = prove_on_breast_cancer()
    assert compiled is not None
    assert outcome.scorer == "compiled"
    assert outcome.rows_checked == 119 + 4
    assert outcome.max_difference is not None
    assert outcome.max_difference < 1e-12
