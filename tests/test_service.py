"""The HTTP API of a real `bentoml serve` process: predictions, limits, bad input, logs and metrics."""

from __future__ import annotations

import contextlib
import json
import re
import socket
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict
from datetime import datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import httpx
import numpy as np
import pytest

from models.data import load_default
from models.store import StoredModel
from tests.conftest import (
    LATEST_DRIFT,
    LATEST_PERFORMANCE,
    MAX_BATCH_RECORDS,
    MAX_BODY_BYTES,
    Server,
    Stores,
    free_port,
    logged_rows,
    start_server,
    wait_ready,
)


@pytest.fixture(scope="module")
def records() -> list[dict[str, float]]:
    features = load_default().features
    return [{str(k): float(v) for k, v in features.iloc[i].items()} for i in range(40)]


@pytest.fixture(scope="module")
def stored(server: Server) -> StoredModel:
    return StoredModel.open("breast_cancer:latest")


def post(server: Server, path: str, body: Any) -> httpx.Response:
    return httpx.post(f"{server.url}{path}", json=body, timeout=60)


def metric_values(server: Server, name: str) -> dict[str, float]:
    """Samples of one metric from /metrics, keyed by their label text."""
    text = httpx.get(f"{server.url}/metrics", timeout=30).text
    pattern = re.compile(rf"^{re.escape(name)}(\{{[^}}]*\}})? ([0-9.e+-]+)$", re.MULTILINE)
    return {labels or "": float(value) for labels, value in pattern.findall(text)}


def test_predict_matches_the_in_process_model_and_names_its_lineage(
    server: Server, stored: StoredModel, records: list[dict[str, float]]
) -> None:
    response = post(server, "/predict", records[7])
    assert response.status_code == 200, response.text
    body = response.json()
    expected = stored.predict(load_default().features.iloc[[7]])
    assert expected.probabilities is not None
    assert body["prediction"] == expected.labels[0]
    assert body["probabilities"]["malignant"] == pytest.approx(expected.probabilities[0, 1], abs=1e-12)
    assert body["unknown_categories"] == {}
    assert body["model"] == "breast_cancer"
    assert body["version"] == stored.version
    assert body["registered_version"] == stored.labels["registered_version"]
    assert body["mlflow_run_id"] == stored.labels["mlflow_run_id"]
    assert body["data_digest"] == stored.metadata["dataset_digest"]


def test_predict_batch_answers_every_row_in_order(
    server: Server, stored: StoredModel, records: list[dict[str, float]]
) -> None:
    response = post(server, "/predict_batch", records)
    assert response.status_code == 200, response.text
    answers = response.json()
    expected = stored.predict(load_default().features.iloc[:40])
    assert [a["prediction"] for a in answers] == expected.labels.tolist()
    assert expected.probabilities is not None
    got = np.array([a["probabilities"]["malignant"] for a in answers])
    assert np.allclose(got, expected.probabilities[:, 1], rtol=0, atol=1e-12)


def test_model_endpoint_describes_the_served_model(server: Server, stored: StoredModel) -> None:
    info = httpx.get(f"{server.url}/model", timeout=30).json()
    assert info["model"] == "breast_cancer"
    assert info["version"] == stored.version
    assert info["alias"] == "champion"
    assert info["mlflow_run_id"] == stored.labels["mlflow_run_id"]
    assert info["classes"] == ["benign", "malignant"]
    assert info["test_metrics"]["roc_auc"] > 0.95
    assert [f["name"] for f in info["feature_schema"]["features"]] == stored.schema.names
    # The compiled scorer serves: training proved it equal to scikit-learn (models/compiled.py).
    assert info["scorer"] == stored.metadata["scorer"]
    assert info["scorer"]["scorer"] == "compiled"
    assert info["scorer"]["reason"] == "equal to scikit-learn within 1e-06"
    assert info["onnx"] == stored.metadata["onnx"]
    assert info["onnx"]["onnx"] == "exported"
    metadata = httpx.get(f"{server.url}/v2/models/breast_cancer", timeout=30).json()
    assert (metadata["platform"], metadata["parameters"]["scorer"]) == ("tabserve_compiled", "compiled")
    # The latest drift and performance verdicts the server fixture left in its reports folder.
    assert info["monitoring"] == {"drift": asdict(LATEST_DRIFT), "performance": asdict(LATEST_PERFORMANCE)}


def with_change(record: dict[str, float], **change: object) -> str:
    body: dict[str, object] = dict(record)
    body.update({key.replace("_", " "): value for key, value in change.items()})
    return json.dumps(body)


BAD_RECORDS = {
    "wrong type": (lambda r: with_change(r, mean_radius="big"), ["mean radius"], "valid number"),
    "NaN": (lambda r: with_change(r, mean_radius=float("nan")), ["mean radius"], "finite number"),
    "Infinity": (lambda r: with_change(r, mean_radius=float("inf")), ["mean radius"], "finite number"),
    "unknown field": (lambda r: with_change(r, colour="red"), ["colour"], "Extra inputs are not permitted"),
    "missing field": (
        lambda r: json.dumps({k: v for k, v in r.items() if k != "worst area"}),
        ["worst area"],
        "Field required",
    ),
}


def test_with_the_compiled_scorer_off_scikit_learn_serves_the_same_answers(
    stores: Stores, server: Server, records: list[dict[str, float]], tmp_path: Path
) -> None:
    """The fallback serves for real: what a model that cannot be proven equal gets, and what
    TABSERVE_COMPILED_SCORER=false chooses."""
    home = stores.server_home(tmp_path / "bentoml-home")
    env = stores.env(
        BENTOML_HOME=str(home),
        TABSERVE_COMPILED_SCORER="false",
        TABSERVE_GRPC_PORT="0",
        TABSERVE_PREDICTION_LOG_DIR=str(tmp_path / "log"),
        TABSERVE_FEEDBACK_LOG_DIR=str(tmp_path / "feedback"),
    )
    port, output = free_port(), tmp_path / "out.txt"
    process = start_server(env, port, output)
    plain = Server(f"http://127.0.0.1:{port}", "", tmp_path / "log", tmp_path / "feedback", process, output)
    try:
        wait_ready(process, plain.url, output)
        scorer = httpx.get(f"{plain.url}/model", timeout=30).json()["scorer"]
        assert (scorer["scorer"], scorer["reason"]) == (
            "scikit-learn",
            "turned off (TABSERVE_COMPILED_SCORER=false)",
        )
        assert scorer["at_training"]["scorer"] == "compiled"  # what training proved, kept beside
        by_scikit_learn = post(plain, "/predict_batch", records).json()
        compiled = post(server, "/predict_batch", records).json()
    finally:
        process.terminate()
        process.wait(timeout=60)
    assert [a["prediction"] for a in by_scikit_learn] == [a["prediction"] for a in compiled]
    for one, other in zip(by_scikit_learn, compiled, strict=True):
        for label, probability in one["probabilities"].items():
            assert probability == pytest.approx(other["probabilities"][label], abs=1e-9)


@pytest.mark.parametrize("case", BAD_RECORDS)
def test_invalid_records_get_400_naming_the_field(
    server: Server, records: list[dict[str, float]], case: str
) -> None:
    make_body, loc, problem = BAD_RECORDS[case]
    response = httpx.post(
        f"{server.url}/predict", content=make_body(records[0]), headers={"content-type": "application/json"}
    )
    assert response.status_code == 400, case
    body = response.json()
    [error] = body["detail"]
    assert error["loc"] == loc
    assert problem in error["msg"]
    assert body["error"] == f"invalid request body: '{loc[0]}': {error['msg']}"


def test_the_400_names_every_wrong_field_without_internal_names(server: Server) -> None:
    response = httpx.post(f"{server.url}/predict", json={"mean radius": "big"}, timeout=60)
    assert response.status_code == 400
    body = response.json()
    assert body["error"].startswith(
        "invalid request body: 'mean radius': Input should be a valid number; 'mean texture': Field required;"
    )
    assert body["error"].endswith("; and 25 more")  # 30 problems: 5 named, all 30 listed
    assert len(body["detail"]) == 30
    assert "IODescriptor" not in response.text
    assert "validation error for" not in response.text
    assert "errors.pydantic.dev" not in response.text


def test_batch_errors_name_the_row_and_the_field(server: Server, records: list[dict[str, float]]) -> None:
    bad = [records[0], {**records[1], "mean area": "large"}]
    response = post(server, "/predict_batch", bad)
    assert response.status_code == 400
    body = response.json()
    [error] = body["detail"]
    assert error["loc"] == [1, "mean area"]  # the record's index in the list, then the field
    assert body["error"] == "invalid request body: record 1, 'mean area': Input should be a valid number"


# Bodies that BentoML's own parsing of a list (json.loads) answered with 500.
MALFORMED_BODIES = {
    "truncated": (b"[", "EOF while parsing"),
    "NUL byte": (b"\x00", "expected value"),
    "not UTF-8": (b'[{"\xff":1}]', "invalid unicode"),
    "5,000-digit integer": (b"1" * 5000, "number out of range"),
    "3,000 nested arrays": (b"[" * 3000 + b"]" * 3000, "recursion limit exceeded"),
}


@pytest.mark.parametrize("endpoint", ["/predict", "/predict_batch"])
@pytest.mark.parametrize("case", MALFORMED_BODIES)
def test_malformed_json_is_400_on_both_json_endpoints(server: Server, endpoint: str, case: str) -> None:
    body, problem = MALFORMED_BODIES[case]
    response = httpx.post(
        f"{server.url}{endpoint}", content=body, headers={"content-type": "application/json"}, timeout=60
    )
    assert response.status_code == 400, response.text
    assert response.json()["error"].startswith("invalid request body: Invalid JSON: ")
    assert problem in response.json()["error"]


@pytest.mark.parametrize(
    ("body", "status", "message"),
    [
        ([], 400, "at least 1 item"),
        ("too many", 400, f"at most {MAX_BATCH_RECORDS} items"),
        ({"not": "a list"}, 400, "Input should be a valid array"),
    ],
)
def test_batch_size_limits(
    server: Server, records: list[dict[str, float]], body: object, status: int, message: str
) -> None:
    if body == "too many":
        body = (records * 2)[: MAX_BATCH_RECORDS + 1]
    response = post(server, "/predict_batch", body)
    assert response.status_code == status
    assert message in response.text


def test_malformed_json_wrong_content_type_and_oversized_body(
    server: Server, records: list[dict[str, float]]
) -> None:
    malformed = httpx.post(
        f"{server.url}/predict", content=b"{not json", headers={"content-type": "application/json"}
    )
    assert malformed.status_code == 400
    assert "Invalid JSON" in malformed.text
    plain = httpx.post(
        f"{server.url}/predict", content=json.dumps(records[0]), headers={"content-type": "text/plain"}
    )
    assert plain.status_code == 415
    assert plain.json() == {"error": "Content-Type must be application/json, got text/plain"}
    huge = httpx.post(
        f"{server.url}/predict_batch",
        content=b"[" + b" " * MAX_BODY_BYTES + b"]",
        headers={"content-type": "application/json"},
    )
    assert huge.status_code == 413
    assert "over the limit" in huge.json()["error"]
    assert post(server, "/predict", records[0]).status_code == 200  # still serving


def over_the_limit_in_chunks() -> Iterator[bytes]:
    """A body with no Content-Length (chunked), past the body limit: only the bytes received can tell."""
    piece = b" " * 65_536
    for _ in range(MAX_BODY_BYTES // len(piece) + 2):
        yield piece


@pytest.mark.parametrize("endpoint", ["/predict", "/predict_batch"])
def test_a_chunked_body_over_the_limit_gets_413(
    server: Server, records: list[dict[str, float]], endpoint: str
) -> None:
    response = httpx.post(
        f"{server.url}{endpoint}",
        content=over_the_limit_in_chunks(),
        headers={"content-type": "application/json"},
        timeout=60,
    )
    assert response.status_code == 413
    assert response.json() == {"error": f"request body is over the limit of {MAX_BODY_BYTES} bytes"}
    assert post(server, "/predict", records[0]).status_code == 200  # still serving


def send_head(server: Server, header_bytes: int) -> bytes:
    """A request whose one header has `header_bytes` bytes, on a raw socket; the start of the answer."""
    address = urlparse(server.url)
    with socket.create_connection((address.hostname, address.port), timeout=30) as sock:
        with contextlib.suppress(OSError):  # the server may close before it has read everything
            sock.sendall(b"GET /livez HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * header_bytes + b"\r\n\r\n")
        return sock.recv(4096)


def test_a_huge_header_gets_431_at_once(server: Server) -> None:
    started = time.monotonic()
    for size in [80_000, 4_000_000]:  # one that arrives whole, one refused as it arrives
        answer = send_head(server, size)
        assert answer.startswith(b"HTTP/1.1 431 "), (size, answer[:100])
        assert b"request line and headers are over the limit of 65536 bytes" in answer
    assert time.monotonic() - started < 10
    assert send_head(server, 30_000).startswith(b"HTTP/1.1 200 ")  # large headers within the limit pass


def test_a_refused_request_writes_no_traceback(server: Server, records: list[dict[str, float]]) -> None:
    before = server.output_text().count("Traceback")
    for endpoint, body in [
        ("/predict", b"{"),
        ("/predict", json.dumps({"mean radius": "big"}).encode()),
        ("/predict_batch", b"["),
        ("/predict_batch", json.dumps([{**records[0], "colour": "red"}]).encode()),
    ]:
        response = httpx.post(
            f"{server.url}{endpoint}", content=body, headers={"content-type": "application/json"}, timeout=60
        )
        assert response.status_code == 400
    assert post(server, "/predict", records[0]).status_code == 200
    time.sleep(1)  # the workers' log lines reach the output file
    assert server.output_text().count("Traceback") == before


def test_32_concurrent_clients_all_succeed_and_are_batched(
    server: Server, records: list[dict[str, float]]
) -> None:
    before = metric_values(server, "tabserve_batch_rows_count")

    def client(index: int) -> list[int]:
        with httpx.Client(base_url=server.url, timeout=60) as http:
            return [http.post("/predict", json=records[(index + i) % 40]).status_code for i in range(10)]

    with ThreadPoolExecutor(max_workers=32) as pool:
        statuses = [status for result in pool.map(client, range(32)) for status in result]
    assert statuses == [200] * 320
    after = metric_values(server, "tabserve_batch_rows_count")
    calls = sum(after.values()) - sum(before.values())
    assert 0 < calls < 320, "320 concurrent rows should take fewer model calls than rows"


def test_metrics_name_the_model_version_transport_and_refusals(
    server: Server, stored: StoredModel, records: list[dict[str, float]]
) -> None:
    predicted = post(server, "/predict", records[0]).json()["prediction"]
    assert (
        httpx.post(f"{server.url}/predict", content=b"x", headers={"Content-Type": "text/plain"}).status_code
        == 415
    )
    predictions = metric_values(server, "tabserve_predictions_total")
    assert any(
        f'version="{stored.version}"' in labels and f'predicted="{predicted}"' in labels
        for labels in predictions
    )
    latency = metric_values(server, "tabserve_request_seconds_count")
    assert any('transport="http"' in labels and 'endpoint="/predict"' in labels for labels in latency)
    refusals = metric_values(server, "tabserve_validation_errors_total")
    assert any('reason="unsupported_media_type"' in labels for labels in refusals)
    assert "tabserve_prediction_log_dropped_total" in httpx.get(f"{server.url}/metrics").text


def test_metrics_export_the_latest_drift_report(server: Server) -> None:
    labels = '{model="breast_cancer",version="judged-version"}'
    assert metric_values(server, "tabserve_drift_share")[labels] == LATEST_DRIFT.drift_share
    assert metric_values(server, "tabserve_drift_detected")[labels] == 1.0
    finished = datetime.fromisoformat(LATEST_DRIFT.finished_at).timestamp()
    assert metric_values(server, "tabserve_drift_report_timestamp_seconds")[labels] == finished


def test_metrics_export_the_latest_performance_report(server: Server) -> None:
    labels = '{model="breast_cancer",version="judged-version"}'
    metric = '{metric="roc_auc",model="breast_cancer",version="judged-version"}'
    assert metric_values(server, "tabserve_live_metric")[metric] == LATEST_PERFORMANCE.live_value
    assert (
        metric_values(server, "tabserve_live_estimated_accuracy")[labels]
        == LATEST_PERFORMANCE.estimated_accuracy
    )
    assert metric_values(server, "tabserve_live_labelled_rows")[labels] == LATEST_PERFORMANCE.labelled_rows
    assert metric_values(server, "tabserve_live_degraded")[labels] == 1.0


def test_prediction_log_has_one_line_per_answered_row(
    server: Server, stored: StoredModel, records: list[dict[str, float]]
) -> None:
    answer = post(server, "/predict", records[3]).json()

    def logged() -> list[dict[str, Any]]:
        lines = logged_rows(server.log_dir)
        return [line for line in lines if line["features"] == records[3] and line["endpoint"] == "/predict"]

    deadline = time.monotonic() + 10  # the log is written by a background thread
    while not logged() and time.monotonic() < deadline:
        time.sleep(0.1)
    entry = logged()[-1]
    assert entry["transport"] == "http"
    assert entry["version"] == stored.version
    assert entry["registered_version"] == stored.labels["registered_version"]
    assert entry["data_digest"] == stored.metadata["dataset_digest"]
    assert entry["prediction"] == answer["prediction"]
    assert entry["request_id"]


def test_openapi_documents_the_record_by_column_name(server: Server) -> None:
    text = json.dumps(httpx.get(f"{server.url}/docs.json", timeout=30).json())
    assert '"mean radius"' in text
    assert "training range" in text
    assert "/predict_batch" in text
    paths = httpx.get(f"{server.url}/docs.json", timeout=30).json()["paths"]
    assert "text/csv" in paths["/predict_file"]["post"]["requestBody"]["content"]
    assert "get" in paths["/model"]


def test_openapi_page_describes_this_service_and_its_model(server: Server, stored: StoredModel) -> None:
    spec = httpx.get(f"{server.url}/docs.json", timeout=30).json()
    info = spec["info"]
    assert info["title"] == "tabserve: breast_cancer"
    assert info["version"] == stored.version
    for fact in [stored.tag, stored.labels["mlflow_run_id"], stored.metadata["dataset_digest"], "benign"]:
        assert fact in info["description"]
    assert "Slack" not in json.dumps(info)
    assert "contact" not in info
    # The refusals as they are: the body's detail is a list, and the middleware's status codes are listed.
    detail = spec["components"]["schemas"]["InvalidArgument"]["properties"]["detail"]
    assert detail["type"] == "array"
    assert {"400", "413", "415", "503"} <= set(spec["paths"]["/predict_batch"]["post"]["responses"])
    # BentoML's Swagger UI moved to /docs (serving/pages.py): the root is the web page's.
    page = httpx.get(f"{server.url}/docs", timeout=30)
    assert page.status_code == 200
    assert "swagger" in page.text.lower()
    root = httpx.get(f"{server.url}/", headers={"Accept": "text/html"}, timeout=30)
    assert (root.status_code, root.headers["location"]) == (307, "/ui/")


def test_serve_without_a_model_says_to_train(stores: Stores, tmp_path: Path) -> None:
    process = start_server(stores.env(TABSERVE_MODEL_NAME="never-trained"), free_port(), tmp_path / "out.txt")
    process.wait(timeout=120)
    output = (tmp_path / "out.txt").read_text()
    assert process.returncode != 0
    assert "no model 'never-trained:latest' in the BentoML store" in output
    assert "python train.py" in output
