"""POST /predict_file on a real `bentoml serve`: CSV and Parquet in, CSV, Parquet and JSON out, streamed in
chunks; bad files get a 400 that names the problem; a large upload does not blow up the server's memory."""

from __future__ import annotations

import contextlib
import io
import socket
import threading
import time
from collections.abc import Iterator
from urllib.parse import urlparse

import httpx
import numpy as np
import pandas as pd
import psutil
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from models.data import load_default
from models.store import StoredModel
from tests.conftest import FILE_CHUNK_ROWS, MAX_UPLOAD_BYTES, Server

CSV = {"Content-Type": "text/csv"}


@pytest.fixture(scope="module")
def table() -> pd.DataFrame:
    """More rows than one chunk, so that answers are streamed in several pieces."""
    features = load_default().features
    rows = pd.concat([features] * 5, ignore_index=True)
    assert len(rows) > 2 * FILE_CHUNK_ROWS
    return rows


@pytest.fixture(scope="module")
def expected(server: Server, table: pd.DataFrame) -> pd.DataFrame:
    predictions = StoredModel.open("breast_cancer:latest").predict(table)
    assert predictions.probabilities is not None
    return pd.DataFrame(
        {
            "prediction": predictions.labels,
            "probability_benign": predictions.probabilities[:, 0],
            "probability_malignant": predictions.probabilities[:, 1],
        }
    )


def upload(
    server: Server, body: bytes, headers: dict[str, str] | None = None, **params: str
) -> httpx.Response:
    return httpx.post(
        f"{server.url}/predict_file", content=body, headers=headers or CSV, params=params, timeout=120
    )


def as_csv(frame: pd.DataFrame) -> bytes:
    return frame.to_csv(index=False).encode()


def as_parquet(frame: pd.DataFrame) -> bytes:
    buffer = io.BytesIO()
    frame.to_parquet(buffer, index=False)
    return buffer.getvalue()


def assert_same_predictions(got: pd.DataFrame, expected: pd.DataFrame) -> None:
    assert list(got.columns) == list(expected.columns)
    assert got["prediction"].tolist() == expected["prediction"].tolist()
    assert np.allclose(got["probability_malignant"], expected["probability_malignant"], rtol=0, atol=1e-12)


def test_csv_in_csv_out_in_row_order_with_lineage_headers(
    server: Server, table: pd.DataFrame, expected: pd.DataFrame
) -> None:
    response = upload(server, as_csv(table))
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/csv")
    assert_same_predictions(pd.read_csv(io.BytesIO(response.content)), expected)
    stored = StoredModel.open("breast_cancer:latest")
    assert response.headers["x-model-version"] == stored.version
    assert response.headers["x-mlflow-run-id"] == stored.labels["mlflow_run_id"]
    assert response.headers["x-data-digest"] == stored.metadata["dataset_digest"]


def test_parquet_form_upload_with_parquet_json_and_csv_answers(
    server: Server, table: pd.DataFrame, expected: pd.DataFrame
) -> None:
    files = {"file": ("rows.parquet", as_parquet(table), "application/octet-stream")}
    by_accept = httpx.post(
        f"{server.url}/predict_file",
        files=files,
        headers={"Accept": "application/vnd.apache.parquet"},
        timeout=120,
    )
    assert by_accept.status_code == 200, by_accept.text
    assert_same_predictions(pd.read_parquet(io.BytesIO(by_accept.content)), expected)

    as_json = httpx.post(f"{server.url}/predict_file", files=files, params={"format": "json"}, timeout=120)
    assert as_json.status_code == 200, as_json.text
    body = as_json.json()
    assert body["version"] == StoredModel.open("breast_cancer:latest").version
    assert [row["prediction"] for row in body["predictions"]] == expected["prediction"].tolist()

    parquet_to_csv = upload(
        server, as_parquet(table), {"Content-Type": "application/vnd.apache.parquet"}, format="csv"
    )
    assert parquet_to_csv.status_code == 200, parquet_to_csv.text
    assert_same_predictions(pd.read_csv(io.BytesIO(parquet_to_csv.content)), expected)


def repeated_column_csv(head: pd.DataFrame) -> bytes:
    return as_csv(head).replace(b"mean texture", b"mean radius", 1)


def repeated_column_parquet(head: pd.DataFrame) -> bytes:
    table = pa.Table.from_pandas(head, preserve_index=False)
    table = table.append_column("mean radius", table.column("mean radius"))
    buffer = io.BytesIO()
    pq.write_table(table, buffer)
    return buffer.getvalue()


def bad_cases(table: pd.DataFrame) -> list[tuple[str, bytes, dict[str, str], dict[str, str], int, str]]:
    head = table.head(30)
    infinite = head.copy()
    infinite.loc[17, "mean area"] = np.inf
    missing = head.copy()
    missing.loc[4, "worst symmetry"] = np.nan
    text = as_csv(head).decode().splitlines()
    text[3] = "abc" + text[3][text[3].index(",") :]
    ragged = [*as_csv(head).decode().splitlines()[:5], "1.0,2.0"]
    return [
        ("empty body", b"", CSV, {}, 400, "the uploaded file is empty"),
        ("header only", as_csv(head.head(0)), CSV, {}, 400, "header but no rows"),
        ("text in a number column", "\n".join(text).encode(), CSV, {}, 400, "column 'mean radius'"),
        ("ragged rows", "\n".join(ragged).encode(), CSV, {}, 400, "Expected 30 columns"),
        (
            "missing column",
            as_csv(head.drop(columns="mean radius")),
            CSV,
            {},
            400,
            "missing column(s) 'mean radius'",
        ),
        ("unknown column", as_csv(head.assign(id=1)), CSV, {}, 400, "unknown column(s) 'id'"),
        ("repeated column", repeated_column_csv(head), CSV, {}, 400, "repeated column(s) 'mean radius'"),
        (
            "repeated column in parquet",
            repeated_column_parquet(head),
            CSV,
            {},
            400,
            "repeated column(s) 'mean radius'",
        ),
        ("header not UTF-8", b"\x89PNG,b\n1,2\n", CSV, {}, 400, "its header is not UTF-8 text"),
        ("infinity", as_csv(infinite), CSV, {}, 400, "'mean area': Infinity is not allowed (row 18)"),
        ("missing value", as_csv(missing), CSV, {}, 400, "'worst symmetry': missing value (NaN)"),
        ("corrupt parquet", b"PAR1" + b"\0" * 64, CSV, {}, 400, "could not read the uploaded PARQUET file"),
        (
            "wrong content type",
            as_csv(head),
            {"Content-Type": "application/json"},
            {},
            415,
            "Content-Type must be",
        ),
        ("unknown output format", as_csv(head), CSV, {"format": "xlsx"}, 400, "format 'xlsx' is not one of"),
    ]


def test_bad_files_get_a_clear_4xx_and_the_server_keeps_serving(server: Server, table: pd.DataFrame) -> None:
    for name, body, headers, params, status, message in bad_cases(table):
        response = upload(server, body, headers, **params)
        assert response.status_code == status, f"{name}: {response.status_code} {response.text}"
        assert message in response.json()["error"], f"{name}: {response.text}"
    no_file = httpx.post(
        f"{server.url}/predict_file", data={"other": "x"}, files={"x": ("a", b"1")}, timeout=30
    )
    assert no_file.status_code == 400
    assert "no file in its 'file' field" in no_file.json()["error"]
    png = httpx.post(
        f"{server.url}/predict_file",
        files={"file": ("x.png", b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR", "image/png")},
        timeout=30,
    )
    assert png.status_code == 400
    assert "its header is not UTF-8 text" in png.json()["error"]
    assert upload(server, as_csv(table.head(3))).status_code == 200


def test_uploads_over_the_limit_get_413_declared_or_streamed(server: Server) -> None:
    address = urlparse(server.url)
    with socket.create_connection((address.hostname, address.port), timeout=30) as sock:
        sock.sendall(
            b"POST /predict_file HTTP/1.1\r\nHost: x\r\nContent-Type: text/csv\r\n"
            + f"Content-Length: {MAX_UPLOAD_BYTES + 1}\r\n\r\n".encode()
        )
        assert sock.recv(4096).startswith(b"HTTP/1.1 413")

    def chunked() -> Iterator[bytes]:  # no Content-Length: the server counts as it reads
        piece = b"1.0," * 250_000
        for _ in range(MAX_UPLOAD_BYTES // len(piece) + 1):
            yield piece

    response = httpx.post(f"{server.url}/predict_file", content=chunked(), headers=CSV, timeout=120)
    assert response.status_code == 413
    assert "over the limit" in response.json()["error"]


def tree_rss(pid: int) -> int:
    process = psutil.Process(pid)
    total = 0
    for member in [process, *process.children(recursive=True)]:
        with contextlib.suppress(psutil.NoSuchProcess):
            total += member.memory_info().rss
    return total


def test_a_large_upload_is_streamed_not_held_in_memory(server: Server, table: pd.DataFrame) -> None:
    body = as_csv(pd.concat([table] * 45, ignore_index=True))  # ~27 MB, ~128k rows
    assert len(body) > 25_000_000
    baseline = tree_rss(server.process.pid)
    peak = [baseline]
    done = threading.Event()

    def watch() -> None:
        while not done.is_set():
            peak.append(tree_rss(server.process.pid))
            time.sleep(0.05)

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        with httpx.stream(
            "POST",
            f"{server.url}/predict_file",
            content=body,
            headers=CSV,
            params={"format": "csv"},
            timeout=300,
        ) as response:
            assert response.status_code == 200
            lines = sum(chunk.count(b"\n") for chunk in response.iter_bytes())
    finally:
        done.set()
        watcher.join()
    assert lines == 1 + len(table) * 45
    growth = max(peak) - baseline
    # Held whole, parsed and answered, a CSV costs about ten times its size; streamed, the cost is a fixed
    # allowance for the parser and a few chunks (~60-90 MB measured here, for 5 MB and for 22 MB files alike).
    assert growth < 5 * len(body), (
        f"server memory grew by {growth / 1e6:.0f} MB for a {len(body) / 1e6:.0f} MB file"
    )
