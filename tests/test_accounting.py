"""The prediction log and the prediction counter of a real `bentoml serve` hold exactly the answered
predictions: a refused request is neither logged (it would pollute the drift data) nor counted."""

from __future__ import annotations

import time

import grpc
import httpx
import numpy as np
import pytest

from models.data import load_default
from serving.oip import grpc_predict_v2_pb2 as pb
from serving.oip import grpc_predict_v2_pb2_grpc as pb_grpc
from tests.conftest import Server, logged_rows
from tests.test_service import metric_values

REFUSED = 20


@pytest.fixture(scope="module")
def row() -> list[float]:
    return load_default().features.iloc[0].to_numpy(dtype=np.float64).tolist()


def logged_request_ids(server: Server) -> set[str]:
    return {row["request_id"] for row in logged_rows(server.log_dir)}


def predictions_counted(server: Server) -> float:
    return sum(metric_values(server, "tabserve_predictions_total").values())


def rest_infer(server: Server, request_id: str, row: list[float], outputs: list[str] | None) -> int:
    body: dict[str, object] = {
        "id": request_id,
        "inputs": [{"name": "rows", "shape": [1, len(row)], "datatype": "FP64", "data": row}],
    }
    if outputs is not None:
        body["outputs"] = [{"name": name} for name in outputs]
    return httpx.post(f"{server.url}/v2/models/breast_cancer/infer", json=body, timeout=60).status_code


def grpc_infer(stub: pb_grpc.GRPCInferenceServiceStub, request_id: str, row: list[float], output: str) -> str:
    request = pb.ModelInferRequest(model_name="breast_cancer", id=request_id)
    tensor = request.inputs.add(name="rows", datatype="FP64", shape=[1, len(row)])
    tensor.contents.fp64_contents.extend(row)
    request.outputs.add(name=output)
    try:
        stub.ModelInfer(request, timeout=30)
    except grpc.RpcError as error:
        return str(error.code())
    return "OK"


def test_requests_refused_for_an_unknown_output_are_neither_logged_nor_counted(
    server: Server, row: list[float]
) -> None:
    counted_before = predictions_counted(server)
    with grpc.insecure_channel(server.grpc_target) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        grpc_codes = {grpc_infer(stub, f"refused-grpc-{i}", row, "nope") for i in range(REFUSED)}
        assert grpc_infer(stub, "answered-grpc", row, "label") == "OK"
    rest_codes = {rest_infer(server, f"refused-rest-{i}", row, ["nope"]) for i in range(REFUSED)}
    assert rest_infer(server, "answered-rest", row, None) == 200
    assert grpc_codes == {"StatusCode.INVALID_ARGUMENT"}
    assert rest_codes == {400}

    deadline = time.monotonic() + 10  # the log is written by a background thread
    while (
        not {"answered-grpc", "answered-rest"} <= logged_request_ids(server) and time.monotonic() < deadline
    ):
        time.sleep(0.1)
    logged = logged_request_ids(server)
    assert {"answered-grpc", "answered-rest"} <= logged
    assert not {request_id for request_id in logged if request_id.startswith("refused-")}
    assert predictions_counted(server) == counted_before + 2
