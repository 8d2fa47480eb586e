"""One client's bad values never fail another client's request, on every transport of a real `bentoml serve`.

Finite values so large that the model's preprocessing overflows (1e308 in a standardized column) used to
fail the whole coalesced model call: 123 of 800 good requests got 500 beside one such client. Now they are
refused up front with a 4xx naming the field (and the row), and good requests sharing the server all pass.
"""

from __future__ import annotations

import io
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import pandas as pd
import pytest
import tritonclient.grpc as triton_grpc
from tritonclient.utils import InferenceServerException

from models.data import load_default
from models.store import StoredModel
from tests.conftest import Server

GOOD_CLIENTS = 8
REQUESTS_EACH = 25
HUGE = 1e308  # finite in float64; no pipeline of ours turns it into a finite model input
FIELD = "mean smoothness"  # a standard deviation of ~0.014: standardized, 1e308 overflows to infinity


@pytest.fixture(scope="module")
def frame() -> pd.DataFrame:
    return load_default().features.iloc[:40].reset_index(drop=True)


@pytest.fixture(scope="module")
def stored(server: Server) -> StoredModel:
    return StoredModel.open("breast_cancer:latest")


def poisoned(frame: pd.DataFrame, row: int = 0) -> pd.DataFrame:
    bad = frame.copy()
    bad.loc[row, FIELD] = HUGE
    return bad


def records(frame: pd.DataFrame) -> list[dict[str, float]]:
    return [{str(k): float(v) for k, v in row.items()} for _, row in frame.iterrows()]


def beside_a_bad_client(good: Callable[[int], int], bad: Callable[[], int]) -> tuple[list[int], list[int]]:
    """GOOD_CLIENTS clients send REQUESTS_EACH good requests each while one client sends bad ones; the
    status codes of both."""
    with ThreadPoolExecutor(GOOD_CLIENTS + 1) as pool:
        bad_calls = pool.submit(lambda: [bad() for _ in range(REQUESTS_EACH * 2)])
        good_calls = [
            pool.submit(lambda client: [good(client * REQUESTS_EACH + i) for i in range(REQUESTS_EACH)], c)
            for c in range(GOOD_CLIENTS)
        ]
        return [status for call in good_calls for status in call.result()], bad_calls.result()


def test_http_predict_beside_a_client_of_huge_values(server: Server, frame: pd.DataFrame) -> None:
    good_rows, bad_row = records(frame), records(poisoned(frame))[0]
    with httpx.Client(base_url=server.url, timeout=60) as client:
        answer = client.post("/predict", json=bad_row)
        assert answer.status_code == 400, answer.text
        assert FIELD in answer.text
        good, bad = beside_a_bad_client(
            lambda i: client.post("/predict", json=good_rows[i % len(good_rows)]).status_code,
            lambda: client.post("/predict", json=bad_row).status_code,
        )
    assert good == [200] * len(good)
    assert set(bad) == {400}


def test_http_predict_batch_names_the_record_as_the_body_errors_do(
    server: Server, frame: pd.DataFrame
) -> None:
    answer = httpx.post(f"{server.url}/predict_batch", json=records(poisoned(frame, row=6)), timeout=60)
    assert answer.status_code == 400, answer.text
    assert answer.json()["error"].startswith(f"record 6, '{FIELD}': 1e+308 is beyond what the model takes")
    answer = httpx.post(f"{server.url}/predict", json=records(poisoned(frame))[0], timeout=60)
    assert answer.status_code == 400, answer.text
    assert answer.json()["error"].startswith(f"'{FIELD}': 1e+308 is beyond what the model takes")


def oip_body(frame: pd.DataFrame) -> dict[str, object]:
    values = frame.to_numpy(dtype=np.float64)
    return {
        "inputs": [
            {"name": "rows", "shape": list(values.shape), "datatype": "FP64", "data": values.ravel().tolist()}
        ]
    }


def test_oip_rest_beside_a_client_of_huge_values(server: Server, frame: pd.DataFrame) -> None:
    url = "/v2/models/breast_cancer/infer"
    with httpx.Client(base_url=server.url, timeout=60) as client:
        answer = client.post(url, json=oip_body(poisoned(frame, row=3)))
        assert answer.status_code == 400, answer.text
        assert f"'{FIELD}'" in answer.json()["error"]
        assert "row 4" in answer.json()["error"]
        good, bad = beside_a_bad_client(
            lambda i: client.post(url, json=oip_body(frame.iloc[[i % len(frame)]])).status_code,
            lambda: client.post(url, json=oip_body(poisoned(frame).iloc[[0]])).status_code,
        )
    assert good == [200] * len(good)
    assert set(bad) == {400}


def test_grpc_beside_a_client_of_huge_values(server: Server, frame: pd.DataFrame) -> None:
    client = triton_grpc.InferenceServerClient(server.grpc_target)

    def infer(rows: pd.DataFrame) -> str:
        values = rows.to_numpy(dtype=np.float64)
        tensor = triton_grpc.InferInput("rows", list(values.shape), "FP64")
        tensor.set_data_from_numpy(values)
        try:
            client.infer("breast_cancer", [tensor])
        except InferenceServerException as error:
            return f"{error.status()} {error.message()}"
        return "OK"

    good, bad = beside_a_bad_client(
        lambda i: infer(frame.iloc[[i % len(frame)]]), lambda: infer(poisoned(frame).iloc[[0]])
    )
    assert good == ["OK"] * len(good)
    assert len(set(bad)) == 1
    assert bad[0].startswith("StatusCode.INVALID_ARGUMENT")
    assert f"'{FIELD}'" in bad[0]


def test_predict_file_names_the_row(server: Server, frame: pd.DataFrame) -> None:
    body = io.BytesIO()
    poisoned(frame, row=17).to_csv(body, index=False)
    answer = httpx.post(
        f"{server.url}/predict_file",
        content=body.getvalue(),
        headers={"Content-Type": "text/csv"},
        timeout=60,
    )
    assert answer.status_code == 400, answer.text
    assert f"'{FIELD}'" in answer.text
    assert "row 18" in answer.text


def test_the_limit_is_measured_on_the_model_and_values_inside_it_are_answered(
    server: Server, stored: StoredModel, frame: pd.DataFrame
) -> None:
    limit = next(f.limit for f in stored.schema.features if f.name == FIELD)
    assert limit is not None
    assert 1e30 <= limit < HUGE  # far beyond any measurement, far below where float32 overflows
    inside = frame.iloc[[0]].copy()
    inside.loc[0, FIELD] = limit
    answer = httpx.post(f"{server.url}/v2/models/breast_cancer/infer", json=oip_body(inside), timeout=60)
    assert answer.status_code == 200, answer.text
    beyond = frame.iloc[[0]].copy()
    beyond.loc[0, FIELD] = -limit * 10
    answer = httpx.post(f"{server.url}/v2/models/breast_cancer/infer", json=oip_body(beyond), timeout=60)
    assert answer.status_code == 400, answer.text
