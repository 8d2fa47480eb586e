"""The winning pipeline as an ONNX model: a portable artefact that Triton's onnxruntime backend or a KServe
InferenceService (`modelFormat: onnx`) can serve, kept only where onnxruntime is proven to give
scikit-learn's answers.

The served scorer stays the compiled one (models/compiled.py); this is the same model for other servers.

Inputs, one per feature column (what the store's feature schema lists, in its order), each of shape
[rows, 1]: numbers and booleans as float64 (booleans 0/1, missing as NaN), categories as strings (missing as
the empty string, since a string tensor has no NaN). One input per column keeps the names a caller already
knows, lets numbers and strings sit side by side, and keeps float64 end to end: a single float32 tensor
would round every value before the model sees it. Outputs: `label` and `probabilities` (classification; no
ZipMap, so a plain [rows, classes] tensor) or `variable` (regression).

What skl2onnx 1.20 gets wrong for our pipelines (models/candidates.py), and the answer here:
- `SimpleImputer(add_indicator=True)` loses its indicator columns, and its `Imputer` node is float32 only
  (onnxruntime has no float64 kernel): our converter, IsNaN -> Where for the imputation and IsNaN ->
  Gather -> Cast -> Concat for the indicators, in float64.
- `OneHotEncoder(handle_unknown="infrequent_if_exist", max_categories=...)` sends unseen and infrequent
  categories nowhere, and outputs float32: our converter maps each category to its output column with a
  LabelEncoder (unseen and infrequent ones to the pooled column, as scikit-learn does), in float64.
- float32 after a Concat: the parts above and skl2onnx's scaler and linear converters stay float64 on
  float64 inputs, so the Concat and what follows are float64 too.
- Trees: skl2onnx's TreeEnsembleClassifier/Regressor store thresholds and leaf values as float32 attributes
  and sum in float32 (HistGradientBoosting's thresholds, #1192; a forest's probabilities off by a whole
  tree's vote here), and it fails on scikit-learn 1.9's gradient boosting nodes: our converter writes
  ai.onnx.ml's TreeEnsemble (opset 5) in float64, after rounding a forest's inputs to float32 as
  scikit-learn does, and computes the probabilities and labels with scikit-learn's formulas.
Whatever still differs is measured by `export`: the model is kept only if it is within
models.compiled.TOLERANCE with the same labels, else it is recorded as not exported with the measured
difference.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import pandas as pd
from onnx import TensorProto, helper, numpy_helper
from skl2onnx import convert_sklearn
from skl2onnx.common._container import ModelComponentContainer
from skl2onnx.common._topology import Operator, Scope
from skl2onnx.common.data_types import DoubleTensorType, Int64TensorType, StringTensorType
from skl2onnx.operator_converters.common import concatenate_variables
from sklearn.base import is_classifier
from sklearn.ensemble import RandomForestClassifier, RandomForestRegressor
from sklearn.impute import SimpleImputer
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import OneHotEncoder

from models.compiled import (
    TOLERANCE,
    TREE_ENSEMBLES,
    NotCompilableError,
    boosting_trees,
    disagreement,
    encoder_columns,
    forest_trees,
    proof_rows,
)
from models.errors import first_line
from models.schema import FeatureKind, FeatureSchema

EXPORTED = "exported"
NOT_EXPORTED = "not exported"
# A missing category in a string input (a string tensor cannot hold NaN).
MISSING_STRING = ""
# Opsets pinned rather than skl2onnx's newest, so that older onnxruntime builds (a Triton or KServe image's)
# load the model too; ai.onnx.ml 3 is the newest that skl2onnx 1.20 targets.
TARGET_OPSET = {"": 18, "ai.onnx.ml": 3}
# TreeEnsemble, the tree op that keeps float64, exists from ai.onnx.ml opset 5, which skl2onnx 1.20 refuses to
# target: a model with trees imports it after conversion (onnxruntime 1.32 runs it here; an older runtime
# must know the op). The other ai.onnx.ml op our converters use, LabelEncoder with string keys, means the
# same at 5.
TREE_ENSEMBLE_OPSET = 5


class NotExportableError(ValueError):
    """A part of the pipeline our converters cannot reproduce exactly: no ONNX model is kept."""


def _numeric_imputer(scope: Scope, operator: Operator, container: ModelComponentContainer) -> None:
    """SimpleImputer (median or mean) on float64 columns, with its missing-value indicators."""
    imputer: SimpleImputer = operator.raw_operator
    if imputer.strategy not in ("median", "mean") or np.isnan(imputer.statistics_).any():
        raise NotExportableError(
            f"SimpleImputer(strategy={imputer.strategy!r}) or a column empty at training (dropped by it)"
        )
    missing, imputed = impute_numbers(scope, operator, container)
    if not imputer.add_indicator:
        container.add_node("Identity", [imputed], [operator.outputs[0].full_name])
        return
    if imputer.indicator_.features != "missing-only":
        raise NotExportableError("SimpleImputer with an indicator of all features")
    # scikit-learn appends one indicator column per feature that had missing values at training.
    features = scope.get_unique_variable_name("indicated")
    indicated = imputer.indicator_.features_
    container.add_initializer(features, TensorProto.INT64, [len(indicated)], [int(i) for i in indicated])
    flags = scope.get_unique_variable_name("indicator_flags")
    container.add_node("Gather", [missing, features], [flags], axis=1)
    indicators = scope.get_unique_variable_name("indicators")
    container.add_node("Cast", [flags], [indicators], to=TensorProto.DOUBLE)
    container.add_node("Concat", [imputed, indicators], [operator.outputs[0].full_name], axis=1)


def impute_numbers(scope: Scope, operator: Operator, container: ModelComponentContainer) -> tuple[str, str]:
    """The nodes that replace NaN with the imputer's statistics; the names of the missing-value mask and of
    the imputed values."""
    imputer: SimpleImputer = operator.raw_operator
    values = concatenate_variables(scope, operator.inputs, container)
    missing = scope.get_unique_variable_name("missing")
    container.add_node("IsNaN", [values], [missing])
    statistics = scope.get_unique_variable_name("statistics")
    container.add_initializer(
        statistics, TensorProto.DOUBLE, [len(imputer.statistics_)], imputer.statistics_.tolist()
    )
    imputed = scope.get_unique_variable_name("imputed")
    container.add_node("Where", [missing, statistics, values], [imputed])
    return missing, imputed


def _category_imputer(scope: Scope, operator: Operator, container: ModelComponentContainer) -> None:
    """SimpleImputer(strategy="constant") on string columns: MISSING_STRING becomes the fill value."""
    imputer: SimpleImputer = operator.raw_operator
    if imputer.strategy != "constant" or imputer.add_indicator:
        raise NotExportableError("a string column's SimpleImputer is not constant or has indicators")
    values = concatenate_variables(scope, operator.inputs, container)
    is_missing = scope.get_unique_variable_name("is_missing")
    container.add_node(
        "LabelEncoder",
        [values],
        [is_missing],
        op_domain="ai.onnx.ml",
        op_version=2,
        keys_strings=[MISSING_STRING],
        values_int64s=[1],
        default_int64=0,
    )
    condition = scope.get_unique_variable_name("missing")
    container.add_node("Cast", [is_missing], [condition], to=TensorProto.BOOL)
    fill = scope.get_unique_variable_name("fill")
    container.add_initializer(fill, TensorProto.STRING, [1], [str(imputer.fill_value).encode()])
    container.add_node("Where", [condition, fill, values], [operator.outputs[0].full_name])


def _imputer(scope: Scope, operator: Operator, container: ModelComponentContainer) -> None:
    if isinstance(operator.inputs[0].type, StringTensorType):
        _category_imputer(scope, operator, container)
    else:
        _numeric_imputer(scope, operator, container)


def _imputer_shape(operator: Operator) -> None:
    imputer: SimpleImputer = operator.raw_operator
    width = sum(variable.type.shape[1] for variable in operator.inputs)
    if imputer.add_indicator:
        width += len(imputer.indicator_.features_)
    operator.outputs[0].type = operator.inputs[0].type.__class__([None, width])


def _one_hot_encoder(scope: Scope, operator: Operator, container: ModelComponentContainer) -> None:
    """Each string column to its one-hot columns, unseen and infrequent categories to the pooled column
    (or none), exactly as models/compiled.py encodes them."""
    encoder: OneHotEncoder = operator.raw_operator
    # scikit-learn refuses unseen categories with handle_unknown="error": nothing to reproduce there.
    if encoder.drop_idx_ is not None or encoder.handle_unknown not in ("ignore", "infrequent_if_exist"):
        raise NotExportableError("OneHotEncoder with drop or handle_unknown='error'")
    codes, pooled, widths = encoder_columns(encoder)
    if any(MISSING_STRING in column for column in codes):
        raise NotExportableError("the empty string is a category, but it is how an ONNX input says missing")
    values = concatenate_variables(scope, operator.inputs, container)
    blocks = []
    for index, (column, pool, width) in enumerate(zip(codes, pooled, widths, strict=True)):
        position = scope.get_unique_variable_name("position")
        container.add_initializer(position, TensorProto.INT64, [1], [index])
        strings = scope.get_unique_variable_name("strings")
        container.add_node("Gather", [values, position], [strings], axis=1)
        code = scope.get_unique_variable_name("code")
        container.add_node(
            "LabelEncoder",
            [strings],
            [code],
            op_domain="ai.onnx.ml",
            op_version=2,
            keys_strings=list(column),
            values_int64s=list(column.values()),
            default_int64=pool,  # -1 (no pooled column) matches no output column: all zeros
        )
        outputs = scope.get_unique_variable_name("outputs")
        container.add_initializer(outputs, TensorProto.INT64, [width], list(range(width)))
        hits = scope.get_unique_variable_name("hits")
        container.add_node("Equal", [code, outputs], [hits])  # [rows, 1] against [width]: [rows, width]
        block = scope.get_unique_variable_name("one_hot")
        container.add_node("Cast", [hits], [block], to=TensorProto.DOUBLE)
        blocks.append(block)
    container.add_node("Concat", blocks, [operator.outputs[0].full_name], axis=1)


def _one_hot_encoder_shape(operator: Operator) -> None:
    _, _, widths = encoder_columns(operator.raw_operator)
    operator.outputs[0].type = DoubleTensorType([None, sum(widths)])


def _tree_ensemble(
    scope: Scope,
    container: ModelComponentContainer,
    features: str,
    trees: list[dict[str, np.ndarray]],
    targets: int,
) -> str:
    """ai.onnx.ml's TreeEnsemble (opset 5): float64 thresholds, leaf values and sums, where skl2onnx's
    TreeEnsembleClassifier/Regressor round all three to float32. A leaf there adds to one target only, so a
    tree with a value per target (a forest classifier's class fractions) is repeated once per target; a
    tree with one value column adds to target `position % targets` (gradient boosting's order). Returns the
    [rows, targets] sums."""
    splits: list[float] = []
    leaf_weights: list[float] = []
    roots: list[int] = []
    node_features: list[int] = []
    missing: list[int] = []
    true_ids: list[int] = []
    true_leaf: list[int] = []
    false_ids: list[int] = []
    false_leaf: list[int] = []
    leaf_targets: list[int] = []
    for position, tree in enumerate(trees):
        per_target = tree["value"].shape[1] > 1
        for target in range(targets) if per_target else [position % targets]:
            column = target if per_target else 0
            leaf, nodes = tree["leaf"], np.flatnonzero(~tree["leaf"])
            # Each tree's interior nodes and leaves, numbered on from the trees before it.
            node_ids = dict(zip(nodes.tolist(), range(len(splits), len(splits) + len(nodes)), strict=True))
            leaves = np.flatnonzero(leaf)
            leaf_ids = dict(
                zip(leaves.tolist(), range(len(leaf_weights), len(leaf_weights) + len(leaves)), strict=True)
            )
            leaf_targets.extend([target] * len(leaves))
            leaf_weights.extend(tree["value"][leaves, column].tolist())
            if not len(nodes):  # a tree that is one leaf: a split whose both branches reach it
                roots.append(len(splits))
                node_features.append(0)
                splits.append(0.0)
                missing.append(1)
                true_ids.append(leaf_ids[0])
                false_ids.append(leaf_ids[0])
                true_leaf.append(1)
                false_leaf.append(1)
                continue
            roots.append(node_ids[0])
            for node in nodes.tolist():
                node_features.append(int(tree["feature"][node]))
                splits.append(float(tree["threshold"][node]))
                missing.append(int(tree["missing_left"][node]))  # the true branch is the left one
                for child, ids, leafs in (
                    (int(tree["left"][node]), true_ids, true_leaf),
                    (int(tree["right"][node]), false_ids, false_leaf),
                ):
                    ids.append(leaf_ids[child] if leaf[child] else node_ids[child])
                    leafs.append(int(leaf[child]))
    sums = scope.get_unique_variable_name("tree_sums")
    container.add_node(
        "TreeEnsemble",
        [features],
        [sums],
        op_domain="ai.onnx.ml",
        # Declared at the opset skl2onnx targets; `convert` raises the model's import to TREE_ENSEMBLE_OPSET.
        op_version=TARGET_OPSET["ai.onnx.ml"],
        n_targets=targets,
        aggregate_function=1,  # SUM
        post_transform=0,  # NONE
        tree_roots=roots,
        nodes_featureids=node_features,
        nodes_modes=numpy_helper.from_array(np.zeros(len(splits), dtype=np.uint8)),  # BRANCH_LEQ
        nodes_splits=numpy_helper.from_array(np.array(splits, dtype=np.float64)),
        nodes_missing_value_tracks_true=missing,
        nodes_truenodeids=true_ids,
        nodes_trueleafs=true_leaf,
        nodes_falsenodeids=false_ids,
        nodes_falseleafs=false_leaf,
        leaf_targetids=leaf_targets,
        leaf_weights=numpy_helper.from_array(np.array(leaf_weights, dtype=np.float64)),
    )
    return sums


def _constant(scope: Scope, container: ModelComponentContainer, name: str, values: np.ndarray) -> str:
    variable = scope.get_unique_variable_name(name)
    proto = (
        TensorProto.STRING if values.dtype.kind in "OUS" else helper.np_dtype_to_tensor_dtype(values.dtype)
    )
    content = (
        [str(v).encode() for v in values.ravel()] if proto == TensorProto.STRING else values.ravel().tolist()
    )
    container.add_initializer(variable, proto, list(values.shape), content)
    return variable


def _trees(scope: Scope, operator: Operator, container: ModelComponentContainer) -> None:
    """A random forest or histogram gradient boosting, classifier or regressor, in float64 as scikit-learn
    computes it (models/compiled.py's formulas)."""
    model = operator.raw_operator
    features = operator.inputs[0].full_name
    if isinstance(model, RandomForestClassifier | RandomForestRegressor):
        trees, targets = forest_trees(model), model.n_classes_ if is_classifier(model) else 1
        # scikit-learn's trees compare float32 values with float64 thresholds.
        single = scope.get_unique_variable_name("float32")
        container.add_node("Cast", [features], [single], to=TensorProto.FLOAT)
        rounded = scope.get_unique_variable_name("rounded")
        container.add_node("Cast", [single], [rounded], to=TensorProto.DOUBLE)
        sums = _tree_ensemble(scope, container, rounded, trees, targets)
        count = _constant(scope, container, "trees", np.array([len(trees)], dtype=np.float64))
        scores = scope.get_unique_variable_name("mean")
        container.add_node("Div", [sums, count], [scores])  # scikit-learn sums the trees, then divides
    else:
        trees, targets = boosting_trees(model), model.n_trees_per_iteration_
        sums = _tree_ensemble(scope, container, features, trees, targets)
        baseline = _constant(
            scope, container, "baseline", np.asarray(model._baseline_prediction).reshape(1, -1)
        )
        scores = scope.get_unique_variable_name("raw")
        container.add_node("Add", [sums, baseline], [scores])
    if not is_classifier(model):
        container.add_node("Identity", [scores], [operator.outputs[0].full_name])
        return
    probabilities = operator.outputs[1].full_name
    if isinstance(model, RandomForestClassifier):
        container.add_node("Identity", [scores], [probabilities])
    elif targets == 1:  # half binomial loss: expit of the one raw column, [1 - p, p]
        positive = scope.get_unique_variable_name("positive")
        container.add_node("Sigmoid", [scores], [positive])
        one = _constant(scope, container, "one", np.array([1.0]))
        negative = scope.get_unique_variable_name("negative")
        container.add_node("Sub", [one, positive], [negative])
        container.add_node("Concat", [negative, positive], [probabilities], axis=1)
    else:
        container.add_node("Softmax", [scores], [probabilities], axis=1)
    # scikit-learn's label: the class of the largest probability (the first, on a tie, as ArgMax).
    best = scope.get_unique_variable_name("best")
    container.add_node("ArgMax", [probabilities], [best], axis=1, keepdims=0)
    classes = _constant(scope, container, "classes", _label_values(model.classes_))
    container.add_node("Gather", [classes, best], [operator.outputs[0].full_name], axis=0)


def _label_values(classes: np.ndarray) -> np.ndarray:
    if all(isinstance(label, str) for label in classes):
        return classes.astype(object)
    if np.issubdtype(np.asarray(classes).dtype, np.integer) or classes.dtype == bool:
        return classes.astype(np.int64)
    raise NotExportableError(f"class labels of type {classes.dtype} (ONNX labels are strings or integers)")


def _trees_shape(operator: Operator) -> None:
    model = operator.raw_operator
    if not is_classifier(model):
        operator.outputs[0].type = DoubleTensorType([None, 1])
        return
    labels = _label_values(model.classes_)
    operator.outputs[0].type = (StringTensorType if labels.dtype == object else Int64TensorType)([None])
    operator.outputs[1].type = DoubleTensorType([None, len(labels)])


# Our converters, given to skl2onnx for this conversion only (no global registration): the model type's
# conversion function and shape calculator.
Converter = Callable[[Scope, Operator, ModelComponentContainer], None]
CONVERTERS: dict[type, tuple[Converter, Callable[[Operator], None]]] = {
    SimpleImputer: (_imputer, _imputer_shape),
    OneHotEncoder: (_one_hot_encoder, _one_hot_encoder_shape),
    **dict.fromkeys(TREE_ENSEMBLES, (_trees, _trees_shape)),
}


def onnx_inputs(schema: FeatureSchema) -> list[tuple[str, DoubleTensorType | StringTensorType]]:
    return [
        (
            feature.name,
            StringTensorType([None, 1])
            if feature.kind is FeatureKind.CATEGORICAL
            else DoubleTensorType([None, 1]),
        )
        for feature in schema.features
    ]


def convert(
    pipeline: Pipeline,
    schema: FeatureSchema,
    converters: dict[type, tuple[Converter, Callable[[Operator], None]]] = CONVERTERS,
) -> bytes:
    """The serialized ONNX model of a fitted candidate pipeline."""
    estimator = pipeline.steps[-1][1]
    try:
        model = convert_sklearn(
            pipeline,
            initial_types=onnx_inputs(schema),
            target_opset=TARGET_OPSET,
            options={id(estimator): {"zipmap": False}} if hasattr(estimator, "classes_") else None,
            custom_conversion_functions={kind: pair[0] for kind, pair in converters.items()},
            custom_shape_calculators={kind: pair[1] for kind, pair in converters.items()},
        )
    except (NotExportableError, NotCompilableError) as error:
        raise NotExportableError(str(error)) from None
    except Exception as exc:  # skl2onnx raises anything from RuntimeError to NotImplementedError
        raise NotExportableError(
            f"skl2onnx cannot convert it: {type(exc).__name__}: {first_line(exc)}"
        ) from None
    if any(node.op_type == "TreeEnsemble" for node in model.graph.node):
        for opset in model.opset_import:
            if opset.domain == "ai.onnx.ml":
                opset.version = TREE_ENSEMBLE_OPSET
    try:
        onnx.checker.check_model(model, full_check=True)
    except onnx.checker.ValidationError as exc:
        raise NotExportableError(f"the ONNX checker refuses it: {first_line(exc)}") from None
    return model.SerializeToString()


def session(model: bytes) -> ort.InferenceSession:
    """An onnxruntime session for a 2-core machine: one thread each way, no idle spinning (onnxruntime
    ignores OMP_NUM_THREADS and would otherwise spin threads against the workers)."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.add_session_config_entry("session.inter_op.allow_spinning", "0")
    return ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])


def input_names(runner: ort.InferenceSession, schema: FeatureSchema) -> dict[str, str]:
    """Each feature's ONNX input name. skl2onnx renames inputs to C-style names ('mean radius' becomes
    'mean_radius', #1235) and keeps their order, so the session's inputs are the schema's features in order
    (a mix-up would not pass `export`'s proof)."""
    return {
        feature.name: spec.name for feature, spec in zip(schema.features, runner.get_inputs(), strict=True)
    }


def feed(runner: ort.InferenceSession, schema: FeatureSchema, prepared: pd.DataFrame) -> dict[str, Any]:
    """Prepared rows (`FeatureSchema.prepare`) as the model's inputs."""
    names = input_names(runner, schema)
    columns = {}
    for feature in schema.features:
        column = prepared[feature.name]
        if feature.kind is FeatureKind.CATEGORICAL:
            values = column.where(column.notna(), MISSING_STRING).to_numpy(dtype=object)
        else:
            values = column.to_numpy(dtype=np.float64)
        columns[names[feature.name]] = values.reshape(-1, 1)
    return columns


def predict(runner: ort.InferenceSession, inputs: dict[str, Any], classification: bool) -> list[np.ndarray]:
    """[labels, probabilities] (classification) or [values] (regression), by output name."""
    names = ["label", "probabilities"] if classification else ["variable"]
    return [np.asarray(output) for output in runner.run(names, inputs)]


@dataclass(frozen=True)
class OnnxOutcome:
    """Whether the ONNX model was kept and why: recorded in MLflow (tag `onnx`, `onnx.json`) and in the
    store metadata (`onnx`)."""

    onnx: str  # EXPORTED or NOT_EXPORTED
    reason: str
    rows_checked: int = 0
    max_difference: float | None = None
    label_differences: int | None = None
    # What a Triton or KServe caller sends: per feature, in order, its ONNX input name and Open Inference
    # Protocol datatype.
    inputs: list[dict[str, str]] | None = None

    def as_metadata(self) -> dict[str, Any]:
        """For BentoML metadata, which cannot hold None, and MLflow."""
        return {key: value for key, value in asdict(self).items() if value is not None}


def export(
    pipeline: Pipeline,
    schema: FeatureSchema,
    prepared: pd.DataFrame,
    classification: bool,
    converters: dict[type, tuple[Converter, Callable[[Operator], None]]] = CONVERTERS,
) -> tuple[bytes | None, OnnxOutcome]:
    """The ONNX model if onnxruntime gives scikit-learn's answers on `prepared` (the held-out rows) and on
    their edge rows, the rows models/compiled.py's `prove` checks: the same labels and probabilities (or
    values) within TOLERANCE; else None and why not."""
    try:
        model = convert(pipeline, schema, converters)
        runner = session(model)
    except NotExportableError as error:
        return None, OnnxOutcome(NOT_EXPORTED, str(error))
    except Exception as exc:  # onnxruntime refuses a graph with anything from Fail to NotImplemented
        why = f"onnxruntime cannot load it: {type(exc).__name__}: {first_line(exc)}"
        return None, OnnxOutcome(NOT_EXPORTED, why)
    frame = proof_rows(schema, prepared)
    expected_scores = pipeline.predict_proba(frame) if classification else pipeline.predict(frame)
    try:
        outputs = predict(runner, feed(runner, schema, frame), classification)
    except Exception as exc:  # e.g. a converter's output that does not fit the next part's shapes
        why = f"onnxruntime fails on the proof rows: {type(exc).__name__}: {first_line(exc)}"
        return None, OnnxOutcome(NOT_EXPORTED, why)
    scores = outputs[-1] if classification else outputs[0].reshape(-1)
    difference, flips = disagreement(scores, expected_scores, classification)
    if classification:  # the label output a Triton or KServe caller reads, against scikit-learn's
        flips = max(flips, int(np.sum(outputs[0].reshape(-1) != pipeline.predict(frame))))
    labels_differing = flips if classification else None
    if flips or not difference <= TOLERANCE:  # NaN included
        why = (
            f"onnxruntime differs from scikit-learn: max difference {difference:.3g} "
            f"(tolerance {TOLERANCE:g}), {flips} of {len(frame)} labels differ"
        )
        return None, OnnxOutcome(NOT_EXPORTED, why, len(frame), difference, labels_differing)
    names = input_names(runner, schema)
    inputs = [
        {
            "name": names[feature.name],
            "feature": feature.name,
            "datatype": "BYTES" if feature.kind is FeatureKind.CATEGORICAL else "FP64",
        }
        for feature in schema.features
    ]
    why = f"onnxruntime equal to scikit-learn within {TOLERANCE:g}"
    return model, OnnxOutcome(EXPORTED, why, len(frame), difference, labels_differing, inputs)
