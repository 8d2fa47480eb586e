"""Why the model answered what it did: per-row SHAP attributions of a stored model's output, summed back to
the input columns.

The method follows the pipeline's final estimator (models/candidates.py: `preprocess` then `model`):
- tree ensembles (HistGradientBoosting*, RandomForest*, ExtraTrees*, GradientBoosting*, decision trees):
  `shap.TreeExplainer` on the preprocessed rows, path-dependent (no background): exact;
- linear models (LogisticRegression, Ridge, ...): `shap.LinearExplainer` with the preprocessed reference
  rows as background (independent features): exact, `coef * (x - mean)`;
- anything else, or a tree or linear model whose explanation does not check out (below): shap's
  `PermutationExplainer` over the whole pipeline in input space, against a seeded sample of the model's
  reference rows. Additive by construction (each permutation's steps telescope from the background's mean
  output to the row's); the attributions themselves are estimates, better with more permutations.

Units (`output`), and what base + sum of attributions equals for each row:
- `log_odds`: the margin of a classifier whose probabilities are the logistic (binary) or softmax
  (multiclass) of it: trees boosted for log loss, logistic regression. Binary: the log-odds of the second
  class (`classes[1]`), the class the margin is for. Multiclass: the explained class's raw score, whose
  softmax over the classes gives the probabilities.
- `probability`: the explained class's probability (random forests, and the permutation explainer for any
  classifier).
- `value`: the predicted value (regression).

Explained class: binary, always `classes[1]`, whatever was predicted (a negative attribution pushes toward
`classes[0]`); multiclass, each row's predicted class unless told otherwise.

Attributions of preprocessed columns are summed into the input column each comes from, read from the
fitted ColumnTransformer's structure: a numeric column's imputed (and scaled) value and its missing
indicator; a categorical column's one-hot columns, the pooled infrequent one included. Before use, an
explainer is checked on reference rows: base + sum must equal the model's own output (1e-6), and a margin
called log-odds must give the model's probabilities; a tree or linear explainer that fails falls back to
the permutation explainer.

shap is imported only when an explainer is built: it takes about two seconds.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final

import numpy as np
import pandas as pd
from scipy import sparse
from scipy.special import expit, softmax

from models.schema import FeatureKind, FeatureSchema

if TYPE_CHECKING:
    from sklearn.pipeline import Pipeline

TREE, LINEAR, PERMUTATION = "tree", "linear", "permutation"
METHODS: Final = (TREE, LINEAR, PERMUTATION)
LOG_ODDS, PROBABILITY, VALUE = "log_odds", "probability", "value"
OUTPUTS: Final = (LOG_ODDS, PROBABILITY, VALUE)
# Base + sum of attributions against the model's own output, when an explainer is checked.
TOLERANCE: Final = 1e-6
# Reference rows an explainer is checked on before it is used.
CHECK_ROWS: Final = 20
# Preprocessing steps that keep their columns one to one.
ONE_TO_ONE: Final = frozenset(
    [
        "StandardScaler",
        "MinMaxScaler",
        "MaxAbsScaler",
        "RobustScaler",
        "PowerTransformer",
        "QuantileTransformer",
    ]
)


class UnsupportedStructureError(ValueError):
    """The preprocessing's columns cannot be traced back to the input columns."""


@dataclass(frozen=True)
class Explanations:
    """Per row: base value + sum of attributions = output value, in `output` units."""

    method: str
    output: str
    base_values: np.ndarray  # (rows,)
    output_values: np.ndarray  # (rows,): the model's own output for the row, for the explained class
    attributions: np.ndarray  # (rows, input columns), in schema order
    explained_classes: list[str] | None  # per row; None for regression

    def as_dicts(self, names: list[str]) -> list[dict[str, Any]]:
        """The JSON answer's `explanation` of each row."""
        classes: list[str | None] = (
            list(self.explained_classes) if self.explained_classes else [None] * len(self.base_values)
        )
        return [
            {
                "method": self.method,
                "output": self.output,
                "explained_class": explained,
                "base_value": base,
                "output_value": value,
                "attributions": dict(zip(names, row, strict=True)),
            }
            for explained, base, value, row in zip(
                classes,
                self.base_values.tolist(),
                self.output_values.tolist(),
                self.attributions.tolist(),
                strict=True,
            )
        ]


@dataclass(frozen=True)
class ExplainerOptions:
    background_rows: int = 100  # reference rows the permutation explainer masks with
    permutations: int = 3  # of the permutation explainer: more, better estimates, proportionally slower
    seed: int = 0


class Explainer:
    """Explains a fitted pipeline's outputs. Not thread-safe: one thread uses it (serving/explaining.py)."""

    def __init__(
        self,
        pipeline: Pipeline,
        schema: FeatureSchema,
        classes: list[Any] | None,
        reference: pd.DataFrame,
        options: ExplainerOptions | None = None,
        method: str | None = None,
    ) -> None:
        """`reference`: prepared rows (FeatureSchema.prepare's types) the model was trained on, e.g. its
        stored reference set. `method`: force one (tests, cost measures); by default the estimator's."""
        started = time.perf_counter()
        import shap  # noqa: PLC0415  (two seconds: only where an explainer is built)

        self._shap = shap
        self.pipeline = pipeline
        self.schema = schema
        self.names = schema.names
        self.classes = [str(label) for label in classes] if classes is not None else None
        self.options = options or ExplainerOptions()
        reference = schema.prepare(reference).reset_index(drop=True)
        self.fallback: str | None = None  # why the estimator's own method was not used
        chosen = method or estimator_method(pipeline)
        if chosen not in METHODS:
            raise ValueError(f"unknown explanation method {chosen!r}; choose from {', '.join(METHODS)}")
        check = reference.head(CHECK_ROWS)
        if chosen != PERMUTATION:
            self.method = chosen
            try:
                self._build_in_model_space(chosen, reference)
                self._check(check)
            except Exception as exc:  # shap and odd estimators fail in many ways: the fallback still works
                if method is not None:
                    raise
                self.fallback = f"{chosen}: {type(exc).__name__}: {exc}"
                chosen = PERMUTATION
        if chosen == PERMUTATION:
            self.method = PERMUTATION
            self._build_permutation(reference)
            self._check(check.head(2))  # also compiles shap's numba code before the first request
        self.build_seconds = time.perf_counter() - started

    # ---- explaining ------------------------------------------------------------------------------------

    def explain(self, prepared: pd.DataFrame, class_indices: np.ndarray | None = None) -> Explanations:
        """Explain prepared rows (schema column order). `class_indices`: per row, the index of the class to
        explain (multiclass; binary explains classes[1] whatever is given); None: each row's predicted one."""
        if self.method == PERMUTATION:
            values, bases, outputs = self._explain_permutation(prepared)
        else:
            values, bases, outputs = self._explain_in_model_space(prepared)
        rows = len(prepared)
        if values.ndim == 3:  # one set of attributions per class: keep the explained class's
            if self.classes is not None and len(self.classes) == 2 and values.shape[2] == 2:
                chosen = np.ones(rows, dtype=int)
            elif class_indices is None:
                chosen = outputs.argmax(axis=1)
            else:
                chosen = np.asarray(class_indices, dtype=int)
            take = np.arange(rows)
            values = values[take, :, chosen]
            bases = bases[take, chosen]
            outputs = outputs[take, chosen]
        else:
            chosen = np.ones(rows, dtype=int)  # a single margin: classes[1]'s
        explained = [self.classes[index] for index in chosen.tolist()] if self.classes else None
        return Explanations(
            method=self.method,
            output=self.output,
            base_values=np.asarray(bases, dtype=np.float64).reshape(rows),
            output_values=np.asarray(outputs, dtype=np.float64).reshape(rows),
            attributions=np.asarray(values, dtype=np.float64).reshape(rows, len(self.names)),
            explained_classes=explained,
        )

    def _explain_in_model_space(self, prepared: pd.DataFrame) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        transformed = self._transform(prepared)
        if self.method == TREE:
            values = np.asarray(self._explainer.shap_values(transformed, check_additivity=False))
        else:
            values = np.asarray(self._explainer.shap_values(transformed))
        outputs = self._model_output(transformed)
        rows = len(prepared)
        # (rows, transformed columns[, outputs]) summed into (rows, input columns[, outputs]).
        summed = np.tensordot(values, self._to_inputs, axes=([1], [0]))
        if summed.ndim == 3:
            summed = summed.transpose(0, 2, 1)
        expected = np.asarray(self._explainer.expected_value, dtype=np.float64).reshape(-1)
        if outputs.ndim == 2:
            bases = np.broadcast_to(expected, (rows, outputs.shape[1]))
        else:
            bases = np.full(rows, expected[0])
        return summed, bases, outputs

    def _explain_permutation(self, prepared: pd.DataFrame) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        codec = _Codec(self.schema, [self._background, prepared])
        width = len(self.names)
        # Made per call with the same seed (shap seeds numpy's global generator with it): a row always gets
        # the same permutations, so the same explanation.
        explainer = self._shap.PermutationExplainer(
            lambda codes: self._pipeline_output(codec.decode(codes)),
            self._shap.maskers.Independent(codec.encode(self._background), max_samples=len(self._background)),
            seed=self.options.seed,
        )
        result = explainer(
            codec.encode(prepared), max_evals=self.options.permutations * (2 * width + 1), silent=True
        )
        values = np.asarray(result.values, dtype=np.float64)
        bases = np.asarray(result.base_values, dtype=np.float64)
        return values, bases, self._pipeline_output(prepared)

    # ---- building ----------------------------------------------------------------------------------------

    def _build_in_model_space(self, method: str, reference: pd.DataFrame) -> None:
        estimator = self.pipeline[-1]
        width = self._transform(reference.head(1)).shape[1]
        origins = input_origins(self.pipeline, self.names)
        if len(origins) != width:
            raise UnsupportedStructureError(
                f"the preprocessing makes {width} columns, its structure accounts for {len(origins)}"
            )
        self._to_inputs = np.zeros((width, len(self.names)))
        self._to_inputs[np.arange(width), origins] = 1.0
        shap = self._shap
        if method == TREE:
            self._explainer = shap.TreeExplainer(
                estimator, feature_perturbation="tree_path_dependent", model_output="raw"
            )
            tree_output = getattr(self._explainer.model, "tree_output", None)
            if self.classes is None:
                self.output = VALUE
            elif tree_output in (LOG_ODDS, PROBABILITY):
                self.output = tree_output
            else:
                raise ValueError(f"the trees' output is {tree_output!r}, neither log-odds nor probability")
        else:
            background = self._transform(reference)
            self._explainer = shap.LinearExplainer(
                estimator, shap.maskers.Independent(background, max_samples=len(background))
            )
            self.output = VALUE if self.classes is None else LOG_ODDS

    def _build_permutation(self, reference: pd.DataFrame) -> None:
        rows = min(self.options.background_rows, len(reference))
        self._background = reference.sample(n=rows, random_state=self.options.seed).reset_index(drop=True)
        self.output = VALUE if self.classes is None else PROBABILITY

    def _check(self, rows: pd.DataFrame) -> None:
        """Base + sum = the model's output on `rows`, and a log-odds margin gives the probabilities."""
        explanations = self.explain(rows)
        total = explanations.base_values + explanations.attributions.sum(axis=1)
        gap = float(np.max(np.abs(total - explanations.output_values)))
        if not gap <= TOLERANCE:
            raise ValueError(f"base + attributions differ from the model's output by up to {gap:.3g}")
        if self.output == LOG_ODDS:
            margins = self._model_output(self._transform(rows))
            probabilities = self.pipeline.predict_proba(rows)
            implied = softmax(margins, axis=1) if margins.ndim == 2 else expit(margins)
            observed = probabilities if margins.ndim == 2 else probabilities[:, 1]
            if not np.allclose(implied, observed, rtol=0, atol=TOLERANCE):
                raise ValueError("the margin is not the log-odds of the model's probabilities")

    # ---- the model's outputs ---------------------------------------------------------------------------

    def _transform(self, prepared: pd.DataFrame) -> np.ndarray:
        transformed = self.pipeline[:-1].transform(prepared)
        if sparse.issparse(transformed):
            transformed = transformed.toarray()
        return np.asarray(transformed, dtype=np.float64)

    def _model_output(self, transformed: np.ndarray) -> np.ndarray:
        """The estimator's output in the explainer's units, for every class where there are several."""
        estimator = self.pipeline[-1]
        if self.output == VALUE:
            return np.asarray(estimator.predict(transformed), dtype=np.float64)
        if self.output == PROBABILITY:
            return np.asarray(estimator.predict_proba(transformed), dtype=np.float64)
        return np.asarray(estimator.decision_function(transformed), dtype=np.float64)

    def _pipeline_output(self, prepared: pd.DataFrame) -> np.ndarray:
        if self.classes is None:
            return np.asarray(self.pipeline.predict(prepared), dtype=np.float64)
        return np.asarray(self.pipeline.predict_proba(prepared), dtype=np.float64)


@dataclass
class _CodecColumn:
    categorical: bool
    values: np.ndarray | None = None  # categorical: the values codes stand for, then NaN (missing)


class _Codec:
    """Prepared rows as a float matrix shap can mask: numbers (NaN missing) as they are, each categorical
    cell as the index of its value in its column's table (NaN missing). Masking only moves values between
    rows, so a code is always decoded back to a value that was there."""

    def __init__(self, schema: FeatureSchema, frames: list[pd.DataFrame]) -> None:
        self.names = schema.names
        self.columns: list[_CodecColumn] = []
        for feature in schema.features:
            if feature.kind is not FeatureKind.CATEGORICAL:
                self.columns.append(_CodecColumn(False))
                continue
            seen = pd.unique(pd.concat([frame[feature.name] for frame in frames]).dropna())
            self.columns.append(_CodecColumn(True, np.array([*seen.tolist(), np.nan], dtype=object)))

    def encode(self, prepared: pd.DataFrame) -> np.ndarray:
        codes = np.empty((len(prepared), len(self.names)), dtype=np.float64)
        for index, (name, column) in enumerate(zip(self.names, self.columns, strict=True)):
            if column.values is None:
                codes[:, index] = prepared[name].to_numpy(dtype=np.float64)
                continue
            known = pd.Index(column.values[:-1])
            found = known.get_indexer(prepared[name].to_numpy(dtype=object))
            codes[:, index] = np.where(found < 0, np.nan, found)
        return codes

    def decode(self, codes: np.ndarray) -> pd.DataFrame:
        data: dict[str, Any] = {}
        for index, (name, column) in enumerate(zip(self.names, self.columns, strict=True)):
            if column.values is None:
                data[name] = codes[:, index]
                continue
            missing = len(column.values) - 1
            picks = np.where(np.isnan(codes[:, index]), missing, codes[:, index]).astype(np.int64)
            data[name] = column.values[picks]
        return pd.DataFrame(data)


# ---- which method ------------------------------------------------------------------------------------------

_TREES: Final = (
    "HistGradientBoostingClassifier",
    "HistGradientBoostingRegressor",
    "RandomForestClassifier",
    "RandomForestRegressor",
    "ExtraTreesClassifier",
    "ExtraTreesRegressor",
    "GradientBoostingClassifier",
    "GradientBoostingRegressor",
    "DecisionTreeClassifier",
    "DecisionTreeRegressor",
)


def estimator_method(pipeline: Pipeline) -> str:
    """The method the pipeline's final estimator calls for (before the checks, which may overrule it)."""
    from sklearn.linear_model._base import LinearClassifierMixin, LinearModel  # noqa: PLC0415

    estimator = pipeline[-1]
    module = type(estimator).__module__
    if type(estimator).__name__ in _TREES and module.startswith("sklearn."):
        return TREE
    if isinstance(estimator, LinearClassifierMixin | LinearModel) and hasattr(estimator, "coef_"):
        return LINEAR
    return PERMUTATION


# ---- from preprocessed columns back to input columns ------------------------------------------------------


def input_origins(pipeline: Pipeline, names: list[str]) -> np.ndarray:
    """For each column the pipeline's preprocessing (every step but the last) outputs, the index in `names`
    (the input columns, schema order) of the column it is made from. UnsupportedStructureError where a step
    mixes columns or is not known here."""
    from sklearn.compose import ColumnTransformer  # noqa: PLC0415

    origins = np.arange(len(names))
    for position, (_, step) in enumerate(pipeline.steps[:-1]):
        if isinstance(step, ColumnTransformer):
            if position:
                raise UnsupportedStructureError("a ColumnTransformer after another step")
            origins = _column_transformer_origins(step, names)
        else:
            origins = origins[_step_origins(step, len(origins))]
    return origins


def _column_transformer_origins(transformer: Any, names: list[str]) -> np.ndarray:
    width = max((part.stop for part in transformer.output_indices_.values()), default=0)
    origins = np.full(width, -1)
    inputs = list(getattr(transformer, "feature_names_in_", names))
    for name, step, columns in transformer.transformers_:
        part = transformer.output_indices_[name]
        if part.stop == part.start or step == "drop":
            continue
        selected = _selected(columns, inputs)
        positions = np.array([names.index(inputs[index]) for index in selected], dtype=int)
        origins[part] = positions[_step_origins(step, len(selected))]
    if (origins < 0).any():
        raise UnsupportedStructureError("some preprocessed columns come from no transformer")
    return origins


def _selected(columns: Any, inputs: list[str]) -> list[int]:
    """A ColumnTransformer's column selection as input positions."""
    if isinstance(columns, slice):
        return list(range(len(inputs)))[columns]
    selection = np.asarray(columns)
    if selection.dtype == bool:
        return np.flatnonzero(selection).tolist()
    return [
        int(column) if isinstance(column, int | np.integer) else inputs.index(column) for column in columns
    ]


def _step_origins(step: Any, width: int) -> np.ndarray:
    """For each output column of a fitted step that takes `width` columns, the input column it comes from."""
    from sklearn.impute import MissingIndicator, SimpleImputer  # noqa: PLC0415
    from sklearn.pipeline import Pipeline  # noqa: PLC0415
    from sklearn.preprocessing import OneHotEncoder  # noqa: PLC0415

    if step is None or step == "passthrough":
        return np.arange(width)
    if isinstance(step, Pipeline):
        origins = np.arange(width)
        for _, inner in step.steps:
            origins = origins[_step_origins(inner, len(origins))]
        return origins
    if isinstance(step, SimpleImputer):
        kept = np.arange(width)
        if step.strategy != "constant" and not step.keep_empty_features:
            statistics = np.asarray(step.statistics_)
            if statistics.dtype.kind == "f":
                kept = np.flatnonzero(~np.isnan(statistics))  # all missing at fit: dropped
        indicated = step.indicator_.features_ if step.add_indicator and step.indicator_ is not None else []
        return np.concatenate([kept, np.asarray(indicated, dtype=int)]).astype(int)
    if isinstance(step, MissingIndicator):
        return np.asarray(step.features_, dtype=int)
    if isinstance(step, OneHotEncoder):
        counts = getattr(step, "_n_features_outs", None)
        if counts is None or len(counts) != width:
            raise UnsupportedStructureError("the one-hot encoder's columns per feature are not known")
        return np.repeat(np.arange(width), counts)
    if type(step).__name__ in ONE_TO_ONE and getattr(step, "n_features_in_", width) == width:
        return np.arange(width)
    raise UnsupportedStructureError(f"{type(step).__name__} is not known to keep its columns apart")
