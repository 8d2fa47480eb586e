"""Traffic for drift reports: real requests to a running service, over HTTP or gRPC, bounded in rows and rate.

Rows are drawn with replacement (seeded) from the model version's reference set: training rows, stored
with every model, so any model in the store can be simulated. The scenario then changes them:

- ``baseline``: nothing; traffic like training, in which a report should find no drift.
- ``shift``: the chosen numeric features (``--features``) move by k standard deviations of the reference.
- ``new-category``: the chosen categorical features (default: all) take values never seen in training.
  A model without categorical features (the bundled breast-cancer data is all numeric) has nothing to
  change: the scenario stops and says so.
- ``missing-spike``: the chosen features (default: all) are set missing. The service refuses a missing
  value for a feature that had none in training (``nullable`` false in the schema): those records get a
  400 (gRPC: INVALID_ARGUMENT), never reach the prediction log, and are counted as refused.
- ``concept``: the inputs are drawn as in ``baseline``, but the relation between features and target
  changes: in the region of one numeric feature (``--features``, default the first numeric one) above its
  reference median, a classifier's true label becomes the next of its classes, and a regressor's true value
  moves by k standard deviations of the target. Only the labels sent back (``--feedback``) show it.

``share`` limits the change to that fraction of the rows. Over HTTP one record goes to ``/predict``, or a
batch to ``/predict_batch``; over gRPC a batch is one Open Inference Protocol ModelInfer call, with one
[N, F] FP64 tensor when every feature is a number, else one tensor per feature (FP64, BOOL, BYTES).

Ground truth: each row's true target (``_target`` of the reference set, changed by ``concept``) goes with
it. With ``feedback`` above 0, that share of the answered rows gets its label (or value) sent back to
``POST /feedback`` after the predictions, in batches, each named by its answer's request id and row.
"""

from __future__ import annotations

import struct
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import StrEnum
from typing import NamedTuple, Protocol

import grpc
import httpx
import numpy as np
import orjson
import pandas as pd

from models.errors import InputError, first_line
from models.schema import FeatureKind, FeatureSchema
from models.store import TARGET_COLUMN, StoredModel
from serving.oip import grpc_predict_v2_pb2 as pb
from serving.oip import grpc_predict_v2_pb2_grpc as pb_grpc

TIMEOUT_SECONDS = 30.0
FEEDBACK_BATCH = 1000  # labels per POST /feedback: well under the service's limit (10,000 by default)


class Scenario(StrEnum):
    BASELINE = "baseline"
    SHIFT = "shift"
    NEW_CATEGORY = "new-category"
    MISSING_SPIKE = "missing-spike"
    CONCEPT = "concept"


@dataclass(frozen=True)
class Traffic:
    frame: pd.DataFrame  # one record per row as clients send it: numbers, booleans, text; NaN/None missing
    truth: pd.Series  # each row's true label (a class, as text) or value (regression), as feedback sends it
    notes: list[str]  # what the scenario did, and what the service will make of it


def traffic(
    model: StoredModel,
    scenario: Scenario,
    rows: int,
    features: list[str],
    k: float,
    share: float,
    seed: int,
) -> Traffic:
    schema = model.schema
    unknown = [name for name in features if name not in schema.names]
    if unknown:
        raise InputError(f"--features: {model.name} has no feature {unknown[0]!r}; it has: {_names(schema)}")
    rng = np.random.default_rng(seed)
    reference_set = model.load_reference()
    reference = reference_set[schema.names]
    drawn = reference_set.sample(n=rows, replace=True, random_state=rng).reset_index(drop=True)
    frame = _client_form(schema, drawn[schema.names])
    target = drawn[TARGET_COLUMN]
    truth = target.astype(float) if model.classes is None else target.astype(str)
    changed = rng.random(rows) < share
    if scenario in (Scenario.BASELINE, Scenario.CONCEPT):
        notes = [f"{rows:,} rows drawn from the reference set of {model.tag}, unchanged"]
        if scenario is Scenario.CONCEPT:
            notes += _concept(model, reference_set, frame, truth, changed, features, k)
    elif scenario is Scenario.SHIFT:
        notes = _shift(schema, reference, frame, changed, features, k)
    elif scenario is Scenario.NEW_CATEGORY:
        notes = _new_category(model, frame, changed, features, rng)
    else:
        notes = _missing(schema, frame, changed, features)
    return Traffic(frame, truth, notes)


def _concept(
    model: StoredModel,
    reference_set: pd.DataFrame,
    frame: pd.DataFrame,
    truth: pd.Series,
    changed: np.ndarray,
    features: list[str],
    k: float,
) -> list[str]:
    """Change the truth of the changed rows in one feature's upper half; the inputs stay as drawn."""
    numeric = model.schema.names_of(FeatureKind.NUMERIC)
    if len(features) > 1 or (features and features[0] not in numeric):
        raise InputError("concept takes one numeric feature in --features: the region where labels change")
    if not numeric:
        raise InputError(f"{model.name} has no numeric feature to mark the region where labels change")
    name = features[0] if features else numeric[0]
    median = float(reference_set[name].median())
    # A region of the inputs, not a random subset: the relation between features and target changes.
    region = changed & (frame[name] > median).to_numpy()
    where = f"in the {region.sum():,} of {len(frame):,} rows with {name} > {median:.4g} (reference median)"
    if model.classes is None:
        spread = float(reference_set[TARGET_COLUMN].std())
        truth[region] += k * spread
        return [f"concept: the true value moved by {k:g} x {spread:.4g} {where}"]
    classes = [str(label) for label in model.classes]
    following = dict(zip(classes, classes[1:] + classes[:1], strict=True))
    truth[region] = truth[region].map(following)
    return [f"concept: the true label is the next class ({' -> '.join([*classes, classes[0]])}) {where}"]


def _shift(
    schema: FeatureSchema,
    reference: pd.DataFrame,
    frame: pd.DataFrame,
    changed: np.ndarray,
    features: list[str],
    k: float,
) -> list[str]:
    if not features:
        raise InputError('shift needs --features, e.g. --features "mean radius,mean texture"')
    numeric = schema.names_of(FeatureKind.NUMERIC)
    notes = []
    for name in features:
        if name not in numeric:
            raise InputError(f"--features: {name!r} is not numeric; shift moves numbers only")
        spread = float(reference[name].std())
        if not spread > 0:
            raise InputError(f"{name!r} is constant in the reference set: no deviation to move by")
        frame.loc[changed, name] += k * spread
        notes.append(f"{name} moved by {k:g} x {spread:.4g} in {changed.sum():,} of {len(frame):,} rows")
    return notes


def _new_category(
    model: StoredModel,
    frame: pd.DataFrame,
    changed: np.ndarray,
    features: list[str],
    rng: np.random.Generator,
) -> list[str]:
    schema = model.schema
    categorical = schema.names_of(FeatureKind.CATEGORICAL)
    if not categorical:
        raise InputError(
            f"{model.name} has no categorical features (all {len(schema.names)} are numeric or boolean), "
            "so there is no category to make new; try shift or missing-spike"
        )
    chosen = features or categorical
    for name in chosen:
        if name not in categorical:
            raise InputError(f"--features: {name!r} is not categorical")
        seen = set(schema.features[schema.names.index(name)].categories)
        fresh = [value for value in (f"new-{name}-{i}" for i in range(3)) if value not in seen]
        frame.loc[changed, name] = rng.choice(fresh, size=int(changed.sum()))
    return [f"{', '.join(chosen)}: unseen values in {changed.sum():,} of {len(frame):,} rows"]


def _missing(
    schema: FeatureSchema, frame: pd.DataFrame, changed: np.ndarray, features: list[str]
) -> list[str]:
    chosen = features or schema.names
    for name in chosen:
        frame.loc[changed, name] = np.nan if frame[name].dtype.kind == "f" else None
    notes = [f"{', '.join(chosen)} missing in {changed.sum():,} of {len(frame):,} rows"]
    strict = [f.name for f in schema.features if f.name in chosen and not f.nullable]
    if strict:
        notes.append(
            f"{len(strict)} of these features had no missing value in training (not nullable): the service "
            "refuses records with them missing, and those rows never reach the prediction log"
        )
    return notes


def _client_form(schema: FeatureSchema, prepared: pd.DataFrame) -> pd.DataFrame:
    """Reference rows are prepared (booleans as 0/1); clients send booleans as true/false."""
    frame = prepared.reset_index(drop=True).copy()
    for name in schema.names_of(FeatureKind.BOOLEAN):
        frame[name] = frame[name].map({1.0: True, 0.0: False}).astype(object)
    for name in [*schema.names_of(FeatureKind.BOOLEAN), *schema.names_of(FeatureKind.CATEGORICAL)]:
        frame[name] = frame[name].astype(object).where(frame[name].notna(), None)
    return frame


def _names(schema: FeatureSchema) -> str:
    shown = ", ".join(schema.names[:8])
    return shown + (f", ... ({len(schema.names)} in all)" if len(schema.names) > 8 else "")


# ---- sending -------------------------------------------------------------------------------------------


class RowKey(NamedTuple):
    """An answered row: its position in the traffic's frame, and how the service named it."""

    position: int
    request_id: str
    row: int


@dataclass(frozen=True)
class Answer:
    accepted: int = 0  # answered: these rows are in the prediction log
    refused: int = 0  # bad input for the service (400 / INVALID_ARGUMENT): not logged
    failed: int = 0  # the service or the network failed
    skipped: int = 0  # could not be expressed in the transport
    reason: str = ""  # of the refusal or failure
    answered: tuple[RowKey, ...] = ()  # the accepted rows, by which feedback names them


class Sender(Protocol):
    destination: str

    def check(self, model: StoredModel) -> None: ...  # raises InputError when the model is not served

    def send(self, frame: pd.DataFrame) -> Answer: ...

    def close(self) -> None: ...


class HttpSender:
    def __init__(self, url: str, batch: int) -> None:
        self.url = url.rstrip("/")
        self.batch = batch
        self.destination = f"{self.url}/predict" if batch == 1 else f"{self.url}/predict_batch"
        self.client = httpx.Client(timeout=TIMEOUT_SECONDS)

    def check(self, model: StoredModel) -> None:
        where = f"{self.url}/v2/models/{model.name}/versions/{model.version}/ready"
        try:
            response = self.client.get(where)
        except httpx.HTTPError as exc:
            raise InputError(f"cannot reach the service at {self.url}: {first_line(exc)}") from None
        if response.status_code != 200:
            raise InputError(f"the service at {self.url} does not serve {model.tag}: {_error_text(response)}")

    def send(self, frame: pd.DataFrame) -> Answer:
        records = frame.astype(object).where(frame.notna(), None).to_dict(orient="records")
        body = orjson.dumps(records[0] if self.batch == 1 else records)
        rows = len(records)
        try:
            response = self.client.post(
                self.destination, content=body, headers={"Content-Type": "application/json"}
            )
        except httpx.HTTPError as exc:
            return Answer(failed=rows, reason=f"{type(exc).__name__}: {first_line(exc)}")
        if response.is_success:
            body = response.json()
            answers = [body] if self.batch == 1 else body
            keys = tuple(
                RowKey(index, answer["request_id"], answer["row"])
                for index, answer in zip(frame.index, answers, strict=True)
            )
            return Answer(accepted=rows, answered=keys)
        reason = f"HTTP {response.status_code}: {_error_text(response)}"
        if response.status_code < 500:
            return Answer(refused=rows, reason=reason)
        return Answer(failed=rows, reason=reason)

    def close(self) -> None:
        self.client.close()


class GrpcSender:
    def __init__(self, target: str, schema: FeatureSchema) -> None:
        self.destination = f"grpc://{target} ModelInfer"
        self.target = target
        self.schema = schema
        self.channel = grpc.insecure_channel(target)
        self.stub = pb_grpc.GRPCInferenceServiceStub(self.channel)
        self.model_name = ""
        self.matrix = all(f.kind is FeatureKind.NUMERIC for f in schema.features)

    def check(self, model: StoredModel) -> None:
        try:
            self.stub.ModelReady(
                pb.ModelReadyRequest(name=model.name, version=model.version), timeout=TIMEOUT_SECONDS
            )
        except grpc.RpcError as exc:
            raise InputError(
                f"the gRPC service at {self.target} does not serve {model.tag}: {_grpc_text(exc)}"
            ) from None
        self.model_name = model.name

    def send(self, frame: pd.DataFrame) -> Answer:
        text_or_flags = [f.name for f in self.schema.features if f.kind is not FeatureKind.NUMERIC]
        # OIP's BOOL and BYTES tensors have no missing value: such rows cannot be sent over gRPC.
        sendable = frame[text_or_flags].notna().all(axis=1) if text_or_flags else pd.Series(True, frame.index)
        skipped = int((~sendable).sum())
        frame = frame[sendable]
        if frame.empty:
            return Answer(skipped=skipped)
        try:
            response = self.stub.ModelInfer(self._request(frame), timeout=TIMEOUT_SECONDS)
        except grpc.RpcError as exc:
            reason = f"{_grpc_code(exc)}: {_grpc_text(exc)}"
            if _grpc_code(exc) == "INVALID_ARGUMENT":
                return Answer(refused=len(frame), skipped=skipped, reason=reason)
            return Answer(failed=len(frame), skipped=skipped, reason=reason)
        # OIP numbers the rows of a request from 0, in the order they were sent.
        keys = tuple(RowKey(index, response.id, row) for row, index in enumerate(frame.index))
        return Answer(accepted=len(frame), skipped=skipped, answered=keys)

    def close(self) -> None:
        self.channel.close()

    def _request(self, frame: pd.DataFrame) -> pb.ModelInferRequest:
        request = pb.ModelInferRequest(model_name=self.model_name)
        rows = len(frame)
        if self.matrix:
            request.inputs.add(name="input", datatype="FP64", shape=[rows, len(self.schema.names)])
            request.raw_input_contents.append(frame[self.schema.names].to_numpy(dtype="<f8").tobytes())
            return request
        for feature in self.schema.features:
            column = frame[feature.name]
            if feature.kind is FeatureKind.NUMERIC:
                datatype, raw = "FP64", column.to_numpy(dtype="<f8").tobytes()
            elif feature.kind is FeatureKind.BOOLEAN:
                datatype, raw = "BOOL", column.astype(bool).to_numpy(dtype=np.uint8).tobytes()
            else:
                encoded = [str(value).encode() for value in column]
                datatype, raw = "BYTES", b"".join(struct.pack("<I", len(b)) + b for b in encoded)
            request.inputs.add(name=feature.name, datatype=datatype, shape=[rows])
            request.raw_input_contents.append(raw)
        return request


def _error_text(response: httpx.Response) -> str:
    """The service's reason: the first problem pydantic found (field and message), or its error line."""
    try:
        body = response.json()
    except ValueError:
        body = None
    if not isinstance(body, dict):
        return response.text[:200]
    detail = body.get("detail")
    if isinstance(detail, list) and detail and isinstance(detail[0], dict):
        fields = [part for part in detail[0].get("loc", []) if isinstance(part, str) and part != "root"]
        where = f"'{fields[-1]}': " if fields else ""
        return f"{where}{detail[0].get('msg', '')}"[:200]
    return (str(body.get("error", "")).splitlines() or [response.text])[0][:200]


def _grpc_code(error: grpc.RpcError) -> str:
    code = error.code() if isinstance(error, grpc.Call) else None
    return code.name if code is not None else "UNKNOWN"


def _grpc_text(error: grpc.RpcError) -> str:
    details = error.details() if isinstance(error, grpc.Call) else None
    return (details or str(error))[:200]


# ---- the run ---------------------------------------------------------------------------------------------


@dataclass
class Tally:
    requests: int = 0
    accepted: int = 0
    refused: int = 0
    failed: int = 0
    skipped: int = 0
    reasons: Counter[str] = field(default_factory=Counter)  # rows per refusal or failure reason
    answered: list[RowKey] = field(default_factory=list)
    seconds: float = 0.0
    interrupted: bool = False

    def add(self, answer: Answer) -> None:
        self.requests += 1
        self.accepted += answer.accepted
        self.refused += answer.refused
        self.failed += answer.failed
        self.skipped += answer.skipped
        self.answered.extend(answer.answered)
        if answer.reason:
            self.reasons[answer.reason] += answer.refused + answer.failed


def run(
    frame: pd.DataFrame, sender: Sender, batch: int, rate: float, progress: Callable[[Tally], None]
) -> Tally:
    """Send `frame` in batches, never faster than `rate` rows per second; Ctrl-C stops early."""
    tally = Tally()
    started = time.monotonic()
    sent = 0
    try:
        for start in range(0, len(frame), batch):
            delay = started + sent / rate - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            chunk = frame.iloc[start : start + batch]
            tally.add(sender.send(chunk))
            sent += len(chunk)
            progress(tally)
    except KeyboardInterrupt:
        tally.interrupted = True
    tally.seconds = time.monotonic() - started
    return tally


# ---- ground truth ----------------------------------------------------------------------------------------


@dataclass
class FeedbackTally:
    requests: int = 0
    sent: int = 0
    kept: int = 0  # the service's `accepted`: in the feedback log
    refused: int = 0  # listed in the service's `rejected`, each with its reason
    failed: int = 0  # in a request that got no per-item answer (network, 5xx, 413, ...)
    reasons: Counter[str] = field(default_factory=Counter)  # labels per refusal or failure reason


def send_feedback(
    url: str, answered: list[RowKey], truth: pd.Series, share: float, seed: int, regression: bool
) -> FeedbackTally:
    """Send the true label (or value) of `share` of the answered rows to POST /feedback, in batches."""
    picks = np.random.default_rng(seed).random(len(answered)) < share
    chosen = [key for key, picked in zip(answered, picks, strict=True) if picked]
    field_name = "value" if regression else "label"
    items = [
        {
            "request_id": key.request_id,
            "row": key.row,
            field_name: float(truth[key.position]) if regression else str(truth[key.position]),
        }
        for key in chosen
    ]
    tally = FeedbackTally()
    with httpx.Client(timeout=TIMEOUT_SECONDS) as client:
        for start in range(0, len(items), FEEDBACK_BATCH):
            batch = items[start : start + FEEDBACK_BATCH]
            tally.requests += 1
            tally.sent += len(batch)
            try:
                response = client.post(
                    f"{url.rstrip('/')}/feedback",
                    content=orjson.dumps(batch),
                    headers={"Content-Type": "application/json"},
                )
            except httpx.HTTPError as exc:
                tally.failed += len(batch)
                tally.reasons[f"{type(exc).__name__}: {first_line(exc)}"] += len(batch)
                continue
            # 200: some kept; 400: none kept, each refused item listed with its reason, unless the request
            # as a whole was refused (e.g. more labels than the service takes at once).
            answer = response.json() if response.status_code in (200, 400) else {}
            if response.status_code == 200 or answer.get("rejected"):
                tally.kept += answer["accepted"]
                tally.refused += len(answer["rejected"])
                tally.reasons.update(refusal["error"] for refusal in answer["rejected"])
            else:
                tally.failed += len(batch)
                tally.reasons[f"HTTP {response.status_code}: {_error_text(response)}"] += len(batch)
    return tally
