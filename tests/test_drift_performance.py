"""`python -m drift performance`: feedback joined to the prediction log, Evidently's classification preset on
the labelled rows against the reference set, the exit codes, the estimate, the summary and its gauges."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import orjson
import pandas as pd
import pytest
from prometheus_client import REGISTRY
from typer.testing import CliRunner

from drift.cli import app
from drift.logs import LogStats, LogTarget, Window
from drift.performance import read_feedback, read_labelled
from drift.summary import PERFORMANCE_FILE, read_latest_performance
from models.store import TARGET_COLUMN, StoredModel
from serving.metrics import export_latest_performance, serving_metrics
from tests.conftest import Stores, assert_ok, run_train
from tests.tables import mixed_table
from tests.test_drift_cli import drift_env, run_drift

ROWS_PER_REQUEST = 5


def _stamp(moment: datetime) -> str:
    return moment.isoformat(timespec="microseconds")


def write_predictions(directory: Path, model: StoredModel, features: pd.DataFrame) -> list[tuple[str, int]]:
    """The rows as the service logs them, ROWS_PER_REQUEST per request; odd requests' lines carry no `row`
    (as before item 1), so their rows are their positions. Returns each row's (request_id, row)."""
    answer = model.predict(features)
    now = datetime.now(UTC)
    lines, keys = [], []
    for index, record in enumerate(features.to_dict(orient="records")):
        request, row = f"req-{index // ROWS_PER_REQUEST}", index % ROWS_PER_REQUEST
        numbered = {"row": row} if (index // ROWS_PER_REQUEST) % 2 == 0 else {}
        if answer.probabilities is None:
            outputs = {"prediction": float(answer.labels[index])}
        else:
            probabilities = answer.probabilities[index].tolist()
            outputs = {
                "prediction": str(answer.labels[index]),
                "probabilities": dict(zip(map(str, answer.classes or []), probabilities, strict=True)),
            }
        line = {"ts": _stamp(now), "request_id": request, **numbered, "features": record, **outputs}
        lines.append(orjson.dumps({**line, "model": model.name, "version": model.version}))
        keys.append((request, row))
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "predictions-host-1.jsonl").write_bytes(b"\n".join(lines) + b"\n")
    return keys


def write_feedback(
    directory: Path, labels: list[tuple[str, int, str | float]], name: str = "feedback-host-1.jsonl"
) -> None:
    """Labels as the service's POST /feedback writes them: `label` (a class) or `value` (regression)."""
    now = datetime.now(UTC)
    directory.mkdir(parents=True, exist_ok=True)
    lines = [
        orjson.dumps(
            {
                "ts": _stamp(now + timedelta(microseconds=i)),
                "request_id": rid,
                "row": row,
                "value" if isinstance(label, float) else "label": label,
            }
        )
        for i, (rid, row, label) in enumerate(labels)
    ]
    with (directory / name).open("ab") as file:
        file.write(b"\n".join(lines) + b"\n")


@pytest.fixture(scope="module")
def model(default_model: object) -> StoredModel:
    return StoredModel.open("breast_cancer:latest")


@pytest.fixture(scope="module")
def holdout(model: StoredModel) -> pd.DataFrame:
    """Rows the model never trained on, with their true labels."""
    return model.load_holdout()


def live(
    tmp_path: Path, model: StoredModel, holdout: pd.DataFrame, labelled: int, flip_share: float = 0.0
) -> tuple[Path, Path]:
    """Log every held-out row; label the first `labelled` rows, a random `flip_share` of them wrongly."""
    keys = write_predictions(tmp_path / "predictions", model, holdout[model.schema.names])
    classes = [str(c) for c in model.classes or []]
    truth = holdout[TARGET_COLUMN].map(str).to_numpy()
    flipped = np.random.default_rng(0).random(len(truth)) < flip_share
    labels = [
        (rid, row, next(c for c in classes if c != truth[i]) if flipped[i] else truth[i])
        for i, (rid, row) in enumerate(keys[:labelled])
    ]
    write_feedback(tmp_path / "feedback", labels)
    return tmp_path / "predictions", tmp_path / "feedback"


def options(log: Path, feedback: Path, *extra: str) -> list[str]:
    return ["performance", "--log-dir", str(log), "--feedback-dir", str(feedback), *extra]


def test_healthy_labels_exit_0_with_report_summary_and_estimate(
    stores: Stores, model: StoredModel, holdout: pd.DataFrame, tmp_path: Path
) -> None:
    """As users see it: a subprocess. Most rows labelled truly; the estimate covers all rows."""
    log, feedback = live(tmp_path, model, holdout, labelled=len(holdout) - 10)
    result = run_drift(stores, tmp_path, *options(log, feedback))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "healthy: roc_auc" in result.stdout
    assert "ESTIMATED" in result.stdout
    summary = read_latest_performance(tmp_path / "reports", "breast_cancer")
    assert summary is not None
    assert summary["degraded"] is False
    assert summary["labelled_rows"] == len(holdout) - 10
    assert summary["rows_seen"] == len(holdout)
    assert summary["live_value"] > 0.9
    answer = model.predict(holdout[model.schema.names])
    assert answer.probabilities is not None
    assert summary["estimated_accuracy"] == pytest.approx(answer.probabilities.max(axis=1).mean(), abs=1e-4)
    report_dir = Path(summary["report_dir"])
    assert (report_dir / "report.html").stat().st_size > 10_000
    assert "Accuracy" in (report_dir / "report.json").read_text()
    assert json.loads((report_dir / "summary.json").read_text()) == summary
    assert list((tmp_path / "workspace").rglob("*.json")), "no snapshot in the Evidently workspace"


def test_half_the_labels_flipped_exit_1_and_alert(
    stores: Stores,
    model: StoredModel,
    holdout: pd.DataFrame,
    tmp_path: Path,
    webhook: tuple[str, list[dict[str, str]]],
) -> None:
    url, received = webhook
    log, feedback = live(tmp_path, model, holdout, labelled=len(holdout), flip_share=0.5)
    result = CliRunner().invoke(
        app, options(log, feedback, "--webhook", url), env=drift_env(stores, tmp_path)
    )
    assert result.exit_code == 1, result.output
    assert "DEGRADED: roc_auc" in result.stdout
    assert "alert sent to the webhook (HTTP 204)" in result.stdout
    [message] = received
    assert message["text"].startswith("Performance degraded in breast_cancer")
    summary = read_latest_performance(tmp_path / "reports", "breast_cancer")
    assert summary is not None
    assert summary["degraded"] is True
    assert summary["reference_value"] - summary["live_value"] > 0.05
    # The labels, not the model's confidence, went wrong: the estimate stays where it was.
    assert summary["estimated_accuracy"] > 0.9
    assert summary["measured_accuracy"] < 0.7


def test_too_few_labels_exit_2_with_one_line(
    stores: Stores, model: StoredModel, holdout: pd.DataFrame, tmp_path: Path
) -> None:
    log, feedback = live(tmp_path, model, holdout, labelled=10)
    result = CliRunner().invoke(app, options(log, feedback), env=drift_env(stores, tmp_path))
    assert result.exit_code == 2, result.output
    [line] = result.stderr.strip().splitlines()
    assert line.startswith("error: cannot judge breast_cancer:")
    assert "10 labelled rows of this version" in line
    assert "at least 50 needed" in line
    assert not (tmp_path / "reports" / "breast_cancer" / PERFORMANCE_FILE).exists()


@pytest.mark.parametrize(
    ("args", "named"),
    [
        (["--model", "breast_cancer:nosuchversion"], "no model 'breast_cancer:nosuchversion'"),
        (["--log-dir", "{empty}"], "no prediction log in"),
    ],
    ids=["unknown version", "no log"],
)
def test_what_cannot_be_judged_exits_2(
    stores: Stores, model: StoredModel, tmp_path: Path, args: list[str], named: str
) -> None:
    (tmp_path / "empty").mkdir()
    command = ["performance", *[arg.format(empty=tmp_path / "empty") for arg in args]]
    result = CliRunner().invoke(app, command, env=drift_env(stores, tmp_path))
    assert result.exit_code == 2, result.output
    assert named in result.stderr


def test_labels_join_by_request_id_and_row_and_a_later_label_replaces_an_earlier_one(
    model: StoredModel, holdout: pd.DataFrame, tmp_path: Path
) -> None:
    keys = write_predictions(tmp_path / "predictions", model, holdout[model.schema.names].iloc[:10])
    # req-0's lines carry `row`; req-1's do not (their positions are their rows).
    assert keys[:2] == [("req-0", 0), ("req-0", 1)]
    assert keys[5:7] == [("req-1", 0), ("req-1", 1)]
    write_feedback(
        tmp_path / "feedback",
        [
            ("req-0", 1, "benign"),
            ("req-1", 3, "benign"),
            ("req-0", 1, "malignant"),  # later: replaces the first
            ("req-9", 0, "benign"),  # an id never answered in the window
        ],
    )
    write_feedback(tmp_path / "feedback", [("req-1", 3, "malignant")], name="feedback-host-2.jsonl")  # latest
    (tmp_path / "feedback" / "feedback-host-1.jsonl").open("ab").write(b"not json\n")
    stats = LogStats()
    labels = read_feedback(sorted((tmp_path / "feedback").iterdir()), Window(), True, stats)
    assert labels == {("req-0", 1): "malignant", ("req-1", 3): "malignant", ("req-9", 0): "benign"}
    assert stats.corrupt == 1
    files = [tmp_path / "predictions" / "predictions-host-1.jsonl"]
    rows = read_labelled(files, LogTarget.of(model), Window(), labels)
    assert rows.seen == 10
    assert rows.labelled[TARGET_COLUMN].tolist() == ["malignant", "malignant"]
    expected = holdout[model.schema.names].iloc[[1, 8]].reset_index(drop=True)
    pd.testing.assert_frame_equal(rows.labelled[model.schema.names], expected, check_dtype=False)


def test_the_estimate_is_close_to_the_measured_accuracy_on_held_out_rows(
    model: StoredModel, holdout: pd.DataFrame
) -> None:
    """The figure docs/drift.md quotes for unshifted rows: the model's probabilities are near calibrated."""
    answer = model.predict(holdout[model.schema.names])
    assert answer.probabilities is not None
    estimated = answer.probabilities.max(axis=1).mean()
    measured = (answer.labels == holdout[TARGET_COLUMN].to_numpy()).mean()
    assert abs(estimated - measured) < 0.05, (estimated, measured)


def test_the_summary_is_exported_as_gauges(tmp_path: Path) -> None:
    summary = {
        "model": "breast_cancer",
        "version": "judged",
        "metric": "roc_auc",
        "live_value": 0.91,
        "estimated_accuracy": 0.95,
        "labelled_rows": 120,
        "degraded": True,
        "finished_at": "2026-11-23T10:00:00+00:00",
    }
    export_latest_performance(serving_metrics(), summary)
    labels = {"model": "breast_cancer", "version": "judged"}
    assert REGISTRY.get_sample_value("tabserve_live_metric", {**labels, "metric": "roc_auc"}) == 0.91
    assert REGISTRY.get_sample_value("tabserve_live_estimated_accuracy", labels) == 0.95
    assert REGISTRY.get_sample_value("tabserve_live_labelled_rows", labels) == 120
    assert REGISTRY.get_sample_value("tabserve_live_degraded", labels) == 1
    finished = datetime(2026, 11, 23, 10, tzinfo=UTC).timestamp()
    assert REGISTRY.get_sample_value("tabserve_performance_report_timestamp_seconds", labels) == finished
    assert read_latest_performance(tmp_path, "breast_cancer") is None
    (tmp_path / "breast_cancer").mkdir()
    (tmp_path / "breast_cancer" / PERFORMANCE_FILE).write_text(
        json.dumps(summary)
    )  # lacks fields: not a summary
    assert read_latest_performance(tmp_path, "breast_cancer") is None


@pytest.fixture(scope="module")
def regression_model(stores: Stores, tmp_path_factory: pytest.TempPathFactory) -> StoredModel:
    table = tmp_path_factory.mktemp("spend") / "spend.parquet"
    mixed_table(rows=300, regression=True).to_parquet(table, index=False)
    assert_ok(
        run_train(
            stores, "--data", str(table), "--target", "spend", "--name", "spend", "--drop", "customer_id"
        )
    )
    return StoredModel.open("spend:latest")


def test_regression_is_judged_on_its_metric_from_logged_values(
    stores: Stores, regression_model: StoredModel, tmp_path: Path
) -> None:
    """True values: healthy (rmse no worse than on the reference rows); values off by noise: degraded."""
    holdout = regression_model.load_holdout()
    keys = write_predictions(
        tmp_path / "predictions", regression_model, holdout[regression_model.schema.names]
    )
    truth = holdout[TARGET_COLUMN].to_numpy()
    noisy = truth + np.random.default_rng(0).normal(0, 100, len(truth))
    env = drift_env(stores, tmp_path)
    for values, code in [(truth, 0), (noisy, 1)]:
        feedback = tmp_path / f"feedback-{code}"
        write_feedback(feedback, [(rid, row, float(v)) for (rid, row), v in zip(keys, values, strict=True)])
        args = [*options(tmp_path / "predictions", feedback), "--model", "spend:latest", "--min-rows", "20"]
        result = CliRunner().invoke(app, [*args, "--max-drop", "5"], env=env)
        assert result.exit_code == code, result.output
        summary = read_latest_performance(tmp_path / "reports", "spend")
        assert summary is not None
        assert summary["metric"] == "rmse"
        assert summary["greater_is_better"] is False
        assert summary["labelled_rows"] == len(holdout)
        assert summary["estimated_accuracy"] is None
    assert summary["live_value"] > summary["reference_value"] + 5
