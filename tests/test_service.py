"""A real `bentoml serve` process on a free port, called over HTTP."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from models.data import load_default
from models.store import StoredModel
from tests.conftest import PROJECT_ROOT, Stores

BENTOML = str(Path(sys.executable).parent / "bentoml")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def start_server(env: dict[str, str], port: int) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [BENTOML, "serve", "service:TabularModel", "--host", "127.0.0.1", "--port", str(port)],
        cwd=PROJECT_ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


@pytest.fixture(scope="module")
def server(stores: Stores, default_model: subprocess.CompletedProcess[str]) -> Iterator[str]:
    port = free_port()
    process = start_server(stores.env(), port)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            assert process.poll() is None, (
                f"bentoml serve exited:\n{process.stdout.read() if process.stdout else ''}"
            )
            try:
                if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            time.sleep(0.5)
        else:
            pytest.fail("bentoml serve did not become ready in 120 s")
        yield url
    finally:
        process.terminate()
        process.wait(timeout=60)


@pytest.fixture(scope="module")
def record() -> dict[str, float]:
    return {str(k): float(v) for k, v in load_default().features.iloc[7].items()}


def test_predict_returns_the_in_process_prediction_and_lineage(server: str, record: dict[str, float]) -> None:
    response = httpx.post(f"{server}/predict", json=record, timeout=30)
    assert response.status_code == 200, response.text
    body = response.json()
    stored = StoredModel.open("breast_cancer:latest")
    expected = stored.predict(load_default().features.iloc[[7]])
    assert expected.probabilities is not None
    assert body["prediction"] == expected.labels[0]
    assert body["probabilities"] == {
        "benign": pytest.approx(expected.probabilities[0, 0], abs=1e-12),
        "malignant": pytest.approx(expected.probabilities[0, 1], abs=1e-12),
    }
    assert body["model"] == "breast_cancer"
    assert body["version"] == stored.version
    assert body["registered_version"] == stored.labels["registered_version"]
    assert body["mlflow_run_id"] == stored.labels["mlflow_run_id"]
    assert body["data_digest"] == stored.metadata["dataset_digest"]


def with_change(record: dict[str, float], **change: object) -> str:
    body: dict[str, object] = dict(record)
    body.update({key.replace("_", " "): value for key, value in change.items()})
    return json.dumps(body)


@pytest.mark.parametrize(
    ("case", "make_body", "field", "problem"),
    [
        ("wrong type", lambda r: with_change(r, mean_radius="big"), "mean radius", "valid number"),
        ("NaN", lambda r: with_change(r, mean_radius=float("nan")), "mean radius", "finite number"),
        ("Infinity", lambda r: with_change(r, mean_radius=float("inf")), "mean radius", "finite number"),
        ("unknown field", lambda r: with_change(r, colour="red"), "colour", "Extra inputs are not permitted"),
        (
            "missing field",
            lambda r: json.dumps({k: v for k, v in r.items() if k != "worst area"}),
            "worst area",
            "Field required",
        ),
    ],
)
def test_invalid_records_get_400_naming_the_field(
    server: str, record: dict[str, float], case: str, make_body: object, field: str, problem: str
) -> None:
    body = make_body(record)  # type: ignore[operator]
    response = httpx.post(
        f"{server}/predict", content=body, headers={"content-type": "application/json"}, timeout=30
    )
    assert response.status_code == 400, case
    [error] = response.json()["detail"]
    assert error["loc"] == [field]
    assert problem in error["msg"]


def test_malformed_json_gets_400_and_the_server_keeps_serving(server: str, record: dict[str, float]) -> None:
    response = httpx.post(
        f"{server}/predict", content=b"{not json", headers={"content-type": "application/json"}
    )
    assert response.status_code == 400
    assert "Invalid JSON" in response.text
    assert httpx.post(f"{server}/predict", json=record, timeout=30).status_code == 200


def test_openapi_documents_the_record_by_column_name(server: str) -> None:
    spec = httpx.get(f"{server}/docs.json", timeout=30).json()
    text = json.dumps(spec)
    assert '"mean radius"' in text
    assert "training range" in text


def test_serve_without_a_model_says_to_train(stores: Stores) -> None:
    process = start_server(stores.env(TABSERVE_MODEL_NAME="never-trained"), free_port())
    output, _ = process.communicate(timeout=120)
    assert process.returncode != 0
    assert "no model 'never-trained:latest' in the BentoML store" in output
    assert "python train.py" in output
