"""The shadow challenger: a real `bentoml serve` with TABSERVE_SHADOW=true scores every answered batch with
the `challenger` version too and logs it beside the champion's answer; drift/shadow.py compares the two."""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest

from drift.logs import Window, find_log_files
from drift.shadow import compare_shadow
from models.data import load_default
from tests.conftest import PROJECT_ROOT, Stores, assert_ok, free_port, run_train, start_server, wait_ready

REQUESTS = 30


@contextmanager
def shadow_service(
    stores: Stores, root: Path, **env: str
) -> Iterator[tuple[str, Path, Path, dict[str, str]]]:
    """A real `bentoml serve` with the shadow on, over `stores`: its URL, log and feedback folders, env."""
    port = free_port()
    log_dir, feedback_dir = root / "predictions", root / "feedback"
    env = stores.env(
        TABSERVE_GRPC_PORT="0",
        TABSERVE_PREDICTION_LOG_DIR=str(log_dir),
        TABSERVE_FEEDBACK_LOG_DIR=str(feedback_dir),
        TABSERVE_SHADOW="true",
        TABSERVE_RELOAD_SECONDS="1",
        **env,
    )
    output = root / "server-output.txt"
    process = start_server(env, port, output)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_ready(process, url, output)
        yield url, log_dir, feedback_dir, env
    finally:
        process.terminate()
        process.wait(timeout=60)


@pytest.fixture(scope="module")
def shadow_stores(tmp_path_factory: pytest.TempPathFactory) -> Stores:
    root = tmp_path_factory.mktemp("shadow-stores")
    stores = Stores(data_dir=root / "data", bentoml_home=root / "bentoml")
    assert_ok(run_train(stores, "--cv-folds", "3"))  # v1, champion
    assert_ok(run_train(stores, "--cv-folds", "3"))  # v2: a tie, refused: the challenger
    return stores


@pytest.fixture(scope="module")
def shadow_server(
    shadow_stores: Stores, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[str, Path, Path, dict[str, str]]]:
    with shadow_service(shadow_stores, tmp_path_factory.mktemp("shadow")) as served:
        yield served


def shadow_lines(log_dir: Path) -> list[dict[str, Any]]:
    return [
        orjson.loads(line)
        for path in sorted(log_dir.glob("shadow-*.jsonl"))
        for line in path.read_bytes().splitlines()
    ]


def test_every_answered_row_is_shadowed_by_the_challenger(
    shadow_server: tuple[str, Path, Path, dict[str, str]],
) -> None:
    url, log_dir, feedback_dir, _ = shadow_server
    time.sleep(2)  # the shadow's first look at the registry
    features = load_default().features
    records = [{str(k): float(v) for k, v in features.iloc[i].items()} for i in range(3)]
    answered = set()
    with httpx.Client(base_url=url, timeout=30) as client:
        for index in range(REQUESTS):
            answer = client.post("/predict_batch", json=records, headers={"X-Request-Id": f"r{index}"})
            assert answer.status_code == 200, answer.text
            assert {row["registered_version"] for row in answer.json()} == {"1"}
            answered |= {(row["request_id"], row["row"]) for row in answer.json()}
        labels = [{"request_id": f"r{index}", "row": 0, "label": "malignant"} for index in range(10)]
        assert client.post("/feedback", json=labels).status_code == 200

    deadline = time.monotonic() + 15
    while len(shadow_lines(log_dir)) < len(answered) and time.monotonic() < deadline:
        time.sleep(0.5)
    lines = shadow_lines(log_dir)
    assert {(line["request_id"], line["row"]) for line in lines} == answered
    assert {line["champion"]["registered_version"] for line in lines} == {"1"}
    assert {line["challenger"]["registered_version"] for line in lines} == {"2"}
    assert all(set(line["challenger"]["probabilities"]) == {"malignant", "benign"} for line in lines)
    # The drift and performance readers never take shadow lines for the champion's predictions.
    assert all(path.name.startswith("predictions-") for path in find_log_files(log_dir))

    time.sleep(1.5)  # the feedback log is written on a thread
    comparison = compare_shadow(log_dir, feedback_dir)
    same = sum(line["champion"]["prediction"] == line["challenger"]["prediction"] for line in lines)
    assert comparison.rows == len(answered)
    assert comparison.agreement == same / len(lines)
    assert (comparison.champion_versions, comparison.challenger_version) == (["1"], "2")
    assert comparison.labelled_rows == 10
    truth_is_first = [line for line in lines if line["row"] == 0 and int(line["request_id"][1:]) < 10]
    expected = sum(line["champion"]["prediction"] == "malignant" for line in truth_is_first) / 10
    assert comparison.champion_metric == expected


def test_status_shows_the_shadow_agreement_and_both_live_metrics(
    shadow_server: tuple[str, Path, Path, dict[str, str]],
) -> None:
    """After the test above: `lifecycle status` reads the same logs as compare_shadow."""
    url, log_dir, feedback_dir, env = shadow_server
    comparison = compare_shadow(log_dir, feedback_dir)
    assert comparison.rows > 0
    status = subprocess.run(
        [sys.executable, "-m", "lifecycle", "status", "breast_cancer", "--url", url],
        cwd=PROJECT_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert status.returncode == 0, status.stdout + status.stderr
    assert (
        f"shadow: challenger v2 agreed with champion v1 on {comparison.agreement:.1%} of "
        f"{comparison.rows:,} rows; on 10 labelled rows, accuracy champion "
        f"{comparison.champion_metric:.4f}, challenger {comparison.challenger_metric:.4f}"
    ) in status.stdout


def write_lines(path: Path, records: list[dict[str, Any]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"".join(orjson.dumps(record) + b"\n" for record in records))


def shadow_record(
    ts: datetime, row: int, champion: Any, challenger: Any, version: str = "2"
) -> dict[str, Any]:
    challenger_answer: dict[str, Any] = {"registered_version": version, "prediction": challenger}
    if isinstance(challenger, str):
        challenger_answer["probabilities"] = {"a": 0.5, "b": 0.5}
    return {
        "ts": ts.isoformat(),
        "request_id": "q",
        "row": row,
        "champion": {"registered_version": "1", "prediction": champion},
        "challenger": challenger_answer,
    }


def test_agreement_and_both_metrics_on_a_known_case(tmp_path: Path) -> None:
    now = datetime.now(UTC)
    pairs = [("a", "a"), ("a", "b"), ("b", "b"), ("b", "b")]  # 3 of 4 agree
    records = [shadow_record(now, row, *pair) for row, pair in enumerate(pairs)]
    records.append(shadow_record(now - timedelta(days=2), 9, "a", "b"))  # outside the window
    records.append(shadow_record(now, 8, "a", "b", version="7"))  # another challenger, older
    records[-1]["ts"] = (now - timedelta(minutes=1)).isoformat()
    write_lines(tmp_path / "log" / "shadow-host-1.jsonl", records)
    feedback = [
        {"ts": now.isoformat(), "request_id": "q", "row": 1, "label": "b"},  # challenger right
        {"ts": now.isoformat(), "request_id": "q", "row": 2, "label": "a"},  # both wrong
    ]
    write_lines(tmp_path / "feedback" / "feedback-host-1.jsonl", feedback)

    comparison = compare_shadow(
        tmp_path / "log", tmp_path / "feedback", Window(since=now - timedelta(hours=1))
    )
    assert (comparison.rows, comparison.agreement, comparison.challenger_version) == (4, 0.75, "2")
    assert (comparison.labelled_rows, comparison.metric) == (2, "accuracy")
    assert (comparison.champion_metric, comparison.challenger_metric) == (0.0, 0.5)


def test_regression_agreement_is_the_mean_absolute_difference(tmp_path: Path) -> None:
    now = datetime.now(UTC)
    records = [shadow_record(now, row, *pair) for row, pair in enumerate([(1.0, 1.5), (2.0, 1.0)])]
    write_lines(tmp_path / "log" / "shadow-host-1.jsonl", records)
    write_lines(
        tmp_path / "feedback" / "feedback-host-1.jsonl",
        [{"ts": now.isoformat(), "request_id": "q", "row": 0, "value": 2.0}],
    )
    comparison = compare_shadow(tmp_path / "log", tmp_path / "feedback")
    assert (comparison.agreement, comparison.mean_abs_difference) == (None, 0.75)
    assert (comparison.metric, comparison.champion_metric, comparison.challenger_metric) == ("mae", 1.0, 0.5)


def test_a_share_of_the_batches_is_shadowed(shadow_stores: Stores, tmp_path: Path) -> None:
    """TABSERVE_SHADOW_SHARE=0.3: about 30% of the answered batches are scored by the challenger."""
    record = {str(k): float(v) for k, v in load_default().features.iloc[0].items()}
    requests = 200
    with shadow_service(shadow_stores, tmp_path, TABSERVE_SHADOW_SHARE="0.3") as (url, log_dir, _, _):
        time.sleep(2)  # the shadow's first look at the registry
        with httpx.Client(base_url=url, timeout=30) as client:
            for index in range(requests):
                answer = client.post("/predict", json=record, headers={"X-Request-Id": f"s{index}"})
                assert answer.status_code == 200, answer.text
        time.sleep(2)  # the last shadow lines are written on a thread
        shadowed = {line["request_id"] for line in shadow_lines(log_dir)}
    # Binomial(200, 0.3): mean 60, standard deviation 6.5; outside this range (4.6 of them): fewer than
    # once in 100,000 runs.
    assert 30 <= len(shadowed) <= 90, len(shadowed)
    assert shadowed <= {f"s{index}" for index in range(requests)}
