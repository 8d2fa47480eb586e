"""Explanations: additive to the model's own output in the units they name, for every method; summed into
the input columns they come from (models/explain.py); computed off the event loop with a bound on the work
waiting (serving/explaining.py); served by /explain, /explain_batch and OIP outputs requested by name on a
real `bentoml serve`; and the model card's importance and evaluation data in /model (models/card.py)."""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pandas as pd
import pytest
import shap
import tritonclient.grpc as triton_grpc
from scipy.special import expit, softmax
from sklearn.ensemble import GradientBoostingClassifier
from sklearn.neighbors import KNeighborsClassifier, KNeighborsRegressor
from sklearn.pipeline import Pipeline

from models.candidates import candidates, preprocessor
from models.data import Task, load_default
from models.explain import Explainer, ExplainerOptions, input_origins
from models.schema import FeatureKind, FeatureSchema
from models.store import REFERENCE_FILE, StoredModel
from serving.arrowlog import ArrowLog
from serving.dataplane import DataPlane
from serving.errors import BadInputError, UnavailableError
from serving.explaining import ExplainThread, VersionExplainer
from serving.metrics import serving_metrics
from tests.conftest import Server, logged_rows
from tests.tables import mixed_table

TOLERANCE = 1e-6
OPTIONS = ExplainerOptions(background_rows=30, permutations=2, seed=0)

# ---- in process: the explainer -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Fitted:
    schema: FeatureSchema
    pipeline: Pipeline
    train: pd.DataFrame  # prepared
    test: pd.DataFrame  # prepared, with odd rows added (unknown category, missing values) where possible
    classes: list[Any] | None


def table(name: str) -> tuple[pd.DataFrame, pd.Series, Task]:
    if name == "breast_cancer":
        default = load_default()
        return default.features, default.target, Task.CLASSIFICATION
    frame = mixed_table(300, classes=3 if name == "mixed3" else 2, regression=name == "mixed_regression")
    target = "spend" if name == "mixed_regression" else "segment"
    task = Task.REGRESSION if name == "mixed_regression" else Task.CLASSIFICATION
    return frame.drop(columns=[target, "customer_id"]), frame[target], task


@cache
def fitted(name: str, estimator: str) -> Fitted:
    X, y, task = table(name)
    schema = FeatureSchema.infer(X)
    prepared = schema.prepare(X)
    if estimator == "knn":
        model = KNeighborsClassifier() if task is Task.CLASSIFICATION else KNeighborsRegressor()
        pipeline = Pipeline([("preprocess", preprocessor(schema, scale=True)), ("model", model)])
    elif estimator == "gradient_boosting":
        pipeline = Pipeline(
            [
                ("preprocess", preprocessor(schema, False)),
                ("model", GradientBoostingClassifier(n_estimators=10)),
            ]
        )
    else:
        pipeline = candidates(task, schema, seed=0)[estimator]
    train, test = prepared.iloc[:240], prepared.iloc[240:260]
    pipeline.fit(train, y.iloc[:240])
    if "city" in schema.names:  # a category never seen, and every column missing that may be
        odd = pd.DataFrame(
            [{"age": np.nan, "income": 30000.0, "city": "marseille", "member": np.nan}], columns=schema.names
        )
        test = pd.concat([test, schema.prepare(odd)], ignore_index=True)
    classes = pipeline.classes_.tolist() if task is Task.CLASSIFICATION else None
    return Fitted(schema, pipeline, train, test.reset_index(drop=True), classes)


CASES = [
    ("breast_cancer", "logistic_regression", "linear", "log_odds"),
    ("breast_cancer", "hist_gradient_boosting", "tree", "log_odds"),
    ("mixed", "random_forest", "tree", "probability"),
    ("mixed", "knn", "permutation", "probability"),
    ("mixed3", "logistic_regression", "linear", "log_odds"),
    ("mixed3", "hist_gradient_boosting", "tree", "log_odds"),
    ("mixed3", "random_forest", "tree", "probability"),
    ("mixed3", "knn", "permutation", "probability"),
    ("mixed_regression", "ridge", "linear", "value"),
    ("mixed_regression", "hist_gradient_boosting", "tree", "value"),
    ("mixed_regression", "knn", "permutation", "value"),
]


def own_output(model: Fitted, output: str, rows: pd.DataFrame, explained: list[int]) -> np.ndarray:
    """The pipeline's output for each row's explained class, in `output` units, computed here."""
    taken = np.arange(len(rows))
    if output == "value":
        return np.asarray(model.pipeline.predict(rows))
    probabilities = model.pipeline.predict_proba(rows)
    if output == "probability":
        return probabilities[taken, explained]
    margins = model.pipeline[-1].decision_function(model.pipeline[:-1].transform(rows))
    if margins.ndim == 1:  # binary: the margin is the log-odds of classes[1]
        assert np.allclose(expit(margins), probabilities[:, 1], rtol=0, atol=1e-12)
        return margins
    assert np.allclose(softmax(margins, axis=1), probabilities, rtol=0, atol=1e-12)
    return margins[taken, explained]


@pytest.mark.parametrize(("name", "estimator", "method", "output"), CASES, ids=str)
def test_base_plus_attributions_is_the_models_output_in_its_units(
    name: str, estimator: str, method: str, output: str
) -> None:
    model = fitted(name, estimator)
    explainer = Explainer(model.pipeline, model.schema, model.classes, model.train, OPTIONS)
    assert (explainer.method, explainer.output, explainer.fallback) == (method, output, None)
    explained = explainer.explain(model.test)
    assert explained.attributions.shape == (len(model.test), len(model.schema.names))
    assert np.isfinite(explained.attributions).all()
    total = explained.base_values + explained.attributions.sum(axis=1)
    assert np.max(np.abs(total - explained.output_values)) <= TOLERANCE
    if model.classes is None:
        assert explained.explained_classes is None
        indices: list[int] = []
    else:
        predicted = model.pipeline.predict_proba(model.test).argmax(axis=1)
        # Binary: the class the margin is for, whatever was predicted; multiclass: the predicted one.
        indices = [1] * len(predicted) if len(model.classes) == 2 else predicted.tolist()
        assert explained.explained_classes == [str(model.classes[index]) for index in indices]
    expected = own_output(model, output, model.test, indices)
    assert np.max(np.abs(explained.output_values - expected)) <= TOLERANCE


def test_each_preprocessed_column_is_traced_to_its_input_column() -> None:
    """Changing one input column changes exactly the preprocessed columns traced to it: its value and
    missing indicator, or its one-hot columns; booleans, text and missing values included."""
    model = fitted("mixed", "logistic_regression")
    names, preprocess = model.schema.names, model.pipeline[:-1]
    origins = input_origins(model.pipeline, names)
    out_names = preprocess.get_feature_names_out().tolist()
    assert len(origins) == len(out_names) > len(names)
    assert {out_names[i] for i in np.flatnonzero(origins == names.index("city"))} == {
        name for name in out_names if name.startswith("city_")
    }
    assert {out_names[i] for i in np.flatnonzero(origins == names.index("age"))} == {
        "age",
        "missingindicator_age",
    }
    base = model.test.head(10).reset_index(drop=True)
    before = preprocess.transform(base)
    for index, feature in enumerate(model.schema.features):
        if feature.kind is FeatureKind.CATEGORICAL:
            values: list[Any] = [*feature.categories, np.nan, "marseille"]  # prepared: NaN missing
        elif feature.kind is FeatureKind.BOOLEAN:
            values = [1.0, 0.0, np.nan]
        else:
            values = [np.nan, 1.0, 5e4]
        moved: set[int] = set()
        for value in values:  # the whole column set to each value in turn
            changed = preprocess.transform(base.assign(**{feature.name: [value] * len(base)}))
            moved |= set(np.flatnonzero(np.any(changed != before, axis=0)).tolist())
        assert moved == set(np.flatnonzero(origins == index).tolist()), feature.name


def test_attributions_are_the_sums_of_their_columns_shap_values() -> None:
    model = fitted("mixed", "logistic_regression")
    explainer = Explainer(model.pipeline, model.schema, model.classes, model.train, OPTIONS)
    preprocess, estimator = model.pipeline[:-1], model.pipeline[-1]
    background = preprocess.transform(model.train)
    direct = shap.LinearExplainer(
        estimator, shap.maskers.Independent(background, max_samples=len(background))
    )
    values = direct.shap_values(preprocess.transform(model.test))
    out_names = preprocess.get_feature_names_out().tolist()
    explained = explainer.explain(model.test)
    for index, name in enumerate(model.schema.names):
        columns = [
            i
            for i, out in enumerate(out_names)
            if out in (name, f"missingindicator_{name}") or out.startswith(f"{name}_")
        ]
        assert np.allclose(explained.attributions[:, index], values[:, columns].sum(axis=1), atol=1e-12)
    # The unseen city encodes as no city at all: its attribution is what having none of them adds.
    unseen = model.test.index[model.test["city"] == "marseille"][0]
    assert explained.attributions[unseen, model.schema.names.index("city")] != 0


def test_multiclass_explains_the_class_asked_for() -> None:
    model = fitted("mixed3", "hist_gradient_boosting")
    explainer = Explainer(model.pipeline, model.schema, model.classes, model.train, OPTIONS)
    asked = np.arange(len(model.test)) % 3
    explained = explainer.explain(model.test, asked)
    assert explained.explained_classes == [str(model.classes[index]) for index in asked]
    total = explained.base_values + explained.attributions.sum(axis=1)
    assert np.max(np.abs(total - own_output(model, "log_odds", model.test, asked.tolist()))) <= TOLERANCE


def test_a_tree_model_shap_cannot_explain_falls_back_to_permutation() -> None:
    model = fitted("mixed3", "gradient_boosting")  # shap's TreeExplainer takes binary ones only
    explainer = Explainer(model.pipeline, model.schema, model.classes, model.train, OPTIONS)
    assert (explainer.method, explainer.output) == ("permutation", "probability")
    assert explainer.fallback is not None
    assert explainer.fallback.startswith("tree: ")
    explained = explainer.explain(model.test)
    total = explained.base_values + explained.attributions.sum(axis=1)
    assert np.max(np.abs(total - explained.output_values)) <= TOLERANCE


# ---- in process: the data plane's explanations -------------------------------------------------------------


def stored_model(model: Fitted, folder: Path) -> StoredModel:
    """A StoredModel over a fitted pipeline, with its reference rows on disk as the store keeps them."""
    model.train.to_parquet(folder / REFERENCE_FILE, index=False)
    stored = StoredModel(
        tag="toy:v1",
        name="toy",
        version="v1",
        path=folder,
        labels={"registered_version": "1", "mlflow_run_id": "run", "registered_model": "toy", "alias": "c"},
        metadata={"task": "classification", "classes": model.classes, "dataset_digest": "digest"},
        schema=model.schema,
    )
    stored.__dict__["pipeline"] = model.pipeline  # as the cached property holds it once loaded
    return stored


def test_the_data_plane_predicts_logs_then_explains_and_refuses_when_full(tmp_path: Path) -> None:
    model = fitted("mixed3", "logistic_regression")
    stored = stored_model(model, tmp_path)
    calls: list[int] = []

    async def call_model(rows: np.ndarray) -> np.ndarray:
        calls.append(len(rows))
        return np.asarray(model.pipeline.predict_proba(model.schema.frame_of_rows(rows)))

    thread = ExplainThread(max_queue_rows=4)
    explainer = VersionExplainer(stored, thread, OPTIONS, max_rows=3)
    (tmp_path / "log").mkdir()
    log = ArrowLog(tmp_path / "log", 1_000_000, 1)
    plane = DataPlane(
        stored, call_model, {"scorer": "scikit-learn"}, log, serving_metrics(), explainer=explainer
    )
    raw = table("mixed3")[0].iloc[240:244]  # the rows of model.test, as requests give them
    rows = raw.astype(object).where(raw.notna(), None).to_numpy(dtype=object)[:3]

    async def scenario() -> None:
        batch, explained = await plane.explain_rows(rows, "http", "/explain_batch", "req-1")
        assert calls == [3]
        assert explained.explained_classes == [str(label) for label in batch.labels]
        margins = model.pipeline.decision_function(model.test.head(3))
        probabilities = softmax(margins, axis=1)
        assert np.allclose(batch.probabilities, probabilities, atol=1e-12)
        answers = plane.explained_responses(batch, explained)
        assert [answer["explanation"]["explained_class"] for answer in answers] == batch.labels
        assert list(answers[0]["explanation"]["attributions"]) == model.schema.names
        with pytest.raises(BadInputError, match="TABSERVE_EXPLAIN_MAX_RECORDS"):
            await plane.explain_rows(raw.to_numpy(dtype=object), "http", "/explain_batch")
        with thread.place(3):  # three rows already wait: one more fits, two do not
            with pytest.raises(UnavailableError) as refused:
                await plane.explain_rows(rows[:2], "http", "/explain_batch")
            assert refused.value.status == 503
            assert int(refused.value.headers["Retry-After"]) >= 1
            assert calls == [3]  # refused before it was predicted
            await plane.explain_rows(rows[:1], "http", "/explain")
        assert thread.queued_rows == 0

    asyncio.run(scenario())
    thread.close()
    log.close()
    assert [row["endpoint"] for row in logged_rows(tmp_path / "log")] == ["/explain_batch"] * 3 + ["/explain"]
    assert explainer.explainer is not None
    assert explainer.explainer.method == "linear"


# ---- a real `bentoml serve` --------------------------------------------------------------------------------

RECORDS = [
    {str(k): float(v) for k, v in row.items()} for _, row in load_default().features.iloc[::47].iterrows()
]


def post(server: Server, path: str, body: Any) -> httpx.Response:
    return httpx.post(f"{server.url}{path}", json=body, timeout=60)


def assert_explains(answer: dict[str, Any], names: list[str]) -> None:
    """The default model's explanation: logistic regression, the log-odds of 'malignant'."""
    explanation = answer["explanation"]
    assert set(explanation) == {
        "method",
        "output",
        "explained_class",
        "base_value",
        "output_value",
        "attributions",
    }
    assert (explanation["method"], explanation["output"]) == ("linear", "log_odds")
    assert explanation["explained_class"] == "malignant"
    assert list(explanation["attributions"]) == names
    total = explanation["base_value"] + sum(explanation["attributions"].values())
    assert abs(total - explanation["output_value"]) <= TOLERANCE
    assert abs(expit(explanation["output_value"]) - answer["probabilities"]["malignant"]) <= 1e-9


def test_explain_answers_the_prediction_and_why(server: Server) -> None:
    response = post(server, "/explain", RECORDS[0])
    assert response.status_code == 200, response.text
    answer = response.json()
    predicted = post(server, "/predict", RECORDS[0]).json()
    for key in ["prediction", "probabilities", "unknown_categories", "version", "registered_version"]:
        assert answer[key] == predicted[key]
    assert answer["row"] == 0
    assert answer["request_id"] == response.headers["x-request-id"]
    assert_explains(answer, list(RECORDS[0]))


def test_explain_batch_explains_every_record_in_order(server: Server) -> None:
    response = post(server, "/explain_batch", RECORDS)
    assert response.status_code == 200, response.text
    answers = response.json()
    predicted = post(server, "/predict_batch", RECORDS).json()
    assert [a["prediction"] for a in answers] == [p["prediction"] for p in predicted]
    assert [a["row"] for a in answers] == list(range(len(RECORDS)))
    for answer in answers:
        assert_explains(answer, list(RECORDS[0]))
    assert {answer["prediction"] for answer in answers} == {"benign", "malignant"}


def test_explanations_are_logged_as_predictions(server: Server) -> None:
    record = {**RECORDS[5], "mean radius": 14.25}
    answer = post(server, "/explain", record).json()

    def logged() -> list[dict[str, Any]]:
        return [row for row in logged_rows(server.log_dir) if row["request_id"] == answer["request_id"]]

    deadline = time.monotonic() + 10  # the log is written by a background thread
    while not logged() and time.monotonic() < deadline:
        time.sleep(0.1)
    (entry,) = logged()
    assert (entry["endpoint"], entry["transport"], entry["prediction"]) == (
        "/explain",
        "http",
        answer["prediction"],
    )


@pytest.mark.parametrize(
    ("path", "body", "named"),
    [
        ("/explain", {**RECORDS[0], "mean radius": "big"}, "'mean radius': Input should be a valid number"),
        ("/explain", {**RECORDS[0], "colour": "red"}, "'colour': Extra inputs are not permitted"),
        (
            "/explain",
            {**RECORDS[0], "mean area": 1e300},
            "'mean area': 1e+300 is beyond what the model takes",
        ),
        ("/explain_batch", [RECORDS[0], {**RECORDS[1], "worst area": None}], "record 1, 'worst area'"),
        ("/explain_batch", [], "List should have at least 1 item"),
        ("/explain_batch", RECORDS * 9, "List should have at most 100 items"),
    ],
    ids=["wrong type", "unknown field", "beyond the limit", "null in a batch", "empty", "too many"],
)
def test_bad_requests_get_400_naming_the_problem(server: Server, path: str, body: Any, named: str) -> None:
    response = post(server, path, body)
    assert response.status_code == 400, response.text
    assert named in response.json()["error"]


def test_explain_takes_json_only(server: Server) -> None:
    for body in [json.dumps(RECORDS[0]), "{"]:  # the media type is refused before the body's problems
        response = httpx.post(
            f"{server.url}/explain", content=body, headers={"content-type": "text/plain"}, timeout=30
        )
        assert response.status_code == 415
        assert response.json() == {"error": "Content-Type must be application/json, got text/plain"}
    spec = httpx.get(f"{server.url}/docs.json", timeout=30).json()["paths"]
    for path in ["/explain", "/explain_batch"]:
        assert {"200", "400", "415", "503"} <= set(spec[path]["post"]["responses"])


def oip_columns(records: list[dict[str, float]]) -> list[dict[str, Any]]:
    return [
        {"name": name, "datatype": "FP64", "shape": [len(records)], "data": [r[name] for r in records]}
        for name in records[0]
    ]


def test_oip_rest_explanation_outputs_only_when_asked_for(server: Server) -> None:
    url = f"{server.url}/v2/models/breast_cancer"
    metadata = httpx.get(url, timeout=30).json()
    explanation_outputs = ["attributions", "base_value", "output_value", "explained_class"]
    assert [output["name"] for output in metadata["outputs"]] == [
        "label",
        "probabilities",
        *explanation_outputs,
    ]
    assert metadata["outputs"][2]["shape"] == [-1, len(RECORDS[0])]
    assert metadata["parameters"]["explanation_outputs"] == explanation_outputs
    plain = httpx.post(f"{url}/infer", json={"inputs": oip_columns(RECORDS[:3])}, timeout=30).json()
    assert [output["name"] for output in plain["outputs"]] == ["label", "probabilities"]
    assert "parameters" not in plain
    asked = [{"name": name} for name in ["probabilities", "attributions", "base_value", "output_value"]]
    body = {"inputs": oip_columns(RECORDS[:3]), "outputs": asked}
    answer = httpx.post(f"{url}/infer", json=body, timeout=30).json()
    assert answer["parameters"] == {
        "explanation_method": "linear",
        "explanation_output": "log_odds",
        "explained_class": "malignant",
    }
    outputs = {output["name"]: output for output in answer["outputs"]}
    attributions = np.array(outputs["attributions"]["data"]).reshape(outputs["attributions"]["shape"])
    assert attributions.shape == (3, len(RECORDS[0]))
    total = np.array(outputs["base_value"]["data"]) + attributions.sum(axis=1)
    assert np.max(np.abs(total - outputs["output_value"]["data"])) <= TOLERANCE
    malignant = np.array(outputs["probabilities"]["data"]).reshape(3, 2)[:, 1]
    assert np.allclose(expit(np.array(outputs["output_value"]["data"])), malignant, rtol=0, atol=1e-9)
    too_many = {"inputs": oip_columns(RECORDS * 9), "outputs": asked}
    refused = httpx.post(f"{url}/infer", json=too_many, timeout=30)
    assert refused.status_code == 400
    assert "at most 100 per request" in refused.json()["error"]


def test_grpc_explanation_outputs(server: Server) -> None:
    client = triton_grpc.InferenceServerClient(server.grpc_target)
    inputs = [
        triton_grpc.InferInput(name, [4], "FP64").set_data_from_numpy(
            np.array([r[name] for r in RECORDS[:4]])
        )
        for name in RECORDS[0]
    ]
    names = ["label", "attributions", "base_value", "output_value", "explained_class"]
    result = client.infer(
        "breast_cancer", inputs, outputs=[triton_grpc.InferRequestedOutput(n) for n in names]
    )
    parameters = result.get_response().parameters
    assert parameters["explanation_method"].string_param == "linear"
    assert parameters["explanation_output"].string_param == "log_odds"
    assert parameters["explained_class"].string_param == "malignant"
    attributions = result.as_numpy("attributions")
    assert attributions.shape == (4, len(RECORDS[0]))
    total = result.as_numpy("base_value") + attributions.sum(axis=1)
    assert np.max(np.abs(total - result.as_numpy("output_value"))) <= TOLERANCE
    assert result.as_numpy("explained_class").tolist() == [b"malignant"] * 4
    plain = client.infer("breast_cancer", inputs)
    assert plain.as_numpy("attributions") is None
    assert not plain.get_response().parameters
    metadata = client.get_model_metadata("breast_cancer", as_json=True)
    assert [output["name"] for output in metadata["outputs"]][2:] == names[1:]


def test_model_shows_importance_and_evaluation(server: Server) -> None:
    info = httpx.get(f"{server.url}/model", timeout=30).json()
    importance = info["importance"]
    assert (importance["method"], importance["metric"], importance["repeats"]) == (
        "permutation",
        "roc_auc",
        5,
    )
    importances = importance["importances"]
    assert sorted(importances) == sorted(RECORDS[0])
    means = [entry["mean"] for entry in importances.values()]
    assert means == sorted(means, reverse=True)
    assert means[0] > 0
    assert all(entry["std"] >= 0 for entry in importances.values())
    evaluation = info["evaluation"]
    assert evaluation["kind"] == "confusion_matrix"
    assert evaluation["labels"] == ["benign", "malignant"]
    counts = np.array(evaluation["matrix"])
    assert counts.shape == (2, 2)
    assert counts.sum() == evaluation["rows"] == importance["rows"]
    assert np.trace(counts) / counts.sum() == pytest.approx(info["test_metrics"]["accuracy"])
