"""The candidate estimators compared by cross-validation, each a full pipeline from prepared rows.

Inputs arrive as `FeatureSchema.prepare` leaves them: numbers and booleans as float64 with NaN for
missing, categories as strings with NaN for missing.
"""

from __future__ import annotations

from sklearn.compose import ColumnTransformer
from sklearn.ensemble import (
    HistGradientBoostingClassifier,
    HistGradientBoostingRegressor,
    RandomForestClassifier,
    RandomForestRegressor,
)
from sklearn.impute import SimpleImputer
from sklearn.linear_model import LogisticRegression, Ridge
from sklearn.pipeline import Pipeline, make_pipeline
from sklearn.preprocessing import OneHotEncoder, StandardScaler

from models.data import Task
from models.schema import FeatureKind, FeatureSchema

MISSING_CATEGORY = "__missing__"
# Rare categories are pooled into one column so that a high-cardinality column cannot blow up the model.
MAX_CATEGORIES_PER_COLUMN = 50


def preprocessor(schema: FeatureSchema, scale: bool) -> ColumnTransformer:
    numeric_steps: list[object] = [SimpleImputer(strategy="median", add_indicator=True)]
    if scale:
        numeric_steps.append(StandardScaler())
    categorical = make_pipeline(
        SimpleImputer(strategy="constant", fill_value=MISSING_CATEGORY),
        # Unseen categories at serving time encode as all zeros (or the pooled infrequent column).
        OneHotEncoder(
            handle_unknown="infrequent_if_exist",
            max_categories=MAX_CATEGORIES_PER_COLUMN,
            sparse_output=False,
        ),
    )
    numeric_like = schema.names_of(FeatureKind.NUMERIC) + schema.names_of(FeatureKind.BOOLEAN)
    return ColumnTransformer(
        [
            ("numeric", make_pipeline(*numeric_steps), numeric_like),
            ("categorical", categorical, schema.names_of(FeatureKind.CATEGORICAL)),
        ],
        verbose_feature_names_out=False,
    )


def candidates(task: Task, schema: FeatureSchema, seed: int) -> dict[str, Pipeline]:
    """Unfitted pipelines by name. n_jobs=1 everywhere: the served model must not spawn threads per call."""
    if task is Task.CLASSIFICATION:
        estimators: dict[str, tuple[object, bool]] = {
            "logistic_regression": (LogisticRegression(max_iter=5000), True),
            "random_forest": (
                RandomForestClassifier(n_estimators=200, min_samples_leaf=2, random_state=seed, n_jobs=1),
                False,
            ),
            "hist_gradient_boosting": (
                HistGradientBoostingClassifier(max_iter=100, random_state=seed),
                False,
            ),
        }
    else:
        estimators = {
            "ridge": (Ridge(alpha=1.0), True),
            "random_forest": (
                RandomForestRegressor(n_estimators=200, min_samples_leaf=2, random_state=seed, n_jobs=1),
                False,
            ),
            "hist_gradient_boosting": (HistGradientBoostingRegressor(max_iter=100, random_state=seed), False),
        }
    return {
        name: Pipeline([("preprocess", preprocessor(schema, scale)), ("model", estimator)])
        for name, (estimator, scale) in estimators.items()
    }
