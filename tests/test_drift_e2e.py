"""The drift loop end to end: a real `bentoml serve` writing its own prediction log, the traffic simulator
over HTTP and gRPC, reports as users run them, and a webhook received on loopback.

Baseline and shifted traffic are sent one after the other and judged in separate time windows.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import orjson
import pytest

from drift.summary import read_latest
from models.store import StoredModel
from tests.conftest import Stores, free_port, logged_rows, start_server, wait_ready
from tests.test_drift_alerts import Receiver
from tests.test_drift_cli import run_drift

ROWS = 1000
SHIFTED = ["mean radius", "mean texture"]


@dataclass(frozen=True)
class Traffic:
    log_dir: Path
    baseline: tuple[str, str]  # window: --since, --until
    shifted_since: str
    model: StoredModel


def log_rows(log_dir: Path) -> int:
    return len(logged_rows(log_dir))


def wait_for_rows(log_dir: Path, rows: int) -> None:
    """The service writes its log on a background thread: wait until every answered row is there."""
    deadline = time.monotonic() + 30
    while log_rows(log_dir) < rows:
        assert time.monotonic() < deadline, f"{log_rows(log_dir)} of {rows} rows in the log"
        time.sleep(0.2)


def rough_edges(log_dir: Path, model: StoredModel) -> None:
    """Another worker's file with a row of another version, a corrupt line and a partly written one."""
    other = {"ts": datetime.now(UTC).isoformat(), "model": model.name, "version": "older", "features": {}}
    (log_dir / "predictions-999999.jsonl").write_bytes(
        orjson.dumps(other) + b'\n{"ts": "not a time", "model"\n{"ts": "2026-11-2'
    )


@pytest.fixture(scope="module")
def traffic(
    stores: Stores, default_model: object, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Traffic]:
    root = tmp_path_factory.mktemp("drift-e2e")
    log_dir = root / "log"
    port, grpc_port = free_port(), free_port()
    env = stores.env(
        TABSERVE_PREDICTION_LOG_DIR=str(log_dir),
        TABSERVE_GRPC_PORT=str(grpc_port),
        TABSERVE_GRPC_HOST="127.0.0.1",
    )
    output = root / "server-output.txt"
    process = start_server(env, port, output)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_ready(process, url, output)
        model = StoredModel.open("breast_cancer:latest")
        send = ["--rows", str(ROWS), "--batch", "50", "--rate", "5000"]

        started = datetime.now(UTC).isoformat()
        result = run_drift(stores, root, "simulate", "baseline", "--url", url, "--seed", "1", *send)
        assert result.returncode == 0, result.stderr
        assert f"accepted {ROWS:,}" in result.stdout
        rough_edges(log_dir, model)
        wait_for_rows(log_dir, ROWS + 1)  # and the other version's row; no corrupt or partial line
        between = datetime.now(UTC).isoformat()

        features = ",".join(SHIFTED)
        shift = ["simulate", "shift", "--features", features, "--k", "3", "--seed", "2"]
        result = run_drift(stores, root, *shift, "--grpc", f"127.0.0.1:{grpc_port}", *send)
        assert result.returncode == 0, result.stderr
        assert f"accepted {ROWS:,}" in result.stdout
        wait_for_rows(log_dir, 2 * ROWS + 1)
        yield Traffic(log_dir, (started, between), between, model)
    finally:
        process.terminate()
        process.wait(timeout=60)


def test_baseline_traffic_has_no_drift_and_the_report_says_what_it_read(
    stores: Stores, traffic: Traffic, tmp_path: Path
) -> None:
    since, until = traffic.baseline
    window = ["--log-dir", str(traffic.log_dir), "--since", since, "--until", until]
    result = run_drift(stores, tmp_path, "report", *window, "--max-rows", "500")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "no drift: 0 of 30 features drifted" in result.stdout
    assert "500 compared: a uniform random sample of the window's 1,000 rows" in result.stdout
    for counted in ["corrupt lines skipped: 1", "partly written lines skipped: 1", "breast_cancer:older 1"]:
        assert counted in result.stdout

    model = traffic.model
    latest = read_latest(tmp_path / "reports", "breast_cancer")
    assert latest is not None
    assert latest["version"] == model.version
    assert latest["registered_version"] == model.labels["registered_version"]
    assert latest["mlflow_run_id"] == model.labels["mlflow_run_id"]
    assert latest["data_digest"] == model.metadata["dataset_digest"]
    assert (latest["drift_detected"], latest["drifted_features"]) == (False, [])
    assert (latest["rows_compared"], latest["rows_seen"]) == (500, ROWS)

    report_dir = Path(latest["report_dir"])
    assert report_dir.parent == tmp_path / "reports" / "breast_cancer"
    assert report_dir.name.startswith(model.version)
    header = (report_dir / "report.html").read_text().split("</table>")[0]
    for named in [model.version, model.labels["mlflow_run_id"], model.metadata["dataset_digest"]]:
        assert named in header
    assert json.loads((report_dir / "report.json").read_text())["metrics"]
    assert list((tmp_path / "workspace").glob("*/snapshots/*.json"))  # browsable with `evidently ui`


def test_shifted_traffic_drifts_on_exactly_the_shifted_features_and_alerts(
    stores: Stores, traffic: Traffic, tmp_path: Path
) -> None:
    receiver = Receiver([200])
    try:
        args = ["report", "--log-dir", str(traffic.log_dir), "--since", traffic.shifted_since]
        result = run_drift(stores, tmp_path, *args, "--webhook", receiver.url)
    finally:
        receiver.server.shutdown()
    assert result.returncode == 1, result.stdout + result.stderr
    assert "DRIFT: 2 of 30 features drifted" in result.stdout
    latest = read_latest(tmp_path / "reports", "breast_cancer")
    assert latest is not None
    assert latest["drift_detected"] is True
    assert latest["drifted_features"] == SHIFTED
    assert latest["rows_compared"] == ROWS
    [alert] = receiver.bodies
    assert "mean radius, mean texture" in alert["text"]
    assert alert["content"] == alert["text"]
    assert traffic.model.version in alert["text"]
