"""`python -m drift` as users run it: the cases that cannot be judged, and the scheduler's life cycle."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import orjson
import pytest
from typer.testing import CliRunner

from drift.cli import app
from models.store import StoredModel
from tests.conftest import PROJECT_ROOT, Stores, free_port


def run_drift(
    stores: Stores, tmp_path: Path, *args: str, timeout: float = 300
) -> subprocess.CompletedProcess[str]:
    """The CLI in a subprocess, with its reports and workspace under `tmp_path`."""
    return subprocess.run(
        [sys.executable, "-m", "drift", *args],
        cwd=PROJECT_ROOT,
        env=drift_env(stores, tmp_path),
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def drift_env(stores: Stores, tmp_path: Path) -> dict[str, str]:
    return stores.env(
        TABSERVE_REPORTS_DIR=str(tmp_path / "reports"), TABSERVE_WORKSPACE_DIR=str(tmp_path / "workspace")
    )


def write_log(directory: Path, rows: int, shift: float = 0.0) -> Path:
    """`rows` reference rows as the service logs them, 'mean radius' moved by `shift`."""
    model = StoredModel.open("breast_cancer:latest")
    features = model.load_reference()[model.schema.names].iloc[:rows]
    features = features.assign(**{"mean radius": features["mean radius"] + shift})
    lines = [
        orjson.dumps(
            {
                "ts": time.strftime("%Y-%m-%dT%H:%M:%S+00:00", time.gmtime()),
                "model": model.name,
                "version": model.version,
                "features": record,
            }
        )
        for record in features.to_dict(orient="records")
    ]
    directory.mkdir()
    (directory / "predictions-1.jsonl").write_bytes(b"\n".join(lines) + b"\n")
    return directory


CANNOT_JUDGE = {
    "no log": (["report", "--log-dir", "{empty}"], "no prediction log in"),
    "no such file": (["report", "--file", "{empty}/predictions-1.jsonl"], "no such log file"),
    "unknown version": (["report", "--model", "breast_cancer:nosuchversion"], "no model 'breast_cancer:nosu"),
    "too few rows": (["report", "--log-dir", "{log}"], "5 rows of this version"),
    "bad window": (["report", "--since", "yesterday"], "--since 'yesterday' is neither a duration"),
    "empty window": (["report", "--since", "1h", "--until", "2h"], "the window is empty"),
    "bad webhook": (["report", "--webhook", "hooks.example.com"], "--webhook must be an http"),
    "short interval": (["schedule", "--every", "2s"], "--every 2s is too short"),
    "bad interval": (["schedule", "--every", "hourly"], "--every 'hourly' is not a duration"),
    "shift without features": (["simulate", "shift"], "shift needs --features"),
    "unknown feature": (["simulate", "shift", "--features", "mean radius,colour"], "no feature 'colour'"),
    "no categories": (["simulate", "new-category"], "breast_cancer has no categorical features"),
}


@pytest.mark.parametrize("case", CANNOT_JUDGE)
def test_what_cannot_be_judged_or_done_exits_2_with_one_line(
    stores: Stores, default_model: object, tmp_path: Path, case: str
) -> None:
    """In-process, for speed; the next test checks the same as users see it, in a subprocess."""
    empty = tmp_path / "empty"
    empty.mkdir()
    template, named = CANNOT_JUDGE[case]
    log = write_log(tmp_path / "log", rows=5) if case == "too few rows" else empty
    args = [arg.format(empty=empty, log=log) for arg in template]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2, result.output
    [line] = result.stderr.strip().splitlines()
    assert line.startswith("error: ")
    assert named in line


@pytest.mark.parametrize(
    "template",
    [["report", "--log-dir", "{empty}"], ["simulate", "new-category", "--url", "http://127.0.0.1:9"]],
    ids=["report", "simulate"],
)
def test_the_exit_code_and_error_line_as_users_see_them(
    stores: Stores, default_model: object, tmp_path: Path, template: list[str]
) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    result = run_drift(stores, tmp_path, *[arg.format(empty=empty) for arg in template])
    assert result.returncode == 2, result.stdout + result.stderr
    assert "Traceback" not in result.stderr
    [line] = result.stderr.strip().splitlines()
    assert line.startswith("error: ")


def test_a_failing_webhook_warns_and_leaves_the_verdict_alone(
    stores: Stores, default_model: object, tmp_path: Path
) -> None:
    log = write_log(tmp_path / "log", rows=200, shift=10.0)
    args = ["report", "--log-dir", str(log), "--webhook", f"http://127.0.0.1:{free_port()}/hook"]
    result = CliRunner().invoke(app, args, env=drift_env(stores, tmp_path))
    assert result.exit_code == 1, result.output
    assert "DRIFT" in result.stdout
    assert "warning: the webhook failed after 4 attempts" in result.stdout
    assert (tmp_path / "reports" / "breast_cancer" / "latest.json").exists()


def test_schedule_runs_at_once_and_stops_cleanly_on_sigterm(
    stores: Stores, default_model: object, tmp_path: Path
) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    output = tmp_path / "schedule.txt"
    with output.open("w") as sink:
        process = subprocess.Popen(
            [sys.executable, "-m", "drift", "schedule", "--every", "1h", "--log-dir", str(empty)],
            cwd=PROJECT_ROOT,
            env=drift_env(stores, tmp_path),
            stdout=sink,
            stderr=subprocess.STDOUT,
            text=True,
        )
    try:
        deadline = time.monotonic() + 120
        while "report finished" not in output.read_text() and time.monotonic() < deadline:
            assert process.poll() is None, output.read_text()
            time.sleep(0.2)
        text = output.read_text()
        # The first report ran at once (not an hour later), could not judge, and the schedule went on.
        assert "no prediction log" in text
        assert "report finished with exit code 2" in text
        assert process.poll() is None
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=30) == 0
        assert "SIGTERM: stopping" in output.read_text()
    finally:
        if process.poll() is None:
            process.kill()
