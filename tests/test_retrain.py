"""`python -m lifecycle retrain` end to end: a real `bentoml serve` answers predictions and takes feedback,
and the loop retrains on the champion's original table plus the labelled live rows, through the gate.

The champion is trained on the first 200 rows of a synthetic table that needs more rows than that (the
breast-cancer table does not: a model of 200 of its rows is already at the ceiling, and whether 369 more rows
win is a coin toss of the held-out draw); the other 700 rows are genuinely new rows of the same
distribution, sent to the service. The tests run in order, on one server and one registry: no trigger;
mostly wrong feedback (not promoted, alert); the same run again (nothing trained); the true labels
(promoted); a rollback, then a change of concept (not promoted, alert with both scores, then a person
promotes); a store that cannot be written (the registry as it was). After every move the
running service, which follows the champion alias every second, answers with the new champion.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import bentoml
import httpx
import pandas as pd
import pytest
from sklearn.datasets import make_classification

from drift.summary import Summary, write_latest
from models import registry
from models.store import StoredModel
from tests.conftest import PROJECT_ROOT, Stores, assert_ok, free_port, run_train, start_server, wait_ready
from tests.test_promote import breast_cancer, flip

NAME = "retrain-loop"
ORIGINAL_ROWS = 200
FEATURES = 12
DRIFTED = ["feature_0", "feature_1"]
TRIGGER = "drift: feature_0, feature_1"


def learnable_table() -> pd.DataFrame:
    """900 rows of two classes a model keeps learning past 200 rows (roc_auc ~0.82 at 200, ~0.93 at 900)."""
    X, y = make_classification(
        n_samples=ORIGINAL_ROWS + 700,
        n_features=FEATURES,
        n_informative=6,
        n_redundant=2,
        flip_y=0.03,
        class_sep=1.3,
        random_state=7,
    )
    columns = [f"feature_{index}" for index in range(FEATURES)]
    return pd.DataFrame(X, columns=columns).assign(diagnosis=pd.Series(y).map({0: "benign", 1: "malignant"}))


@dataclass(frozen=True)
class Loop:
    stores: Stores
    url: str
    env: dict[str, str]  # the service's and the lifecycle's: same log, feedback and report folders
    reports_dir: Path
    live: pd.DataFrame  # the rows sent, with their true label
    keys: list[tuple[str, int]]  # each sent row's (request_id, row)
    record: dict[str, float]  # one row to ask the service which version answers

    def lifecycle(self, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "lifecycle", *args],
            cwd=PROJECT_ROOT,
            env={**self.env, **env},
            capture_output=True,
            text=True,
            timeout=300,
            check=False,
        )

    def send_feedback(self, labels: pd.Series) -> None:
        items = [
            {"request_id": request_id, "row": row, "label": str(label)}
            for (request_id, row), label in zip(self.keys, labels, strict=True)
        ]
        response = httpx.post(f"{self.url}/feedback", json=items, timeout=60)
        assert response.status_code == 200, response.text
        assert response.json()["accepted"] == len(items)

    def wait_until_served(self, version: str) -> None:
        """The running service follows the champion (every second here): it answers with `version` soon."""
        deadline = time.monotonic() + 60
        while True:
            answer = httpx.post(f"{self.url}/predict", json=self.record, timeout=30)
            assert answer.status_code == 200, answer.text
            if answer.json()["registered_version"] == version:
                return
            assert time.monotonic() < deadline, f"still answering with v{answer.json()['registered_version']}"
            time.sleep(0.5)

    def versions(self) -> list[str]:
        return [str(v.version) for v in self.stores.client().search_model_versions(f"name = '{NAME}'")]

    def champion(self) -> str:
        return str(self.stores.client().get_model_version_by_alias(NAME, "champion").version)

    def drift_report(self, version: str, features: list[str]) -> None:
        """latest.json as `python -m drift report` leaves it for the champion's version."""
        model = next(
            StoredModel.open(str(m.tag))
            for m in bentoml.models.list(NAME)
            if m.info.labels["registered_version"] == version
        )
        write_latest(
            self.reports_dir,
            Summary(
                **model.lineage,
                drift_detected=bool(features),
                drift_share=len(features) / FEATURES,
                drifted_features=features,
                rows_compared=len(self.live),
                rows_seen=len(self.live),
                prediction_drift=False,
                finished_at="2026-12-01T00:00:00+00:00",
                report_dir=str(self.reports_dir / NAME),
            ),
        )


@pytest.fixture(scope="module")
def loop(stores: Stores, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Loop]:
    root = tmp_path_factory.mktemp("retrain")
    table = learnable_table()
    original = root / "original.csv"
    table.iloc[:ORIGINAL_ROWS].to_csv(original, index=False)
    assert_ok(run_train(stores, "--data", str(original), "--target", "diagnosis", "--name", NAME))
    home = stores.server_home(root / "server-home")
    env = stores.env(
        TABSERVE_MODEL_NAME=NAME,
        TABSERVE_GRPC_PORT="0",
        TABSERVE_PREDICTION_LOG_DIR=str(root / "predictions"),
        TABSERVE_FEEDBACK_LOG_DIR=str(root / "feedback"),
        TABSERVE_REPORTS_DIR=str(root / "reports"),
        TABSERVE_RELOAD_SECONDS="1",
    )
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    output = root / "server-output.txt"
    process = start_server({**env, "BENTOML_HOME": str(home)}, port, output)
    try:
        wait_ready(process, url, output)
        live = table.iloc[ORIGINAL_ROWS:].reset_index(drop=True)
        keys: list[tuple[str, int]] = []
        for start in range(0, len(live), 100):
            records = live.drop(columns="diagnosis").iloc[start : start + 100].to_dict(orient="records")
            response = httpx.post(f"{url}/predict_batch", json=records, timeout=60)
            assert response.status_code == 200, response.text
            keys += [(answer["request_id"], answer["row"]) for answer in response.json()]
        record = live.drop(columns="diagnosis").iloc[0].to_dict()
        yield Loop(stores, url, env, root / "reports", live, keys, record)
    finally:
        process.terminate()
        process.wait(timeout=60)


def test_no_trigger_nothing_to_do(loop: Loop) -> None:
    loop.drift_report("1", [])
    result = loop.lifecycle("retrain", NAME)
    assert result.returncode == 0, result.stderr
    assert "nothing to do: the latest reports of champion v1 show no drift or degradation" in result.stderr
    assert loop.versions() == ["1"]


def test_mostly_wrong_feedback_does_not_make_a_champion(
    loop: Loop, webhook: tuple[str, list[dict[str, str]]]
) -> None:
    url, received = webhook
    loop.send_feedback(flip(loop.live, 0.6, seed=1)["diagnosis"])
    loop.drift_report("1", DRIFTED)
    result = loop.lifecycle("retrain", NAME, "--webhook", url)
    assert result.returncode == 1, result.stderr
    assert f"trigger: {TRIGGER}" in result.stderr
    assert f"adding {len(loop.live)} labelled live rows" in result.stderr
    assert "not promoted: v2 stays challenger" in result.stderr
    assert loop.champion() == "1"
    version = loop.stores.client().get_model_version(NAME, "2")
    assert version.tags["trigger"] == TRIGGER
    run = loop.stores.client().get_run(version.run_id)
    assert run.data.params["trigger"] == run.data.tags["trigger"] == TRIGGER
    assert run.data.params["live_rows"] == str(len(loop.live))
    [alert] = received[-1:]
    assert f"Retrain of retrain-loop ({TRIGGER}): v2 NOT promoted" in alert["text"]
    assert "new held-out rows: roc_auc new" in alert["text"]
    assert "champion's own held-out rows: roc_auc new" in alert["text"]


def test_the_same_trigger_and_rows_do_not_train_twice(loop: Loop) -> None:
    result = loop.lifecycle("retrain", NAME)
    assert result.returncode == 0, result.stderr
    assert "already retrained for this trigger and these labelled rows" in result.stderr
    assert sorted(loop.versions()) == ["1", "2"]


def test_more_good_data_of_the_same_distribution_is_promoted(loop: Loop) -> None:
    loop.send_feedback(loop.live["diagnosis"])  # the true labels replace the wrong ones
    result = loop.lifecycle("retrain", NAME)
    assert result.returncode == 0, result.stderr
    assert "promoted: v3 is the champion" in result.stderr
    assert loop.champion() == "3"
    assert any(m.info.labels["registered_version"] == "3" for m in bentoml.models.list(NAME))
    # Its lineage names both parts of its data: the original table's digest and the live rows'.
    original = loop.stores.client().get_model_version(NAME, "1").tags["dataset_digest"]
    retrained = loop.stores.client().get_model_version(NAME, "3").tags["dataset_digest"]
    assert retrained.startswith(f"{original}+")
    assert len(retrained) > len(original) + 1
    # It never trained on the rows the champion was tested on: they are all among its own held-out rows.
    client = loop.stores.client()
    trusted, held_out = (
        registry.load_holdout(client, client.get_model_version(NAME, version).run_id).round(9)
        for version in ("1", "3")
    )
    assert len(trusted.merge(held_out, how="inner")) == len(trusted)
    loop.wait_until_served("3")
    answer = httpx.post(f"{loop.url}/predict", json=loop.record, timeout=30).json()
    assert answer["data_digest"] == retrained


def test_concept_change_alerts_with_both_scores_and_a_person_decides(
    loop: Loop, webhook: tuple[str, list[dict[str, str]]]
) -> None:
    url, received = webhook
    back = loop.lifecycle("rollback", NAME, "--reason", "the service still serves v1")
    assert back.returncode == 0, back.stderr
    loop.wait_until_served("1")
    # `drift simulate concept`'s change on the genuinely new rows: the next class in the top 30% of one
    # feature (its own rows are the champion's reference rows, which the new version would just memorise).
    upper = loop.live["feature_0"] > loop.live["feature_0"].quantile(0.7)
    concept = loop.live["diagnosis"].where(~upper, flip(loop.live, 1.0, seed=0)["diagnosis"])
    loop.send_feedback(concept)
    loop.drift_report("1", [])  # a concept moves no input: a person (or the performance report) calls it
    result = loop.lifecycle("retrain", NAME, "--webhook", url, "--force", "--reason", "labels look odd")
    assert result.returncode == 1, result.stderr
    assert "label noise or a change of concept" in result.stderr
    assert loop.champion() == "1"
    alert = received[-1]["text"]
    assert "NOT promoted, champion stays v1" in alert
    assert "new held-out rows: roc_auc new" in alert
    assert "champion's own held-out rows: roc_auc new" in alert
    assert "A person decides: python -m lifecycle promote retrain-loop 4" in alert

    person = loop.lifecycle(
        "promote", NAME, "4", "--force", "--reason", "the labelling rule changed", "--by", "ana"
    )
    assert person.returncode == 0, person.stderr
    assert loop.champion() == "4"
    loop.wait_until_served("4")
    move = loop.stores.client().get_model_version(NAME, "4").tags
    assert move["moved_by"] == "ana"
    assert move["move_reason"] == "promote: the labelling rule changed"


def test_a_failure_mid_run_leaves_the_registry_as_it_was(loop: Loop, tmp_path: Path) -> None:
    before = sorted(loop.versions()), loop.champion()
    blocker = tmp_path / "not-a-directory"
    blocker.write_text("a file where the store's folder should be")
    result = loop.lifecycle(
        "retrain", NAME, "--force", "--reason", "store test", BENTOML_HOME=str(blocker / "bentoml")
    )
    assert result.returncode == 2, result.stderr
    assert "error: " in result.stderr
    assert "Traceback" not in result.stderr
    assert (sorted(loop.versions()), loop.champion()) == before


def test_changed_original_data_is_refused_with_its_digests(stores: Stores, tmp_path: Path) -> None:
    name = "retrain-changed-data"
    original = tmp_path / "original.csv"
    breast_cancer().iloc[:150].to_csv(original, index=False)
    assert_ok(run_train(stores, "--data", str(original), "--target", "diagnosis", "--name", name))
    flip(breast_cancer().iloc[:150], 0.1, seed=2).to_csv(original, index=False)  # edited in place
    env = stores.env(
        TABSERVE_PREDICTION_LOG_DIR=str(tmp_path / "none"), TABSERVE_FEEDBACK_LOG_DIR=str(tmp_path)
    )
    result = subprocess.run(
        [sys.executable, "-m", "lifecycle", "retrain", name, "--force", "--reason", "weekly"],
        cwd=PROJECT_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert result.returncode == 2, result.stderr
    assert f"error: the training data at {original} changed since the champion was trained" in result.stderr
    assert "Traceback" not in result.stderr
    assert [str(v.version) for v in stores.client().search_model_versions(f"name = '{name}'")] == ["1"]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["retrain", NAME, "--window", "soon"], "--since 'soon' is neither a duration"),
        (["retrain", NAME, "--webhook", "ftp://hook"], "--webhook must be an http:// or https:// URL"),
        (["promote", NAME, "99"], f"no version 99 of '{NAME}' in the MLflow registry"),
        (["promote", "never-registered", "1"], "no version 1 of 'never-registered'"),
        (["rollback", "never-registered"], "'never-registered' has no champion to roll back"),
        (["schedule", NAME, "--every", "1s"], "--every 1s is too short"),
    ],
)
def test_bad_input_is_a_clear_exit_2(stores: Stores, args: list[str], message: str) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "lifecycle", *args],
        cwd=PROJECT_ROOT,
        env=stores.env(),
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 2, result.stderr
    assert message in result.stderr
    assert "Traceback" not in result.stderr


def test_the_schedule_runs_the_loop_at_once_and_stops_on_sigterm(loop: Loop) -> None:
    process = subprocess.Popen(
        [sys.executable, "-m", "lifecycle", "schedule", NAME, "--every", "1h"],
        cwd=PROJECT_ROOT,
        env=loop.env,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        lines = []
        for line in process.stderr or []:
            lines.append(line)
            if line.startswith("retrain finished with exit code"):
                break
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=60) == 0
    finally:
        if process.poll() is None:
            process.kill()
    text = "".join(lines)
    assert "reporting every 1:00:00" in text
    assert "retrain finished with exit code 0" in text  # no report of champion v4 calls for one
