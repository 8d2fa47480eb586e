"""SIGTERM under load: requests the server accepted are answered; new ones are refused cleanly.

A request counts as accepted when the server processed it, which the prediction log tells (the clients
send their own request ids, over OIP REST and gRPC). Every such request must have got its answer; every
other request must have been refused (connection refused or reset before processing; gRPC UNAVAILABLE
or CANCELLED before processing), never failed with a 5xx or another gRPC status. A call that got no answer
in time (an HTTP read timeout, gRPC DEADLINE_EXCEEDED: seen once in CI, on the 8 gRPC calls sent as the
server stopped) is lost only if the server processed it.
"""

from __future__ import annotations

import signal
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
import pytest
import tritonclient.grpc as triton_grpc
from tritonclient.utils import InferenceServerException

from models.data import load_default
from tests.conftest import Stores, free_port, logged_rows, start_server, wait_ready

HTTP_CLIENTS, GRPC_CLIENTS = 12, 8
LOAD_BEFORE_SIGTERM = 3.0


@dataclass(frozen=True)
class Outcome:
    transport: str
    request_id: str
    kind: str  # "ok", "refused" (never reached the model), or what went wrong
    finished: float


@pytest.mark.parametrize("model_service", [False, True], ids=["model-in-api-workers", "model-service"])
def test_sigterm_under_load_loses_no_accepted_request(
    stores: Stores, default_model: object, tmp_path: Path, model_service: bool
) -> None:
    port, grpc_port = free_port(), free_port()
    log_dir = tmp_path / "predictions"
    env = stores.env(
        TABSERVE_GRPC_HOST="127.0.0.1",
        TABSERVE_GRPC_PORT=str(grpc_port),
        TABSERVE_PREDICTION_LOG_DIR=str(log_dir),
        TABSERVE_MODEL_SERVICE=str(model_service).lower(),
    )
    output = tmp_path / "server-output.txt"
    process = start_server(env, port, output)
    url = f"http://127.0.0.1:{port}"
    wait_ready(process, url, output)

    row = load_default().features.iloc[0].to_numpy(dtype=np.float64)
    outcomes: list[Outcome] = []
    stop = threading.Event()

    def http_client(client: int) -> None:
        body = {
            "inputs": [{"name": "input", "shape": [1, len(row)], "datatype": "FP64", "data": row.tolist()}]
        }
        sent = 0
        while not stop.is_set():
            request_id = f"http-{client}-{sent}"
            sent += 1
            try:
                # A new connection per request: a refused connection is then a clean "not accepted".
                response = httpx.post(
                    f"{url}/v2/models/breast_cancer/infer",
                    json={"id": request_id, **body},
                    headers={"Connection": "close"},
                    timeout=60,
                )
                kind = "ok" if response.status_code == 200 else f"HTTP {response.status_code}"
            except httpx.ConnectError:
                kind = "refused"
            except httpx.TransportError as exc:
                kind = f"dropped: {type(exc).__name__}"
            outcomes.append(Outcome("http", request_id, kind, time.monotonic()))
            if kind == "refused":
                time.sleep(0.05)

    def grpc_client(client: int) -> None:
        triton = triton_grpc.InferenceServerClient(f"127.0.0.1:{grpc_port}")
        tensor = triton_grpc.InferInput("input", [1, len(row)], "FP64")
        tensor.set_data_from_numpy(row.reshape(1, -1))
        sent = 0
        while not stop.is_set():
            request_id = f"grpc-{client}-{sent}"
            sent += 1
            try:
                triton.infer("breast_cancer", [tensor], request_id=request_id, client_timeout=60)
                kind = "ok"
            except InferenceServerException as exc:
                # grpc-core answers calls that arrive once the server is stopping with either code.
                refusals = ("StatusCode.UNAVAILABLE", "StatusCode.CANCELLED")
                kind = "refused" if exc.status() in refusals else f"gRPC {exc.status()}"
                if exc.status() == "StatusCode.DEADLINE_EXCEEDED":
                    # No answer in time: as an HTTP read timeout, lost only if the server processed it.
                    kind = "dropped: DEADLINE_EXCEEDED"
            outcomes.append(Outcome("grpc", request_id, kind, time.monotonic()))
            if kind == "refused":
                time.sleep(0.05)
        triton.close()

    clients = [threading.Thread(target=http_client, args=(i,)) for i in range(HTTP_CLIENTS)]
    clients += [threading.Thread(target=grpc_client, args=(i,)) for i in range(GRPC_CLIENTS)]
    try:
        for client in clients:
            client.start()
        time.sleep(LOAD_BEFORE_SIGTERM)
        sigterm_at = time.monotonic()
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=90)
        exited_after = time.monotonic() - sigterm_at
    finally:
        stop.set()
        for client in clients:
            client.join(timeout=90)
        if process.poll() is None:
            process.kill()

    logged = {row["request_id"] for row in logged_rows(log_dir)}
    answered = {o.request_id for o in outcomes if o.kind == "ok"}
    assert answered <= logged, "answered requests missing from the prediction log"
    # A connection reset before the server read the request is a refusal too; the log tells which were read.
    refused = [o for o in outcomes if o.kind == "refused" or o.kind.startswith("dropped")]
    lost = [o for o in outcomes if o.kind != "ok" and (o not in refused or o.request_id in logged)]
    seen = [
        (o.request_id, o.kind, round(o.finished - sigterm_at, 2), o.request_id in logged) for o in lost[:5]
    ]
    assert not lost, (
        f"{len(lost)} accepted requests lost (the server exited {exited_after:.1f} s after SIGTERM), e.g. "
        f"(id, outcome, seconds after SIGTERM, logged) {seen}\n{output.read_text(errors='replace')[-3000:]}"
    )
    for transport in ("http", "grpc"):
        assert any(o.transport == transport and o.kind == "ok" for o in outcomes)
    finished_after_sigterm = [o for o in outcomes if o.kind == "ok" and o.finished > sigterm_at]
    assert finished_after_sigterm, "no request was in flight at SIGTERM: the test did not test draining"
    text = output.read_text(errors="replace")
    assert "Traceback" not in text, text[-3000:]
    assert process.returncode in (0, -signal.SIGTERM), text[-3000:]
    assert refused, "no request was refused after SIGTERM: the clients stopped too early"
