"""The data plane: everything between a decoded request and its answer, shared by every transport.

HTTP (service.py), OIP REST and gRPC (serving/oip) only decode and encode. Here: value validation against
the feature schema, the raw frame, the (adaptively batched) model call, the response shape, unknown
categories, the prediction log and the prediction metrics; and explanations (serving/explaining.py), which
are predicted and logged as predictions are, then explained by the same version.
"""

from __future__ import annotations

import operator
import re
import time
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from functools import cached_property
from typing import Any

import numpy as np
from pydantic import BaseModel

from models.explain import Explanations
from models.schema import MAX_STORED_CATEGORIES, Feature, FeatureKind, RecordValues, field_names
from models.store import StoredModel
from serving import tracing
from serving.answered import AnsweredIndex
from serving.arrowlog import AnsweredRequest, ArrowLog, LogColumns
from serving.errors import BadInputError, ModelNotFoundError, ServingError, UnavailableError
from serving.explaining import VersionExplainer
from serving.metrics import ServingMetrics, mark_refusal_counted
from serving.model import COMPILED, SCIKIT_LEARN
from serving.oip.codec import InferRequest, OutputTensor, columns_from_tensors

# The model service's batchable API: prepared rows (a 2-D array in schema column order) in, probabilities
# (classification) or values (regression) out. An array, not a DataFrame: BentoML 1.4's batching dispatcher
# cannot size DataFrame batches.
ModelCall = Callable[[np.ndarray], Awaitable[np.ndarray]]
# Told of every answered batch after its answer is made (the shadow challenger: serving/shadow.py): the rows,
# the batch, and the plane that answered. Must not block.
AnsweredHook = Callable[[np.ndarray, "PredictionBatch", "DataPlane"], None]
# A request id that a client chooses (HTTP X-Request-Id, OIP `id`): logged with every row and named again by
# the labels of /feedback, so it must be short and plain.
MAX_REQUEST_ID = 128
VALID_REQUEST_ID = re.compile(rf"[\x21-\x7e]{{1,{MAX_REQUEST_ID}}}")
OIP_DATATYPES = {FeatureKind.NUMERIC: "FP64", FeatureKind.BOOLEAN: "BOOL", FeatureKind.CATEGORICAL: "BYTES"}
# The OIP model metadata's platform, per scorer (serving/model.py).
PLATFORMS = {SCIKIT_LEARN: "scikit-learn", COMPILED: "tabserve_compiled"}
# OIP outputs that explain the rows (models/explain.py), returned only when requested by name.
EXPLANATION_OUTPUTS = ("attributions", "base_value", "output_value", "explained_class")


@dataclass(frozen=True)
class PredictionBatch:
    request_id: str
    labels: list[Any]  # class labels, or predicted values for regression (native Python types)
    probabilities: np.ndarray | None  # (rows, classes), in the order of `classes`
    classes: list[str] | None
    unknown_categories: list[dict[str, str]]  # per row: feature -> value never seen in training

    @cached_property
    def answers(self) -> list[dict[str, Any]]:
        """Per row: prediction, probabilities and unknown categories (the answer without the lineage).
        Made once, for the prediction log and for the HTTP answers alike."""
        if self.probabilities is not None and self.classes:
            classes = self.classes
            probabilities: list[dict[str, float] | None] = [
                dict(zip(classes, row, strict=True)) for row in self.probabilities.tolist()
            ]
        else:
            probabilities = [None] * len(self.labels)
        return [
            {"prediction": label, "probabilities": row_probabilities, "unknown_categories": unknown}
            for label, row_probabilities, unknown in zip(
                self.labels, probabilities, self.unknown_categories, strict=True
            )
        ]


class DataPlane:
    def __init__(
        self,
        model: StoredModel,
        call_model: ModelCall,
        scorer: dict[str, Any],
        log: ArrowLog,
        metrics: ServingMetrics,
        answered: AnsweredIndex | None = None,
        on_answered: AnsweredHook | None = None,
        explainer: VersionExplainer | None = None,
    ) -> None:
        """`explainer`: this version's explanations (serving/explaining.py); None: none served."""
        self.model = model
        self.name = model.name
        self.version = model.version
        self.schema = model.schema
        self.feature_names = model.schema.names
        self.task = model.task
        self.classes = [str(label) for label in model.classes] if model.classes else None
        self.lineage = model.lineage
        self._trace_attributes = tracing.model_attributes(self.lineage)
        self._call_model = call_model
        self.scorer = scorer  # what scores the rows, and why (serving/model.py planned_scorer)
        # Rows are 2-D arrays in schema column order, never DataFrames: building a frame per request costs
        # more than the model call. All-numeric rows are float64 (cheap to send and to log); booleans and
        # text need an object array. The model service builds one frame per batch.
        numeric_only = all(f.kind is FeatureKind.NUMERIC for f in model.schema.features)
        self._row_dtype: type = np.float64 if numeric_only else object
        self._record_values = operator.attrgetter(*field_names(self.feature_names))
        self._required_columns = [i for i, f in enumerate(model.schema.features) if not f.nullable]
        # The columns with a largest magnitude the model takes (models/limits.py), and those magnitudes.
        self._limited = [i for i, f in enumerate(model.schema.features) if f.limit is not None]
        self._limits = np.array([model.schema.features[i].limit for i in self._limited], dtype=np.float64)
        self._output_names = ["label", "probabilities"] if self.classes else ["label"]
        self._explainer = explainer
        self._explanation_outputs: list[str] = []
        if explainer is not None:
            self._explanation_outputs = [
                name for name in EXPLANATION_OUTPUTS if self.classes or name != "explained_class"
            ]
            self._output_names += self._explanation_outputs
        # The index of each class label in the model's classes: the class an explanation is for.
        self._class_index = {label: index for index, label in enumerate(model.classes or [])}
        self._log = log
        self._log_columns = LogColumns(model.schema.features, model.classes, self.lineage)
        self._answered = answered
        self._on_answered = on_answered
        self._metrics = metrics
        self._draining = False
        # Unknown categories can be named only where the stored list of seen categories is complete.
        self._known_categories = [
            (index, feature.name, frozenset(feature.categories))
            for index, feature in enumerate(model.schema.features)
            if feature.kind is FeatureKind.CATEGORICAL and len(feature.categories) < MAX_STORED_CATEGORIES
        ]

    # ---- health and metadata -------------------------------------------------------------------------

    def is_ready(self) -> bool:
        return not self._draining

    def start_draining(self) -> None:
        self._draining = True

    def check_model(self, name: str, version: str | None = None) -> None:
        if name != self.name:
            raise ModelNotFoundError(
                f"model '{name}' is not served here; this server serves '{self.name}'", "unknown_model"
            )
        if version not in (None, "", self.version, self.lineage["registered_version"]):
            raise ModelNotFoundError(
                f"version '{version}' of model '{name}' is not served; served: '{self.version}' "
                f"(registered version {self.lineage['registered_version']})",
                "unknown_version",
            )

    def model_info(self) -> dict[str, Any]:
        meta = self.model.metadata
        return {
            **self.lineage,
            "tag": self.model.tag,
            "registered_model": self.model.labels["registered_model"],
            "alias": self.model.labels["alias"],
            "task": self.task.value,
            "classes": self.classes,
            "estimator": meta["estimator"],
            "metric": meta["metric"],
            "test_metrics": meta["test_metrics"],
            "trained_at": meta["trained_at"],
            "scorer": self.scorer,
            # The portable ONNX file kept with the model, or why not (models/onnx_export.py); None for a
            # version saved before ONNX files were made.
            "onnx": meta.get("onnx"),
            # Permutation importance of each input column on the held-out rows, and the data of the
            # evaluation's figure (confusion matrix or predicted-actual pairs), computed at training
            # (models/card.py); None for a version saved before they were.
            "importance": meta.get("importance"),
            "evaluation": meta.get("evaluation"),
            "feature_schema": self.schema.model_dump(mode="json", exclude_none=True),
        }

    def model_metadata(self) -> dict[str, Any]:
        """The Open Inference Protocol's model metadata."""
        label = {"name": "label", "datatype": "BYTES" if self.classes else "FP64", "shape": [-1]}
        outputs = [label]
        if self.classes:
            outputs.append({"name": "probabilities", "datatype": "FP64", "shape": [-1, len(self.classes)]})
        for name in self._explanation_outputs:
            outputs.append(
                {
                    "name": name,
                    "datatype": "BYTES" if name == "explained_class" else "FP64",
                    "shape": [-1, len(self.feature_names)] if name == "attributions" else [-1],
                }
            )
        explaining = {"explanation_outputs": self._explanation_outputs} if self._explanation_outputs else {}
        return {
            "name": self.name,
            "versions": [self.version],
            # gRPC's model metadata has no parameters: the platform says which scorer serves there.
            "platform": PLATFORMS[self.scorer["scorer"]],
            "inputs": [
                {"name": f.name, "datatype": OIP_DATATYPES[f.kind], "shape": [-1]}
                for f in self.schema.features
            ],
            "outputs": outputs,
            "parameters": {
                "registered_version": self.lineage["registered_version"],
                "classes": self.classes or [],
                "scorer": self.scorer["scorer"],
                **explaining,
            },
        }

    def server_metadata(self) -> dict[str, Any]:
        return {"name": "tabserve", "version": "0.1.0", "extensions": ["binary_tensor_data"]}

    # ---- inputs -----------------------------------------------------------------------------------------

    def rows_from_records(
        self, records: Sequence[BaseModel] | RecordValues, in_a_list: bool = True
    ) -> np.ndarray:
        """Records already validated by the schema's request model (the HTTP APIs' input spec), or their
        values as its fast parser read them (models/schema.py RecordsParser). Errors name a record of a list
        by its index, from 0, as the request model's errors do."""
        if isinstance(records, RecordValues):
            values = records.rows
            if records.names != self.feature_names:  # a version whose columns are in another order
                order = [records.names.index(name) for name in self.feature_names]
                values = [tuple(row[i] for i in order) for row in values]
        else:
            read = self._record_values  # all of a record's fields in one call, in schema order
            values = [read(record) for record in records]
        rows: np.ndarray = np.array(values, dtype=self._row_dtype)
        rows = rows.reshape(len(values), -1)  # with one feature, attrgetter gives values, not tuples
        self._check_limits(
            rows, (lambda index, text: f"record {index}, {text}") if in_a_list else _unnumbered
        )
        return rows

    def rows_from_columns(
        self, columns: Mapping[str, Sequence[Any] | np.ndarray], first_row: int = 0
    ) -> np.ndarray:
        """Columns decoded from tensors or a file, validated against the same schema rules as records.
        Errors name the first bad row, counted from 1 + `first_row` (where a chunk of a file starts)."""
        if self._row_dtype is np.float64:
            # All-numeric schema: check the whole matrix at once; only a bad value takes the per-column path
            # below, which names it.
            arrays = [np.asarray(columns[name]) for name in self.feature_names]
            if all(array.dtype.kind in "fiu" for array in arrays):
                matrix = np.column_stack(arrays).astype(np.float64, copy=False)
                if not np.isinf(matrix).any() and not np.isnan(matrix[:, self._required_columns]).any():
                    self._check_limits(matrix, _file_rows(first_row))
                    return matrix
        validated = [_validated_column(f, columns[f.name], first_row) for f in self.schema.features]
        rows: np.ndarray = np.column_stack(validated).astype(self._row_dtype, copy=False)
        self._check_limits(rows, _file_rows(first_row))
        return rows

    def _check_limits(self, rows: np.ndarray, name_row: Callable[[int, str], str]) -> None:
        """Refuse finite numbers too large for the model (models/limits.py): they would fail the model call
        that the request shares with others. NaN (missing) compares false and passes. `name_row` adds the
        bad row to the message, as the transport counts its rows."""
        if not self._limited:
            return
        values = rows if len(self._limited) == rows.shape[1] else rows[:, self._limited]
        beyond = np.abs(values.astype(np.float64, copy=False)) > self._limits
        if beyond.any():
            row, column = (int(index) for index in np.argwhere(beyond)[0])
            feature = self.schema.features[self._limited[column]]
            problem = (
                f"'{feature.name}': {float(values[row, column]):g} is beyond what the model takes "
                f"(±{feature.limit:g}; training range [{feature.minimum:g}, {feature.maximum:g}])"
            )
            raise BadInputError(name_row(row, problem), "out_of_range")

    # ---- prediction ---------------------------------------------------------------------------------------

    async def predict_rows(
        self,
        rows: np.ndarray,
        transport: str,
        endpoint: str,
        request_id: str | None = None,
        caller: str | None = None,
    ) -> PredictionBatch:
        """`caller`: the name of the API key the request came with (serving/auth.py), for the log."""
        if len(rows) == 0:
            raise BadInputError("no rows to predict: the batch is empty", "empty_batch")
        if request_id is not None and not VALID_REQUEST_ID.fullmatch(request_id):
            shown = request_id[:40] + ("..." if len(request_id) > 40 else "")
            raise BadInputError(
                f"request id {shown!r} is not valid: use 1 to {MAX_REQUEST_ID} visible ASCII characters "
                "(letters, digits, punctuation)",
                "invalid_request_id",
            )
        request_id = request_id or uuid.uuid4().hex
        tracing.decoded(request_id, len(rows), self._trace_attributes)
        outputs = np.asarray(await self._call_model(rows))
        if not np.isfinite(outputs).all():
            bad_row = int(np.flatnonzero(~np.isfinite(outputs.reshape(len(rows), -1)).all(axis=1))[0]) + 1
            raise BadInputError(
                f"row {bad_row}: the model's output is not a finite number for these values (features far "
                "outside the training range)",
                "not_finite_output",
            )
        if self.classes is not None and self.model.classes is not None:
            labels = np.asarray(self.model.classes, dtype=object)[outputs.argmax(axis=1)].tolist()
            probabilities: np.ndarray | None = outputs
        else:
            labels, probabilities = outputs.reshape(-1).tolist(), None
        batch = PredictionBatch(
            request_id=request_id,
            labels=labels,
            probabilities=probabilities,
            classes=self.classes,
            unknown_categories=self._unknown_categories(rows),
        )
        self._record(rows, batch, transport, endpoint, caller)
        if self._on_answered is not None:
            self._on_answered(rows, batch, self)
        return batch

    async def infer(
        self, request: InferRequest, transport: str, caller: str | None = None
    ) -> tuple[list[OutputTensor], str, dict[str, str]]:
        """An Open Inference Protocol request (REST or gRPC), already decoded into tensors: its outputs, its
        request id and the response's parameters (what the explanation outputs are, when requested)."""
        # Checked before the model call: a refused request is neither predicted, logged nor counted.
        unknown = [name for name in request.outputs or [] if name not in self._output_names]
        if unknown:
            raise BadInputError(
                f"unknown output {', '.join(map(repr, unknown))}; available: {', '.join(self._output_names)}",
                "unknown_output",
            )
        rows = self.rows_from_columns(columns_from_tensors(request.inputs, self.feature_names))
        if any(name in self._explanation_outputs for name in request.outputs or []):
            batch, explanations = await self.explain_rows(rows, transport, "infer", request.id, caller)
            outputs = self.output_tensors(batch, request.outputs, explanations)
            return outputs, batch.request_id, explanation_parameters(explanations)
        batch = await self.predict_rows(rows, transport, "infer", request.id, caller)
        return self.output_tensors(batch, request.outputs), batch.request_id, {}

    def output_tensors(
        self, batch: PredictionBatch, requested: list[str] | None, explanations: Explanations | None = None
    ) -> list[OutputTensor]:
        """The requested outputs (all but the explanations by default), whose names `infer` has checked."""
        rows = len(batch.labels)
        available = {
            "label": OutputTensor(
                "label",
                "BYTES" if batch.classes else "FP64",
                [rows],
                [str(label) for label in batch.labels]
                if batch.classes
                else np.asarray(batch.labels, dtype=np.float64),
            )
        }
        if batch.probabilities is not None and batch.classes:
            available["probabilities"] = OutputTensor(
                "probabilities", "FP64", [rows, len(batch.classes)], batch.probabilities.astype(np.float64)
            )
        if not requested:
            return list(available.values())
        if explanations is not None:
            available |= {
                "attributions": OutputTensor(
                    "attributions", "FP64", [rows, len(self.feature_names)], explanations.attributions
                ),
                "base_value": OutputTensor("base_value", "FP64", [rows], explanations.base_values),
                "output_value": OutputTensor("output_value", "FP64", [rows], explanations.output_values),
            }
            if explanations.explained_classes is not None:
                available["explained_class"] = OutputTensor(
                    "explained_class", "BYTES", [rows], explanations.explained_classes
                )
        return [available[name] for name in requested]

    # ---- explanations -------------------------------------------------------------------------------------

    async def explain_rows(
        self,
        rows: np.ndarray,
        transport: str,
        endpoint: str,
        request_id: str | None = None,
        caller: str | None = None,
    ) -> tuple[PredictionBatch, Explanations]:
        """Predict and log the rows as `predict_rows` does, then explain them with this same version, on the
        worker's explain thread. Refused (503) before anything is predicted when too many rows wait for
        that thread."""
        explainer = self._explainer
        if explainer is None:
            raise ServingError("explanations are not served here", "no_explainer")
        if len(rows) > explainer.max_rows:
            raise BadInputError(
                f"{len(rows)} rows to explain; at most {explainer.max_rows} per request "
                "(TABSERVE_EXPLAIN_MAX_RECORDS)",
                "too_many_rows",
            )
        with explainer.thread.place(len(rows)):
            batch = await self.predict_rows(rows, transport, endpoint, request_id, caller)
            classes = np.array([self._class_index[label] for label in batch.labels]) if self.classes else None
            explanations = await explainer.explain(rows, classes)
        return batch, explanations

    def explained_responses(self, batch: PredictionBatch, explanations: Explanations) -> list[dict[str, Any]]:
        """`responses`, each with its row's `explanation`."""
        return [
            {**answer, "explanation": explanation}
            for answer, explanation in zip(
                self.responses(batch), explanations.as_dicts(self.feature_names), strict=True
            )
        ]

    def responses(self, batch: PredictionBatch) -> list[dict[str, Any]]:
        """One JSON-ready answer per row, for the HTTP APIs: with the request id and the row's index, by
        which `POST /feedback` names the row a label is for."""
        return [
            {**answer, "request_id": batch.request_id, "row": row, **self.lineage}
            for row, answer in enumerate(batch.answers)
        ]

    # ---- accounting ---------------------------------------------------------------------------------------

    def refused(self, error: ServingError, transport: str) -> None:
        counter = (
            self._metrics.shed if isinstance(error, UnavailableError) else self._metrics.validation_errors
        )
        counter.labels(transport=transport, reason=error.reason).inc()
        mark_refusal_counted(error.reason)

    def observe(self, transport: str, endpoint: str, started: float) -> None:
        self._metrics.request_seconds.labels(transport=transport, endpoint=endpoint).observe(
            time.perf_counter() - started
        )

    def _unknown_categories(self, rows: np.ndarray) -> list[dict[str, str]]:
        unknown: list[dict[str, str]] = [{} for _ in range(len(rows))]
        for index, name, known in self._known_categories:
            for row, value in enumerate(rows[:, index].tolist()):
                if value is not None and value not in known:
                    unknown[row][name] = str(value)
        return unknown

    def _record(
        self, rows: np.ndarray, batch: PredictionBatch, transport: str, endpoint: str, caller: str | None
    ) -> None:
        predicted = Counter(map(str, batch.labels)) if batch.classes else Counter(value=len(batch.labels))
        for label, count in predicted.items():
            self._metrics.predictions.labels(model=self.name, version=self.version, predicted=label).inc(
                count
            )
        # Only queued here: the log's thread turns the rows and answers into columns (serving/arrowlog.py).
        self._log.write(
            AnsweredRequest(
                columns=self._log_columns,
                answered_at_us=time.time_ns() // 1000,
                request_id=batch.request_id,
                transport=transport,
                endpoint=endpoint,
                caller=caller,
                rows=rows,
                labels=batch.labels,
                probabilities=batch.probabilities,
                unknown_categories=batch.unknown_categories,
                trace=tracing.answered(),
            )
        )
        if self._answered is not None:
            self._answered.add(batch.request_id, len(rows), self.version)


def explanation_parameters(explanations: Explanations) -> dict[str, str]:
    """What an OIP response that holds explanation outputs says of them: the method, the units and, when
    every row explains the same class (always so for a binary model), that class."""
    parameters = {"explanation_method": explanations.method, "explanation_output": explanations.output}
    explained = set(explanations.explained_classes or [])
    if len(explained) == 1:
        parameters["explained_class"] = explained.pop()
    return parameters


def _validated_column(feature: Feature, values: Sequence[Any] | np.ndarray, first_row: int) -> np.ndarray:
    """Apply the request model's rules (types, finite numbers, missing only where allowed) to a column."""
    array = np.asarray(values)
    name = feature.name
    if feature.kind is FeatureKind.NUMERIC:
        if array.dtype.kind not in "fiu":
            raise BadInputError(f"'{name}': expected numbers, got {_describe(array)}", "wrong_type")
        floats = array.astype(np.float64)
        if np.isinf(floats).any():
            row = first_row + int(np.flatnonzero(np.isinf(floats))[0]) + 1
            raise BadInputError(f"'{name}': Infinity is not allowed (row {row})", "not_finite")

        if not feature.nullable and np.isnan(floats).any():
            row = first_row + int(np.flatnonzero(np.isnan(floats))[0]) + 1
            raise BadInputError(
                f"'{name}': missing value (NaN) is not allowed for this feature (row {row})", "missing_value"
            )
        return floats
    if feature.kind is FeatureKind.BOOLEAN:
        if array.dtype.kind == "b":
            return array.astype(object)
        if array.dtype.kind in "iu" and np.isin(array, [0, 1]).all():
            return array.astype(bool).astype(object)
        if array.dtype.kind == "O":  # a file's boolean column with missing values: True / False / None
            cells = array.reshape(-1)
            present = [cell for cell in cells.tolist() if cell is not None]
            if all(isinstance(cell, bool) for cell in present):
                if len(present) < len(cells) and not feature.nullable:
                    row = first_row + next(i for i, cell in enumerate(cells) if cell is None) + 1
                    problem = f"'{name}': missing value is not allowed for this feature (row {row})"
                    raise BadInputError(problem, "missing_value")
                return cells
        raise BadInputError(f"'{name}': expected booleans, got {_describe(array)}", "wrong_type")
    cells = array.astype(object).reshape(-1)
    for cell in cells:
        if cell is None and feature.nullable:
            continue
        if not isinstance(cell, str):
            raise BadInputError(
                f"'{name}': expected strings (BYTES), got {type(cell).__name__}", "wrong_type"
            )
    return cells


def _file_rows(first_row: int) -> Callable[[int, str], str]:
    """Rows of tensors or of a file chunk, counted from 1 + `first_row`, as the other column errors count."""
    return lambda index, problem: f"{problem} (row {first_row + index + 1})"


def _unnumbered(_index: int, problem: str) -> str:
    return problem


def _describe(array: np.ndarray) -> str:
    return "strings" if array.dtype.kind in "USO" else f"{array.dtype}"
