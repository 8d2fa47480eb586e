"""Faults a running service meets, on a real `bentoml serve`: here, a prediction-log disk that fills up."""

from __future__ import annotations

import time
from pathlib import Path

import httpx

from drift.logs import LogTarget, Window, find_log_files, read_log
from models.data import load_default
from models.store import StoredModel
from tests.conftest import Server, Stores, free_port, start_server, wait_ready
from tests.test_service import metric_values

ROWS = 50  # per request


def test_a_full_log_disk_keeps_serving_counts_the_drops_and_keeps_the_log_whole(
    stores: Stores, default_model: object, full_disk: Path, tmp_path: Path
) -> None:
    home = stores.server_home(tmp_path / "bentoml-home")
    env = stores.env(
        BENTOML_HOME=str(home),
        TABSERVE_GRPC_PORT="0",
        TABSERVE_PREDICTION_LOG_DIR=str(full_disk),
        TABSERVE_FEEDBACK_LOG_DIR=str(tmp_path / "feedback"),
    )
    port, output = free_port(), tmp_path / "out.txt"
    process = start_server(env, port, output)
    url = f"http://127.0.0.1:{port}"
    features = load_default().features
    records = [{str(k): float(v) for k, v in features.iloc[i].items()} for i in range(ROWS)]
    server = Server(url, "", full_disk, tmp_path / "feedback", process, output)

    def dropped() -> float:
        return sum(metric_values(server, "tabserve_prediction_log_dropped_total").values())

    def logged(model: StoredModel) -> tuple[int, int, int]:
        stats = read_log(find_log_files(full_disk), LogTarget.of(model), Window(), 10**7).stats
        return stats.seen, stats.partial, stats.corrupt

    try:
        wait_ready(process, url, output)
        model = StoredModel.open("breast_cancer:latest")
        answered = 0
        # Until the disk is full, then as many again: every request is answered all along.
        for _ in range(400):
            response = httpx.post(f"{url}/predict_batch", json=records, timeout=60)
            assert response.status_code == 200, response.text
            answered += ROWS
            if dropped() >= 20 * ROWS:
                break
        assert dropped() > 0, "the disk never filled up"
        deadline = time.monotonic() + 15  # the log is written by a thread: wait until it has caught up
        while logged(model)[0] + dropped() < answered and time.monotonic() < deadline:
            time.sleep(0.2)
        seen, partial, corrupt = logged(model)
        assert seen > 0
        assert seen + dropped() == answered  # every answered row is on disk or counted
        assert (partial, corrupt) == (0, 0)  # and none is half written
        assert httpx.get(f"{url}/readyz", timeout=10).status_code == 200
    finally:
        process.terminate()
        process.wait(timeout=60)
