"""The rows every load test sends, and the request bodies of each protocol built from them.

Rows are the default model's held-out test split: rows the model never trained on, split exactly as
`python train.py` splits them. Every system under test gets the same rows in the same order.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import orjson
import pandas as pd

from models.data import Task, load_default, split
from serving.oip import grpc_predict_v2_pb2 as pb

# train.py's defaults (models.training.TrainingOptions); tests/test_loadtests.py checks that they agree.
SEED = 42
TEST_SIZE = 0.2
DEFAULT_MODEL = "breast_cancer"
# Name of the one [rows, features] tensor of OIP requests: any name is accepted by a single-tensor request.
TENSOR_NAME = "input-0"
MODEL_INFER_PATH = "/inference.GRPCInferenceService/ModelInfer"


def held_out() -> pd.DataFrame:
    """The default model's held-out rows, in split order."""
    parts = split(load_default(), Task.CLASSIFICATION, test_size=TEST_SIZE, seed=SEED)
    return parts.X_test.reset_index(drop=True)


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
    """Rows as one [rows, features] little-endian FP64 tensor (all-numeric models only)."""
    return frame.to_numpy(dtype="<f8")


# ---- request bodies -----------------------------------------------------------------------------------


def predict_body(record: dict[str, Any]) -> bytes:
    return orjson.dumps(record)


def predict_batch_body(batch: list[dict[str, Any]]) -> bytes:
    return orjson.dumps(batch)


def oip_rest_body(values: np.ndarray) -> bytes:
    """An OIP REST request with one JSON [rows, features] FP64 tensor."""
    tensor = {"name": TENSOR_NAME, "shape": list(values.shape), "datatype": "FP64", "data": values.ravel()}
    return orjson.dumps({"inputs": [tensor]}, option=orjson.OPT_SERIALIZE_NUMPY)


def model_infer_request(model: str, values: np.ndarray, raw: bool = True) -> pb.ModelInferRequest:
    """An OIP gRPC request with one [rows, features] FP64 tensor, in raw_input_contents (as tritonclient
    sends it) or in typed fp64_contents."""
    request = pb.ModelInferRequest(model_name=model)
    tensor = request.inputs.add(name=TENSOR_NAME, datatype="FP64", shape=list(values.shape))
    if raw:
        request.raw_input_contents.append(np.ascontiguousarray(values, dtype="<f8").tobytes())
    else:
        tensor.contents.fp64_contents.extend(values.ravel().tolist())
    return request


def grpc_frame(message: bytes) -> bytes:
    """A gRPC length-prefixed message: flag byte 0 (uncompressed), 4-byte big-endian length, message."""
    return b"\x00" + len(message).to_bytes(4, "big") + message
