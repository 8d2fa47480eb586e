"""Webhook alerts against a local receiver, and the latest.json summary the service exports."""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest
from tenacity import wait_none

from drift import alerts
from drift.summary import Summary, read_latest, write_latest
from tests.conftest import Receiver, free_port

SUMMARY = Summary(
    model="breast_cancer",
    version="abc123",
    registered_version="3",
    mlflow_run_id="run42",
    data_digest="84ef6c2c",
    drift_detected=True,
    drift_share=0.0667,
    drifted_features=["mean radius", "mean texture"],
    rows_compared=1000,
    rows_seen=1000,
    prediction_drift=False,
    finished_at="2026-11-23T10:15:00+00:00",
    report_dir="/reports/breast_cancer/abc123-20261123T101500Z",
)


@pytest.fixture
def receiver(request: pytest.FixtureRequest) -> Iterator[Receiver]:
    running = Receiver(request.param)
    yield running
    running.close()


def post(url: str) -> alerts.Delivery:
    return alerts.post(url, alerts.drift_message(SUMMARY, "the last hour"), wait=wait_none())


@pytest.mark.parametrize("receiver", [[200]], indirect=True)
def test_the_message_suits_slack_and_discord_and_names_the_lineage(receiver: Receiver) -> None:
    delivery = post(receiver.url)
    assert (delivery.ok, delivery.attempts) == (True, 1)
    [body] = receiver.bodies
    assert body["text"] == body["content"]
    for named in ["mean radius, mean texture", "v3", "abc123", "run42", "84ef6c2c", "report.html"]:
        assert named in body["text"]


@pytest.mark.parametrize("receiver", [[500, 429, 200]], indirect=True)
def test_transient_failures_are_retried(receiver: Receiver) -> None:
    delivery = post(receiver.url)
    assert (delivery.ok, delivery.attempts, len(receiver.bodies)) == (True, 3, 3)


@pytest.mark.parametrize("receiver", [[503]], indirect=True)
def test_a_failing_webhook_gives_up_after_a_few_attempts_without_raising(receiver: Receiver) -> None:
    delivery = post(receiver.url)
    assert (delivery.ok, delivery.attempts, delivery.detail) == (False, 4, "HTTP 503")


@pytest.mark.parametrize("receiver", [[404]], indirect=True)
def test_a_refusal_is_final(receiver: Receiver) -> None:
    delivery = post(receiver.url)
    assert (delivery.ok, delivery.attempts) == (False, 1)


def test_an_unreachable_webhook_is_retried_then_reported() -> None:
    delivery = post(f"http://127.0.0.1:{free_port()}/hook")
    assert not delivery.ok
    assert delivery.attempts == 4


def test_backoff_is_bounded_in_time() -> None:
    delivery = alerts.post(f"http://127.0.0.1:{free_port()}/hook", "x", deadline_seconds=0.5)
    assert not delivery.ok
    assert delivery.attempts < 4  # the default backoff (0.5 s, 1 s, ...) ran out of the 0.5 s deadline


def test_latest_summary_round_trip(tmp_path: Path) -> None:
    assert read_latest(tmp_path, "breast_cancer") is None
    path = write_latest(tmp_path, SUMMARY)
    assert path == tmp_path / "breast_cancer" / "latest.json"
    latest = read_latest(tmp_path, "breast_cancer")
    assert latest is not None
    assert latest["drifted_features"] == ["mean radius", "mean texture"]
    assert latest["drift_detected"] is True
    write_latest(tmp_path, replace(SUMMARY, drift_detected=False, drifted_features=[]))
    assert read_latest(tmp_path, "breast_cancer") == {
        **json.loads(json.dumps(SUMMARY.__dict__)),
        "drift_detected": False,
        "drifted_features": [],
    }
    assert [p.name for p in path.parent.iterdir()] == ["latest.json"]  # no temporary file left behind


@pytest.mark.parametrize("content", ["", "{not json", "[1, 2]", '{"model": "breast_cancer"}'])
def test_unreadable_latest_summary_is_none(tmp_path: Path, content: str) -> None:
    (tmp_path / "breast_cancer").mkdir()
    (tmp_path / "breast_cancer" / "latest.json").write_text(content)
    assert read_latest(tmp_path, "breast_cancer") is None
