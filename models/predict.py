"""Turn prepared rows into predictions: one definition shared by the service, the reference set and tests."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

if TYPE_CHECKING:  # imported by joblib with the model; see split() in models/data.py
    from sklearn.pipeline import Pipeline

from models.data import Task


@dataclass(frozen=True)
class Predictions:
    """`labels` holds class labels (classification) or predicted values (regression); `probabilities` has
    one column per entry of `classes`, in that order, and is None for regression."""

    labels: np.ndarray
    probabilities: np.ndarray | None
    classes: list[object] | None


def predict(pipeline: Pipeline, prepared: pd.DataFrame, task: Task) -> Predictions:
    if task is Task.REGRESSION:
        return Predictions(labels=pipeline.predict(prepared), probabilities=None, classes=None)
    probabilities = pipeline.predict_proba(prepared)
    classes = pipeline.classes_.tolist()
    # The label is the most probable class, so label and probabilities can never disagree.
    labels = pipeline.classes_[probabilities.argmax(axis=1)]
    return Predictions(labels=labels, probabilities=probabilities, classes=classes)
