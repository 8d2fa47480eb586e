"""`drift simulate --feedback`: true labels sent back after the predictions, named by the answers' request ids
and rows, against the session's real `bentoml serve`; and the `concept` scenario, whose inputs do not drift
while the relation between features and label does."""

from __future__ import annotations

import time
from datetime import UTC, datetime
from pathlib import Path

import pandas as pd
import pytest
from typer.testing import CliRunner

from drift.cli import app
from drift.simulate import RowKey, Scenario, send_feedback, traffic
from models.store import TARGET_COLUMN, StoredModel
from tests.conftest import Server, Stores, assert_ok, logged_rows, run_train
from tests.tables import mixed_table
from tests.test_drift_cli import run_drift

ROWS = 300
SEND = ["--rows", str(ROWS), "--batch", "50", "--rate", "5000", "--feedback", "1.0"]


def lines(directory: Path, prefix: str) -> int:
    if prefix == "predictions":
        return len(logged_rows(directory))
    return sum(len(path.read_bytes().splitlines()) for path in directory.glob(f"{prefix}-*.jsonl*"))


def wait_for_lines(directory: Path, prefix: str, count: int) -> None:
    """The service writes both logs on threads of their own: wait until every row and label is there."""
    deadline = time.monotonic() + 30
    while lines(directory, prefix) < count:
        assert time.monotonic() < deadline, f"{lines(directory, prefix)} of {count} {prefix} lines"
        time.sleep(0.2)


def simulate(stores: Stores, server: Server, tmp_path: Path, *args: str) -> tuple[str, str]:
    """Send the traffic and its labels; the window (--since) starts before it and the logs hold it all
    when this returns."""
    rows, labels = lines(server.log_dir, "predictions"), lines(server.feedback_dir, "feedback")
    since = datetime.now(UTC).isoformat()
    result = run_drift(stores, tmp_path, "simulate", *args, "--url", server.url, *SEND)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"accepted {ROWS:,} (answered" in result.stdout
    assert f"feedback: sent {ROWS:,} true labels in 1 request(s)" in result.stdout
    assert f"kept     {ROWS:,} (in the feedback log)" in result.stdout
    assert "refused  0 (the service's reasons" in result.stdout
    wait_for_lines(server.log_dir, "predictions", rows + ROWS)
    wait_for_lines(server.feedback_dir, "feedback", labels + ROWS)
    return since, result.stderr


def performance(stores: Stores, server: Server, tmp_path: Path, since: str) -> tuple[int, str]:
    dirs = ["--log-dir", str(server.log_dir), "--feedback-dir", str(server.feedback_dir)]
    result = run_drift(stores, tmp_path, "performance", *dirs, "--since", since)
    return result.returncode, result.stdout + result.stderr


def test_baseline_labels_are_kept_and_the_model_is_healthy_on_them(
    stores: Stores, server: Server, tmp_path: Path
) -> None:
    since, _ = simulate(stores, server, tmp_path, "baseline", "--seed", "11")
    code, output = performance(stores, server, tmp_path, since)
    assert code == 0, output
    assert "healthy: roc_auc" in output
    assert f"{ROWS} labelled rows of {ROWS} seen" in output


def test_concept_drift_degrades_performance_while_the_inputs_do_not_drift(
    stores: Stores, server: Server, tmp_path: Path
) -> None:
    """Over gRPC: the labels name rows by the OIP answer's `id`, rows numbered from 0."""
    grpc = ["--grpc", server.grpc_target]
    since, notes = simulate(
        stores, server, tmp_path, "concept", "--features", "worst radius", *grpc, "--seed", "12"
    )
    assert "concept: the true label is the next class" in notes
    assert "with worst radius >" in notes

    report = run_drift(stores, tmp_path, "report", "--log-dir", str(server.log_dir), "--since", since)
    assert report.returncode == 0, report.stdout + report.stderr
    assert "no drift: 0 of 30 features drifted" in report.stdout

    code, output = performance(stores, server, tmp_path, since)
    assert code == 1, output
    assert "DEGRADED: roc_auc" in output


def test_concept_takes_one_numeric_feature(stores: Stores, default_model: object) -> None:
    """Checked before anything is sent: the address is never reached."""
    chosen = ["--features", "mean radius,mean texture", "--url", "http://127.0.0.1:9"]
    result = CliRunner().invoke(app, ["simulate", "concept", *chosen])
    assert result.exit_code == 2, result.output
    [line] = result.stderr.strip().splitlines()
    assert line == "error: concept takes one numeric feature in --features: the region where labels change"


def test_labels_the_service_refuses_or_never_receives_are_counted_with_the_reason(server: Server) -> None:
    keys = [RowKey(0, "never-answered-by-the-simulator", 0)]
    refused = send_feedback(server.url, keys, pd.Series(["benign"]), 1.0, 0, regression=False)
    assert (refused.sent, refused.kept, refused.refused, refused.failed) == (1, 0, 1, 0)
    [reason] = refused.reasons
    assert "'never-answered-by-the-simulator' was never answered here" in reason

    unreachable = send_feedback("http://127.0.0.1:9", keys, pd.Series(["benign"]), 1.0, 0, regression=False)
    assert (unreachable.kept, unreachable.refused, unreachable.failed) == (0, 0, 1)
    assert list(unreachable.reasons) == ["ConnectError: [Errno 111] Connection refused"]


@pytest.fixture(scope="module")
def regression_model(stores: Stores, tmp_path_factory: pytest.TempPathFactory) -> StoredModel:
    table = tmp_path_factory.mktemp("spend") / "spend.parquet"
    mixed_table(rows=300, regression=True).to_parquet(table, index=False)
    name = ["--name", "spend_concept", "--drop", "customer_id"]
    assert_ok(run_train(stores, "--data", str(table), "--target", "spend", *name))
    return StoredModel.open("spend_concept:latest")


def test_concept_moves_a_regressors_true_value_in_one_region_only(regression_model: StoredModel) -> None:
    """The same seed draws the same inputs as baseline; the value moves by k standard deviations of the
    target in `share` of the rows above the feature's reference median, and nowhere else."""
    baseline = traffic(regression_model, Scenario.BASELINE, 400, [], 2.0, 0.5, 3)
    concept = traffic(regression_model, Scenario.CONCEPT, 400, ["age"], 2.0, 0.5, 3)
    assert concept.frame.equals(baseline.frame)

    reference = regression_model.load_reference()
    moved = (concept.truth - baseline.truth).round(9) != 0
    above = concept.frame["age"] > reference["age"].median()
    assert (concept.truth - baseline.truth)[moved].round(9).unique().tolist() == [
        round(2.0 * reference[TARGET_COLUMN].std(), 9)
    ]
    assert not (moved & ~above).any()
    assert 0.3 < moved.sum() / above.sum() < 0.7  # share 0.5 of the region
    assert f"the {moved.sum():,} of 400 rows with age >" in concept.notes[-1]
