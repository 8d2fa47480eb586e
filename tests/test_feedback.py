"""Ground truth on a real `bentoml serve`: every answer names its request and row, on every transport, and
`POST /feedback` takes labels for answered rows, checking each item on its own."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import grpc
import httpx
import numpy as np
import pytest

from models.data import load_default
from serving.oip import grpc_predict_v2_pb2 as pb
from serving.oip import grpc_predict_v2_pb2_grpc as pb_grpc
from tests.conftest import Server, logged_rows
from tests.test_service import metric_values


@pytest.fixture(scope="module")
def records() -> list[dict[str, float]]:
    features = load_default().features
    return [{str(k): float(v) for k, v in features.iloc[i].items()} for i in range(3)]


def jsonl(directory: Path, stem: str) -> list[dict[str, Any]]:
    return [json.loads(line) for path in directory.glob(f"{stem}-*.jsonl*") for line in path.open()]


def wait_for(read: Any, condition: Any, seconds: float = 10) -> Any:
    """The logs are written by background threads."""
    deadline = time.monotonic() + seconds
    value = read()
    while not condition(value) and time.monotonic() < deadline:
        time.sleep(0.1)
        value = read()
    return value


def feedback(server: Server, body: Any) -> httpx.Response:
    return httpx.post(f"{server.url}/feedback", json=body, timeout=30)


def grpc_infer(server: Server, request_id: str, rows: np.ndarray) -> pb.ModelInferResponse:
    request = pb.ModelInferRequest(model_name="breast_cancer", id=request_id)
    tensor = request.inputs.add(name="rows", datatype="FP64", shape=list(rows.shape))
    tensor.contents.fp64_contents.extend(rows.ravel().tolist())
    with grpc.insecure_channel(server.grpc_target) as channel:
        return pb_grpc.GRPCInferenceServiceStub(channel).ModelInfer(request, timeout=30)


def test_every_answer_names_its_request_and_row(server: Server, records: list[dict[str, float]]) -> None:
    one = httpx.post(f"{server.url}/predict", json=records[0], headers={"X-Request-Id": "order-17"})
    assert one.status_code == 200, one.text
    assert (one.json()["request_id"], one.json()["row"]) == ("order-17", 0)
    assert one.headers["x-request-id"] == "order-17"

    made = httpx.post(f"{server.url}/predict_batch", json=records).json()
    assert [answer["row"] for answer in made] == [0, 1, 2]
    assert len({answer["request_id"] for answer in made}) == 1  # one id, made by the server
    assert len(made[0]["request_id"]) == 32

    rest = httpx.post(
        f"{server.url}/v2/models/breast_cancer/infer",
        json={
            "id": "rest-1",
            "inputs": [
                {"name": "r", "shape": [1, 30], "datatype": "FP64", "data": list(records[0].values())}
            ],
        },
    )
    assert rest.json()["id"] == "rest-1"
    assert grpc_infer(server, "grpc-1", np.array([list(records[0].values())])).id == "grpc-1"

    logged = wait_for(
        lambda: logged_rows(server.log_dir),
        lambda lines: sum(line["request_id"] == made[0]["request_id"] for line in lines) == 3,
    )
    rows = sorted(line["row"] for line in logged if line["request_id"] == made[0]["request_id"])
    assert rows == [0, 1, 2]
    assert list(logged[0])[:3] == ["ts", "request_id", "row"]


@pytest.mark.parametrize("request_id", ["a b", "x" * 129, "é"])
def test_a_request_id_that_cannot_be_logged_plainly_is_refused(
    server: Server, records: list[dict[str, float]], request_id: str
) -> None:
    answer = httpx.post(
        f"{server.url}/predict",
        json=records[0],
        headers={"X-Request-Id": request_id.encode()},
    )
    assert answer.status_code == 400, answer.text
    assert "request id" in answer.json()["error"]
    with pytest.raises(grpc.RpcError) as caught:
        grpc_infer(server, request_id, np.array([list(records[0].values())]))
    assert caught.value.code() is grpc.StatusCode.INVALID_ARGUMENT


def test_feedback_keeps_the_valid_items_and_names_each_bad_one(
    server: Server, records: list[dict[str, float]]
) -> None:
    batch = httpx.post(f"{server.url}/predict_batch", json=records[:2]).json()
    by_grpc = grpc_infer(server, "fb-grpc", np.array([list(records[2].values())]))
    request_id = batch[0]["request_id"]
    counted = sum(metric_values(server, "tabserve_feedback_total").values())
    items = [
        {"request_id": request_id, "row": 1, "label": "benign"},
        {"request_id": by_grpc.id, "label": "malignant"},  # answered over gRPC, maybe by the other worker
        {"request_id": request_id, "row": 2, "label": "benign"},
        {"request_id": "never-seen", "label": "benign"},
        {"request_id": request_id, "label": "tumour"},
        {"request_id": request_id, "value": 1.5},
        {"request_id": request_id, "label": "benign", "note": "extra"},
        {"request_id": request_id, "label": 1.5},
        "not an object",
    ]
    answer = feedback(server, items)
    assert answer.status_code == 200, answer.text
    body = answer.json()
    assert body["accepted"] == 2
    errors = {refusal["item"]: refusal["error"] for refusal in body["rejected"]}
    assert sorted(errors) == [2, 3, 4, 5, 6, 7, 8]
    assert "answered with 2 row(s); row 2" in errors[2]
    assert "'never-seen' was never answered" in errors[3]
    assert "unknown class 'tumour'; classes: benign, malignant" in errors[4]
    assert "send 'label'" in errors[5]
    assert "'note'" in errors[6]
    assert "'label'" in errors[7]
    assert sum(metric_values(server, "tabserve_feedback_total").values()) == counted + len(items)

    kept = wait_for(
        lambda: jsonl(server.feedback_dir, "feedback"),
        lambda lines: sum(line["request_id"] in (request_id, "fb-grpc") for line in lines) >= 2,
    )
    mine = [line for line in kept if line["request_id"] in (request_id, "fb-grpc")]
    assert {(line["request_id"], line["row"], line["label"]) for line in mine} == {
        ("fb-grpc", 0, "malignant"),
        (request_id, 1, "benign"),
    }
    assert len(mine) == 2


def test_a_repeated_label_is_written_again_to_replace_the_earlier(
    server: Server, records: list[dict[str, float]]
) -> None:
    httpx.post(f"{server.url}/predict", json=records[0], headers={"X-Request-Id": "relabelled"})
    for label in ("benign", "malignant"):
        assert feedback(server, {"request_id": "relabelled", "label": label}).status_code == 200
    lines = wait_for(
        lambda: [
            line for line in jsonl(server.feedback_dir, "feedback") if line["request_id"] == "relabelled"
        ],
        lambda lines: len(lines) == 2,
    )
    assert [line["label"] for line in sorted(lines, key=lambda line: line["ts"])] == ["benign", "malignant"]


@pytest.mark.parametrize(
    ("content", "content_type", "status", "named"),
    [
        (b"[", "application/json", 400, "not valid JSON"),
        (b"[]", "application/json", 400, "send 1 to"),
        (b'{"request_id": "never-seen", "label": "benign"}', "application/json", 400, "no label was kept"),
        (b'{"request_id": "x", "label": "benign"}', "text/plain", 415, "JSON"),
    ],
)
def test_a_body_with_nothing_to_keep_is_a_4xx_and_the_server_goes_on(
    server: Server, content: bytes, content_type: str, status: int, named: str
) -> None:
    answer = httpx.post(f"{server.url}/feedback", content=content, headers={"Content-Type": content_type})
    assert answer.status_code == status, answer.text
    assert named in answer.json()["error"]
    assert answer.json()["accepted"] == 0
    assert httpx.get(f"{server.url}/readyz").status_code == 200
