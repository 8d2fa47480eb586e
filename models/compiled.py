"""A compiled scorer for a candidate pipeline (models/candidates.py): the fitted preprocessing and estimator
evaluated in numpy, from their fitted attributes, with scikit-learn's own formulas.

Why: a scikit-learn `Pipeline` with a `ColumnTransformer` pays ~5-30 ms per call whatever the rows
(validation, per-column slicing, DataFrame handling, one tree at a time), which caps a 1-row request near
200 per second. Here a 1-row call costs ~20-500 µs. ONNX is the portable artefact for other servers
(models/onnx_export.py), not this process's scorer: skl2onnx's own converters get the parts our pipelines
use wrong (../shared/NOTES.md, 2026-12-02), so the ONNX model needs converters of ours for most of them, and
this scorer was already proven and measured here.

A compiled scorer is used only where `prove` finds it equal to scikit-learn: at training on the held-out
rows and edge rows (the outcome goes to MLflow and the store metadata), and again wherever it is loaded
(serving/model.py RowPredictor). Anything else is served by scikit-learn, with the reason recorded.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import pandas as pd
from scipy.special import expit
from sklearn.base import is_classifier
from sklearn.compose import ColumnTransformer
from sklearn.ensemble import (
    HistGradientBoostingClassifier,
    HistGradientBoostingRegressor,
    RandomForestClassifier,
    RandomForestRegressor,
)
from sklearn.impute import SimpleImputer
from sklearn.linear_model import LogisticRegression, Ridge
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import OneHotEncoder, StandardScaler
from sklearn.utils.extmath import softmax

from models.schema import FeatureKind, FeatureSchema

# Largest difference accepted between a compiled scorer's probabilities (or values) and scikit-learn's. Both
# compute in float64 with the same formulas, so what remains is summation order: ~1e-15. A forest in ONNX sums
# float32 leaves: ~1e-7. 1e-6 is far above both and far below any difference that changes a decision.
TOLERANCE = 1e-6
# From this many rows per call, tree ensembles are scored by scikit-learn's own estimator (on the compiled
# preprocessing): its walk, one tree at a time in C, beats a numpy walk of all trees at once there
# (`make bench-scorers`).
LARGE_BATCH_ROWS = 256
TREE_ENSEMBLES = (
    RandomForestClassifier,
    RandomForestRegressor,
    HistGradientBoostingClassifier,
    HistGradientBoostingRegressor,
)


class NotCompilableError(ValueError):
    """The pipeline has a part this module does not reproduce exactly: it is served by scikit-learn."""


@dataclass(frozen=True)
class NumericBlock:
    columns: np.ndarray  # positions in the schema's rows
    medians: np.ndarray  # SimpleImputer.statistics_
    indicated: np.ndarray  # positions (within the block) that get a missing-value indicator column
    mean: np.ndarray | None  # StandardScaler, over the imputed and indicator columns
    scale: np.ndarray | None

    def transform(self, rows: np.ndarray) -> np.ndarray:
        values = rows[:, self.columns].astype(np.float64)
        missing = np.isnan(values)
        imputed = np.where(missing, self.medians, values)
        block = np.hstack([imputed, missing[:, self.indicated].astype(np.float64)])
        if self.mean is not None:
            block -= self.mean
        if self.scale is not None:
            block /= self.scale
        return block


@dataclass(frozen=True)
class CategoricalBlock:
    columns: np.ndarray  # positions in the schema's rows
    fill: str  # SimpleImputer(strategy="constant").fill_value
    # Per column: each category's output column (-1: none), the pooled infrequent column (or -1) that
    # unseen and infrequent categories go to, and the number of output columns.
    codes: list[dict[str, int]]
    pooled: list[int]
    widths: list[int]

    def transform(self, rows: np.ndarray) -> np.ndarray:
        out = np.zeros((len(rows), sum(self.widths)), dtype=np.float64)
        offset = 0
        for position, codes, pooled, width in zip(
            self.columns, self.codes, self.pooled, self.widths, strict=True
        ):
            # Prepared categories are strings, or NaN for missing (which the imputer fills in).
            targets = np.fromiter(
                (
                    codes.get(value if isinstance(value, str) else self.fill, pooled)
                    for value in rows[:, position]
                ),
                dtype=np.intp,
                count=len(rows),
            )
            hit = targets >= 0
            out[np.flatnonzero(hit), offset + targets[hit]] = 1.0
            offset += width
        return out


@dataclass(frozen=True)
class Preprocessor:
    blocks: list[NumericBlock | CategoricalBlock]

    def transform(self, rows: np.ndarray) -> np.ndarray:
        """Validated rows in schema column order (as `FeatureSchema.frame_of_rows` takes them) -> the
        float64 matrix that the pipeline's `ColumnTransformer` gives its estimator."""
        return np.hstack([block.transform(rows) for block in self.blocks])


def compile_preprocessing(pipeline: Pipeline, schema: FeatureSchema) -> Preprocessor:
    transformer = pipeline.steps[0][1]
    if not isinstance(transformer, ColumnTransformer) or transformer.remainder != "drop":
        raise NotCompilableError("the first step is not a ColumnTransformer that drops the other columns")
    positions = {name: index for index, name in enumerate(schema.names)}
    blocks: list[NumericBlock | CategoricalBlock] = []
    for name, steps, columns in transformer.transformers_:
        if name == "remainder" or not len(columns):
            continue
        if not isinstance(steps, Pipeline):
            raise NotCompilableError(f"transformer '{name}' is not a pipeline")
        where = np.array([positions[column] for column in columns])
        parts = [step for _, step in steps.steps]
        if isinstance(parts[-1], OneHotEncoder):
            blocks.append(_categorical(name, parts, where))
        else:
            blocks.append(_numeric(name, parts, where))
    return Preprocessor(blocks)


def _numeric(name: str, parts: list[object], where: np.ndarray) -> NumericBlock:
    imputer, *rest = parts
    if not isinstance(imputer, SimpleImputer) or imputer.strategy not in ("median", "mean"):
        raise NotCompilableError(f"'{name}' does not start with a median or mean SimpleImputer")
    if np.isnan(imputer.statistics_).any() and not imputer.keep_empty_features:
        raise NotCompilableError(f"'{name}' has a column that was empty at training (dropped by the imputer)")
    indicated = np.array([], dtype=int)
    if imputer.add_indicator:
        if imputer.indicator_.features != "missing-only":
            raise NotCompilableError(f"'{name}': indicator of all features")
        indicated = np.asarray(imputer.indicator_.features_, dtype=int)
    mean = scale = None
    if rest:
        [scaler] = rest
        if not isinstance(scaler, StandardScaler):
            raise NotCompilableError(f"'{name}': {type(scaler).__name__} after the imputer")
        mean, scale = scaler.mean_, scaler.scale_
    return NumericBlock(where, np.asarray(imputer.statistics_), indicated, mean, scale)


def _categorical(name: str, parts: list[object], where: np.ndarray) -> CategoricalBlock:
    if len(parts) != 2:
        raise NotCompilableError(f"'{name}' is not a SimpleImputer then a OneHotEncoder")
    imputer, encoder = parts
    if not isinstance(imputer, SimpleImputer) or imputer.strategy != "constant" or imputer.add_indicator:
        raise NotCompilableError(f"'{name}' does not start with a constant SimpleImputer")
    assert isinstance(encoder, OneHotEncoder)
    if encoder.drop_idx_ is not None or encoder.handle_unknown not in ("ignore", "infrequent_if_exist"):
        raise NotCompilableError(f"'{name}': OneHotEncoder with drop or handle_unknown='error'")
    codes, pooled, widths = encoder_columns(encoder)
    return CategoricalBlock(where, str(imputer.fill_value), codes, pooled, widths)


def encoder_columns(encoder: OneHotEncoder) -> tuple[list[dict[str, int]], list[int], list[int]]:
    """Per input column of a fitted OneHotEncoder (without drop): each category's output column, the
    pooled column (or -1) that unseen and infrequent categories go to, and the number of output columns."""
    infrequent = (
        encoder.infrequent_categories_ if encoder._infrequent_enabled else [None] * len(encoder.categories_)
    )
    codes, pooled, widths = [], [], []
    for categories, rare in zip(encoder.categories_, infrequent, strict=True):
        rare_set = set() if rare is None else {str(value) for value in rare}
        frequent = [str(value) for value in categories if str(value) not in rare_set]
        column = {category: index for index, category in enumerate(frequent)}
        # scikit-learn puts the pooled infrequent column last; unseen categories go there too
        # (handle_unknown="infrequent_if_exist"), or nowhere (all zeros) when nothing was pooled.
        pool = len(frequent) if rare_set else -1
        column.update(dict.fromkeys(rare_set, pool))
        codes.append(column)
        pooled.append(pool)
        widths.append(len(frequent) + (1 if rare_set else 0))
    return codes, pooled, widths


@dataclass(frozen=True)
class CompiledPipeline:
    """What `RowPredictor` returns for the same rows: class probabilities (classification, in the order of
    `classes_`) or predicted values (regression)."""

    preprocessor: Preprocessor
    estimator: Callable[[np.ndarray], np.ndarray]
    # For batches of LARGE_BATCH_ROWS or more, where it is faster: the estimator's own prediction, on the
    # compiled preprocessing's output (a tree walk in numpy touches every tree to its deepest level).
    large_batch_estimator: Callable[[np.ndarray], np.ndarray] | None = None

    def __call__(self, rows: np.ndarray) -> np.ndarray:
        matrix = self.preprocessor.transform(rows)
        if self.large_batch_estimator is not None and len(rows) >= LARGE_BATCH_ROWS:
            return self.large_batch_estimator(matrix)
        return self.estimator(matrix)

    def paths(self) -> dict[str, Callable[[np.ndarray], np.ndarray]]:
        """Each way the scorer may answer, each to be proven on its own."""
        paths = {"numpy": lambda rows: self.estimator(self.preprocessor.transform(rows))}
        if self.large_batch_estimator is not None:
            large = self.large_batch_estimator
            paths["large batches"] = lambda rows: large(self.preprocessor.transform(rows))
        return paths


def compile_pipeline(pipeline: Pipeline, schema: FeatureSchema) -> CompiledPipeline:
    estimator = pipeline.steps[-1][1]
    large_batches = None
    if isinstance(estimator, TREE_ENSEMBLES):
        large_batches = estimator.predict_proba if is_classifier(estimator) else estimator.predict
    return CompiledPipeline(compile_preprocessing(pipeline, schema), _estimator(estimator), large_batches)


def _estimator(estimator: object) -> Callable[[np.ndarray], np.ndarray]:
    if isinstance(estimator, LogisticRegression):
        coef, intercept = estimator.coef_.T, estimator.intercept_
        if len(estimator.classes_) == 2:  # scikit-learn: expit of the one decision column, [1 - p, p]

            def binary(matrix: np.ndarray) -> np.ndarray:
                positive = expit((matrix @ coef + intercept).ravel())
                return np.column_stack([1 - positive, positive])

            return binary
        return lambda matrix: softmax(matrix @ coef + intercept, copy=False)
    if isinstance(estimator, Ridge) and estimator.coef_.ndim == 1:
        coef, intercept = estimator.coef_, estimator.intercept_
        return lambda matrix: matrix @ coef + intercept
    if isinstance(estimator, RandomForestClassifier | RandomForestRegressor):
        return _random_forest(estimator)
    if isinstance(estimator, HistGradientBoostingClassifier | HistGradientBoostingRegressor):
        return _gradient_boosting(estimator)
    raise NotCompilableError(f"no compiled scorer for {type(estimator).__name__}")


@dataclass(frozen=True)
class Trees:
    """The nodes of every tree of an ensemble in one set of arrays, walked for all trees and rows at once
    (scikit-learn walks one tree at a time). A leaf is its own left and right child, so a row that has
    reached its leaf stays there while the deeper trees are walked on."""

    roots: np.ndarray
    feature: np.ndarray
    threshold: np.ndarray  # a value <= threshold goes left
    missing_right: np.ndarray  # where NaN goes
    children: np.ndarray  # node n's left child at 2n, its right child at 2n + 1
    depth: int

    @classmethod
    def of(cls, trees: list[dict[str, np.ndarray]]) -> Trees:
        offsets = np.cumsum([0] + [len(tree["feature"]) for tree in trees])
        feature, threshold, missing_right, children = [], [], [], []
        for offset, tree in zip(offsets, trees, strict=False):
            leaf, nodes = tree["leaf"], np.arange(len(tree["feature"]))
            feature.append(np.where(leaf, 0, tree["feature"]))
            threshold.append(tree["threshold"])
            missing_right.append(~tree["missing_left"].astype(bool))
            pairs = np.column_stack(
                [np.where(leaf, nodes, tree["left"]), np.where(leaf, nodes, tree["right"])]
            )
            children.append(offset + pairs.ravel())
        return cls(
            roots=offsets[:-1],
            feature=np.concatenate(feature),
            threshold=np.concatenate(threshold),
            missing_right=np.concatenate(missing_right),
            children=np.concatenate(children),
            depth=max(int(tree["depth"]) for tree in trees),
        )

    def leaves(self, matrix: np.ndarray) -> np.ndarray:
        """(rows, trees): the leaf each row reaches in each tree."""
        matrix = np.ascontiguousarray(matrix)
        flat, missing = matrix.ravel(), np.isnan(matrix).any()
        starts = (np.arange(len(matrix)) * matrix.shape[1])[:, np.newaxis]
        nodes = np.repeat(self.roots[np.newaxis, :], len(matrix), axis=0)
        for _ in range(self.depth):
            values = flat[starts + self.feature[nodes]]
            right = values > self.threshold[nodes]
            if missing:
                right = np.where(np.isnan(values), self.missing_right[nodes], right)
            nodes = self.children[2 * nodes + right]
        return nodes


def forest_trees(forest: RandomForestClassifier | RandomForestRegressor) -> list[dict[str, np.ndarray]]:
    """Each tree's nodes as `Trees.of` takes them, and per node its `value`: the class fractions (or the
    mean) of its training rows, one column per class (or one)."""
    return [
        {
            "feature": tree.feature,
            "threshold": tree.threshold,
            "missing_left": tree.missing_go_to_left,
            "left": tree.children_left,
            "right": tree.children_right,
            "leaf": tree.children_left == -1,
            "depth": tree.max_depth,
            "value": tree.value[:, 0, :],
        }
        for tree in (estimator.tree_ for estimator in forest.estimators_)
    ]


def boosting_trees(
    model: HistGradientBoostingClassifier | HistGradientBoostingRegressor,
) -> list[dict[str, np.ndarray]]:
    """Each tree's nodes as `Trees.of` takes them, iteration by iteration (`n_trees_per_iteration_` trees
    each, one per raw score column), and per node its `value` (one column): what a leaf adds to the raw
    score."""
    predictors = [predictor for iteration in model._predictors for predictor in iteration]
    if any(predictor.nodes["is_categorical"].any() for predictor in predictors):
        raise NotCompilableError("gradient boosting with native categorical splits")
    return [
        {
            "feature": nodes["feature_idx"],
            "threshold": nodes["num_threshold"],
            "missing_left": nodes["missing_go_to_left"],
            "left": nodes["left"].astype(np.intp),
            "right": nodes["right"].astype(np.intp),
            "leaf": nodes["is_leaf"].astype(bool),
            "depth": nodes["depth"].max(),
            "value": nodes["value"][:, np.newaxis],
        }
        for nodes in (predictor.nodes for predictor in predictors)
    ]


def _random_forest(
    forest: RandomForestClassifier | RandomForestRegressor,
) -> Callable[[np.ndarray], np.ndarray]:
    trees = forest_trees(forest)
    walk = Trees.of(trees)
    # A tree's value is the class fractions (or the mean) of its leaf's training rows; the forest averages.
    values = np.concatenate([tree["value"] for tree in trees])
    classifier = isinstance(forest, RandomForestClassifier)

    def score(matrix: np.ndarray) -> np.ndarray:
        # scikit-learn's trees compare float32 values with float64 thresholds.
        leaves = walk.leaves(matrix.astype(np.float32).astype(np.float64))
        mean = values[leaves].sum(axis=1) / len(trees)
        return mean if classifier else mean[:, 0]

    return score


def _gradient_boosting(
    model: HistGradientBoostingClassifier | HistGradientBoostingRegressor,
) -> Callable[[np.ndarray], np.ndarray]:
    trees = boosting_trees(model)
    walk = Trees.of(trees)
    values = np.concatenate([tree["value"][:, 0] for tree in trees])
    per_iteration, baseline = model.n_trees_per_iteration_, model._baseline_prediction
    classifier = isinstance(model, HistGradientBoostingClassifier)

    def score(matrix: np.ndarray) -> np.ndarray:
        leaves = walk.leaves(matrix)  # gradient boosting compares float64 values
        raw = values[leaves].reshape(len(matrix), -1, per_iteration).sum(axis=1) + baseline
        if not classifier:
            return raw[:, 0]
        if per_iteration == 1:  # scikit-learn's half binomial loss: expit of the one raw column
            positive = expit(raw[:, 0])
            return np.column_stack([1 - positive, positive])
        return softmax(raw, copy=False)

    return score


@dataclass(frozen=True)
class Outcome:
    """What serves the model and why: recorded in MLflow and in the store metadata, shown by /model."""

    scorer: str  # "compiled" or "scikit-learn"
    reason: str
    rows_checked: int
    max_difference: float | None

    def as_metadata(self) -> dict[str, Any]:
        """For BentoML metadata, which cannot hold None, and MLflow."""
        return {key: value for key, value in asdict(self).items() if value is not None}


def edge_rows(schema: FeatureSchema, prepared: pd.DataFrame) -> pd.DataFrame:
    """Rows a model meets in production and rarely in its held-out rows: missing in every column, numbers
    far beyond the training range on both sides, a category never seen at training."""
    edge = prepared.head(4).copy()
    edge.iloc[0] = np.nan
    numeric = schema.names_of(FeatureKind.NUMERIC)
    edge.loc[edge.index[1], numeric] = prepared[numeric].max().to_numpy() * 10
    edge.loc[edge.index[2], numeric] = prepared[numeric].min().to_numpy() - 1e6
    for name in schema.names_of(FeatureKind.CATEGORICAL):
        edge.loc[edge.index[3], name] = "never seen at training"
    return schema.prepare(edge)


def proof_rows(schema: FeatureSchema, prepared: pd.DataFrame) -> pd.DataFrame:
    """What a scorer is proven on: `prepared` (the held-out rows) and their edge rows."""
    return pd.concat([prepared, edge_rows(schema, prepared)], ignore_index=True)


def disagreement(got: np.ndarray, expected: np.ndarray, classification: bool) -> tuple[float, int]:
    """The largest difference between two scorers' probabilities (or values), NaN if either has a NaN
    where the other has not, and how many rows' labels (the most probable class) differ."""
    if not len(expected):
        return 0.0, 0
    difference = float(np.max(np.abs(got - expected)))
    flips = int(np.sum(got.argmax(axis=1) != expected.argmax(axis=1))) if classification else 0
    return difference, flips


def prove(
    pipeline: Pipeline, schema: FeatureSchema, prepared: pd.DataFrame, classification: bool
) -> tuple[CompiledPipeline | None, Outcome]:
    """The compiled scorer if it gives scikit-learn's answers on `prepared` (the held-out rows) and on their
    edge rows: the same labels and probabilities (or values) within TOLERANCE; else None and why not."""
    rows = proof_rows(schema, prepared).to_numpy(dtype=object)
    try:
        compiled = compile_pipeline(pipeline, schema)
    except NotCompilableError as error:
        return None, Outcome("scikit-learn", str(error), 0, None)
    model_input = schema.frame_of_rows(rows)
    expected = pipeline.predict_proba(model_input) if classification else pipeline.predict(model_input)
    largest = 0.0
    for path, score in compiled.paths().items():
        difference, flips = disagreement(score(rows), expected, classification)
        if flips:
            why = f"a label differs from scikit-learn's ({path})"
            return None, Outcome("scikit-learn", why, len(rows), difference)
        if not difference <= TOLERANCE:  # NaN included
            why = f"differs from scikit-learn by {difference:.3g} (more than {TOLERANCE:g}; {path})"
            return None, Outcome("scikit-learn", why, len(rows), difference)
        largest = max(largest, difference)
    return compiled, Outcome("compiled", f"equal to scikit-learn within {TOLERANCE:g}", len(rows), largest)
