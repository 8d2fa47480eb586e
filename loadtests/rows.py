"""The rows every load test sends, and the request bodies of each protocol built from them.

Rows are a model's held-out test split: rows the model never trained on, split exactly as `python train.py`
splits them (by default the default model's). Every system under test gets the same rows in the same order.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import orjson
import pandas as pd

from models.data import Table, Task, load_default, split
from models.schema import FeatureKind, FeatureSchema
from serving.oip import grpc_predict_v2_pb2 as pb

# train.py's defaults (models.training.TrainingOptions); tests/test_loadtests.py checks that they agree.
SEED = 42
TEST_SIZE = 0.2
DEFAULT_MODEL = "breast_cancer"
# Name of the one [rows, features] tensor of OIP requests: any name is accepted by a single-tensor request.
TENSOR_NAME = "input-0"
MODEL_INFER_PATH = "/inference.GRPCInferenceService/ModelInfer"
# OIP `parameters.content_type`, MLServer's decoding hints (what its own PandasCodec sends): the request's
# tensors are the columns of one DataFrame, and a BYTES tensor holds text (else its cells stay bytes).
DATAFRAME_CONTENT_TYPE = "pd"
TEXT_CONTENT_TYPE = "str"


@dataclass(frozen=True)
class Tensor:
    """One OIP input tensor."""

    name: str
    datatype: str  # FP64, BOOL or BYTES
    shape: list[int]
    values: np.ndarray | list[str]  # flat, row-major
    content_type: str | None = None


def held_out(table: Table | None = None) -> pd.DataFrame:
    """A table's held-out rows (the default model's if none is given), in split order."""
    parts = split(table or load_default(), Task.CLASSIFICATION, test_size=TEST_SIZE, seed=SEED)
    return parts.X_test.reset_index(drop=True)


def carried_by_every_transport(frame: pd.DataFrame, schema: FeatureSchema) -> pd.DataFrame:
    """The rows whose booleans and categories are all present: an OIP BOOL or BYTES tensor has no missing
    value (only JSON's null has, on REST), so such a row cannot be sent over gRPC. Missing numbers (NaN)
    stay: FP64 carries them."""
    columns = schema.names_of(FeatureKind.BOOLEAN) + schema.names_of(FeatureKind.CATEGORICAL)
    return frame[frame[columns].notna().all(axis=1)].reset_index(drop=True)


def tiled(frame: pd.DataFrame, rows: int) -> pd.DataFrame:
    """`rows` rows: the frame repeated as often as needed (for batches larger than the held-out split)."""
    repeats = -(-rows // len(frame))
    return pd.concat([frame] * repeats, ignore_index=True).head(rows)


def records(frame: pd.DataFrame) -> list[dict[str, Any]]:
    """Rows as the typed HTTP API takes them: one JSON object per row, keyed by the training column names."""
    return [
        {str(name): value for name, value in row.items()}
        for row in frame.astype(object).where(frame.notna(), None).to_dict(orient="records")
    ]


def matrix(frame: pd.DataFrame) -> np.ndarray:
    """Rows as one [rows, features] little-endian FP64 array (all-numeric models only)."""
    return frame.to_numpy(dtype="<f8")


def matrix_tensor(values: np.ndarray) -> Tensor:
    """One [rows, features] FP64 tensor: the whole request of an all-numeric model."""
    return Tensor(TENSOR_NAME, "FP64", list(values.shape), np.ascontiguousarray(values, dtype="<f8").ravel())


def column_tensors(prepared: pd.DataFrame, datatypes: Mapping[str, str], hint_text: bool) -> list[Tensor]:
    """One [rows, 1] tensor per feature, named as the feature, from rows as `FeatureSchema.prepare` leaves
    them (booleans as 0/1). `datatypes`: each feature's FP64, BOOL or BYTES; `hint_text`: BYTES tensors say
    that they hold text (MLServer's hint)."""
    tensors = []
    for name, datatype in datatypes.items():
        column = prepared[name]
        values: np.ndarray | list[str]
        if datatype == "BYTES":
            values = [str(value) for value in column]
        elif datatype == "BOOL":
            values = column.to_numpy(dtype=np.float64) != 0
        else:
            values = column.to_numpy(dtype="<f8")
        content_type = TEXT_CONTENT_TYPE if hint_text and datatype == "BYTES" else None
        tensors.append(Tensor(name, datatype, [len(column), 1], values, content_type))
    return tensors


# ---- request bodies -----------------------------------------------------------------------------------


def predict_body(record: dict[str, Any]) -> bytes:
    return orjson.dumps(record)


def predict_batch_body(batch: list[dict[str, Any]]) -> bytes:
    return orjson.dumps(batch)


def oip_rest_body(tensors: Sequence[Tensor], content_type: str | None = None) -> bytes:
    """An OIP REST request with these tensors in JSON (a missing number is null)."""
    inputs = []
    for tensor in tensors:
        entry: dict[str, Any] = {
            "name": tensor.name,
            "shape": tensor.shape,
            "datatype": tensor.datatype,
            "data": tensor.values,
        }
        if tensor.content_type:
            entry["parameters"] = {"content_type": tensor.content_type}
        inputs.append(entry)
    request: dict[str, Any] = {"inputs": inputs}
    if content_type:
        request["parameters"] = {"content_type": content_type}
    return orjson.dumps(request, option=orjson.OPT_SERIALIZE_NUMPY)


def model_infer_request(
    model: str, tensors: Sequence[Tensor], raw: bool = True, content_type: str | None = None
) -> pb.ModelInferRequest:
    """An OIP gRPC request with these tensors, in raw_input_contents (as tritonclient sends them) or in typed
    contents."""
    request = pb.ModelInferRequest(model_name=model)
    if content_type:
        request.parameters["content_type"].string_param = content_type
    for tensor in tensors:
        entry = request.inputs.add(name=tensor.name, datatype=tensor.datatype, shape=tensor.shape)
        if tensor.content_type:
            entry.parameters["content_type"].string_param = tensor.content_type
        if raw:
            request.raw_input_contents.append(_raw_contents(tensor))
        elif tensor.datatype == "BYTES":
            entry.contents.bytes_contents.extend(value.encode() for value in tensor.values)
        elif tensor.datatype == "BOOL":
            entry.contents.bool_contents.extend(np.asarray(tensor.values).tolist())
        else:
            entry.contents.fp64_contents.extend(np.asarray(tensor.values).tolist())
    return request


def _raw_contents(tensor: Tensor) -> bytes:
    """Little-endian elements; BOOL one byte each; each BYTES element a 4-byte little-endian length, then
    its bytes."""
    if tensor.datatype == "BYTES":
        encoded = [str(value).encode() for value in tensor.values]
        return b"".join(len(value).to_bytes(4, "little") + value for value in encoded)
    if tensor.datatype == "BOOL":
        return np.asarray(tensor.values, dtype=np.bool_).tobytes()
    return np.ascontiguousarray(tensor.values, dtype="<f8").tobytes()


def grpc_frame(message: bytes) -> bytes:
    """A gRPC length-prefixed message: flag byte 0 (uncompressed), 4-byte big-endian length, message."""
    return b"\x00" + len(message).to_bytes(4, "big") + message
