"""Faults a running service meets, on a real `bentoml serve`: a prediction-log disk that fills up; an API
worker, or the model service, killed with SIGKILL under load; the model service stopped (SIGSTOP) for longer
than any request may wait."""

from __future__ import annotations

import os
import signal
import subprocess
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
import pytest
import tritonclient.grpc as triton_grpc
from tritonclient.utils import InferenceServerException

from drift.logs import LogTarget, Window, find_log_files, read_log
from loadtests import proctree
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


# ---- kill -9 ----------------------------------------------------------------------------------------------

CLIENTS = 16
LOAD_BEFORE_KILL = 3.0
# How long the service may answer nothing after a kill, and how long BentoML may take to start a new process.
OUTAGE_SECONDS = 2.0
REPLACED_WITHIN = 45.0
LOAD_AFTER_REPLACEMENT = 3.0


@dataclass(frozen=True)
class Answer:
    sent: float  # time.monotonic()
    finished: float
    outcome: str  # "200", another status, or the transport error's name


class SteadyLoad:
    """`CLIENTS` keep-alive HTTP clients, each sending a record to /predict once the last is answered."""

    def __init__(self, url: str, record: dict[str, float]) -> None:
        self.answers: list[Answer] = []
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._client, args=(url, record)) for _ in range(CLIENTS)]

    def __enter__(self) -> SteadyLoad:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=60)

    def _client(self, url: str, record: dict[str, float]) -> None:
        with httpx.Client(timeout=30) as client:
            while not self._stop.is_set():
                sent = time.monotonic()
                try:
                    outcome = str(client.post(f"{url}/predict", json=record).status_code)
                except httpx.TransportError as error:
                    outcome = type(error).__name__
                self.answers.append(Answer(sent, time.monotonic(), outcome))

    def failed(self, since: float = 0.0) -> list[Answer]:
        return [a for a in self.answers if a.outcome != "200" and a.sent >= since]


def service_processes(server: subprocess.Popen[str], service: str) -> set[int]:
    """The live worker processes of one BentoML service under `bentoml serve`."""
    found = set()
    for pid in proctree.tree(server.pid):
        try:
            command = (Path("/proc") / str(pid) / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"_bentoml_impl.worker.service" in command and f"--service-name={service}".encode() in {
            b"=".join(command[i : i + 2]) for i in range(len(command) - 1)
        }:
            found.add(pid)
    return found


def wait_for_new_process(server: subprocess.Popen[str], service: str, old: set[int], deadline: float) -> int:
    while time.monotonic() < deadline:
        new = service_processes(server, service) - old
        if new:
            return new.pop()
        time.sleep(0.1)
    pytest.fail(f"no new {service} process within {REPLACED_WITHIN} s")


def wait_until_serving(url: str, record: dict[str, float], since: float) -> float:
    """When /predict answered 200 again for a while, counted from `since`."""
    deadline = since + REPLACED_WITHIN
    while time.monotonic() < deadline:
        if httpx.post(f"{url}/predict", json=record, timeout=30).status_code == 200:
            return time.monotonic()
        time.sleep(0.1)
    pytest.fail(f"the service did not answer again within {REPLACED_WITHIN} s")


def served_by(url: str, pid: int) -> bool:
    """Whether the worker `pid` has made its service (it says so in /metrics, per process)."""
    return f'pid="{pid}"' in httpx.get(f"{url}/metrics", timeout=30).text


@pytest.fixture
def one_record() -> dict[str, float]:
    return {str(k): float(v) for k, v in load_default().features.iloc[0].items()}


def _serve(stores: Stores, tmp_path: Path, **env: str) -> tuple[subprocess.Popen[str], str]:
    home = stores.server_home(tmp_path / "bentoml-home")
    port, output = free_port(), tmp_path / "out.txt"
    settings = stores.env(
        BENTOML_HOME=str(home),
        **{
            "TABSERVE_GRPC_PORT": "0",
            "TABSERVE_PREDICTION_LOG_DIR": str(tmp_path / "predictions"),
            "TABSERVE_FEEDBACK_LOG_DIR": str(tmp_path / "feedback"),
            **env,
        },
    )
    process = start_server(settings, port, output)
    url = f"http://127.0.0.1:{port}"
    wait_ready(process, url, output)
    return process, url


def test_a_killed_api_worker_fails_only_its_requests_and_is_replaced(
    stores: Stores, default_model: object, tmp_path: Path, one_record: dict[str, float]
) -> None:
    process, url = _serve(stores, tmp_path)
    try:
        with SteadyLoad(url, one_record) as load:
            time.sleep(LOAD_BEFORE_KILL)
            workers = service_processes(process, "tabserve")
            assert len(workers) == 2, workers
            victim = min(workers)
            killed_at = time.monotonic()
            os.kill(victim, signal.SIGKILL)
            replacement = wait_for_new_process(process, "tabserve", workers, killed_at + REPLACED_WITHIN)
            while not served_by(url, replacement) and time.monotonic() < killed_at + REPLACED_WITHIN:
                time.sleep(0.2)
            replaced_at = time.monotonic()
            time.sleep(LOAD_AFTER_REPLACEMENT)
        answered_after = [a.finished for a in load.answers if a.outcome == "200" and a.sent > killed_at]
        failed = load.failed()
        outage, replaced = min(answered_after) - killed_at, replaced_at - killed_at
        print(  # the figures of RELIABILITY.md
            f"kill -9 of an API worker: {len(failed)} requests failed, answered again "
            f"{1000 * outage:.0f} ms after, replaced in {replaced:.1f} s"
        )
        # Only the requests in progress on the killed worker (at most one per client) fail.
        assert len(failed) <= CLIENTS, failed[:5]
        assert all(a.sent <= killed_at + OUTAGE_SECONDS for a in failed), failed[:5]
        assert outage < OUTAGE_SECONDS
        assert served_by(url, replacement), "the replacement worker never made its service"
        assert not load.failed(since=replaced_at)
        assert sum(a.sent > replaced_at for a in load.answers) > 0
        assert httpx.get(f"{url}/readyz", timeout=10).status_code == 200
    finally:
        process.terminate()
        process.wait(timeout=60)


def test_a_killed_model_service_never_fails_a_request_with_500_and_serves_again_once_back(
    stores: Stores, default_model: object, tmp_path: Path, one_record: dict[str, float]
) -> None:
    process, url = _serve(stores, tmp_path, TABSERVE_MODEL_SERVICE="true")
    try:
        with SteadyLoad(url, one_record) as load:
            time.sleep(LOAD_BEFORE_KILL)
            runners = service_processes(process, "tabserve-model")
            assert len(runners) == 1, runners
            killed_at = time.monotonic()
            os.kill(runners.pop(), signal.SIGKILL)
            wait_for_new_process(process, "tabserve-model", runners, killed_at + REPLACED_WITHIN)
            serving_at = wait_until_serving(url, one_record, killed_at)
            time.sleep(LOAD_AFTER_REPLACEMENT)
        outcomes = {a.outcome for a in load.failed()}
        slowest = max(a.finished - a.sent for a in load.answers if a.sent >= killed_at)
        print(
            f"kill -9 of the model service: {len(load.failed())} requests refused ({outcomes}), "
            f"serving again {serving_at - killed_at:.1f} s after; slowest request {slowest:.1f} s"
        )
        # BentoML's client waits for the model service to be back (it was, in ~5 s): the calls in progress
        # are answered late. Any request refused meanwhile is refused as unavailable: never a 500.
        assert outcomes <= {"503"}, outcomes
        assert not load.failed(since=serving_at + 1.0)
    finally:
        process.terminate()
        process.wait(timeout=60)


# ---- the model service down for longer than a request may wait ------------------------------------------

MODEL_SERVICE_TIMEOUT = 3.0  # TABSERVE_MODEL_SERVICE_TIMEOUT_SECONDS for the test
STOPPED_SECONDS = 12.0
# How much later than the deadline a refusal may come (the event loop, a shared machine).
REFUSAL_MARGIN = 2.0


def test_a_stopped_model_service_gets_503_and_unavailable_in_bounded_time_and_serves_again_once_back(
    stores: Stores, default_model: object, tmp_path: Path, one_record: dict[str, float]
) -> None:
    """The model service alive but answering nothing (SIGSTOP: its port still takes connections, as while
    it hangs): every request, HTTP and gRPC, is refused as unavailable with a retry hint within the model
    service deadline, never 500 or 504; once it runs again (SIGCONT) the service answers."""
    grpc_port = free_port()
    process, url = _serve(
        stores,
        tmp_path,
        TABSERVE_MODEL_SERVICE="true",
        TABSERVE_MODEL_SERVICE_TIMEOUT_SECONDS=str(MODEL_SERVICE_TIMEOUT),
        TABSERVE_GRPC_HOST="127.0.0.1",
        TABSERVE_GRPC_PORT=str(grpc_port),
    )
    grpc_client = triton_grpc.InferenceServerClient(f"127.0.0.1:{grpc_port}")
    rows = np.array([list(one_record.values())])
    tensor = triton_grpc.InferInput("rows", list(rows.shape), "FP64")
    tensor.set_data_from_numpy(rows)
    http_refusals: list[tuple[int, float, str | None, str]] = []  # status, seconds, Retry-After, error
    grpc_refusals: list[tuple[str, float, str]] = []  # status, seconds, message
    try:
        assert httpx.post(f"{url}/predict", json=one_record, timeout=30).status_code == 200
        (runner,) = service_processes(process, "tabserve-model")
        os.kill(runner, signal.SIGSTOP)
        try:
            stopped_until = time.monotonic() + STOPPED_SECONDS
            while time.monotonic() < stopped_until:
                sent = time.monotonic()
                response = httpx.post(f"{url}/predict", json=one_record, timeout=60)
                error = response.json().get("error", "") if response.status_code != 200 else ""
                http_refusals.append(
                    (
                        response.status_code,
                        time.monotonic() - sent,
                        response.headers.get("retry-after"),
                        error,
                    )
                )
                sent = time.monotonic()
                try:
                    grpc_client.infer("breast_cancer", [tensor], client_timeout=60)
                    grpc_refusals.append(("OK", time.monotonic() - sent, ""))
                except InferenceServerException as refused:
                    grpc_refusals.append((str(refused.status()), time.monotonic() - sent, refused.message()))
        finally:
            os.kill(runner, signal.SIGCONT)
        resumed_at = time.monotonic()
        serving_at = wait_until_serving(url, one_record, resumed_at)
        grpc_client.infer("breast_cancer", [tensor], client_timeout=30)
        seconds_taken = [answer[1] for answer in http_refusals] + [answer[1] for answer in grpc_refusals]
        print(
            f"model service stopped {STOPPED_SECONDS:g} s: {len(http_refusals)} HTTP answers "
            f"{sorted({status for status, *_ in http_refusals})}, {len(grpc_refusals)} gRPC answers "
            f"{sorted({status for status, *_ in grpc_refusals})}, slowest {max(seconds_taken):.1f} s "
            f"(deadline {MODEL_SERVICE_TIMEOUT:g} s); serving again {serving_at - resumed_at:.1f} s after "
            "SIGCONT"
        )
        assert http_refusals
        assert grpc_refusals
        assert max(seconds_taken) < MODEL_SERVICE_TIMEOUT + REFUSAL_MARGIN
        for status, _, retry_after, error in http_refusals:
            assert status == 503, (status, error)
            assert int(retry_after or 0) >= 1
            assert "model service is unreachable" in error, error
        for code, _, message in grpc_refusals:
            assert code == "StatusCode.UNAVAILABLE", (code, message)
            assert "model service is unreachable" in message, message
    finally:
        grpc_client.close()
        process.terminate()
        process.wait(timeout=60)
