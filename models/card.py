"""What a model's card shows beside its metrics, computed at training on the held-out rows and stored in the
model's metadata (`importance`, `evaluation`; `GET /model` shows both):

- global importance: scikit-learn's permutation importance of each input column (the pipeline's own
  input, so a categorical column is shuffled whole, not its one-hot columns one by one), scored with the
  run's metric, a few seeded repeats;
- the evaluation's figure data: the confusion matrix (classification) or a bounded sample of
  (predicted, actual) pairs for a residual plot (regression).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Final

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from sklearn import metrics as skm
from sklearn.inspection import permutation_importance

from models.data import Task
from models.evaluation import HeldOutAnswers, Metric

if TYPE_CHECKING:
    from sklearn.pipeline import Pipeline

# Shuffles per column: the importance is their mean, the spread their standard deviation.
IMPORTANCE_REPEATS: Final = 5
# Predicted-actual pairs kept for a regression's residual plot.
MAX_EVALUATION_PAIRS: Final = 200
# Columns shown in the importance figure (all are stored).
FIGURE_COLUMNS: Final = 20


def importance(
    model: Pipeline,
    X: pd.DataFrame,
    y: pd.Series,
    metric: Metric,
    seed: int,
    repeats: int = IMPORTANCE_REPEATS,
) -> dict[str, Any]:
    """Permutation importance of every input column on held-out rows (`X` prepared): how much the metric
    worsens, in its own units, when the column's values are shuffled among the rows (near 0 or below: the
    model does not rely on it). `importances`: per column, the mean and standard deviation over the
    repeats, columns by decreasing mean."""
    n_classes = int(y.nunique()) if metric.task is Task.CLASSIFICATION else 0
    result = permutation_importance(
        model, X, y, scoring=metric.scorer(n_classes), n_repeats=repeats, random_state=seed, n_jobs=1
    )
    means, spreads = result.importances_mean, result.importances_std
    order = np.argsort(-means, kind="stable")
    return {
        "method": "permutation",
        "metric": metric.name,
        "repeats": repeats,
        "seed": seed,
        "rows": len(X),
        "importances": {
            str(X.columns[index]): {"mean": float(means[index]), "std": float(spreads[index])}
            for index in order
        },
    }


def importance_figure(result: dict[str, Any]) -> Figure:
    shown = list(result["importances"].items())[:FIGURE_COLUMNS][::-1]
    figure, axis = plt.subplots(figsize=(7, 0.3 * len(shown) + 1.5))
    axis.barh(
        [column for column, _ in shown],
        [entry["mean"] for _, entry in shown],
        xerr=[entry["std"] for _, entry in shown],
        color="#4c72b0",
    )
    axis.set_xlabel(f"{result['metric']} lost when the column is shuffled ({result['repeats']} repeats)")
    axis.set_title("Permutation importance (held-out test rows)")
    figure.tight_layout()
    return figure


def evaluation(answers: HeldOutAnswers, seed: int) -> dict[str, Any]:
    """The data of the held-out evaluation's figure, JSON-ready: the confusion matrix (`matrix`: counts,
    rows the true class, columns the predicted class, both in `labels` order) or up to
    MAX_EVALUATION_PAIRS (`predicted`, `actual`) pairs, for a residual plot."""
    if answers.task is Task.REGRESSION:
        rows = len(answers.actual)
        rng = np.random.default_rng(seed)
        kept = np.sort(rng.choice(rows, size=min(MAX_EVALUATION_PAIRS, rows), replace=False))
        return {
            "kind": "residuals",
            "rows": rows,
            "predicted": answers.predicted[kept].tolist(),
            "actual": answers.actual[kept].tolist(),
        }
    counts = skm.confusion_matrix(answers.actual, answers.predicted, labels=answers.labels)
    return {
        "kind": "confusion_matrix",
        "rows": len(answers.actual),
        "labels": answers.labels,
        "matrix": counts.tolist(),
    }
