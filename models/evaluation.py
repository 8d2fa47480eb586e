"""Metrics, cross-validated comparison of candidates, and the plots logged with each run."""

from __future__ import annotations

from dataclasses import dataclass

import matplotlib

matplotlib.use("Agg")  # headless: training runs on servers and in CI

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from sklearn import metrics as skm
from sklearn.base import clone
from sklearn.dummy import DummyClassifier, DummyRegressor
from sklearn.model_selection import KFold, StratifiedKFold, cross_val_score
from sklearn.pipeline import Pipeline

from models.data import Task


@dataclass(frozen=True)
class Metric:
    name: str
    task: Task
    greater_is_better: bool

    def scorer(self, n_classes: int) -> str:
        """The scikit-learn scorer name used for cross-validation."""
        if self.name == "roc_auc" and n_classes > 2:
            return "roc_auc_ovr"
        return _SCORERS[self.name]

    def improvement(self, new: float, old: float) -> float:
        """How much better `new` is than `old` (positive = better), whatever the metric's direction."""
        return new - old if self.greater_is_better else old - new


_SCORERS = {
    "accuracy": "accuracy",
    "f1_macro": "f1_macro",
    "roc_auc": "roc_auc",
    "log_loss": "neg_log_loss",
    "rmse": "neg_root_mean_squared_error",
    "mae": "neg_mean_absolute_error",
    "r2": "r2",
}
METRICS = {
    metric.name: metric
    for metric in [
        Metric("accuracy", Task.CLASSIFICATION, greater_is_better=True),
        Metric("f1_macro", Task.CLASSIFICATION, greater_is_better=True),
        Metric("roc_auc", Task.CLASSIFICATION, greater_is_better=True),
        Metric("log_loss", Task.CLASSIFICATION, greater_is_better=False),
        Metric("rmse", Task.REGRESSION, greater_is_better=False),
        Metric("mae", Task.REGRESSION, greater_is_better=False),
        Metric("r2", Task.REGRESSION, greater_is_better=True),
    ]
}
DEFAULT_METRIC = {Task.CLASSIFICATION: "roc_auc", Task.REGRESSION: "rmse"}


@dataclass(frozen=True)
class CandidateScore:
    name: str
    mean: float
    std: float


def cross_validate(
    name: str,
    pipeline: Pipeline,
    X: pd.DataFrame,
    y: pd.Series,
    task: Task,
    metric: Metric,
    folds: int,
    seed: int,
) -> CandidateScore:
    """Score a candidate by k-fold cross-validation on the training split, in the metric's own units."""
    splitter = (
        StratifiedKFold(folds, shuffle=True, random_state=seed)
        if task is Task.CLASSIFICATION
        else KFold(folds, shuffle=True, random_state=seed)
    )
    scorer = metric.scorer(y.nunique())
    scores = cross_val_score(clone(pipeline), X, y, scoring=scorer, cv=splitter, n_jobs=1)
    # scikit-learn negates loss scorers so that greater is better; report the metric as users know it.
    if scorer.startswith("neg_"):
        scores = -scores
    return CandidateScore(name=name, mean=float(np.mean(scores)), std=float(np.std(scores)))


def dummy_baseline(task: Task, X: pd.DataFrame, y: pd.Series) -> Pipeline:
    """The constant model every version must beat: the training split's class shares for every row, or
    its mean target. A pipeline like the candidates, so that it is scored the same way."""
    estimator = DummyClassifier(strategy="prior") if task is Task.CLASSIFICATION else DummyRegressor()
    return Pipeline([("model", estimator)]).fit(X, y)


def test_metrics(model: Pipeline, X: pd.DataFrame, y: pd.Series, task: Task) -> dict[str, float]:
    """Every metric of the task on held-out rows: what the run logs and what the promotion gate compares."""
    if task is Task.REGRESSION:
        predicted = model.predict(X)
        return {
            "rmse": float(skm.root_mean_squared_error(y, predicted)),
            "mae": float(skm.mean_absolute_error(y, predicted)),
            "r2": float(skm.r2_score(y, predicted)),
        }
    classes = list(model.classes_)
    probabilities = model.predict_proba(X)
    predicted = np.asarray(classes, dtype=object)[probabilities.argmax(axis=1)]
    truth = y.to_numpy(dtype=object)
    if len(classes) == 2:
        roc_auc = skm.roc_auc_score(truth == classes[1], probabilities[:, 1])
    else:
        roc_auc = skm.roc_auc_score(truth, probabilities, multi_class="ovr", labels=classes)
    return {
        "accuracy": float(skm.accuracy_score(truth, predicted)),
        "f1_macro": float(skm.f1_score(truth, predicted, average="macro", labels=classes)),
        "roc_auc": float(roc_auc),
        "log_loss": float(skm.log_loss(truth, probabilities, labels=classes)),
    }


@dataclass(frozen=True)
class HeldOutAnswers:
    """The model's answers on the held-out test rows, computed once for the run's figures (`plots`) and the
    model card's evaluation (models/card.py)."""

    task: Task
    actual: np.ndarray  # regression: the values; classification: the true classes, as strings
    predicted: np.ndarray  # regression: the values; classification: the predicted classes, as strings
    labels: list[str]  # classification: the classes in the model's order, as strings; regression: none
    probabilities: np.ndarray | None  # classification: one column per label


def held_out_answers(model: Pipeline, X: pd.DataFrame, y: pd.Series, task: Task) -> HeldOutAnswers:
    if task is Task.REGRESSION:
        predicted = np.asarray(model.predict(X), dtype=np.float64)
        return HeldOutAnswers(task, y.to_numpy(dtype=np.float64), predicted, [], None)
    labels = [str(label) for label in model.classes_]
    probabilities = model.predict_proba(X)
    predicted = np.asarray(labels, dtype=object)[probabilities.argmax(axis=1)]
    return HeldOutAnswers(task, y.astype(str).to_numpy(), predicted, labels, probabilities)


def plots(answers: HeldOutAnswers) -> dict[str, Figure]:
    """Figures by artifact file name: confusion matrix and ROC, or predicted-vs-actual and residuals."""
    if answers.probabilities is None:
        figures = {}
        for kind, name in [
            ("actual_vs_predicted", "actual_vs_predicted.png"),
            ("residual_vs_predicted", "residuals.png"),
        ]:
            figure, axis = plt.subplots(figsize=(6, 5))
            skm.PredictionErrorDisplay.from_predictions(answers.actual, answers.predicted, kind=kind, ax=axis)
            figures[name] = figure
        return figures

    labels, truth = answers.labels, answers.actual
    confusion, axis = plt.subplots(figsize=(6, 5))
    skm.ConfusionMatrixDisplay.from_predictions(
        truth, answers.predicted, labels=labels, ax=axis, colorbar=False
    )
    axis.set_title("Confusion matrix (held-out test rows)")

    roc, axis = plt.subplots(figsize=(6, 5))
    # Binary: the curve for the positive (second) class; multiclass: one-vs-rest for every class.
    shown = labels[1:] if len(labels) == 2 else labels
    for label in shown:
        index = labels.index(label)
        skm.RocCurveDisplay.from_predictions(
            truth == label, answers.probabilities[:, index], name=label, ax=axis
        )
    axis.set_title("ROC (held-out test rows)")
    return {"confusion_matrix.png": confusion, "roc_curve.png": roc}
